"""DSQ: differentiable soft quantization (Gong et al., ICCV 2019), the PyTorch side.

Training: the activations and the weights of a conv go through the DSQ function (DESIGN 3.1) before an
ordinary float conv. With clip range (l, u), b bits and step D = (u - l) / (2^b - 1), the input is
clipped to [l, u]; inside interval i (i = 0 .. 2^b - 2, midpoint m_i = l + (i + 0.5) D) the soft step is

    phi(x) = s * tanh(k (x - m_i)),   s = 1 / tanh(0.5 k D),   k = log(2 / alpha - 1) / D
    soft(x) = l + D (i + (phi(x) + 1) / 2)

The forward value is the HARD uniform quantization (straight-through: ``(hard - soft).detach() + soft``),
the backward follows the tanh steps, so gradients reach x (inside [l, u]), l, u and alpha. At 1 bit the
hard quantizer is the paper's sign: u where x >= (l + u) / 2, else l (sgn(0) = +1).

Inference: plain uniform quantization to integer codes with the learned ranges, then an integer conv.
Codes and zero points, as the op ``effconv::qconv2d`` takes them:

- activations: UNSIGNED codes qa in [0, 2^ab - 1] (post-ReLU inputs have l = 0, so zero point 0),
  one scale ``act_scale`` = D_a and one float zero point ``act_zero_point`` = -l_a / D_a per layer;
  x ~= act_scale * (qa - act_zero_point).
- weights: SIGNED codes qw in [-2^(wb-1), 2^(wb-1) - 1] in an int8 tensor (8-bit weights fit; 1-bit
  codes are {-1, 0}), per output channel a scale ``weight_scale[k]`` = D_w[k] and a float zero point
  ``weight_zero_point[k]`` = -l_w[k] / D_w[k] - 2^(wb-1); w ~= weight_scale[k] * (qw - weight_zero_point[k]).
  The unsigned DSQ code is qw + 2^(wb-1) (add 2^(wb-1) to code and zero point for unsigned bit planes).

Zero points are floats because DSQ learns l freely (rounding them would move the learned grid). The
integer part is still exact: with the image zero-padded in the float domain,

    y[n,k,p,q] = sa * sw[k] * (acc - zw[k] * act_sum - za * weight_sum + za * zw[k] * taps) + bias[k]

where acc = sum qa qw, act_sum = sum qa, weight_sum = sum qw and taps count only the (c, r, s) taps
inside the image (:func:`qconv2d_integer_terms`). With za = 0 (post-ReLU) the last two terms vanish.

:class:`DSQLinear` is the same for nn.Linear: in eval mode it is a 1x1 ``effconv::qconv2d`` on the input
viewed as (N, in_features, 1, 1), so one op (and one compiled kernel family) serves both layers.
"""

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import conv2d_output_size
from .dsconv import (
    ConversionEntry,
    ConversionReport,
    _check,
    _integer_padding,
    _pair,
    _signed_range,
)

__all__ = [
    "BITS",
    "DSQConv2d",
    "DSQConversionReport",
    "DSQLinear",
    "QConvIntegerTerms",
    "convert_to_dsq",
    "dsq_quantize",
    "qconv2d",
    "qconv2d_from_terms",
    "qconv2d_integer_terms",
    "quantize_codes",
]

BITS = (1, 2, 3, 4, 8)
_BITS_ALLOWED = "in {1, 2, 3, 4, 8}"
# A learned range narrower than MIN_RELATIVE_RANGE * max(|l|, |u|) + MIN_RANGE (training may push u
# below l) is widened to that, u := l + floor: keeps D > 0 and finite gradients.
MIN_RELATIVE_RANGE = 1e-3
MIN_RANGE = 1e-8
DEFAULT_ALPHA = 0.2
DEFAULT_ACT_RANGE = (0.0, 1.0)


def _check_bits(layer: str, name: str, bits) -> None:
    _check(isinstance(bits, int) and not isinstance(bits, bool) and bits in BITS, layer, name, bits, _BITS_ALLOWED)


