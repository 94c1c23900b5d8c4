"""``build_accelerator(cfg)``: the one place that turns the config into an ``Accelerator``.

Launched with ``accelerate launch`` or ``torchrun``, the process group is started from the
environment, so the same call serves one process and many (DDP over NCCL on GPUs, gloo on CPU). NCCL
groups are started here, with the process's GPU made current first and bound to the group
(``device_id``); gloo groups by Accelerate, except under a torchrun restart (see
:func:`process_group_start`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from resnet_scale.config import Config, ConfigError
from resnet_scale.memory.settings import MemorySettings


def resolve_device(requested: str) -> str:
    """'cpu' or 'cuda' after resolving 'auto'; asking for a GPU that is not there is an error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    return requested


def world_size_from_env() -> int:
    """Processes in this job as the launcher (torchrun, accelerate launch, SLURM via torchrun)
    announced them, known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class ProcessGroupStart:
    """How this process starts the default process group itself, before Accelerate would."""

    backend: str  # "nccl" (GPUs) or "gloo" (CPU)
    device_id: torch.device | None  # NCCL: this process's GPU, made current first and bound to the group
    store_prefix: str | None  # under a torchrun restart: the attempt's own prefix in the agent's store
    alone: bool = False  # a world of one on an in-process store (one process under DeepSpeed, no launcher)


def process_group_start(device: str, *, world_size: int, local_rank: int | None, device_count: int,
                        restart_attempt: str | None, initialized: bool,
                        deepspeed: bool = False) -> ProcessGroupStart | None:
    """Whether (and how) to start the process group here rather than let Accelerate start it.

    * NCCL (``device`` cuda, several processes): always here. Accelerate would call
      ``init_process_group`` before making the process's GPU current and without ``device_id``: the
      NCCL communicator would then be created lazily at the first collective, on whatever device is
      current. Here the GPU (``local_rank`` modulo the visible GPUs, Accelerate's own choice) is set
      first and passed as ``device_id``, so the communicator starts eagerly on the right GPU.
    * gloo (CPU): only under a torchrun restart attempt (``TORCHELASTIC_RESTART_COUNT`` set), for the
      store prefix; otherwise Accelerate starts it, as before.
    * One process under DeepSpeed (``deepspeed``): a world of one on an in-process store. DeepSpeed needs
      a group even alone, and Accelerate, told to use DeepSpeed, looks for one ("Default process group
      has not been initialized"); without a launcher there is no store to start it on.
    * One process otherwise, a group that exists already, or no ``LOCAL_RANK`` for NCCL: None (nothing
      to do here).

    The store prefix: the workers of all attempts talk to the agent's one TCPStore; without a prefix a
    restarted rank can read the address a killed rank of the previous attempt published there and fail
    to connect ("Gloo connectFullMesh failed ... Connection refused": 3 restarts in 5 here).
    """
    if initialized:
        return None
    if world_size < 2:
        if not deepspeed:
            return None
        if device == "cuda":
            return ProcessGroupStart("nccl", torch.device("cuda", (local_rank or 0) % max(device_count, 1)), None,
                                     alone=True)
        return ProcessGroupStart("gloo", None, None, alone=True)
    prefix = f"resnet_scale/attempt_{restart_attempt}" if restart_attempt is not None else None
    if device == "cuda":
        if local_rank is None:
            return None
        return ProcessGroupStart("nccl", torch.device("cuda", local_rank % max(device_count, 1)), prefix)
    if prefix is None:
        return None
    return ProcessGroupStart("gloo", None, prefix)


def init_process_group_early(device: str, *, deepspeed: bool = False) -> None:
    """Start the process group as :func:`process_group_start` says; Accelerate (and DeepSpeed) then
    use it as it is."""
    import torch.distributed as dist

    local_rank = os.environ.get("LOCAL_RANK")
    start = process_group_start(
        device, world_size=world_size_from_env(), local_rank=int(local_rank) if local_rank is not None else None,
        device_count=torch.cuda.device_count() if device == "cuda" else 0,
        restart_attempt=os.environ.get("TORCHELASTIC_RESTART_COUNT"), initialized=dist.is_initialized(),
        deepspeed=deepspeed)
    if start is None:
        return
    if start.device_id is not None:
        torch.cuda.set_device(start.device_id)  # before the group: NCCL binds to the current device
    if start.alone:
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)  # what a launcher says, and DeepSpeed's engine asks for
        dist.init_process_group(start.backend, rank=0, world_size=1, store=dist.HashStore(),
                                device_id=start.device_id)
        return
    store, rank, world = next(dist.rendezvous("env://"))
    if start.store_prefix is not None:
        store = dist.PrefixStore(start.store_prefix, store)
    dist.init_process_group(start.backend, rank=rank, world_size=world, store=store, device_id=start.device_id)


def build_accelerator(cfg: Config, memory: MemorySettings) -> Accelerator:
    """The Accelerator for this run: device, autocast precision, gradient accumulation
    (micro-batches per optimizer step) and the engine (DDP or DeepSpeed ZeRO).

    Every configuration error is raised here, before any process group starts.
    """
    device = resolve_device(cfg.train.device)
    world = world_size_from_env()
    if device == "cpu":
        # Accelerate imports DeepSpeed (when installed) to unwrap models; tell DeepSpeed the
        # accelerator up front instead of letting it warn that it found no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    kwargs: dict = {"gradient_accumulation_steps": memory.accumulation_steps}
    if cfg.engine() == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        from resnet_scale.distributed.deepspeed import build_ds_config, require_deepspeed

        require_deepspeed()
        ds_config = build_ds_config(cfg, memory, world)
        # Accelerate shards data and counts processes for DeepSpeed only when it is told through
        # the environment (otherwise every rank sees every batch, silently).
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config)
        kwargs["mixed_precision"] = "no"  # bf16 is DeepSpeed's torch_autocast (see deepspeed.py)
        if device == "cpu":
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    else:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
            raise ConfigError(
                "the launcher asks for DeepSpeed (an accelerate config with distributed_type: DEEPSPEED) "
                "but the flags choose DDP; add --zero-stage N (or --ds-config PATH): the flags decide the engine."
            )
        kwargs["cpu"] = device == "cpu"
        kwargs["mixed_precision"] = memory.mixed_precision
    init_process_group_early(device, deepspeed=cfg.engine() == "deepspeed")
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world:
        raise ConfigError(
            f"the launcher announced {world} processes but Accelerate sees {accelerator.num_processes}; "
            "the batch split would be wrong. Launch with torchrun or accelerate launch."
        )
    return accelerator


def prepare(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """``accelerator.prepare(model, optimizer)``; under DeepSpeed, first the one config value that needs
    the model: the bucket sizes (``deepspeed.size_buckets``)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        from resnet_scale.distributed.deepspeed import size_buckets

        size_buckets(plugin.deepspeed_config, sum(p.numel() for p in model.parameters()))
    return accelerator.prepare(model, optimizer)
