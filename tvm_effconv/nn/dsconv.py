"""DSConv: distribution shifting convolution (Nascimento et al., 2019), the PyTorch side.

A DSConv weight is a fixed integer kernel (the VQK, ``weight_codes``, b-bit signed) shifted back towards
the float weight by two small trainable tensors: the kernel distribution shifter (KDS, one scale and
optionally one bias per block of ``block`` input channels, per output channel and kernel position) and
the channel distribution shifter (CDS, one scale and bias per output channel):

    w_hat[k, c, r, s] = kds_scale[k, c // block, r, s] * weight_codes[k, c, r, s] (+ kds_bias[...])
    y = cds_scale[k] * conv2d(x, w_hat) + cds_bias[k]

Blocks run over the input channels of one group (``C / groups`` of them); the last block may be short.
At inference the activations are quantized too (int8 with one calibrated scale, or block floating point
over the same channel blocks), so the sum inside each block is an integer dot product and floats are
multiplied once per (k, block, r, s, output position) instead of once per multiply-accumulate.

The inference op is the torch custom op ``effconv::dsconv2d``: it survives ``torch.export`` as one
node, and its eager implementation below is the reference that the TVM kernels are checked against.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LayerParameterError
from ..geometry import conv2d_output_size

__all__ = [
    "ACT_MODES",
    "ConversionEntry",
    "ConversionReport",
    "DSConv2d",
    "LayerParameterError",
    "calibrate_activations",
    "convert_to_dsconv",
    "dsconv2d",
    "quantize_activations",
]

ACT_MODES = ("int8", "bfp")
BIT_RANGE = (2, 8)


def _check(condition: bool, layer: str, name: str, value, allowed: str) -> None:
    if not condition:
        raise LayerParameterError(f"{layer}: {name}={value!r} is not allowed; {name} must be {allowed}")


def _signed_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _num_blocks(channels_per_group: int, block: int) -> int:
    return -(-channels_per_group // block)


def _expand_blocks(per_block: torch.Tensor, block: int, channels: int) -> torch.Tensor:
    """(K, nblocks, R, S) -> (K, channels, R, S): every channel takes its block's value."""
    return per_block.repeat_interleave(block, dim=1)[:, :channels]


def _split_blocks(per_channel: torch.Tensor, block: int) -> torch.Tensor:
    """(A, channels, ...) -> (A, nblocks, block, ...), the short last block padded with zeros."""
    channels = per_channel.shape[1]
    nblocks = _num_blocks(channels, block)
    padding = [0, 0] * (per_channel.dim() - 2) + [0, nblocks * block - channels]
    padded = F.pad(per_channel, padding)
    return padded.reshape(per_channel.shape[0], nblocks, block, *per_channel.shape[2:])


