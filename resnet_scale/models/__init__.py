"""Models: nn.Module code only. Imports only torch: memory transforms, distribution and training
are applied to these models from outside, so nothing here knows about them.

``build_resnet(block, depth, stem=..., num_classes=...)`` makes a ResNet of plain, basic or
bottleneck blocks; with ``stem="imagenet"`` it is state_dict-compatible with torchvision.
"""

from .blocks import BasicBlock, Bottleneck, PlainBlock, conv1x1, conv3x3
from .resnet import (
    BLOCKS,
    CIFAR_WIDTHS,
    STANDARD_LAYOUTS,
    STANDARD_WIDTHS,
    STEMS,
    ResNet,
    build_resnet,
    count_parameters,
    count_weighted_layers,
    describe,
    resolve_layers,
    zoo_table,
)

__all__ = [
    "BLOCKS",
    "CIFAR_WIDTHS",
    "STANDARD_LAYOUTS",
    "STANDARD_WIDTHS",
    "STEMS",
    "BasicBlock",
    "Bottleneck",
    "PlainBlock",
    "ResNet",
    "build_resnet",
    "conv1x1",
    "conv3x3",
    "count_parameters",
    "count_weighted_layers",
    "describe",
    "resolve_layers",
    "zoo_table",
]
