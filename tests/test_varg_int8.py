"""int8 VarG convs: post-training quantization (``quantize_varg``), the ``effconv::varg_qconv2d`` op, and its
kernels against the op and the numpy reference (integer parts exact): on the host, in the generated
assembly of every dot instruction (sdot, smull, VNNI, pmaddubsw), on the emulated ARM devices, and as
CUDA source (dp4a; nvcc, and run on the host)."""

import dataclasses
import functools
import shutil

import numpy as np
import pytest
import torch
from test_dsconv_kernel import assert_close, run_remote
from test_varg_kernel import compile_model, cuda_target, expected, needs_cxx, needs_nvcc, run_local
from test_varg_layer import one_thread, randomize  # noqa: F401 - one_thread: the module's autouse fixture
from torch import nn

from tvm_effconv import build as builder
from tvm_effconv.errors import LayerParameterError
from tvm_effconv.nn.varg import QuantizedVarGConv2d, VarGConv2d, quantize_varg
from tvm_effconv.ops import varg
from tvm_effconv.ops.varg import compute, reference
from tvm_effconv.schedule_rules import DefaultKnobs
from tvm_effconv.targets import get_preset

# (in, group_base, factor, stride, batch, (height, width), weight bits, bias)
SHAPES = {
    "gb8-stride1-odd-8bit": (32, 8, 2, 1, 2, (9, 7), 8, False),
    "gb8-stride2-odd-7bit-bias": (24, 8, 2, 2, 2, (11, 13), 7, True),
    "gb16-stride2-8bit": (32, 16, 2, 2, 2, (7, 9), 8, False),
    "gb16-factor1-stride1-7bit": (48, 16, 1, 1, 2, (5, 5), 7, True),
    "gb32-stride1-8bit-bias": (64, 32, 2, 1, 2, (6, 7), 8, True),
    "gb32-stride2-odd-7bit": (64, 32, 2, 2, 2, (9, 9), 7, False),
}


def make_layer(spec, seed=0):
    """A quantized VarGConv2d -> BN -> PReLU (the batch norm folds into the kernel) and its input."""
    cin, group_base, factor, stride, batch, size, bits, bias = spec
    torch.manual_seed(seed)
    cout = cin * factor
    model = randomize(nn.Sequential(VarGConv2d(cin, cout, 3, stride, group_base=group_base, bias=bias),
                                    nn.BatchNorm2d(cout), nn.PReLU(cout)), seed)
    x = torch.randn(batch, cin, *size, generator=torch.Generator().manual_seed(seed + 1))
    quantize_varg(model, [x], weight_bits=bits)
    return model, x


