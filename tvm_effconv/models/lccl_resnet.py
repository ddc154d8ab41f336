"""ResNet-18 with LCCL basic blocks (Dong et al., CVPR 2017): the reference network of the LCCL op.

The layout is :class:`~tvm_effconv.models.resnet.ResNet18`'s; every basic block's two 3x3 convs are
LCCLConv2d (stem, downsample convs and classifier stay plain). ``width`` scales the channel counts (64 is the
standard network); small widths and ``size=32`` give quick variants for tests.
"""

import torch

from ..nn.lccl import calibrate_mask_sparsity, convert_to_lccl
from .examples import _randomize_batch_norm
from .resnet import ResNet18, _example_input


class LCCLResNet18(ResNet18):
    """ResNet-18 whose eight BasicBlocks are LCCLBasicBlocks with ``mode`` ("spatial" or "channel") masks."""

    def __init__(self, num_classes: int = 1000, width: int = 64, mode: str = "spatial", sparsity_weight: float = 0.0):
        super().__init__(num_classes, width)
        convert_to_lccl(self, mode, sparsity_weight=sparsity_weight)


def lccl_resnet18(
    batch: int = 1, size: int = 224, width: int = 64, mode: str = "spatial", sparsity: float = 0.5,
    num_classes: int = 1000,
):
    """An LCCL ResNet-18 (random weights, batch norms with non-trivial statistics), eval mode, whose masks are
    ``sparsity`` zero on the returned example input.

    Random weights give no realistic mask on their own, so :func:`~tvm_effconv.nn.lccl.calibrate_mask_sparsity`
    lowers each cheap BN's bias until round(sparsity * entries) of that layer's mask entries are zero on the
    example input (layer by layer, in one forward). Deterministic: fixed seeds for weights, statistics and input.
    """
    torch.manual_seed(0)
    model = _randomize_batch_norm(LCCLResNet18(num_classes, width, mode), seed=1)
    inputs = (_example_input(batch, size),)
    calibrate_mask_sparsity(model, inputs, sparsity)
    return model.eval(), inputs


def lccl_resnet18_small(mode: str = "spatial", sparsity: float = 0.5):
    """A narrow LCCL ResNet-18 (width 16, 10 classes, 32x32 inputs): every layer type of the reference network
    at a size the tests and the emulated device run quickly."""
    return lccl_resnet18(size=32, width=16, mode=mode, sparsity=sparsity, num_classes=10)
