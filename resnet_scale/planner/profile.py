"""Saved activations and FLOPs of a model, per residual block, for the memory planner.

``activation_bytes(key, image_size, precision, channels_last, policy, micro_batch)`` gives the
bytes one micro-batch saves for backward under a checkpointing policy, and the recompute peak of
its largest segment; ``model_facts(key, image_size)`` the parameter counts and FLOPs per image;
``estimate_activation_bytes(model, ...)`` the same activation estimate for a model given as such (a
torchvision ResNet, say).

Both come from one training-mode forward of the un-checkpointed model on the ``meta`` device per
probe batch size (``measure.py``'s machinery: no compute, no memory), with the saved storages
attributed to the residual block that saved them (:class:`_Profile`) and the FLOPs counted by
forward hooks on the conv/linear layers. Saved bytes are linear in the batch, so the two probe
batches give every other batch size exactly. ``estimate.py`` turns these into the estimate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = ["ModelFacts", "ModelKey", "activation_bytes", "estimate_activation_bytes", "meta_model", "model_facts"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: The two micro-batch sizes measured; everything between and beyond is the line through them.
_PROBE_BATCHES = (2, 4)  # not 1: training-mode BatchNorm refuses 1 value per channel (1x1 maps)



@dataclass
class _Profile:
    """What one training-mode forward of the un-checkpointed model saves, per residual block.

    ``outside``: storages (id -> bytes) saved by the stem and head; ``blocks[i]``: those saved
    while block i runs (its input included when a layer of it saves it); ``inputs[i]``: block i's
    input storage. From these, for any policy's segments (lists of block indices):

    * saved activations with checkpointing = outside + the input of each segment's first block
      (non-reentrant checkpoint saves only the segment input, through the same hooks);
    * recompute peak = the largest union of a segment's blocks' storages, less its input;
    * without checkpointing = the union of all.

    Equal, to the byte, to ``measure_saved_activation_bytes(policy=...)`` and
    ``measure_segment_peak_bytes`` (tests/test_planner.py), in one forward for all policies.
    """

    outside: dict[int, int]
    blocks: list[dict[int, int]]
    inputs: list[tuple[int, int]]
    block_flops: int = 0
    forward_flops: int = 0
    backward_flops: int = 0
    #: the saved tensors as activation compression sees them (``compressed.py``), in forward order:
    #: the stem and head's, each block's, and each block's input.
    records_outside: list = field(default_factory=list)
    records_blocks: list = field(default_factory=list)
    records_inputs: list = field(default_factory=list)

    def saved(self, segs: list[list[int]]) -> tuple[int, list[int]]:
        """(saved bytes, per-segment recompute bytes) for segments ``segs`` ([] = no checkpointing)."""
        if not segs:
            union = dict(self.outside)
            for b in self.blocks:
                union.update(b)
            return sum(union.values()), []
        stored = dict(self.outside)
        stored.update(self.inputs[s[0]] for s in segs)
        peaks = []
        for s in segs:
            union: dict[int, int] = {}
            for i in s:
                union.update(self.blocks[i])
            union.pop(self.inputs[s[0]][0], None)
            peaks.append(sum(union.values()))
        return sum(stored.values()), peaks


def _by_block_recorder(model: nn.Module):
    """measure.py's storage recorder (same deduplication and parameter-copy exclusion), but a
    storage saved both inside a block and outside any (the last block's output, saved by its
    ReLU and by the average pool) is recorded in both places."""
    from resnet_scale.memory.measure import SavedStorages

    from resnet_scale.planner.records import record

    class _ByBlock(SavedStorages):
        def __init__(self, model: nn.Module) -> None:
            super().__init__(model)
            self.outside: dict[int, torch.UntypedStorage] = {}
            self.records: dict[Optional[int], list] = {}  # group -> records (compressed.py)
            self.by_tensor: dict[int, object] = {}  # id(tensor) -> its latest record
            self._packs: dict = {}
            self._storages: dict = {}

        def pack(self, t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            key = st._cdata
            if key in self.model_storages or self._is_parameter_copy(t):
                return t
            self.storages[key] = st
            target = self.outside if self.current is None else self.groups.setdefault(self.current, {})
            target[key] = st
            r = record(t, self._packs, self._storages, sum(map(len, self.records.values())))
            self.records.setdefault(self.current, []).append(r)
            self.by_tensor[id(t)] = r
            return t

    return _ByBlock(model)


def _measure_profiles(model: nn.Module, batches: tuple[int, ...], image_size: int, dtype: torch.dtype,
                      channels_last: bool) -> tuple[_Profile, ...]:
    """One training-mode forward per batch size on fake tensors (no compute, no memory), with
    per-block attribution of the saved storages and the step's FLOPs; one fake copy of the model
    serves all the batch sizes.

    FLOPs are counted from the conv/linear output shapes (2 per multiply-add, bias ignored), as
    ``torch.utils.flop_counter`` counts them; the backward pass costs each layer's FLOPs twice
    (input and weight gradients) except the input gradient of a layer whose input needs none
    (the first conv). Equal to ``count_step_flops`` (tests/test_planner.py), without running a
    backward pass or a counting dispatch mode.
    """
    # The measuring machinery of measure.py (same package): same fake-tensor model copy, same
    # autocast/BatchNorm handling, same parameter-copy exclusion, so the figures agree exactly.
    from resnet_scale.memory.checkpointing import segments
    from resnet_scale.memory.measure import run_context

    context = run_context(model, batches[0], image_size, dtype, channels_last, "meta", None, strip_checkpointing=True)
    with context as (work, x0):
        names = [s[0] for s in segments(work, "block")]
        modules = dict(work.named_modules())
        profiles = []
        for batch in batches:
            x = x0 if batch == x0.shape[0] else x0.new_empty((batch, *x0.shape[1:]))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            profiles.append(_profile_one(work, x, names, modules))
        return tuple(profiles)


def _profile_one(work: nn.Module, x: torch.Tensor, names: list[str], modules: dict) -> _Profile:
    rec = _by_block_recorder(work)
    inputs: dict[int, torch.UntypedStorage] = {}
    input_tensors: dict[int, torch.Tensor] = {}
    flops = {"forward": 0, "backward": 0, "blocks": 0}

    def enter(module, args, i):
        rec.current = i
        inputs[i] = args[0].untyped_storage()
        input_tensors[i] = args[0]

    def leave(module, args, output):
        rec.current = None

    def count(module, args, output):
        w = module.weight
        n = 2 * output.numel() * (w[0].numel() if isinstance(module, nn.Conv2d) else w.shape[1])
        flops["forward"] += n
        flops["backward"] += n * (2 if args[0].requires_grad else 1)
        if rec.current is not None:
            flops["blocks"] += n

    handles = []
    for i, name in enumerate(names):
        handles.append(modules[name].register_forward_pre_hook(lambda m, a, i=i: enter(m, a, i)))
        handles.append(modules[name].register_forward_hook(leave))
    for m in work.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(count))
    try:
        with rec.hooks():
            work(x)
    finally:
        for h in handles:
            h.remove()
    return _Profile(
        outside={k: st.nbytes() for k, st in rec.outside.items()},
        blocks=[{k: st.nbytes() for k, st in rec.groups.get(i, {}).items()} for i in range(len(names))],
        inputs=[(inputs[i]._cdata, inputs[i].nbytes()) for i in range(len(names))],
        block_flops=flops["blocks"],
        forward_flops=flops["forward"],
        backward_flops=flops["backward"],
        records_outside=rec.records.get(None, []),
        records_blocks=[rec.records.get(i, []) for i in range(len(names))],
        records_inputs=[rec.by_tensor[id(input_tensors[i])] for i in range(len(names))],
    )


@dataclass(frozen=True)
class ModelKey:
    """Everything about the model that changes what it saves: hashable, for the cache."""

    block: str
    depth: Optional[int]
    layers: Optional[tuple[int, ...]]
    stem: str
    num_classes: int


def meta_model(key: ModelKey) -> nn.Module:
    from resnet_scale.models import build_resnet

    with torch.device("meta"):
        return build_resnet(key.block, key.depth, stem=key.stem, num_classes=key.num_classes, layers=key.layers)


@functools.lru_cache(maxsize=64)
def _profiles(key: ModelKey, image_size: int, precision: str, channels_last: bool) -> tuple[_Profile, _Profile]:
    """The profiles at the two probe batch sizes (cached: planning asks for the same ones often)."""
    model = _cached_model(key)
    return _measure_profiles(model, _PROBE_BATCHES, image_size, _DTYPES[precision], channels_last)  # type: ignore


@functools.lru_cache(maxsize=16)
def _cached_model(key: ModelKey) -> nn.Module:
    return meta_model(key)


@dataclass(frozen=True)
class ModelFacts:
    """Parameter counts of a model, for model states and the time model."""

    num_params: int
    autocast_params: int  # conv/linear parameters: the ones autocast casts
    largest_layer_params: int
    num_blocks: int
    forward_flops_per_image: float
    backward_flops_per_image: float
    block_forward_flops_per_image: float  # what checkpointing recomputes (every policy recomputes every block once)


@functools.lru_cache(maxsize=16)
def model_facts(key: ModelKey, image_size: int) -> ModelFacts:
    model = _cached_model(key)
    from resnet_scale.memory.checkpointing import segments

    p = _profiles(key, image_size, "fp32", False)[0]
    b = _PROBE_BATCHES[0]
    cast = sum(q.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
               for q in m.parameters(recurse=False))
    largest = max(sum(q.numel() for q in m.parameters(recurse=False)) for m in model.modules())
    return ModelFacts(
        num_params=sum(q.numel() for q in model.parameters()),
        autocast_params=cast,
        largest_layer_params=largest,
        num_blocks=len(segments(model, "block")),
        forward_flops_per_image=p.forward_flops / b,
        backward_flops_per_image=p.backward_flops / b,
        block_forward_flops_per_image=p.block_flops / b,
    )


def _segments(key: ModelKey, policy: str) -> list[list[int]]:
    """``policy``'s segments of the model ``key`` as lists of block indices ([] = none)."""
    from resnet_scale.memory.checkpointing import segments

    model = _cached_model(key)
    index = {s[0]: i for i, s in enumerate(segments(model, "block"))}
    return [[index[n] for n in seg] for seg in segments(model, policy)]


