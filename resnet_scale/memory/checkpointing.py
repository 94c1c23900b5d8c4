"""Activation checkpointing of ResNet blocks, applied from outside the model (the model code knows
nothing of it).

Checkpointing keeps only the input of each *segment* (a run of consecutive residual blocks)
during the forward pass and recomputes the segment's inside during the backward pass:
activation memory falls from all the blocks' saved tensors to the segment inputs plus one
segment at a time, for roughly one extra forward pass of compute (Chen, Xu, Zhang, Guestrin
2016, "Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174).

Any ResNet whose stages are ``nn.Sequential`` of blocks called in turn by its forward: resnet_scale's
(``stage_names``) and torchvision's or timm's (``layer1`` ... ``layer4``); the policies and the
segments they cut are in ``segments.py``.

Design decisions
----------------
* **Segments never cross a stage boundary.** ``ResNet.forward`` calls each ``layerN`` in turn,
  so a segment spanning ``layer1.2`` and ``layer2.0`` could only be run as one checkpointed
  function by re-writing the model's forward here (duplicating model code) or by wrapping the
  blocks in new containers (changing the state_dict keys). Instead each stage is chunked on its
  own: ``every:K`` and ``sqrt`` cut every stage into runs of K consecutive blocks (the last run
  of a stage may be shorter). For ``sqrt`` K = ceil(sqrt(n)) with n the blocks of the whole
  model, so ResNet-50 ([3, 4, 6, 3], K=4) gets 5 segments [3], [4], [4, 2], [3] rather than
  Chen et al.'s 4 -- the same O(sqrt(n)) memory.
* **Nothing is re-parented.** Only the ``forward`` of each checkpointed stage is replaced, on
  the instance (a bound method in the instance ``__dict__``; the class is untouched). Parameter
  and buffer names, hence state_dict keys, are exactly those of the plain model, and a
  state_dict moves either way with ``strict=True``. The stage keeps its own plan (plain ints and
  modules), so ``copy.deepcopy`` of a checkpointed model gives a self-contained checkpointed copy.
  Hooks registered on blocks still run (twice per step for checkpointed blocks: forward and
  recompute -- as with any recomputation).
* **Only training-mode, grad-enabled forwards are checkpointed**; ``eval()`` or ``no_grad``
  runs the stage's plain forward, so evaluation is unchanged and costs nothing extra.
* **BatchNorm running statistics are updated once per step**, as without checkpointing.
  ``torch.utils.checkpoint`` alone runs every BatchNorm forward twice in training mode and so
  updates running_mean/var and num_batches_tracked twice (pytorch/pytorch#96136).
  ``impl="native"`` passes a ``context_fn`` whose *recompute* context sets each BatchNorm's
  ``momentum`` to 0.0 (so the running-stat update is ``(1 - 0) * running + 0 * batch``, an exact
  no-op; this also covers ``momentum=None``, whose cumulative average would otherwise use
  1/num_batches_tracked) and afterwards restores ``momentum`` and ``num_batches_tracked`` (which
  BatchNorm increments in Python). Restoring happens in ``finally``, so checkpoint's early stop
  of recomputation is safe. ``impl="fairscale"`` uses fairscale's own BatchNorm patch, which
  turns statistics tracking off in the first (no-grad) pass and keeps the recompute's update.
  Caveats of that patch (impl="fairscale" only): the running stats of checkpointed blocks are
  updated in the *backward* pass (equal after each step, but a training-mode forward with no
  backward leaves them unchanged), and a training-mode forward under ``torch.no_grad`` (e.g.
  re-estimating BN statistics) does not update them; use impl="native" for those.
* **Mixed precision.** The recompute runs under the forward's autocast state (per device type:
  enabled, dtype; and the cast cache), so a bf16 forward is recomputed in bf16. torch's native
  checkpoint does this itself; fairscale's only re-enters ``torch.cuda.amp.autocast`` with its
  default dtype (fp16 where the forward was bf16) and ignores CPU autocast (the recompute then
  fails with "expected scalar type BFloat16"), so ``impl="fairscale"`` runs each segment through
  :func:`_under_autocast`, which re-enters the state captured at the forward.
* **torch.compile.** Under compilation the native path calls ``checkpoint`` without the
  context_fn (dynamo only accepts TorchDispatchMode contexts there): AOTAutograd functionalizes
  the buffer updates, so they happen once (checked with backend="aot_eager" and "inductor").
  Dynamo's plain ``backend="eager"`` cannot run a checkpointed BatchNorm at all in torch 2.14
  (a torch limitation: "modified by an inplace operation" on num_batches_tracked).
* **With activation compression** (``compression.py``) a segment is recomputed from its restored,
  quantized input; the native path's forward and recompute contexts then also record and replay
  the segment's ReLU on/off decisions (``relu_decisions.py``), so the recompute makes the
  forward's decisions. ``impl="fairscale"`` has no such contexts: a compressed forward through
  it raises RuntimeError (and ``resolve_memory`` refuses the flags together).
* **Applying twice is an error** (RuntimeError naming the policy already applied); ``none`` is a
  no-op that marks nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .segments import CHECKPOINT_POLICIES, parse_policy, segments
from .segments import block_ranges as _ranges
from .segments import find_stages as _stages

__all__ = [
    "CHECKPOINT_POLICIES",
    "CHECKPOINT_IMPLS",
    "apply_activation_checkpointing",
    "applied_checkpointing",
    "parse_policy",
    "segments",
]

logger = logging.getLogger("resnet_scale")

#: ``impl`` choices.
CHECKPOINT_IMPLS: tuple[str, ...] = ("native", "fairscale")

_APPLIED_ATTR = "_rs_activation_checkpointing"
_PLAN_ATTR = "_rs_checkpoint_plan"


def applied_checkpointing(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`apply_activation_checkpointing` did to ``model`` (policy, impl,
    offload_to_cpu, segments), or None if it was never applied (or applied with ``none``)."""
    return getattr(model, _APPLIED_ATTR, None)