def _round_codes(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (same float dtype as t) of the real-valued code position t = (x - l) / D."""
    if bits == 1:
        codes = (t >= 0.5).to(t.dtype)  # the paper's sign: the midpoint goes up
    else:
        codes = torch.round(t)  # half to even
    return torch.clamp(codes, 0, 2**bits - 1)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned uniform codes of x, as uint8 in [0, 2^bits - 1]: round(x / scale + zero_point), clamped.

    ``x / scale + zero_point`` is (x - l) / D for l = -scale * zero_point; it is computed in float32
    (a division, then an addition: the order a kernel must keep to pick the same codes). Rounding is
    half to even; at 1 bit the code is 1 where that value is >= 0.5 (the paper's sgn(0) = +1).
    """
    _check_bits("quantize_codes", "bits", bits)
    t = x.float() / scale.float() + zero_point.float()
    return _round_codes(t, bits).to(torch.uint8)


def _dsq(x, lower, upper, alpha, bits: int) -> torch.Tensor:
    """DSQ without validation (lower < upper and 0 < alpha <= 0.5 assumed); see :func:`dsq_quantize`."""
    top = 2**bits - 1  # the largest code; there are `top` intervals
    step = (upper - lower) / top
    zero_point = -lower / step
    # The hard value, from the same codes the inference op picks (same float32 operations).
    codes = _round_codes((x / step + zero_point).detach(), bits)
    hard = (codes - zero_point) * step
    clipped = torch.minimum(torch.maximum(x, lower), upper)
    index = torch.clamp(torch.floor((clipped - lower) / step), 0, top - 1).detach()
    midpoint = lower + (index + 0.5) * step
    k_step = torch.log(2 / torch.clamp(alpha, 1e-6, 0.5) - 1)  # k * D, the tanh's slope in steps
    s = 1 / torch.tanh(0.5 * k_step)
    phi = s * torch.tanh(k_step * (clipped - midpoint) / step)
    soft = lower + step * (index + (phi + 1) / 2)
    return (hard - soft).detach() + soft


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=like.dtype, device=like.device)


def dsq_quantize(x: torch.Tensor, lower, upper, alpha, bits: int) -> torch.Tensor:
    """The DSQ function of DESIGN 3.1: hard b-bit uniform quantization forward, tanh soft steps backward.

    ``lower``, ``upper`` and ``alpha`` are floats or tensors broadcastable to x (e.g. (K, 1, 1, 1) for
    per-output-channel weight ranges); gradients reach every one that requires them. alpha must be in
    (0, 0.5] (smaller: steeper steps); :class:`DSQConv2d` keeps it there by storing it unconstrained and
    mapping it through 0.5 * sigmoid. The checks ``lower < upper`` and the alpha range read the values
    (one device sync) and are skipped while compiling or exporting.
    """
    _check_bits("dsq_quantize", "bits", bits)
    lower, upper, alpha = _as_tensor(lower, x), _as_tensor(upper, x), _as_tensor(alpha, x)
    if not torch.compiler.is_compiling():
        low, high = (t.detach().flatten() for t in torch.broadcast_tensors(lower, upper))
        crossed = (low >= high).nonzero()
        _check(
            crossed.numel() == 0, "dsq_quantize", "(lower, upper)",
            crossed.numel() and (low[crossed[0, 0]].item(), high[crossed[0, 0]].item()), "lower < upper",
        )
        values = alpha.detach().flatten()
        outside = values[~((values > 0) & (values <= 0.5))]
        _check(outside.numel() == 0, "dsq_quantize", "alpha", outside.numel() and outside[0].item(), "in (0, 0.5]")
    return _dsq(x, lower, upper, alpha, bits)


def _check_qconv2d(x, weight_codes, groups, weight_bits, act_bits) -> None:
    _check_bits("qconv2d", "weight_bits", weight_bits)
    _check_bits("qconv2d", "act_bits", act_bits)
    _check(weight_codes.dtype == torch.int8, "qconv2d", "weight_codes.dtype", weight_codes.dtype, "torch.int8")
    _check(
        x.dim() == 4 and x.shape[1] == weight_codes.shape[1] * groups, "qconv2d", "x.shape", tuple(x.shape),
        f"(N, {weight_codes.shape[1] * groups}, H, W) for weight codes {tuple(weight_codes.shape)} and groups={groups}",
    )