@functools.lru_cache(maxsize=256)
def _policy_bytes(key: ModelKey, image_size: int, precision: str, channels_last: bool,
                  policy: str) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
    """((saved at the two probe batches), per segment (recompute bytes at the two probes))."""
    from resnet_scale.memory.checkpointing import segments

    model = _cached_model(key)
    index = {s[0]: i for i, s in enumerate(segments(model, "block"))}
    segs = [[index[n] for n in seg] for seg in segments(model, policy)]
    p1, p2 = _profiles(key, image_size, precision, channels_last)
    (s1, k1), (s2, k2) = p1.saved(segs), p2.saved(segs)
    return (s1, s2), tuple(zip(k1, k2))


def probe_line(v1: int, v2: int, micro_batch: int) -> int:
    """A quantity at ``micro_batch`` from its values ``v1``, ``v2`` at the two probe batches (linear)."""
    (b1, b2) = _PROBE_BATCHES
    return v1 + (v2 - v1) * (micro_batch - b1) // (b2 - b1)


def _at_batch(saved: tuple[int, int], segs: tuple[tuple[int, int], ...], micro_batch: int) -> tuple[int, int]:
    """(saved, largest recompute peak) at ``micro_batch`` from their values at the two probe batches."""
    return probe_line(*saved, micro_batch), max((probe_line(*s, micro_batch) for s in segs), default=0)


