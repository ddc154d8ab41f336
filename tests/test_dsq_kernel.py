"""The DSQ kernels (effconv::qconv2d) against the references: the bit-serial integer part exactly, for
every (act bits, weight bits) in 1..4 x 1..4, on the host and on the emulated aarch64 device with and
without dotprod; the whole layer (both kernel paths, zero points, bias, folded batch norm) against the
eager reference op; the dispatch and what the manifest records; the DSQ ResNet-18 end to end."""

import itertools
import shutil
import uuid

import numpy as np
import pytest
import torch
import tvm
from torch import nn

from tvm_effconv import build as builder
from tvm_effconv import frontend
from tvm_effconv.nn.dsq import DSQConv2d, convert_to_dsq, quantize_codes
from tvm_effconv.ops import dsq
from tvm_effconv.ops.dsq import compute, reference
from tvm_effconv.ops.dsq.cpu import POPCOUNT_ANNOTATION
from tvm_effconv.targets import get_preset

BIT_PAIRS = list(itertools.product(range(1, 5), range(1, 5)))  # (act bits, weight bits)
# (in, out, kernel, stride, padding, groups, batch, (H, W)): odd channel counts (not multiples of 8 or
# of a word), stride 2, padding, groups, batch > 1, more than one 64-channel word, 1x1
GEOMETRIES = [
    (13, 10, 3, 2, 1, 1, 2, (9, 7)),
    (70, 6, 3, 1, 1, 1, 1, (6, 5)),
    (18, 12, 3, 1, 2, 2, 2, (7, 8)),
    (130, 9, 1, 2, 0, 1, 1, (7, 7)),
]


