"""Tests for resnet_scale.models: torchvision equivalence, every block x depth, shortcuts
checked by behaviour, the depth table, weighted-layer and parameter counts, zero-init."""

from __future__ import annotations

import ast
import copy
import pathlib

import pytest
import torch
import torchvision
from torch import nn

import resnet_scale.models as models
from resnet_scale.models import (
    BasicBlock,
    Bottleneck,
    PlainBlock,
    ResNet,
    build_resnet,
    count_parameters,
    count_weighted_layers,
    describe,
    resolve_layers,
    zoo_table,
)

BLOCK_NAMES = ("plain", "basic", "bottleneck")
STANDARD_DEPTHS = (18, 34, 50, 101, 152)
CIFAR_DEPTH = {"plain": 20, "basic": 8, "bottleneck": 11}  # one 6n+2 / 9n+2 case per block
TV_BLOCK = {18: "basic", 34: "basic", 50: "bottleneck", 101: "bottleneck", 152: "bottleneck"}


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Give every BN non-trivial weights and running statistics (and perturb the rest) so a
    mismatched state_dict could not hide behind the identity-like default init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def _last_bn(block: nn.Module) -> nn.BatchNorm2d:
    return block.bn3 if hasattr(block, "bn3") else block.bn2


def _kill_branch(block: nn.Module) -> nn.Module:
    """Copy of ``block`` in eval mode whose conv path outputs exactly zero (last BN 0/0)."""
    block = copy.deepcopy(block).eval()
    with torch.no_grad():
        _last_bn(block).weight.zero_()
        _last_bn(block).bias.zero_()
    return block


# --- torchvision equivalence (ImageNet stem) -------------------------------------------------


@pytest.mark.parametrize("depth", STANDARD_DEPTHS)
def test_imagenet_stem_state_dict_matches_torchvision_both_ways(depth):
    torch.manual_seed(depth)
    block = TV_BLOCK[depth]
    tv_fn = getattr(torchvision.models, f"resnet{depth}")
    x = torch.randn(2, 3, 64, 64)

    # torchvision -> ours
    tv = _randomize(tv_fn(weights=None), seed=1).eval()
    ours = build_resnet(block, depth, stem="imagenet", num_classes=1000).eval()
    tv_sd, ours_sd = tv.state_dict(), ours.state_dict()
    assert list(ours_sd) == list(tv_sd)
    assert all(ours_sd[k].shape == tv_sd[k].shape for k in tv_sd)
    ours.load_state_dict(tv_sd, strict=True)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))

    # ours -> torchvision
    ours = _randomize(build_resnet(block, depth, stem="imagenet", num_classes=1000), 2).eval()
    tv = tv_fn(weights=None).eval()
    tv.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(tv(x), ours(x))


def test_parameter_counts_match_torchvision():
    basic18 = build_resnet("basic", 18, stem="imagenet", num_classes=1000)
    bottleneck50 = build_resnet("bottleneck", 50, stem="imagenet", num_classes=1000)
    assert count_parameters(basic18) == count_parameters(torchvision.models.resnet18()) == 11_689_512
    assert count_parameters(bottleneck50) == count_parameters(torchvision.models.resnet50()) == 25_557_032


# --- every block x depth trains -------------------------------------------------------------


