"""Bit packing for the stored forms of activation compression (``compression.py``) and of the
recorded ReLU decisions (``relu_decisions.py``): 1, 2, 4 or 8-bit codes, several per byte."""

from __future__ import annotations

import torch
from torch import Tensor


def _pack_bits(q: Tensor, bits: int) -> Tensor:
    """uint8 codes < 2**bits, numel a multiple of 8 // bits -> 8 // bits codes per byte."""
    per_byte = 8 // bits
    if per_byte == 1:
        return q
    q = q.view(-1, per_byte)
    out = q[:, 0].clone()
    for i in range(1, per_byte):
        out |= q[:, i] << (bits * i)
    return out


def _unpack_bits(packed: Tensor, bits: int) -> Tensor:
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).view(-1)


def _pack_bits_1(bits01: Tensor) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=bits01.device)
    return (bits01.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)


def _unpack_bits_1(packed: Tensor) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)
