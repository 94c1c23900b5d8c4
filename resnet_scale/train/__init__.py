"""The training loop, optimizer/schedule and the run's files."""

from resnet_scale.train.trainer import evaluate, train

__all__ = ["train", "evaluate"]
