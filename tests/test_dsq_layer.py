"""DSQConv2d, DSQLinear and dsq_quantize against their own float math: the soft step, the effconv::qconv2d
reference, its integer terms, export, conversion, validation and small training runs (one on real digits)."""

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tvm_effconv.errors import EffconvError
from tvm_effconv.nn import (
    DSQConv2d,
    LayerParameterError,
    convert_to_dsq,
    dsq_quantize,
    qconv2d_integer_terms,
)
from tvm_effconv.nn.dsq import DSQLinear, qconv2d_from_terms

ALL_BITS = [1, 2, 3, 4, 8]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention (10x slower when another job loads the CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hard_reference(x: np.ndarray, lower, upper, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Hard uniform quantization in float64 from the definition; also t = (x - l) / D."""
    step = (upper - lower) / (2**bits - 1)
    t = (x - lower) / step
    codes = (t >= 0.5).astype(np.float64) if bits == 1 else np.rint(t)
    return lower + np.clip(codes, 0, 2**bits - 1) * step, t


def away_from_ties(t: np.ndarray) -> np.ndarray:
    """Where t is not within 1e-4 of a rounding boundary (float32 and float64 may round those apart)."""
    return np.abs(t - np.floor(t) - 0.5) > 1e-4


@pytest.mark.parametrize("bits", ALL_BITS)
def test_forward_equals_hard_quantization(bits):
    x = torch.randn(4000, generator=torch.Generator().manual_seed(bits)) * 2
    value = dsq_quantize(x, torch.tensor(-1.3), torch.tensor(2.1), torch.tensor(0.3), bits)
    expected, t = hard_reference(x.double().numpy(), -1.3, 2.1, bits)
    keep = away_from_ties(t)
    assert keep.mean() > 0.99
    np.testing.assert_allclose(value.double().numpy()[keep], expected[keep], atol=1e-5)
    assert len(torch.unique(value)) == 2**bits

    # Per-output-channel ranges broadcast over a weight-shaped tensor.
    w = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(10 + bits))
    lower, upper = torch.tensor([-1.0, -0.5, 0.0]), torch.tensor([1.0, 0.7, 2.0])
    value = dsq_quantize(w, lower.view(-1, 1, 1, 1), upper.view(-1, 1, 1, 1), 0.2, bits)
    for k in range(3):
        expected, t = hard_reference(w[k].double().numpy(), lower[k].item(), upper[k].item(), bits)
        keep = away_from_ties(t)
        np.testing.assert_allclose(value[k].double().numpy()[keep], expected[keep], atol=1e-5)


def test_one_bit_is_the_sign():
    x = torch.tensor([-2.0, -1e-3, 0.0, 1e-3, 3.0])
    assert dsq_quantize(x, -1.0, 1.0, 0.2, 1).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    # An asymmetric range: l or u by the side of the midpoint 0.5.
    assert dsq_quantize(x + 0.5, -0.5, 1.5, 0.2, 1).tolist() == [-0.5, -0.5, 1.5, 1.5, 1.5]


def soft_reference(x, lower, upper, alpha, bits):
    """The paper's soft function, written from its definition with explicit k and s (float64)."""
    step = (upper - lower) / (2**bits - 1)
    k = torch.log(2 / alpha - 1) / step
    s = 1 / torch.tanh(0.5 * k * step)
    clipped = torch.clamp(x, lower.item(), upper.item())
    index = torch.clamp(torch.floor(((clipped - lower) / step).detach()), 0, 2**bits - 2)
    midpoint = lower + (index + 0.5) * step
    phi = s * torch.tanh(k * (clipped - midpoint))
    inside = lower + step * (index + (phi + 1) / 2)
    return torch.where(x < lower, lower, torch.where(x > upper, upper, inside))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_backward_follows_the_tanh_step(bits):
    x0 = torch.randn(3000, generator=torch.Generator().manual_seed(bits), dtype=torch.float64) * 1.5
    grads = []
    for dtype, function in ((torch.float32, dsq_quantize), (torch.float64, soft_reference)):
        x = x0.to(dtype, copy=True).requires_grad_()
        params = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in (-1.1, 1.9, 0.25)]
        weights = torch.linspace(0.5, 1.5, x0.numel(), dtype=dtype)  # a loss that is not symmetric
        (function(x, *params, bits) * weights).sum().backward()
        grads.append([x.grad.double()] + [p.grad.double() for p in params])
    (x_grad, l_grad, u_grad, alpha_grad), (x_ref, l_ref, u_ref, alpha_ref) = grads
    np.testing.assert_allclose(x_grad.numpy(), x_ref.numpy(), rtol=2e-4, atol=1e-5)
    for got, expected in ((l_grad, l_ref), (u_grad, u_ref), (alpha_grad, alpha_ref)):
        assert got.item() == pytest.approx(expected.item(), rel=2e-3, abs=1e-3) and got.item() != 0

    # The derivative in x is s k D / 2 * sech^2(k (x - m_i)) inside [l, u], and zero outside.
    step = 3.0 / (2**bits - 1)
    k_step = np.log(2 / 0.25 - 1)
    t = (x0.numpy() + 1.1) / step
    index = np.clip(np.floor(t), 0, 2**bits - 2)
    analytic = k_step / np.tanh(k_step / 2) / 2 / np.cosh(np.clip(k_step * (t - index - 0.5), -50, 50)) ** 2
    inside = (x0.numpy() > -1.1) & (x0.numpy() < 1.9)
    weights = np.linspace(0.5, 1.5, x0.numel())
    np.testing.assert_allclose(x_grad.numpy()[inside], (analytic * weights)[inside], rtol=2e-4)
    assert (x_grad.numpy()[inside] > 0).all() and (x_grad.numpy()[~inside] == 0).all()


def test_layer_gradients_reach_ranges_and_alpha_and_alpha_stays_bounded():
    torch.manual_seed(0)
    layer = DSQConv2d(4, 6, 3, padding=1, groups=2, weight_bits=2, act_bits=3)
    x = torch.relu(torch.randn(2, 4, 6, 6))
    layer(x).square().mean().backward()
    assert layer.act_range_initialized and layer.act_lower.item() == 0.0
    assert layer.act_upper.item() == pytest.approx(x.max().item())
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name

    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    for _ in range(10):
        optimizer.zero_grad()
        (-layer(x).abs().mean() - layer.weight_alpha - layer.act_alpha).backward()
        optimizer.step()
        for alpha in (layer.weight_alpha, layer.act_alpha):
            assert 0 < alpha.item() < 0.5
    # Saturated logits stay usable: alpha is clamped into (0, 0.5] inside the quantizer.
    with torch.no_grad():
        layer.weight_alpha_logit.fill_(-1e3)
        layer.act_alpha_logit.fill_(1e3)
    assert torch.isfinite(layer(x)).all()


# Odd on purpose: 3 channels per group, stride 2, asymmetric padding and dilation, odd H and W.
SHAPE = {"in_channels": 6, "out_channels": 4, "kernel_size": (3, 2), "stride": 2, "padding": (1, 2), "dilation": (1, 2)}
GROUPS = 2
BIT_PAIRS = [(1, 1), (1, 4), (2, 3), (3, 2), (4, 1), (4, 4), (8, 8)]


def random_layer(weight_bits, act_bits, bias, act_lower, seed=0) -> DSQConv2d:
    generator = torch.Generator().manual_seed(seed)
    layer = DSQConv2d(**SHAPE, groups=GROUPS, bias=bias, weight_bits=weight_bits, act_bits=act_bits)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
        layer.init_weight_range()
        layer.weight_lower.mul_(0.8)  # some weights clip
        if bias:
            layer.bias.copy_(torch.randn(4, generator=generator))
        layer.act_lower.fill_(act_lower)
        layer.act_upper.fill_(1.7)
    return layer


def independent_codes(values: np.ndarray, lower: float, upper: float, bits: int) -> np.ndarray:
    """Unsigned codes as documented: t = x / D + (-l / D) in float32, half to even (sign at 1 bit)."""
    lower32, upper32 = np.float32(lower), np.float32(upper)
    step = (upper32 - lower32) / np.float32(2**bits - 1)
    t = values.astype(np.float32) / step + (-lower32 / step)
    codes = (t >= 0.5).astype(np.int64) if bits == 1 else np.rint(t).astype(np.int64)
    return np.clip(codes, 0, 2**bits - 1)


def loop_reference(layer: DSQConv2d, x: torch.Tensor):
    """y = sum over taps inside the image of (l_a + D_a qa) (l_w + D_w qw) + bias, and the integer sums
    acc = sum qa qw (signed qw), act_sum = sum qa, weight_sum = sum qw, taps, with explicit loops."""
    wb, ab = layer.weight_bits, layer.act_bits
    a_low, a_high = layer.act_lower.item(), layer.act_upper.item()
    qa = independent_codes(x.numpy(), a_low, a_high, ab)
    w = layer.weight.detach().numpy()
    w_low, w_high = layer.weight_lower.detach().numpy(), layer.weight_upper.detach().numpy()
    qu = np.stack([independent_codes(w[k], w_low[k], w_high[k], wb) for k in range(4)])
    qw = qu - 2 ** (wb - 1)
    a_step = (a_high - a_low) / (2**ab - 1)
    w_step = (w_high.astype(np.float64) - w_low) / (2**wb - 1)
    bias = np.zeros(4) if layer.bias is None else layer.bias.detach().double().numpy()
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = layer.stride, layer.padding, layer.dilation
    batch, _, height, width = x.shape
    kernel_h, kernel_w = layer.kernel_size
    out_h = (height + 2 * pad_h - dil_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = (width + 2 * pad_w - dil_w * (kernel_w - 1) - 1) // stride_w + 1
    y = np.zeros((batch, 4, out_h, out_w))
    sums = {name: np.zeros((batch, 4, out_h, out_w), np.int64) for name in ("acc", "act_sum", "weight_sum", "taps")}
    for n in range(batch):
        for k in range(4):
            group = k // (4 // GROUPS)
            for p in range(out_h):
                for q in range(out_w):
                    total = float(bias[k])
                    for c in range(3):
                        for r in range(kernel_h):
                            for s in range(kernel_w):
                                ih, iw = p * stride_h - pad_h + r * dil_h, q * stride_w - pad_w + s * dil_w
                                if not (0 <= ih < height and 0 <= iw < width):
                                    continue
                                a = int(qa[n, group * 3 + c, ih, iw])
                                total += (a_low + a_step * a) * (w_low[k] + w_step[k] * int(qu[k, c, r, s]))
                                sums["acc"][n, k, p, q] += a * int(qw[k, c, r, s])
                                sums["act_sum"][n, k, p, q] += a
                                sums["weight_sum"][n, k, p, q] += int(qw[k, c, r, s])
                                sums["taps"][n, k, p, q] += 1
                    y[n, k, p, q] = total
    return y, sums


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_bits, act_bits", BIT_PAIRS)
def test_eval_op_matches_loop_reference(weight_bits, act_bits, bias):
    act_lower = -0.3 if bias else 0.0  # a nonzero activation zero point exercises every correction term
    layer = random_layer(weight_bits, act_bits, bias, act_lower, seed=weight_bits * 10 + act_bits)
    x = torch.randn(2, 6, 7, 9, generator=torch.Generator().manual_seed(1))
    trained = layer(x)  # training mode: DSQ forward values, float32 conv
    layer.eval()
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 4, 4, 6)
    expected, sums = loop_reference(layer, x)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(trained.detach().numpy(), expected, rtol=1e-4, atol=1e-4)

    # Codes as documented: signed weights in int8, unsigned activation codes.
    low, high = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
    assert layer.weight_codes.dtype == torch.int8
    assert low <= layer.weight_codes.min() and layer.weight_codes.max() <= high
    terms = qconv2d_integer_terms(
        x, layer.weight_codes, layer.act_scale, layer.act_zero_point, layer.stride, layer.padding, layer.dilation,
        GROUPS, act_bits,
    )
    for name, value in terms._asdict().items():
        assert value.dtype == torch.int64
        assert np.array_equal(value.expand(2, 4, 4, 6).numpy(), sums[name]), name
    recombined = qconv2d_from_terms(
        terms, layer.weight_scale, layer.weight_zero_point, layer.act_scale, layer.act_zero_point, layer.bias
    )
    np.testing.assert_allclose(recombined.detach().numpy(), y.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_op_passes_opcheck():
    layer = random_layer(3, 2, True, -0.3).eval()
    args = (
        torch.randn(2, 6, 7, 9), layer.weight_codes, layer.weight_scale, layer.weight_zero_point, layer.act_scale,
        layer.act_zero_point, layer.bias.detach(), [2, 2], [1, 2], [1, 2], GROUPS, 3, 2,
    )
    torch.library.opcheck(torch.ops.effconv.qconv2d.default, args, test_utils=("test_schema", "test_faketensor"))


def test_one_export_node_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        DSQConv2d(4, 8, 3, padding=1), nn.ReLU(), DSQConv2d(8, 4, 1, bias=False, weight_bits=2, act_bits=2)
    )
    x = torch.randn(2, 4, 6, 6)
    model(x)  # sets the activation ranges
    model.eval()
    exported = torch.export.export(model, (x,)).run_decompositions()
    calls = [node for node in exported.graph.nodes if node.op == "call_function"]
    assert [node.target for node in calls].count(torch.ops.effconv.qconv2d.default) == 2
    assert not any("convolution" in str(node.target) for node in calls)
    torch.testing.assert_close(exported.module()(x), model(x))


def test_state_dict_round_trip_refreshes_codes():
    torch.manual_seed(0)
    layer = DSQConv2d(4, 4, 3, weight_bits=3, act_bits=4)
    x = torch.relu(torch.randn(1, 4, 5, 5))
    layer(x)
    state = layer.state_dict()
    assert "weight_codes" not in state and state["act_range_initialized"]
    fresh = nn.Sequential(DSQConv2d(4, 4, 3, weight_bits=3, act_bits=4)).eval()
    fresh.load_state_dict({f"0.{name}": value for name, value in state.items()})
    assert fresh[0]._act_range_ready
    torch.testing.assert_close(fresh(x), layer.eval()(x))


class Net(nn.Module):
    def __init__(self, linear_head: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding="same"), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=2))
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.head = nn.Conv2d(8, 10, 1)
        self.fc = nn.Linear(10, 10) if linear_head else None

    def forward(self, x):
        y = self.head(torch.relu(self.reflect(self.body(torch.relu(self.stem(x))))))
        return y if self.fc is None else self.fc(y.mean((2, 3)))


