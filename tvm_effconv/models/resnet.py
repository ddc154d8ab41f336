"""ResNet-18 without torchvision, in float and with DSConv or DSQ layers.

``width`` scales the channel counts (64 is the standard network); small widths and ``size=32`` give
quick variants for tests.
"""

import torch
from torch import nn

from ..nn import calibrate_activations, convert_to_dsconv, convert_to_dsq
from ..nn.dsq import DSQConv2d
from .examples import _randomize_batch_norm


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes=1000, width=64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers, cin = [], width
        for i, stage_width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, stage_width, stride), BasicBlock(stage_width, stage_width, 1)]
            cin = stage_width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def _example_input(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


def resnet18(batch: int = 1, size: int = 224, width: int = 64, num_classes: int = 1000):
    """A float ResNet-18 (random weights, batch norms with non-trivial statistics), eval mode."""
    torch.manual_seed(0)
    model = _randomize_batch_norm(ResNet18(num_classes, width), seed=1).eval()
    return model, (_example_input(batch, size),)


def resnet18_dsconv(
    bits: int = 4,
    block: int = 64,
    size: int = 224,
    batch: int = 1,
    width: int = 64,
    num_classes: int = 1000,
    act_mode: str = "int8",
    calibration_batches: int = 2,
):
    """ResNet-18 with every conv but the stem's converted to DSConv, activations calibrated, eval mode.

    The float network is :func:`resnet18`'s; the int8 activation scales come from
    ``calibration_batches`` fixed random batches of 2 images.
    """
    model, inputs = resnet18(batch, size, width, num_classes)
    convert_to_dsconv(model, bits, block, act_mode=act_mode, skip_first=True)
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 3, size, size, generator=generator) for _ in range(calibration_batches)]
    calibrate_activations(model, batches)
    return model.eval(), inputs


def resnet18_dsconv_small():
    """A narrow DSConv ResNet-18 (width 16, 10 classes, 32x32 inputs, 4 bits, blocks of 32): the
    reference network's every layer type at a size the tests and the emulated device run quickly."""
    return resnet18_dsconv(bits=4, block=32, size=32, width=16, num_classes=10)


def resnet18_dsq(bits: int = 4, size: int = 224, batch: int = 1, width: int = 64, num_classes: int = 1000):
    """ResNet-18 with DSQ at ``bits``/``bits`` (weights/activations) in every conv but the stem; the
    stem and the classifier stay float, as in the DSQ paper. Eval mode.

    The weight ranges start at each channel's min and max (``DSQConv2d.from_conv``); the activation
    ranges are set from a fixed random batch of 2 images (one training-mode forward of the DSQ layers
    alone: the batch norms keep their statistics). The network is not fine-tuned: it checks the
    compiler, not accuracy (bench/dsq_digits.py trains).
    """
    model, inputs = resnet18(batch, size, width, num_classes)
    convert_to_dsq(model, bits, bits)
    layers = [m for m in model.modules() if isinstance(m, DSQConv2d)]
    for layer in layers:
        layer.train()
    with torch.no_grad():
        model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3)))
    return model.eval(), inputs


def resnet18_dsq_small(bits: int):
    """A narrow DSQ ResNet-18 (width 16, 10 classes, 32x32 inputs) for the tests and the emulated device."""
    return resnet18_dsq(bits, size=32, width=16, num_classes=10)


def resnet18_dsq_small_2bit():
    return resnet18_dsq_small(2)


def resnet18_dsq_small_3bit():
    return resnet18_dsq_small(3)


def resnet18_dsq_small_4bit():
    return resnet18_dsq_small(4)
