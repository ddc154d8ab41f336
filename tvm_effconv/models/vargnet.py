"""VarGNet (Zhang et al., 2019) for ImageNet-size inputs, without torchvision, and the shapes of its
variable group convs.

The layout is the paper's VarGNet v2 (ShuffleNet v2's stages with VarG blocks), with S the width
multiplier and channel counts rounded to multiples of ``group_base``; spatial sizes for 224 x 224:

    stem     3 x 3 conv, stride 2, 32S, BN, act                     112 x 112
    head     normal block, stride 2, factor 1, unit shortcut, 32S     56 x 56
    stage 2  downsample block -> 64S, then 2 normal blocks            28 x 28
    stage 3  downsample block -> 128S, then 6 normal blocks           14 x 14
    stage 4  downsample block -> 256S, then 3 normal blocks            7 x 7
    conv 1 x 1 -> 1024 * max(S, 1), BN, act; global average pool; fully connected

Every 3 x 3 conv after the stem is a VarGConv2d with group_base input channels per group; the normal
and downsample blocks use factor 2 (a group conv doubles the channels, the pointwise conv halves them).
"""

import torch
from torch import nn

from ..nn.dsconv import _check
from ..nn.varg import (
    VarGConv2d,
    VarGDownsampleBlock,
    VarGNormalBlock,
    make_activation,
    quantize_varg,
    standard_layers,
)
from .examples import _randomize_batch_norm

STEM_CHANNELS = 32
NORMAL_BLOCKS = (2, 6, 3)
HEAD_CHANNELS = 1024


def _round_channels(channels: float, multiple: int) -> int:
    """The multiple of ``multiple`` nearest to ``channels``, at least ``multiple``: every VarG conv needs
    its input channels divisible by group_base."""
    return max(multiple, int(channels / multiple + 0.5) * multiple)


class VarGNet(nn.Module):
    """The layout of the module docstring; ``normal_blocks`` gives the normal blocks of stages 2-4 and
    ``head_channels`` the last conv's width (default 1024 * max(S, 1)).

    Weights keep PyTorch's default initialisation: with it the random network's activations have a
    standard deviation of 0.1 to 0.5 after the stem, the head and every stage (fan-in Kaiming lets the
    residual sums grow to thousands by the last stage, too large for comparisons with useful tolerances).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_multiplier: float = 1.0,
        group_base: int = 8,
        activation: str = "prelu",
        normal_blocks=NORMAL_BLOCKS,
        head_channels: int | None = None,
    ):
        super().__init__()
        _check(width_multiplier > 0, "VarGNet", "width_multiplier", width_multiplier, "a number > 0")
        width = _round_channels(STEM_CHANNELS * width_multiplier, group_base)
        head_channels = head_channels or int(HEAD_CHANNELS * max(width_multiplier, 1.0))
        block_options = {"group_base": group_base, "activation": activation}
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), make_activation(activation, width)
        )
        self.head = VarGNormalBlock(width, width, stride=2, factor=1, **block_options)
        stages = []
        for repeats in normal_blocks:
            blocks = [VarGDownsampleBlock(width, 2 * width, **block_options)]
            width *= 2
            blocks += [VarGNormalBlock(width, **block_options) for _ in range(repeats)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.last_conv = nn.Sequential(
            nn.Conv2d(width, head_channels, 1, bias=False), nn.BatchNorm2d(head_channels),
            make_activation(activation, head_channels),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last_conv(self.stages(self.head(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize_prelu(model: nn.Module, seed: int) -> nn.Module:
    """Per-channel PReLU slopes in [0.05, 0.45] instead of all 0.25, so that verification catches a
    slope applied to the wrong channel."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.PReLU):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.4 + 0.05)
    return model


def _build(batch: int, size: int, **options):
    torch.manual_seed(0)
    model = _randomize_prelu(_randomize_batch_norm(VarGNet(**options), seed=1), seed=3).eval()
    return model, (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2)),)


def vargnet(
    batch: int = 1, size: int = 224, width_multiplier: float = 1.0, num_classes: int = 1000, group_base: int = 8
):
    """A float VarGNet (random weights, batch norms and PReLUs with non-trivial values), eval mode."""
    return _build(batch, size, num_classes=num_classes, width_multiplier=width_multiplier, group_base=group_base)


def vargnet_small():
    """A narrow VarGNet (width 0.5: 16 to 128 channels, one normal block per stage, a 128-channel last conv,
    10 classes) on 32 x 32 inputs: every VarG layer type at a size tests run quickly."""
    return _build(1, 32, num_classes=10, width_multiplier=0.5, normal_blocks=(1, 1, 1), head_channels=128)


def vargnet_small_int8(weight_bits: int = 8):
    """:func:`vargnet_small` with every VarG conv quantized to int8 (``quantize_varg``, calibrated on four
    random batches and the example input)."""
    model, inputs = vargnet_small()
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(inputs[0].shape, generator=generator) for _ in range(4)] + [inputs[0]]
    quantize_varg(model, batches, weight_bits)
    return model, inputs


def vargnet_conv_shapes(model: nn.Module, example_input: torch.Tensor) -> list[dict]:
    """The workload of every VarGConv2d in ``model``, in execution order, from one forward pass of
    ``example_input`` (eval mode, no gradients; the model's training mode is restored).

    Each dict: ``name`` (module path), ``batch``, ``in_channels``, ``height``, ``width`` (of the input),
    ``out_channels``, ``kernel_size``, ``stride``, ``padding`` (pairs), ``groups``, ``group_base``
    (input channels per group), ``out_height``, ``out_width``.
    """
    shapes = []

    def recorder(name):
        def hook(module, args, output):
            batch, channels, height, width = args[0].shape
            shapes.append({
                "name": name, "batch": batch, "in_channels": channels, "height": height, "width": width,
                "out_channels": module.out_channels, "kernel_size": tuple(module.kernel_size),
                "stride": tuple(module.stride), "padding": tuple(module.padding), "groups": module.groups,
                "group_base": module.group_base, "out_height": output.shape[2], "out_width": output.shape[3],
            })

        return hook

    handles = [
        module.register_forward_hook(recorder(name))
        for name, module in model.named_modules()
        if isinstance(module, VarGConv2d)
    ]
    training_modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), standard_layers(model):  # the units' convs run as modules, so their hooks fire
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in training_modes.items():
            module.training = training
    return shapes
