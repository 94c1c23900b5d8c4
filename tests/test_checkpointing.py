"""Activation checkpointing: equivalence with the plain model (outputs, gradients, BatchNorm
running statistics, updated weights), state_dict compatibility, policies and segments.

Every memory feature is proven on CPU by an equivalence test (and its cost by
tests/test_memory_cost.py); the negative control below shows the BatchNorm check can fail.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from resnet_scale.memory import (
    CHECKPOINT_POLICIES,
    apply_activation_checkpointing,
    applied_checkpointing,
    segments,
)
from resnet_scale.models import build_resnet

POLICIES = ["block", "stage", "sqrt", "every:2"]
#: fairscale is an optional alternative (pip install 'resnet-scale[fairscale]'): its cases skip without it.
HAS_FAIRSCALE = importlib.util.find_spec("fairscale") is not None
NEEDS_FAIRSCALE = pytest.mark.skipif(not HAS_FAIRSCALE, reason="fairscale is not installed")
IMPLS = ["native", pytest.param("fairscale", marks=NEEDS_FAIRSCALE)]
#: 7 blocks in stages of 4, 1, 2: block -> 7 segments, stage -> 3, sqrt (K=3) -> [3, 1], [1], [2]
#: = 4, every:2 -> [2, 2], [1], [2] = 4 -- every policy cuts the model differently.
SMALL_LAYERS = (4, 1, 2)
EXACT = dict(atol=1e-6, rtol=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(block: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_resnet(block, None, layers=SMALL_LAYERS, **kw)


def checkpointed_copy(model: nn.Module, policy: str, impl: str, **kw) -> nn.Module:
    return apply_activation_checkpointing(copy.deepcopy(model), policy, impl=impl, **kw)


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """assert_close with EXACT tolerances; bit-identical tensors (the usual case) pass at the cost of
    torch.equal, a fraction of isclose's on millions of weights."""
    if not torch.equal(actual, expected):
        torch.testing.assert_close(actual, expected, **EXACT, msg=lambda m: f"{what}: {m}")


def assert_same_state(ref: nn.Module, other: nn.Module, what: str) -> None:
    for (name, a), (_, b) in zip(ref.named_buffers(), other.named_buffers(), strict=True):
        if a.is_floating_point():
            assert_exact(b, a, f"{what}: buffer {name}")
        else:
            assert torch.equal(a, b), f"{what}: buffer {name}: {b} != {a}"


def train_and_compare(
    ref: nn.Module, other: nn.Module, steps: int = 3, size: int = 16, autocast: torch.dtype | None = None
) -> None:
    """Run the same SGD steps (momentum, weight decay) on both; after every step the outputs,
    every parameter's gradient and every buffer (BatchNorm running_mean, running_var,
    num_batches_tracked) must match, and at the end the updated weights. ``autocast``: run the
    forwards under CPU autocast in that dtype (the backward outside it, as in training)."""
    ref.train()
    other.train()
    opts = [
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for m in (ref, other)
    ]
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(4, 3, size, size, generator=gen)
        target = torch.randint(0, 10, (4,), generator=gen)
        outs = []
        for model, opt in zip((ref, other), opts):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                out = model(x)
            assert out.dtype == (autocast or torch.float32)
            F.cross_entropy(out.float(), target).backward()
            outs.append(out.detach())
        assert_exact(outs[1], outs[0], f"step {step} output")
        pairs = zip(ref.named_parameters(), other.named_parameters(), strict=True)
        for (name, a), (_, b) in pairs:
            assert_exact(b.grad, a.grad, f"step {step} grad {name}")
        assert_same_state(ref, other, f"step {step}")
        for opt in opts:
            opt.step()
    for (name, a), (_, b) in zip(ref.named_parameters(), other.named_parameters(), strict=True):
        assert_exact(b.detach(), a.detach(), f"weight {name}")


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("block", ["plain", "basic", "bottleneck"])
def test_checkpointed_training_equals_plain(block, policy, impl):
    ref = small_model(block)
    train_and_compare(ref, checkpointed_copy(ref, policy, impl))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("policy", ["block", "stage"])
def test_standard_depth18_layout_imagenet_stem(policy, impl):
    torch.manual_seed(0)
    ref = build_resnet("basic", 18, stem="imagenet", num_classes=10)  # [2, 2, 2, 2]
    train_and_compare(ref, checkpointed_copy(ref, policy, impl), steps=2)


@pytest.mark.parametrize("policy", POLICIES)
def test_batchnorm_momentum_none_cumulative_average(policy):
    """momentum=None: running stats are a cumulative average weighted by 1/num_batches_tracked;
    recompute must leave them (and the counter) exactly as after one forward."""
    ref = small_model("basic")
    for m in ref.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = None
    train_and_compare(ref, checkpointed_copy(ref, policy, "native"))
    assert all(m.momentum is None for m in ref.modules() if isinstance(m, _BatchNorm))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_bf16_autocast_checkpointed_training_equals_plain(block, impl):
    """Under bf16 autocast the checkpointed model trains exactly like the plain one. fairscale's
    own recompute ignores CPU autocast (it failed with "expected scalar type BFloat16")."""
    ref = small_model(block)
    train_and_compare(ref, checkpointed_copy(ref, "every:2", impl), steps=2, autocast=torch.bfloat16)


