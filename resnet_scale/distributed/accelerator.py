"""``build_accelerator(cfg)``: the one place that turns the config into an ``Accelerator``.

Launched with ``accelerate launch`` or ``torchrun``, Accelerate reads the process group from the
environment, so the same call serves one process and many (DDP over NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import os

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


def init_process_group_per_attempt(device: str) -> None:
    """Under torchrun, start the process group on a store prefix of its own for every restart
    attempt. The workers of all attempts talk to the agent's one TCPStore; without a prefix a
    restarted rank can read the address a killed rank of the previous attempt published there and
    fail to connect ("Gloo connectFullMesh failed ... Connection refused": 3 restarts in 5 here).
    Accelerate (and DeepSpeed) then use this process group as it is."""
    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or world_size_from_env() < 2 or dist.is_initialized():
        return
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                            store=dist.PrefixStore(f"resnet_scale/attempt_{attempt}", store))


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
    init_process_group_per_attempt(device)
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world:
        raise ConfigError(
            f"the launcher announced {world} processes but Accelerate sees {accelerator.num_processes}; "
            "the batch split would be wrong. Launch with torchrun or accelerate launch."
        )
    return accelerator
