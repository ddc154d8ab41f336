"""LCCLConv2d against its own float math: the effconv::lccl_conv2d reference after BN folding, training,
the sparsity regulariser and calibration, export, conversion of a ResNet and validation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tvm_effconv.errors import EffconvError
from tvm_effconv.models.lccl_resnet import LCCLResNet18, lccl_resnet18_small
from tvm_effconv.models.resnet import BasicBlock, resnet18
from tvm_effconv.nn.dsconv import DSConv2d, LayerParameterError
from tvm_effconv.nn.lccl import (
    LCCLBasicBlock,
    LCCLConv2d,
    calibrate_mask_sparsity,
    convert_to_lccl,
    lccl_conv2d,
    lccl_mask_sparsity,
    lccl_sparsity_loss,
)

MODES = ["spatial", "channel"]
# Odd on purpose: channels not multiples of 8, H != W, stride 2, asymmetric padding, a dilated even kernel
# (odd effective kernel, as "channel" mode needs), padding smaller than the window's centre offset (cropping).
GEOMETRIES = {
    "3x3 stride 2": {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 1},
    "odd": {"kernel_size": (2, 3), "stride": (1, 2), "padding": (2, 0), "dilation": (2, 1)},
    "1x1": {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention (10x slower when another job loads the CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_batch_norm(bn: nn.BatchNorm2d, generator: torch.Generator) -> None:
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=generator) * 0.3)
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.2)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)


def random_layer(mode: str, bias: bool, geometry: dict, seed: int = 0, **kwargs) -> LCCLConv2d:
    torch.manual_seed(seed)
    layer = LCCLConv2d(5, 7, mode=mode, bias=bias, **geometry, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    randomize_batch_norm(layer.main_bn, generator)
    randomize_batch_norm(layer.cheap_bn, generator)
    return layer


def random_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, 9, 11, generator=torch.Generator().manual_seed(seed))


def batch_norm_eval(y: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    view = (1, -1, 1, 1)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return (y - bn.running_mean.view(view)) * scale.view(view) + bn.bias.detach().view(view)


def cheap_conv_from_definition(layer: LCCLConv2d, x: torch.Tensor) -> torch.Tensor:
    """The cheap conv without BN. "channel" mode: the 1x1 weight placed at the centre of a kernel as large as
    the main conv's effective window, run with the main conv's stride and padding."""
    weight = layer.cheap_weight.detach()
    if layer.mode == "spatial":
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation)
    extent = [d * (k - 1) + 1 for k, d in zip(layer.kernel_size, layer.dilation)]
    window = weight.new_zeros(weight.shape[0], weight.shape[1], *extent)
    window[:, :, extent[0] // 2, extent[1] // 2] = weight[:, :, 0, 0]
    return F.conv2d(x, window, None, layer.stride, layer.padding)


def unfolded_math(layer: LCCLConv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(bn_main(conv(x))) * relu(bn_cheap(cheap(x))), BNs with running statistics, float32, unfolded."""
    main = F.conv2d(x, layer.main_weight.detach(), None if layer.main_bias is None else layer.main_bias.detach(),
                    layer.stride, layer.padding, layer.dilation)
    mask = torch.relu(batch_norm_eval(cheap_conv_from_definition(layer, x), layer.cheap_bn))
    return torch.relu(batch_norm_eval(main, layer.main_bn)) * mask


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=list(GEOMETRIES))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_eval_op_matches_unfolded_math(mode, bias, geometry):
    layer = random_layer(mode, bias, GEOMETRIES[geometry]).eval()
    x = random_input()
    with torch.no_grad():
        expected = unfolded_math(layer, x)
        y = layer(x)
    assert y.dtype == torch.float32 and y.shape == expected.shape and y.shape[:2] == (3, 7)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # A real test only with a mask that is partly zero and partly not.
    assert 0.1 < layer.last_sparsity < 0.9
    assert ((y == 0).float().mean() >= layer.last_sparsity).item()


@pytest.mark.parametrize("mode", MODES)
def test_train_path_with_running_statistics_equals_eval_op(mode):
    layer = random_layer(mode, True, GEOMETRIES["odd"]).train()
    layer.main_bn.eval()
    layer.cheap_bn.eval()
    x = random_input()
    with torch.no_grad():
        y_train = layer(x)
        assert layer.training and layer.main_weight_folded.abs().sum() > 0
        y_eval = layer.eval()(x)
    torch.testing.assert_close(y_eval, y_train, rtol=1e-5, atol=1e-5 * y_train.abs().max().item())


