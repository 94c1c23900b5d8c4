"""Building the Accelerator from the config (DDP now; DeepSpeed ZeRO comes with the distributed issue)."""

from resnet_scale.distributed.accelerator import build_accelerator

__all__ = ["build_accelerator"]
