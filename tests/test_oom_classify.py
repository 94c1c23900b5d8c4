"""--oom-recovery: which errors count as out of memory (cuDNN/cuBLAS report theirs as plain
RuntimeErrors), and the failed step's graph is gone by the time the allocator's cache is emptied."""

import weakref

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from resnet_scale.memory.settings import MemorySettings
from resnet_scale.train.oom import guarded_step, is_out_of_memory, next_plan

#: The texts torch and the CUDA libraries raise when memory runs out.
OOM_ERRORS = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                           "79.10 GiB of which 1.06 GiB is free."),
    RuntimeError("CUDA out of memory. Tried to allocate 512.00 MiB"),  # older torch: a plain RuntimeError
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"),
    RuntimeError("GET was unable to find an engine to execute this computation"),
    RuntimeError("FIND was unable to find an engine to execute this computation"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
]
NOT_OOM = [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 2x3)"),
    RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    ValueError("out of memory"),  # not an error torch raises for memory
]


def _memory(batch: int, *, compiled: bool = False) -> MemorySettings:
    return MemorySettings(precision="fp32", channels_last=False, checkpointing="none", checkpoint_impl="native",
                          per_device_batch=batch, micro_batch_size=batch, accumulation_steps=1,
                          offload_activations=False, compile=compiled)


def _raised_by_torch(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 -- the very object torch raised
        return err
    raise AssertionError("no error raised")


def test_out_of_memory_is_recognised_by_type_and_by_the_libraries_texts():
    assert all(is_out_of_memory(err) for err in OOM_ERRORS), [str(e) for e in OOM_ERRORS if not is_out_of_memory(e)]
    assert not any(is_out_of_memory(err) for err in NOT_OOM)
    # Real errors raised by torch itself: the CPU allocator's failure, and a shape error.
    assert is_out_of_memory(_raised_by_torch(lambda: torch.empty(2**62, dtype=torch.uint8)))
    assert not is_out_of_memory(_raised_by_torch(lambda: torch.ones(2, 3) @ torch.ones(2, 3)))

    # Any other error in a guarded step stops the run as it is (it is not retried with a smaller plan).
    AcceleratorState._reset_state(True)
    net = _Net(RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"))
    with pytest.raises(RuntimeError, match="CUDNN_STATUS_BAD_PARAM"):
        guarded_step(Accelerator(cpu=True), net, torch.optim.SGD(net.parameters(), lr=0.1), torch.randn(4, 8),
                     torch.arange(4), step=1, memory=_memory(4))
    AcceleratorState._reset_state(True)


class _FailInBackward(torch.autograd.Function):
    """Identity forward; its backward raises ``error`` (as cuDNN does when a kernel's workspace cannot
    be allocated), after the layers above it have already run their backward. The error is kept on
    the node, so the error, its traceback's frames and the node form a reference cycle, as frames
    that refer to their own exception do: only clearing those frames frees the graph without a
    garbage collection."""

    @staticmethod
    def forward(ctx, x, error):
        ctx.error = error
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ctx.error


class _Net(nn.Module):
    """Linear -> ReLU -> x scale (saves the 16 x 4096 activation for backward) -> failing layer -> Linear."""

    def __init__(self, error):
        super().__init__()
        self.error = error
        self.wide, self.head = nn.Linear(8, 4096), nn.Linear(4096, 4)
        self.scale = nn.Parameter(torch.ones(4096))
        self.alive: dict[str, weakref.ref] = {}

    def forward(self, x):
        hidden = torch.relu(self.wide(x))
        self.alive["activation"] = weakref.ref(hidden)
        logits = self.head(_FailInBackward.apply(hidden * self.scale, self.error))
        self.alive["logits"] = weakref.ref(logits)
        self.error = None  # the node holds it now
        return logits


@pytest.mark.parametrize("error", [OOM_ERRORS[0], OOM_ERRORS[3], OOM_ERRORS[6], OOM_ERRORS[8]],
                         ids=["OutOfMemoryError", "CUDNN_ALLOC", "no-engine", "CUBLAS_ALLOC"])
def test_a_failed_step_is_dropped_before_the_cache_is_emptied(error, monkeypatch):
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    net = _Net(type(error)(*error.args))  # a fresh error: its traceback is this step's
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    memory = _memory(16)
    at_empty_cache = []  # what was still alive each time the cache was emptied
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # take the GPU branch of the recovery
    monkeypatch.setattr(torch.cuda, "empty_cache",
                        lambda: at_empty_cache.append(sorted(k for k, r in net.alive.items() if r() is not None)))
    g = torch.Generator().manual_seed(0)
    result = guarded_step(accelerator, net, optimizer, torch.randn(16, 8, generator=g), torch.arange(16) % 4,
                          step=1, memory=memory)
    AcceleratorState._reset_state(True)
    assert result is None  # recognised as out of memory: the step is to be redone with a smaller plan
    assert at_empty_cache == [[]], f"alive when the cache was emptied: {at_empty_cache}"
    assert all(p.grad is None for p in net.parameters())


def test_under_compile_the_smaller_plan_keeps_every_micro_batch_the_same_size():
    m = _memory(14, compiled=True)
    sizes = []
    while m is not None:
        sizes.append((m.micro_batch_size, m.accumulation_steps))
        m = next_plan(m)
    # 14 -> 7 -> 2 (not 3: 14 images in micro-batches of 3 would end in a shorter one) -> 1
    assert sizes == [(14, 1), (7, 2), (2, 7), (1, 14)]