def test_fold_follows_parameters_on_eval_and_load():
    layer = random_layer("spatial", True, GEOMETRIES["3x3 stride 2"]).eval()
    x = random_input()
    before = layer(x)
    with torch.no_grad():
        layer.main_bn.bias.add_(1.0)
    layer.train().eval()
    assert not torch.equal(layer(x), before)

    loaded = LCCLConv2d(5, 7, 3, 2, 1, bias=True).eval()
    loaded.load_state_dict(layer.state_dict())
    assert {name for name in layer.state_dict() if "folded" in name} == set()
    torch.testing.assert_close(loaded(x), layer(x))


@pytest.mark.parametrize("mode", MODES)
def test_op_skips_the_main_conv_where_the_mask_is_zero(mode):
    """A NaN main bias poisons every main output that is computed: the reference must leave exactly the masked
    entries at 0 (relu(main) * 0 computed densely would be NaN there)."""
    layer = random_layer(mode, True, GEOMETRIES["3x3 stride 2"]).eval()
    x = random_input()
    mask = torch.relu(layer.cheap_preactivation(x)).expand(3, 7, -1, -1)
    poisoned = torch.full((7,), float("nan"))
    y = lccl_conv2d(x, layer.main_weight_folded, poisoned, layer.cheap_weight_folded, layer.cheap_bias_folded,
                    [2, 2], [1, 1], [1, 1], mode)
    assert ((mask == 0) & (y == 0)).sum() == (mask == 0).sum() > 0
    assert (torch.isnan(y) == (mask > 0)).all()


def test_op_without_biases():
    layer = random_layer("channel", False, GEOMETRIES["odd"]).eval()
    x = random_input()
    args = ([1, 2], [2, 0], [2, 1], "channel")
    y = lccl_conv2d(x, layer.main_weight_folded, None, layer.cheap_weight_folded, None, *args)
    zero = torch.zeros(7)
    torch.testing.assert_close(
        y, lccl_conv2d(x, layer.main_weight_folded, zero, layer.cheap_weight_folded, zero, *args), rtol=0, atol=0
    )
    assert (y != 0).any()


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_both_convs_and_both_batch_norms(mode):
    layer = random_layer(mode, True, GEOMETRIES["3x3 stride 2"]).train()
    layer(random_input()).square().sum().backward()
    for name in ("main_weight", "main_bias", "cheap_weight", "main_bn.weight", "main_bn.bias", "cheap_bn.weight",
                 "cheap_bn.bias"):
        grad = layer.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert 0 < layer.last_sparsity < 1


def test_sparsity_loss_is_weighted_mean_of_mask_and_trains_the_cheap_branch_only():
    layer = random_layer("spatial", False, GEOMETRIES["3x3 stride 2"], sparsity_weight=0.25).train()
    x = random_input()
    assert layer.sparsity_loss().item() == 0  # no training forward yet
    layer(x)
    with torch.no_grad():
        cheap = cheap_conv_from_definition(layer, x)
        mask = torch.relu(F.batch_norm(cheap, None, None, layer.cheap_bn.weight, layer.cheap_bn.bias, training=True))
    loss = layer.sparsity_loss()
    assert loss.item() == pytest.approx(0.25 * mask.mean().item(), rel=1e-5)
    assert lccl_sparsity_loss(nn.Sequential(layer)).item() == pytest.approx(loss.item())
    loss.backward()
    assert layer.cheap_weight.grad.abs().sum() > 0 and layer.main_weight.grad is None
    copy.deepcopy(layer)  # the kept mask (a non-leaf tensor) must not stop deepcopy

    unweighted = random_layer("spatial", False, GEOMETRIES["3x3 stride 2"]).train()
    unweighted(x)
    assert unweighted.sparsity_loss().item() == 0 and unweighted._last_mask is None