@pytest.mark.parametrize(
    "block,depth",
    [(b, d) for b in BLOCK_NAMES for d in (*STANDARD_DEPTHS, CIFAR_DEPTH[b])],
)
def test_forward_backward_cifar_stem(block, depth):
    # 8 px: the wiring under test (every block reached, every parameter given a gradient) does not
    # depend on the image side, and 8 px still passes every stride-2 stage (8 -> 4 -> 2 -> 1) at a
    # sixteenth of 32 px's cost. 32 px CIFAR runs are trained end to end elsewhere.
    torch.manual_seed(0)
    model = build_resnet(block, depth, stem="cifar", num_classes=10)
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_imagenet_stem_forward_and_stems():
    cifar = build_resnet("basic", 20, stem="cifar")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    imagenet = build_resnet("basic", 20, stem="imagenet")
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    assert imagenet(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_cifar_family_has_three_stages_and_right_widths():
    model = build_resnet("bottleneck", 20)  # 9n+2, n = 2
    assert model.stage_names == ("layer1", "layer2", "layer3")
    assert not hasattr(model, "layer4")
    assert not any(k.startswith("layer4") for k in model.state_dict())
    assert [len(getattr(model, n)) for n in model.stage_names] == [2, 2, 2]
    assert model.conv1.out_channels == 16
    assert [getattr(model, n)[-1].bn3.num_features for n in model.stage_names] == [64, 128, 256]
    assert model.fc.in_features == 256


# --- shortcuts, checked by behaviour ----------------------------------------------------------


@pytest.mark.parametrize("cls,inplanes,planes", [(PlainBlock, 8, 8), (BasicBlock, 8, 8), (Bottleneck, 16, 4)])
def test_identity_shortcut_by_behaviour(cls, inplanes, planes):
    torch.manual_seed(0)
    block = _kill_branch(cls(inplanes, planes))
    x1, x2 = torch.randn(2, inplanes, 6, 6), torch.randn(2, inplanes, 6, 6)
    with torch.no_grad():
        y1, y2 = block(x1), block(x2)
    if cls is PlainBlock:
        # Nothing carries x past the dead conv path: the output is a constant (0).
        assert torch.equal(y1, y2) and not y1.any()
    else:
        assert torch.equal(y1, torch.relu(x1)) and torch.equal(y2, torch.relu(x2))


@pytest.mark.parametrize("cls,inplanes,planes", [(PlainBlock, 8, 8), (BasicBlock, 8, 8), (Bottleneck, 16, 4)])
def test_shortcut_gradient_by_behaviour(cls, inplanes, planes):
    torch.manual_seed(0)
    block = _kill_branch(cls(inplanes, planes))
    x = torch.randn(2, inplanes, 6, 6, requires_grad=True)
    block(x).sum().backward()
    if cls is PlainBlock:
        assert not x.grad.any()
    else:
        assert torch.equal(x.grad, (x > 0).float())  # d relu(x)/dx


@pytest.mark.parametrize("block,depth", [("plain", 8), ("basic", 8), ("bottleneck", 11), ("plain", 18), ("basic", 18)])
def test_builder_wires_shortcuts_in_every_block(block, depth):
    """Walk the built model; kill each block's conv path in turn (including the stage-change
    blocks): a residual block's output still depends on its input, a plain block's does not."""
    torch.manual_seed(0)
    model = build_resnet(block, depth).eval()
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(torch.randn(2, 3, 16, 16)))))
        n_blocks = 0
        for name in model.stage_names:
            for b in getattr(model, name):
                dead = _kill_branch(b)
                y1, y2 = dead(x), dead(x + torch.randn_like(x))
                if block == "plain":
                    assert torch.equal(y1, y2) and not y1.any()
                else:
                    assert not torch.equal(y1, y2)
                x = b(x)
                n_blocks += 1
    assert n_blocks == sum(resolve_layers(block, depth)[0])


def test_plain_block_has_no_projection_but_changes_width():
    model = build_resnet("plain", 18, stem="imagenet")
    first = model.layer2[0]
    assert first.stride == 2 and first.conv1.stride == (2, 2)
    assert first.conv1.in_channels == 64 and first.conv1.out_channels == 128
    assert not any("downsample" in k for k in model.state_dict())