# ----------------------------------------------------------------------------- native impl


class _RecomputeKeepsBatchNormStats:
    """Recompute context: BatchNorm layers use momentum 0.0 (no running-stat update) and get
    their ``momentum`` and ``num_batches_tracked`` back afterwards (pytorch/pytorch#96136)."""

    def __init__(self, batchnorms: list[_BatchNorm]) -> None:
        self.batchnorms = batchnorms
        self.saved: list[tuple[_BatchNorm, float | None, Tensor | None]] = []

    def __enter__(self) -> None:
        for bn in self.batchnorms:
            nbt = bn.num_batches_tracked
            # clone, not int(): no device sync in the backward pass.
            self.saved.append((bn, bn.momentum, None if nbt is None else nbt.clone()))
            bn.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for bn, momentum, nbt in self.saved:
                bn.momentum = momentum
                if nbt is not None:
                    bn.num_batches_tracked.copy_(nbt)
        self.saved = []


def _bn_safe_contexts(batchnorms: list[_BatchNorm]):
    """checkpoint's (forward, recompute) contexts: BatchNorm-safe; inside a compressed forward,
    also recording and replaying the segment's ReLU decisions (``relu_decisions.py``)."""
    from .compression import ACTIVE
    from .relu_decisions import Both, ReluDecisions

    recompute = _RecomputeKeepsBatchNormStats(batchnorms)
    compression = ACTIVE.get()
    if compression is None:
        return contextlib.nullcontext(), recompute
    record, replay = ReluDecisions(compression).contexts()
    return record, Both(recompute, replay)


def _run_blocks(stage: nn.Sequential, start: int, stop: int, x: Tensor) -> Tensor:
    for i in range(start, stop):
        x = stage[i](x)
    return x


