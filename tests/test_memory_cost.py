"""Cost of the memory features: saved-activation bytes (meta vs real CPU, checkpointing, bf16),
the reference figures per image, recompute FLOPs, channels_last. With the equivalence tests
(tests/test_checkpointing.py) they prove each memory feature on CPU."""

from __future__ import annotations

import copy
import importlib.util
import logging

import pytest
import torch
from torch import nn

from resnet_scale.memory import (
    apply_activation_checkpointing,
    apply_channels_last,
    count_step_flops,
    measure_saved_activation_bytes,
    measure_segment_peak_bytes,
)
from resnet_scale.models import build_resnet

MiB = 2**20


pytestmark = pytest.mark.usefixtures("one_thread")


def meta_model(block: str, depth: int | None, stem: str = "imagenet", **kw) -> nn.Module:
    classes = 1000 if stem == "imagenet" else 10
    with torch.device("meta"):
        return build_resnet(block, depth, stem=stem, num_classes=classes, **kw)


def per_image(model: nn.Module, image_size: int, **kw) -> float:
    """MiB per image: the slope between batch 1 and 2 (drops batch-independent bytes)."""
    one = measure_saved_activation_bytes(model, 1, image_size, **kw)
    two = measure_saved_activation_bytes(model, 2, image_size, **kw)
    return (two - one) / MiB


# ----------------------------------------------------------------------------- meta == CPU

SMALL = {
    "plain": dict(block="plain", depth=None, layers=(2, 1, 1)),
    "basic": dict(block="basic", depth=None, layers=(2, 1, 1)),
    "bottleneck": dict(block="bottleneck", depth=11),
    "basic18-imagenet": dict(block="basic", depth=18, stem="imagenet"),
}


def small(name: str) -> nn.Module:
    torch.manual_seed(0)
    kw = dict(SMALL[name])
    return build_resnet(kw.pop("block"), kw.pop("depth"), **kw)


@pytest.mark.parametrize("policy", ["none", "block", "stage"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SMALL))
def test_meta_equals_real_cpu_forward(name, dtype, policy):
    model = small(name)
    size = 32 if name == "basic18-imagenet" else 16
    kw = dict(dtype=dtype, policy=policy)
    meta = measure_saved_activation_bytes(model, 4, size, device="meta", **kw)
    cpu = measure_saved_activation_bytes(model, 4, size, device="cpu", **kw)
    assert meta == cpu > 0


@pytest.mark.parametrize(
    "kw",
    [
        dict(dtype=torch.float16),
        dict(channels_last=True),
        dict(channels_last=True, dtype=torch.bfloat16),
    ],
)
def test_meta_equals_cpu_fp16_and_channels_last(kw):
    model = small("basic")
    assert measure_saved_activation_bytes(model, 4, 16, **kw) == measure_saved_activation_bytes(
        model, 4, 16, device="cpu", **kw
    )


@pytest.mark.parametrize("impl", ["native", pytest.param("fairscale", marks=pytest.mark.skipif(
    importlib.util.find_spec("fairscale") is None, reason="fairscale is not installed"))])
def test_meta_equals_cpu_for_a_checkpointed_model(impl):
    model = apply_activation_checkpointing(small("basic"), "every:2", impl=impl)
    meta = measure_saved_activation_bytes(model, 4, 16)
    assert meta == measure_saved_activation_bytes(model, 4, 16, device="cpu")
    assert meta == measure_saved_activation_bytes(small("basic"), 4, 16, policy="every:2")