@torch.library.custom_op("effconv::qconv2d", mutates_args=())
def qconv2d(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor,
    act_scale: torch.Tensor,
    act_zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    weight_bits: int,
    act_bits: int,
) -> torch.Tensor:
    """Uniformly quantized conv (DSQ inference), the reference.

    x (N, C, H, W) float32 activations; weight_codes (K, C/groups, R, S) int8, signed codes in
    [-2^(wb-1), 2^(wb-1) - 1]; weight_scale, weight_zero_point (K,) float32; act_scale, act_zero_point
    () float32; bias (K,) or None. The activations become unsigned codes
    ``qa = quantize_codes(x, act_scale, act_zero_point, act_bits)``; then in float64
    ``y = conv2d(act_scale * (qa - act_zero_point), weight_scale * (qw - weight_zero_point)) + bias``
    with zero padding of the dequantized image, returned as float32 (N, K, P, Q).
    """
    _check_qconv2d(x, weight_codes, groups, weight_bits, act_bits)
    qa = quantize_codes(x, act_scale, act_zero_point, act_bits)
    x_hat = (qa.double() - act_zero_point.double()) * act_scale.double()
    w_hat = (weight_codes.double() - weight_zero_point.double().view(-1, 1, 1, 1)) * weight_scale.double().view(
        -1, 1, 1, 1
    )
    y = F.conv2d(x_hat, w_hat, None if bias is None else bias.double(), stride, padding, dilation, groups)
    return y.float()


@qconv2d.register_fake
def _qconv2d_fake(
    x, weight_codes, weight_scale, weight_zero_point, act_scale, act_zero_point, bias, stride, padding, dilation,
    groups, weight_bits, act_bits,
):
    _check_qconv2d(x, weight_codes, groups, weight_bits, act_bits)
    out_size = conv2d_output_size(x.shape[2:], weight_codes.shape[2:], stride, padding, dilation)
    return x.new_empty(x.shape[0], weight_codes.shape[0], *out_size)


class QConvIntegerTerms(NamedTuple):
    """The integer sums of a quantized conv (all int64), for checking integer kernels exactly.

    acc (N, K, P, Q): sum of qa * qw over each window (padding contributes nothing);
    act_sum (N, K, P, Q): sum of qa over each window, over the input channels of k's group;
    weight_sum (1, K, P, Q): sum of qw[k] over the taps that fall inside the image (all taps away from
    the border); taps (1, 1, P, Q): the number of (c, r, s) taps inside the image.
    """

    acc: torch.Tensor
    act_sum: torch.Tensor
    weight_sum: torch.Tensor
    taps: torch.Tensor


