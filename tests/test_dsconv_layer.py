"""DSConv2d against its own float math: the effconv::dsconv2d reference, training, conversion, calibration."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tvm_effconv.errors import EffconvError
from tvm_effconv.models.resnet import resnet18, resnet18_dsconv
from tvm_effconv.nn import (
    DSConv2d,
    LayerParameterError,
    calibrate_activations,
    convert_to_dsconv,
    quantize_activations,
)

# Odd on purpose: 3 channels per group in blocks of 2 (short last block), different H and W settings.
SHAPE = {
    "in_channels": 6, "out_channels": 4, "kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 2), "dilation": (2, 1)
}
GROUPS, BLOCK = 2, 2


def random_layer(kds_bias: bool, act_mode: str, bits: int = 4, act_bits: int = 8, seed: int = 0) -> DSConv2d:
    generator = torch.Generator().manual_seed(seed)
    layer = DSConv2d(
        **SHAPE, groups=GROUPS, bits=bits, block=BLOCK, kds_bias=kds_bias, act_mode=act_mode, act_bits=act_bits
    )
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    with torch.no_grad():
        layer.weight_codes.copy_(torch.randint(low, high + 1, layer.weight_codes.shape, generator=generator))
        layer.kds_scale.copy_(torch.rand(layer.kds_scale.shape, generator=generator) + 0.1)
        if kds_bias:
            layer.kds_bias.copy_(torch.randn(layer.kds_bias.shape, generator=generator) * 0.1)
        layer.cds_scale.copy_(torch.rand(4, generator=generator) + 0.5)
        layer.cds_bias.copy_(torch.randn(4, generator=generator))
        layer.act_scale.fill_(0.02)
    return layer


def random_input(seed: int = 1) -> torch.Tensor:
    x = torch.randn(2, 6, 7, 9, generator=torch.Generator().manual_seed(seed))
    x[1, 3:5, 2, :] = 0  # an all-zero bfp block (group 1, block 0) at some positions
    return x


def independent_quantization(x: np.ndarray, act_scale: float, act_mode: str, act_bits: int):
    """x_q and s_x per element, from the definitions, with numpy and math.frexp (no torch)."""
    low, high = -(2 ** (act_bits - 1)), 2 ** (act_bits - 1) - 1
    if act_mode == "int8":
        inverse = np.float32(1.0) / np.float32(act_scale)
        return np.clip(np.rint(x * inverse), low, high), np.full(x.shape, np.float32(act_scale), np.float64)
    channels_per_group = x.shape[1] // GROUPS
    x_q, s_x = np.zeros(x.shape), np.zeros(x.shape)
    for n in range(x.shape[0]):
        for g in range(GROUPS):
            for start in range(0, channels_per_group, BLOCK):
                channels = slice(g * channels_per_group + start, g * channels_per_group + min(start + BLOCK, 3))
                for h in range(x.shape[2]):
                    for w in range(x.shape[3]):
                        values = x[n, channels, h, w].astype(np.float64)
                        block_max = float(np.abs(values).max())
                        # max < 2^exponent; a zero block has the float32 zero's exponent field, 2^-126.
                        exponent = math.frexp(block_max)[1] if block_max > 0 else -126
                        scale = 2.0 ** max(exponent - (act_bits - 1), -126)
                        x_q[n, channels, h, w] = np.clip(np.rint(values / scale), low, high)
                        s_x[n, channels, h, w] = scale
    return x_q, s_x


def loop_reference(layer: DSConv2d, x: torch.Tensor) -> np.ndarray:
    """y[n, k, p, q] = cds_s[k] * sum_b sum_rs s_x * (alpha * sum_{c in b} q x_q + beta * sum_{c in b} x_q)
    + cds_b[k], with explicit loops: the integer dot product per block, one float multiply-add after it."""
    x_q, s_x = independent_quantization(x.numpy(), layer.act_scale.item(), layer.act_mode, layer.act_bits)
    codes = layer.weight_codes.numpy().astype(np.int64)
    alpha = layer.kds_scale.detach().double().numpy()
    beta = None if layer.kds_bias is None else layer.kds_bias.detach().double().numpy()
    cds_s, cds_b = layer.cds_scale.detach().double().numpy(), layer.cds_bias.detach().double().numpy()
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = layer.stride, layer.padding, layer.dilation
    out_channels, channels_per_group, kernel_h, kernel_w = codes.shape
    batch, _, height, width = x.shape
    out_h = (height + 2 * pad_h - dil_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = (width + 2 * pad_w - dil_w * (kernel_w - 1) - 1) // stride_w + 1
    out_per_group = out_channels // GROUPS
    y = np.zeros((batch, out_channels, out_h, out_w))
    for n in range(batch):
        for k in range(out_channels):
            group = k // out_per_group
            for p in range(out_h):
                for q in range(out_w):
                    total = 0.0
                    for b, start in enumerate(range(0, channels_per_group, BLOCK)):
                        for r in range(kernel_h):
                            for s in range(kernel_w):
                                ih, iw = p * stride_h - pad_h + r * dil_h, q * stride_w - pad_w + s * dil_w
                                if not (0 <= ih < height and 0 <= iw < width):
                                    continue
                                channels = range(start, min(start + BLOCK, channels_per_group))
                                inputs = [int(x_q[n, group * channels_per_group + c, ih, iw]) for c in channels]
                                dot = sum(int(codes[k, c, r, s]) * v for c, v in zip(channels, inputs))
                                shifted = alpha[k, b, r, s] * dot
                                if beta is not None:
                                    shifted += beta[k, b, r, s] * sum(inputs)
                                total += s_x[n, group * channels_per_group + start, ih, iw] * shifted
                    y[n, k, p, q] = cds_s[k] * total + cds_b[k]
    return y


@pytest.mark.parametrize("act_mode", ["int8", "bfp"])
@pytest.mark.parametrize("kds_bias", [False, True])
def test_eval_op_matches_loop_reference(act_mode, kds_bias):
    layer = random_layer(kds_bias, act_mode).eval()
    x = random_input()
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 4, 3, 12)
    np.testing.assert_allclose(y.detach().numpy(), loop_reference(layer, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act_bits", [2, 4, 8])
@pytest.mark.parametrize("act_mode", ["int8", "bfp"])
def test_quantize_activations_integer_part_exact(act_mode, act_bits):
    x = random_input() * 3
    # Ties (n + 0.5 steps, which round to even) and saturating values.
    x[0, 0, 0, :5] = torch.tensor([0.01, 0.03, -0.05, 0.07, 100.0])
    act_scale = torch.tensor(0.02)
    x_q, s_x = quantize_activations(x, act_scale, act_mode, act_bits, BLOCK, GROUPS)
    expected_q, expected_s = independent_quantization(x.numpy(), 0.02, act_mode, act_bits)
    assert x_q.dtype == torch.int8
    np.testing.assert_array_equal(x_q.numpy(), expected_q)
    np.testing.assert_array_equal(np.broadcast_to(s_x.numpy(), x.shape), expected_s)
    assert x_q.min() >= -(2 ** (act_bits - 1)) and x_q.max() <= 2 ** (act_bits - 1) - 1


def test_int8_rounds_half_to_even():
    x = torch.tensor([0.25, 0.75, -0.25, -0.75, 1.25]).view(1, 5, 1, 1)
    x_q, _ = quantize_activations(x, torch.tensor(0.5), "int8", 8, 4, 1)
    assert x_q.flatten().tolist() == [0, 2, 0, -2, 2]


def test_bfp_zero_block_and_scales_are_powers_of_two():
    x = random_input()
    x_q, s_x = quantize_activations(x, torch.tensor(1.0), "bfp", 4, BLOCK, GROUPS)
    assert (x_q[1, 3:5, 2, :] == 0).all()
    mantissa, _ = np.frexp(s_x.numpy())
    assert (mantissa == 0.5).all()
    # Within a block the largest magnitude uses the top bit: 4 <= |x_q| <= 8 for 4 bits (-8 is in range).
    block_max = x_q[0, 0:2].abs().amax(dim=0)
    assert ((block_max >= 4) & (block_max <= 8)).all()


@pytest.mark.parametrize("kds_bias", [False, True])
def test_train_mode_is_cds_times_conv_with_effective_weight(kds_bias):
    layer = random_layer(kds_bias, "int8").train()
    x = random_input()
    codes, alpha = layer.weight_codes.float(), layer.kds_scale.detach()
    w_hat = torch.empty_like(codes)
    for c in range(codes.shape[1]):
        w_hat[:, c] = alpha[:, c // BLOCK] * codes[:, c]
        if kds_bias:
            w_hat[:, c] += layer.kds_bias.detach()[:, c // BLOCK]
    conv = F.conv2d(x, w_hat, None, SHAPE["stride"], SHAPE["padding"], SHAPE["dilation"], GROUPS)
    expected = layer.cds_scale.detach().view(1, -1, 1, 1) * conv + layer.cds_bias.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_shifters_not_codes():
    layer = random_layer(True, "int8").train()
    layer(random_input()).square().sum().backward()
    for name in ("kds_scale", "kds_bias", "cds_scale", "cds_bias"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    names = {name for name, _ in layer.named_parameters()}
    assert "weight_codes" not in names and not layer.weight_codes.requires_grad
    assert {name for name, _ in layer.named_buffers()} == {"weight_codes", "act_scale"}


@pytest.mark.parametrize("act_mode", ["int8", "bfp"])
def test_quantize_in_training_matches_eval_and_passes_gradient_straight_through(act_mode):
    layer = random_layer(False, act_mode)
    layer.quantize_in_training = True
    x = random_input().requires_grad_()
    y_train = layer.train()(x)
    torch.testing.assert_close(y_train, layer.eval()(x.detach()), rtol=1e-5, atol=1e-5)
    y_train.sum().backward()
    float_path = DSConv2d(**SHAPE, groups=GROUPS, block=BLOCK)
    float_path.load_state_dict(layer.state_dict())
    x_float = x.detach().clone().requires_grad_()
    float_path.train()(x_float).sum().backward()
    torch.testing.assert_close(x.grad, x_float.grad)


def reconstruction_error(conv: nn.Conv2d, bits: int, block: int, kds_bias: bool = False) -> float:
    layer = DSConv2d.from_conv(conv, bits, block, kds_bias)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert layer.weight_codes.min() == low and layer.weight_codes.max() <= high
    return ((layer.effective_weight() - conv.weight).norm() / conv.weight.norm()).item()


def test_from_conv_reconstruction_improves_with_bits():
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 8, 3, padding=1)
    errors = [reconstruction_error(conv, bits, block=16) for bits in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01 and errors[0] > 0.2
    assert reconstruction_error(conv, 2, 16, kds_bias=True) <= errors[0]
    # Smaller blocks fit better.
    assert reconstruction_error(conv, 4, 4) < reconstruction_error(conv, 4, 48)


def test_from_conv_keeps_bias_and_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(20, 6, 3, stride=2, padding=1, groups=2).eval()
    layer = DSConv2d.from_conv(conv, bits=8, block=8)  # 10 channels per group: blocks of 8 and 2
    assert not layer.training and layer.kds_scale.shape == (6, 2, 3, 3)
    torch.testing.assert_close(layer.cds_bias.detach(), conv.bias.detach())
    assert (layer.cds_scale == 1).all()
    x = torch.randn(2, 20, 9, 9)
    layer.act_scale.fill_(x.abs().max().item() / 127)
    with torch.no_grad():
        error = (layer(x) - conv(x)).norm() / conv(x).norm()
    assert error < 0.02


def test_from_conv_zero_block_and_same_padding():
    conv = nn.Conv2d(8, 2, 3, padding="same", bias=False)
    with torch.no_grad():
        conv.weight[:, :4] = 0
    for kds_bias in (False, True):
        layer = DSConv2d.from_conv(conv, bits=4, block=4, kds_bias=kds_bias)
        assert layer.padding == (1, 1) and layer.cds_bias.abs().sum() == 0
        assert (layer.weight_codes[:, :4] == 0).all() and (layer.kds_scale[:, 0] == 0).all()
        assert torch.isfinite(layer.effective_weight()).all()


def test_one_export_node_per_layer():
    model = nn.Sequential(
        DSConv2d(8, 16, 3, padding=1, block=4), nn.ReLU(), DSConv2d(16, 8, 1, bits=2, act_mode="bfp", kds_bias=True)
    ).eval()
    x = torch.randn(1, 8, 6, 6)
    exported = torch.export.export(model, (x,)).run_decompositions()
    calls = [node for node in exported.graph.nodes if node.op == "call_function"]
    assert [node.target for node in calls].count(torch.ops.effconv.dsconv2d.default) == 2
    assert not any("convolution" in str(node.target) for node in calls)
    torch.testing.assert_close(exported.module()(x), model(x))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1))
        self.reflect = nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return self.reflect(self.body(self.depthwise(self.stem(x))))


def test_convert_to_dsconv_report():
    model = Mixed()
    report = convert_to_dsconv(model, bits=4, block=16, skip=["body.2"])
    assert report.swapped == ["body.0"]
    assert report.left == ["stem", "depthwise", "body.2", "reflect"]
    assert isinstance(model.body[0], DSConv2d) and type(model.body[2]) is nn.Conv2d
    reasons = {entry.path: entry.reason for entry in report.entries}
    assert "first conv" in reasons["stem"] and "fp32" in reasons["depthwise"]
    assert "skip" in reasons["body.2"] and "reflect" in reasons["reflect"]
    text = str(report)
    assert "1 swapped, 4 left" in text and all(path in text for path in reasons)

    report = convert_to_dsconv(Mixed(), bits=4, block=16, skip_first=False)
    assert report.swapped == ["stem", "body.0", "body.2"]
    assert convert_to_dsconv(nn.Conv2d(16, 16, 3), skip_first=False).left == [""]


def test_calibration_sets_max_over_batches():
    torch.manual_seed(0)
    model = nn.Sequential(
        DSConv2d.from_conv(nn.Conv2d(4, 8, 3, padding=1), block=4),
        nn.ReLU(),
        DSConv2d.from_conv(nn.Conv2d(8, 4, 1), block=4, act_bits=6),
        DSConv2d(4, 4, 1, act_mode="bfp"),
    )
    batches = [torch.randn(2, 4, 5, 5) for _ in range(3)]
    model.train()
    model[1].eval()  # a module in its own mode keeps it
    with torch.no_grad():
        hidden = torch.cat([torch.relu(model[0](b)) for b in batches])  # float activations, as calibration sees
    scales = calibrate_activations(model, batches)
    assert set(scales) == {"0", "2"}
    assert scales["0"] == pytest.approx(torch.cat(batches).abs().max().item() / 127)
    assert scales["2"] == pytest.approx(hidden.abs().max().item() / 31)
    assert model[0].act_scale.item() == pytest.approx(scales["0"])
    assert model.training and model[0].training and not model[1].training and not model[0]._observing

    lower = calibrate_activations(model, batches, percentile=99)
    assert lower["0"] < scales["0"]


def test_calibrated_converted_resnet_tracks_float():
    float_model, (x,) = resnet18(batch=2, size=32, width=16, num_classes=10)
    model, (x_dsconv,) = resnet18_dsconv(bits=8, block=16, size=32, batch=2, width=16, num_classes=10)
    assert torch.equal(x, x_dsconv) and not model.training
    assert all(0 < m.act_scale.item() < 1 for m in model.modules() if isinstance(m, DSConv2d))
    with torch.no_grad():
        expected, got = float_model(x), model(x)
    assert (got - expected).norm() / expected.norm() < 0.05


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"act_bits": 1}, "act_bits"),
        ({"act_bits": 16}, "act_bits"),
        ({"block": 0}, "block"),
        ({"act_mode": "fp8"}, "act_mode"),
        ({"groups": 3}, "in_channels"),
        ({"in_channels": 4, "out_channels": 6, "groups": 4}, "out_channels"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"stride": (1, 0)}, "stride"),
        ({"dilation": 0}, "dilation"),
        ({"padding": -1}, "padding"),
        ({"padding": (1, 1, 1)}, "padding"),
        ({"kernel_size": 1.5}, "kernel_size"),
    ],
)
def test_invalid_parameters_raise_clear_errors(kwargs, parameter):
    arguments = {"in_channels": 8, "out_channels": 8, "kernel_size": 3} | kwargs
    with pytest.raises(LayerParameterError) as info:
        DSConv2d(**arguments)
    assert f"{parameter}={arguments[parameter]!r}" in str(info.value) and "must be" in str(info.value)
    assert isinstance(info.value, EffconvError) and isinstance(info.value, ValueError)


def test_block_larger_than_channels_is_one_short_block():
    layer = DSConv2d(6, 4, 3, groups=2, block=64)
    assert layer.kds_scale.shape == (4, 1, 3, 3)
