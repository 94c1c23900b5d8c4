"""What a run changes in its process, put back when ``train()`` returns or raises, so that ``train()``
can be called any number of times in one Python process (a notebook) with different settings.

* **Accelerate's state.** ``AcceleratorState``, ``PartialState`` and ``GradientState`` are singletons
  (one dict shared by every instance): a second ``Accelerator`` with another precision raised
  "AcceleratorState has already been initialized". Each run starts from empty ones and, when it
  ends, the caller's come back, in the same dicts (an ``Accelerator`` the caller made before the
  run works again afterwards). So does transformers' reference to the DeepSpeed config, which
  Accelerate's DeepSpeed plugin sets.
* **The environment.** Every variable the run set or changed (``DS_ACCELERATOR``,
  ``ACCELERATE_USE_DEEPSPEED``, ``CUBLAS_WORKSPACE_CONFIG``, what Accelerate and DeepSpeed set) gets
  its old value back, or goes: a ZeRO run followed by a DDP run works.
* **torch's switches:** deterministic algorithms (and warn-only), cuDNN's benchmark/deterministic,
  the float32 matmul precision and TF32 flags, the default dtype, the intra-op thread count, the
  current CUDA device; the global random generators (Python, NumPy, torch, CUDA), which the run seeds.
* **The ``resnet_scale`` logger's level** and the handlers of SIGINT, SIGTERM and SIGUSR1.
* **The process group.** A group that existed before the run (the caller's) is used and left open. A
  group the run started is ended: after a finished run, or whenever the run was a world of one (the
  in-process group of a one-process DeepSpeed run). In a launch of several processes, once
  ``train()`` has ended the group it started, a later ``train()`` in the same processes is refused
  with a :class:`~resnet_scale.config.ConfigError`: a second group on the launcher's store hangs.
  To train several times in one launch, start the group before the first ``train()``
  (``torch.distributed.init_process_group()``); every ``train()`` then uses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any

import torch

from resnet_scale.config import ConfigError

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_HF_DEEPSPEED = "transformers.integrations.deepspeed"
_REF = "_hf_deepspeed_config_weak_ref"


class _Launch:
    ended_group = 0  # world size of the launch whose process group a train() in this process ended


def _group_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def check_launch(world_size: int) -> None:
    """Refuse a ``train()`` that would start a second process group in the same launch (module
    docstring)."""
    if world_size > 1 and _Launch.ended_group and not _group_initialized():
        raise ConfigError(
            f"train() already ran in this process of a {_Launch.ended_group}-process launch and ended the "
            "process group it started; another group on the launcher's store would hang. Launch once per "
            "train(), or call torch.distributed.init_process_group() before the first train(): every train() "
            "then uses that group and leaves it open."
        )


def _accelerate_states() -> tuple[dict, ...]:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    return AcceleratorState._shared_state, PartialState._shared_state, GradientState._shared_state


def _tf32_switches() -> dict[tuple[Any, str], Any]:
    """The TF32 switches this torch has: ``fp32_precision`` (torch 2.9 on) and ``allow_tf32``."""
    values = {}
    with warnings.catch_warnings():  # newer torch warns that allow_tf32 gives way to fp32_precision
        warnings.simplefilter("ignore")
        for owner in (torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn):
            for name in ("fp32_precision", "allow_tf32"):
                try:
                    values[(owner, name)] = getattr(owner, name)
                except (AttributeError, RuntimeError):
                    pass
    return values


@dataclass
class ProcessState:
    """The process-global settings a run may change (module docstring), as they were."""

    world_size: int
    group: bool
    environ: dict[str, str]
    accelerate: tuple[dict, ...]
    hf_deepspeed_config: Any  # transformers' reference to the DeepSpeed config, if it was loaded
    deterministic: tuple[bool, bool]
    cudnn: tuple[bool, bool]
    matmul_precision: str
    tf32: dict[tuple[Any, str], Any]
    default_dtype: torch.dtype
    num_threads: int
    cuda_device: int | None
    rng: dict[str, Any]
    log_level: int
    handlers: dict[int, Any] = field(default_factory=dict)

    @classmethod
    def capture(cls, world_size: int) -> "ProcessState":
        module = sys.modules.get(_HF_DEEPSPEED)
        import numpy  # Accelerate's set_seed seeds it too (a dependency of Accelerate)

        rng: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                               "numpy": numpy.random.get_state()}
        cuda = torch.cuda.is_initialized()
        if cuda:
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return cls(
            world_size=world_size,
            group=_group_initialized(),
            environ=dict(os.environ),
            accelerate=tuple(dict(state) for state in _accelerate_states()),
            hf_deepspeed_config=getattr(module, _REF, None),
            deterministic=(torch.are_deterministic_algorithms_enabled(),
                           torch.is_deterministic_algorithms_warn_only_enabled()),
            cudnn=(torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic),
            matmul_precision=torch.get_float32_matmul_precision(),
            tf32=_tf32_switches(),
            default_dtype=torch.get_default_dtype(),
            num_threads=torch.get_num_threads(),
            cuda_device=torch.cuda.current_device() if cuda else None,
            rng=rng,
            log_level=logging.getLogger("resnet_scale").level,
            handlers={sig: signal.getsignal(sig) for sig in SIGNALS},
        )

    def start_run(self) -> None:
        """Empty Accelerate states for the run (the caller's were captured)."""
        for state in _accelerate_states():
            state.clear()

    def restore(self, *, finished: bool) -> None:
        """Put everything back. ``finished``: the run ended normally (every process passed its last
        barrier), so a process group it started in a launch can be ended."""
        self._end_group(finished)
        for state, saved in zip(_accelerate_states(), self.accelerate):
            state.clear()
            state.update(saved)
        module = sys.modules.get(_HF_DEEPSPEED)
        if module is not None:
            setattr(module, _REF, self.hf_deepspeed_config)
        for key in [k for k in os.environ if k not in self.environ]:
            del os.environ[key]
        for key, value in self.environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        if (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled()) != self.deterministic:
            torch.use_deterministic_algorithms(self.deterministic[0], warn_only=self.deterministic[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = self.cudnn
        if torch.get_float32_matmul_precision() != self.matmul_precision:
            torch.set_float32_matmul_precision(self.matmul_precision)
        for (owner, name), value in self.tf32.items():
            if _tf32_switches().get((owner, name)) != value:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    setattr(owner, name, value)
        torch.set_default_dtype(self.default_dtype)
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        if self.cuda_device is not None and torch.cuda.current_device() != self.cuda_device:
            torch.cuda.set_device(self.cuda_device)
        self._restore_rng()
        logging.getLogger("resnet_scale").setLevel(self.log_level)
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self.handlers.items():
                if handler is not None and signal.getsignal(sig) is not handler:
                    signal.signal(sig, handler)

    def _restore_rng(self) -> None:
        random.setstate(self.rng["python"])
        torch.set_rng_state(self.rng["torch"])
        sys.modules["numpy"].random.set_state(self.rng["numpy"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state_all(self.rng["cuda"])

    def _end_group(self, finished: bool) -> None:
        """End the process group the run started (module docstring); under Accelerate's notebook
        launcher (``FORK_LAUNCHED``) the launcher owns it."""
        if self.group or not _group_initialized():
            return
        if self.world_size > 1 and not finished:
            return  # a failed run in a launch: a peer may still be in a collective; the process ends anyway
        if os.environ.get("FORK_LAUNCHED", "0").lower() in ("1", "true", "yes"):
            return
        import torch.distributed as dist

        dist.destroy_process_group()
        _forget_deepspeed_groups()
        if self.world_size > 1:
            _Launch.ended_group = self.world_size


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches the groups it made from the default one (``deepspeed.utils.groups``: the world
    group, data/expert/model-parallel groups); after the default group ends they name a group that no
    longer exists ("Group ... is not registered" in the next DeepSpeed run). Back to their empty values."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    import torch.distributed as dist

    for name, value in list(vars(groups).items()):
        if name.startswith("__"):
            continue
        if isinstance(value, dist.ProcessGroup) or name in ("mpu", "mesh_device") or name.startswith("_MPU_"):
            setattr(groups, name, None)
        elif isinstance(value, dict) and name.endswith(("_GROUP", "_GROUP_RANKS")):
            setattr(groups, name, {})


@dataclass
class RunOutcome:
    """Set ``finished`` once the run has written its summary (a group it started is then ended)."""

    finished: bool = False


@contextlib.contextmanager
def isolated_run(world_size: int) -> Iterator[RunOutcome]:
    """``with isolated_run(world) as outcome:`` one ``train()``: refused if the launch cannot host it
    (:func:`check_launch`), started from empty Accelerate states, and on leaving, however it left,
    the process put back as it was (:meth:`ProcessState.restore`)."""
    check_launch(world_size)
    saved = ProcessState.capture(world_size)
    saved.start_run()
    outcome = RunOutcome()
    try:
        yield outcome
    finally:
        saved.restore(finished=outcome.finished)