def test_convert_to_dsq_report():
    model = Net(linear_head=False)
    report = convert_to_dsq(model, weight_bits=2, act_bits=4, skip=["body.2"])
    assert report.swapped == ["body.0"]
    assert report.left == ["stem", "body.2", "reflect", "head"]
    assert isinstance(model.body[0], DSQConv2d) and model.body[0].padding == (1, 1)
    reasons = {entry.path: entry.reason for entry in report.entries}
    assert "first conv" in reasons["stem"] and "last weight layer" in reasons["head"]
    assert "skip" in reasons["body.2"] and "reflect" in reasons["reflect"]
    assert "2-bit weights, 4-bit activations" in reasons["body.0"]
    text = str(report)
    assert text.startswith("DSQ conversion: 1 swapped, 4 left") and all(path in text for path in reasons)

    report = convert_to_dsq(Net(linear_head=True), weight_bits=8, act_bits=8)
    assert report.swapped == ["body.0", "body.2", "head"]  # the Linear is the last layer now
    report = convert_to_dsq(Net(linear_head=False), skip_first_last=False)
    assert report.swapped == ["stem", "body.0", "body.2", "head"]
    assert convert_to_dsq(nn.Conv2d(8, 8, 3), skip_first_last=False).left == [""]


def test_from_conv_at_eight_bits_tracks_the_float_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2)
    layer = DSQConv2d.from_conv(conv, weight_bits=8, act_bits=8)
    x = torch.relu(torch.randn(2, 8, 9, 9))
    with torch.no_grad():
        expected, trained = conv(x), layer(x)
        evaluated = layer.eval()(x)
    assert (trained - expected).norm() / expected.norm() < 0.02
    torch.testing.assert_close(evaluated, trained, rtol=1e-4, atol=1e-4)
    assert torch.equal(layer.weight_lower, conv.weight.flatten(1).amin(1))


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"weight_bits": 0}, "weight_bits"),
        ({"weight_bits": 5}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"act_bits": 6}, "act_bits"),
        ({"act_bits": "4"}, "act_bits"),
        ({"groups": 3}, "in_channels"),
        ({"in_channels": 4, "out_channels": 6, "groups": 4}, "out_channels"),
        ({"groups": 0}, "groups"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"stride": (1, 0)}, "stride"),
        ({"padding": -1}, "padding"),
        ({"dilation": 0}, "dilation"),
        ({"act_range": (1.0, 1.0)}, "act_range"),
        ({"act_range": (2.0, -1.0)}, "act_range"),
        ({"alpha": 0.5}, "alpha"),
        ({"alpha": 0.0}, "alpha"),
    ],
)
def test_invalid_layer_parameters_raise_clear_errors(kwargs, parameter):
    arguments = {"in_channels": 8, "out_channels": 8, "kernel_size": 3} | kwargs
    with pytest.raises(LayerParameterError) as info:
        DSQConv2d(**arguments)
    assert f"DSQConv2d: {parameter}={arguments[parameter]!r} is not allowed" in str(info.value)
    assert "must be" in str(info.value)
    assert isinstance(info.value, EffconvError) and isinstance(info.value, ValueError)