@pytest.mark.parametrize("forward_dtype", [torch.bfloat16, None])
@pytest.mark.parametrize("impl", IMPLS)
def test_recompute_runs_in_the_forwards_autocast_state(impl, forward_dtype):
    """The recompute re-enters the forward's autocast state, not the one around backward:
    fairscale re-enters CUDA autocast in fp16 whatever the forward's dtype was; on CPU the same
    defect shows as a recompute that follows the caller's autocast (here fp16)."""
    model = checkpointed_copy(small_model("basic"), "stage", impl)
    dtypes = []
    model.layer1[0].conv1.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=forward_dtype or torch.bfloat16, enabled=forward_dtype is not None):
        out = model(torch.randn(2, 3, 16, 16))
    with torch.autocast("cpu", dtype=torch.float16):
        out.float().square().sum().backward()
    assert dtypes == [forward_dtype or torch.float32] * 2  # the forward, then the recompute
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@NEEDS_FAIRSCALE
def test_fairscale_offload_to_cpu_equivalent():
    ref = small_model("bottleneck")
    train_and_compare(ref, checkpointed_copy(ref, "every:2", "fairscale", offload_to_cpu=True), 2)


def test_negative_control_plain_checkpoint_updates_batchnorm_twice():
    """torch.utils.checkpoint without the BatchNorm fix (pytorch/pytorch#96136) must fail the
    running-statistics check: proof that the equivalence test can fail."""
    ref = small_model("basic")
    naive = copy.deepcopy(ref)
    for name in naive.stage_names:
        stage = getattr(naive, name)
        stage.forward = functools.partial(
            checkpoint, nn.Sequential.forward, stage, use_reentrant=False
        )
    with pytest.raises(AssertionError):
        train_and_compare(ref, naive, steps=1)
    # ... because each block's BatchNorms counted the batch twice:
    assert naive.layer1[0].bn1.num_batches_tracked.item() == 2
    assert ref.layer1[0].bn1.num_batches_tracked.item() == 1
    assert not torch.allclose(naive.layer1[0].bn1.running_mean, ref.layer1[0].bn1.running_mean)


# ----------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("policy", POLICIES)
def test_state_dict_keys_and_tensors_unchanged(policy, impl):
    ref = small_model("bottleneck")
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    model = apply_activation_checkpointing(ref, policy, impl=impl)
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    plain_names = [n for n, _ in small_model("bottleneck").named_modules()]
    assert [n for n, _ in model.named_modules()] == plain_names


@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_loads_strictly_both_ways(impl):
    plain = small_model("basic", seed=1)
    ckpt = apply_activation_checkpointing(small_model("basic", seed=2), "every:2", impl=impl)
    x = torch.randn(4, 3, 16, 16)
    ckpt(x).sum().backward()  # a training step changes the running statistics
    fresh_plain = small_model("basic", seed=3)
    fresh_plain.load_state_dict(ckpt.state_dict(), strict=True)
    assert_same_state(ckpt, fresh_plain, "checkpointed -> plain")
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    assert_same_state(plain, ckpt, "plain -> checkpointed")
    ckpt.eval(), plain.eval()
    torch.testing.assert_close(ckpt(x), plain(x), **EXACT)
    ckpt.train(), plain.train()
    torch.testing.assert_close(ckpt(x), plain(x), **EXACT)  # checkpointed forward


def test_deepcopy_of_checkpointed_model_is_self_contained():
    """A copy (e.g. an EMA model) must run its own weights, not the original's."""
    for impl in ["native", "fairscale"] if HAS_FAIRSCALE else ["native"]:
        model = apply_activation_checkpointing(small_model("basic"), "every:2", impl=impl)
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(0.5)
        plain = small_model("basic")
        plain.load_state_dict(twin.state_dict())
        x = torch.randn(4, 3, 16, 16)
        torch.testing.assert_close(twin(x), plain(x), **EXACT, msg=impl)
        assert applied_checkpointing(twin)["impl"] == impl


# ----------------------------------------------------------------------------- eval / no_grad


@pytest.mark.parametrize("impl", IMPLS)
def test_eval_and_no_grad_run_the_plain_forward(impl):
    ref = small_model("bottleneck")
    model = checkpointed_copy(ref, "block", impl)
    x = torch.randn(4, 3, 16, 16)
    ref.eval(), model.eval()
    torch.testing.assert_close(model(x), ref(x), **EXACT)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), **EXACT)
    ref.train(), model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), **EXACT)
    if impl == "native":  # a no-grad training forward updates BN statistics as usual
        assert_same_state(ref, model, "no_grad train forward")


