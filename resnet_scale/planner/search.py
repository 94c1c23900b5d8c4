"""Find the fastest memory settings that fit a budget (``plan_memory``) and apply them (``apply_plan``).

The search is exhaustive over a small space, so a bigger budget can never give a slower plan
with the same activation compression, nor a stronger compression:

* precision -- the user's if given; else bf16 and fp32 (bf16 assumed supported when planning for
  a GPU from a machine without one; fp16 instead of bf16 on a real GPU without bf16, DDP only);
* channels_last -- the user's if given; else on with bf16/fp16 on a GPU (and under --low-memory);
* micro-batch -- every divisor of the per-device batch (the global batch is always kept);
* checkpointing -- none, block, sqrt, stage (and the user's policy);
* ZeRO stage 0-3 and offload -- only with world_size > 1 and no engine settings given; else the
  engine as configured;
* activation compression -- the user's ``--activation-compression`` if given (``none`` too);
  else none, int8, int4, int2; only none with ``--offload-activations``, ``--compile`` or
  ``--checkpoint-impl fairscale``, which refuse compression; int4 and int2 only without
  checkpointing (recomputing from their restored inputs biases the gradients), or with the policy
  the user gave beside that compression.

Each point gets a predicted peak (``estimate_candidate``) and a predicted step time (the time
model, ``timing.py``: :func:`predicted_step_seconds`); the plan is the point that fits with the
mildest activation compression (none whenever anything uncompressed fits: compression costs
gradient accuracy as well as time), then the fastest, ties going to fewer changed flags, then
to the larger micro-batch, then to the smaller peak. Memory figures come from two cached
meta-device forwards per precision and layout (compressed sizes are derived from the same
forwards: ``compressed.py``), so a plan for ResNet-152 takes a few seconds.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from resnet_scale.config import Config, ConfigError
from resnet_scale.planner.estimate import (
    BN_NOISY_MICRO_BATCH,
    WORKSPACE_STATUS,
    Candidate,
    MemoryEstimate,
    PlanContext,
    estimate_candidate,
    given_candidate,
)
from resnet_scale.planner.timing import predicted_step_seconds
from resnet_scale.planner.units import format_bytes, parse_bytes

__all__ = ["Plan", "apply_plan", "plan_for_training", "plan_memory", "predicted_step_seconds"]

_POLICIES = ("none", "block", "sqrt", "stage")
#: Activation compression, mildest first: the search prefers the first that fits.
_COMPRESSIONS = ("none", "int8", "int4", "int2")
_ENGINES = (
    ("ddp", 0, "none"),
    ("deepspeed", 1, "none"),
    ("deepspeed", 2, "none"),
    ("deepspeed", 3, "none"),
    ("deepspeed", 1, "optimizer"),
    ("deepspeed", 2, "optimizer"),
    ("deepspeed", 3, "optimizer"),
    ("deepspeed", 3, "optimizer+params"),
)


@dataclass
class Plan:
    """The planner's answer. ``flags`` are the exact flags to add to the command as given;
    ``settings`` the complete memory settings of the plan; ``predicted_relative_time`` its step
    time over that of the settings as given (< 1: faster); ``smallest_budget_bytes`` the least
    memory any plan needs, when nothing fits the budget."""

    fits: bool
    estimate: MemoryEstimate
    settings: dict
    flags: list[str]
    predicted_relative_time: float
    smallest_budget_bytes: Optional[int]
    notes: list[str] = field(default_factory=list)
    budget_bytes: int = 0
    given: Optional[MemoryEstimate] = None

    @property
    def predicted_peak_bytes(self) -> int:
        return self.estimate.total

    def describe(self) -> str:
        """One line: the plan's settings."""
        return _describe(self.settings)

    @property
    def given_description(self) -> str:
        """One line: the settings as given."""
        return _describe(self.given.settings) if self.given is not None else "-"

    def as_dict(self) -> dict:
        return {
            "fits": self.fits,
            "budget_bytes": self.budget_bytes,
            "predicted_peak_bytes": self.estimate.total,
            "breakdown": self.estimate.breakdown(),
            "settings": dict(self.settings),
            "flags": list(self.flags),
            "predicted_relative_time": self.predicted_relative_time,
            "smallest_budget_bytes": self.smallest_budget_bytes,
            "notes": list(self.notes),
        }


def _describe(settings: dict) -> str:
    return Candidate(**{k: v for k, v in settings.items() if k != "accumulation_steps"}).describe()


def _bf16_ok(device_type: str) -> bool:
    if device_type != "cuda" or not torch.cuda.is_available():
        return True  # planning for a GPU from a machine without one: assume a bf16-capable GPU
    return torch.cuda.is_bf16_supported()