@pytest.mark.parametrize("mode", MODES)
def test_mask_all_open_and_all_closed(mode):
    layer = random_layer(mode, False, GEOMETRIES["3x3 stride 2"])
    x = random_input()
    with torch.no_grad():
        layer.cheap_weight.zero_()
        layer.cheap_bn.running_mean.zero_()
        layer.cheap_bn.bias.fill_(2.0)  # mask = 2 everywhere
    layer.eval()
    y = layer(x)
    assert layer.last_sparsity == 0.0
    main = F.conv2d(x, layer.main_weight_folded, layer.main_bias_folded, 2, 1)
    torch.testing.assert_close(y, 2 * torch.relu(main), rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        layer.cheap_bn.bias.fill_(-1.0)
    layer.fold_batch_norm()
    assert (layer(x) == 0).all() and layer.last_sparsity == 1.0
    assert (layer.train()(x) == 0).all() and layer.last_sparsity == 1.0


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 1.0])
def test_calibrate_mask_sparsity_hits_the_target_per_layer(sparsity):
    torch.manual_seed(0)
    model = nn.Sequential(
        LCCLConv2d(3, 8, 3, padding=1), LCCLConv2d(8, 6, 3, stride=2, padding=1, mode="channel"), nn.Flatten()
    )
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    model[1].eval()
    measured = calibrate_mask_sparsity(model, (x,), sparsity)
    # 2 x 10 x 10 spatial entries, 2 x 6 x 5 x 5 channel entries: round(sparsity * n) zeros each.
    assert measured == {"0": round(sparsity * 200) / 200, "1": round(sparsity * 300) / 300}
    assert model.training and model[0].training and not model[1].training
    model.eval()(x)
    assert lccl_mask_sparsity(model) == measured


@pytest.mark.parametrize("mode", MODES)
def test_small_resnet_factory(mode):
    model, (x,) = lccl_resnet18_small(mode)
    again, (x_again,) = lccl_resnet18_small(mode)
    assert not model.training and x.shape == (1, 3, 32, 32) and torch.equal(x, x_again)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(again(x), y, rtol=0, atol=0)
    assert y.shape == (1, 10) and torch.isfinite(y).all() and y.abs().max() > 0
    sparsity = lccl_mask_sparsity(model)
    assert len(sparsity) == 16
    # Layer 4 (1x1 outputs at 32x32, batch 1) has a single "spatial" mask entry, rounded to 0 zeros.
    assert all(value == 0.5 for path, value in sparsity.items() if not path.startswith(("layers.6", "layers.7")))


def test_export_one_node_per_layer():
    model = nn.Sequential(
        LCCLConv2d(4, 8, 3, padding=1, bias=True), LCCLConv2d(8, 6, 3, stride=2, padding=1, mode="channel")
    ).eval()
    x = torch.randn(2, 4, 7, 7)
    exported = torch.export.export(model, (x,)).run_decompositions()
    calls = [node for node in exported.graph.nodes if node.op == "call_function"]
    assert [node.target for node in calls].count(torch.ops.effconv.lccl_conv2d.default) == 2
    assert not any("convolution" in str(node.target) for node in calls)
    torch.testing.assert_close(exported.module()(x), model(x))


def test_resnet_exports_with_one_node_per_lccl_conv():
    model, (x,) = lccl_resnet18_small("channel")
    exported = torch.export.export(model, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.effconv.lccl_conv2d.default) == 16
    torch.testing.assert_close(exported.module()(x), model(x))


def test_convert_to_lccl_copies_main_path_and_reports():
    float_model, (x,) = resnet18(size=32, width=16, num_classes=10)
    reference = copy.deepcopy(float_model)
    torch.manual_seed(3)
    report = convert_to_lccl(float_model, "channel", skip=["layers.1"])
    model = float_model
    assert report.left == ["layers.1"] and len(report.swapped) == 7 and "skip" in report.entries[1].reason
    assert isinstance(model.layers[0], LCCLBasicBlock) and type(model.layers[1]) is BasicBlock
    assert "7 swapped, 1 left" in str(report) and str(report).startswith("LCCL conversion")
    # 3x3 main convs, 1x1 x C x K cheap convs: 1/9 of the MACs.
    assert "11.1%" in report.entries[0].reason

    block, original = model.layers[2], reference.layers[2]
    assert not block.training and block.conv1.mode == "channel" and block.conv1.stride == (2, 2)
    assert torch.equal(block.conv1.main_weight, original.conv1.weight)
    assert torch.equal(block.conv2.main_bn.running_var, original.bn2.running_var)
    assert torch.equal(block.downsample[0].weight, original.downsample[0].weight)
    # With the mask held at 1, conv1 is the float conv1 + bn1 + relu, and the block differs only by the ReLU
    # on its residual branch.
    for conv in (block.conv1, block.conv2):
        with torch.no_grad():
            conv.cheap_weight.zero_()
            conv.cheap_bn.running_mean.zero_()
            conv.cheap_bn.running_var.fill_(1 - conv.cheap_bn.eps)
            conv.cheap_bn.weight.fill_(1.0)
            conv.cheap_bn.bias.fill_(1.0)
        conv.fold_batch_norm()
    with torch.no_grad():
        h = model.layers[1](model.layers[0](model.stem(x)))
        hidden = torch.relu(original.bn1(original.conv1(h)))
        torch.testing.assert_close(block.conv1(h), hidden, rtol=1e-5, atol=1e-5)
        expected = torch.relu(torch.relu(original.bn2(original.conv2(hidden))) + original.downsample(h))
        torch.testing.assert_close(block(h), expected, rtol=1e-5, atol=1e-5)

    assert convert_to_lccl(model).swapped == ["layers.1"]
    assert convert_to_lccl(BasicBlock(4, 4, 1)).left == [""]
    dsconv_model, _ = resnet18(size=32, width=16, num_classes=10)
    dsconv_model.layers[0].conv2 = DSConv2d.from_conv(dsconv_model.layers[0].conv2)
    report = convert_to_lccl(dsconv_model)
    assert report.left == ["layers.0"] and "DSConv2d" in report.entries[0].reason