def quantize_activations(
    x: torch.Tensor, act_scale: torch.Tensor, act_mode: str, act_bits: int, block: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float32 activations (N, C, H, W) as the DSConv op does: ``x ~= x_q * s_x``.

    Returns ``x_q`` (int8, same shape as x, in [-2^(act_bits-1), 2^(act_bits-1) - 1]) and ``s_x``
    (float32, broadcastable to x): ``act_scale`` itself (shape ()) in "int8" mode, or one power of two
    per (n, group, channel block, h, w), repeated over the block's channels (shape of x), in "bfp" mode.
    Rounding is half to even.
    """
    _check(act_mode in ACT_MODES, "dsconv2d", "act_mode", act_mode, f"one of {ACT_MODES}")
    _check(BIT_RANGE[0] <= act_bits <= BIT_RANGE[1], "dsconv2d", "act_bits", act_bits, "in 2..8")
    low, high = _signed_range(act_bits)
    x = x.float()
    if act_mode == "int8":
        inverse_scale = 1.0 / act_scale.float()
        return torch.clamp(torch.round(x * inverse_scale), low, high).to(torch.int8), act_scale.float()

    batch, channels, height, width = x.shape
    channels_per_group = channels // groups
    # (N * groups, nblocks, block, H, W): the maximum runs over dim 2, the channels of one block.
    blocks = _split_blocks(x.reshape(batch * groups, channels_per_group, height, width), block)
    block_max = blocks.abs().amax(dim=2, keepdim=True)
    # The float32 exponent field gives e with block_max < 2^e; the scale leaves act_bits - 1 bits of
    # magnitude below 2^e, bounded below so that it stays a normal float32.
    exponent = ((block_max.view(torch.int32) >> 23) & 255) - 126
    scale_exponent = torch.clamp(exponent - (act_bits - 1), min=-126)
    scale = ((scale_exponent + 127) << 23).view(torch.float32)
    scale = scale.expand_as(blocks).reshape(batch * groups, -1, height, width)[:, :channels_per_group]
    scale = scale.reshape(batch, channels, height, width)
    # Dividing by a power of two is exact; an all-zero block quantizes to zeros whatever its scale.
    return torch.clamp(torch.round(x / scale), low, high).to(torch.int8), scale


@torch.library.custom_op("effconv::dsconv2d", mutates_args=())
def dsconv2d(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    kds_scale: torch.Tensor,
    kds_bias: torch.Tensor | None,
    cds_scale: torch.Tensor,
    cds_bias: torch.Tensor,
    act_scale: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    block: int,
    act_mode: str,
    act_bits: int,
) -> torch.Tensor:
    """DSConv inference, the reference: quantized activations, effective weight, conv, channel shift.

    x (N, C, H, W) float32; weight_codes (K, C/groups, R, S) int8; kds_scale and kds_bias (K, nblocks,
    R, S) float32, nblocks = ceil((C/groups) / block); cds_scale, cds_bias (K,); act_scale () float32,
    ignored in "bfp" mode. Computed in float64, returned as float32 (N, K, P, Q).
    """
    x_q, s_x = quantize_activations(x, act_scale, act_mode, act_bits, block, groups)
    x_hat = x_q.double() * s_x.double()
    channels_per_group = weight_codes.shape[1]
    w_hat = _expand_blocks(kds_scale.double(), block, channels_per_group) * weight_codes.double()
    if kds_bias is not None:
        w_hat = w_hat + _expand_blocks(kds_bias.double(), block, channels_per_group)
    y = F.conv2d(x_hat, w_hat, None, stride, padding, dilation, groups)
    y = cds_scale.double().view(1, -1, 1, 1) * y + cds_bias.double().view(1, -1, 1, 1)
    return y.float()


@dsconv2d.register_fake
def _dsconv2d_fake(
    x, weight_codes, kds_scale, kds_bias, cds_scale, cds_bias, act_scale, stride, padding, dilation, groups, block,
    act_mode, act_bits,
):
    out_size = conv2d_output_size(x.shape[2:], weight_codes.shape[2:], stride, padding, dilation)
    return x.new_empty(x.shape[0], weight_codes.shape[0], *out_size)


def _pair(layer: str, name: str, value, minimum: int) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    _check(
        len(pair) == 2 and all(isinstance(v, int) and v >= minimum for v in pair),
        layer, name, value, f"an int or a pair of ints, each >= {minimum}",
    )
    return pair


class DSConv2d(nn.Module):
    """A drop-in nn.Conv2d replacement with a fixed b-bit kernel and trainable distribution shifters.

    Buffers: ``weight_codes`` (int8, K x C/groups x R x S, the VQK, in [-2^(bits-1), 2^(bits-1) - 1];
    fixed, so training never changes it) and ``act_scale`` (float32 scalar, the int8 activation step,
    1.0 until :func:`calibrate_activations` sets it). Parameters: ``kds_scale`` (K x nblocks x R x S),
    ``kds_bias`` (same shape, if ``kds_bias=True``), ``cds_scale`` (K, starts at 1) and ``cds_bias``
    (K, starts at 0; trainable only with ``bias=True``, as a conv's bias).

    Storage: ``bits`` per weight for the codes plus 32 / ``block`` for the KDS scale (64 / ``block``
    with the KDS bias), e.g. 2 bits with blocks of 128: 2.25 bits per weight, 14x smaller than fp32;
    see :attr:`storage_bits_per_weight` for a layer's exact figure.

    Training mode computes ``cds_scale * conv2d(x, w_hat) + cds_bias`` in float32 with ``w_hat`` built
    from the fixed codes, so gradients reach the shifters only. With ``quantize_in_training=True`` the
    input is also fake-quantized as at inference, with a straight-through estimator (the gradient
    passes through the rounding and the clamp unchanged); int8 mode then needs a calibrated act_scale.
    Eval mode calls the ``effconv::dsconv2d`` op, which quantizes the activations (``act_mode`` "int8":
    one scale ``act_scale``; "bfp": a power-of-two scale per block of channels at each position, with
    ``act_bits`` bits). The op has no autograd formula: backpropagate in training mode.
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
        bits: int = 4,
        block: int = 32,
        kds_bias: bool = False,
        act_mode: str = "int8",
        act_bits: int = 8,
        quantize_in_training: bool = False,
    ):
        super().__init__()
        layer = "DSConv2d"
        _check(isinstance(bits, int) and BIT_RANGE[0] <= bits <= BIT_RANGE[1], layer, "bits", bits, "in 2..8")
        _check(
            isinstance(act_bits, int) and BIT_RANGE[0] <= act_bits <= BIT_RANGE[1],
            layer, "act_bits", act_bits, "in 2..8",
        )
        _check(isinstance(block, int) and block >= 1, layer, "block", block, "an int >= 1")
        _check(act_mode in ACT_MODES, layer, "act_mode", act_mode, f"one of {ACT_MODES}")
        _check(isinstance(groups, int) and groups >= 1, layer, "groups", groups, "an int >= 1")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            _check(
                isinstance(value, int) and value >= 1 and value % groups == 0,
                layer, name, value, f"a positive multiple of groups={groups}",
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(layer, "kernel_size", kernel_size, 1)
        self.stride = _pair(layer, "stride", stride, 1)
        self.padding = _pair(layer, "padding", padding, 0)
        self.dilation = _pair(layer, "dilation", dilation, 1)
        self.bits, self.block, self.act_mode, self.act_bits = bits, block, act_mode, act_bits
        self.quantize_in_training = quantize_in_training
        # Set by calibrate_activations: eval forward then runs on float activations, as the float
        # network the scales are taken from.
        self._observing = False

        channels_per_group = in_channels // groups
        nblocks = _num_blocks(channels_per_group, block)
        self.register_buffer(
            "weight_codes", torch.zeros(out_channels, channels_per_group, *self.kernel_size, dtype=torch.int8)
        )
        self.register_buffer("act_scale", torch.tensor(1.0))
        self.kds_scale = nn.Parameter(torch.ones(out_channels, nblocks, *self.kernel_size))
        self.kds_bias = nn.Parameter(torch.zeros_like(self.kds_scale)) if kds_bias else None
        self.cds_scale = nn.Parameter(torch.ones(out_channels))
        self.cds_bias = nn.Parameter(torch.zeros(out_channels), requires_grad=bias)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        bits: int = 4,
        block: int = 32,
        kds_bias: bool = False,
        act_mode: str = "int8",
        act_bits: int = 8,
        quantize_in_training: bool = False,
    ) -> "DSConv2d":
        """A DSConv2d approximating a trained ``conv`` without retraining.

        Per (k, block, r, s): the block's weights are scaled by 2^(bits-1) / max|w| and rounded, the
        codes clamped to [-2^(bits-1), 2^(bits-1) - 1] (the largest positive weight would otherwise
        round one past the range), and the KDS fitted by least squares over the block: alpha =
        sum(w q) / sum(q q), or with ``kds_bias`` the line alpha q + beta closest to w. An all-zero
        block gets codes and shifters 0. ``cds_scale`` = 1, ``cds_bias`` = the conv's bias (or 0).
        """
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, _integer_padding(conv),
            conv.dilation, conv.groups, conv.bias is not None, bits, block, kds_bias, act_mode, act_bits,
            quantize_in_training,
        ).to(conv.weight.device)
        channels_per_group = conv.in_channels // conv.groups
        with torch.no_grad():
            weight_blocks = _split_blocks(conv.weight.detach().double(), block)  # (K, nblocks, block, R, S)
            block_max = weight_blocks.abs().amax(dim=2, keepdim=True)
            low, high = _signed_range(bits)
            safe_max = torch.where(block_max > 0, block_max, 1.0)
            codes = torch.clamp(torch.round(weight_blocks * (2 ** (bits - 1) / safe_max)), low, high)
            alpha, beta = _least_squares_shift(weight_blocks, codes, channels_per_group, block, kds_bias)
            layer.weight_codes.copy_(codes.flatten(1, 2)[:, :channels_per_group].to(torch.int8))
            layer.kds_scale.copy_(alpha)
            if kds_bias:
                layer.kds_bias.copy_(beta)
            if conv.bias is not None:
                layer.cds_bias.copy_(conv.bias.detach())
        layer.train(conv.training)
        return layer

    @property
    def storage_bits_per_weight(self) -> float:
        """Bits stored per weight: the codes plus this layer's share of the float32 KDS tensors."""
        shifters = self.kds_scale.numel() * (1 if self.kds_bias is None else 2)
        return self.bits + 32 * shifters / self.weight_codes.numel()

    def effective_weight(self) -> torch.Tensor:
        """w_hat (K, C/groups, R, S) float32: the KDS applied to the codes, differentiable in the KDS."""
        channels_per_group = self.weight_codes.shape[1]
        w_hat = _expand_blocks(self.kds_scale, self.block, channels_per_group) * self.weight_codes.float()
        if self.kds_bias is not None:
            w_hat = w_hat + _expand_blocks(self.kds_bias, self.block, channels_per_group)
        return w_hat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self._observing:
            if self.training and self.quantize_in_training:
                x_q, s_x = quantize_activations(
                    x, self.act_scale, self.act_mode, self.act_bits, self.block, self.groups
                )
                x = x + (x_q.float() * s_x - x).detach()
            y = F.conv2d(x, self.effective_weight(), None, self.stride, self.padding, self.dilation, self.groups)
            return self.cds_scale.view(1, -1, 1, 1) * y + self.cds_bias.view(1, -1, 1, 1)
        return torch.ops.effconv.dsconv2d(
            x, self.weight_codes, self.kds_scale, self.kds_bias, self.cds_scale, self.cds_bias, self.act_scale,
            list(self.stride), list(self.padding), list(self.dilation), self.groups, self.block, self.act_mode,
            self.act_bits,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bits={self.bits}, "
            f"block={self.block}, kds_bias={self.kds_bias is not None}, act_mode={self.act_mode!r}, "
            f"act_bits={self.act_bits}"
        )