def _candidates(ctx: PlanContext, given: Candidate) -> list[Candidate]:
    cfg, m = ctx.cfg, ctx.cfg.memory
    fixed_engine = ctx.world_size == 1 or (
        cfg.distributed.distributed != "auto" or cfg.distributed.zero_stage is not None
        or cfg.distributed.offload is not None or cfg.distributed.ds_config is not None
    )
    engines = [(given.engine, given.zero_stage, given.offload)] if fixed_engine else list(_ENGINES)
    if m.precision:
        precisions = [m.precision]
    elif ctx.device_type == "cuda":
        precisions = ["bf16" if _bf16_ok("cuda") else "fp16", "fp32"]
    else:
        precisions = ["fp32", "bf16"]
    policies = list(_POLICIES) + ([given.checkpointing] if given.checkpointing not in _POLICIES else [])
    per_device = given.per_device_batch
    micros = [d for d in range(per_device, 0, -1) if per_device % d == 0]
    chosen_pair = m.checkpointing if m.activation_compression is not None else None  # the user's own pairing
    out = []
    for compression in _compressions(m):
        out += [dataclasses.replace(c, activation_compression=compression)
                for c in _settings(ctx, given, precisions, policies, micros, engines)
                if c.checkpointing in ("none", chosen_pair) or compression in _UNBIASED_WHEN_CHECKPOINTED]
    return out


#: Compressions whose gradients stay unbiased when the compressed segment inputs are recomputed
#: (docs/benchmarks/compression_gradients.md: with block checkpointing int8's error is the
#: uncheckpointed one, while int4 and int2 gain a bias of 3-17 % and 50-92 %). The planner pairs
#: int4/int2 with checkpointing only with the policy the user gave beside the compression.
_UNBIASED_WHEN_CHECKPOINTED = ("none", "int8")


def _compressions(m) -> list[str]:
    """The user's --activation-compression if given; none only with --offload-activations, --compile
    or --checkpoint-impl fairscale (resolve_memory refuses compression with each); else all of them."""
    if m.activation_compression is not None:
        return [m.activation_compression]
    if m.offload_activations or m.compile or m.checkpoint_impl == "fairscale":
        return ["none"]
    return list(_COMPRESSIONS)


def _settings(ctx: PlanContext, given: Candidate, precisions, policies, micros, engines) -> list[Candidate]:
    m, per_device, out = ctx.cfg.memory, given.per_device_batch, []
    for precision in precisions:
        if m.channels_last is not None:
            cl = m.channels_last
        else:
            cl = m.low_memory or (precision != "fp32" and ctx.device_type == "cuda")
        for engine, stage, offload in engines:
            if engine == "deepspeed" and precision == "fp16":
                continue  # refused by Config.validate: DeepSpeed would cast BatchNorm to fp16
            for policy in policies:
                for micro in micros:
                    out.append(Candidate(precision, cl, policy, micro, per_device, engine, stage, offload,
                                         given.offload_activations))
    return out


def _changes(c: Candidate, given: Candidate) -> int:
    return sum(getattr(c, k) != getattr(given, k) for k in (
        "precision", "channels_last", "checkpointing", "micro_batch_size", "engine", "zero_stage", "offload",
        "activation_compression"))


def _flags(c: Candidate, given: Candidate, accumulate: bool = False) -> list[str]:
    """The flags that turn ``given`` into ``c`` (names from the config fields); ``accumulate``: the
    command gives the micro-batch as --grad-accum-steps, so the plan does too."""
    from resnet_scale.config import DistributedConfig, MemoryConfig, flag_name

    def flag(cls, name: str) -> str:
        return flag_name(next(f for f in dataclasses.fields(cls) if f.name == name))

    out: list[str] = []
    if c.precision != given.precision:
        out += [flag(MemoryConfig, "precision"), c.precision]
    if c.channels_last != given.channels_last:
        name = flag(MemoryConfig, "channels_last")
        out.append(name if c.channels_last else "--no-" + name[2:])
    if c.checkpointing != given.checkpointing:
        out += [flag(MemoryConfig, "checkpointing"), c.checkpointing]
    if c.micro_batch_size != given.micro_batch_size:
        out += ([flag(MemoryConfig, "grad_accum_steps"), str(c.accumulation_steps)] if accumulate
                else [flag(MemoryConfig, "micro_batch_size"), str(c.micro_batch_size)])
    if c.engine != given.engine or c.zero_stage != given.zero_stage:
        out += [flag(DistributedConfig, "zero_stage"), str(c.zero_stage)]
    if c.offload != given.offload:
        out += [flag(DistributedConfig, "offload"), c.offload]
    if c.activation_compression != given.activation_compression:
        out += [flag(MemoryConfig, "activation_compression"), c.activation_compression]
    return out


