"""VarG: variable group convolution (Zhang et al., VarGNet, 2019), the PyTorch side.

A variable group convolution fixes the number of input channels per group, ``group_base`` (8 in the
paper), instead of the number of groups: ``groups = C / group_base``. Every group then does the same
work (group_base x k x k multiply-adds per output value) whatever the layer's width, so the layers of a
network have similar compute intensity and one kernel shape serves them all. The output usually has
twice the input channels (``factor`` 2), where MobileNet's depthwise conv keeps C.

The building blocks, as in the paper and its authors' VarGFaceNet code:

- :class:`VarGSeparable`, the separable unit: k x k variable group conv (C -> factor * C) -> BN -> act
  -> 1 x 1 pointwise conv (-> C_out) -> BN (-> act, optional).
- :class:`VarGNormalBlock`: unit (with act) -> unit (without act) -> optional squeeze-and-excitation ->
  add the shortcut -> act. The shortcut is the identity, or a unit without act where the block strides
  or changes width (the network's head block).
- :class:`VarGDownsampleBlock` (stride 2): two parallel units (without act) from the input, summed ->
  act -> unit (without act) -> add a stride-2 unit shortcut (without act) -> act.

Activations are per-channel PReLU as in the paper, or ReLU. VarG needs no custom op: the layers are
standard grouped convs, batch norms, PReLU/ReLU, adds (and mean/sigmoid/mul in the optional SE), and
``torch.export`` keeps them as ``aten.convolution`` with ``groups = C / group_base`` etc.
"""

import torch
from torch import nn

from .dsconv import _check, _pair

__all__ = [
    "ACTIVATIONS",
    "SqueezeExcitation",
    "VarGConv2d",
    "VarGDownsampleBlock",
    "VarGNormalBlock",
    "VarGSeparable",
    "make_activation",
]

ACTIVATIONS = ("prelu", "relu")


def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]


def _check_positive_int(layer: str, name: str, value) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, layer, name, value, "an int >= 1")