def integer_case(act_bits, weight_bits, geometry, seed, layout="NCHW"):
    """Random codes for one kernel test: (qa NCHW uint8, qw int8, conv arguments)."""
    cin, cout, k, stride, padding, groups, batch, size = geometry
    rng = np.random.default_rng(seed)
    qa = rng.integers(0, 2**act_bits, (batch, cin, *size)).astype(np.uint8)
    qw = rng.integers(-(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1), (cout, cin // groups, k, k)).astype(np.int8)
    return qa, qw, ((stride, stride), (padding, padding), (1, 1), groups)


def integer_function(target, act_bits, weight_bits, qa, qw, conv, layout="NCHW"):
    """(PrimFunc of codes, packed weights -> sum qa * qw, packed weights) for ``target``."""
    from tvm import te

    stride, padding, dilation, groups = conv
    n, c, h, w = qa.shape
    shape, kind = dsq.bitserial_shape(target, n, c, h, w, qw, stride, padding, dilation, groups, weight_bits, act_bits, layout)
    packed = compute.pack_weights(shape, qw)
    codes = te.placeholder(shape.activation_shape(), "uint8", "codes")
    weights = te.placeholder(packed.shape, packed.dtype, "weights")
    out = compute.qconv2d_integer(shape, codes, weights, {POPCOUNT_ANNOTATION: kind})
    return te.create_prim_func([codes, weights, out]), packed


def build_integer_module(target, cases):
    """One library with a function per case; ``cases`` maps a name to (act_bits, weight_bits, qa, qw, conv)."""
    import tvm

    from tvm_effconv.schedule_rules import apply_default_rules

    functions, packed = {}, {}
    for name, (act_bits, weight_bits, qa, qw, conv) in cases.items():
        functions[name], packed[name] = integer_function(target, act_bits, weight_bits, qa, qw, conv)
        functions[name] = functions[name].with_attr("global_symbol", name)
    mod, scheduled = apply_default_rules(tvm.IRModule(functions), target)
    assert sorted(scheduled) == sorted(cases)
    return tvm.compile(mod, target=target), packed


def expected_integer(act_bits, weight_bits, qa, qw, conv):
    stride, padding, dilation, groups = conv
    return reference.bitserial_conv2d(qa, qw, stride, padding, dilation, groups, act_bits, weight_bits)


def run_cases(library, packed, cases, device, function):
    """{name: int32 output} of each case, run through ``function(name)`` on ``device``."""
    import tvm

    results = {}
    for name, (act_bits, weight_bits, qa, qw, conv) in cases.items():
        out_shape = expected_integer(act_bits, weight_bits, qa, qw, conv).shape
        out = tvm.runtime.tensor(np.zeros(out_shape, np.int32), device)
        function(name)(tvm.runtime.tensor(qa, device), tvm.runtime.tensor(packed[name], device), out)
        results[name] = out.numpy()
    return results


def all_pair_cases():
    return {
        f"a{a}w{w}": (a, w, *integer_case(a, w, GEOMETRIES[i % len(GEOMETRIES)], seed=i))
        for i, (a, w) in enumerate(BIT_PAIRS)
    }


# --- the numpy reference against the layer's own integer decomposition --------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_bitserial_reference_equals_the_ops_integer_terms(geometry):
    from tvm_effconv.nn.dsq import qconv2d_integer_terms

    for act_bits, weight_bits in ((1, 1), (3, 2), (4, 4)):
        qa, qw, conv = integer_case(act_bits, weight_bits, geometry, seed=act_bits)
        stride, padding, dilation, groups = conv
        # codes in, codes out: scale 1, zero point 0 reproduce qa exactly
        x = torch.from_numpy(qa.astype(np.float32))
        terms = qconv2d_integer_terms(
            x, torch.from_numpy(qw), torch.tensor(1.0), torch.tensor(0.0), stride, padding, dilation, groups, act_bits
        )
        got = reference.bitserial_conv2d(qa, qw, stride, padding, dilation, groups, act_bits, weight_bits)
        np.testing.assert_array_equal(got, terms.acc.numpy())


def test_pack_bits_puts_channel_c_in_bit_c_mod_word():
    codes = np.zeros((1, 70), np.int64)
    codes[0, [0, 5, 63, 64, 69]] = 1
    packed = compute.pack_bits(codes, 64, 2)
    assert packed.dtype == np.uint64
    assert packed[0, 0] == (1 | 1 << 5 | 1 << 63) and packed[0, 1] == (1 | 1 << 5)


# --- the bit-serial kernel on the host ----------------------------------------------------------------


def test_bitserial_kernel_is_exact_on_the_host_for_every_bit_pair():
    import tvm

    cases = all_pair_cases()
    library, packed = build_integer_module(get_preset("host").target, cases)
    got = run_cases(library, packed, cases, tvm.cpu(), lambda name: library[name])
    for name, case in cases.items():
        np.testing.assert_array_equal(got[name], expected_integer(*case), err_msg=name)


def test_bitserial_kernel_reads_nhwc_activations_and_writes_nhwc():
    import tvm
    from tvm import te

    from tvm_effconv.schedule_rules import apply_default_rules

    target = get_preset("host").target
    qa, qw, conv = integer_case(2, 3, GEOMETRIES[0], seed=5)
    n, c, h, w = qa.shape
    shape, kind = dsq.bitserial_shape(target, n, c, h, w, qw, *conv, 3, 2, layout="NHWC")
    packed = compute.pack_weights(shape, qw)
    codes = te.placeholder(shape.activation_shape(), "uint8", "codes")
    weights = te.placeholder(packed.shape, packed.dtype, "weights")
    out = compute.qconv2d_integer(shape, codes, weights, {POPCOUNT_ANNOTATION: kind})
    mod, _ = apply_default_rules(tvm.IRModule({"main": te.create_prim_func([codes, weights, out])}), target)
    library = tvm.compile(mod, target=target)
    expected = expected_integer(2, 3, qa, qw, conv).transpose(0, 2, 3, 1)
    result = tvm.runtime.tensor(np.zeros(expected.shape, np.int32))
    library["main"](tvm.runtime.tensor(np.ascontiguousarray(qa.transpose(0, 2, 3, 1))), tvm.runtime.tensor(packed), result)
    np.testing.assert_array_equal(result.numpy(), expected)


def test_x86_vectorizes_popcount_avx512_uses_vpopcntd_and_arm_uses_cnt_with_pairwise_accumulation():
    cases = {"a2w2": (2, 2, *integer_case(2, 2, GEOMETRIES[1], seed=1))}
    expected = {"arm-a53": ("cnt", "addp", "uadalp"), "arm-a76": ("cnt", "addp", "uadalp")}
    targets = {name: get_preset(name).target for name in expected}
    # Whatever the host has: AVX2 without VPOPCNTDQ (a Zen 2) and an Ice Lake server's VPOPCNTDQ path.
    targets["avx2"] = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver2"})
    expected["avx2"] = ("vpshufb", "vpsadbw")
    targets["icelake"] = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "icelake-server"})
    expected["icelake"] = ("vpopcntd", "vpandd")
    for name, target in targets.items():
        library, _ = build_integer_module(target, cases)
        assembly = library.mod.inspect_source("asm")
        for mnemonic in expected[name]:
            assert f"\t{mnemonic}\t" in assembly, (name, mnemonic)