def test_invalid_function_and_op_arguments_raise_clear_errors():
    x = torch.randn(5)
    cases = [
        (lambda: dsq_quantize(x, 0.0, 1.0, 0.2, 5), "dsq_quantize: bits=5", "in {1, 2, 3, 4, 8}"),
        (lambda: dsq_quantize(x, 1.0, 1.0, 0.2, 2), "(lower, upper)=(1.0, 1.0)", "lower < upper"),
        (lambda: dsq_quantize(x, torch.tensor([0.0, 2.0]).view(2, 1), 1.0, 0.2, 2), "(2.0, 1.0)", "lower < upper"),
        (lambda: dsq_quantize(x, 0.0, 1.0, 0.75, 2), "alpha=0.75", "in (0, 0.5]"),
        (lambda: convert_to_dsq(Net(False), weight_bits=6), "convert_to_dsq: weight_bits=6", "{1, 2, 3, 4, 8}"),
        (lambda: DSQConv2d.from_conv(nn.Conv2d(4, 4, 2, padding="same")), "padding='same'", "odd effective"),
    ]
    layer = random_layer(2, 2, False, 0.0).eval()
    op_args = [torch.randn(1, 6, 5, 5), layer.weight_codes, layer.weight_scale, layer.weight_zero_point,
               layer.act_scale, layer.act_zero_point, None, [1, 1], [0, 0], [1, 1], GROUPS]
    cases += [
        (lambda: torch.ops.effconv.qconv2d(*op_args, 5, 2), "qconv2d: weight_bits=5", "{1, 2, 3, 4, 8}"),
        (lambda: torch.ops.effconv.qconv2d(*op_args[:1], op_args[1].float(), *op_args[2:], 2, 2),
         "weight_codes.dtype=torch.float32", "torch.int8"),
        (lambda: torch.ops.effconv.qconv2d(torch.randn(1, 4, 5, 5), *op_args[1:], 2, 2), "x.shape=(1, 4, 5, 5)",
         "(N, 6, H, W)"),
    ]
    for call, named, allowed in cases:
        with pytest.raises(LayerParameterError) as info:
            call()
        assert named in str(info.value) and allowed in str(info.value), str(info.value)


