"""The ReLU on/off decisions of a checkpointed segment, recorded in its forward and replayed in its
recompute, when activations are compressed (``compression.py`` + ``checkpointing.py``).

With both transforms, a checkpointed segment is recomputed from its *restored* (quantized) input.
Left alone, its ReLUs would decide on/off again from those perturbed values: the elements within
about one quantization step of zero flip, and each flip changes that element's gradient by its
full size (int8 with block checkpointing: 9-41 % relative gradient error instead of 0.6-1.4 %).
So, while a compressed forward is running (:data:`~resnet_scale.memory.compression.ACTIVE`),
each native checkpoint call gets one :class:`ReluDecisions`:

* **forward** (checkpoint's ``context_fn`` forward context): a dispatch mode sees every
  ``aten.relu`` / ``relu_`` / ``threshold_`` call inside the segment -- whichever module or
  function made it, an ``nn.ReLU`` used twice per block included -- and keeps its output's
  decision (a ReLU's: non-zero; a threshold's: ``result > threshold``) as a 1-bit mask, packed 8
  per byte, in memory order. A ReLU output the compression stores too (the segment's output,
  which the next segment saves as its input) shares that mask: the compression takes it from
  ``premade_masks`` instead of making an equal one, so it is stored once;
* **recompute** (the recompute context): the k-th such call gets the k-th mask. Its output is
  the recomputed pre-activation where the forward said "on" (raised to at least the dtype's
  smallest normal number, or just above a non-zero threshold, where it came out below: the
  ReLU backward tests ``result > threshold``) and the threshold's value (0) where it said "off".
  So the recomputed decisions, hence the ReLU gradients, are exactly the forward's; the values
  the convolutions read are the recomputed ones.

The masks belong to that one checkpoint call: the recompute context holds them, checkpoint's
frame holds the recompute context, and the segment's saved-tensor slots hold the frame. They
go when those slots are released (after the segment's backward, or when a graph that is never
backpropagated is dropped); micro-batches and repeated forwards each have their own.
An out-of-place ``aten.threshold`` (``F.threshold`` without ``inplace``) is not covered: its
backward reads its input, which a dispatch mode below autograd cannot replace. Without
compression nothing is recorded (checkpointing alone recomputes from the exact input).
The byte meter counts the masks (they go to the compression's ``observer``); the planner adds
them per segment (``planner/compressed.py``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .quantize import pack_bits, unpack_bits
from .tensors import is_dense

__all__ = ["ReluDecisions", "mask_nbytes"]

_aten = torch.ops.aten
#: op -> in place: the ReLU-like ops whose backward reads their *result*.
_RELUS = {_aten.relu.default: False, _aten.relu_.default: True, _aten.threshold_.default: True}


def mask_nbytes(numel: int) -> int:
    """Bytes of one recorded decision mask of a ``numel``-element ReLU output."""
    return -(-numel // 8)


def _threshold(func: Any, args: tuple) -> tuple[float, float]:
    """(threshold, value) of a call of one of :data:`_RELUS`."""
    if func is _aten.threshold_.default:
        return float(args[1]), float(args[2])
    return 0.0, 0.0


def _flat(t: Tensor) -> Tensor:
    """``t``'s elements in memory order if it is dense (a view), else in logical order."""
    return t.as_strided((t.numel(),), (1,)) if is_dense(t) else t.reshape(-1)


class ReluDecisions:
    """The recorded decisions of one checkpointed segment call (module docstring). ``observer``
    (the compression's) is called with each stored mask."""

    def __init__(self, compression: Any = None) -> None:
        self.compression = compression  # the CompressSaved of this forward, if any
        self.observer: Callable[[Tensor], Any] | None = getattr(compression, "observer", None)
        self.masks: list[tuple[torch.Size, Tensor]] = []
        self.next = 0

    def contexts(self) -> tuple[TorchDispatchMode, TorchDispatchMode]:
        """(forward context that records, recompute context that replays)."""
        return _Record(self), _Replay(self)

    def record(self, func: Any, args: tuple, out: Tensor) -> None:
        threshold, value = _threshold(func, args)
        relu = threshold == 0.0 and value == 0.0
        # a ReLU: "on" = non-zero, as the compression's mask of a ReLU output (a NaN stays on)
        on = _flat(out) != 0 if relu else _flat(out) > threshold
        mask = pack_bits(F.pad(on, (0, (-on.numel()) % 8)).to(torch.uint8), 1)
        self.masks.append((out.shape, mask))
        if self.observer is not None:
            self.observer(mask)
        if relu and is_dense(out) and self.compression is not None:
            # the same bits the compression would store with this output, if it saves it (the
            # segment's output, saved as the next one's input): stored once (version: relu_
            # increments it after this call)
            version = out._version + (1 if _RELUS[func] else 0)
            self.compression.premade_masks[id(out)] = (weakref.ref(out), version, mask)

    def replay(self, func: Any, args: tuple) -> Tensor:
        pre = args[0]
        threshold, value = _threshold(func, args)
        k, self.next = self.next, self.next + 1
        if k >= len(self.masks) or self.masks[k][0] != pre.shape:
            want = self.masks[k][0] if k < len(self.masks) else "none (the forward made fewer)"
            raise RuntimeError(
                f"the recompute of a checkpointed segment made ReLU call #{k + 1} on shape "
                f"{tuple(pre.shape)}, where its forward recorded {want}: the segment must run the "
                "same ReLUs in the same order both times (no data-dependent control flow)"
            )
        n = pre.numel()
        off = unpack_bits(self.masks[k][1], 1)[:n] == 0
        off = off.as_strided(pre.shape, pre.stride()) if is_dense(pre) else off.view(pre.shape)
        if threshold == 0.0:
            low = torch.finfo(pre.dtype).tiny
        else:
            t = torch.tensor(threshold, dtype=pre.dtype)
            low = float(torch.nextafter(t, torch.tensor(float("inf"), dtype=pre.dtype)))
        out = pre.clamp_min_(low) if _RELUS[func] else pre.clamp_min(low)
        return out.masked_fill_(off, value)


class _Record(TorchDispatchMode):
    def __init__(self, decisions: ReluDecisions) -> None:
        super().__init__()
        self.decisions = decisions

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _RELUS:
            self.decisions.record(func, (*args, *(kwargs or {}).values()), out)
        return out


class _Replay(TorchDispatchMode):
    def __init__(self, decisions: ReluDecisions) -> None:
        super().__init__()
        self.decisions = decisions

    def __enter__(self):
        self.decisions.next = 0  # a second backward (retain_graph) recomputes from the start
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _RELUS:
            return self.decisions.replay(func, (*args, *(kwargs or {}).values()))
        return func(*args, **(kwargs or {}))


class Both:
    """Enter ``first`` then ``second`` (a fresh stack each time: reusable, like its parts)."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second
        self._stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(self.first)
        stack.enter_context(self.second)
        self._stacks.append(stack)

    def __exit__(self, *exc: object) -> bool:
        return self._stacks.pop().__exit__(*exc)
