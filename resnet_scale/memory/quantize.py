"""The arithmetic of activation compression (``compression.py``): stochastic per-group
quantization of a flat tensor and its inverse, and bit packing of codes and 1-bit masks.

Plain torch ops, the same on every device. Packing and unpacking go one code position at a time
over a ``(bytes, codes per byte)`` view (a shift and an ``or``/``and`` per position): on a CPU that
is several times faster than broadcasting a column of shifts against every byte, and the bytes are
the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GROUP_SIZE", "dequantize", "pack_bits", "quantize", "restore_relu_", "unpack_bits"]

#: Consecutive elements (in memory order) that share one minimum and step.
GROUP_SIZE = 256


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """uint8 codes < 2**bits (1, 2, 4 or 8 bits), numel a multiple of 8 // bits -> 8 // bits codes
    per byte, the first code in the lowest bits."""
    per_byte = 8 // bits
    if per_byte == 1:
        return q
    q = q.view(-1, per_byte)
    out = q[:, 0].clone()
    for i in range(1, per_byte):
        out |= q[:, i] << (bits * i)
    return out


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """The inverse of :func:`pack_bits`: one uint8 code per element, 1-D."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    out = torch.empty((packed.numel(), per_byte), dtype=torch.uint8, device=packed.device)
    low = 2**bits - 1
    for i in range(per_byte):
        torch.bitwise_and(packed >> (bits * i) if i else packed, low, out=out[:, i])
    return out.view(-1)


def quantize(flat: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stochastically rounded ``bits``-bit codes of the 1-D tensor ``flat`` in groups of
    :data:`GROUP_SIZE`: (packed uint8 codes, per-group minimum, per-group step), fp32 ranges.
    A value ``x`` is stored as ``floor((x - min) / step + u)``, ``u`` uniform in [0, 1), drawn from
    torch's default generator of the tensor's device, so the restored value is ``x`` in expectation."""
    n = flat.numel()
    groups = F.pad(flat.float(), (0, (-n) % GROUP_SIZE)).view(-1, GROUP_SIZE)
    lo = groups.amin(1, keepdim=True)
    levels = 2**bits - 1
    step = (groups.amax(1, keepdim=True) - lo) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))
    noise = torch.rand_like(groups)
    q = groups.sub(lo).div_(step).add_(noise).floor_().clamp_(0, levels).to(torch.uint8)
    return pack_bits(q.view(-1), bits), lo, step


def dequantize(packed: Tensor, lo: Tensor, step: Tensor, bits: int, n: int) -> Tensor:
    """The fp32 values of :func:`quantize`'s output, first ``n`` elements, 1-D."""
    q = unpack_bits(packed, bits).view(-1, GROUP_SIZE)
    return (lo + q.float() * step).view(-1)[:n]


def restore_relu_(values: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """In place: ``values`` where the packed 1-bit ``mask`` says non-zero, raised to at least the
    smallest normal number of ``dtype`` (so a ReLU's backward, ``grad * (y > 0)``, passes there),
    and exactly 0 elsewhere."""
    nonzero = unpack_bits(mask, 1)[: values.numel()]
    tiny = torch.full((), torch.finfo(dtype).tiny, dtype=values.dtype, device=values.device)
    torch.maximum(values, tiny, out=values)
    return values.mul_(nonzero)
