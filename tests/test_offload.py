"""Activation offload (``--offload-activations``, resnet_scale/memory/offload.py) on CPU: saved
tensors keep their strides (channels_last stays channels_last), the right tensors move, and a
training step with the offload equals one without it. The CUDA side-stream copy needs a GPU and
is not run here; ``OffloadActivations("cpu")`` runs the same pack/unpack code on CPU tensors."""

from __future__ import annotations

import contextlib
import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_scale.config import Config
from resnet_scale.memory import apply_activation_checkpointing, apply_channels_last
from resnet_scale.memory.settings import activation_offload, resolve_memory
from resnet_scale.models import build_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


def channels_last(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


def offload_settings():
    cfg = Config()
    cfg.memory.offload_activations = True
    return resolve_memory(cfg, world_size=1, device_type="cuda")


def test_the_offload_context_gives_back_saved_tensors_with_their_strides():
    """The context a CUDA run gets: whatever it is handed, the backward gets the same strides.
    (torch's save_on_cpu(pin_memory=True) handed back every tensor NCHW-contiguous.)"""
    hooks = activation_offload(offload_settings(), torch.device("cuda"))
    for t in (channels_last(4, 16, 8, 8), channels_last(2, 3, 5, 5).transpose(0, 1)):
        back = hooks.unpack_hook(hooks.pack_hook(t))
        assert back.stride() == t.stride() and back.dtype == t.dtype and back.device == t.device
        assert torch.equal(back, t)
    assert activation_offload(offload_settings(), torch.device("cpu")).__class__.__name__ == "nullcontext"


def test_host_and_device_copies_keep_the_memory_format():
    """The copies themselves (CPU tensors: no pinning, no stream): new storage, same strides."""
    from resnet_scale.memory.offload import copy_to_device, copy_to_host

    for t in (channels_last(4, 16, 8, 8), channels_last(4, 16, 8, 8).to(torch.bfloat16),
              torch.randn(6, 5).t(), torch.randn(3, 4, 5).permute(2, 0, 1)):
        host, done = copy_to_host(t)
        assert done is None and host.stride() == t.stride() and torch.equal(host, t)
        assert host.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        back = copy_to_device(host, t.device, done)
        assert back.stride() == t.stride() and torch.equal(back, t)
        assert back.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()
    assert channels_last(4, 16, 8, 8).stride() == (1024, 1, 128, 16)  # really not NCHW


def test_what_moves_and_what_stays():
    from resnet_scale.memory.offload import OffloadActivations

    hooks = OffloadActivations("cpu", min_bytes=1024)
    conv = nn.Conv2d(16, 16, 3)
    big = channels_last(4, 16, 8, 8)  # 16 KiB
    assert hooks.moves(big) and hooks.moves(big.to(torch.bfloat16))
    assert not hooks.moves(torch.randn(16))  # 64 bytes: BatchNorm-statistics size
    assert not hooks.moves(conv.weight) and not hooks.moves(conv.weight.transpose(0, 1))  # a parameter, a view of one
    assert not hooks.moves(torch.randn(4, 16, 1, 1).expand(4, 16, 8, 8))  # not dense: a copy would grow
    assert not OffloadActivations("cuda", min_bytes=0).moves(big)  # only tensors of its device type
    assert OffloadActivations("cpu").min_bytes == 64 * 1024
    packed = hooks.pack_hook(big)
    assert isinstance(packed, tuple) and packed[1].stride() == big.stride()
    assert (hooks.offloaded, hooks.offloaded_bytes) == (1, big.numel() * 4)
    # A kept saved output must not keep its graph alive when that graph is dropped unused.
    x = torch.randn(4, 16, 4, 4, requires_grad=True)
    with OffloadActivations("cuda"):
        y = x.exp()  # exp saves its output
    gone = weakref.ref(y)
    del y
    assert gone() is None


def train(model: nn.Module, hooks, steps: int = 2):
    """SGD steps on a fixed batch stream; returns per-step outputs, grads and buffers."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    record = []
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (4,), generator=gen)
        opt.zero_grad()
        with hooks:
            out = model(x)
        F.cross_entropy(out, y).backward()
        record.append((out.detach(), [(p.grad.clone(), p.grad.stride()) for p in model.parameters()],
                       [b.clone() for b in model.buffers()]))
        opt.step()
    return record


@pytest.mark.parametrize("checkpointing", ["none", "block"])
def test_offloaded_training_equals_plain_on_a_channels_last_model(checkpointing):
    """Outputs, gradients (values and strides) and BatchNorm statistics equal with and without
    the offload; every moved tensor comes back with the strides it was saved with."""
    from resnet_scale.memory.offload import OffloadActivations

    torch.manual_seed(0)
    ref = apply_channels_last(build_resnet("basic", None, layers=(1, 1, 1)))
    if checkpointing != "none":
        apply_activation_checkpointing(ref, checkpointing)
    other = copy.deepcopy(ref)
    pairs, saved = [], {}

    class Recording(OffloadActivations):
        def pack(self, t):
            packed = super().pack(t)
            if isinstance(packed, tuple):
                saved[id(packed[1])] = t.stride()
            return packed

        def unpack(self, packed):
            back = super().unpack(packed)
            if isinstance(packed, tuple):
                pairs.append((saved[id(packed[1])], back.stride()))
            return back

    hooks = Recording("cpu", min_bytes=1024)
    plain, offloaded = train(ref, contextlib.nullcontext()), train(other, hooks)
    assert hooks.offloaded >= 8 and len(pairs) == hooks.offloaded, "the offload moved (almost) nothing"
    assert all(before == after for before, after in pairs)
    assert any(len(before) == 4 and before[1] == 1 for before, _ in pairs)  # channels_last ones among them
    for (out_a, grads_a, bufs_a), (out_b, grads_b, bufs_b) in zip(plain, offloaded, strict=True):
        torch.testing.assert_close(out_b, out_a, atol=0, rtol=0)
        for (ga, sa), (gb, sb) in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(gb, ga, atol=0, rtol=0)
            assert sa == sb
        for a, b in zip(bufs_a, bufs_b, strict=True):
            torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_the_planner_moves_the_activations_off_a_gpu_only():
    """On a CPU run --offload-activations changes nothing, and the planner says so (it counted
    the activations as gone from a CPU device too)."""
    from resnet_scale.planner import estimate_memory

    def estimate(device_type, offload):
        cfg = Config()
        cfg.model.block, cfg.model.layers, cfg.data.source, cfg.data.image_size = "basic", (1, 1, 1), "synthetic", 8
        cfg.train.batch_size, cfg.memory.offload_activations = 8, offload
        return estimate_memory(cfg.validate(), device_type=device_type)

    plain = estimate("cpu", False)
    assert plain.activations > 0
    assert estimate("cpu", True).activations == plain.activations
    assert estimate("cuda", True).activations == 0 and estimate("cuda", False).activations == plain.activations
