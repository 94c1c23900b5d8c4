"""The training loop, optimizer/schedule and the run's files."""

from resnet_scale.train.metrics import evaluate
from resnet_scale.train.trainer import train

__all__ = ["train", "evaluate"]
