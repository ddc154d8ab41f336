"""VarG layers and VarGNet against their definitions: group counts, per-group math, shapes, the blocks'
residual structure, training, validation, export as standard ops, and the full network's conv shapes."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tvm_effconv.errors import EffconvError, LayerParameterError
from tvm_effconv.models.vargnet import (
    VarGNet,
    vargnet,
    vargnet_conv_shapes,
    vargnet_small,
)
from tvm_effconv.nn.varg import (
    SqueezeExcitation,
    VarGConv2d,
    VarGDownsampleBlock,
    VarGNormalBlock,
    VarGSeparable,
    standard_layers,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: intra-op threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial batch norm statistics and affine terms and PReLU slopes, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                channels = layer.num_features
                layer.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
                layer.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
                layer.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                layer.bias.copy_(torch.randn(channels, generator=generator) * 0.1)
            elif isinstance(layer, nn.PReLU):
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 0.4 + 0.05)
    return module.eval()


def silence(batch_norm: nn.BatchNorm2d) -> None:
    """gamma = beta = 0: the batch norm outputs exact zeros, so its branch drops out of a sum."""
    with torch.no_grad():
        batch_norm.weight.zero_()
        batch_norm.bias.zero_()


def group_by_group_conv(x, weight, stride, padding, groups):
    """A grouped conv as ``groups`` independent dense convs over channel slices, concatenated."""
    cin, cout = x.shape[1] // groups, weight.shape[0] // groups
    return torch.cat([
        F.conv2d(x[:, g * cin:(g + 1) * cin], weight[g * cout:(g + 1) * cout], None, stride, padding)
        for g in range(groups)
    ], dim=1)


@pytest.mark.parametrize("group_base", [8, 16, 32])
def test_groups_follow_group_base(group_base):
    torch.manual_seed(0)
    layer = VarGConv2d(64, 128, 3, stride=2, group_base=group_base)
    assert layer.groups == 64 // group_base
    assert layer.weight.shape == (128, group_base, 3, 3)
    assert layer.bias is None and layer.padding == (1, 1)
    x = torch.randn(2, 64, 9, 7)
    expected = group_by_group_conv(x, layer.weight, 2, 1, 64 // group_base)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(
    "kernel_size, stride, padding, size, out_size",
    [
        (3, 1, None, (7, 9), (7, 9)),
        (3, 2, None, (7, 9), (4, 5)),
        (5, 2, None, (11, 6), (6, 3)),
        ((3, 5), (2, 1), None, (7, 9), (4, 9)),
        (3, 2, 0, (7, 9), (3, 4)),
    ],
)
def test_output_shapes(kernel_size, stride, padding, size, out_size):
    layer = VarGConv2d(24, 48, kernel_size, stride, padding, group_base=8, bias=True)
    y = layer(torch.randn(3, 24, *size))
    assert y.shape == (3, 48, *out_size)
    assert layer.bias.shape == (48,)


def test_output_factor_one_and_two():
    for out_channels, weight_shape in ((16, (16, 8, 3, 3)), (32, (32, 8, 3, 3)), (8, (8, 8, 3, 3))):
        layer = VarGConv2d(16, out_channels, 3)
        assert layer.groups == 2 and layer.weight.shape == weight_shape


def test_separable_unit_is_group_conv_bn_act_pointwise_bn_act():
    torch.manual_seed(0)
    for pointwise_activation in (True, False):
        unit = randomize(VarGSeparable(16, 24, stride=2, factor=2, pointwise_activation=pointwise_activation))
        assert unit.group_conv.groups == 2 and unit.group_conv.out_channels == 32 and unit.group_conv.stride == (2, 2)
        assert unit.pointwise.kernel_size == (1, 1) and unit.pointwise.groups == 1
        assert unit.pointwise.out_channels == 24
        x = torch.randn(2, 16, 7, 5)

        def bn(y, layer):
            return F.batch_norm(
                y, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
            )

        y = group_by_group_conv(x, unit.group_conv.weight, 2, 1, 2)
        y = F.prelu(bn(y, unit.group_bn), unit.group_act.weight)
        y = bn(F.conv2d(y, unit.pointwise.weight), unit.pointwise_bn)
        if pointwise_activation:
            y = F.prelu(y, unit.pointwise_act.weight)
        torch.testing.assert_close(unit(x), y)
        assert y.shape == (2, 24, 4, 3)
        assert (y < 0).any()  # the negative side is really there, so a missing or extra act shows


def test_normal_block_adds_identity_then_activates():
    torch.manual_seed(0)
    block = randomize(VarGNormalBlock(16, se_reduction=None))
    assert isinstance(block.shortcut, nn.Identity)
    assert isinstance(block.first.pointwise_act, nn.PReLU) and isinstance(block.second.pointwise_act, nn.Identity)
    assert block.first.group_conv.groups == 2 and block.second.group_conv.out_channels == 32
    x = torch.randn(2, 16, 7, 9)
    y = block(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, block.act(x))
    silence(block.second.pointwise_bn)  # the residual branch now adds exact zeros
    torch.testing.assert_close(block(x), F.prelu(x, block.act.weight), rtol=0, atol=0)


def test_head_style_normal_block_has_a_unit_shortcut():
    """Stride 2 with factor 1 (the network's head block): the shortcut is a stride-2 unit without act."""
    torch.manual_seed(0)
    block = randomize(VarGNormalBlock(16, 16, stride=2, factor=1))
    assert isinstance(block.shortcut, VarGSeparable) and isinstance(block.shortcut.pointwise_act, nn.Identity)
    assert [unit.group_conv.out_channels for unit in (block.first, block.second, block.shortcut)] == [16, 16, 16]
    assert block.first.group_conv.stride == (2, 2) and block.second.group_conv.stride == (1, 1)
    x = torch.randn(3, 16, 9, 7)
    assert block(x).shape == (3, 16, 5, 4)
    expected = F.prelu(block.shortcut(x), block.act.weight)
    silence(block.second.pointwise_bn)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


def test_downsample_block_structure():
    torch.manual_seed(0)
    block = randomize(VarGDownsampleBlock(16))
    units = {name: getattr(block, name) for name in ("branch_a", "branch_b", "fuse", "shortcut")}
    for name, unit in units.items():
        stride = 1 if name == "fuse" else 2
        in_channels = 32 if name == "fuse" else 16
        assert unit.group_conv.stride == (stride, stride), name
        assert unit.group_conv.in_channels == in_channels and unit.group_conv.groups == in_channels // 8, name
        assert unit.group_conv.out_channels == 2 * in_channels and unit.pointwise.out_channels == 32, name
        assert isinstance(unit.pointwise_act, nn.Identity), name
    x = torch.randn(2, 16, 9, 7)
    assert block(x).shape == (2, 32, 5, 4)

    # Without the shortcut: act(fuse(act(a(x) + b(x)))), both branches counted.
    merged = F.prelu(block.branch_a(x) + block.branch_b(x), block.merge_act.weight)
    silence(block.shortcut.pointwise_bn)
    torch.testing.assert_close(block(x), F.prelu(block.fuse(merged), block.act.weight))
    # Without the main path: act(shortcut(x)).
    block = randomize(VarGDownsampleBlock(16))
    expected = F.prelu(block.shortcut(x), block.act.weight)
    silence(block.fuse.pointwise_bn)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


def test_relu_option_and_squeeze_excitation():
    torch.manual_seed(0)
    block = randomize(VarGNormalBlock(16, activation="relu", se_reduction=4))
    assert not any(isinstance(module, nn.PReLU) for module in block.modules())
    x = torch.randn(2, 16, 5, 5)
    y = block(x)
    assert y.shape == x.shape and (y >= 0).all() and (y == 0).any()

    se = block.se
    assert isinstance(se, SqueezeExcitation) and se.reduce.out_channels == 4
    features = torch.randn(2, 16, 5, 5)
    squeezed = features.mean(dim=(2, 3))  # (N, C)
    gate = torch.sigmoid(F.relu(squeezed @ se.reduce.weight.flatten(1).T) @ se.expand.weight.flatten(1).T)
    torch.testing.assert_close(se(features), features * gate[:, :, None, None])


def test_gradients_reach_every_parameter():
    model, _ = vargnet_small()
    model.train()
    logits = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    F.cross_entropy(logits, torch.tensor([0, 3, 5, 9])).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "make, parameter, named, allowed",
    [
        (lambda: VarGConv2d(20, 40, 3, group_base=8), "group_base", "group_base=8",
         "in_channels=20 (one of [1, 2, 4, 5, 10, 20])"),
        (lambda: VarGConv2d(32, 30, 3, group_base=8), "out_channels", "out_channels=30",
         "groups = in_channels / group_base = 32 / 8 = 4"),
        (lambda: VarGConv2d(32, 64, 3, group_base=0), "group_base", "group_base=0", "an int >= 1"),
        (lambda: VarGConv2d(32, 64, 0), "kernel_size", "kernel_size=0", "each >= 1"),
        (lambda: VarGConv2d(32, 64, 3, stride=(2, 0)), "stride", "stride=(2, 0)", "each >= 1"),
        (lambda: VarGNormalBlock(20), "group_base", "group_base=8", "in_channels=20"),
        (lambda: VarGSeparable(16, 16, factor=0), "factor", "factor=0", "an int >= 1"),
        (lambda: VarGNormalBlock(16, activation="gelu"), "activation", "activation='gelu'", "('prelu', 'relu')"),
        (lambda: SqueezeExcitation(16, 3), "reduction", "reduction=3", "a divisor of channels=16"),
        (lambda: VarGNet(width_multiplier=0), "width_multiplier", "width_multiplier=0", "> 0"),
    ],
)
def test_invalid_parameters_fail_early_with_clear_errors(make, parameter, named, allowed):
    with pytest.raises(LayerParameterError) as info:
        make()
    message = str(info.value)
    assert named in message and f"{parameter} must be" in message and allowed in message, message
    assert isinstance(info.value, EffconvError) and isinstance(info.value, ValueError)


