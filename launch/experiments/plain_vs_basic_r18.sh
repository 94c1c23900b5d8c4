#!/usr/bin/env bash
# Plain vs residual (basic) blocks at depth 18 on CIFAR-10: does the shortcut help? Tracked
# and reproducible. Both blocks get the same data, batch size, learning rate and epochs; every
# (seed, block) is one run in runs/r18-plain-vs-basic, then `resnet-scale report` compares them
# in reports/r18-plain-vs-basic (report.html, report.md, PNGs: mean ± std over seeds).
#
#   bash launch/experiments/plain_vs_basic_r18.sh                      # CIFAR-10, 100 epochs, seeds 0 1 2
#   SEEDS="0" EPOCHS=30 bash launch/experiments/plain_vs_basic_r18.sh  # quicker
#   DATA=digits EPOCHS=2 SEEDS="0 1" bash launch/experiments/plain_vs_basic_r18.sh   # offline, CPU, minutes
#   DATA=digits EPOCHS=2 EXTRA="--layers 1,1,1" ...                    # tiny model, seconds per run
#
# Settings (environment or flags): --seeds "0 1 2", --epochs N, --data NAME, --extra "FLAGS",
# --runs-dir, --reports-dir, --tracker wandb|tensorboard|none, --dry-run; TRAIN_CMD, REPORT_CMD,
# WANDB_PROJECT, WANDB_ENTITY. W&B goes offline by itself without an API key or network
# (`wandb sync` uploads later). launch/experiments/_compare.sh has the details.
set -euo pipefail

RECIPE="r18-plain-vs-basic"
SHORT="r18"
TITLE="ResNet-18: plain vs basic (residual) blocks"
BLOCKS="plain basic"
BASELINE="plain"
DEPTH=18
BATCH=128
LR=0.1
DEFAULT_EPOCHS=100

source "$(dirname "${BASH_SOURCE[0]}")/_compare.sh"