def test_storage_dedupe_matches_an_independent_data_ptr_count():
    """On a real CPU forward, count distinct data pointers of saved non-parameter storages by
    hand: the meta figure must equal it (each storage once, parameters and their views out)."""
    model = small("basic").train()
    param_ptrs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            storages[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randn(4, 3, 16, 16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    assert measure_saved_activation_bytes(model, 4, 16) == sum(storages.values())


def test_caller_model_untouched():
    model = small("basic")
    before = copy.deepcopy(model.state_dict())
    model.eval()
    measure_saved_activation_bytes(model, 2, 16, policy="block", dtype=torch.bfloat16)
    measure_segment_peak_bytes(model, 2, 16, policy="block")
    count_step_flops(model, 2, 16, policy="block")
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert getattr(model, "_rs_activation_checkpointing", None) is None


# ----------------------------------------------------------------------------- cost


def test_reference_figures_per_image():
    """Saved activations per image (MiB) measured without a GPU, as quoted in
    resnet_scale/memory/measure.py: within 1%."""
    r50 = meta_model("bottleneck", 50)
    expected = [
        (r50, 224, {}, 82.0),
        (r50, 224, dict(dtype=torch.bfloat16), 41.8),
        (meta_model("basic", 18), 224, {}, 21.2),
        (meta_model("bottleneck", 152), 224, {}, 169.5),
        (meta_model("basic", 18, stem="cifar"), 32, {}, 4.48),
        (r50, 224, dict(policy="stage"), 14.4),
        (r50, 224, dict(policy="block"), 29.7),
    ]
    for model, size, kw, mib in expected:
        assert per_image(model, size, **kw) == pytest.approx(mib, rel=0.01), (size, kw, mib)


def test_checkpointing_and_bf16_cut_resnet50_activations():
    r50 = meta_model("bottleneck", 50)
    none = measure_saved_activation_bytes(r50, 2, 224)
    stage = measure_saved_activation_bytes(r50, 2, 224, policy="stage")
    block = measure_saved_activation_bytes(r50, 2, 224, policy="block")
    bf16 = measure_saved_activation_bytes(r50, 2, 224, dtype=torch.bfloat16)
    assert stage <= 0.20 * none
    assert block <= 0.40 * none
    assert 0.45 <= bf16 / none <= 0.56
    # The price: one segment recomputed at a time, largest for the coarsest policy.
    peak_stage = measure_segment_peak_bytes(r50, 2, 224, policy="stage")
    peak_block = measure_segment_peak_bytes(r50, 2, 224, policy="block")
    assert 0 < peak_block < peak_stage < none
    assert measure_segment_peak_bytes(r50, 2, 224) == 0  # nothing applied, no policy given


def test_sqrt_checkpointing_resnet152():
    r152 = meta_model("bottleneck", 152)
    none = measure_saved_activation_bytes(r152, 1, 224)
    assert measure_saved_activation_bytes(r152, 1, 224, policy="sqrt") <= 0.15 * none


def test_segment_peak_reads_the_applied_policy():
    model = small("basic")
    expected = measure_segment_peak_bytes(model, 4, 16, policy="stage")
    apply_activation_checkpointing(model, "stage")
    assert measure_segment_peak_bytes(model, 4, 16) == expected > 0


def test_recompute_costs_one_forward_of_the_checkpointed_blocks():
    torch.manual_seed(0)
    model = build_resnet("basic", None, layers=(2, 2, 2))
    plain = count_step_flops(model, 2, 16, device="cpu")
    ckpt = count_step_flops(model, 2, 16, device="cpu", policy="block")
    assert ckpt["forward"] == plain["forward"] > 0
    assert ckpt["backward"] > plain["backward"]
    # The extra backward FLOPs are exactly the blocks' forward: everything but the stem conv
    # (3 -> 16 channels, 3x3, at 16 px) and the fc (64 -> 10); 2 FLOPs per multiply-add.
    stem = 2 * 2 * 16 * 16 * 16 * 3 * 9
    fc = 2 * 2 * 64 * 10
    assert ckpt["backward"] - plain["backward"] == plain["forward"] - stem - fc
    assert count_step_flops(model, 2, 16, policy="block") == ckpt  # meta agrees


# ----------------------------------------------------------------------------- layout


def test_apply_channels_last(caplog):
    model = small("bottleneck")
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    before = model(x)
    with caplog.at_level(logging.INFO, logger="resnet_scale"):
        assert apply_channels_last(model) is model
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(w.stride()[1] == 1 for w in convs if w.shape[1] > 1)  # C is the fastest dim
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), before)
    lines = [r.getMessage() for r in caplog.records if r.name == "resnet_scale"]
    assert len(lines) == 1 and "channels_last" in lines[0]