# --- depth table ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block,depth,layers,widths",
    [
        ("basic", 18, (2, 2, 2, 2), (64, 128, 256, 512)),
        ("bottleneck", 18, (2, 2, 2, 2), (64, 128, 256, 512)),
        ("basic", 50, (3, 4, 6, 3), (64, 128, 256, 512)),  # standard wins over 6*8+2
        ("basic", 152, (3, 8, 36, 3), (64, 128, 256, 512)),  # standard wins over 6*25+2
        ("bottleneck", 101, (3, 4, 23, 3), (64, 128, 256, 512)),  # standard wins over 9*11+2
        ("plain", 20, (3, 3, 3), (16, 32, 64)),
        ("basic", 110, (18, 18, 18), (16, 32, 64)),
        ("basic", 1202, (200, 200, 200), (16, 32, 64)),
        ("bottleneck", 20, (2, 2, 2), (16, 32, 64)),
        ("bottleneck", 164, (18, 18, 18), (16, 32, 64)),
    ],
)
def test_resolve_layers(block, depth, layers, widths):
    assert resolve_layers(block, depth) == (layers, widths)


def test_explicit_layers_override_depth():
    assert resolve_layers("basic", 50, (8, 8, 8)) == ((8, 8, 8), (16, 32, 64))
    assert resolve_layers("bottleneck", None, (1, 2, 3, 4)) == ((1, 2, 3, 4), (64, 128, 256, 512))
    assert resolve_layers("basic", None, [2, 2, 2]) == ((2, 2, 2), (16, 32, 64))
    model = build_resnet("basic", None, layers=(1, 1, 1, 1))
    assert model.stage_names == ("layer1", "layer2", "layer3", "layer4")


@pytest.mark.parametrize(
    "block,layers,expected",
    [
        ("basic", (2, 2, 2, 2), 18),
        ("plain", (2, 2, 2, 2), 18),
        ("basic", (3, 4, 6, 3), 34),
        ("bottleneck", (3, 4, 6, 3), 50),
        ("bottleneck", (3, 4, 23, 3), 101),
        ("bottleneck", (3, 8, 36, 3), 152),
        ("basic", (3, 3, 3), 20),
        ("basic", (18, 18, 18), 110),
        ("bottleneck", (18, 18, 18), 164),
        ("bottleneck", (2, 2, 2, 2), 26),
    ],
)
def test_count_weighted_layers(block, layers, expected):
    assert count_weighted_layers(block, layers) == expected


@pytest.mark.parametrize("n", [1, 2, 5, 18])
def test_cifar_depths_round_trip_through_weighted_layer_count(n):
    for block, per in (("basic", 6), ("plain", 6), ("bottleneck", 9)):
        depth = per * n + 2
        if depth in models.STANDARD_LAYOUTS:
            continue
        assert count_weighted_layers(block, resolve_layers(block, depth)[0]) == depth


# --- errors name the choices --------------------------------------------------------------------


@pytest.mark.parametrize("block,depth", [("basic", 19), ("plain", 7), ("basic", 0), ("basic", -4), ("basic", 2)])
def test_invalid_depth_plain_basic_lists_choices(block, depth):
    with pytest.raises(ValueError) as e:
        build_resnet(block, depth)
    msg = str(e.value)
    for text in (f"--depth {depth}", f"--block {block}", "18, 34, 50, 101, 152", "6n+2", "8, 14, 20", "--layers"):
        assert text in msg


@pytest.mark.parametrize("depth", [21, 26, 10])
def test_invalid_depth_bottleneck_lists_choices(depth):
    with pytest.raises(ValueError) as e:
        resolve_layers("bottleneck", depth)
    msg = str(e.value)
    for text in ("18, 34, 50, 101, 152", "9n+2", "11, 20, 29", "--layers"):
        assert text in msg
    assert "6n+2" not in msg


def test_missing_depth_and_layers():
    with pytest.raises(ValueError, match="--depth or --layers"):
        resolve_layers("basic", None)


def test_unknown_block_lists_choices():
    for call in (lambda: build_resnet("resnext", 18), lambda: count_weighted_layers("x", (1, 1, 1))):
        with pytest.raises(ValueError, match="--block.*plain, basic, bottleneck"):
            call()


