"""Observe activation memory and FLOPs of one training step, without a GPU (``measure_*``).

Activation memory is measured as the bytes of the tensors autograd saves for the backward
pass during one training-mode forward, seen through
``torch.autograd.graph.saved_tensors_hooks``. What is counted:

* **Each distinct storage once, whole.** A saved tensor keeps its whole storage alive, and the
  same storage is often saved several times (e.g. an in-place ReLU's result is also the next
  conv's input), so tensors are deduplicated by their storage (the C++ StorageImpl address,
  which is unique while the storage lives -- we hold a reference -- and works on meta/fake
  tensors, whose ``data_ptr()`` is 0) and each storage counts ``nbytes()`` once.
* **Model state is not activation memory.** Storages of parameters and buffers are excluded
  (that also catches views of them, e.g. ``fc.weight.t()`` saved by ``addmm``: 7.8 MiB for
  ResNet-50, independent of the batch), and so are copies of parameters made in the forward --
  autocast's low-precision weight casts (found through their autograd history: a chain of
  cast/view nodes ending at a parameter's AccumulateGrad; frozen parameters have no history,
  so their casts are counted). Weight casts cost ``parameters x itemsize`` (48.7 MiB for
  ResNet-50 in bf16) once per step whatever the batch; a memory planner adds them separately.
* What remains is linear in the batch except BatchNorm's saved batch mean and inverse std
  (``2 x C x 4`` bytes per layer, 0.2 MiB for all of ResNet-50).

On ``device="meta"`` (the default) nothing is computed or allocated: the model is copied with
its parameters replaced by ``FakeTensor``s (meta storage, CPU device) and run under
``FakeTensorMode``. Fake CPU rather than plain meta tensors because autocast has no meta
backend (``torch.autocast(device_type="meta")`` is refused, and CPU autocast ignores meta
tensors). One meta kernel differs from the real ones: ``native_batch_norm`` on a bf16/fp16
input returns its saved mean/inverse std in that dtype, while the CPU and CUDA kernels keep them
in fp32; a small dispatch mode restores fp32, so the meta figure equals a real CPU run's to the
byte (tests/test_memory_cost.py).

With activation compression applied (``compression.py``), the figure is what the compressed
model stores: codes, per-group ranges, ReLU masks, narrowed integer tensors (max-pool indices:
on the meta device their dtype comes from the range max-pool guarantees, see
``_BatchNormStatsInFloat32``) and the tensors it keeps as they are; with checkpointing as well,
the 1-bit ReLU decisions each checkpointed segment records (``relu_decisions.py``).

With activation checkpointing applied, the figure is what is stored *outside* recomputation:
each checkpointed segment's saved input (non-reentrant ``checkpoint`` saves it through the same
hooks) plus the stem and head. During the backward pass one segment at a time is recomputed;
that extra peak is :func:`measure_segment_peak_bytes`, reported separately.

Figures (MiB per image = the slope between batch 1 and 2, fp32 unless said; in brackets the
reference figures tests/test_memory_cost.py checks within 1 %): ResNet-50/224 81.9 [82.0] (bf16
41.7 [41.8]); ResNet-18/224 21.2 [21.2]; ResNet-152/224 169.2 [169.5]; CIFAR-stem ResNet-18/32
4.48 [4.48]; ResNet-50 with ``stage`` 14.4 [14.4], ``block`` 29.7 [29.7]. The reference figures
are per image at a small batch, so they carry a share of the batch-independent BatchNorm
statistics (ResNet-152: 169.8 MiB at batch 1, 169.5 at batch 2, 169.2 per image); the function
returns bytes for the whole batch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .checkpointing import (
    _apply,
    _remove_activation_checkpointing,
    applied_checkpointing,
    segments,
)
from .compression import VALUE_RANGE_ATTR, _remove_activation_compression, applied_compression
from .tensors import copy_chain_leaf

__all__ = [
    "SavedStorages",
    "count_step_flops",
    "measure_saved_activation_bytes",
    "measure_segment_peak_bytes",
    "run_context",
]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_BATCH_NORM_OPS = ("native_batch_norm", "_native_batch_norm_legit")


_MAX_POOL_OPS = ("max_pool2d_with_indices", "max_pool3d_with_indices")


class _BatchNormStatsInFloat32(TorchDispatchMode):
    """On fake tensors, give BatchNorm's saved mean/invstd the dtype real kernels give them, and
    give max-pool's indices the value range they have on real tensors (0 .. input plane size - 1,
    as ``compression.VALUE_RANGE_ATTR``: a compressed model stores them in the narrowest integer
    dtype that holds it)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in _MAX_POOL_OPS and isinstance(out, tuple) and len(out) == 2:
            plane = 1
            for size in args[0].shape[-(2 if "2d" in func.overloadpacket.__name__ else 3):]:
                plane *= size
            setattr(out[1], VALUE_RANGE_ATTR, (0, plane - 1))
        if (
            func.overloadpacket.__name__ in _BATCH_NORM_OPS
            and args[0].dtype in _LOW_PRECISION
            and isinstance(out, tuple)
            and len(out) == 3
        ):
            out = (out[0], *(t.float() if t.dtype in _LOW_PRECISION else t for t in out[1:]))
        return out