# --- on the emulated aarch64 device -------------------------------------------------------------------


@pytest.mark.emulated
@pytest.mark.parametrize("preset_name, cpu", [("arm-a53", "cortex-a53"), ("arm-a76", "cortex-a76")])
def test_bitserial_kernel_is_exact_on_the_emulated_device(preset_name, cpu, emulated_device, tmp_path):
    from tvm_effconv.device import rpc

    preset = get_preset(preset_name)
    cases = all_pair_cases()
    library, packed = build_integer_module(preset.target, cases)
    path = tmp_path / f"dsq-{uuid.uuid4().hex}.so"
    builder.export_library(library, preset, path)
    session = rpc.connect(emulated_device(cpu).address)
    session.upload(str(path), target=path.name)
    remote = session.load_module(path.name)
    got = run_cases(library, packed, cases, session.cpu(), lambda name: remote[name])
    for name, case in cases.items():
        np.testing.assert_array_equal(got[name], expected_integer(*case), err_msg=f"{preset_name} {name}")


# --- the whole layer through the frontend ---------------------------------------------------------------


def dsq_layer(act_bits, weight_bits, cin=19, cout=10, k=3, stride=2, padding=1, groups=1, bias=True, act_lower=0.0, seed=0):
    """A DSQConv2d with trained-looking ranges (activation range from the input) and its input."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=bias)
    layer = DSQConv2d.from_conv(conv, weight_bits, act_bits)
    x = torch.rand(2, cin, 9, 8) * 2.0 + act_lower
    with torch.no_grad():
        layer.train()(x)
    return layer.eval(), x


def compile_and_run(model, x, preset_name="host"):
    import tvm
    from tvm import relax

    preset = get_preset(preset_name)
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
    executable, report = builder.build(frontend.to_relax(exported, preset.target), preset)
    assert not report.unscheduled
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x.numpy())).numpy(), report


def assert_matches_reference(got, expected):
    scale = max(float(np.abs(expected).max()), 1e-30)
    assert float(np.abs(got - expected).max()) / scale < 1e-5


@pytest.mark.parametrize("path", [dsq.BITSERIAL, dsq.INT8_DOT])
@pytest.mark.parametrize(
    "act_bits, weight_bits, options",
    [
        (1, 1, {}),
        (2, 1, {"groups": 1, "act_lower": -0.7}),  # non-zero activation zero point: padding terms
        (3, 4, {"cin": 16, "cout": 12, "groups": 2, "bias": False}),
        (4, 2, {"cin": 70, "cout": 5, "k": 1, "stride": 1, "padding": 0}),
    ],
)
def test_the_compiled_layer_matches_the_reference_op(path, act_bits, weight_bits, options):
    layer, x = dsq_layer(act_bits, weight_bits, **options)
    model = nn.Sequential(layer, nn.ReLU()).eval()
    with torch.no_grad():
        expected = model(x).numpy()
    with dsq.forcing_path(path):
        got, report = compile_and_run(model, x)
    assert report.kernel_variants[0]["dsq_path"] == path
    assert_matches_reference(got, expected)


def test_a_batch_norm_after_the_layer_is_folded_into_it():
    layer, x = dsq_layer(2, 2)
    norm = nn.BatchNorm2d(10).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(-2, 2)  # negative scales too
        norm.bias.uniform_(-1, 1)
    model = nn.Sequential(layer, norm, nn.ReLU()).eval()
    with torch.no_grad():
        expected = model(x).numpy()
    got, report = compile_and_run(model, x)
    assert not any("batch_norm" in name for name in report.default_schedule + report.from_records)
    assert_matches_reference(got, expected)


def test_consecutive_low_bit_layers_pass_codes_not_floats():
    """The next layer's quantization fuses into this layer's kernel: its output is uint8 codes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    convert_to_dsq(model, 1, 1)
    x = torch.rand(1, 8, 8, 8)
    with torch.no_grad():
        model.train()(x)
        expected = model.eval()(x).numpy()
    got, report = compile_and_run(model, x)
    first = [call for call in report.kernel_calls if "bitserial" in call["function"] and "quantize" in call["function"]]
    assert first and first[0]["args"][-1]["dtype"] == "uint8"
    assert_matches_reference(got, expected)