def _exact_conv(a: torch.Tensor, b: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    # Integer-valued float64 operands: every partial sum is an integer below 2^53, so any order is exact.
    return torch.round(F.conv2d(a.double(), b.double(), None, stride, padding, dilation, groups)).to(torch.int64)


def qconv2d_integer_terms(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    act_scale: torch.Tensor,
    act_zero_point: torch.Tensor,
    stride,
    padding,
    dilation,
    groups: int,
    act_bits: int,
) -> QConvIntegerTerms:
    """The integer terms of ``effconv::qconv2d`` for these activations (see :class:`QConvIntegerTerms`);
    :func:`qconv2d_from_terms` turns them into the op's output."""
    qa = quantize_codes(x, act_scale, act_zero_point, act_bits)
    out_channels, channels_per_group, kernel_h, kernel_w = weight_codes.shape
    args = (list(stride), list(padding), list(dilation))
    acc = _exact_conv(qa, weight_codes, *args, groups)
    act_sum = _exact_conv(qa, torch.ones(out_channels, channels_per_group, kernel_h, kernel_w), *args, groups)
    inside = torch.ones(1, x.shape[1], *x.shape[2:], dtype=torch.float64, device=x.device)
    weight_sum = _exact_conv(inside, weight_codes, *args, groups)
    taps = _exact_conv(inside[:, :channels_per_group], torch.ones(1, channels_per_group, kernel_h, kernel_w), *args, 1)
    return QConvIntegerTerms(acc, act_sum, weight_sum, taps)


def qconv2d_from_terms(
    terms: QConvIntegerTerms,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor,
    act_scale: torch.Tensor,
    act_zero_point: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = sa sw[k] (acc - zw[k] act_sum - za weight_sum + za zw[k] taps) + bias[k], in float64."""
    sw, zw = weight_scale.double().view(1, -1, 1, 1), weight_zero_point.double().view(1, -1, 1, 1)
    sa, za = act_scale.double(), act_zero_point.double()
    y = sa * sw * (terms.acc - zw * terms.act_sum - za * terms.weight_sum + za * zw * terms.taps)
    return y if bias is None else y + bias.double().view(1, -1, 1, 1)


def _range_and_step(lower: torch.Tensor, upper: torch.Tensor, bits: int):
    """The range actually used, with D and -l / D: u raised to l + the minimum width where it fell below
    (u then gets no gradient until l moves away)."""
    floor = MIN_RELATIVE_RANGE * torch.maximum(lower.abs(), upper.abs()).detach() + MIN_RANGE
    upper = torch.maximum(upper, lower + floor)
    step = (upper - lower) / (2**bits - 1)
    return lower, upper, step, -lower / step


def _alpha_logit(alpha: float) -> float:
    return torch.logit(torch.tensor(2.0 * alpha, dtype=torch.float64)).item()


class _DSQLayer(nn.Module):
    """What :class:`DSQConv2d` and :class:`DSQLinear` share: weight and bias, the learnable DSQ parameters,
    the eval-mode codes and the ``effconv::qconv2d`` call (DSQConv2d's docstring describes them).

    A subclass checks and records its own geometry, then calls this ``__init__`` with the weight's shape
    (output channels or features first) and the shape the op takes the codes in, (K, C/groups, R, S).
    Its forward uses :meth:`_quantized_input` and :meth:`quantized_weight` in training mode and
    :meth:`_qconv2d` in eval mode.
    """

    def __init__(
        self,
        layer: str,
        weight_shape: tuple[int, ...],
        codes_shape: tuple[int, ...],
        bias: bool,
        weight_bits: int,
        act_bits: int,
        act_range: tuple[float, float] | None,
        alpha: float,
    ):
        _check_bits(layer, "weight_bits", weight_bits)
        _check_bits(layer, "act_bits", act_bits)
        if act_range is not None:
            _check(
                len(act_range) == 2 and float(act_range[0]) < float(act_range[1]),
                layer, "act_range", act_range, "a pair (lower, upper) with lower < upper",
            )
        _check(isinstance(alpha, (int, float)) and 0 < alpha < 0.5, layer, "alpha", alpha, "in (0, 0.5)")
        super().__init__()
        self.weight_bits, self.act_bits = weight_bits, act_bits
        out_features = weight_shape[0]
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        # nn.Conv2d's and nn.Linear's initialisation (the same).
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            bound = self.weight[0].numel() ** -0.5
            nn.init.uniform_(self.bias, -bound, bound)
        self.weight_lower = nn.Parameter(torch.empty(out_features))
        self.weight_upper = nn.Parameter(torch.empty(out_features))
        self.init_weight_range()
        low, high = act_range if act_range is not None else DEFAULT_ACT_RANGE
        self.act_lower = nn.Parameter(torch.tensor(float(low)))
        self.act_upper = nn.Parameter(torch.tensor(float(high)))
        logit = _alpha_logit(alpha)
        self.weight_alpha_logit = nn.Parameter(torch.tensor(logit))
        self.act_alpha_logit = nn.Parameter(torch.tensor(logit))
        self.register_buffer("act_range_initialized", torch.tensor(act_range is not None))
        self._act_range_ready = act_range is not None  # mirrors the buffer without a device sync

        self.register_buffer("weight_codes", torch.zeros(codes_shape, dtype=torch.int8), persistent=False)
        self.register_buffer("weight_scale", torch.ones(out_features), persistent=False)
        self.register_buffer("weight_zero_point", torch.zeros(out_features), persistent=False)
        self.register_buffer("act_scale", torch.tensor(1.0), persistent=False)
        self.register_buffer("act_zero_point", torch.tensor(0.0), persistent=False)
        self.register_load_state_dict_post_hook(_DSQLayer._after_load)

    def _load_float_layer(self, float_layer: nn.Module) -> "_DSQLayer":
        """Take ``float_layer``'s weight, bias, device and mode; weight ranges at each row's min and max."""
        self.to(float_layer.weight.device)
        with torch.no_grad():
            self.weight.copy_(float_layer.weight.detach())
            if float_layer.bias is not None:
                self.bias.copy_(float_layer.bias.detach())
        self.init_weight_range()
        return self.train(float_layer.training)

    @torch.no_grad()
    def init_weight_range(self) -> None:
        """Set each output channel's weight range to its weights' min and max (a constant channel c gets
        (c, c + max(|c|, 1) * 1e-3), so that c is a code exactly)."""
        flat = self.weight.detach().flatten(1)
        low, high = flat.amin(dim=1), flat.amax(dim=1)
        degenerate = high - low <= MIN_RANGE
        high = torch.where(degenerate, low + torch.clamp(low.abs(), min=1.0) * 1e-3, high)
        self.weight_lower.copy_(low)
        self.weight_upper.copy_(high)

    @property
    def weight_alpha(self) -> torch.Tensor:
        return 0.5 * torch.sigmoid(self.weight_alpha_logit)

    @property
    def act_alpha(self) -> torch.Tensor:
        return 0.5 * torch.sigmoid(self.act_alpha_logit)

    def _per_output(self, values: torch.Tensor) -> torch.Tensor:
        """(K,) values viewed to broadcast over the weight, (K, 1, ...)."""
        return values.view(-1, *[1] * (self.weight.dim() - 1))

    def quantized_weight(self) -> torch.Tensor:
        """DSQ(weight): hard-quantized values forward, differentiable in weight, its ranges and alpha."""
        lower, upper, _, _ = _range_and_step(self.weight_lower, self.weight_upper, self.weight_bits)
        return _dsq(self.weight, self._per_output(lower), self._per_output(upper), self.weight_alpha, self.weight_bits)

    def _quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """DSQ(x) with the activation range, which the first training batch sets unless it was given."""
        if not self._act_range_ready:
            self._init_act_range(x)
        lower, upper, _, _ = _range_and_step(self.act_lower, self.act_upper, self.act_bits)
        return _dsq(x, lower, upper, self.act_alpha, self.act_bits)

    @torch.no_grad()
    def refresh_codes(self) -> None:
        """Recompute the eval-mode buffers (codes, scales, zero points) from the current parameters."""
        _, _, step, zero_point = _range_and_step(self.weight_lower, self.weight_upper, self.weight_bits)
        # Same float32 operations as the training forward's hard value: the same codes.
        codes = _round_codes(self.weight / self._per_output(step) + self._per_output(zero_point), self.weight_bits)
        offset = -_signed_range(self.weight_bits)[0]  # unsigned code - offset: DSConv's signed range
        self.weight_codes.copy_((codes - offset).to(torch.int8).view_as(self.weight_codes))
        self.weight_scale.copy_(step)
        self.weight_zero_point.copy_(zero_point - offset)
        _, _, step, zero_point = _range_and_step(self.act_lower, self.act_upper, self.act_bits)
        self.act_scale.copy_(step)
        self.act_zero_point.copy_(zero_point)

    def train(self, mode: bool = True) -> "_DSQLayer":
        super().train(mode)
        if not mode:
            self.refresh_codes()
        return self

    @staticmethod
    def _after_load(module: "_DSQLayer", incompatible_keys) -> None:
        module._act_range_ready = bool(module.act_range_initialized)
        if not module.training:
            module.refresh_codes()

    @torch.no_grad()
    def _init_act_range(self, x: torch.Tensor) -> None:
        low, high = x.min().float(), x.max().float()
        high = torch.where(high - low > MIN_RANGE, high, low + torch.clamp(low.abs(), min=1.0) * 1e-3)
        self.act_lower.copy_(low)
        self.act_upper.copy_(high)
        self.act_range_initialized.fill_(True)
        self._act_range_ready = True

    def _qconv2d(self, x: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
        return torch.ops.effconv.qconv2d(
            x, self.weight_codes, self.weight_scale, self.weight_zero_point, self.act_scale, self.act_zero_point,
            self.bias, list(stride), list(padding), list(dilation), groups, self.weight_bits, self.act_bits,
        )

    @property
    def storage_bits_per_weight(self) -> float:
        """Bits stored per weight: the code plus this layer's share of the float32 scale and zero point."""
        return self.weight_bits + 64 * self.weight.shape[0] / self.weight.numel()


class DSQConv2d(_DSQLayer):
    """A drop-in nn.Conv2d replacement trained with DSQ-quantized weights and activations.

    Parameters: ``weight`` (K, C/groups, R, S) and ``bias`` (K,) as nn.Conv2d; the clip ranges
    ``weight_lower``, ``weight_upper`` (K,), one per output channel (from_conv starts them at each
    channel's min and max) and ``act_lower``, ``act_upper`` () for the layer's input; and the
    unconstrained ``weight_alpha_logit``, ``act_alpha_logit``, with alpha = 0.5 * sigmoid(logit) in
    (0, 0.5) (:attr:`weight_alpha`, :attr:`act_alpha`, starting at ``alpha``). A range that training
    narrows below 1e-3 of its magnitude (or inverts) is used widened to that width. The activation range starts at ``act_range`` if given,
    else it is set from the first training batch (its min and max; buffer ``act_range_initialized``);
    until then it is DEFAULT_ACT_RANGE.

    Training mode: ``conv2d(DSQ(x), DSQ(weight)) + bias`` in float32, forward values hard-quantized.
    Eval mode calls ``effconv::qconv2d`` with the hard codes, which are computed from the parameters when
    the layer enters eval mode (``.eval()``, ``.train(False)``), after ``load_state_dict`` in eval mode,
    and by :meth:`refresh_codes` (call it after changing parameters in eval mode). They are
    non-persistent buffers: ``weight_codes`` (int8, signed), ``weight_scale``, ``weight_zero_point``
    (K,), ``act_scale``, ``act_zero_point`` (); see the module docstring for their meaning.
    The op has no autograd formula: backpropagate in training mode.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        weight_bits: int = 4,
        act_bits: int = 4,
        act_range: tuple[float, float] | None = None,
        alpha: float = DEFAULT_ALPHA,
    ):
        layer = "DSQConv2d"
        _check(isinstance(groups, int) and groups >= 1, layer, "groups", groups, "an int >= 1")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            _check(
                isinstance(value, int) and value >= 1 and value % groups == 0,
                layer, name, value, f"a positive multiple of groups={groups}",
            )
        kernel_size = _pair(layer, "kernel_size", kernel_size, 1)
        stride = _pair(layer, "stride", stride, 1)
        padding = _pair(layer, "padding", padding, 0)
        dilation = _pair(layer, "dilation", dilation, 1)
        weight_shape = (out_channels, in_channels // groups, *kernel_size)
        super().__init__(layer, weight_shape, weight_shape, bias, weight_bits, act_bits, act_range, alpha)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        weight_bits: int = 4,
        act_bits: int = 4,
        act_range: tuple[float, float] | None = None,
        alpha: float = DEFAULT_ALPHA,
    ) -> "DSQConv2d":
        """A DSQConv2d with ``conv``'s weight and bias, weight ranges at each output channel's min and max."""
        if conv.padding == "same":
            total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            _check(
                all(t % 2 == 0 for t in total), "DSQConv2d.from_conv", "padding", conv.padding,
                "integer, or 'same' with an odd effective kernel (DSQ pads both sides equally)",
            )
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, _integer_padding(conv),
            conv.dilation, conv.groups, conv.bias is not None, weight_bits, act_bits, act_range, alpha,
        )
        return layer._load_float_layer(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = self._quantized_input(x)
            return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self._qconv2d(x, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, weight_bits={self.weight_bits}, act_bits={self.act_bits}"
        )


class DSQLinear(_DSQLayer):
    """A drop-in nn.Linear replacement trained with DSQ-quantized weights and activations.

    Parameters, buffers and modes as :class:`DSQConv2d`, with ``weight`` (out_features, in_features) and
    ``bias`` as nn.Linear (its state dict loads into this layer), so one weight range per output
    feature. Inputs are (*, in_features). Training mode: ``linear(DSQ(x), DSQ(weight)) + bias``. Eval mode
    runs the input as (N, in_features, 1, 1) through ``effconv::qconv2d`` with (out_features, in_features,
    1, 1) codes, a 1x1 conv, and reshapes the result back: the compiler needs no op of its own for it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_bits: int = 4,
        act_bits: int = 4,
        act_range: tuple[float, float] | None = None,
        alpha: float = DEFAULT_ALPHA,
    ):
        layer = "DSQLinear"
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, layer, name, value, "an int >= 1")
        super().__init__(
            layer, (out_features, in_features), (out_features, in_features, 1, 1), bias, weight_bits, act_bits,
            act_range, alpha,
        )
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weight_bits: int = 4,
        act_bits: int = 4,
        act_range: tuple[float, float] | None = None,
        alpha: float = DEFAULT_ALPHA,
    ) -> "DSQLinear":
        """A DSQLinear with ``linear``'s weight and bias, weight ranges at each output feature's min and max."""
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, weight_bits, act_bits, act_range, alpha
        )
        return layer._load_float_layer(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.linear(self._quantized_input(x), self.quantized_weight(), self.bias)
        # A wrong width would still reshape (to other rows) and give silently wrong results.
        _check(
            x.dim() >= 1 and x.shape[-1] == self.in_features, "DSQLinear", "x.shape", tuple(x.shape),
            f"(*, {self.in_features})",
        )
        y = self._qconv2d(x.reshape(-1, self.in_features, 1, 1), (1, 1), (0, 0), (1, 1), 1)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight_bits={self.weight_bits}, act_bits={self.act_bits}"
        )