def test_lccl_resnet_trains_with_the_sparsity_regulariser():
    torch.manual_seed(0)
    model = LCCLResNet18(num_classes=10, width=8, sparsity_weight=0.01).train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = model(x).square().mean() + lccl_sparsity_loss(model)
    assert lccl_sparsity_loss(model).item() > 0
    loss.backward()
    assert all(layer.cheap_weight.grad.abs().sum() > 0 for layer in model.modules() if isinstance(layer, LCCLConv2d))
    assert all(value is not None and 0 < value < 1 for value in lccl_mask_sparsity(model).values())


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"mode": "spatiall"}, "mode"),
        ({"mode": None}, "mode"),
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": -2}, "out_channels"),
        ({"in_channels": 2.0}, "in_channels"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"kernel_size": (3, 3, 3)}, "kernel_size"),
        ({"kernel_size": (3, 2), "mode": "channel"}, "kernel_size"),
        ({"stride": 0}, "stride"),
        ({"padding": -1}, "padding"),
        ({"dilation": (1, 0)}, "dilation"),
        ({"sparsity_weight": -0.1}, "sparsity_weight"),
        ({"sparsity_weight": float("inf")}, "sparsity_weight"),
        ({"bias": "yes"}, "bias"),
    ],
)
def test_invalid_parameters_raise_clear_errors(kwargs, parameter):
    arguments = {"in_channels": 8, "out_channels": 8, "kernel_size": 3} | kwargs
    with pytest.raises(LayerParameterError) as info:
        LCCLConv2d(**arguments)
    assert f"{parameter}={arguments[parameter]!r}" in str(info.value) and "must be" in str(info.value)
    assert isinstance(info.value, EffconvError) and isinstance(info.value, ValueError)


def test_wrong_input_channels_at_forward():
    layer = LCCLConv2d(8, 4, 3, padding=1)
    for mode_layer in (layer.train(), layer.eval()):
        with pytest.raises(LayerParameterError, match=r"x.shape=\(1, 6, 5, 5\).*\(N, 8, H, W\)"):
            mode_layer(torch.randn(1, 6, 5, 5))


@pytest.mark.parametrize(
    "change, parameter",
    [
        ({"mode": "both"}, "mode"),
        ({"x": torch.randn(1, 5, 6, 6)}, "x.shape"),
        ({"x": torch.randn(4, 6, 6)}, "x.shape"),
        ({"x": torch.randn(1, 4, 1, 1)}, "x.shape"),  # smaller than the 3x3 window without padding
        ({"main_weight": torch.randn(6, 4, 3)}, "main_weight.shape"),
        ({"cheap_weight": torch.randn(6, 4, 1, 1)}, "cheap_weight.shape"),  # the "channel" shape in "spatial" mode
        ({"main_bias": torch.randn(5)}, "main_bias.shape"),
        ({"cheap_bias": torch.randn(6)}, "cheap_bias.shape"),
        ({"stride": [0, 1]}, "stride"),
        ({"padding": [1]}, "padding"),
        ({"main_weight": torch.randn(6, 4, 2, 2), "cheap_weight": torch.randn(6, 4, 1, 1), "cheap_bias": None,
          "mode": "channel"}, "kernel_size"),
    ],
)
def test_op_rejects_bad_arguments(change, parameter):
    arguments = {
        "x": torch.randn(1, 4, 6, 6), "main_weight": torch.randn(6, 4, 3, 3), "main_bias": None,
        "cheap_weight": torch.randn(1, 4, 3, 3), "cheap_bias": torch.randn(1), "stride": [1, 1], "padding": [0, 0],
        "dilation": [1, 1], "mode": "spatial",
    } | change
    with pytest.raises(LayerParameterError, match=rf"lccl_conv2d: {parameter}=.*must be"):
        lccl_conv2d(**arguments)