def _zero_note(ctx: PlanContext, c: Candidate, est: MemoryEstimate) -> Optional[str]:
    """What ZeRO saves and does not, when it is in use and model states are a small share."""
    if c.engine != "deepspeed" or c.zero_stage == 0:
        return None
    share = est.model_states / max(est.total, 1)
    if share >= 0.25:
        return None
    ddp = estimate_candidate(ctx, dataclasses.replace(c, engine="ddp", zero_stage=0, offload="none"))
    saved = ddp.model_states - est.model_states
    what = (f"saves {format_bytes(saved)} per device" if saved > 0 else
            f"costs {format_bytes(-saved)} more per device (DeepSpeed's fp32 master partition and reduce buckets"
            f"{'; with 1 process there is nothing to shard over' if ctx.world_size == 1 else ''})")
    return (
        f"ZeRO-{c.zero_stage} shards model states only: they are {format_bytes(est.model_states)} "
        f"({100 * share:.0f}% of the predicted peak), and ZeRO-{c.zero_stage} over {ctx.world_size} device(s) "
        f"{what} against DDP. It does not shrink activations ({format_bytes(est.activations + est.recompute_peak)}, "
        f"{100 * (est.activations + est.recompute_peak) / max(est.total, 1):.0f}%): checkpointing, bf16 and "
        "smaller micro-batches do."
    )


def _notes(ctx: PlanContext, c: Candidate, est: MemoryEstimate, given: Candidate,
           given_est: MemoryEstimate) -> list[str]:
    notes = []
    zero = _zero_note(ctx, c, est) or _zero_note(ctx, given, given_est)
    if zero:
        notes.append(zero)
    if c.micro_batch_size < BN_NOISY_MICRO_BATCH:
        tip = (f"; add --sync-bn to normalise over all {ctx.world_size} devices' "
               f"{c.micro_batch_size * ctx.world_size} images" if ctx.world_size > 1 and not ctx.cfg.distributed.sync_bn
               else "; a bigger --max-memory or a smaller --image-size keeps micro-batches larger")
        notes.append(f"micro-batch of {c.micro_batch_size} images per device (< {BN_NOISY_MICRO_BATCH}): BatchNorm "
                     f"batch statistics get noisy (Wu & He 2018){tip}")
    if c.activation_compression != "none" and c.activation_compression != given.activation_compression:
        notes.append(f"--activation-compression {c.activation_compression}: chosen because no uncompressed plan fits; "
                     "gradients become unbiased but noisier estimates (int2 most) and every step quantizes and "
                     "restores the saved activations")
    if c.offload != "none":
        notes.append(f"--offload {c.offload} runs the optimizer on the CPU and moves state over PCIe every step: "
                     "much slower; chosen only because nothing faster fits")
    if ctx.dataset > 0.25 * est.total:
        tip = " (--in-memory no streams it instead)" if ctx.cfg.data.source == "imagefolder" else ""
        notes.append(f"the device-resident dataset takes {format_bytes(ctx.dataset)} of every device{tip}")
    notes.append(f"dataset: {ctx.dataset_note}")
    notes.append(f"workspace: {WORKSPACE_STATUS}")
    if ctx.cfg.memory.compile:
        notes.append("--compile: the activations are those of eager mode; torch.compile may save fewer")
    return notes


def plan_memory(cfg: Config, budget_bytes: int, *, world_size: int = 1, device_type: str = "cuda") -> Plan:
    """The fastest memory settings for ``cfg`` whose predicted peak fits ``budget_bytes`` per
    device (module docstring). Nothing fits: ``fits=False``, the smallest plan and
    ``smallest_budget_bytes``. Raises ConfigError for settings that cannot work at all."""
    if budget_bytes is None or budget_bytes <= 0:
        raise ConfigError(f"memory budget {budget_bytes!r} must be a positive number of bytes.")
    ctx = PlanContext.build(cfg, world_size, device_type)
    given = given_candidate(cfg, world_size, device_type)
    given_est = estimate_candidate(ctx, given)
    base_time = predicted_step_seconds(ctx, given)
    scored = []
    for c in _candidates(ctx, given):
        est = estimate_candidate(ctx, c)
        rel = predicted_step_seconds(ctx, c) / base_time
        level = _COMPRESSIONS.index(c.activation_compression)
        scored.append((level, round(rel, 9), _changes(c, given), -c.micro_batch_size, est.total, c, est))
    fitting = [s for s in scored if s[4] <= budget_bytes]
    if fitting:
        _, rel, _, _, _, best, est = min(fitting, key=lambda s: s[:5])
        smallest = None
    else:
        _, _, _, _, _, best, est = min(scored, key=lambda s: (s[4], s[1], s[2], s[3]))
        rel, smallest = round(predicted_step_seconds(ctx, best) / base_time, 9), est.total
    return Plan(
        fits=bool(fitting),
        estimate=est,
        settings=best.as_dict(),
        flags=_flags(best, given, accumulate=cfg.memory.grad_accum_steps is not None),
        predicted_relative_time=rel,
        smallest_budget_bytes=smallest,
        notes=_notes(ctx, best, est, given, given_est),
        budget_bytes=int(budget_bytes),
        given=given_est,
    )


