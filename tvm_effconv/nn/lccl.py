"""LCCL: low-cost collaborative layer (Dong et al., "More is Less", CVPR 2017), the PyTorch side.

An LCCL conv runs a cheap conv beside the main one; each is followed by BN and ReLU, and the layer's output
is their elementwise product:

    V = relu(bn_main(conv(x, W_main))) * relu(bn_cheap(cheap(x)))

The cheap conv has one of two forms (``mode``):

- "spatial": R x S x C -> 1 with the main conv's stride, padding and dilation: one mask value per output
  position (n, p, q), broadcast over the K output channels;
- "channel": 1 x 1 x C -> K, reading the input at the centre tap of each main window, with the main conv's
  stride: one mask value per output element (n, k, p, q).

Where the mask is zero the main conv need not be computed at all. BN + ReLU alone make a good share of the
mask zero (the paper: 32% faster ResNets on average); an L1 regulariser on the mask can push it further.

At inference both BNs fold into their convs (weights and biases) and the layer is one torch custom op,
``effconv::lccl_conv2d`` (one node through ``torch.export``). Its eager implementation below is the
reference the TVM kernels are checked against; it computes the main conv only where the mask is non-zero.
"""

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import conv2d_output_size
from .dsconv import ConversionEntry, ConversionReport, _check, _integer_padding, _pair

__all__ = [
    "LCCL_MODES",
    "LCCLBasicBlock",
    "LCCLConv2d",
    "LCCLConversionReport",
    "calibrate_mask_sparsity",
    "convert_to_lccl",
    "lccl_conv2d",
    "lccl_mask_sparsity",
    "lccl_sparsity_loss",
]

LCCL_MODES = ("spatial", "channel")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_channel_mode_kernel(layer: str, kernel_size, dilation, mode: str) -> None:
    """The 1x1 cheap conv reads the centre tap of each main window, so the window needs a centre."""
    if mode != "channel":
        return
    extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel_size, dilation))
    _check(
        all(e % 2 == 1 for e in extent), layer, "kernel_size", tuple(kernel_size),
        f"such that the effective kernel dilation * (kernel_size - 1) + 1 is odd in 'channel' mode (the 1x1 "
        f"cheap conv reads the window's centre tap); with dilation={tuple(dilation)} it is {extent}",
    )