@NEEDS_FAIRSCALE
def test_fairscale_no_grad_training_forward_skips_running_stats():
    """The documented caveat of fairscale's BatchNorm patch (module docstring)."""
    ref = small_model("basic")
    model = checkpointed_copy(ref, "stage", "fairscale")
    with torch.no_grad():
        ref(torch.randn(4, 3, 16, 16)), model(torch.randn(4, 3, 16, 16))
    assert ref.layer1[0].bn1.num_batches_tracked.item() == 1
    assert model.layer1[0].bn1.num_batches_tracked.item() == 0


def test_checkpointed_forward_stores_less():
    """The checkpointed training forward really keeps fewer saved tensors (cost details in
    tests/test_memory_cost.py)."""
    from resnet_scale.memory import measure_saved_activation_bytes

    ref = small_model("basic")
    model = checkpointed_copy(ref, "stage", "native")
    assert measure_saved_activation_bytes(model, 2, 16) < measure_saved_activation_bytes(ref, 2, 16)


# ----------------------------------------------------------------------------- policies


@pytest.mark.parametrize(
    "bad", ["", "blocks", "every:0", "every:", "every:x", "every:-1", "sqrt2", "Stage", None, 3]
)
def test_invalid_policy_names_the_valid_ones(bad):
    with pytest.raises(ValueError) as err:
        apply_activation_checkpointing(small_model("basic"), bad)
    msg = str(err.value)
    assert "(--activation-checkpointing)" in msg
    for name in ("none", "block", "stage", "sqrt", "every:K"):
        assert name in msg
    with pytest.raises(ValueError):
        segments(small_model("basic"), bad)


def test_bad_impl_offload_and_twice():
    with pytest.raises(ValueError, match="native, fairscale"):
        apply_activation_checkpointing(small_model("basic"), "block", impl="torch")
    with pytest.raises(ValueError, match="fairscale"):
        apply_activation_checkpointing(small_model("basic"), "block", offload_to_cpu=True)
    with pytest.raises(ValueError, match="stage_names"):
        apply_activation_checkpointing(nn.Sequential(nn.Linear(2, 2)), "block")
    model = apply_activation_checkpointing(small_model("basic"), "none")
    assert applied_checkpointing(model) is None  # none marks nothing...
    apply_activation_checkpointing(model, "stage")  # ...so a real policy may follow
    with pytest.raises(RuntimeError, match="already applied.*policy=stage"):
        apply_activation_checkpointing(model, "block")


def test_fairscale_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "fairscale.nn.checkpoint", None)
    with pytest.raises(ImportError, match=r"pip install 'resnet-scale\[fairscale\]'"):
        apply_activation_checkpointing(small_model("basic"), "block", impl="fairscale")


def test_segments():
    with torch.device("meta"):
        sixteen = build_resnet("basic", None, layers=(4, 4, 4, 4))
        r50 = build_resnet("bottleneck", 50, stem="imagenet")
        r152 = build_resnet("bottleneck", 152, stem="imagenet")
    assert [len(s) for s in segments(sixteen, "sqrt")] == [4, 4, 4, 4]
    assert segments(sixteen, "sqrt")[1] == ["layer2.0", "layer2.1", "layer2.2", "layer2.3"]
    assert len(segments(sixteen, "block")) == 16
    assert segments(sixteen, "stage")[0] == ["layer1.0", "layer1.1", "layer1.2", "layer1.3"]
    assert [len(s) for s in segments(sixteen, "every:3")] == [3, 1] * 4
    assert segments(sixteen, "none") == []
    # Segments stay within a stage: ResNet-50 [3, 4, 6, 3], K = ceil(sqrt(16)) = 4.
    assert [len(s) for s in segments(r50, "sqrt")] == [3, 4, 4, 2, 3]
    # ResNet-152 [3, 8, 36, 3], K = ceil(sqrt(50)) = 8.
    assert [len(s) for s in segments(r152, "sqrt")] == [3, 8] + [8, 8, 8, 8, 4] + [3]
    assert [len(s) for s in segments(small_model("basic"), "every:2")] == [2, 2, 1, 2]
    assert set(CHECKPOINT_POLICIES) == {"none", "block", "stage", "sqrt", "every:K"}


def test_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="resnet_scale"):
        apply_activation_checkpointing(small_model("basic"), "stage")
    lines = [r.getMessage() for r in caplog.records if r.name == "resnet_scale"]
    expected = "activation checkpointing: policy=stage, 3 segments over 7 blocks, impl=native"
    assert lines == [expected]


# ----------------------------------------------------------------------------- torch.compile


def test_torch_compile_of_checkpointed_model():
    """backend="aot_eager": AOTAutograd functionalizes BN's buffer updates, so the compiled
    checkpointed model matches the eager plain one (outputs, grads, running stats). (Dynamo's
    backend="eager" cannot run a checkpointed BatchNorm in torch 2.14 -- a torch limitation.)"""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this platform")
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = build_resnet("basic", None, layers=(2, 1, 1))
    model = checkpointed_copy(ref, "every:2", "native")
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 3, 16, 16)
    out_ref, out = ref(x), compiled(x)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=lambda m: name + m)
    for (name, a), (_, b) in zip(ref.named_buffers(), model.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
    torch._dynamo.reset()
