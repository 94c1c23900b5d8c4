"""Resolve the memory settings of a run (``--low-memory`` and explicit flags) and apply them.

``resolve_memory(cfg, world_size, device_type)`` turns the optional ``MemoryConfig`` fields into
one concrete ``MemorySettings``, refusing combinations that cannot work, with the numbers.
``apply_memory_transforms(model, settings)`` is the one function that fixes the order of the
``apply_*`` transforms; the accelerator's ``prepare`` comes after it, in the training setup.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from resnet_scale.config import Config, ConfigError

logger = logging.getLogger("resnet_scale")

#: ``--low-memory`` keeps micro-batches at or below this many images per device. BatchNorm
#: statistics get noisy below ~16 images (Wu & He 2018, Fig. 1), activations grow with it.
LOW_MEMORY_MAX_MICRO_BATCH = 64


@dataclass(frozen=True)
class MemorySettings:
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    checkpointing: str  # a policy of resnet_scale.memory.CHECKPOINT_POLICIES
    checkpoint_impl: str
    per_device_batch: int  # images per optimizer step on one device
    micro_batch_size: int  # images per forward/backward on one device
    accumulation_steps: int  # micro-batches per optimizer step
    offload_activations: bool
    compile: bool
    activation_compression: str = "none"  # a mode of resnet_scale.memory.COMPRESSION_MODES

    @property
    def mixed_precision(self) -> str:
        """Accelerate's name for the precision."""
        return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.precision]

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        parts = [self.precision]
        if self.channels_last:
            parts.append("channels_last")
        if self.checkpointing != "none":
            parts.append(f"checkpointing={self.checkpointing}({self.checkpoint_impl})")
        parts.append(f"micro-batch {self.micro_batch_size} x {self.accumulation_steps} = {self.per_device_batch}/device")
        if self.activation_compression != "none":
            parts.append(f"activations saved as {self.activation_compression}")
        if self.offload_activations:
            parts.append("activations offloaded to CPU")
        if self.compile:
            parts.append("torch.compile")
        return ", ".join(parts)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def resolve_memory(cfg: Config, *, world_size: int, device_type: str) -> MemorySettings:
    """Concrete settings for this run; explicit flags win over what ``--low-memory`` picks. The micro-batch
    is ``--micro-batch-size``, or the per-device batch / ``--grad-accum-steps``."""
    m, batch = cfg.memory, cfg.train.batch_size
    low = m.low_memory
    if batch % world_size:
        raise ConfigError(
            f"--batch-size {batch} (the global batch) is not divisible by the {world_size} processes; "
            f"use a multiple of {world_size}, e.g. {max(world_size, batch // world_size * world_size)}."
        )
    per_device = batch // world_size

    precision = m.precision or ("bf16" if low else "fp32")
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError(
            "--precision fp16 (autocast with loss scaling) needs a CUDA GPU; on CPU use --precision bf16 or fp32."
        )
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"--precision bf16 is not supported by {torch.cuda.get_device_name()}; use --precision fp16 "
            "(loss-scaled) or fp32."
        )

    policy = m.checkpointing or ("block" if low else "none")
    from resnet_scale.memory.checkpointing import parse_policy

    try:
        parse_policy(policy, 1)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    divisors = ", ".join(str(d) for d in range(1, min(per_device, 64) + 1) if per_device % d == 0)
    micro, accum = m.micro_batch_size, m.grad_accum_steps
    if micro is not None and accum is not None:
        raise ConfigError(f"--micro-batch-size {micro} and --grad-accum-steps {accum} both set the micro-batch; "
                          "give one of them (micro-batch = per-device batch / accumulation steps).")
    if accum is not None:
        if accum < 1 or per_device % accum:
            raise ConfigError(
                f"--grad-accum-steps {accum} must divide the per-device batch {per_device} (--batch-size {batch} "
                f"/ {world_size} processes) into equal micro-batches; divisors up to 64: {divisors}."
            )
        micro = per_device // accum
    if micro is None:
        micro = _largest_divisor_at_most(per_device, LOW_MEMORY_MAX_MICRO_BATCH) if low else per_device
    if micro < 1 or per_device % micro:
        raise ConfigError(
            f"--micro-batch-size {micro} must divide the per-device batch {per_device} "
            f"(--batch-size {batch} / {world_size} processes); divisors up to 64: {divisors}."
        )
    if m.checkpoint_impl == "fairscale" and policy == "none":
        raise ConfigError("--checkpoint-impl fairscale needs an --activation-checkpointing policy other than none.")
    compression = m.activation_compression or "none"
    if compression != "none" and m.offload_activations:
        raise ConfigError(f"--activation-compression {compression} and --offload-activations both keep the saved "
                          "activations (the compressed ones would not be offloaded); give one of them.")
    if compression != "none" and m.checkpoint_impl == "fairscale" and policy != "none":
        raise ConfigError(f"--activation-compression {compression} needs --checkpoint-impl native: fairscale's "
                          "checkpoint would recompute each segment's ReLUs from its quantized input (a biased "
                          "gradient); give --checkpoint-impl native or drop one of them.")
    if compression != "none" and m.compile:
        raise ConfigError(f"--activation-compression {compression} does not work with --compile yet "
                          "(its saved-tensor hooks are not traced); give one of them.")
    return MemorySettings(
        precision=precision,
        channels_last=m.channels_last if m.channels_last is not None else low,
        checkpointing=policy,
        checkpoint_impl=m.checkpoint_impl,
        per_device_batch=per_device,
        micro_batch_size=micro,
        accumulation_steps=per_device // micro,
        offload_activations=m.offload_activations,
        compile=m.compile,
        activation_compression=compression,
    )