def _cheap_conv(x, weight, bias, kernel_size, stride, padding, dilation, mode: str) -> torch.Tensor:
    """The cheap conv's pre-activation, (N, 1, P, Q) in "spatial" mode, (N, K, P, Q) in "channel" mode."""
    if mode == "spatial":
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    # Padding by padding - centre (negative: cropping) puts the 1x1 tap on the centre of the main window.
    pad_h, pad_w = (p - d * (k - 1) // 2 for k, p, d in zip(kernel_size, padding, dilation))
    return F.conv2d(F.pad(x, (pad_w, pad_w, pad_h, pad_h)), weight, bias, stride)


def _check_lccl_conv2d(x, main_weight, main_bias, cheap_weight, cheap_bias, stride, padding, dilation, mode):
    """Validate the op's arguments; returns the output size (P, Q)."""
    op = "lccl_conv2d"
    _check(mode in LCCL_MODES, op, "mode", mode, f"one of {LCCL_MODES}")
    _check(main_weight.dim() == 4, op, "main_weight.shape", tuple(main_weight.shape), "(K, C, R, S)")
    out_channels, in_channels, *kernel_size = main_weight.shape
    stride = _pair(op, "stride", stride, 1)
    padding = _pair(op, "padding", padding, 0)
    dilation = _pair(op, "dilation", dilation, 1)
    _check(
        x.dim() == 4 and x.shape[1] == in_channels, op, "x.shape", tuple(x.shape),
        f"(N, {in_channels}, H, W) for main_weight of shape {tuple(main_weight.shape)}",
    )
    cheap_shape = (1, in_channels, *kernel_size) if mode == "spatial" else (out_channels, in_channels, 1, 1)
    _check(
        tuple(cheap_weight.shape) == cheap_shape, op, "cheap_weight.shape", tuple(cheap_weight.shape),
        f"{cheap_shape} in {mode!r} mode for main_weight of shape {tuple(main_weight.shape)}",
    )
    for name, bias, length in (("main_bias", main_bias, out_channels), ("cheap_bias", cheap_bias, cheap_shape[0])):
        shape = None if bias is None else tuple(bias.shape)
        _check(shape is None or shape == (length,), op, f"{name}.shape", shape, f"({length},), or no {name}")
    _check_channel_mode_kernel(op, kernel_size, dilation, mode)
    out_size = conv2d_output_size(x.shape[2:], kernel_size, stride, padding, dilation)
    _check(
        min(out_size) >= 1, op, "x.shape", tuple(x.shape),
        f"large enough for kernel {tuple(kernel_size)}, padding {padding}, dilation {dilation} (output {out_size})",
    )
    return out_size


@torch.library.custom_op("effconv::lccl_conv2d", mutates_args=())
def lccl_conv2d(
    x: torch.Tensor,
    main_weight: torch.Tensor,
    main_bias: torch.Tensor | None,
    cheap_weight: torch.Tensor,
    cheap_bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    mode: str,
) -> torch.Tensor:
    """LCCL inference (BNs folded into the convs), the reference: the main conv only where the mask is non-zero.

    x (N, C, H, W) float32; main_weight (K, C, R, S), main_bias (K,) or None; cheap_weight (1, C, R, S)
    in "spatial" mode or (K, C, 1, 1) in "channel" mode, cheap_bias (1,) or (K,) or None (None: zero).
    Zero padding, no groups. With main = conv2d(x, main_weight, main_bias, stride, padding, dilation):

        y[n, k, p, q] = relu(main[n, k, p, q]) * mask[n, k', p, q]     (k' = 0 "spatial", k' = k "channel")

        "spatial": mask = relu(conv2d(x, cheap_weight, cheap_bias, stride, padding, dilation))
        "channel": mask[n, k, p, q] = relu(cheap_bias[k] + sum_c cheap_weight[k, c, 0, 0]
                       * x[n, c, p * stride_h - pad_h + dil_h * (R - 1) / 2, q * stride_w - pad_w + dil_w * (S - 1) / 2])
                   (the centre tap of the main window, 0 outside the image; dil * (kernel - 1) must be even)

    Where mask == 0, main is not computed and y is exactly 0 (even where main would not be finite).
    Computed in float64, returned as float32 (N, K, P, Q), P, Q as for the main conv.
    """
    batch, out_channels = x.shape[0], main_weight.shape[0]
    out_size = _check_lccl_conv2d(x, main_weight, main_bias, cheap_weight, cheap_bias, stride, padding, dilation, mode)
    kernel_size = tuple(main_weight.shape[2:])
    x = x.double()
    cheap_bias = None if cheap_bias is None else cheap_bias.double()
    mask = torch.relu(_cheap_conv(x, cheap_weight.double(), cheap_bias, kernel_size, stride, padding, dilation, mode))
    mask = mask.flatten(2)  # (N, 1 or K, P * Q)
    # im2col: columns[n, :, position] is the main window of one output position, in main_weight's (c, r, s) order.
    columns = F.unfold(x, kernel_size, dilation, padding, stride)
    weight = main_weight.double().flatten(1)
    bias = main_bias.double() if main_bias is not None else weight.new_zeros(out_channels)
    y = x.new_zeros(batch, out_channels, mask.shape[2])
    if mode == "spatial":
        # One GEMM over the active positions, all K channels at each.
        n, position = mask[:, 0].nonzero(as_tuple=True)
        main = columns[n, :, position] @ weight.T + bias
        y[n, :, position] = torch.relu(main) * mask[n, 0, position].unsqueeze(1)
    else:
        # Per output channel, a dot product at the positions where that channel's mask is non-zero.
        for k in range(out_channels):
            n, position = mask[:, k].nonzero(as_tuple=True)
            main = columns[n, :, position] @ weight[k] + bias[k]
            y[n, k, position] = torch.relu(main) * mask[n, k, position]
    return y.view(batch, out_channels, *out_size).float()


@lccl_conv2d.register_fake
def _lccl_conv2d_fake(x, main_weight, main_bias, cheap_weight, cheap_bias, stride, padding, dilation, mode):
    out_size = _check_lccl_conv2d(x, main_weight, main_bias, cheap_weight, cheap_bias, stride, padding, dilation, mode)
    return x.new_empty(x.shape[0], main_weight.shape[0], *out_size)


def _init_like_conv2d(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """nn.Conv2d's default initialisation."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = weight[0].numel() ** -0.5
        nn.init.uniform_(bias, -bound, bound)


def _fold_batch_norm(weight, bias, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of conv followed by ``bn`` in eval mode, as one conv (folded in float64)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    folded_weight = weight.double() * scale.view(-1, 1, 1, 1)
    conv_bias = bias.double() if bias is not None else 0.0
    folded_bias = (conv_bias - bn.running_mean.double()) * scale + bn.bias.double()
    return folded_weight.float(), folded_bias.float()


class LCCLConv2d(nn.Module):
    """A conv + BN + ReLU with a low-cost collaborative conv + BN + ReLU beside it; output their product.

    Parameters: ``main_weight`` (K, C, R, S), ``main_bias`` (K,) with ``bias=True``, ``cheap_weight``
    ((1, C, R, S) in "spatial" mode, (K, C, 1, 1) in "channel" mode; no bias, its BN shifts it), and the two
    BatchNorm2d modules ``main_bn`` (K) and ``cheap_bn`` (1 or K). Initialised as nn.Conv2d and nn.BatchNorm2d.

    Training mode computes, in float32 with the BNs in their own mode (batch statistics while training),
    ``relu(main_bn(conv(x))) * mask`` with ``mask = relu(cheap_bn(cheap(x)))`` (geometry: :func:`lccl_conv2d`),
    so gradients reach both convs and both BNs. With ``sparsity_weight > 0`` the layer keeps the last
    training mask, and :meth:`sparsity_loss` gives ``sparsity_weight * mean(mask)`` (the mask's L1 norm per
    entry) for the training loop to add; :func:`lccl_sparsity_loss` sums it over a model.

    Eval mode calls ``effconv::lccl_conv2d`` with both BNs folded into the convs. The folded tensors are
    non-persistent buffers (``main_weight_folded``, ``main_bias_folded``, ``cheap_weight_folded``,
    ``cheap_bias_folded``), computed when the layer enters eval mode, after ``load_state_dict`` in eval
    mode, and by :meth:`fold_batch_norm` (call it after changing parameters in eval mode). The op has no
    autograd formula: backpropagate in training mode.

    :attr:`last_sparsity` is the fraction of zero mask entries in the last forward (one entry per output
    position in "spatial" mode, per output element in "channel" mode); in eval mode it costs one extra cheap
    conv in eager PyTorch and is not updated while compiling or exporting.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        mode: str = "spatial",
        bias: bool = False,
        sparsity_weight: float = 0.0,
        dilation=1,
    ):
        super().__init__()
        layer = "LCCLConv2d"
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            _check(_is_int(value) and value >= 1, layer, name, value, "a positive int")
        _check(mode in LCCL_MODES, layer, "mode", mode, f"one of {LCCL_MODES}")
        _check(isinstance(bias, bool), layer, "bias", bias, "True or False")
        _check(
            isinstance(sparsity_weight, (int, float)) and not isinstance(sparsity_weight, bool)
            and math.isfinite(sparsity_weight) and sparsity_weight >= 0,
            layer, "sparsity_weight", sparsity_weight, "a finite number >= 0",
        )
        self.kernel_size = _pair(layer, "kernel_size", kernel_size, 1)
        self.stride = _pair(layer, "stride", stride, 1)
        self.padding = _pair(layer, "padding", padding, 0)
        self.dilation = _pair(layer, "dilation", dilation, 1)
        _check_channel_mode_kernel(layer, self.kernel_size, self.dilation, mode)
        self.in_channels, self.out_channels, self.mode = in_channels, out_channels, mode
        self.sparsity_weight = float(sparsity_weight)

        cheap_shape = (1, in_channels, *self.kernel_size) if mode == "spatial" else (out_channels, in_channels, 1, 1)
        self.main_weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.main_bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.cheap_weight = nn.Parameter(torch.empty(cheap_shape))
        _init_like_conv2d(self.main_weight, self.main_bias)
        _init_like_conv2d(self.cheap_weight, None)
        self.main_bn = nn.BatchNorm2d(out_channels)
        self.cheap_bn = nn.BatchNorm2d(cheap_shape[0])
        for name, shape in (
            ("main_weight_folded", self.main_weight.shape), ("main_bias_folded", (out_channels,)),
            ("cheap_weight_folded", cheap_shape), ("cheap_bias_folded", (cheap_shape[0],)),
        ):
            self.register_buffer(name, torch.zeros(shape), persistent=False)
        self._last_mask = None  # the last training mask, kept (with its graph) only for sparsity_loss
        self._last_zero_fraction = None  # a tensor: no device sync in forward
        self.register_load_state_dict_post_hook(LCCLConv2d._after_load)
        self.fold_batch_norm()

    @classmethod
    def from_conv_bn(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, mode: str = "spatial", sparsity_weight: float = 0.0
    ) -> "LCCLConv2d":
        """An LCCLConv2d whose main path is ``relu(bn(conv(x)))``: the conv's weight and bias and the BN's
        parameters and statistics are copied; the cheap conv and its BN are freshly initialised (torch's
        global RNG: seed it for a deterministic layer). Keeps the conv's training mode."""
        layer = "LCCLConv2d.from_conv_bn"
        _check(conv.groups == 1, layer, "conv.groups", conv.groups, "1 (LCCL has no grouped form)")
        _check(conv.padding_mode == "zeros", layer, "conv.padding_mode", conv.padding_mode, "'zeros'")
        _check(
            conv.padding != "same" or all(d * (k - 1) % 2 == 0 for d, k in zip(conv.dilation, conv.kernel_size)),
            layer, "conv.padding", conv.padding, "integer, or 'same' with an odd effective kernel (LCCL pads both "
            "sides equally)",
        )
        _check(
            isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels and bn.affine
            and bn.track_running_stats,
            layer, "bn", bn, f"an affine nn.BatchNorm2d({conv.out_channels}) with running statistics",
        )
        lccl = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, _integer_padding(conv), mode,
            conv.bias is not None, sparsity_weight, conv.dilation,
        ).to(conv.weight.device)
        with torch.no_grad():
            lccl.main_weight.copy_(conv.weight)
            if conv.bias is not None:
                lccl.main_bias.copy_(conv.bias)
        lccl.main_bn.load_state_dict(bn.state_dict())
        return lccl.train(conv.training)

    @torch.no_grad()
    def fold_batch_norm(self) -> None:
        """Recompute the eval-mode buffers: each BN (running statistics, affine parameters) folded into its conv."""
        for prefix, weight, bias, bn in (
            ("main", self.main_weight, self.main_bias, self.main_bn), ("cheap", self.cheap_weight, None, self.cheap_bn)
        ):
            folded_weight, folded_bias = _fold_batch_norm(weight, bias, bn)
            getattr(self, f"{prefix}_weight_folded").copy_(folded_weight)
            getattr(self, f"{prefix}_bias_folded").copy_(folded_bias)

    def train(self, mode: bool = True) -> "LCCLConv2d":
        super().train(mode)
        if not mode:
            self.fold_batch_norm()
        return self

    @staticmethod
    def _after_load(module: "LCCLConv2d", incompatible_keys) -> None:
        if not module.training:
            module.fold_batch_norm()

    def __getstate__(self):
        # The kept mask is a non-leaf tensor, which deepcopy and pickle refuse; it only serves the next loss.
        state = super().__getstate__()
        return {**state, "_last_mask": None}

    def _cheap_conv(self, x, weight, bias) -> torch.Tensor:
        return _cheap_conv(x, weight, bias, self.kernel_size, self.stride, self.padding, self.dilation, self.mode)

    @torch.no_grad()
    def cheap_preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """The eval-mode mask before its ReLU (folded cheap conv, float64, as the op computes it)."""
        return self._cheap_conv(x.double(), self.cheap_weight_folded.double(), self.cheap_bias_folded.double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check(
            x.dim() == 4 and x.shape[1] == self.in_channels, "LCCLConv2d", "x.shape", tuple(x.shape),
            f"(N, {self.in_channels}, H, W) for in_channels={self.in_channels}",
        )
        if self.training:
            main = F.conv2d(x, self.main_weight, self.main_bias, self.stride, self.padding, self.dilation)
            mask = torch.relu(self.cheap_bn(self._cheap_conv(x, self.cheap_weight, None)))
            self._last_zero_fraction = (mask.detach() == 0).double().mean()
            self._last_mask = mask if self.sparsity_weight > 0 else None
            return torch.relu(self.main_bn(main)) * mask
        self._last_mask = None
        if not torch.compiler.is_compiling():
            self._last_zero_fraction = (torch.relu(self.cheap_preactivation(x)) == 0).double().mean()
        return torch.ops.effconv.lccl_conv2d(
            x, self.main_weight_folded, self.main_bias_folded, self.cheap_weight_folded, self.cheap_bias_folded,
            list(self.stride), list(self.padding), list(self.dilation), self.mode,
        )

    @property
    def last_sparsity(self) -> float | None:
        """Fraction of zero mask entries in the last forward (None before the first)."""
        return None if self._last_zero_fraction is None else self._last_zero_fraction.item()

    def sparsity_loss(self) -> torch.Tensor:
        """``sparsity_weight * mean(mask)`` of the last training forward, differentiable in the cheap conv and
        its BN: add it to the loss before ``backward``. A zero scalar when ``sparsity_weight`` is 0 or the last
        forward was in eval mode."""
        if self._last_mask is None:
            return self.cheap_weight.new_zeros(())
        return self.sparsity_weight * self._last_mask.mean()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, mode={self.mode!r}, bias={self.main_bias is not None}, "
            f"sparsity_weight={self.sparsity_weight}"
        )


