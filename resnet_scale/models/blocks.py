"""The three building blocks: plain, basic (residual) and bottleneck (residual).

Names and layout follow torchvision ``models/resnet.py`` (``conv1/bn1/conv2/bn2/conv3/bn3``,
``downsample``, ``stride``, class attribute ``expansion``) so that, with the ImageNet stem, a
state_dict moves between ``resnet_scale`` and ``torchvision.models`` unchanged.

References:
    He, Zhang, Ren, Sun 2015, "Deep Residual Learning for Image Recognition",
    arXiv:1512.03385 (CVPR 2016) -- plain nets, basic and bottleneck residual blocks.
    Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
    arXiv:1706.02677 -- zero-init of the last BN in each residual branch (see resnet.py).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["conv1x1", "conv3x3", "PlainBlock", "BasicBlock", "Bottleneck"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BatchNorm follows every conv)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class PlainBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU layers and **no shortcut at all**.

    ``out = relu(bn2(conv2(relu(bn1(conv1(x))))))``

    The "plain" network of He et al. 2015 (arXiv:1512.03385, Fig. 3 middle; the 18/34-layer
    plain nets of Table 2): the same layers as :class:`BasicBlock` with the identity taken
    away, used to show the degradation problem that residual learning fixes. At a stage change
    ``conv1`` takes both the stride and the channel change, so there is no ``downsample``
    module (and no attribute of that name) -- nothing carries ``x`` past the block's convs.
    """

    expansion: int = 1
    #: False: the block has no identity path; ResNet._make_layer builds no ``downsample``
    #: for it and ``zero_init_residual`` is refused (it would zero the signal, not a branch).
    has_shortcut: bool = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        return out


class BasicBlock(nn.Module):
    """Residual block of two 3x3 convs: torchvision's ``BasicBlock`` exactly.

    ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` where the shortcut is the
    identity, or at a stage change (stride or width change) a 1x1 projection
    ``downsample = Sequential(conv1x1(stride), BN)`` -- He et al. 2015 (arXiv:1512.03385)
    Fig. 2 / Fig. 3 right, projection shortcuts option (B) of §3.3 / §4.1.
    """

    expansion: int = 1
    has_shortcut: bool = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # Both self.conv1 and self.downsample downsample the input when stride != 1.
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class Bottleneck(nn.Module):
    """Residual bottleneck block 1x1 -> 3x3 -> 1x1: torchvision's ``Bottleneck`` exactly.

    He et al. 2015 (arXiv:1512.03385) Fig. 5 right: the 1x1 convs reduce then restore
    (``expansion`` = 4 times) the width so the 3x3 conv runs on the narrow tensor.

    The stride sits on the 3x3 conv (``conv2``), not on the first 1x1 conv as in the paper:
    this is "ResNet v1.5" (torchvision; NVIDIA's ResNet-50 v1.5 notes; Goyal et al. 2017,
    arXiv:1706.02677, whose Caffe2 code introduced it), slightly more accurate, slightly slower.
    """

    expansion: int = 4
    has_shortcut: bool = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        width = planes
        # Both self.conv2 and self.downsample downsample the input when stride != 1.
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out