def plan(cfg: Config, max_memory: int | str | None = None, *, world_size: int = 1,
         device_type: str = "cuda") -> Plan:
    """The fastest memory settings for training ``cfg`` that fit ``max_memory`` per device.

    ``max_memory``: bytes, or a size such as ``"8GiB"`` / ``"8GB"`` / ``"auto"`` (the GPU's free
    memory); default ``cfg.memory.max_memory``. ``world_size``: the devices the global batch is split
    over; ``device_type``: "cuda" (plan for a GPU, also from a machine without one) or "cpu". Returns a
    :class:`Plan`: ``fits``, the ``estimate`` (bytes by what holds them), the ``flags`` to add to the
    command and ``predicted_relative_time``; ``apply_plan(cfg, plan)`` gives the config to train with.
    Raises ConfigError for settings that cannot work at all, or for no budget::

        p = plan(cfg, "8GiB")
        summary = train(apply_plan(cfg, p)) if p.fits else None  # else: p.smallest_budget_bytes
    """
    if max_memory is None:
        max_memory = cfg.memory.max_memory
    budget = parse_bytes(max_memory) if max_memory is None or isinstance(max_memory, str) else int(max_memory)
    if budget is None:
        raise ConfigError("plan() needs a memory budget: pass max_memory (e.g. '8GiB') or set cfg.memory.max_memory.")
    return plan_memory(cfg, budget, world_size=world_size, device_type=device_type)


def apply_plan(cfg: Config, plan: Plan) -> Config:
    """A copy of ``cfg`` with the plan's memory settings set explicitly (they win over
    --low-memory); the ZeRO stage and offload only where the plan changes the engine."""
    out = copy.deepcopy(cfg)
    s = plan.settings
    out.memory.precision = s["precision"]
    out.memory.channels_last = s["channels_last"]
    out.memory.checkpointing = s["checkpointing"]
    out.memory.micro_batch_size = s["micro_batch_size"]
    out.memory.grad_accum_steps = None  # the plan's micro-batch replaces its alternative
    out.memory.activation_compression = s["activation_compression"]
    if s["engine"] == "deepspeed" and out.engine() != "deepspeed" or "--zero-stage" in plan.flags:
        out.distributed.zero_stage = s["zero_stage"]
    if "--offload" in plan.flags:
        out.distributed.offload = s["offload"]
    return out


def plan_for_training(cfg: Config, *, world_size: int, device_type: str,
                      budget_bytes: Optional[int] = None) -> tuple[Config, Optional[Plan]]:
    """``train --max-memory SIZE``: plan for ``cfg.memory.max_memory`` (or ``budget_bytes``, e.g.
    the minimum over ranks of ``auto``), log the plan, and return ``(apply_plan(cfg, plan), plan)``;
    ``(cfg, None)`` when no budget is set. Raises ConfigError, with the smallest memory that would
    work, when nothing fits. Deterministic: every rank given the same inputs gets the same plan."""
    import logging

    text = getattr(cfg.memory, "max_memory", None)
    budget = budget_bytes if budget_bytes is not None else parse_bytes(text)
    if budget is None:
        return cfg, None
    plan = plan_memory(cfg, budget, world_size=world_size, device_type=device_type)
    if not plan.fits:
        raise ConfigError(
            f"--max-memory {text or format_bytes(budget)}: nothing fits in {format_bytes(budget)} per device; "
            f"the smallest plan ({plan.describe()}) needs {format_bytes(plan.smallest_budget_bytes)}. "
            "Raise --max-memory, lower --batch-size or --image-size, or use more processes."
        )
    log = logging.getLogger("resnet_scale")
    log.info("memory plan for --max-memory %s: %s; predicted peak %s per device, step time %.2fx the flags as given",
             text or format_bytes(budget), plan.describe(), format_bytes(plan.predicted_peak_bytes),
             plan.predicted_relative_time)
    log.info("memory plan flags: %s", " ".join(plan.flags) if plan.flags else "(none: the settings as given fit)")
    for note in plan.notes:
        log.info("memory plan note: %s", note)
    return apply_plan(cfg, plan), plan
