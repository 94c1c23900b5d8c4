"""Activation compression, applied from outside the model: the tensors autograd saves for the
backward pass are stored quantized and restored (dequantized) when the backward pass needs them
(ActNN: Chen et al., ICML 2021, "ActNN: Reducing Training Memory Footprint via 2-Bit Activation
Compressed Training", arXiv:2104.14129).

Modes (:data:`COMPRESSION_MODES`):

* ``none`` -- nothing changes (a no-op that marks nothing).
* ``int8`` / ``int4`` / ``int2`` -- each compressed tensor is stored as 8, 4 or 2 bits per
  element (packed 1, 2 or 4 values per byte), plus, per group of :data:`GROUP_SIZE` consecutive
  elements in memory order, the group's minimum and step as two fp32 numbers (8 bytes per group,
  0.25 bit per element). A value ``x`` of a group with minimum ``m`` and step ``s`` is stored as
  ``q = floor((x - m) / s + u)`` with ``u`` uniform in [0, 1) (stochastic rounding), so the
  restored ``m + q * s`` equals ``x`` in expectation (unbiased). The random numbers come from
  torch's default generator of the tensor's device (a seeded run is reproducible).
* **ReLU outputs** (a saved tensor whose ``grad_fn`` is a ReLU/threshold node: the ReLU's own
  saved result, which is also the next convolution's saved input) additionally store a 1-bit
  mask of their non-zero elements. Restored, masked-out elements are exactly 0 and the others
  are at least the dtype's smallest normal number, so the ReLU's backward (``grad * (y > 0)``)
  is exact; the values the convolution needs are the unbiased ones above (a restored 0 of a
  positive element becomes ``finfo(dtype).tiny``: 1.2e-38 in fp32/bf16, 6.1e-5 in fp16).

* **Integer tensors** (max-pool's int64 indices) of at least ``min_numel`` elements, dense, are
  stored exactly in the narrowest signed integer dtype that holds their minimum and maximum (int8,
  int16 or int32: ResNet-50's indices into a 112 x 112 plane fit int16, a quarter of int64) and
  restored to their dtype and strides. Reading the minimum and maximum costs one device-to-host
  read per such tensor (one per forward for a ResNet). On the ``meta`` device (the byte meter)
  a tensor has no values: the range its op guarantees is used, set as the attribute
  :data:`VALUE_RANGE_ATTR` (``measure.py`` sets it on max-pool indices: 0 .. plane size - 1, what
  real indices reach too unless every maximum avoids the last window); without one it is kept.

Kept as they are (not compressed): parameters and views or casts of them (autocast's bf16 weight
copies are found through their autograd history; a *frozen* parameter's cast has none and is
compressed), integer tensors that are small, not dense, or need int64, tensors under
``min_numel`` elements (BatchNorm's saved mean and inverse std), and tensors that are not dense
(expanded views).

Design decisions
----------------
* **Only the model's own forward, only in training with grad enabled.** ``model.forward`` is
  replaced on the instance by one that runs the class forward inside a
  ``torch.autograd.graph.saved_tensors_hooks`` context; ``eval()`` or ``no_grad`` runs the
  plain forward. The forward's outputs are bit-identical (only what is saved for backward
  changes); parameter and buffer names, hence state_dict keys, are unchanged. The loss (outside
  the model) saves its inputs uncompressed.
* **dtype and memory format are kept.** Quantization works on the tensor's elements in memory
  order and the restored tensor has the saved tensor's dtype and strides (a channels_last or
  bf16 activation comes back channels_last, bf16). Arithmetic is in fp32.
* **A tensor saved twice is stored once** within one forward (an in-place ReLU's result is
  saved by the ReLU and by the next convolution): packs are shared by tensor object and version.
* **With activation checkpointing** (``apply_activation_checkpointing``, native impl) the
  tensors saved outside recomputation -- each segment's input, the stem and the head -- are
  compressed; inside a segment nothing is saved in the forward. The two transforms touch
  different ``forward`` methods (the model's, the stages'), so either order gives the same
  model; ``apply_memory_transforms`` would apply checkpointing first. A recomputed segment
  starts from its restored (dequantized) input, so left alone its ReLUs would decide on/off from
  perturbed values (each flip of an element near zero changes its gradient by its full size: int8
  gave 9-41 % gradient error against 0.6-1.4 % without checkpointing). So while this context is
  entered (:data:`ACTIVE`) each checkpointed segment records its ReLUs' 1-bit decisions in the
  forward and replays them in the recompute (``relu_decisions.py``): the checkpointed error is
  then the uncheckpointed one (int8 0.6 %, one step of a 3-block CIFAR ResNet), for 1 bit per
  ReLU output inside the segments (ResNet-50/224, int8: +0.40 MiB per image, +5 %, with block,
  +0.88 with stage). fairscale's checkpoint is refused with compression (no recompute context).
* **Applying twice is an error** (RuntimeError naming the mode already applied).

``measure_saved_activation_bytes`` counts what a compressed model really stores (codes, ranges,
masks and the tensors kept as they are) through the ``observer`` of :func:`applied_compression`.

``--activation-compression`` applies it through ``apply_memory_transforms``; the planner can choose
it. Not done yet: a GPU kernel (the quantization is plain torch ops).
"""