def integer_layer(spec, seed=0):
    """A QuantizedVarGConv2d with unit scales and no bias, and an integer input in [-128, 127]: its output
    is the integer conv itself, which the kernel must reproduce exactly."""
    cin, group_base, factor, stride, batch, size, bits, _ = spec
    high = 2 ** (bits - 1) - 1
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-high, high + 1, (cin * factor, group_base, 3, 3), generator=generator, dtype=torch.int8)
    layer = QuantizedVarGConv2d(codes, torch.ones(cin * factor), torch.tensor(1.0), None, (stride,) * 2, (1, 1),
                                cin // group_base, group_base).eval()
    x = torch.randint(-128, 128, (batch, cin, *size), generator=generator).float()
    return layer, x


def intrinsics(report):
    return [v.get("dot_intrinsic") for v in report.kernel_variants if v["rule"] == compute.SCHEDULE_RULE]


# --- the layer -------------------------------------------------------------------------------------


def test_quantize_varg_replaces_every_varg_conv_and_stays_close_to_float():
    from tvm_effconv.models.vargnet import vargnet_small

    model, (x,) = vargnet_small()
    with torch.no_grad():
        want = model(x)
    scales = quantize_varg(model, [x])
    layers = [m for m in model.modules() if isinstance(m, QuantizedVarGConv2d)]
    assert len(scales) == len(layers) == 21 and not any(isinstance(m, VarGConv2d) for m in model.modules())
    assert all(layer.weight_codes.abs().max() <= 127 for layer in layers)
    with torch.no_grad():
        got = model(x)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    exported = torch.export.export(model, (x,)).run_decompositions()
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("effconv.varg_qconv2d.default") == 21


def test_seven_bit_weights_and_the_integer_decomposition():
    model, x = make_layer(SHAPES["gb8-stride2-odd-7bit-bias"])
    layer = model[0]
    assert layer.weight_codes.abs().max() <= 63
    x_q = torch.clamp(torch.round(x / layer.act_scale), -128, 127)
    out, sums = reference.grouped_qconv2d(x_q.numpy(), layer.weight_codes.numpy(),
                                          (layer.act_scale * layer.weight_scale).numpy(), layer.bias.numpy(), (2, 2),
                                          (1, 1), layer.groups)
    with torch.no_grad():
        assert_close(layer(x).numpy(), out)


@pytest.mark.parametrize("make, parameter, allowed", [
    (lambda: quantize_varg(nn.Sequential(VarGConv2d(16, 32, 3)), [torch.randn(1, 16, 5, 5)], weight_bits=6),
     "weight_bits", "(7, 8)"),
    (lambda: quantize_varg(nn.Sequential(nn.Conv2d(3, 8, 3)), [torch.randn(1, 3, 5, 5)]), "model", "VarGConv2d"),
    (lambda: QuantizedVarGConv2d.from_conv(VarGConv2d(16, 32, 3), 0.0), "act_scale", "> 0"),
])
def test_invalid_quantization_parameters_fail_early(make, parameter, allowed):
    with pytest.raises(LayerParameterError) as info:
        make()
    assert f"{parameter} must be" in str(info.value) and allowed in str(info.value)


# --- host ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHAPES))
def test_host_int8_kernel_matches_the_op(name):
    model, x = make_layer(SHAPES[name])
    executable, report = compile_model(model, x, get_preset("host"))
    assert len(intrinsics(report)) == 1
    assert_close(run_local(executable, x), expected(model, x))


@pytest.mark.parametrize("name", ["gb8-stride1-odd-8bit", "gb16-factor1-stride1-7bit", "gb32-stride2-odd-7bit"])
def test_host_integer_part_is_exact(name):
    layer, x = integer_layer(SHAPES[name])
    executable, _ = compile_model(layer, x, get_preset("host"))
    np.testing.assert_array_equal(run_local(executable, x), expected(layer, x))


def with_mcpu(mcpu):
    return dataclasses.replace(get_preset("host"), target_config={"kind": "llvm", "mcpu": mcpu, "num-cores": 1})


def test_the_target_picks_the_dot_instruction():
    host = with_mcpu("znver2").target  # AVX2, no AVX-512
    assert varg.int8_kernel(get_preset("arm-a76").target, 16, 8).intrinsic.endswith("sdot")
    assert varg.int8_kernel(get_preset("arm-a53").target, 16, 8).intrinsic.endswith("neon")
    assert varg.int8_kernel(get_preset("cuda").target, 16, 8) == varg.Int8Kernel(4, 0, "dp4a")
    assert varg.int8_kernel(host, 16, 7).intrinsic.endswith("avx2")  # AVX2: pmaddubsw, unsigned activations
    assert varg.int8_kernel(host, 16, 7).act_offset == 128
    assert varg.int8_kernel(host, 16, 8).intrinsic == "none"  # pmaddubsw would saturate int16
    assert varg.int8_kernel(with_mcpu("znver5").target, 16, 8).intrinsic.endswith("vnni")  # AVX-512 VNNI


@pytest.mark.parametrize("preset, bits, instruction", [
    (lambda: get_preset("arm-a76"), 8, "sdot"),
    (lambda: get_preset("arm-a53"), 8, "smull"),
    (lambda: with_mcpu("icelake-server"), 8, "vpdpbusd"),  # VNNI: int32 accumulation, exact for 8-bit weights
    (lambda: with_mcpu("skylake-avx512"), 7, "vpmaddubsw"),
    (lambda: with_mcpu("znver2"), 7, "vpmaddubsw"),  # an AVX2 host
])
def test_assembly_uses_the_dot_instruction(preset, bits, instruction):
    # No emulation or AVX-512 needed: the kernels' instructions, compiled for each CPU.
    spec = list(SHAPES["gb8-stride1-odd-8bit"])
    spec[6] = bits
    model, x = make_layer(tuple(spec))
    executable, _ = compile_model(model, x, preset())
    assert instruction in builder.generated_source(executable, "llvm", "asm")


def test_quantized_vargnet_compiles_for_the_host_and_verifies(tmp_path):
    import json

    from tvm_effconv.compile import compile_model as compile_cli

    out = compile_cli("tvm_effconv.models.vargnet:vargnet_small_int8", "host", tmp_path / "out", log=lambda _m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["status"] == "passed"
    kernels = manifest["kernels"]
    ours = {v["function"] for v in kernels["variants"] if v["rule"] == compute.SCHEDULE_RULE}
    assert sum(call["function"] in ours for call in kernels["calls"]) == 21  # every VarG conv, int8


# --- emulated ARM ----------------------------------------------------------------------------------


@pytest.mark.emulated
@pytest.mark.parametrize("preset_name, cpu", [("arm-a53", "cortex-a53"), ("arm-a76", "cortex-a76")])
def test_arm_int8_kernel_on_the_emulated_device(preset_name, cpu, emulated_device, tmp_path):
    preset = get_preset(preset_name)
    device = emulated_device(cpu)
    for name in ("gb8-stride1-odd-8bit", "gb16-stride2-8bit", "gb32-stride2-odd-7bit"):
        model, x = make_layer(SHAPES[name])
        assert_close(run_remote(compile_model(model, x, preset)[0], preset, device.address, x, tmp_path),
                     expected(model, x))
    layer, x = integer_layer(SHAPES["gb16-stride2-8bit"])
    got = run_remote(compile_model(layer, x, preset)[0], preset, device.address, x, tmp_path)
    np.testing.assert_array_equal(got, expected(layer, x))


# --- CUDA ------------------------------------------------------------------------------------------

CUDA_CASES = ["gb8-stride1-odd-8bit", "gb16-stride2-8bit", "gb32-stride2-odd-7bit"]


@functools.cache
def cuda_build(name, seed=0):
    """The int8 kernel alone (int8 input, unit scales: the output is the integer conv) for CUDA."""
    import tvm
    from tvm import s_tir, te

    from tvm_effconv.ops.varg import cuda as varg_cuda

    cin, group_base, factor, stride, batch, (h, w), bits, _ = SHAPES[name]
    groups, cout = cin // group_base, cin * factor
    kernel = varg.int8_kernel(cuda_target(), cout // groups, bits)
    shape = compute.VarGShape(batch, cin, h, w, cout, (3, 3), (stride,) * 2, (1, 1), (1, 1), groups, kernel.lanes)
    rng = np.random.default_rng(seed)
    x_q = rng.integers(-128, 128, (batch, cin, h, w)).astype(np.int8)
    codes = rng.integers(-127, 128, (cout, group_base, 3, 3)).astype(np.int8)
    scale, bias = rng.standard_normal(cout).astype(np.float32), rng.standard_normal(cout).astype(np.float32)
    weights, _ = compute.pack_int8_weights(shape, codes, 0)
    inputs = {"x": x_q, "w": weights, "scale": scale, "bias": bias}
    holders = {key: te.placeholder(v.shape, str(v.dtype), name=key) for key, v in inputs.items()}
    y = compute.varg_qconv2d(shape, holders["x"], holders["w"], holders["scale"], holders["bias"])
    sch = s_tir.Schedule(te.create_prim_func([*holders.values(), y]))
    varg_cuda.schedule_varg_conv2d_cuda(sch, sch.get_sblock(compute.CONV_BLOCK), DefaultKnobs())
    scheduled = sch.mod["main"]
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr(builder.SCHEDULED_ATTR, True)}), target=cuda_target())
    (cuda,) = [m for m in lib.mod.imports if m.kind == "cuda"]
    want, _ = reference.grouped_qconv2d(x_q, codes, scale, bias, (stride,) * 2, (1, 1), groups)
    return scheduled, lib, cuda.inspect_source("cuda"), inputs, want


