"""ResNet, the depth table, the builder and the model-zoo helpers.

:class:`ResNet` uses torchvision's names (``conv1, bn1, relu, maxpool, layer1..layerK, avgpool,
fc``) and init. With ``stem="imagenet"`` and the standard widths its state_dict has exactly
the keys and shapes of ``torchvision.models.resnet18/34/50/101/152``, so weights load either way
with ``strict=True`` and give identical outputs.

Depths (``resolve_layers``):

* The standard table (He et al. 2015, arXiv:1512.03385, Table 1) gives the blocks per stage
  for 18, 34, 50, 101 and 152, with widths (64, 128, 256, 512). It is used for *any* block
  type: ``--block basic --depth 50`` is [3, 4, 6, 3] basic blocks (34 weighted layers) and
  ``--block bottleneck --depth 18`` is [2, 2, 2, 2] bottlenecks (26 weighted layers); the
  depth names the layout, ``count_weighted_layers`` gives the paper's layer count.
* The CIFAR family (He et al. 2015 §4.2; He et al. 2016 "Identity Mappings in Deep Residual
  Networks", arXiv:1603.05027, for the bottleneck ResNet-164) has three stages of n blocks,
  widths (16, 32, 64): depth 6n+2 for plain/basic (20, 32, 44, 56, 110, 1202) and 9n+2 for
  bottleneck (11, 20, 29, ..., 164; outputs 64/128/256 channels).
* Where a depth is both (basic 50 = 6*8+2, basic 152 = 6*25+2, bottleneck 101 = 9*11+2) the
  standard table wins; ask for the CIFAR layout with ``--layers 8,8,8`` (``--layers 25,25,25``,
  ``--layers 11,11,11``).
* ``--layers`` gives any layout: 4 stages get widths (64, 128, 256, 512), 3 stages get
  (16, 32, 64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .blocks import BasicBlock, Bottleneck, PlainBlock, conv1x1

__all__ = [
    "BLOCKS",
    "CIFAR_WIDTHS",
    "STANDARD_LAYOUTS",
    "STANDARD_WIDTHS",
    "STEMS",
    "ResNet",
    "build_resnet",
    "count_parameters",
    "count_weighted_layers",
    "describe",
    "resolve_layers",
    "zoo_table",
]

Block = type[PlainBlock] | type[BasicBlock] | type[Bottleneck]

#: ``--block`` name -> block class.
BLOCKS: dict[str, Block] = {"plain": PlainBlock, "basic": BasicBlock, "bottleneck": Bottleneck}
#: ``--stem`` choices.
STEMS: tuple[str, ...] = ("cifar", "imagenet")
#: Blocks per stage of the standard ImageNet ResNets (He et al. 2015, Table 1), for any block.
STANDARD_LAYOUTS: dict[int, tuple[int, ...]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
#: Stage widths (``planes``; a stage outputs width * expansion channels).
STANDARD_WIDTHS: tuple[int, ...] = (64, 128, 256, 512)
CIFAR_WIDTHS: tuple[int, ...] = (16, 32, 64)
#: Weighted layers on the main path of one block (paper convention, shortcuts not counted).
_CONVS_PER_BLOCK = {"plain": 2, "basic": 2, "bottleneck": 3}
#: Examples of the CIFAR family shown in messages and in the zoo table.
_CIFAR_EXAMPLES = {
    "plain": "6n+2 (8, 14, 20, 26, 32, 44, 56, 110, ...)",
    "basic": "6n+2 (8, 14, 20, 26, 32, 44, 56, 110, ...)",
    "bottleneck": "9n+2 (11, 20, 29, 38, 47, 56, ...)",
}


class ResNet(nn.Module):
    """A ResNet of any block type, any number of stages and either stem (torchvision names).

    Args:
        block: block class, :class:`PlainBlock`, :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)``; stage i is ``layer{i}`` (1-based).
        widths: one width (``planes``) per stage, e.g. ``(64, 128, 256, 512)``.
        stem: ``"imagenet"``: 7x7/2 conv + 3x3/2 max-pool (He et al. 2015, Table 1), for
            ~224 px inputs; ``"cifar"``: one 3x3/1 conv and no pool (He et al. 2015 §4.2),
            for 32 px inputs.
        num_classes: outputs of ``fc``.
        zero_init_residual: zero the last BN weight of every residual branch so each residual
            block starts as the identity (Goyal et al. 2017, arXiv:1706.02677; +0.2-0.3%
            top-1 on ImageNet per torchvision). Refused for plain blocks.

    The defaults give torchvision's ImageNet model for the given block and layers.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        widths: Sequence[int] = STANDARD_WIDTHS,
        stem: str = "imagenet",
        num_classes: int = 1000,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        layers, widths = tuple(layers), tuple(widths)
        if len(layers) == 0 or len(layers) != len(widths):
            raise ValueError(
                f"ResNet needs one width per stage and at least one stage: got {len(layers)} "
                f"stages (layers={list(layers)}) and {len(widths)} widths (widths={list(widths)})"
            )
        if stem not in STEMS:
            raise ValueError(f"unknown --stem {stem!r}: choose one of {', '.join(STEMS)}")
        if zero_init_residual and not block.has_shortcut:
            raise ValueError(
                f"zero_init_residual=True needs a residual block (--block basic or bottleneck), "
                f"got {block.__name__}: plain blocks have no shortcut, so zeroing their last "
                f"BatchNorm would zero the whole signal, not a residual branch"
            )

        self.inplanes = widths[0]
        if stem == "imagenet":
            # He et al. 2015 Table 1: 7x7/2 conv then 3x3/2 max-pool, /4 before layer1.
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            # He et al. 2015 §4.2 (CIFAR): one 3x3 conv, full resolution into layer1.
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        if stem == "imagenet":
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.maxpool = nn.Identity()

        # Plain attribute (not a module, not in the state_dict): the stage names in order,
        # for code that walks stages (e.g. activation checkpointing per stage).
        self.stage_names: tuple[str, ...] = tuple(f"layer{i}" for i in range(1, len(layers) + 1))
        for i, (name, blocks, width) in enumerate(zip(self.stage_names, layers, widths)):
            # The first stage keeps the resolution (the stem already reduced it); each later
            # stage halves it and widens (He et al. 2015 §3.3).
            setattr(self, name, self._make_layer(block, width, blocks, stride=1 if i == 0 else 2))

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

        # torchvision init: He et al. 2015 ("Delving Deep into Rectifiers", arXiv:1502.01852)
        # normal init with fan_out for convs; BN as identity; Linear keeps PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialize the last BN in each residual branch, so that the residual branch
        # starts with zeros and each residual block behaves like an identity (Goyal et al. 2017,
        # arXiv:1706.02677). Plain blocks were refused above.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        """One stage: ``blocks`` blocks of width ``planes``; the first takes the stride."""
        if blocks < 1:
            raise ValueError(f"a stage needs at least one block, got {blocks}")
        out_planes = planes * block.expansion
        if block.has_shortcut:
            downsample = None
            if stride != 1 or self.inplanes != out_planes:
                # Projection shortcut, option (B) of He et al. 2015 §3.3.
                downsample = nn.Sequential(
                    conv1x1(self.inplanes, out_planes, stride),
                    nn.BatchNorm2d(out_planes),
                )
            first = block(self.inplanes, planes, stride, downsample)
        else:
            # Plain block: conv1 takes the stride and the width change; no shortcut at all.
            first = block(self.inplanes, planes, stride)
        stage = [first]
        self.inplanes = out_planes
        for _ in range(1, blocks):
            stage.append(block(self.inplanes, planes))
        return nn.Sequential(*stage)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        for name in self.stage_names:
            x = getattr(self, name)(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def _check_block(block: str) -> None:
    if block not in BLOCKS:
        raise ValueError(f"unknown --block {block!r}: choose one of {', '.join(BLOCKS)}")


def resolve_layers(
    block: str, depth: int | None, layers: tuple[int, ...] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return ``(layers, widths)`` for ``--block``/``--depth``, or for an explicit ``--layers``.

    ``layers`` overrides ``depth``: 4 stages get widths (64, 128, 256, 512), 3 stages get
    (16, 32, 64). A depth is looked up in :data:`STANDARD_LAYOUTS` first (for any block), then
    read as the CIFAR family: 6n+2 for plain/basic, 9n+2 for bottleneck, giving (n, n, n) with
    widths (16, 32, 64). Raises ValueError naming the valid choices otherwise.
    """
    _check_block(block)
    if layers is not None:
        layers = tuple(layers)
        if len(layers) not in (3, 4) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in layers
        ):
            raise ValueError(
                f"--layers {','.join(map(str, layers)) or '(empty)'} is not a valid layout: give 4 "
                f"positive block counts for the ImageNet-style widths 64,128,256,512 (e.g. "
                f"--layers 2,2,2,2) or 3 for the CIFAR widths 16,32,64 (e.g. --layers 3,3,3)"
            )
        return layers, STANDARD_WIDTHS if len(layers) == 4 else CIFAR_WIDTHS

    standard = ", ".join(map(str, STANDARD_LAYOUTS))
    choices = (
        f"choose a standard depth {standard} (layouts of He et al. 2015 Table 1) or a CIFAR "
        f"depth {_CIFAR_EXAMPLES[block]}, or give any layout with --layers (e.g. --layers "
        f"3,4,6,3 or --layers 5,5,5)"
    )
    if depth is None:
        raise ValueError(f"--block {block} needs --depth or --layers: {choices}")
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise ValueError(f"--depth must be an integer, got {depth!r}: {choices}")
    if depth in STANDARD_LAYOUTS:
        return STANDARD_LAYOUTS[depth], STANDARD_WIDTHS
    per_block = 6 if block in ("plain", "basic") else 9  # 3 stages x 2 or 3 weighted layers
    if depth > 2 and (depth - 2) % per_block == 0:
        n = (depth - 2) // per_block
        return (n, n, n), CIFAR_WIDTHS
    raise ValueError(f"--depth {depth} is not valid for --block {block}: {choices}")


def build_resnet(
    block: str,
    depth: int | None = 18,
    *,
    stem: str = "cifar",
    num_classes: int = 10,
    layers: tuple[int, ...] | None = None,
    zero_init_residual: bool = False,
) -> nn.Module:
    """Build a :class:`ResNet` from ``--block``, ``--depth`` (or ``--layers``) and ``--stem``.

    ``build_resnet("basic", 18, stem="imagenet", num_classes=1000)`` is torchvision's
    ``resnet18()`` (same state_dict keys and shapes); ``build_resnet("basic", 20)`` is the
    CIFAR ResNet-20 of He et al. 2015 §4.2. Raises ValueError, listing the choices, for an
    unknown block or stem, a depth with no layout, or a bad layout.
    """
    _check_block(block)
    if stem not in STEMS:
        raise ValueError(f"unknown --stem {stem!r}: choose one of {', '.join(STEMS)}")
    stage_layers, widths = resolve_layers(block, depth, layers)
    return ResNet(
        BLOCKS[block],
        stage_layers,
        widths,
        stem=stem,
        num_classes=num_classes,
        zero_init_residual=zero_init_residual,
    )


def count_weighted_layers(block: str, layers: Sequence[int]) -> int:
    """Weighted layers by the paper's convention (He et al. 2015): the convs on the main path
    plus the fc; projection shortcuts are not counted.

    ``1 (stem conv) + sum(layers) * (2 for plain/basic, 3 for bottleneck) + 1 (fc)``:
    basic [2,2,2,2] -> 18, basic [3,4,6,3] -> 34, bottleneck [3,4,6,3] -> 50,
    basic (3,3,3) -> 20, bottleneck (n,n,n) -> 9n+2.
    """
    _check_block(block)
    return 1 + sum(layers) * _CONVS_PER_BLOCK[block] + 1


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (all of them, trainable or not; shared ones once). Works on the
    ``meta`` device, so a model never has to be materialised to be counted."""
    return sum(p.numel() for p in model.parameters())


def _format_parameters(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e6:.2f}M"


def describe(block: str, layers: Sequence[int], model: nn.Module) -> str:
    """One line for logs: ``"basic blocks [3, 4, 6, 3]: 34 weighted layers, 21.8M parameters"``."""
    return (
        f"{block} blocks {list(layers)}: {count_weighted_layers(block, layers)} weighted layers, "
        f"{_format_parameters(count_parameters(model))} parameters"
    )


def zoo_table(num_classes: int = 10, stem: str = "imagenet") -> list[dict]:
    """Rows for the README's model table.

    Every block (plain, basic, bottleneck) at every standard depth (18, 34, 50, 101, 152) with
    the given ``stem``, then CIFAR-family examples (basic 20, 56, 110; bottleneck 164), which
    always use the ``cifar`` stem they are defined with. Each row has ``block, depth, layers,
    weighted_layers, parameters`` plus ``widths`` and ``stem``. Parameters are counted on the
    ``meta`` device: nothing is allocated or initialised.
    """
    cases = [(b, d, stem) for b in BLOCKS for d in STANDARD_LAYOUTS]
    cases += [("basic", 20, "cifar"), ("basic", 56, "cifar"), ("basic", 110, "cifar")]
    cases += [("bottleneck", 164, "cifar")]
    rows = []
    for block, depth, row_stem in cases:
        layers, widths = resolve_layers(block, depth)
        with torch.device("meta"):
            model = build_resnet(block, depth, stem=row_stem, num_classes=num_classes)
        rows.append(
            {
                "block": block,
                "depth": depth,
                "layers": list(layers),
                "weighted_layers": count_weighted_layers(block, layers),
                "parameters": count_parameters(model),
                "widths": list(widths),
                "stem": row_stem,
            }
        )
    return rows