from __future__ import annotations

import contextvars
import logging
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantize import GROUP_SIZE, dequantize, pack_bits, quantize, restore_relu_
from .tensors import copy_chain_leaf, is_dense, is_parameter

__all__ = [
    "COMPRESSION_MODES",
    "GROUP_SIZE",
    "MIN_COMPRESS_NUMEL",
    "VALUE_RANGE_ATTR",
    "CompressSaved",
    "applied_compression",
    "apply_activation_compression",
    "dequantize",
    "quantize",
    "packed_nbytes",
    "restore_peak_bytes",
    "stores_mask",
]

logger = logging.getLogger("resnet_scale")

#: mode -> bits per stored element (``none``: not compressed).
COMPRESSION_MODES: dict[str, int | None] = {"none": None, "int8": 8, "int4": 4, "int2": 2}
#: Saved tensors with fewer elements stay as they are (BatchNorm statistics, small heads).
MIN_COMPRESS_NUMEL = 4096

#: :meth:`CompressSaved.unpack` restores a tensor in at most RESTORE_CHUNKS pieces of at least
#: RESTORE_CHUNK elements (whole groups): its temporaries stay a small share of the tensor.
RESTORE_CHUNK = 2**16
RESTORE_CHUNKS = 64
#: Bytes of temporaries per element of a chunk being restored (:func:`restore_peak_bytes`).
RESTORE_TEMP_BYTES_PER_ELEMENT = 24
#: Attribute of a tensor without values (``meta``/fake) giving the (min, max) its op guarantees.
VALUE_RANGE_ATTR = "_rs_value_range"
_NARROW_INTS = (torch.int8, torch.int16, torch.int32)

_APPLIED_ATTR = "_rs_activation_compression"
#: The innermost :class:`CompressSaved` being entered (checkpointing then records ReLU decisions).
ACTIVE: contextvars.ContextVar = contextvars.ContextVar("rs_active_compression", default=None)
_RELU_NODES = ("ReluBackward", "ThresholdBackward")


# ----------------------------------------------------------------------------- the hooks


def _is_parameter_or_copy(t: Tensor) -> bool:
    """A parameter, a view of one, or a cast/view chain of one (autocast's weight copies)."""
    return is_parameter(t) or copy_chain_leaf(t) is not None


@dataclass
class _Packed:
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    bits: int
    codes: Tensor
    lo: Tensor
    step: Tensor
    mask: Tensor | None  # packed 1-bit non-zero mask of a ReLU output

    def stored(self) -> list[Tensor]:
        return [t for t in (self.codes, self.lo, self.step, self.mask) if t is not None]


@dataclass
class _Narrowed:
    """An integer tensor stored exactly in a narrower integer dtype (same shape and strides)."""

    values: Tensor
    dtype: torch.dtype


def _value_range(t: Tensor) -> tuple[int, int] | None:
    """(min, max) of an integer tensor: read from it, or, for one without values (meta/fake),
    the range set as :data:`VALUE_RANGE_ATTR` (None if not set)."""
    known = getattr(t, VALUE_RANGE_ATTR, None)
    if known is not None:
        return known
    from torch._subclasses.fake_tensor import is_fake

    if t.device.type == "meta" or is_fake(t):
        return None
    lo, hi = torch.aminmax(t.detach())
    return int(lo), int(hi)