class LCCLBasicBlock(nn.Module):
    """A ResNet basic block whose two 3x3 convs are LCCLConv2d (each with its own BN and ReLU):

        out = relu(conv2(conv1(x)) + identity),   identity = x, or downsample(x) (a plain 1x1 conv + BN)

    Unlike the float BasicBlock, the residual branch ``conv2(.)`` is a product of ReLU outputs, so it is
    non-negative before the add: LCCL is defined on ReLU outputs (a converted block needs fine-tuning).
    """

    def __init__(self, cin: int, cout: int, stride: int, mode: str = "spatial", sparsity_weight: float = 0.0):
        super().__init__()
        self.conv1 = LCCLConv2d(cin, cout, 3, stride, 1, mode, sparsity_weight=sparsity_weight)
        self.conv2 = LCCLConv2d(cout, cout, 3, 1, 1, mode, sparsity_weight=sparsity_weight)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    @classmethod
    def from_basic_block(cls, block: nn.Module, mode: str = "spatial", sparsity_weight: float = 0.0) -> "LCCLBasicBlock":
        """The LCCL block of a float ``BasicBlock`` (tvm_effconv.models.resnet): conv1 + bn1 and conv2 + bn2
        become the main paths (:meth:`LCCLConv2d.from_conv_bn`), the downsample is copied as it is."""
        lccl = cls(block.conv1.in_channels, block.conv1.out_channels, 1, mode, sparsity_weight)
        lccl.conv1 = LCCLConv2d.from_conv_bn(block.conv1, block.bn1, mode, sparsity_weight)
        lccl.conv2 = LCCLConv2d.from_conv_bn(block.conv2, block.bn2, mode, sparsity_weight)
        lccl.downsample = copy.deepcopy(block.downsample)
        return lccl.train(block.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.conv2(self.conv1(x)) + identity)