class VarGConv2d(nn.Conv2d):
    """An nn.Conv2d with a fixed number of input channels per group: ``groups = in_channels // group_base``.

    ``out_channels`` must be a multiple of the groups (out_channels / in_channels is the output factor,
    usually 1 or 2). ``padding=None`` pads ``k // 2`` on each side ("same" output for odd kernels at
    stride 1). The weight has shape (out_channels, group_base, kH, kW).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=None, group_base: int = 8,
        bias: bool = False,
    ):
        layer = "VarGConv2d"
        _check_positive_int(layer, "in_channels", in_channels)
        _check_positive_int(layer, "out_channels", out_channels)
        _check_positive_int(layer, "group_base", group_base)
        _check(
            in_channels % group_base == 0, layer, "group_base", group_base,
            f"a divisor of in_channels={in_channels} (one of {_divisors(in_channels)})",
        )
        groups = in_channels // group_base
        _check(
            out_channels % groups == 0, layer, "out_channels", out_channels,
            f"a multiple of groups = in_channels / group_base = {in_channels} / {group_base} = {groups}",
        )
        kernel = _pair(layer, "kernel_size", kernel_size, 1)
        strides = _pair(layer, "stride", stride, 1)
        pads = (kernel[0] // 2, kernel[1] // 2) if padding is None else _pair(layer, "padding", padding, 0)
        super().__init__(in_channels, out_channels, kernel, strides, pads, groups=groups, bias=bias)
        self.group_base = group_base

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_base={self.group_base}"


def make_activation(activation: str, channels: int) -> nn.Module:
    """Per-channel PReLU (the paper's activation) or ReLU, by name."""
    _check(activation in ACTIVATIONS, "VarG", "activation", activation, f"one of {ACTIVATIONS}")
    return nn.PReLU(channels) if activation == "prelu" else nn.ReLU()


class VarGSeparable(nn.Module):
    """The separable unit: variable group conv (C -> factor * C, stride) -> BN -> act -> pointwise 1 x 1
    (-> out_channels) -> BN, then act if ``pointwise_activation``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size=3, stride=1, factor: int = 2, group_base: int = 8,
        activation: str = "prelu", pointwise_activation: bool = True,
    ):
        super().__init__()
        _check_positive_int("VarGSeparable", "factor", factor)
        mid_channels = in_channels * factor
        self.group_conv = VarGConv2d(in_channels, mid_channels, kernel_size, stride, group_base=group_base)
        self.group_bn = nn.BatchNorm2d(mid_channels)
        self.group_act = make_activation(activation, mid_channels)
        self.pointwise = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm2d(out_channels)
        self.pointwise_act = make_activation(activation, out_channels) if pointwise_activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group_act(self.group_bn(self.group_conv(x)))
        return self.pointwise_act(self.pointwise_bn(self.pointwise(y)))


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al.): x * sigmoid(expand(act(reduce(mean over H, W of x)))), 1 x 1 convs
    without bias as in the authors' VarGFaceNet."""

    def __init__(self, channels: int, reduction: int, activation: str = "prelu"):
        super().__init__()
        _check_positive_int("SqueezeExcitation", "reduction", reduction)
        _check(
            channels % reduction == 0, "SqueezeExcitation", "reduction", reduction,
            f"a divisor of channels={channels}",
        )
        self.reduce = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.act = make_activation(activation, channels // reduction)
        self.expand = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.expand(self.act(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(weights)


class VarGNormalBlock(nn.Module):
    """unit (with act) -> unit (no act) -> SE (if ``se_reduction``) -> + shortcut -> act.

    The shortcut is the identity when the block keeps shape (stride 1, out_channels = in_channels, the
    default); otherwise a unit without act with the block's stride (the network's head block: stride 2,
    factor 1).
    """

    def __init__(
        self, in_channels: int, out_channels: int | None = None, stride=1, kernel_size=3, factor: int = 2,
        group_base: int = 8, activation: str = "prelu", se_reduction: int | None = None,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        common = {"kernel_size": kernel_size, "factor": factor, "group_base": group_base, "activation": activation}
        self.first = VarGSeparable(in_channels, out_channels, stride=stride, **common)
        self.second = VarGSeparable(out_channels, out_channels, pointwise_activation=False, **common)
        self.se = nn.Identity() if se_reduction is None else SqueezeExcitation(out_channels, se_reduction, activation)
        keeps_shape = _pair("VarGNormalBlock", "stride", stride, 1) == (1, 1) and out_channels == in_channels
        self.shortcut = (
            nn.Identity() if keeps_shape
            else VarGSeparable(in_channels, out_channels, stride=stride, pointwise_activation=False, **common)
        )
        self.act = make_activation(activation, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shortcut(x) + self.se(self.second(self.first(x))))


class VarGDownsampleBlock(nn.Module):
    """Stride 2: act(branch_a(x) + branch_b(x)) -> fuse -> + shortcut(x) -> act; all four are units
    without their pointwise act, the two branches and the shortcut with stride 2.
    ``out_channels`` defaults to 2 * in_channels, as every downsample of the paper's networks."""

    def __init__(
        self, in_channels: int, out_channels: int | None = None, kernel_size=3, factor: int = 2,
        group_base: int = 8, activation: str = "prelu",
    ):
        super().__init__()
        out_channels = 2 * in_channels if out_channels is None else out_channels
        common = {
            "kernel_size": kernel_size, "factor": factor, "group_base": group_base, "activation": activation,
            "pointwise_activation": False,
        }
        self.branch_a = VarGSeparable(in_channels, out_channels, stride=2, **common)
        self.branch_b = VarGSeparable(in_channels, out_channels, stride=2, **common)
        self.merge_act = make_activation(activation, out_channels)
        self.fuse = VarGSeparable(out_channels, out_channels, stride=1, **common)
        self.shortcut = VarGSeparable(in_channels, out_channels, stride=2, **common)
        self.act = make_activation(activation, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fuse(self.merge_act(self.branch_a(x) + self.branch_b(x)))
        return self.act(self.shortcut(x) + y)