def _native_segment(stage: nn.Sequential, start: int, stop: int, x: Tensor) -> Tensor:
    from torch.utils.checkpoint import checkpoint

    if torch.compiler.is_compiling():
        # AOTAutograd functionalizes BN's buffer updates: they happen once (module docstring).
        return checkpoint(_run_blocks, stage, start, stop, x, use_reentrant=False)
    bns = [m for i in range(start, stop) for m in stage[i].modules() if isinstance(m, _BatchNorm)]
    return checkpoint(
        _run_blocks,
        stage,
        start,
        stop,
        x,
        use_reentrant=False,
        context_fn=functools.partial(_bn_safe_contexts, bns),
    )


# ----------------------------------------------------------------------------- stage forward


@dataclass
class _StagePlan:
    impl: str
    ranges: list[tuple[int, int]]
    offload_to_cpu: bool = False
    #: fairscale only: its checkpointed-forward function and the module run per segment (the
    #: stage itself, or an *unregistered* nn.Sequential view of the segment's blocks).
    fairscale_fn: Any = None
    fairscale_modules: list[nn.Module] = field(default_factory=list)


def _checkpointed_stage_forward(self: nn.Sequential, x: Tensor) -> Tensor:
    """Installed as ``stage.forward`` (bound to the stage)."""
    plan: _StagePlan = self.__dict__[_PLAN_ATTR]
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, x)
    for i, (start, stop) in enumerate(plan.ranges):
        if plan.impl == "native":
            x = _native_segment(self, start, stop, x)
        else:
            _refuse_compression()
            module = plan.fairscale_modules[i]
            # A fresh weak reference each call (fairscale's own wrapper keeps one made at wrap
            # time, which a deepcopy would leave pointing at the original model).
            forward = functools.partial(_under_autocast, _autocast_state(x), type(module).forward)
            x = plan.fairscale_fn(forward, weakref.ref(module), plan.offload_to_cpu, x)
    return x


def _refuse_compression() -> None:
    from .compression import ACTIVE

    if ACTIVE.get() is not None:
        raise RuntimeError(
            "activation compression with impl='fairscale' checkpointing would recompute each segment's "
            "ReLUs from its quantized input (a biased gradient); use impl='native' "
            "(--checkpoint-impl native) with activation compression"
        )


