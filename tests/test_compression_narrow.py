"""Activation compression stores integer saved tensors (max-pool's indices) exactly in the narrowest
signed integer dtype that holds them: gradients bit-identical, fewer bytes, on the meta device too."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from resnet_scale.memory import measure_saved_activation_bytes
from resnet_scale.memory.compression import CompressSaved, apply_activation_compression
from resnet_scale.models import build_resnet

pytestmark = pytest.mark.usefixtures("one_thread")

SIGNED = (torch.int8, torch.int16, torch.int32, torch.int64)  # not uint8: packed codes and masks


@pytest.mark.parametrize("size, narrow", [(8, torch.int8), (16, torch.int16), (24, torch.int16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_gradients_bit_identical_with_narrow_indices(size, narrow, channels_last):
    torch.manual_seed(0)
    leaf = torch.randn(4, 8, size, size, requires_grad=True)
    g = torch.randn(4, 8, (size + 1) // 2, (size + 1) // 2)

    def forward():
        x = leaf * 1.0  # not a leaf: compressed like an activation
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.max_pool2d(x, 3, 2, 1)

    forward().backward(g)
    expected, leaf.grad = leaf.grad.clone(), None
    stored = []
    hooks = CompressSaved(2, min_numel=0, observer=stored.append)
    with hooks:
        y = forward()
    ints = [t for t in stored if t.dtype in SIGNED]
    assert [t.dtype for t in ints] == [narrow]  # the int64 indices, narrowed
    assert ints[0].shape == y.shape and ints[0].stride() == y.stride()
    y.backward(g)
    assert torch.equal(leaf.grad, expected)


def test_unpack_restores_dtype_strides_and_values():
    hooks = CompressSaved(4, min_numel=0)
    for t in (torch.arange(-100, 100).view(10, 20).t(),  # int8 range, transposed
              torch.randint(-2**20, 2**20, (4, 6, 5, 5)).contiguous(memory_format=torch.channels_last),
              torch.randint(0, 30000, (64,), dtype=torch.int32)):
        back = hooks.unpack(hooks.pack(t))
        assert back.dtype == t.dtype and back.stride() == t.stride() and torch.equal(back, t)
    wide = torch.tensor([0, 2**40] * 100)
    assert hooks.pack(wide).dtype == torch.int64  # needs int64: kept as it is
    assert CompressSaved(4).pack(torch.arange(100)).dtype == torch.int64  # under min_numel: kept


def test_the_meter_counts_narrow_indices_meta_equals_cpu():
    """A ResNet with the ImageNet stem at 32 px, batch 4: max-pool's indices (4 x 64 x 8 x 8, values
    < 16 x 16) are stored as int16, 6 bytes per element fewer than int64 (what the meter counted
    before), on the meta device as on a real CPU forward."""
    torch.manual_seed(0)
    base = build_resnet("basic", None, layers=(1, 1, 1, 1), stem="imagenet", num_classes=10)
    model = apply_activation_compression(copy.deepcopy(base), "int4")
    meta = measure_saved_activation_bytes(model, 4, 32)
    assert meta == measure_saved_activation_bytes(model, 4, 32, device="cpu")
    stored = []
    model.__dict__["_rs_activation_compression"]["observer"] = stored.append
    model.train()
    model(torch.randn(4, 3, 32, 32))
    ints = [t for t in stored if t.dtype in SIGNED]
    assert [(t.dtype, t.numel()) for t in ints] == [(torch.int16, 4 * 64 * 8 * 8)]