class LCCLConversionReport(ConversionReport):
    """What :func:`convert_to_lccl` did to each BasicBlock, in module order; ``print`` it for a table."""

    def __str__(self) -> str:
        return "LCCL" + super().__str__().removeprefix("DSConv")


def convert_to_lccl(
    model: nn.Module, mode: str = "spatial", skip: Iterable[str] = (), sparsity_weight: float = 0.0
) -> LCCLConversionReport:
    """Replace every ``BasicBlock`` (tvm_effconv.models.resnet) in ``model`` by ``LCCLBasicBlock.from_basic_block``,
    in place: the main convs and BNs keep their weights, the cheap convs start fresh (seed torch's RNG for a
    deterministic result). Left as they are, each with its reason in the report: blocks whose module path
    is in ``skip``, blocks whose conv1 or conv2 is no longer a plain nn.Conv2d (e.g. already DSConv2d), and
    the model itself if it is a block. The stem, downsample convs and classifier are never converted.
    """
    # Imported here, not at the top: models.resnet imports tvm_effconv.nn.
    from ..models.resnet import BasicBlock

    _check(mode in LCCL_MODES, "convert_to_lccl", "mode", mode, f"one of {LCCL_MODES}")
    skip = set(skip)
    report = LCCLConversionReport()
    blocks = [(path, module) for path, module in model.named_modules() if isinstance(module, BasicBlock)]
    for path, block in blocks:
        reason = _reason_to_leave_block(block, path, skip)
        if reason is not None:
            report.entries.append(ConversionEntry(path, False, reason))
            continue
        lccl = LCCLBasicBlock.from_basic_block(block, mode, sparsity_weight)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, lccl)
        convs = (lccl.conv1, lccl.conv2)
        # Both convs produce the same output positions, so the weight counts give the MAC ratio.
        cheap_share = sum(c.cheap_weight.numel() for c in convs) / sum(c.main_weight.numel() for c in convs)
        reason = f"conv1, conv2 -> LCCLConv2d, {mode} mask; the cheap convs cost {cheap_share:.1%} of the main MACs"
        report.entries.append(ConversionEntry(path, True, reason))
    return report


