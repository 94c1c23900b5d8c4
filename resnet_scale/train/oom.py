"""Out-of-memory recovery: a step that runs out of memory on any rank is redone by every rank with
half the micro-batch and twice the accumulation (the same global batch), from the same step.

Why a step of its own: under DDP the gradient all-reduce runs *inside* backward, bucket by
bucket, and a forward broadcasts BatchNorm buffers. A rank that fails half-way leaves the others
waiting in a collective it will never join. So with ``--oom-recovery`` the step runs the plain
module (no DDP hooks): buffers are broadcast from rank 0 first, every micro-batch runs
forward/backward locally, then ONE scalar all-reduce tells every rank whether any rank ran out
of memory, and only then are the gradients averaged (bucketed all-reduces, the same mean DDP
computes). Every rank reaches the same collectives in the same order whatever failed. The price,
with several processes: the gradient all-reduce no longer overlaps backward (single process: free).

What counts as out of memory (:func:`is_out_of_memory`): torch's ``OutOfMemoryError``, and the
RuntimeErrors of the libraries that allocate on their own -- cuDNN (``CUDNN_STATUS_ALLOC_FAILED``, in
cuDNN 9 ``CUDNN_STATUS_INTERNAL_ERROR_DEVICE/HOST_ALLOCATION_FAILED``, a workspace it could not get,
or no engine left to run a convolution, which is what a workspace shortage looks like through
cuDNN's engine API), cuBLAS (``CUBLAS_STATUS_ALLOC_FAILED``), a raw "CUDA error: out of memory"
and the CPU allocator's "can't allocate memory". Before the cache is
emptied, the failed step's graph is dropped: its loss and logits, and the frames the error's
traceback holds (with every activation they reference); otherwise ``empty_cache`` frees nothing.

``RESNET_SCALE_INJECT_OOM=RANK:STEP[,RANK:STEP]`` raises ``torch.OutOfMemoryError`` once at the start
of that optimizer step on that rank — how the recovery is tested without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import traceback

import torch
from accelerate import Accelerator
from torch import nn

from resnet_scale.memory.settings import MemorySettings
from resnet_scale.train.step import (
    BufferSnapshot,
    StepResult,
    apply_update,
    micro_batch_loss,
    nonfinite_flag,
    split_micro_batches,
)

_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


class OutOfMemoryUnrecoverable(Exception):
    """Out of memory with a micro-batch of one image: nothing smaller to try."""


_fired: set[str] = set()


def _injected(rank: int, step: int) -> bool:
    """True the first time (only) that RESNET_SCALE_INJECT_OOM names this rank and step."""
    key = f"{rank}:{step}"
    spec = {part.strip() for part in os.environ.get("RESNET_SCALE_INJECT_OOM", "").split(",")}
    if key in spec and key not in _fired:
        _fired.add(key)
        return True
    return False


#: Texts of the RuntimeErrors that mean "out of memory", lower-cased (torch's OutOfMemoryError is one by
#: its type). cuDNN reports a workspace it could not allocate as NOT_ENOUGH_WORKSPACE, or, through its
#: engine API, as no engine able to run the convolution.
OOM_PATTERNS = (
    "out of memory",  # torch's CUDA caching allocator; "CUDA error: out of memory" from a raw cudaMalloc
    "cudnn_status_alloc_failed",  # cuDNN 8
    "cudnn_status_internal_error_device_allocation_failed",  # cuDNN 9 names the allocation that failed
    "cudnn_status_internal_error_host_allocation_failed",
    "cudnn_status_not_enough_workspace",
    "unable to find an engine",  # "GET was unable to find an engine to execute this computation"
    "cublas_status_alloc_failed",
    "can't allocate memory",  # the CPU allocator ("DefaultCPUAllocator: can't allocate memory")
)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a memory shortage a smaller micro-batch may cure (see :data:`OOM_PATTERNS`)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    if not isinstance(err, RuntimeError):
        return False
    text = str(err).lower()
    return any(pattern in text for pattern in OOM_PATTERNS)


def _forget(err: BaseException) -> None:
    """Clear the local variables of the frames ``err``'s traceback holds (the failed forward's and
    backward's: logits, activations, autograd nodes), so the memory is free before ``empty_cache``
    even while ``err`` itself is still referenced."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:  # the error and those it was raised from or during
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__


