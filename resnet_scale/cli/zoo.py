"""``resnet-scale zoo``: the table of blocks x depths, with weighted layers and parameters."""

from __future__ import annotations

import argparse

NAME = "zoo"
HELP = "print the table of blocks x depths: weighted layers and parameters"
DESCRIPTION = "Print every block x depth this package builds, with its stages, weighted layers and parameters."


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return parser


def run(ns: argparse.Namespace) -> int:
    from resnet_scale.models import zoo_table

    print("| block | depth | stages | weighted layers | parameters (10 classes) |")
    print("|---|---|---|---|---|")
    for row in zoo_table(num_classes=10, stem="imagenet"):
        layers = ",".join(map(str, row["layers"]))
        print(f"| {row['block']} | {row['depth']} | {layers} | {row['weighted_layers']} | {row['parameters'] / 1e6:.2f}M |")
    return 0