def _autocast_state(x: Tensor) -> tuple:
    """The autocast state now, for CPU, CUDA and ``x``'s device type: ((device type, enabled,
    dtype), ...), and whether the cast cache is on."""
    device_types = dict.fromkeys(("cpu", "cuda", x.device.type))
    modes = tuple(
        (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in device_types
    )
    return modes, torch.is_autocast_cache_enabled()


def _under_autocast(state: tuple, forward: Any, module: nn.Module, *args: Any) -> Any:
    """Run ``forward(module, *args)`` under the autocast ``state`` of :func:`_autocast_state`:
    the same in fairscale's first pass, and restored (not fairscale's fp16) in its recompute."""
    modes, cache_enabled = state
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in modes:
            autocast = torch.autocast(
                device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled
            )
            stack.enter_context(autocast)
        return forward(module, *args)


def _fairscale_checkpoint_wrapper():
    try:
        from fairscale.nn.checkpoint import checkpoint_wrapper
    except ImportError as e:  # tested with fairscale hidden (test_checkpointing.py)
        raise ImportError(
            "activation checkpointing with impl='fairscale' (or --offload-activations) needs "
            "fairscale: pip install 'resnet-scale[fairscale]', or use impl='native'"
        ) from e
    return checkpoint_wrapper


def apply_activation_checkpointing(
    model: nn.Module,
    policy: str,
    *,
    impl: str = "native",
    offload_to_cpu: bool = False,
) -> nn.Module:
    """Checkpoint ``model``'s residual blocks in segments chosen by ``policy``, in place.

    Args:
        model: a resnet_scale ``ResNet`` or a torchvision (or timm) ``ResNet``: stages named by
            ``stage_names``, else ``layer1``, ``layer2``, ..., each an ``nn.Sequential`` of blocks;
            apply before ``torch.compile`` / ``prepare``.
        policy: ``none``, ``block``, ``stage``, ``sqrt`` or ``every:K``
            (:data:`CHECKPOINT_POLICIES`).
        impl: ``"native"`` (``torch.utils.checkpoint``, non-reentrant, BatchNorm-safe) or
            ``"fairscale"`` (``fairscale.nn.checkpoint.checkpoint_wrapper`` per segment).
        offload_to_cpu: fairscale only: keep each segment's saved input on the CPU.

    Returns the same model. Logs one line. Raises ValueError for an unknown policy or impl, or
    offload with impl="native"; RuntimeError if checkpointing was already applied; ImportError
    for impl="fairscale" without fairscale. See the module docstring for the design (segments
    stay within a stage; state_dict keys unchanged; eval/no_grad run plainly; BatchNorm
    statistics updated once).
    """
    done = _apply(model, policy, impl, offload_to_cpu)
    if done is None:
        logger.info("activation checkpointing: policy=none, off")
    else:
        logger.info(
            "activation checkpointing: policy=%s, %d segments over %d blocks, impl=%s%s",
            policy,
            done["segments"],
            done["blocks"],
            impl,
            ", activations offloaded to CPU" if offload_to_cpu else "",
        )
    return model


def _apply(model: nn.Module, policy: str, impl: str, offload_to_cpu: bool) -> dict | None:
    """The work of :func:`apply_activation_checkpointing`, silent (the measure_* functions use
    it on private copies). Returns what was done, None for policy ``none``."""
    if impl not in CHECKPOINT_IMPLS:
        raise ValueError(
            f"unknown activation checkpointing impl {impl!r}: choose one of "
            f"{', '.join(CHECKPOINT_IMPLS)}"
        )
    if offload_to_cpu and impl != "fairscale":
        raise ValueError(
            "offload_to_cpu=True (--offload-activations) needs impl='fairscale' "
            "(fairscale's checkpoint_wrapper moves each segment's saved input to the CPU); "
            "torch's native checkpoint has no offload"
        )
    stages = _stages(model)
    n_blocks = sum(len(s) for _, s in stages)
    per_segment = parse_policy(policy, n_blocks)
    previous = applied_checkpointing(model)
    if previous is not None:
        raise RuntimeError(
            f"activation checkpointing is already applied to this model "
            f"(policy={previous['policy']}, impl={previous['impl']}); apply it once, to a "
            f"fresh model"
        )
    if per_segment is None:
        return None

    checkpoint_wrapper = _fairscale_checkpoint_wrapper() if impl == "fairscale" else None
    n_segments = 0
    for _, stage in stages:
        plan = _StagePlan(impl, _ranges(len(stage), per_segment), offload_to_cpu)
        n_segments += len(plan.ranges)
        if impl == "fairscale":
            for start, stop in plan.ranges:
                whole = (start, stop) == (0, len(stage))
                module = stage if whole else stage[start:stop]  # a slice is not registered
                checkpoint_wrapper(module, offload_to_cpu=offload_to_cpu)  # patches BatchNorm
                # Keep fairscale's function, not its forward bound by a weak reference
                # (see _checkpointed_stage_forward).
                plan.fairscale_fn = module.__dict__.pop("forward").func
                plan.fairscale_modules.append(module)
        stage.__dict__[_PLAN_ATTR] = plan
        stage.forward = types.MethodType(_checkpointed_stage_forward, stage)

    done = {
        "policy": policy,
        "impl": impl,
        "offload_to_cpu": offload_to_cpu,
        "segments": n_segments,
        "blocks": n_blocks,
    }
    model.__dict__[_APPLIED_ATTR] = done
    return done


def _remove_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_activation_checkpointing` on ``model`` (used on private copies by the
    measuring code). fairscale's BatchNorm hooks stay; they do nothing while grad is enabled."""
    for _, stage in _stages(model):
        if _PLAN_ATTR in stage.__dict__:
            del stage.__dict__[_PLAN_ATTR]
            del stage.__dict__["forward"]
    model.__dict__.pop(_APPLIED_ATTR, None)
    return model