@needs_nvcc
@pytest.mark.parametrize("name", CUDA_CASES)
def test_cuda_int8_source_uses_dp4a_and_compiles(name):
    from tvm.support import nvcc

    _, _, source, _, _ = cuda_build(name)
    assert "__dp4a(" in source
    with cuda_target():
        assert len(nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc")) > 0


@needs_cxx
@pytest.mark.parametrize("name", CUDA_CASES)
def test_cuda_int8_source_computes_the_reference_on_the_host(name, tmp_path):
    from test_dsconv_cuda import run_on_host

    scheduled, _, source, inputs, want = cuda_build(name)
    assert_close(run_on_host(scheduled, source, inputs, tmp_path)[scheduled.params[-1].name], want)


@pytest.mark.skipif(shutil.which("nvidia-smi") is None or not __import__("tvm").cuda(0).exist,
                    reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("name", CUDA_CASES)
def test_cuda_int8_kernel_matches_the_reference_on_the_gpu(name):
    import tvm

    scheduled, lib, _, inputs, want = cuda_build(name)
    device = tvm.cuda(0)
    out = tvm.runtime.tensor(np.zeros(want.shape, np.float32), device)
    lib["main"](*[tvm.runtime.tensor(inputs[b.name], device) for b in scheduled.params[:-1]], out)
    assert_close(out.numpy(), want)