def _least_squares_shift(weight_blocks, codes, channels_per_group: int, block: int, with_bias: bool):
    """Per block, alpha (and beta) minimising sum (alpha q + beta - w)^2; shapes (K, nblocks, R, S)."""
    sum_wq = (weight_blocks * codes).sum(dim=2)
    sum_qq = (codes * codes).sum(dim=2)
    if not with_bias:
        alpha = torch.where(sum_qq > 0, sum_wq / torch.where(sum_qq > 0, sum_qq, 1.0), 0.0)
        return alpha.float(), None
    # Channels in each block (the last may be short); padded channels are zero in both sums.
    starts = torch.arange(codes.shape[1], dtype=torch.float64, device=codes.device) * block
    count = torch.clamp(channels_per_group - starts, max=block).view(1, -1, 1, 1)
    mean_w, mean_q = weight_blocks.sum(dim=2) / count, codes.sum(dim=2) / count
    covariance = sum_wq / count - mean_w * mean_q
    variance = sum_qq / count - mean_q * mean_q
    # Constant codes (variance 0, e.g. a one-channel block) leave beta alone to fit the mean.
    alpha = torch.where(variance > 1e-12, covariance / torch.where(variance > 1e-12, variance, 1.0), 0.0)
    return alpha.float(), (mean_w - alpha * mean_q).float()


