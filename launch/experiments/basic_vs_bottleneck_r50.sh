#!/usr/bin/env bash
# Basic vs bottleneck blocks at depth 50 on CIFAR-10 (both with the 3,4,6,3 stage layout of
# ResNet-50). Both blocks get the same data, batch size, learning rate and epochs; every
# (seed, block) is one run in runs/r50-basic-vs-bottleneck, then `resnet-scale report` compares
# them in reports/r50-basic-vs-bottleneck (report.html, report.md, PNGs: mean ± std over seeds).
# On a small GPU add EXTRA="--low-memory" (the same for both blocks, so the comparison stays fair).
#
#   bash launch/experiments/basic_vs_bottleneck_r50.sh                 # CIFAR-10, 100 epochs, seeds 0 1 2
#   EXTRA="--low-memory" SEEDS="0" bash launch/experiments/basic_vs_bottleneck_r50.sh
#   DATA=digits EPOCHS=2 SEEDS="0" bash launch/experiments/basic_vs_bottleneck_r50.sh   # offline, CPU, minutes
#   DATA=digits EPOCHS=2 EXTRA="--layers 1,1,1" ...                    # tiny model, seconds per run
#
# Settings (environment or flags): --seeds "0 1 2", --epochs N, --data NAME, --extra "FLAGS",
# --runs-dir, --reports-dir, --tracker wandb|tensorboard|none, --dry-run; TRAIN_CMD, REPORT_CMD,
# WANDB_PROJECT, WANDB_ENTITY. W&B goes offline by itself without an API key or network
# (`wandb sync` uploads later). launch/experiments/_compare.sh has the details.
set -euo pipefail

RECIPE="r50-basic-vs-bottleneck"
SHORT="r50"
TITLE="ResNet-50: basic vs bottleneck blocks"
BLOCKS="basic bottleneck"
BASELINE="basic"
DEPTH=50
BATCH=128
LR=0.1
DEFAULT_EPOCHS=100

source "$(dirname "${BASH_SOURCE[0]}")/_compare.sh"