# --- dispatch -------------------------------------------------------------------------------------------


def test_dispatch_picks_popcount_for_the_fewest_bits_and_the_dot_path_above():
    host, a76, a53, cuda = (get_preset(name).target for name in ("host", "arm-a76", "arm-a53", "cuda"))
    assert dsq.kernel_path(host, 1, 1).path == dsq.BITSERIAL
    assert dsq.kernel_path(host, 1, 2).path == dsq.BITSERIAL
    assert dsq.kernel_path(host, 2, 2).path == dsq.INT8_DOT  # measured: A2W2 1.02x against 1.08x
    assert dsq.kernel_path(host, 4, 4).path == dsq.INT8_DOT
    assert dsq.kernel_path(a76, 2, 2).path == dsq.INT8_DOT  # sdot: 16 MACs per instruction
    assert dsq.kernel_path(a53, 2, 2).path == dsq.BITSERIAL  # smull path: about 5
    assert dsq.kernel_path(cuda, 1, 2).path == dsq.BITSERIAL
    assert dsq.kernel_path(cuda, 3, 3).path == dsq.INT8_DOT
    assert dsq.kernel_path(host, 8, 8).path == dsq.BITSERIAL  # beyond the dot path's 4 bits
    assert dsq.kernel_path(a76, 1, 1).reason


def test_the_ops_checks_reject_bad_bits_and_crossed_ranges():
    from tvm_effconv.errors import LayerParameterError

    for bits in (0, 5, 9):
        with pytest.raises(LayerParameterError, match="bits"):
            DSQConv2d(4, 4, 3, weight_bits=bits, act_bits=2)
    layer, x = dsq_layer(2, 2)
    with pytest.raises(LayerParameterError, match="lower < upper"):
        from tvm_effconv.nn.dsq import dsq_quantize

        dsq_quantize(x, 1.0, 0.5, 0.2, 2)
    with pytest.raises(LayerParameterError, match="weight_codes.dtype"):
        torch.ops.effconv.qconv2d(x, layer.weight_codes.float(), layer.weight_scale, layer.weight_zero_point,
                                  layer.act_scale, layer.act_zero_point, None, [1, 1], [1, 1], [1, 1], 1, 2, 2)


def test_quantized_codes_match_the_layers_codes():
    """The kernel's activation quantizer picks the layer's codes exactly (same float32 operations)."""
    import tvm
    from tvm import te

    x = torch.randn(3, 5, 7, 6) * 3
    for bits, (scale, zero) in itertools.product((1, 2, 4), ((0.37, 0.0), (0.21, 3.4))):
        placeholder = te.placeholder(tuple(x.shape), "float32", "x")
        func = te.create_prim_func([placeholder, compute.quantize_codes(placeholder, scale, zero, bits)])
        library = tvm.compile(tvm.IRModule({"main": func}), target=get_preset("host").target)
        out = tvm.runtime.tensor(np.zeros(x.shape, np.uint8))
        library["main"](tvm.runtime.tensor(x.numpy()), out)
        expected = quantize_codes(x, torch.tensor(scale), torch.tensor(zero), bits).numpy()
        np.testing.assert_array_equal(out.numpy(), expected)


# --- the reference network ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_dsq_resnet_compiles_and_verifies_on_the_host(bits, tmp_path):
    import json

    from tvm_effconv.compile import compile_model

    out = compile_model(f"tvm_effconv.models.resnet:resnet18_dsq_small_{bits}bit", "host", tmp_path / "out",
                        log=lambda _m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["status"] == "passed"
    paths = {variant["dsq_path"] for variant in manifest["kernels"]["variants"] if "dsq_path" in variant}
    assert paths == {dsq.kernel_path(get_preset("host").target, bits, bits).path}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("preset_name", [pytest.param("arm", marks=pytest.mark.emulated), "cuda"])
def test_the_dsq_resnet_compiles_for_arm_and_cuda(preset_name, bits, tmp_path):
    import json

    from tvm_effconv.compile import compile_model

    if preset_name == "cuda" and shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    out = compile_model(f"tvm_effconv.models.resnet:resnet18_dsq_small_{bits}bit", preset_name, tmp_path / "out",
                        log=lambda _m: None)
    verification = json.loads((out / "manifest.json").read_text())["verification"]
    assert verification["status"] in (("passed", "compiled") if preset_name == "cuda" else ("passed",)), verification