def _copy_model(model: nn.Module, make) -> nn.Module:
    """deepcopy ``model`` with every parameter/buffer replaced by ``make(tensor)``: the caller's
    model and its data are never touched or duplicated (a GPU model is not copied on the GPU)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(make(p), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = make(b)
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def run_context(
    model: nn.Module,
    batch_size: int,
    image_size: int,
    dtype: torch.dtype,
    channels_last: bool,
    device: str | torch.device,
    policy: str | None,
    strip_checkpointing: bool = False,
) -> Iterator[tuple[nn.Module, Tensor]]:
    """Yield ``(copy of model, input batch)`` ready for one training-mode step, inside the right
    fake/autocast/grad contexts."""
    if dtype not in (torch.float32, *_LOW_PRECISION):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    device = torch.device(device)
    shape = (batch_size, 3, image_size, image_size)

    def layout(t: Tensor) -> Tensor:
        # As model.to(memory_format=torch.channels_last) would (that call cannot swap fake
        # parameters): 4-D tensors NHWC, the rest as they are.
        if channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    with contextlib.ExitStack() as stack:
        if device.type == "meta":
            from torch._subclasses.fake_tensor import FakeTensorMode

            fake = FakeTensorMode()
            with fake:
                work = _copy_model(
                    model,
                    lambda t: layout(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)),
                )
                x = layout(torch.empty(shape))
            stack.enter_context(fake)
            stack.enter_context(_BatchNormStatsInFloat32())
            autocast_device = "cpu"
        else:
            work = _copy_model(model, lambda t: layout(t.detach().to(device, copy=True)))
            gen = torch.Generator().manual_seed(0)
            x = layout(torch.randn(shape, generator=gen).to(device))
            autocast_device = device.type
        if strip_checkpointing:
            _remove_activation_checkpointing(work)
        if policy is not None:
            _apply(work, policy, "native", False)
        work.train()
        stack.enter_context(torch.enable_grad())
        if dtype != torch.float32:
            stack.enter_context(torch.autocast(device_type=autocast_device, dtype=dtype))
        yield work, x


class SavedStorages:
    """saved_tensors_hooks that collect distinct non-parameter storages (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model_storages = {}
        for t in (*model.parameters(), *model.buffers()):
            st = t.untyped_storage()
            self.model_storages[st._cdata] = st
        self.storages: dict[int, torch.UntypedStorage] = {}
        #: while not None, storages also go to ``groups[current]`` (per-segment attribution).
        self.current: int | None = None
        self.excluded: set[int] = set()
        self.groups: dict[int, dict[int, torch.UntypedStorage]] = {}

    def _is_parameter_copy(self, t: Tensor) -> bool:
        """True for a cast or view of a parameter (``tensors.copy_chain_leaf``)."""
        leaf = copy_chain_leaf(t)
        return leaf is not None and leaf.untyped_storage()._cdata in self.model_storages

    def pack(self, t: Tensor) -> Tensor:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.model_storages or key in self.excluded or self._is_parameter_copy(t):
            return t
        self.storages[key] = st
        if self.current is not None:
            self.groups.setdefault(self.current, {})[key] = st
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @staticmethod
    def total(storages: dict[int, torch.UntypedStorage]) -> int:
        return sum(st.nbytes() for st in storages.values())


#: The names these had while private; kept so that older imports still work.
_run_context = run_context
_SavedStorages = SavedStorages


def measure_saved_activation_bytes(
    model: nn.Module,
    batch_size: int,
    image_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    device: str | torch.device = "meta",
    policy: str | None = None,
) -> int:
    """Bytes of activations saved for backward by one training-mode forward of ``model`` on a
    batch of ``batch_size`` RGB images of ``image_size`` px.

    ``dtype``: float32 (no autocast) or bfloat16/float16 (the forward runs under
    ``torch.autocast``). ``device="meta"``: no compute, no memory (fake tensors, see the module
    docstring); ``"cpu"`` (or another device) runs a real forward on a copy. ``policy``: apply
    that checkpointing policy to the copy first (native impl); otherwise the model is measured
    as it is, checkpointing included. The caller's model is never changed.
    """
    with run_context(model, batch_size, image_size, dtype, channels_last, device, policy) as (
        work,
        x,
    ):
        saved = SavedStorages(work)
        compressed = applied_compression(work)
        if compressed is not None:  # its hooks hide the saved tensors: it reports what it stores
            compressed["observer"] = saved.pack
        with saved.hooks():
            work(x)
        return saved.total(saved.storages)


def measure_segment_peak_bytes(
    model: nn.Module,
    batch_size: int,
    image_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    device: str | torch.device = "meta",
    policy: str | None = None,
) -> int:
    """Bytes saved inside the largest checkpointed segment: what its recomputation holds at once
    during the backward pass, on top of :func:`measure_saved_activation_bytes`.

    The segments are those of ``policy`` if given, else of the checkpointing applied to
    ``model``; 0 if neither. A segment's own input is not counted (it is stored already). Same
    arguments and counting rules as :func:`measure_saved_activation_bytes`.
    """
    if policy is None:
        applied = applied_checkpointing(model)
        if applied is None:
            return 0
        policy = applied["policy"]
    with run_context(
        model, batch_size, image_size, dtype, channels_last, device, None, strip_checkpointing=True
    ) as (work, x):
        _remove_activation_compression(work)  # a recomputed segment saves uncompressed tensors
        saved = SavedStorages(work)
        handles = []
        modules = dict(work.named_modules())
        for i, names in enumerate(segments(work, policy)):

            def enter(module, args, i=i):
                saved.current = i
                saved.excluded = {args[0].untyped_storage()._cdata}

            def leave(module, args, output):
                saved.current = None
                saved.excluded = set()

            handles.append(modules[names[0]].register_forward_pre_hook(enter))
            handles.append(modules[names[-1]].register_forward_hook(leave))
        try:
            with saved.hooks():
                work(x)
        finally:
            for h in handles:
                h.remove()
        return max((saved.total(g) for g in saved.groups.values()), default=0)


def count_step_flops(
    model: nn.Module,
    batch_size: int,
    image_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "meta",
    policy: str | None = None,
) -> dict[str, int]:
    """FLOPs of one training step: ``{"forward": ..., "backward": ...}``, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmul/conv family; 2 FLOPs per
    multiply-add). Recomputation of checkpointed segments happens in the backward pass and is
    counted there. ``device="meta"`` counts on fake tensors (no compute); ``"cpu"`` runs it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with run_context(model, batch_size, image_size, dtype, False, device, policy) as (work, x):
        counter = FlopCounterMode(display=False)
        with counter:
            y = work(x)
        forward = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            y.backward(torch.ones_like(y))
        return {"forward": forward, "backward": counter.get_total_flops()}