def _integer_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """nn.Conv2d padding as (pad_h, pad_w); string padding when it is symmetric."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return 0, 0
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    _check(
        all(t % 2 == 0 for t in total), "DSConv2d.from_conv", "padding", conv.padding,
        "integer, or 'same' with an odd effective kernel (DSConv pads both sides equally)",
    )
    return total[0] // 2, total[1] // 2


@dataclass
class ConversionEntry:
    path: str
    swapped: bool
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert_to_dsconv` did to each nn.Conv2d, in module order; ``print`` it for a table."""

    entries: list[ConversionEntry] = field(default_factory=list)

    @property
    def swapped(self) -> list[str]:
        return [entry.path for entry in self.entries if entry.swapped]

    @property
    def left(self) -> list[str]:
        return [entry.path for entry in self.entries if not entry.swapped]

    def __str__(self) -> str:
        width = max([len(entry.path) for entry in self.entries] + [len("module")])
        lines = [f"DSConv conversion: {len(self.swapped)} swapped, {len(self.left)} left as they were"]
        lines.append(f"  {'module':<{width}}  {'action':<7}  reason")
        for entry in self.entries:
            action = "swapped" if entry.swapped else "left"
            lines.append(f"  {entry.path:<{width}}  {action:<7}  {entry.reason}")
        return "\n".join(lines)