def activation_bytes(key: ModelKey, image_size: int, precision: str, channels_last: bool,
                     policy: str, micro_batch: int) -> tuple[int, int]:
    """(saved activations, recompute peak) for ``micro_batch`` images. Each is linear in the batch
    (every saved tensor has the batch as its first dimension, except BatchNorm's per-channel
    mean/invstd), so two probe batches give it exactly; the peak per segment, then the max."""
    saved, segs = _policy_bytes(key, image_size, precision, channels_last, policy)
    return _at_batch(saved, segs, micro_batch)


def estimate_activation_bytes(model: nn.Module, micro_batch: int, image_size: int, *, precision: str = "fp32",
                              channels_last: bool = False, policy: str = "none") -> tuple[int, int]:
    """The planner's activation estimate for any ResNet, resnet_scale's or torchvision's
    (``torchvision.models.resnet50()``): ``(saved, recompute_peak)`` bytes of one training step on
    ``micro_batch`` RGB images of ``image_size`` px.

    ``saved``: what the forward keeps for the backward pass with checkpointing ``policy`` (none,
    block, stage, sqrt, every:K) applied; ``recompute_peak``: what the largest checkpointed segment
    holds while it is recomputed. ``precision``: fp32, bf16 or fp16 (autocast). Measured on the
    ``meta`` device (no compute, no memory; the model is not changed, checkpointing already applied
    to it is ignored: ``policy`` decides), at two probe batch sizes from which every other one
    follows exactly; equal to ``measure_saved_activation_bytes(model, micro_batch, image_size,
    policy=policy)`` and ``measure_segment_peak_bytes(...)``. Weight casts, the input batch,
    gradients and optimizer states are not activations: ``estimate_memory`` adds them for a config.
    """
    from resnet_scale.memory.checkpointing import segments

    if precision not in _DTYPES:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(_DTYPES)}")
    p1, p2 = _measure_profiles(model, _PROBE_BATCHES, image_size, _DTYPES[precision], channels_last)
    index = {s[0]: i for i, s in enumerate(segments(model, "block"))}
    segs = [[index[n] for n in seg] for seg in segments(model, policy)]
    (s1, k1), (s2, k2) = p1.saved(segs), p2.saved(segs)
    return _at_batch((s1, s2), tuple(zip(k1, k2)), micro_batch)