def apply_memory_transforms(model: nn.Module, settings: MemorySettings) -> nn.Module:
    """Apply the memory transforms in their one valid order and return the model to prepare.

    1. channels_last first: it converts parameters in place; every later wrapper sees NHWC weights.
    2. activation checkpointing next: it patches stage ``forward``s of the real modules, which
       ``torch.compile`` must trace (compiling first would hide the stages from it).
    3. activation compression after checkpointing: it wraps the model's own ``forward`` (the stages'
       are checkpointing's), so the checkpointed segments' saved inputs are stored compressed.
    4. ``torch.compile`` last of the model transforms; ``accelerator.prepare`` (DDP, autocast)
       comes after all of them, in the training setup.
    Precision is not a model transform: Accelerate's autocast applies it around ``forward``, and
    the weights and BatchNorm statistics stay fp32.
    """
    from resnet_scale.memory.checkpointing import apply_activation_checkpointing
    from resnet_scale.memory.layout import apply_channels_last

    if settings.channels_last:
        apply_channels_last(model)
    if settings.checkpointing != "none":
        try:
            # fairscale's wrapper can keep its segment inputs on the CPU itself (offload_to_cpu).
            offload = settings.offload_activations and settings.checkpoint_impl == "fairscale"
            apply_activation_checkpointing(model, settings.checkpointing, impl=settings.checkpoint_impl,
                                           offload_to_cpu=offload)
        except ImportError as err:
            raise ConfigError(str(err)) from None
    if settings.activation_compression != "none":
        from resnet_scale.memory.compression import apply_activation_compression

        apply_activation_compression(model, settings.activation_compression)
    if settings.compile:
        backend = compile_backend()
        logger.info(f"torch.compile ({backend}, static shapes): compiling the model (first steps are slow "
                    "while it compiles)")
        # dynamic=False: one static batch shape (the loader drops the short last batch under --compile)
        # and, should a shape ever change (an --oom-recovery plan switch), a new static graph rather
        # than dynamic-shape kernels for the rest of the run.
        model = torch.compile(model, backend=backend, dynamic=False)
    return model


#: The torch.compile backend of ``--compile``: ``inductor`` unless this environment variable names
#: another registered backend (the tests use ``eager``/counting backends: no C++ compile on CPU).
COMPILE_BACKEND_ENV = "RESNET_SCALE_COMPILE_BACKEND"


def compile_backend() -> str:
    """The backend ``--compile`` uses; an unknown name is refused (ConfigError) before anything compiles."""
    from torch._dynamo import list_backends

    name = os.environ.get(COMPILE_BACKEND_ENV, "").strip() or "inductor"
    if name not in list_backends(exclude_tags=()):
        raise ConfigError(f"{COMPILE_BACKEND_ENV}={name} is not a torch.compile backend; name a registered one "
                          "(e.g. inductor, aot_eager, eager) or unset it for inductor.")
    return name


def activation_offload(settings: MemorySettings, device: torch.device):
    """The context that keeps the forward's saved activations in host memory (pinned on CUDA, with
    their memory format, copied on a side stream: ``memory/offload.py``), or a null context: also
    on a CPU device, where the activations are in host memory already."""
    if not settings.offload_activations:
        return contextlib.nullcontext()
    if device.type == "cpu":
        logger.info("--offload-activations: the activations of a CPU run are in CPU memory already")
        return contextlib.nullcontext()
    from resnet_scale.memory.offload import OffloadActivations

    return OffloadActivations(device.type)