def convert_to_dsconv(
    model: nn.Module,
    bits: int = 4,
    block: int = 32,
    act_mode: str = "int8",
    act_bits: int = 8,
    kds_bias: bool = False,
    skip_first: bool = True,
    skip: Iterable[str] = (),
) -> ConversionReport:
    """Replace every eligible nn.Conv2d in ``model`` (recursively, in place) by ``DSConv2d.from_conv``.

    Left as they are, each with its reason in the returned report:
    - the first conv in module order when ``skip_first`` (it sees the raw image: few input channels, so
      little to save, and its error reaches every later layer);
    - convs whose module path is in ``skip``;
    - subclasses of nn.Conv2d (their forward may differ from the plain conv DSConv reproduces);
    - convs with a padding mode other than "zeros", or "same" padding that would be asymmetric;
    - convs for which DSConv would not save memory: with few channels per group (depthwise: one),
      a float32 KDS scale per block costs more than the codes save.
    Run :func:`calibrate_activations` afterwards for int8 activations.
    """
    skip = set(skip)
    report = ConversionReport()
    convs = [(path, module) for path, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    for index, (path, conv) in enumerate(convs):
        reason = _reason_to_leave(conv, path, index, bits, block, kds_bias, skip_first, skip)
        if reason is not None:
            report.entries.append(ConversionEntry(path, False, reason))
            continue
        layer = DSConv2d.from_conv(conv, bits, block, kds_bias, act_mode, act_bits)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, layer)
        reason = (
            f"{bits}-bit codes, blocks of {min(block, conv.in_channels // conv.groups)} channels, "
            f"{layer.storage_bits_per_weight:.2f} bits per weight "
            f"({32 / layer.storage_bits_per_weight:.1f}x smaller than fp32)"
        )
        report.entries.append(ConversionEntry(path, True, reason))
    return report


def _reason_to_leave(conv, path, index, bits, block, kds_bias, skip_first, skip) -> str | None:
    if not path:
        return "the model itself is the conv and cannot be replaced in place; use DSConv2d.from_conv"
    if skip_first and index == 0:
        return f"first conv ({conv.in_channels} input channels: the image), kept in float (skip_first=True)"
    if path in skip:
        return "listed in skip"
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is a subclass of nn.Conv2d; only plain nn.Conv2d is converted"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}; DSConv pads with zeros only"
    if conv.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
        return "padding='same' with an even effective kernel needs asymmetric padding"
    channels_per_group = conv.in_channels // conv.groups
    nblocks = _num_blocks(channels_per_group, block)
    storage = bits + 32 * nblocks * (2 if kds_bias else 1) / channels_per_group
    if storage >= 32:
        return (
            f"{channels_per_group} input channel(s) per group: DSConv would store {storage:.1f} bits per "
            f"weight, no less than fp32"
        )
    return None


def calibrate_activations(
    model: nn.Module, batches: Iterable, percentile: float = 100.0
) -> dict[str, float]:
    """Set ``act_scale`` of every int8-mode DSConv2d in ``model`` from sample inputs; returns the scales.

    Runs ``batches`` (tensors, or tuples of model arguments) through the model in eval mode, with every
    DSConv2d computing on float activations meanwhile, so that each layer sees the float network's
    inputs. A forward pre-hook takes the ``percentile`` of |x| of each batch (100: the maximum); the
    scale is the largest over the batches divided by 2^(act_bits-1) - 1. A layer that only ever saw
    zeros gets scale 1 (any scale is exact for zeros). bfp-mode layers need no scale and are left out.
    Every module's training mode is restored afterwards.
    """
    _check(0 < percentile <= 100, "calibrate_activations", "percentile", percentile, "in (0, 100]")
    layers = {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, DSConv2d) and module.act_mode == "int8"
    }
    largest = {path: 0.0 for path in layers}

    def observer(path):
        def hook(module, args):
            magnitudes = args[0].detach().abs().flatten().float()
            if percentile == 100:
                statistic = magnitudes.max()
            else:
                rank = min(max(math.ceil(percentile / 100 * magnitudes.numel()), 1), magnitudes.numel())
                statistic = magnitudes.kthvalue(rank).values
            largest[path] = max(largest[path], statistic.item())

        return hook

    training_modes = {module: module.training for module in model.modules()}
    handles = [layer.register_forward_pre_hook(observer(path)) for path, layer in layers.items()]
    model.eval()
    try:
        for layer in layers.values():
            layer._observing = True
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for layer in layers.values():
            layer._observing = False
        for handle in handles:
            handle.remove()
        for module, training in training_modes.items():
            module.training = training

    scales = {}
    for path, layer in layers.items():
        scale = largest[path] / _signed_range(layer.act_bits)[1] if largest[path] > 0 else 1.0
        layer.act_scale.fill_(scale)
        scales[path] = layer.act_scale.item()
    return scales
