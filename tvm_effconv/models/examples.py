"""Small example CNNs that exercise the standard layers every deployment needs: plain, grouped and
depthwise convs, batch norm, ReLU, max/avg pooling, a residual add and a linear classifier."""

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.grouped = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.grouped(x)))
        y = self.bn2(self.pointwise(self.depthwise(y)))
        return torch.relu(x + y)


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.pool = nn.MaxPool2d(2)
        self.block = ResidualBlock(width, groups=width // 8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.head(self.block(self.pool(self.stem(x))))


def _randomize_batch_norm(model: nn.Module, seed: int) -> nn.Module:
    """Give batch norms non-trivial statistics so that verification exercises their folding."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def small_cnn(batch: int = 1, size: int = 32):
    """The bundled example: a 10-class CNN on 32x32 RGB images."""
    torch.manual_seed(0)
    model = _randomize_batch_norm(SmallCNN(), seed=1).eval()
    return model, (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2)),)