class DSQConversionReport(ConversionReport):
    """What :func:`convert_to_dsq` did to each nn.Conv2d (and nn.Linear with ``linear=True``), in module
    order; ``print`` it for a table."""

    def __str__(self) -> str:
        return "DSQ" + super().__str__().removeprefix("DSConv")


def convert_to_dsq(
    model: nn.Module,
    weight_bits: int = 4,
    act_bits: int = 4,
    skip_first_last: bool = True,
    skip: Iterable[str] = (),
    alpha: float = DEFAULT_ALPHA,
    linear: bool = False,
) -> DSQConversionReport:
    """Replace every eligible nn.Conv2d in ``model`` (recursively, in place) by ``DSQConv2d.from_conv``,
    and with ``linear`` every eligible nn.Linear by ``DSQLinear.from_linear``.

    Left as they are, each with its reason in the returned report:
    - with ``skip_first_last`` (as in the DSQ paper): the first candidate in module order (the first conv,
      or with ``linear`` the first conv or Linear: it sees the raw input) and the model's last weight layer
      (the last nn.Conv2d or nn.Linear in module order: the classifier, even when ``linear`` is off);
    - layers whose module path is in ``skip``;
    - subclasses of nn.Conv2d or nn.Linear (their forward may differ from the plain layer DSQ reproduces);
    - convs with a padding mode other than "zeros", or "same" padding that would be asymmetric.
    Without ``linear``, nn.Linear layers are not converted and not listed in the report.
    The activation ranges are set by the first training batch; train (fine-tune) before eval.
    """
    _check_bits("convert_to_dsq", "weight_bits", weight_bits)
    _check_bits("convert_to_dsq", "act_bits", act_bits)
    skip = set(skip)
    report = DSQConversionReport()
    weight_layers = [path for path, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    last = weight_layers[-1] if weight_layers else None
    kinds = (nn.Conv2d, nn.Linear) if linear else (nn.Conv2d,)
    candidates = [(path, module) for path, module in model.named_modules() if isinstance(module, kinds)]
    for index, (path, module) in enumerate(candidates):
        reason = _reason_to_leave(module, path, index, path == last, skip_first_last, skip)
        if reason is not None:
            report.entries.append(ConversionEntry(path, False, reason))
            continue
        if isinstance(module, nn.Linear):
            layer = DSQLinear.from_linear(module, weight_bits, act_bits, alpha=alpha)
        else:
            layer = DSQConv2d.from_conv(module, weight_bits, act_bits, alpha=alpha)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, layer)
        reason = (
            f"{weight_bits}-bit weights, {act_bits}-bit activations, {layer.storage_bits_per_weight:.2f} bits "
            f"per weight ({32 / layer.storage_bits_per_weight:.1f}x smaller than fp32)"
        )
        report.entries.append(ConversionEntry(path, True, reason))
    return report


def _reason_to_leave(module, path, index, is_last, skip_first_last, skip) -> str | None:
    is_conv = isinstance(module, nn.Conv2d)
    if not path:
        what, constructor = ("conv", "DSQConv2d.from_conv") if is_conv else ("Linear", "DSQLinear.from_linear")
        return f"the model itself is the {what} and cannot be replaced in place; use {constructor}"
    if skip_first_last and index == 0:
        first = (
            f"first conv ({module.in_channels} input channels: the image)" if is_conv
            else f"first weight layer ({module.in_features} input features: the raw input)"
        )
        return f"{first}, kept in float (skip_first_last=True)"
    if skip_first_last and is_last:
        return "last weight layer of the model (the classifier), kept in float (skip_first_last=True)"
    if path in skip:
        return "listed in skip"
    plain = nn.Conv2d if is_conv else nn.Linear
    if type(module) is not plain:
        return f"{type(module).__name__} is a subclass of {plain.__name__}; only plain {plain.__name__} is converted"
    if is_conv and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}; DSQ pads with zeros only"
    if is_conv and module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
        return "padding='same' with an even effective kernel needs asymmetric padding"
    return None
