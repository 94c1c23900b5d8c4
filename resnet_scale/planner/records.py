"""One tensor saved for backward, as activation compression sees it (``compressed.py`` reads these;
``profile.py`` records them in its meta-device forwards)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from resnet_scale.memory.compression import narrow_int_dtype, stores_mask
from resnet_scale.memory.tensors import is_dense

__all__ = ["SavedRecord", "record"]


@dataclass(frozen=True)
class SavedRecord:
    """One saved tensor, as compression sees it (module docstring)."""

    seq: int  # position in the forward's saves
    pack: int  # index of (tensor, version) in the forward: equal for a tensor saved twice
    storage: int  # index of its storage in the forward
    nbytes: int  # storage bytes
    numel: int
    itemsize: int
    dtype: torch.dtype
    quantized: bool  # floating and dense: quantized when numel >= min_numel
    narrow_itemsize: int  # > 0: an integer tensor stored in a dtype of this size
    mask: bool


def record(t: Tensor, packs: dict, storages: dict, seq: int) -> SavedRecord:
    """The record of ``t`` (``packs``/``storages``: the forward's running indices, holding ``t``)."""
    key = (id(t), t._version)
    if key not in packs:
        packs[key] = (len(packs), t)
    st = t.untyped_storage()
    if st._cdata not in storages:
        storages[st._cdata] = (len(storages), st)
    strided_dense = t.layout == torch.strided and is_dense(t)
    narrow = None if t.is_floating_point() or not strided_dense else narrow_int_dtype(t)
    return SavedRecord(
        seq=seq, pack=packs[key][0], storage=storages[st._cdata][0], nbytes=st.nbytes(), numel=t.numel(),
        itemsize=t.element_size(), dtype=t.dtype, quantized=t.is_floating_point() and strided_dense,
        narrow_itemsize=torch.empty((), dtype=narrow).element_size() if narrow is not None else 0,
        mask=stores_mask(t),
    )
