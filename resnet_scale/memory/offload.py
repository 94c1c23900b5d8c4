"""Activation offload (``--offload-activations``): the tensors autograd saves for the backward pass
are kept in host memory between the forward and the backward pass.

``OffloadActivations`` is a ``torch.autograd.graph.saved_tensors_hooks`` context, used like
torch's ``save_on_cpu`` but:

* **The memory format is kept.** Each host buffer is ``torch.empty_like(t, device="cpu")``, which
  keeps the strides of a dense tensor, and so is the device copy made for the backward pass: a
  channels_last activation comes back channels_last. (``save_on_cpu(pin_memory=True)`` allocates
  ``torch.empty(t.size())``, so every saved tensor came back NCHW-contiguous and the backward
  convolutions of a channels_last model ran on converted inputs.)
* **On CUDA the device-to-host copy runs on a side stream**, into pinned memory, without
  blocking: the side stream first waits for the compute stream (the tensor must be finished),
  ``record_stream`` keeps the caching allocator from reusing the tensor's memory before the copy
  has read it, and an event marks the copy's end. The copy back happens when the backward pass
  asks for the tensor, on the stream the backward runs on, after waiting for that event; the
  pinned buffer is released by torch's host allocator only once that copy is done.
* **Not everything moves.** Kept on the device, as they are: parameters and views of them (their
  memory stays allocated anyway: copying them would only cost transfers), tensors under
  ``min_bytes`` (default 64 KiB: BatchNorm's per-channel saved mean and inverse std and other
  small tensors, where the launch and event cost more than the bytes save), tensors that are not
  dense (expanded or overlapping views, which a copy would enlarge), and tensors on other devices
  than ``device_type`` -- in particular CPU tensors when offloading from CUDA.

Only ``device_type`` tensors move; in training that is the accelerator's device (on a CPU run
there is nothing to offload and :func:`resnet_scale.memory.settings.activation_offload` returns
a null context). ``OffloadActivations(device_type="cpu")`` copies CPU tensors into fresh CPU
buffers through the same code (minus streams and pinning): the tests use it to check strides and
training equivalence without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .tensors import is_dense, is_parameter

__all__ = ["MIN_OFFLOAD_BYTES", "OffloadActivations", "copy_to_device", "copy_to_host"]

#: Saved tensors smaller than this stay on the device (see the module docstring).
MIN_OFFLOAD_BYTES = 64 * 1024


def copy_to_host(t: Tensor, stream: Any = None) -> tuple[Tensor, Any]:
    """A host copy of ``t`` with the same strides, and the CUDA event that marks its end (None
    for a CPU tensor, whose copy is done on return). A CUDA tensor is copied into pinned memory
    on ``stream`` (a side stream), which first waits for the current stream."""
    host = torch.empty_like(t, device="cpu", pin_memory=t.is_cuda)
    if not t.is_cuda:
        host.copy_(t)
        return host, None
    stream.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)  # its memory is not reused until the side stream's copy is done
    done = torch.cuda.Event()
    done.record(stream)
    return host, done


def copy_to_device(host: Tensor, device: torch.device, done: Any = None) -> Tensor:
    """``host`` copied to ``device`` with the same strides; on CUDA on the current stream, after
    the event ``done`` of the copy that filled ``host``."""
    out = torch.empty_like(host, device=device)
    if done is not None:
        torch.cuda.current_stream(device).wait_event(done)
    out.copy_(host, non_blocking=done is not None)
    return out


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """``with OffloadActivations("cuda"): loss = model(x)`` keeps the forward's saved tensors in
    host memory until the backward pass needs them (module docstring). Reusable: enter it for
    every forward. ``offloaded`` / ``offloaded_bytes`` count what it has moved so far."""

    def __init__(self, device_type: str = "cuda", *, min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        self.device_type = device_type
        self.min_bytes = min_bytes
        self.offloaded = 0
        self.offloaded_bytes = 0
        self._streams: dict[torch.device, Any] = {}
        super().__init__(self.pack, self.unpack)

    def moves(self, t: Tensor) -> bool:
        """Whether :meth:`pack` copies ``t`` to the host (else it keeps ``t`` as it is)."""
        return (
            t.device.type == self.device_type
            and t.layout == torch.strided
            and t.numel() * t.element_size() >= self.min_bytes
            and not is_parameter(t)
            and is_dense(t)
        )

    def pack(self, t: Tensor) -> Any:
        if not self.moves(t):
            # An alias, not ``t`` itself: a saved *output* packed as itself would hold its own
            # grad_fn, a cycle that keeps the graph alive when it is dropped without a backward.
            return t.detach()
        stream = None
        if t.is_cuda:
            stream = self._streams.get(t.device)
            if stream is None:
                stream = self._streams[t.device] = torch.cuda.Stream(t.device)
        host, done = copy_to_host(t, stream)
        self.offloaded += 1
        self.offloaded_bytes += host.numel() * host.element_size()
        return t.device, host, done

    def unpack(self, packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        device, host, done = packed
        return copy_to_device(host, device, done)