def _reason_to_leave_block(block, path: str, skip: set) -> str | None:
    if not path:
        return "the model itself is the block and cannot be replaced in place; use LCCLBasicBlock.from_basic_block"
    if path in skip:
        return "listed in skip"
    for name in ("conv1", "conv2"):
        conv = getattr(block, name)
        if type(conv) is not nn.Conv2d:
            return f"{name} is a {type(conv).__name__}, not a plain nn.Conv2d"
    return None


def _lccl_layers(model: nn.Module) -> dict[str, LCCLConv2d]:
    return {path: module for path, module in model.named_modules() if isinstance(module, LCCLConv2d)}


def lccl_mask_sparsity(model: nn.Module) -> dict[str, float | None]:
    """Each LCCLConv2d's :attr:`~LCCLConv2d.last_sparsity`, by module path."""
    return {path: layer.last_sparsity for path, layer in _lccl_layers(model).items()}


def lccl_sparsity_loss(model: nn.Module) -> torch.Tensor:
    """The sum of every LCCLConv2d's :meth:`~LCCLConv2d.sparsity_loss` after a training forward."""
    losses = [layer.sparsity_loss() for layer in _lccl_layers(model).values()]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def _sparsity_threshold(values: torch.Tensor, sparsity: float) -> float:
    """A t with round(sparsity * n) of the n values <= t, halfway between neighbours (or beyond the ends)."""
    ordered = values.flatten().double().sort().values
    count = round(sparsity * ordered.numel())
    margin = 1e-3 * (ordered.abs().max().item() + 1.0)
    extended = torch.cat([ordered[:1] - margin, ordered, ordered[-1:] + margin])
    return ((extended[count] + extended[count + 1]) / 2).item()


