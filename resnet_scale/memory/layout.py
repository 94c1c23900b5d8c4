"""Memory layout transform: channels_last (NHWC) for convolution networks.

On GPUs with tensor cores, cuDNN's convolutions run fastest in NHWC; with the weights and the
input in ``torch.channels_last`` the whole network stays NHWC and no transposes are inserted
(PyTorch "Channels Last Memory Format" tutorial; NVIDIA Deep Learning Performance guide).
The input batch must be converted too (``x.contiguous(memory_format=torch.channels_last)``);
the data loader does that when channels_last is on.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["apply_channels_last"]

logger = logging.getLogger("resnet_scale")


def apply_channels_last(model: nn.Module) -> nn.Module:
    """Convert ``model``'s 4-D parameters and buffers to ``torch.channels_last``, in place.

    Returns the same model and logs one line. Not for DeepSpeed ZeRO: a channels_last model
    crashed ZeRO-2's initial parameter broadcast and the engine made the weights contiguous
    again, and once the engine is built its parameters are views of flat buffers that a
    conversion would cut off. Under ZeRO the training setup leaves the weights NCHW and the NHWC
    inputs keep the activations NHWC.
    """
    model.to(memory_format=torch.channels_last)
    n = sum(1 for p in model.parameters() if p.dim() == 4)
    logger.info("channels_last: %d 4-D weights now NHWC", n)
    return model