def test_unknown_stem_lists_choices():
    with pytest.raises(ValueError, match="--stem.*cifar, imagenet"):
        build_resnet("basic", 18, stem="tiny")


@pytest.mark.parametrize("layers", [(), (2,), (2, 2), (2, 2, 2, 2, 2), (2, 0, 2), (2, -1, 2, 2), (2.0, 2, 2)])
def test_invalid_layers(layers):
    with pytest.raises(ValueError) as e:
        build_resnet("basic", 18, layers=layers)
    assert "--layers" in str(e.value) and "2,2,2,2" in str(e.value) and "3,3,3" in str(e.value)


# --- zero_init_residual (Goyal et al. 2017) -------------------------------------------------------


@pytest.mark.parametrize("block,depth,last", [("basic", 18, "bn2"), ("bottleneck", 50, "bn3"), ("bottleneck", 11, "bn3")])
def test_zero_init_residual_zeroes_last_bn_only(block, depth, last):
    model = build_resnet(block, depth, zero_init_residual=True)
    n_blocks = 0
    for name in model.stage_names:
        for b in getattr(model, name):
            n_blocks += 1
            for bn_name, bn in b.named_modules():
                if isinstance(bn, nn.BatchNorm2d):
                    assert bool((bn.weight == 0).all()) is (bn_name == last), bn_name
    assert n_blocks == sum(resolve_layers(block, depth)[0])
    assert bool((model.bn1.weight == 1).all())


def test_fresh_zero_init_basic_block_is_identity_then_relu():
    torch.manual_seed(0)
    model = build_resnet("basic", 20, zero_init_residual=True)
    block = model.layer2[1]  # not a stage-change block: identity shortcut
    x = torch.randn(2, 32, 8, 8)
    for mode in (block.eval, block.train):
        mode()
        with torch.no_grad():
            assert torch.equal(block(x), torch.relu(x))


def test_plain_zero_init_raises():
    with pytest.raises(ValueError, match="plain blocks have no shortcut"):
        build_resnet("plain", 18, zero_init_residual=True)
    with pytest.raises(ValueError, match="zero_init_residual"):
        ResNet(PlainBlock, (1, 1, 1), (16, 32, 64), stem="cifar", zero_init_residual=True)


# --- zoo helpers ---------------------------------------------------------------------------------


def test_zoo_table_and_describe():
    rows = zoo_table(num_classes=1000, stem="imagenet")
    assert len(rows) == 3 * 5 + 4
    by_key = {(r["block"], r["depth"]): r for r in rows}
    assert by_key[("basic", 18)]["parameters"] == 11_689_512
    assert by_key[("bottleneck", 50)]["parameters"] == 25_557_032
    assert by_key[("basic", 50)] == {
        "block": "basic",
        "depth": 50,
        "layers": [3, 4, 6, 3],
        "weighted_layers": 34,
        "parameters": by_key[("basic", 34)]["parameters"],
        "widths": [64, 128, 256, 512],
        "stem": "imagenet",
    }
    assert by_key[("basic", 110)]["weighted_layers"] == 110
    assert by_key[("bottleneck", 164)]["weighted_layers"] == 164
    assert by_key[("bottleneck", 164)]["stem"] == "cifar"
    with torch.device("meta"):
        m = build_resnet("basic", 50, stem="imagenet", num_classes=1000)
    assert describe("basic", (3, 4, 6, 3), m) == "basic blocks [3, 4, 6, 3]: 34 weighted layers, 21.8M parameters"
    small = build_resnet("basic", 20)
    assert describe("basic", (3, 3, 3), small) == "basic blocks [3, 3, 3]: 20 weighted layers, 0.27M parameters"


def test_models_package_imports_only_torch():
    pkg = pathlib.Path(models.__file__).parent
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"torch", "__future__", "collections", "typing"}, (path.name, roots)