def calibrate_mask_sparsity(model: nn.Module, example_inputs: tuple, sparsity: float) -> dict[str, float]:
    """Shift every LCCLConv2d's cheap BN so that a fraction ``sparsity`` of its mask is zero on ``example_inputs``.

    One eval-mode forward of ``model(*example_inputs)``. Just before each LCCL layer runs, a forward
    pre-hook takes the folded cheap conv's pre-activations v on the layer's actual input (so each layer sees
    the earlier layers already calibrated), picks a threshold t halfway between the ``round(sparsity * n)``-th
    smallest of the n values and the next one (below the smallest for 0, above the largest for 1), and
    lowers ``cheap_bn.bias`` by t: exactly those entries end <= 0, where the ReLU zeros the mask. Ties (say,
    a constant input) can zero more. Returns each layer's measured zero fraction from that forward, by
    module path. Every module's training mode is restored afterwards.
    """
    _check(
        isinstance(sparsity, (int, float)) and 0 <= sparsity <= 1, "calibrate_mask_sparsity", "sparsity", sparsity,
        "in [0, 1]",
    )
    layers = _lccl_layers(model)

    def calibrate(layer, args):
        threshold = _sparsity_threshold(layer.cheap_preactivation(args[0]), sparsity)
        with torch.no_grad():
            layer.cheap_bn.bias -= threshold
        layer.fold_batch_norm()

    training_modes = {module: module.training for module in model.modules()}
    handles = [layer.register_forward_pre_hook(calibrate) for layer in layers.values()]
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in training_modes.items():
            module.training = training
    return lccl_mask_sparsity(model)
