"""The DSConv TVM kernels against the eager reference op and the numpy reference of the inference form:
on the host, on the emulated aarch64 device with and without dotprod, and as CUDA source (see
test_dsconv_cuda.py)."""

import uuid

import numpy as np
import pytest
import torch

from tvm_effconv import build as builder
from tvm_effconv import frontend
from tvm_effconv.nn import DSConv2d
from tvm_effconv.ops import dsconv
from tvm_effconv.ops.dsconv import reference
from tvm_effconv.targets import get_preset

# (in, out, kernel, stride, padding, dilation, groups, bits, block, act_mode, kds_bias, batch, size)
SHAPES = {
    "odd-channels-stride2-short-block": (13, 10, 3, 2, 1, 1, 1, 4, 5, "int8", True, 2, (9, 7)),
    "groups-dilation-bfp": (14, 6, 3, 1, 2, 2, 2, 3, 3, "bfp", False, 1, (8, 9)),
    "8-bit-weights": (16, 16, 3, 1, 1, 1, 1, 8, 8, "int8", False, 1, (6, 6)),
    "pointwise-one-channel-last-block": (33, 20, 1, 1, 0, 1, 1, 2, 32, "int8", False, 2, (5, 5)),
    "block-wider-than-channels": (24, 12, 3, 2, 0, 1, 1, 4, 64, "bfp", True, 1, (11, 11)),
}


def make_layer(spec, seed=0, unit_scales=False):
    """A DSConv2d with random codes and shifters (all scales 1 with ``unit_scales``) and its input."""
    cin, cout, k, stride, padding, dilation, groups, bits, block, act_mode, kds_bias, batch, size = spec
    generator = torch.Generator().manual_seed(seed)
    layer = DSConv2d(cin, cout, k, stride, padding, dilation, groups, True, bits, block, kds_bias, act_mode)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    with torch.no_grad():
        layer.weight_codes.copy_(torch.randint(low, high, layer.weight_codes.shape, generator=generator))
        if unit_scales:
            x = torch.randint(-128, 128, (batch, cin, *size), generator=generator).float()
        else:
            layer.kds_scale.copy_(torch.rand(layer.kds_scale.shape, generator=generator) + 0.5)
            if kds_bias:
                layer.kds_bias.copy_(torch.randn(layer.kds_bias.shape, generator=generator) * 0.1)
            layer.cds_scale.copy_(torch.rand(cout, generator=generator) + 0.5)
            layer.cds_bias.copy_(torch.randn(cout, generator=generator))
            layer.act_scale.fill_(0.02)
            x = torch.randn(batch, cin, *size, generator=generator)
    return layer.eval(), x


def compile_layer(layer, x, preset):
    with torch.no_grad():
        exported = torch.export.export(torch.nn.Sequential(layer, torch.nn.ReLU()), (x,))
    executable, report = builder.build(frontend.to_relax(exported, preset.target), preset)
    assert not report.unscheduled
    return executable


def run_local(executable, x):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x.numpy())).numpy()


def run_remote(executable, preset, address, x, tmp_path):
    from tvm_effconv.device import rpc
    from tvm_effconv.verify import run_vm

    library = tmp_path / f"dsconv-{uuid.uuid4().hex}.so"
    builder.export_library(executable, preset, library)
    session = rpc.connect(address)
    session.upload(str(library), target=library.name)
    return run_vm(session.load_module(library.name), session.cpu(), [x.numpy()])[0]


def expected(layer, x):
    with torch.no_grad():
        return torch.relu(layer(x)).numpy()


def assert_close(got, want):
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", list(SHAPES))
def test_host_kernel_matches_the_reference_op(name):
    layer, x = make_layer(SHAPES[name])
    assert_close(run_local(compile_layer(layer, x, get_preset("host")), x), expected(layer, x))


@pytest.mark.parametrize("name", ["odd-channels-stride2-short-block", "8-bit-weights", "pointwise-one-channel-last-block"])
def test_host_integer_part_is_exact(name):
    # Unit scales and integer activations: every output is an integer sum, exact in float32 (< 2^24).
    layer, x = make_layer(SHAPES[name], unit_scales=True)
    got = run_local(compile_layer(layer, x, get_preset("host")), x)
    np.testing.assert_array_equal(got, expected(layer, x))


def test_numpy_inference_form_matches_the_op():
    layer, x = make_layer(SHAPES["groups-dilation-bfp"])
    from tvm_effconv.nn.dsconv import quantize_activations

    x_q, s_x = quantize_activations(x, layer.act_scale, layer.act_mode, layer.act_bits, layer.block, layer.groups)
    # the op expands each block's scale over its channels; the inference form keeps one per block
    per_group = x.shape[1] // layer.groups
    firsts = [g * per_group + b for g in range(layer.groups) for b in range(0, per_group, layer.block)]
    block_scales = s_x[:, firsts]
    ref = reference.dsconv2d(
        x_q.numpy(), block_scales.numpy(), layer.weight_codes.numpy(), layer.kds_scale.detach().numpy(), None,
        layer.cds_scale.detach().numpy(), layer.cds_bias.detach().numpy(), layer.stride, layer.padding,
        layer.dilation, layer.groups, layer.block,
    )
    assert_close(np.maximum(ref, 0), expected(layer, x))


