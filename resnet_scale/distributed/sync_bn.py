"""``apply_sync_batchnorm(model)``: BatchNorm statistics over all processes.

On GPUs this is ``torch.nn.SyncBatchNorm`` (NCCL, fused kernels). torch's SyncBatchNorm refuses
CPU tensors, so on CPU (gloo) ``CpuSyncBatchNorm`` does the same computation with autograd-aware
all-reduces: the batch mean and the biased variance over the global batch normalise, the
unbiased variance feeds the running statistics, exactly as one process with the whole batch
would (Ioffe & Szegedy 2015; "global" BN in Goyal et al. 2017 §5.2 and Peng et al. 2018).
Both are subclasses of ``_BatchNorm`` with the same parameters and buffers, so state_dict keys
are unchanged and the checkpointing BatchNorm fix applies to them too.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger("resnet_scale")


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum is the sum of the gradients over processes.

    A plain ``dist.all_reduce`` in both directions (``torch.distributed.nn.functional`` does the
    same but is deprecated and warns on every call).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch (any backend, gloo included)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        xf = x.float()
        count = _all_reduce_sum(torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device))
        mean = _all_reduce_sum(xf.sum(dims).double()) / count
        centred = xf - mean.float()[None, :, None, None]
        var = _all_reduce_sum((centred * centred).sum(dims).double()) / count  # biased: normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        y = centred * torch.rsqrt(var.float() + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype) if x.dtype != y.dtype else y


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CpuSyncBatchNorm):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, device=module.running_mean.device)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out


def apply_sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """Return ``model`` with every BatchNorm2d synchronised over the processes (one log line).
    Parameters keep their names; build the optimizer after this (the modules are new)."""
    if device_type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        kind = "torch.nn.SyncBatchNorm"
    else:
        model = _convert_cpu(model)
        kind = "CpuSyncBatchNorm (gloo)"
    n = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    logger.info("sync batchnorm: %d BatchNorm layers now use global-batch statistics (%s)", n, kind)
    return model


__all__ = ["CpuSyncBatchNorm", "apply_sync_batchnorm"]
