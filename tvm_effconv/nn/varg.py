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

Activations are per-channel PReLU as in the paper, or ReLU. In eval mode a separable unit runs as one
custom op, ``torch.ops.effconv.varg_separable`` (its eager implementation below is the reference), so
that ``torch.export`` keeps the unit as one node and the compiler can run it as one fused kernel; in
training mode (and inside :func:`standard_layers`) it runs as its standard layers. Everything else is
standard: a VarGConv2d exports as ``aten.convolution`` with ``groups = C / group_base``, the blocks' adds,
activations and the optional SE as aten ops.

int8 (post-training quantization, as TFLite's and ncnn's converters do it): :func:`quantize_varg`
runs calibration batches through a float model, then replaces every VarGConv2d with a
:class:`QuantizedVarGConv2d`: symmetric int8 activations with one scale per layer (the largest |x| seen,
/ 127), symmetric weights with one scale per output channel (codes in [-127, 127]; ``weight_bits=7``
gives [-63, 63], which x86 CPUs without VNNI need for their fast ``pmaddubsw`` path). It calls
``torch.ops.effconv.varg_qconv2d``: the integer conv is exact, then one float scale per output channel.
A unit whose grouped conv is quantized runs as its layers (the fused unit is float).
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import conv2d_output_size
from .dsconv import _check, _pair, _signed_range, quantize_activations