def test_the_target_picks_the_dot_instruction():
    host = get_preset("host").target
    assert dsconv.kernel_choice(get_preset("arm-a76").target, 4).intrinsic.endswith("sdot")
    assert dsconv.kernel_choice(get_preset("arm-a53").target, 4).intrinsic.endswith("neon")
    assert dsconv.kernel_choice(get_preset("cuda").target, 4).intrinsic == "dp4a"
    # pmaddubsw saturates int16 for 8-bit weights against unsigned activations
    assert dsconv.kernel_choice(host, 8).intrinsic in ("none", "effconv_dot_16x4_u8i8i32_vnni")


@pytest.mark.emulated
@pytest.mark.parametrize("preset_name, cpu", [("arm-a53", "cortex-a53"), ("arm-a76", "cortex-a76")])
def test_arm_kernel_on_the_emulated_device(preset_name, cpu, emulated_device, tmp_path):
    preset = get_preset(preset_name)
    device = emulated_device(cpu)
    for name in ("odd-channels-stride2-short-block", "groups-dilation-bfp", "8-bit-weights"):
        layer, x = make_layer(SHAPES[name])
        assert_close(run_remote(compile_layer(layer, x, preset), preset, device.address, x, tmp_path), expected(layer, x))
    layer, x = make_layer(SHAPES["odd-channels-stride2-short-block"], unit_scales=True)
    got = run_remote(compile_layer(layer, x, preset), preset, device.address, x, tmp_path)
    np.testing.assert_array_equal(got, expected(layer, x))


def test_arm_assembly_uses_the_dot_instruction():
    layer, x = make_layer(SHAPES["odd-channels-stride2-short-block"])
    for preset_name, mnemonic in (("arm-a76", "sdot"), ("arm-a53", "smull")):
        preset = get_preset(preset_name)
        assembly = builder.generated_source(compile_layer(layer, x, preset), "llvm", "asm")
        assert mnemonic in assembly, preset_name


def one_dsconv_layer():
    layer, x = make_layer(SHAPES["odd-channels-stride2-short-block"])
    return torch.nn.Sequential(layer, torch.nn.ReLU()), (x,)


def test_tuning_samples_the_dsconv_knobs_and_compile_reuses_the_records(tmp_path):
    import json

    from tvm_effconv.compile import compile_model
    from tvm_effconv.tune import tune_model

    model = f"{__name__}:one_dsconv_layer"
    lines = []
    report = tune_model(model, "host", trials=2, records=str(tmp_path / "records"), only=["dsconv2d"], log=lines.append)
    # the conv's own task, not only its activation quantizer's: every candidate of the rule used to be rejected
    assert [t for t in report.tasks if "dsconv2d" in t.name and "quantize" not in t.name and t.tuned_ms]
    out = compile_model(model, "host", tmp_path / "out", records=str(tmp_path / "records"), log=lambda _m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    # Reused either way: the tuned record applied, or the verdict that the default measured faster.
    reused = manifest["records"]["applied"] + manifest["records"]["default_by_measurement"]
    assert any("dsconv2d" in name and "quantize" not in name for name in reused)
    assert manifest["verification"]["status"] == "passed"


@pytest.mark.parametrize("mcpu, bits, instruction", [
    ("icelake-server", 4, "vpdpbusd"),  # VNNI: int32 accumulation, exact for 8-bit weights too
    ("skylake-avx512", 4, "vpmaddubsw"),
    ("skylake-avx512", 8, "vpmulld"),  # pmaddubsw would saturate: plain widening multiply
])
def test_x86_avx512_kernels_use_their_instruction(mcpu, bits, instruction):
    # This host has no AVX-512: the paths are checked in the generated assembly.
    import dataclasses

    preset = dataclasses.replace(get_preset("host"), target_config={"kind": "llvm", "mcpu": mcpu, "num-cores": 1})
    spec = list(SHAPES["odd-channels-stride2-short-block"])
    spec[7] = bits
    layer, x = make_layer(tuple(spec))
    assembly = builder.generated_source(compile_layer(layer, x, preset), "llvm", "asm")
    assert instruction in assembly and "zmm" in assembly


REFERENCE_NETWORK = "tvm_effconv.models.resnet:resnet18_dsconv_small"


@pytest.mark.parametrize("preset_name", [
    "host", "cuda", pytest.param("arm", marks=pytest.mark.emulated),
])
def test_the_dsconv_resnet_compiles_and_verifies(preset_name, tmp_path):
    import json
    import shutil

    from tvm_effconv.compile import compile_model

    if preset_name == "cuda" and shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: the CUDA build cannot be checked")
    out = compile_model(REFERENCE_NETWORK, preset_name, tmp_path / preset_name, log=lambda _m: None)
    verification = json.loads((out / "manifest.json").read_text())["verification"]
    # Without a GPU the CUDA build is compiled to a fatbin by nvcc but cannot run.
    assert verification["status"] in (("passed", "compiled") if preset_name == "cuda" else ("passed",)), verification