def test_small_vargnet_exports_each_unit_as_one_op():
    model, inputs = vargnet_small()
    exported = torch.export.export(model, inputs).run_decompositions()
    targets = Counter(str(node.target) for node in exported.graph.nodes if node.op == "call_function")
    units = [module for module in model.modules() if isinstance(module, VarGSeparable)]
    assert targets["effconv.varg_separable.default"] == len(units) == 3 + 3 * (4 + 2)
    grouped = [node for node in exported.graph.nodes
               if node.target == torch.ops.aten.convolution.default and node.args[8] > 1]
    assert grouped == []  # every VarG conv is inside a unit
    torch.testing.assert_close(exported.module()(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_small_vargnet_exports_as_standard_grouped_convolutions_with_standard_layers():
    model, inputs = vargnet_small()
    expected_logits = model(*inputs)
    assert expected_logits.shape == (1, 10) and torch.isfinite(expected_logits).all()
    with standard_layers(model):
        exported = torch.export.export(model, inputs).run_decompositions()
    calls = [node for node in exported.graph.nodes if node.op == "call_function"]
    targets = {str(node.target) for node in calls}
    assert not any("effconv" in target for target in targets)
    # prelu decomposes into gt/mul/where; everything else is a conv, a batch norm, an add or the classifier.
    standard = {
        "aten.convolution.default", "aten._native_batch_norm_legit_no_training.default", "aten.add.Tensor",
        "aten.gt.Scalar", "aten.mul.Tensor", "aten.where.self", "aten.mean.dim", "aten.view.default",
        "aten.permute.default", "aten.addmm.default", "<built-in function getitem>",
    }
    assert targets <= standard, targets - standard

    convolutions = [node for node in calls if node.target == torch.ops.aten.convolution.default]
    grouped = Counter(
        (node.args[0].meta["val"].shape[1], node.args[8]) for node in convolutions if node.args[8] > 1
    )
    varg_layers = [module for module in model.modules() if isinstance(module, VarGConv2d)]
    assert grouped == Counter((layer.in_channels, layer.in_channels // 8) for layer in varg_layers)
    assert sum(grouped.values()) == len(varg_layers) == 3 + 3 * (4 + 2)  # head; per stage downsample, normal
    assert all(channels // groups == 8 for channels, groups in grouped)
    torch.testing.assert_close(exported.module()(*inputs), expected_logits)


def test_factories_are_deterministic():
    (first, (x1,)), (second, (x2,)) = vargnet_small(), vargnet_small()
    assert torch.equal(x1, x2)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert not first.training
    slopes = torch.cat([m.weight for m in first.modules() if isinstance(m, nn.PReLU)])
    assert slopes.std() > 0.05  # per-channel slopes, not the uniform 0.25 default


# (C, H, W, K, stride, groups) -> count for VarGNet 1.0x, group_base 8, 224 x 224, from the layout table.
FULL_VARGNET_GROUP_CONVS = {
    (32, 112, 112, 32, 2, 4): 2,  # head block: first unit and shortcut
    (32, 56, 56, 32, 1, 4): 1,  # head block: second unit
    (32, 56, 56, 64, 2, 4): 3,  # stage 2 downsample: two branches and shortcut
    (64, 28, 28, 128, 1, 8): 1 + 2 * 2,  # stage 2: downsample fuse, 2 normal blocks of 2 units
    (64, 28, 28, 128, 2, 8): 3,
    (128, 14, 14, 256, 1, 16): 1 + 6 * 2,
    (128, 14, 14, 256, 2, 16): 3,
    (256, 7, 7, 512, 1, 32): 1 + 3 * 2,
}


def test_full_size_vargnet_forward_and_conv_shapes():
    model, (x,) = vargnet()
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert 1e-3 < logits.std() < 10  # random weights, yet activations of ordinary size at the end

    model.train()
    shapes = vargnet_conv_shapes(model, x)
    assert model.training and all(module.training for module in model.modules())
    assert not any(module._forward_hooks for module in model.modules())
    found = Counter(
        (s["in_channels"], s["height"], s["width"], s["out_channels"], s["stride"][0], s["groups"]) for s in shapes
    )
    assert found == Counter(FULL_VARGNET_GROUP_CONVS)
    for shape in shapes:
        assert shape["batch"] == 1 and shape["kernel_size"] == (3, 3) and shape["padding"] == (1, 1)
        assert shape["group_base"] == 8 and shape["in_channels"] == 8 * shape["groups"]
        assert shape["out_height"] == -(-shape["height"] // shape["stride"][0])
    names = [shape["name"] for shape in shapes]
    assert names[:3] == ["head.shortcut.group_conv", "head.first.group_conv", "head.second.group_conv"]
    assert model.last_conv[0].in_channels == 256 and model.last_conv[0].out_channels == 1024


@pytest.mark.parametrize("width_multiplier, group_base, stem, last", [(0.5, 16, 16, 1024), (1.5, 16, 48, 1536),
                                                                     (1.0, 32, 32, 1024)])
def test_width_multiplier_and_group_base(width_multiplier, group_base, stem, last):
    model, (x,) = vargnet(batch=2, size=64, width_multiplier=width_multiplier, num_classes=7, group_base=group_base)
    assert model.stem[0].out_channels == stem and model.last_conv[0].out_channels == last
    assert model.stages[-1][0].act.weight.shape == (8 * stem,)
    shapes = vargnet_conv_shapes(model, x)
    assert len(shapes) == 37
    assert all(s["group_base"] == group_base and s["in_channels"] == group_base * s["groups"] for s in shapes)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
