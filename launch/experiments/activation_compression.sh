#!/usr/bin/env bash
# The accuracy cost of activation compression: the same ResNet-20 (CIFAR family, basic blocks)
# trained with --activation-compression none, int8, int4 and int2. Every arm gets the same data,
# batch size, learning rate, epochs and seeds; every (seed, setting) is one run in
# runs/r20-activation-compression, then `resnet-scale report` compares the settings with `none` as
# the baseline (mean ± std over seeds, each difference with its 95 % interval and Welch p-value)
# in reports/r20-activation-compression.
#
#   bash launch/experiments/activation_compression.sh                    # CIFAR-10, 100 epochs, seeds 0 1 2
#   DATA=digits bash launch/experiments/activation_compression.sh        # offline, CPU: 15 epochs, minutes
#   EXTRA="--depth 56" bash launch/experiments/activation_compression.sh # ResNet-56, as in ActNN
#   EXTRA="--activation-checkpointing block" ...                         # compression of segment inputs
#
# Settings (environment or flags) are those of the other recipes: --seeds, --epochs, --data,
# --extra, --runs-dir, --reports-dir, --tracker, --dry-run; TRAIN_CMD, REPORT_CMD, WANDB_PROJECT,
# WANDB_ENTITY. launch/experiments/_compare.sh has the details.
set -euo pipefail

RECIPE="r20-activation-compression"
SHORT="r20"
TITLE="ResNet-20: activation compression (none, int8, int4, int2)"
ARM_FLAG="--activation-compression"
ARMS="none int8 int4 int2"
GROUP_BY="activation_compression"
BASELINE="none"
FIXED="--block basic"
DEPTH=20
BATCH=128
LR=0.1
DEFAULT_EPOCHS=100
RECIPE_DIGITS_EPOCHS=15

source "$(dirname "${BASH_SOURCE[0]}")/_compare.sh"