def test_tiny_model_trains():
    """A 2-layer DSQ net (2-bit weights, 4-bit activations) fits a float teacher; the loss falls."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 1, 3, padding=1))
    x = torch.randn(16, 2, 8, 8)
    with torch.no_grad():
        target = teacher(x)
    student = nn.Sequential(
        DSQConv2d(2, 8, 3, padding=1, weight_bits=4, act_bits=4), nn.ReLU(),
        DSQConv2d(8, 1, 3, padding=1, weight_bits=2, act_bits=4),
    )
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-2)
    losses = []
    for step in range(80):
        if step == 1:
            start = time.perf_counter()  # after the first step: torch.optim imports on first use
        optimizer.zero_grad()
        loss = F.mse_loss(student(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert time.perf_counter() - start < 5
    assert np.mean(losses[-5:]) < 0.3 * losses[0], losses[::10]
    student.eval()
    with torch.no_grad():
        assert F.mse_loss(student(x), target).item() < 0.3 * losses[0]


# --- DSQLinear ---


def test_linear_gradients_reach_weight_ranges_and_alpha():
    torch.manual_seed(0)
    layer = DSQLinear(6, 5, weight_bits=3, act_bits=2)
    x = torch.relu(torch.randn(4, 6))
    layer(x).square().mean().backward()
    assert layer.act_range_initialized and layer.act_lower.item() == 0.0
    assert layer.act_upper.item() == pytest.approx(x.max().item())
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"weight", "bias", "weight_lower", "weight_upper", "act_lower", "act_upper",
                     "weight_alpha_logit", "act_alpha_logit"}
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_bits, act_bits", BIT_PAIRS)
def test_linear_eval_equals_float_math_of_hard_quantization(weight_bits, act_bits, bias):
    """y = x_hat @ w_hat.T + bias with x_hat, w_hat the documented hard quantization (float64, numpy),
    in training mode and through effconv::qconv2d in eval mode, for inputs with two leading dimensions."""
    generator = torch.Generator().manual_seed(weight_bits * 10 + act_bits)
    act_range = (-0.3, 1.7) if bias else (0.0, 1.7)  # a nonzero zero point, and inputs clipped on both sides
    layer = DSQLinear(7, 5, bias=bias, weight_bits=weight_bits, act_bits=act_bits, act_range=act_range)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 7, generator=generator))
        layer.init_weight_range()
        layer.weight_lower.mul_(0.8)  # some weights clip
        if bias:
            layer.bias.copy_(torch.randn(5, generator=generator))
    x = 1.5 * torch.randn(2, 3, 7, generator=generator)
    trained = layer(x)
    layer.eval()
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 5)

    x_hat = act_range[0] + (act_range[1] - act_range[0]) / (2**act_bits - 1) * independent_codes(
        x.numpy(), *act_range, act_bits
    )
    w = layer.weight.detach().numpy()
    w_low, w_high = layer.weight_lower.detach().numpy(), layer.weight_upper.detach().numpy()
    w_hat = np.stack([
        w_low[k] + (w_high[k].astype(np.float64) - w_low[k]) / (2**weight_bits - 1)
        * independent_codes(w[k], w_low[k], w_high[k], weight_bits)
        for k in range(5)
    ])
    expected = x_hat @ w_hat.T + (layer.bias.detach().double().numpy() if bias else 0.0)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(trained.detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    assert x_hat.min() == act_range[0] and x_hat.max() == act_range[1]  # inputs clip at both ends

    # The codes the op takes: a 1x1 conv's, signed int8.
    assert layer.weight_codes.shape == (5, 7, 1, 1) and layer.weight_codes.dtype == torch.int8
    low, high = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
    assert low <= layer.weight_codes.min() and layer.weight_codes.max() <= high


def test_from_linear_copies_the_float_layer_and_tracks_it_at_eight_bits():
    torch.manual_seed(0)
    linear = nn.Linear(12, 6)
    layer = DSQLinear.from_linear(linear, weight_bits=8, act_bits=8)
    assert (layer.weight_bits, layer.act_bits, layer.training) == (8, 8, True)
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert torch.equal(layer.weight_lower, linear.weight.amin(1))
    assert torch.equal(layer.weight_upper, linear.weight.amax(1))
    x = torch.relu(torch.randn(4, 12))
    with torch.no_grad():
        expected, trained = linear(x), layer(x)
        evaluated = layer.eval()(x)
    assert (trained - expected).norm() / expected.norm() < 0.02
    torch.testing.assert_close(evaluated, trained, rtol=1e-4, atol=1e-4)
    assert "in_features=12, out_features=6, bias=True, weight_bits=8, act_bits=8" in repr(layer)

    # The mode and a missing bias carry over; an nn.Linear state dict loads into the layer.
    no_bias = DSQLinear.from_linear(nn.Linear(3, 2, bias=False).eval(), weight_bits=2, act_bits=2)
    assert no_bias.bias is None and not no_bias.training
    assert no_bias.weight_codes.abs().sum() > 0  # entering eval mode computed the codes
    fresh = DSQLinear(12, 6)
    missing = fresh.load_state_dict(linear.state_dict(), strict=False).missing_keys
    assert torch.equal(fresh.weight, linear.weight) and "weight" not in missing


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"weight_bits": 5}, "weight_bits"),
        ({"weight_bits": 0}, "weight_bits"),
        ({"act_bits": 6}, "act_bits"),
        ({"act_bits": True}, "act_bits"),
        ({"in_features": 0}, "in_features"),
        ({"out_features": 2.0}, "out_features"),
        ({"act_range": (1.0, 1.0)}, "act_range"),
        ({"alpha": 0.5}, "alpha"),
    ],
)
def test_linear_invalid_parameters_raise_clear_errors(kwargs, parameter):
    arguments = {"in_features": 8, "out_features": 4} | kwargs
    with pytest.raises(LayerParameterError) as info:
        DSQLinear(**arguments)
    assert f"DSQLinear: {parameter}={arguments[parameter]!r} is not allowed" in str(info.value)
    assert "must be" in str(info.value)


def test_from_linear_and_eval_input_errors():
    with pytest.raises(LayerParameterError, match=r"DSQLinear: weight_bits=6 is not allowed.*\{1, 2, 3, 4, 8\}"):
        DSQLinear.from_linear(nn.Linear(4, 4), weight_bits=6)
    layer = DSQLinear(8, 4, act_range=(0.0, 1.0)).eval()
    # 3 x 8 values would reshape to (N, 8, 1, 1) rows of other samples: refused instead.
    with pytest.raises(LayerParameterError, match=r"x.shape=\(4, 6\) is not allowed.*\(\*, 8\)"):
        layer(torch.randn(4, 6))
    assert layer(torch.randn(8)).shape == (4,)


def test_linear_exports_as_one_qconv2d_node():
    torch.manual_seed(0)
    model = nn.Sequential(DSQLinear(8, 16), nn.ReLU(), DSQLinear(16, 4, bias=False, weight_bits=2, act_bits=3))
    x = torch.randn(5, 8)
    model(x)  # sets the activation ranges
    model.eval()
    exported = torch.export.export(model, (x,)).run_decompositions()
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(str(torch.ops.effconv.qconv2d.default)) == 2
    assert not any(name in target for target in targets for name in ("addmm", "linear", "aten.mm", "convolution"))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_convert_to_dsq_converts_linear_layers_on_request():
    report = convert_to_dsq(Net(linear_head=True), linear=True)
    assert report.swapped == ["body.0", "body.2", "head"]
    assert report.left == ["stem", "reflect", "fc"]  # the Linear classifier is the last weight layer

    def mlp():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    model = mlp()
    report = convert_to_dsq(model, weight_bits=2, act_bits=3, linear=True)
    assert report.swapped == ["2"] and report.left == ["0", "4"]
    assert isinstance(model[2], DSQLinear) and (model[2].weight_bits, model[2].act_bits) == (2, 3)
    reasons = {entry.path: entry.reason for entry in report.entries}
    assert "first weight layer (6 input features" in reasons["0"] and "last weight layer" in reasons["4"]
    assert convert_to_dsq(mlp(), linear=False).entries == []  # Linears are not even considered
    assert convert_to_dsq(mlp(), linear=True, skip_first_last=False).swapped == ["0", "2", "4"]
    assert convert_to_dsq(mlp(), linear=True, skip_first_last=False, skip=["2"]).left == ["2"]

    class ScaledLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), ScaledLinear(4, 4), nn.Linear(4, 4))
    entry = convert_to_dsq(model, linear=True, skip_first_last=False).entries[1]
    assert not entry.swapped and "subclass of Linear" in entry.reason
    assert "DSQLinear.from_linear" in convert_to_dsq(nn.Linear(4, 4), linear=True, skip_first_last=False).entries[0].reason


def test_dsq_trains_a_digit_classifier():
    """Real data: a small CNN on 8x8 handwritten digits (scikit-learn's copy), DSQ 4/4 (one conv and one
    Linear quantized, as convert_to_dsq picks), trained from scratch for 60 steps; evaluated through the op."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # pixel values 0..16
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:500], order[500:800]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10),
    )
    report = convert_to_dsq(model, weight_bits=4, act_bits=4, linear=True)
    assert report.swapped == ["2", "5"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    start = time.perf_counter()
    for step in range(60):
        batch = train[(step % 5) * 100:(step % 5 + 1) * 100]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert time.perf_counter() - start < 15
    assert np.mean(losses[-5:]) < 0.3 * losses[0], losses[::10]
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    assert accuracy > 0.7, accuracy  # chance is 0.1