__all__ = [
    "ACTIVATIONS",
    "SqueezeExcitation",
    "VarGConv2d",
    "VarGDownsampleBlock",
    "VarGNormalBlock",
    "VarGSeparable",
    "QuantizedVarGConv2d",
    "quantize_varg",
    "varg_qconv2d",
    "make_activation",
    "standard_layers",
    "varg_separable",
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


UNIT_ACTIVATIONS = ("prelu", "relu", "none")


def _activate(y: torch.Tensor, kind: str, slope: torch.Tensor | None) -> torch.Tensor:
    _check(kind in UNIT_ACTIVATIONS, "varg_separable", "activation", kind, f"one of {UNIT_ACTIVATIONS}")
    _check((kind == "prelu") == (slope is not None), "varg_separable", "slope", "given" if slope is not None else None,
           "given exactly when the activation is prelu")
    if kind == "prelu":
        return torch.where(y > 0, y, y * slope.view(1, -1, 1, 1))
    return torch.relu(y) if kind == "relu" else y


@torch.library.custom_op("effconv::varg_separable", mutates_args=())
def varg_separable(
    x: torch.Tensor,
    group_weight: torch.Tensor,
    group_bn_weight: torch.Tensor,
    group_bn_bias: torch.Tensor,
    group_bn_mean: torch.Tensor,
    group_bn_var: torch.Tensor,
    group_slope: torch.Tensor | None,
    pointwise_weight: torch.Tensor,
    pointwise_bn_weight: torch.Tensor,
    pointwise_bn_bias: torch.Tensor,
    pointwise_bn_mean: torch.Tensor,
    pointwise_bn_var: torch.Tensor,
    pointwise_slope: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    groups: int,
    eps: list[float],
    group_activation: str,
    pointwise_activation: str,
) -> torch.Tensor:
    """The separable unit in eval mode, the reference (float64 inside, float32 out): grouped conv
    (``groups``, ``stride``, ``padding``) -> batch norm (running statistics, ``eps[0]``) -> activation
    (``group_activation``: "prelu" with per-channel ``group_slope``, "relu" or "none") -> pointwise conv
    -> batch norm (``eps[1]``) -> ``pointwise_activation``."""

    def bn(y, weight, bias, mean, var, epsilon):
        return F.batch_norm(y, mean.double(), var.double(), weight.double(), bias.double(), False, 0.0, epsilon)

    def slope(value):
        return None if value is None else value.double()

    y = F.conv2d(x.double(), group_weight.double(), None, stride, padding, 1, groups)
    y = _activate(bn(y, group_bn_weight, group_bn_bias, group_bn_mean, group_bn_var, eps[0]), group_activation,
                  slope(group_slope))
    y = bn(F.conv2d(y, pointwise_weight.double()), pointwise_bn_weight, pointwise_bn_bias, pointwise_bn_mean,
           pointwise_bn_var, eps[1])
    return _activate(y, pointwise_activation, slope(pointwise_slope)).float()


@varg_separable.register_fake
def _varg_separable_fake(
    x, group_weight, group_bn_weight, group_bn_bias, group_bn_mean, group_bn_var, group_slope, pointwise_weight,
    pointwise_bn_weight, pointwise_bn_bias, pointwise_bn_mean, pointwise_bn_var, pointwise_slope, stride, padding,
    groups, eps, group_activation, pointwise_activation,
):
    out_size = conv2d_output_size(x.shape[2:], group_weight.shape[2:], stride, padding, (1, 1))
    return x.new_empty(x.shape[0], pointwise_weight.shape[0], *out_size)


class VarGSeparable(nn.Module):
    """The separable unit: variable group conv (C -> factor * C, stride) -> BN -> act -> pointwise 1 x 1
    (-> out_channels) -> BN, then act if ``pointwise_activation``.

    In eval mode it calls :func:`varg_separable` (one op for export) unless ``single_op`` is False."""

    single_op = True

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
        if self.training or not self.single_op or not isinstance(self.group_conv, VarGConv2d):
            y = self.group_act(self.group_bn(self.group_conv(x)))
            return self.pointwise_act(self.pointwise_bn(self.pointwise(y)))
        conv, acts = self.group_conv, (self.group_act, self.pointwise_act)
        kinds = [_activation_kind(act) for act in acts]
        slopes = [act.weight if kind == "prelu" else None for act, kind in zip(acts, kinds)]
        g, p = self.group_bn, self.pointwise_bn
        return varg_separable(
            x, conv.weight, g.weight, g.bias, g.running_mean, g.running_var, slopes[0],
            self.pointwise.weight, p.weight, p.bias, p.running_mean, p.running_var, slopes[1],
            list(conv.stride), list(conv.padding), conv.groups, [g.eps, p.eps], kinds[0], kinds[1],
        )


def _activation_kind(module: nn.Module) -> str:
    return {nn.PReLU: "prelu", nn.ReLU: "relu", nn.Identity: "none"}[type(module)]


@contextlib.contextmanager
def standard_layers(model: nn.Module):
    """Within the block, the separable units of ``model`` run (and export) as their standard layers, not as
    one op: for forward hooks on their convs, or an export without effconv ops."""
    units = {module: module.single_op for module in model.modules() if isinstance(module, VarGSeparable)}
    try:
        for unit in units:
            unit.single_op = False
        yield model
    finally:
        for unit, single_op in units.items():
            unit.single_op = single_op


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


WEIGHT_BITS = (7, 8)
ACT_BITS = 8


@torch.library.custom_op("effconv::varg_qconv2d", mutates_args=())
def varg_qconv2d(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    act_scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    groups: int,
) -> torch.Tensor:
    """The int8 grouped conv, the reference: x_q = clamp(round_half_even(x / act_scale), -128, 127) (int8),
    the integer conv of x_q with ``weight_codes`` (K, C/groups, R, S) int8 (exact, float64), times
    ``act_scale * weight_scale[k]``, plus ``bias`` [K] if given. Returns float32 (N, K, P, Q)."""
    x_q, _ = quantize_activations(x, act_scale, "int8", ACT_BITS, 1, 1)
    y = F.conv2d(x_q.double(), weight_codes.double(), None, stride, padding, 1, groups)
    y = y * (act_scale.double() * weight_scale.double()).view(1, -1, 1, 1)
    return (y if bias is None else y + bias.double().view(1, -1, 1, 1)).float()


@varg_qconv2d.register_fake
def _varg_qconv2d_fake(x, weight_codes, weight_scale, act_scale, bias, stride, padding, groups):
    out_size = conv2d_output_size(x.shape[2:], weight_codes.shape[2:], stride, padding, (1, 1))
    return x.new_empty(x.shape[0], weight_codes.shape[0], *out_size)


class QuantizedVarGConv2d(nn.Module):
    """An int8 VarGConv2d for inference (eval only, no training): int8 weight codes with one scale per
    output channel, one activation scale; forward calls :func:`varg_qconv2d`. Make one with
    :meth:`from_conv`, or a whole model's with :func:`quantize_varg`."""

    def __init__(self, weight_codes, weight_scale, act_scale, bias, stride, padding, groups: int, group_base: int):
        super().__init__()
        self.register_buffer("weight_codes", weight_codes)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("act_scale", act_scale)
        self.register_buffer("bias", bias)
        self.stride, self.padding, self.groups, self.group_base = tuple(stride), tuple(padding), groups, group_base

    @classmethod
    def from_conv(cls, conv: VarGConv2d, act_scale: float, weight_bits: int = 8) -> "QuantizedVarGConv2d":
        """Quantize ``conv``'s weights per output channel (symmetric, ``weight_bits`` in WEIGHT_BITS) for
        activations of scale ``act_scale`` (> 0)."""
        layer = "QuantizedVarGConv2d"
        _check(isinstance(conv, VarGConv2d), layer, "conv", type(conv).__name__, "a VarGConv2d")
        _check(weight_bits in WEIGHT_BITS, layer, "weight_bits", weight_bits, f"one of {WEIGHT_BITS}")
        _check(act_scale > 0, layer, "act_scale", act_scale, "> 0 (calibrate on inputs that are not all zero)")
        high = _signed_range(weight_bits)[1]
        weight = conv.weight.detach().float()
        peak = weight.abs().amax(dim=(1, 2, 3))
        scale = torch.where(peak > 0, peak / high, torch.ones_like(peak))
        codes = torch.clamp(torch.round(weight / scale.view(-1, 1, 1, 1)), -high, high).to(torch.int8)
        bias = None if conv.bias is None else conv.bias.detach().float().clone()
        return cls(codes, scale, torch.tensor(float(act_scale)), bias, conv.stride, conv.padding, conv.groups,
                   conv.group_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return varg_qconv2d(x, self.weight_codes, self.weight_scale, self.act_scale, self.bias, list(self.stride),
                            list(self.padding), self.groups)

    def extra_repr(self) -> str:
        return (f"{self.weight_codes.shape[1] * self.groups}, {self.weight_codes.shape[0]}, "
                f"stride={self.stride}, group_base={self.group_base}, act_scale={float(self.act_scale):.4g}")


def quantize_varg(model: nn.Module, batches, weight_bits: int = 8) -> dict[str, float]:
    """Post-training int8 quantization of every VarGConv2d of ``model``, in place; returns the activation
    scales by module path. ``batches`` (tensors, or tuples of model arguments) run through the float
    model in eval mode; each layer's activation scale is the largest |input| seen / 127 (1 if it saw only
    zeros). Then each VarGConv2d becomes ``QuantizedVarGConv2d.from_conv(conv, scale, weight_bits)``.
    The model is left in eval mode."""
    _check(weight_bits in WEIGHT_BITS, "quantize_varg", "weight_bits", weight_bits, f"one of {WEIGHT_BITS}")
    convs = {path: module for path, module in model.named_modules() if isinstance(module, VarGConv2d)}
    _check(bool(convs), "quantize_varg", "model", type(model).__name__, "a model with VarGConv2d layers")
    largest = dict.fromkeys(convs, 0.0)

    def observer(path):
        def hook(module, args):
            largest[path] = max(largest[path], args[0].detach().abs().max().item())

        return hook

    handles = [conv.register_forward_pre_hook(observer(path)) for path, conv in convs.items()]
    model.eval()
    try:
        with torch.no_grad(), standard_layers(model):
            for batch in batches:
                model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
    scales = {path: (peak / _signed_range(ACT_BITS)[1] if peak > 0 else 1.0) for path, peak in largest.items()}
    for path, conv in convs.items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, QuantizedVarGConv2d.from_conv(conv, scales[path], weight_bits))
    return scales