def narrow_int_dtype(t: Tensor) -> torch.dtype | None:
    """The narrowest signed integer dtype holding ``t``'s values exactly, if narrower than its own."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.numel() == 0:
        return None
    span = _value_range(t)
    if span is None:
        return None
    for dtype in _NARROW_INTS:
        info = torch.iinfo(dtype)
        if info.bits >= torch.iinfo(t.dtype).bits:
            return None
        if info.min <= span[0] and span[1] <= info.max:
            return dtype
    return None


class CompressSaved(torch.autograd.graph.saved_tensors_hooks):
    """``with CompressSaved(bits): loss = f(x)`` stores f's saved tensors quantized (module
    docstring). One instance per forward (it shares packs of a tensor saved twice).
    ``observer``, if given, is called with every tensor this context keeps for the backward
    pass (compressed payloads and tensors kept as they are): a meter can count them."""

    def __init__(self, bits: int, *, min_numel: int = MIN_COMPRESS_NUMEL,
                 observer: Callable[[Tensor], Any] | None = None) -> None:
        self.bits = bits
        self.min_numel = min_numel
        self.observer = observer
        self._shared: dict[int, tuple[weakref.ref, int, _Packed]] = {}
        self._tokens: list[contextvars.Token] = []
        #: id -> (weakref, version, 1-bit non-zero mask) a checkpointed segment already recorded
        self.premade_masks: dict[int, tuple[weakref.ref, int, Tensor]] = {}
        super().__init__(self.pack, self.unpack)

    def __enter__(self) -> None:
        self._tokens.append(ACTIVE.set(self))
        super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        ACTIVE.reset(self._tokens.pop())
        # The hooks hold this object (a cycle only the garbage collector breaks): let go of the
        # packs, so they go with the graph's saved-tensor slots, not at the next collection.
        self._shared.clear()
        self.premade_masks.clear()

    def compresses(self, t: Tensor) -> bool:
        """Whether :meth:`pack` quantizes ``t`` (else it keeps ``t`` as it is)."""
        return (
            t.is_floating_point()
            and t.layout == torch.strided
            and t.numel() >= self.min_numel
            and is_dense(t)
            and not _is_parameter_or_copy(t)
        )

    def pack(self, t: Tensor) -> Any:
        if (not t.is_floating_point() and t.layout == torch.strided and t.numel() >= self.min_numel
                and is_dense(t)):
            narrow = narrow_int_dtype(t)
            if narrow is not None:
                values = torch.empty_strided(t.shape, t.stride(), dtype=narrow, device=t.device)
                values.copy_(t.detach())
                if self.observer is not None:
                    self.observer(values)
                return _Narrowed(values, t.dtype)
        if not self.compresses(t):
            if self.observer is not None:
                self.observer(t)
            # An alias: a saved output packed as itself would hold its own grad_fn (a cycle).
            return t.detach()
        shared = self._shared.get(id(t))
        if shared is not None and shared[0]() is t and shared[1] == t._version:
            return shared[2]
        flat = t.detach().as_strided((t.numel(),), (1,))
        codes, lo, step = quantize(flat, self.bits)
        mask = None
        made = self.premade_masks.get(id(t))
        if made is not None and made[0]() is t and made[1] == t._version and stores_mask(t):
            mask = made[2]
        elif stores_mask(t):
            nonzero = F.pad(flat != 0, (0, (-flat.numel()) % 8)).to(torch.uint8)
            mask = pack_bits(nonzero, 1)
        packed = _Packed(t.shape, t.stride(), t.dtype, t.device, self.bits, codes, lo, step, mask)
        self._shared[id(t)] = (weakref.ref(t), t._version, packed)
        if self.observer is not None:
            for s in packed.stored():
                self.observer(s)
        return packed

    @staticmethod
    def unpack(packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        if isinstance(packed, _Narrowed):
            return packed.values.to(packed.dtype)  # preserve_format: same strides (dense)
        p: _Packed = packed
        n = 1
        for s in p.shape:
            n *= s
        out = torch.empty_strided(p.shape, p.stride, dtype=p.dtype, device=p.device)
        flat = out.as_strided((n,), (1,))
        per_group = GROUP_SIZE * p.bits // 8  # code bytes per group
        chunk = restore_chunk(n)
        for start in range(0, n, chunk):  # bounded fp32 temporaries (restore_peak_bytes)
            stop = min(n, start + chunk)
            g0, g1 = start // GROUP_SIZE, -(-stop // GROUP_SIZE)
            values = dequantize(p.codes[g0 * per_group:g1 * per_group], p.lo[g0:g1], p.step[g0:g1], p.bits,
                                stop - start)
            if p.mask is not None:
                restore_relu_(values, p.mask[start // 8:-(-stop // 8)], p.dtype)
            flat[start:stop].copy_(values)
            values = None  # free this chunk's temporaries before the next one's
        return out


def restore_chunk(numel: int) -> int:
    """Elements :meth:`CompressSaved.unpack` restores at a time (whole groups, so a multiple of 8)."""
    return max(RESTORE_CHUNK, -(-numel // (RESTORE_CHUNKS * GROUP_SIZE)) * GROUP_SIZE)


def stores_mask(t: Tensor) -> bool:
    """Whether a compressed ``t`` also stores a 1-bit non-zero mask (a ReLU's output)."""
    return t.grad_fn is not None and type(t.grad_fn).__name__.startswith(_RELU_NODES)


def packed_nbytes(numel: int, bits: int, mask: bool) -> int:
    """Bytes :meth:`CompressSaved.pack` stores for a quantized tensor of ``numel`` elements: codes
    (padded to whole groups), an fp32 minimum and step per group, and the mask if any."""
    groups = -(-numel // GROUP_SIZE)
    return groups * GROUP_SIZE * bits // 8 + 8 * groups + (-(-numel // 8) if mask else 0)


def restore_peak_bytes(numel: int, dtype: torch.dtype) -> int:
    """The most bytes :meth:`CompressSaved.unpack` holds at once while it restores a quantized tensor
    of ``numel`` elements: the restored tensor, plus the temporaries of one chunk
    (:func:`restore_chunk`: 1/64 of the tensor, at least 65536 elements) --
    :data:`RESTORE_TEMP_BYTES_PER_ELEMENT` per element (fp32 values, their clamped and masked
    copies, codes and mask unpacked to bytes; measured 8-9 without a ReLU mask, up to 22 with one:
    tests/test_planner_compression.py)."""
    chunk = -(-min(numel, restore_chunk(numel)) // GROUP_SIZE) * GROUP_SIZE
    itemsize = torch.empty((), dtype=dtype).element_size()
    return numel * itemsize + RESTORE_TEMP_BYTES_PER_ELEMENT * chunk + 64  # + 0-dim tensors (the fill 0.0)


# ----------------------------------------------------------------------------- the transform


def applied_compression(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`apply_activation_compression` did to ``model`` (mode, bits, min_numel, and
    ``observer``: None, or a callable a meter may set to see every stored tensor), or None if it
    was never applied (or applied with ``none``)."""
    return getattr(model, _APPLIED_ATTR, None)


def _compressed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Installed as ``model.forward`` (bound to the model)."""
    done = self.__dict__[_APPLIED_ATTR]
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, *args, **kwargs)
    with CompressSaved(done["bits"], min_numel=done["min_numel"], observer=done["observer"]):
        return type(self).forward(self, *args, **kwargs)


def apply_activation_compression(
    model: nn.Module, mode: str, *, min_numel: int = MIN_COMPRESS_NUMEL
) -> nn.Module:
    """Store the tensors ``model``'s training forward saves for backward quantized, in place.

    Args:
        model: any ``nn.Module`` (resnet_scale's or torchvision's ResNets included); apply
            before ``torch.compile`` / ``prepare``.
        mode: ``none``, ``int8``, ``int4`` or ``int2`` (:data:`COMPRESSION_MODES`; what each
            stores is in the module docstring).
        min_numel: saved tensors with fewer elements are kept as they are.

    Returns the same model. Logs one line. Raises ValueError for an unknown mode, RuntimeError if
    compression was already applied.
    """
    if mode not in COMPRESSION_MODES:
        raise ValueError(
            f"unknown activation compression {mode!r}: choose one of {', '.join(COMPRESSION_MODES)}"
        )
    previous = applied_compression(model)
    if previous is not None:
        raise RuntimeError(
            f"activation compression is already applied to this model (mode={previous['mode']}); "
            "apply it once, to a fresh model"
        )
    bits = COMPRESSION_MODES[mode]
    if bits is None:
        logger.info("activation compression: none, off")
        return model
    model.__dict__[_APPLIED_ATTR] = {"mode": mode, "bits": bits, "min_numel": min_numel,
                                     "observer": None}
    model.forward = types.MethodType(_compressed_forward, model)
    logger.info("activation compression: %s (%d bits per saved element, %d-element groups, "
                "stochastic rounding; ReLU masks exact)", mode, bits, GROUP_SIZE)
    return model


def _remove_activation_compression(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_activation_compression` (used on private copies by the measuring code)."""
    if model.__dict__.pop(_APPLIED_ATTR, None) is not None:
        del model.__dict__["forward"]
    return model
