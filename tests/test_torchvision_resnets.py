"""The memory transforms and measurements on torchvision's ResNets (``torchvision.models.resnet18()``,
``resnet50()``), as on ours: checkpointing trains exactly like the plain model (outputs, gradients,
BatchNorm running statistics counted once, updated weights), channels_last gives the same outputs,
and the measurement and the planner's estimate see the checkpointing. Small images (32 px)."""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import resnet18, resnet50

from resnet_scale.memory import (
    apply_activation_checkpointing,
    apply_channels_last,
    applied_checkpointing,
    measure_saved_activation_bytes,
    measure_segment_peak_bytes,
    segments,
)
from resnet_scale.planner import estimate_activation_bytes

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpointing import checkpointed_copy, train_and_compare  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
MODELS = {"resnet18": resnet18, "resnet50": resnet50}


def torchvision_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name](num_classes=10)


@pytest.mark.parametrize("name, policy, steps", [("resnet18", "block", 2), ("resnet50", "every:2", 1)])
def test_checkpointed_torchvision_resnet_trains_exactly_like_the_plain_one(name, policy, steps):
    """resnet50 with every:2 ([3, 4, 6, 3] blocks): segments of two blocks and of one, downsampling
    blocks inside them; one step (its BatchNorm statistics, gradients and updated weights) suffices."""
    ref = torchvision_model(name)
    model = checkpointed_copy(ref, policy, "native")
    assert applied_checkpointing(model)["blocks"] == sum(len(getattr(ref, f"layer{i}")) for i in range(1, 5))
    train_and_compare(ref, model, steps=steps, size=32)
    assert model.layer1[0].bn1.num_batches_tracked.item() == steps  # one count per step, not two
    assert list(model.state_dict()) == list(ref.state_dict())  # torchvision's keys, unchanged


def test_fairscale_checkpointing_of_a_torchvision_resnet():
    pytest.importorskip("fairscale")
    ref = torchvision_model("resnet18")
    train_and_compare(ref, checkpointed_copy(ref, "every:2", "fairscale"), steps=1, size=32)


def test_negative_control_plain_checkpoint_of_torchvision_blocks_counts_batchnorm_twice():
    """torch.utils.checkpoint on torchvision's stages, without the BatchNorm fix, fails the same check."""
    ref = torchvision_model("resnet18")
    naive = copy.deepcopy(ref)
    for i in range(1, 5):
        stage = getattr(naive, f"layer{i}")
        stage.forward = functools.partial(checkpoint, nn.Sequential.forward, stage, use_reentrant=False)
    with pytest.raises(AssertionError):
        train_and_compare(ref, naive, steps=1, size=32)
    assert naive.layer1[0].bn1.num_batches_tracked.item() == 2


@pytest.mark.parametrize("name", list(MODELS))
def test_channels_last_torchvision_resnet_gives_the_same_outputs(name):
    ref = torchvision_model(name)
    model = apply_channels_last(copy.deepcopy(ref))
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in model.modules()
               if isinstance(m, nn.Conv2d))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref.eval(), model.eval()
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), ref(x))


def test_torchvision_segments_follow_its_stages():
    model = torchvision_model("resnet50")  # [3, 4, 6, 3] blocks
    assert segments(model, "stage") == [[f"layer{s}.{b}" for b in range(n)] for s, n in ((1, 3), (2, 4), (3, 6), (4, 3))]
    assert len(segments(model, "block")) == 16


def meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return MODELS[name](num_classes=10)


def test_measurement_sees_checkpointing_passed_or_applied():
    """On the meta device: fewer saved bytes with checkpointing, whether the policy is passed or
    already applied to the model."""
    for name in MODELS:
        model = meta_model(name)
        plain, block = (measure_saved_activation_bytes(model, 2, 32, policy=p) for p in (None, "block"))
        assert 0 < block < plain, name
    applied = apply_activation_checkpointing(meta_model("resnet18"), "stage")
    assert measure_saved_activation_bytes(applied, 2, 32) == measure_saved_activation_bytes(
        meta_model("resnet18"), 2, 32, policy="stage")


def test_planner_activation_estimate_of_a_torchvision_resnet_equals_the_measurement():
    model = meta_model("resnet18")
    none, block = (estimate_activation_bytes(model, 4, 32, policy=p) for p in ("none", "block"))
    assert none == (measure_saved_activation_bytes(model, 4, 32), 0)
    assert block == (measure_saved_activation_bytes(model, 4, 32, policy="block"),
                     measure_segment_peak_bytes(model, 4, 32, policy="block"))
    assert 0 < block[0] < none[0] and block[1] > 0


def test_measurement_on_a_real_cpu_forward_equals_the_meta_one():
    model = torchvision_model("resnet18")
    for policy in (None, "block"):
        assert measure_saved_activation_bytes(model, 2, 32, device="cpu", policy=policy) == \
            measure_saved_activation_bytes(model, 2, 32, policy=policy)
