"""Predict the peak GPU memory of a training run before launching it (``estimate_memory``).

``estimate_memory(cfg, world_size=, device_type=)`` returns a :class:`MemoryEstimate`: bytes per
device, by what holds them. ``plan_memory`` (``search.py``) searches the memory settings
for the fastest plan that fits a budget; ``parse_bytes`` (``units.py``) reads ``--max-memory``.

What each line counts (per device, at the peak of a step: early in the backward pass, when every
saved activation is still alive and gradients are being written):

* ``parameters`` -- the fp32 weights (autocast keeps weights fp32), sharded by ZeRO-3, none on the
  device with parameter offload; under ZeRO-3 plus the largest layer gathered whole.
* ``gradients`` -- fp32 gradients (counted whole: with accumulation they live across
  micro-batches), sharded from ZeRO-2; plus DDP's gradient buckets (Accelerate's DDP copies
  gradients into buckets, ``gradient_as_bucket_view=False``: one more gradient-sized buffer
  when world_size > 1), or DeepSpeed's reduce buckets (``reduce_bucket_size`` elements, fp32, two
  of them with ``overlap_comm``; DeepSpeed 0.19.8 allocates them at that size whatever the model
  size, and "auto" sizes them to the model) and its fp32 gradient partition.
* ``optimizer_states`` -- SGD's momentum buffer (4 B/param, none with ``--momentum 0``); under
  DeepSpeed ZeRO >= 1 also the fp32 master partition DeepSpeed always clones (even from fp32
  weights, ``stage_1_and_2.py``). Sharded from ZeRO-1; on the CPU with optimizer offload.
* ``autocast_weight_copies`` -- bf16/fp16 casts of the conv/linear weights, saved for backward:
  2 B per such parameter (``measure_saved_activation_bytes`` leaves them out on purpose).
* ``activations`` -- bytes saved for backward by one micro-batch, measured on the ``meta`` device
  with the actual model (block, depth, stem, classes), image size, precision, channels_last and
  checkpointing policy; ``recompute_peak`` -- what the largest checkpointed segment saves while it
  is recomputed (``measure_segment_peak_bytes``). See ``profile.py`` (:class:`_Profile`) for how
  both are derived from one measured forward per batch size, and why that is exact. With
  ``--activation-compression`` it is what the compressed model stores (``compressed.py``).
* ``restore_peak`` -- with activation compression: what the backward pass holds while it restores
  compressed activations (the two largest at full size, plus one restore chunk's temporaries).
* ``input_batch`` -- the per-device batch the loader yields (float32 images + int64 labels);
  micro-batches are views of it, so it is alive for the whole step. (In fp32 the first conv also
  saves its micro-batch input, so ``activations`` counts that micro-batch a second time: a
  deliberate overestimate of 3 x H x W x 4 B per image, 0.7 % of ResNet-50's activations.)
* ``dataset`` -- the splits the device-resident loader holds on the device (uint8 images, int64
  labels, train + test, whole on every device); 0 for a streamed image folder.
* ``workspace`` -- cuDNN workspace, allocator rounding and fragmentation: an allowance, see
  :data:`WORKSPACE_MIN_BYTES`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from resnet_scale.config import Config, ConfigError
from resnet_scale.planner.dataset import _num_classes, dataset_device_bytes  # noqa: F401 (re-exported)
from resnet_scale.planner.profile import ModelFacts, ModelKey, activation_bytes, model_facts
from resnet_scale.planner.units import MiB, format_bytes

#: Workspace allowance = max(WORKSPACE_MIN_BYTES, WORKSPACE_FRACTION x everything else): cuDNN
#: convolution workspaces, the caching allocator's 512 B / 2 MiB rounding and fragmentation.
#: To be calibrated on a GPU against torch.cuda.max_memory_allocated; NOT YET CALIBRATED.
WORKSPACE_MIN_BYTES = 256 * MiB
WORKSPACE_FRACTION = 0.10
WORKSPACE_STATUS = "uncalibrated allowance (max(256 MiB, 10% of the rest)); GPU calibration owed"

#: Images per device below which BatchNorm's batch statistics get noisy (Wu & He 2018, Fig. 1).
BN_NOISY_MICRO_BATCH = 16

# ----------------------------------------------------------------------------- model states


@dataclass(frozen=True)
class StateRecipe:
    """Bytes per parameter of each model state, and how ZeRO shards them.

    ``weights`` -- the copy forward/backward use (sharded by stage 3);
    ``grads`` -- gradients in the weights' precision (sharded from stage 2);
    ``fp32_grads`` -- the fp32 gradient partition DeepSpeed's stage 1/2 optimizer steps on;
    ``master`` -- fp32 master weights (DeepSpeed ZeRO >= 1 only; sharded from stage 1);
    ``optimizer`` -- optimizer states (sharded from stage 1).
    """

    weights: int
    grads: int
    fp32_grads: int
    master: int
    optimizer: int


#: DeepSpeed's own assumptions in ``estimate_zero2/3_model_states_mem_needs``: fp16 mixed
#: precision with Adam ("2 = params_16bit, 18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit
#: + 8_optimizer_states_32bit"). Used by the tests to check our sharding against DeepSpeed's.
DEEPSPEED_ADAM_FP16 = StateRecipe(weights=2, grads=2, fp32_grads=4, master=4, optimizer=8)


def our_recipe(cfg: Config, engine: str, stage: int) -> StateRecipe:
    """What resnet_scale trains with: fp32 weights and gradients (autocast keeps weights fp32),
    SGD's momentum buffer (4 B, none without momentum). DeepSpeed ZeRO >= 1 adds its fp32 master
    partition and fp32 gradient partition (it clones them even from fp32 weights)."""
    momentum = 4 if cfg.optim.momentum > 0 else 0
    zero = engine == "deepspeed" and stage >= 1
    return StateRecipe(weights=4, grads=4, fp32_grads=4 if zero else 0, master=4 if zero else 0, optimizer=momentum)


def model_state_bytes(
    num_params: int,
    *,
    recipe: StateRecipe,
    engine: str = "ddp",
    stage: int = 0,
    world_size: int = 1,
    offload: str = "none",
    largest_layer_params: int = 0,
    bucket_bytes: int = 0,
) -> dict[str, int]:
    """Device bytes of parameters, gradients and optimizer states (``{"parameters": ..,
    "gradients": .., "optimizer_states": ..}``) under ``engine`` ("ddp" or "deepspeed"), ZeRO
    ``stage``, ``world_size`` and ``offload`` ("none", "optimizer", "optimizer+params").

    Sharding follows DeepSpeed: stage >= 1 shards master weights, fp32 gradients and optimizer
    states by ``world_size``; >= 2 also gradients; 3 also weights, plus the largest layer gathered
    whole (weights + gradients, as DeepSpeed's ``4 x largest_layer_params`` for fp16). Offload
    keeps master weights, optimizer states and gradients on the CPU (DeepSpeed's estimate with
    ``cpu_offload``: only the 16-bit weights stay), ``optimizer+params`` the weights too.
    ``bucket_bytes``: communication buffers (DDP's gradient buckets, DeepSpeed's reduce buckets).
    """
    n, r = num_params, recipe
    zero = engine == "deepspeed" and stage >= 1

    def shard(per_param: int, sharded: bool) -> int:
        return math.ceil(n * per_param / world_size) if sharded else n * per_param

    offload_opt = zero and offload in ("optimizer", "optimizer+params")
    offload_params = zero and stage == 3 and offload == "optimizer+params"
    params = 0 if offload_params else shard(r.weights, zero and stage == 3)
    if zero and stage == 3:
        params += largest_layer_params * (r.weights + r.grads)  # gathered for its forward/backward
    grads = 0 if offload_opt else shard(r.grads, zero and stage >= 2) + shard(r.fp32_grads, zero)
    optimizer = 0 if offload_opt else shard(r.master, zero) + shard(r.optimizer, zero)
    return {"parameters": params, "gradients": grads + bucket_bytes, "optimizer_states": optimizer}


def _comm_bucket_bytes(engine: str, stage: int, world_size: int, num_params: int, ds_zero: dict) -> int:
    """DDP: one more gradient-sized buffer (buckets) when world_size > 1. DeepSpeed ZeRO >= 1
    with contiguous_gradients (its default): ``reduce_bucket_size`` fp32 elements, twice with
    overlap_comm (default on for stage 3 only), allocated at that size (DeepSpeed 0.19.8
    ``setup_buckets``); "auto" is the model's size, capped (``distributed/deepspeed.py``)."""
    if engine != "deepspeed" or stage == 0:
        return num_params * 4 if world_size > 1 else 0
    if not ds_zero.get("contiguous_gradients", True):
        return 0
    from resnet_scale.distributed.deepspeed import bucket_elements

    size = bucket_elements(ds_zero.get("reduce_bucket_size"), num_params)
    overlap = ds_zero.get("overlap_comm", stage == 3)
    return int(size) * 4 * (2 if overlap is True else 1)


# ----------------------------------------------------------------------------- the estimate


@dataclass
class MemoryEstimate:
    """Predicted bytes per device, by what holds them (module docstring)."""

    parameters: int
    gradients: int
    optimizer_states: int
    autocast_weight_copies: int
    activations: int
    recompute_peak: int
    restore_peak: int
    input_batch: int
    dataset: int
    workspace: int
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    LINES = ("parameters", "gradients", "optimizer_states", "autocast_weight_copies", "activations",
             "recompute_peak", "restore_peak", "input_batch", "dataset", "workspace")

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states

    @property
    def total(self) -> int:
        return sum(getattr(self, k) for k in self.LINES)

    @property
    def predicted_peak_bytes(self) -> int:
        return self.total

    def breakdown(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in self.LINES}

    def as_dict(self) -> dict:
        return {"predicted_peak_bytes": self.total, "breakdown": self.breakdown(), "settings": dict(self.settings),
                "notes": list(self.notes)}

    def format_table(self, budget: Optional[int] = None) -> str:
        total = self.total
        rows = [(k.replace("_", " "), v) for k, v in self.breakdown().items()]
        width = max(len(r[0]) for r in rows) + 2
        lines = [f"  {name:<{width}}{format_bytes(v):>11}  {100 * v / max(total, 1):5.1f}%" for name, v in rows]
        lines.append(f"  {'predicted peak':<{width}}{format_bytes(total):>11}")
        if budget is not None:
            verdict = "fits in" if total <= budget else "does NOT fit in"
            lines[-1] += f"  {verdict} {format_bytes(budget)}"
        return "\n".join(lines)


@dataclass(frozen=True)
class Candidate:
    """One point of the planner's search space (and the given settings)."""

    precision: str
    channels_last: bool
    checkpointing: str
    micro_batch_size: int
    per_device_batch: int
    engine: str = "ddp"
    zero_stage: int = 0
    offload: str = "none"
    offload_activations: bool = False
    activation_compression: str = "none"

    @property
    def accumulation_steps(self) -> int:
        return self.per_device_batch // self.micro_batch_size

    def describe(self) -> str:
        parts = [self.precision] + (["channels_last"] if self.channels_last else [])
        if self.checkpointing != "none":
            parts.append(f"checkpointing={self.checkpointing}")
        m, acc, per_device = self.micro_batch_size, self.accumulation_steps, self.per_device_batch
        if self.activation_compression != "none":
            parts.append(f"activations saved as {self.activation_compression}")
        parts.append(f"micro-batch {m} x {acc} = {per_device}/device")
        if self.engine == "deepspeed":
            parts.append(f"ZeRO-{self.zero_stage}" + (f" offload {self.offload}" if self.offload != "none" else ""))
        return ", ".join(parts)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["accumulation_steps"] = self.accumulation_steps
        return d


@dataclass
class PlanContext:
    """What stays fixed while the planner searches: the model, data and devices."""

    cfg: Config
    world_size: int
    device_type: str
    key: ModelKey
    image_size: int
    facts: ModelFacts
    dataset: int
    dataset_note: str
    ds_zero: dict  # zero_optimization of the DeepSpeed config in effect (or of a template)

    @classmethod
    def build(cls, cfg: Config, world_size: int, device_type: str) -> "PlanContext":
        if world_size < 1:
            raise ConfigError(f"--world-size {world_size} must be at least 1.")
        if device_type not in ("cuda", "cpu"):
            raise ConfigError(f"device_type {device_type!r}: plan for 'cuda' or 'cpu'.")
        cfg.layers()  # block vs depth, with the message
        size = cfg.image_size()
        key = ModelKey(cfg.model.block, cfg.model.depth, cfg.model.layers, cfg.stem(), _num_classes(cfg))
        dataset, note = dataset_device_bytes(cfg)
        return cls(cfg, world_size, device_type, key, size, model_facts(key, size), dataset, note, {})

    def zero_config(self, stage: int) -> dict:
        """zero_optimization of --ds-config if given, else of ds_configs/zero{stage}.json."""
        if stage not in self.ds_zero:
            self.ds_zero[stage] = self._read_zero_config(stage)
        return self.ds_zero[stage]

    def _read_zero_config(self, stage: int) -> dict:
        from resnet_scale.distributed.deepspeed import TEMPLATE_DIR, load_ds_config

        d = self.cfg.distributed
        path = d.ds_config or TEMPLATE_DIR / f"zero{max(1, stage)}.json"
        try:
            raw = load_ds_config(path)
        except ConfigError:
            if d.ds_config:
                raise
            raw = {}
        zero = raw.get("zero_optimization", {})
        return zero if isinstance(zero, dict) else {}


def estimate_candidate(ctx: PlanContext, c: Candidate) -> MemoryEstimate:
    """The breakdown for one set of memory settings (no search)."""
    f = ctx.facts
    states = model_state_bytes(
        f.num_params,
        recipe=our_recipe(ctx.cfg, c.engine, c.zero_stage),
        engine=c.engine,
        stage=c.zero_stage,
        world_size=ctx.world_size,
        offload=c.offload,
        largest_layer_params=f.largest_layer_params,
        bucket_bytes=_comm_bucket_bytes(c.engine, c.zero_stage, ctx.world_size, f.num_params,
                                        ctx.zero_config(c.zero_stage) if c.engine == "deepspeed" else {}),
    )
    restore = 0
    if c.activation_compression == "none":
        acts, peak = activation_bytes(ctx.key, ctx.image_size, c.precision, c.channels_last, c.checkpointing,
                                      c.micro_batch_size)
    else:
        from resnet_scale.planner.compressed import compressed_activation_bytes

        acts, peak, restore, _ = compressed_activation_bytes(ctx.key, ctx.image_size, c.precision, c.channels_last,
                                                             c.checkpointing, c.micro_batch_size,
                                                             c.activation_compression)
    notes = []
    if c.offload_activations and ctx.device_type == "cpu":
        notes.append("--offload-activations changes nothing on a CPU run: the activations are in CPU memory")
    elif c.offload_activations:
        # Tensors under memory.offload.MIN_OFFLOAD_BYTES stay on the GPU (BatchNorm's statistics:
        # ~0.2 MiB for all of ResNet-50); counted as moved.
        notes.append(f"--offload-activations keeps {format_bytes(acts)} of saved activations in CPU memory")
        acts = 0
    size = ctx.image_size
    est = MemoryEstimate(
        **states,
        autocast_weight_copies=2 * f.autocast_params if c.precision in ("bf16", "fp16") else 0,
        activations=acts,
        recompute_peak=peak,
        restore_peak=restore,
        input_batch=c.per_device_batch * (3 * size * size * 4 + 8),
        dataset=ctx.dataset,
        workspace=0,
        settings=c.as_dict(),
        notes=notes,
    )
    est.workspace = max(WORKSPACE_MIN_BYTES, int(WORKSPACE_FRACTION * est.total))
    return est


def _resolve_settings(cfg: Config, world_size: int, device_type: str):
    """resolve_memory, also when planning for a GPU on a machine without one (bf16 is then
    assumed supported: resolve_memory would ask torch.cuda)."""
    from resnet_scale.memory.settings import resolve_memory

    probe = device_type
    if device_type == "cuda" and not torch.cuda.is_available() and (cfg.memory.precision or "") != "fp16":
        probe = "cpu"
    return resolve_memory(cfg, world_size=world_size, device_type=probe)


def given_candidate(cfg: Config, world_size: int, device_type: str) -> Candidate:
    """The settings ``cfg`` would train with (``resolve_memory`` + the ZeRO settings)."""
    m = _resolve_settings(cfg, world_size, device_type)
    engine, stage, offload = cfg.engine(), 0, "none"
    if engine == "deepspeed":
        from resnet_scale.distributed.deepspeed import resolve_stage_and_offload

        stage, offload, _ = resolve_stage_and_offload(cfg)
    return Candidate(m.precision, m.channels_last, m.checkpointing, m.micro_batch_size, m.per_device_batch,
                     engine, stage, offload, m.offload_activations, m.activation_compression)


def estimate_memory(cfg: Config, *, world_size: int = 1, device_type: str = "cuda") -> MemoryEstimate:
    """Predicted peak memory per device of training ``cfg`` as given, on ``world_size`` devices of
    type ``device_type`` ("cuda", also planned from a machine without one, or "cpu"): a
    :class:`MemoryEstimate` (``.total`` bytes, ``.breakdown()`` by what holds them: module
    docstring). Raises ConfigError for settings that cannot work."""
    ctx = PlanContext.build(cfg, world_size, device_type)
    est = estimate_candidate(ctx, given_candidate(cfg, world_size, device_type))
    est.notes.append(f"dataset: {ctx.dataset_note}")
    est.notes.append(f"workspace: {WORKSPACE_STATUS}")
    if cfg.memory.compile:
        est.notes.append("--compile: the activations are those of eager mode; torch.compile may save fewer")
    return est