def next_plan(memory: MemorySettings) -> MemorySettings | None:
    """Half the micro-batch, twice the accumulation: the same images per optimizer step. Under
    ``--compile`` the largest divisor of the per-device batch at most half the micro-batch, so that
    every micro-batch has the same shape (one static graph per plan, no uneven last micro-batch)."""
    micro = memory.micro_batch_size // 2
    if micro < 1:
        return None
    if memory.compile:
        micro = max(d for d in range(1, micro + 1) if memory.per_device_batch % d == 0)
    steps = -(-memory.per_device_batch // micro)  # ceil: a last, shorter micro-batch is handled exactly
    return dataclasses.replace(memory, micro_batch_size=micro, accumulation_steps=steps)


def _coalesced(tensors: list[torch.Tensor], collective) -> None:
    """Run ``collective(flat)`` on the tensors flattened into buckets of one dtype and ~25 MB (as
    DDP does), then copy the results back: a few collectives instead of one per tensor."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group + [None]:
            if t is not None:
                bucket.append(t)
                size += t.numel() * t.element_size()
            if bucket and (t is None or size >= _BUCKET_BYTES):
                flat = _flatten_dense_tensors(bucket)
                collective(flat)
                for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    dst.copy_(src)
                bucket, size = [], 0


def guarded_step(accelerator: Accelerator, model: nn.Module, optimizer, images: torch.Tensor,
                 labels: torch.Tensor, *, step: int, memory: MemorySettings, label_smoothing: float = 0.0,
                 offload=None, max_grad_norm: float | None = None,
                 buffers: BufferSnapshot | None = None) -> StepResult | None:
    """One optimizer step, or None when any rank ran out of memory (then no rank updated anything
    and the caller retries the same batch with ``next_plan``)."""
    import torch.distributed as dist

    net = accelerator.unwrap_model(model)
    world = accelerator.num_processes
    if world > 1:  # what DDP does at the start of each forward
        _coalesced(list(net.buffers()), lambda flat: dist.broadcast(flat, src=0))
    if buffers is not None:
        buffers.take()
    n = labels.numel()
    loss_sum = torch.zeros((), dtype=torch.float64, device=labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    failed = False
    loss = logits = None
    try:
        if _injected(accelerator.process_index, step):
            raise torch.OutOfMemoryError(f"injected out-of-memory error (RESNET_SCALE_INJECT_OOM) at step {step}")
        steps = memory.accumulation_steps
        for x, y in split_micro_batches(images, labels, steps):
            if not y.numel():
                continue
            # The unwrapped module keeps Accelerate's autocast forward, as in train_step.
            with offload if offload is not None else contextlib.nullcontext():
                loss, logits = micro_batch_loss(net, x, y, label_smoothing)
            # accelerator.backward divides by gradient_accumulation_steps, which equals ``steps``
            accelerator.backward(loss * (steps / n))
            loss_sum += loss.detach().double()
            correct += (logits.detach().argmax(1) == y).sum()
            loss = logits = None
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(err):
            raise
        failed = True
        loss = logits = None  # the failed micro-batch's graph: every activation it saved for backward
        _forget(err)
    flag = torch.tensor([float(failed)], device=accelerator.device)
    if world > 1:
        dist.all_reduce(flag)
    if flag.item() > 0:  # every rank: drop this step's gradients and statistics, free the cache
        optimizer.zero_grad(set_to_none=True)
        if buffers is not None:
            buffers.restore()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None
    params = [p for p in net.parameters() if p.requires_grad]
    if world > 1:  # the mean over ranks, as DDP's reducer computes it
        _coalesced([p.grad for p in params if p.grad is not None],
                   lambda flat: (dist.all_reduce(flat), flat.div_(world)))
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm or float("inf"))
    nonfinite = nonfinite_flag(accelerator, grad_norm)
    withheld = apply_update(accelerator, optimizer, nonfinite, buffers)
    return StepResult(loss_sum=loss_sum, correct=correct, count=n, grad_norm=grad_norm, nonfinite=nonfinite,
                      withheld=withheld)


def step_with_recovery(accelerator: Accelerator, model: nn.Module, optimizer, images: torch.Tensor,
                       labels: torch.Tensor, *, step: int, memory: MemorySettings, label_smoothing: float,
                       offload, max_grad_norm: float | None, buffers: BufferSnapshot | None,
                       events: list[dict[str, int]], say) -> tuple[StepResult, MemorySettings]:
    """``guarded_step`` until it fits: each out-of-memory error (on any rank) halves the micro-batch on
    every rank. Appends each switch to ``events``, tells ``say``; returns (result, the plan now in use)."""
    while True:
        result = guarded_step(accelerator, model, optimizer, images, labels, step=step, memory=memory,
                              label_smoothing=label_smoothing, offload=offload,
                              max_grad_norm=max_grad_norm, buffers=buffers)
        if result is not None:
            return result, memory
        smaller = next_plan(memory)
        if smaller is None:
            raise OutOfMemoryUnrecoverable(
                f"step {step} runs out of memory even with a micro-batch of {memory.micro_batch_size} image(s); "
                "lower --batch-size, add --activation-checkpointing block / --precision bf16, or use more devices.")
        memory = smaller
        accelerator.gradient_accumulation_steps = memory.accumulation_steps
        events.append({"step": step, "micro_batch_size": memory.micro_batch_size,
                       "accumulation_steps": memory.accumulation_steps})
        say(f"step {step}: out of memory on a rank; every rank redoes it with {memory.describe()}")
