"""The VarG grouped-conv kernel (tvm_effconv.ops.varg) against PyTorch and its numpy reference: on the
host through the frontend (routing, batch norm folding, fused PReLU), its knobs as MetaSchedule draws
them, the CUDA source (nvcc, and run on the host), VarGNet end to end, and the emulated ARM device."""

import functools
import shutil

import numpy as np
import pytest
import torch
from test_dsconv_kernel import assert_close, run_remote
from test_varg_layer import one_thread, randomize  # noqa: F401 - one_thread: the module's autouse fixture
from torch import nn

from tvm_effconv import build as builder
from tvm_effconv import frontend
from tvm_effconv.models.vargnet import vargnet_conv_shapes, vargnet_small
from tvm_effconv.nn.varg import VarGConv2d
from tvm_effconv.ops import varg
from tvm_effconv.ops.varg import compute, reference
from tvm_effconv.schedule_rules import DefaultKnobs
from tvm_effconv.targets import get_preset

# (in channels, group_base, factor, stride, batch, (height, width), bias)
SHAPES = {
    "gb8-factor2-stride1-odd": (32, 8, 2, 1, 2, (9, 7), False),
    "gb8-factor1-stride2-odd": (24, 8, 1, 2, 1, (11, 13), False),
    "gb16-factor2-stride2-batch3": (32, 16, 2, 2, 3, (7, 9), True),
    "gb16-factor1-stride1": (48, 16, 1, 1, 1, (5, 5), False),
    "gb32-factor2-stride1-batch2": (64, 32, 2, 1, 2, (6, 7), False),
    "gb32-factor1-stride2-odd": (64, 32, 1, 2, 1, (9, 9), True),
    "gb8-12-outputs-per-group": (16, 8, 1.5, 1, 2, (5, 6), False),  # vectors of 4 channels on x86
}


def make_unit(spec, seed=0):
    """VarGConv2d -> BN -> PReLU (the first half of a separable unit) and its input."""
    cin, group_base, factor, stride, batch, size, bias = spec
    torch.manual_seed(seed)
    cout = int(cin * factor)
    conv = VarGConv2d(cin, cout, 3, stride, group_base=group_base, bias=bias)
    model = randomize(nn.Sequential(conv, nn.BatchNorm2d(cout), nn.PReLU(cout)), seed)
    x = torch.randn(batch, cin, *size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def compile_model(model, x, preset):
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
    executable, report = builder.build(frontend.to_relax(exported, preset.target), preset)
    assert not report.unscheduled
    return executable, report


def varg_functions(report) -> list[str]:
    return [v["function"] for v in report.kernel_variants if v["rule"] == compute.SCHEDULE_RULE]


def run_local(executable, x):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x.numpy())).numpy()


def expected(model, x):
    with torch.no_grad():
        return model(x).numpy()


# --- host ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHAPES))
def test_host_kernel_matches_pytorch(name):
    model, x = make_unit(SHAPES[name])
    executable, report = compile_model(model, x, get_preset("host"))
    assert len(varg_functions(report)) == 1, "the grouped conv goes to the VarG kernel"
    assert_close(run_local(executable, x), expected(model, x))


def test_other_convs_keep_tvms_conversion():
    # depthwise (1 channel per group), 4 channels per group and dense convs are not VarG's
    model = randomize(nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(16, 8, 1),
    ))
    x = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(3))
    executable, report = compile_model(model, x, get_preset("host"))
    assert varg_functions(report) == []
    assert_close(run_local(executable, x), expected(model, x))


def test_residual_add_and_relu_are_fused_into_the_write_out():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = VarGConv2d(16, 16, 3, group_base=8)
            self.bn = nn.BatchNorm2d(16)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)

    model = randomize(Residual())
    x = torch.randn(2, 16, 7, 7, generator=torch.Generator().manual_seed(4))
    executable, report = compile_model(model, x, get_preset("host"))
    assert len(varg_functions(report)) == 1
    assert_close(run_local(executable, x), expected(model, x))


def test_numpy_reference_matches_torch():
    cin, group_base, factor, stride = 32, 8, 2, 2
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, cin, 9, 7, generator=generator)
    weight = torch.randn(cin * factor, group_base, 3, 3, generator=generator)
    bias = torch.randn(cin * factor, generator=generator)
    want = torch.nn.functional.conv2d(x, weight, bias, stride, 1, 1, cin // group_base).numpy()
    got = reference.grouped_conv2d(x.numpy(), weight.numpy(), bias.numpy(), (stride,) * 2, (1, 1), (1, 1),
                                   cin // group_base)
    assert_close(got, want)


def kernel_case(spec, lanes_target, seed=0):
    """(TE PrimFunc with bias and ReLU, inputs by buffer name, numpy reference) of one grouped conv."""
    from tvm import te, tirx

    cin, group_base, factor, stride, batch, (h, w), _ = spec
    groups, cout = cin // group_base, int(cin * factor)
    shape = compute.VarGShape(batch, cin, h, w, cout, (3, 3), (stride,) * 2, (1, 1), (1, 1), groups,
                              varg.vector_lanes(lanes_target, cout // groups))
    rng = np.random.default_rng(seed)
    xv = rng.standard_normal((batch, cin, h, w)).astype(np.float32)
    wv = rng.standard_normal((cout, group_base, 3, 3)).astype(np.float32)
    bv = rng.standard_normal(cout).astype(np.float32)
    packed = compute.pack_weights(shape, wv)
    x = te.placeholder(xv.shape, "float32", name="x")
    weights = te.placeholder(packed.shape, "float32", name="w")
    bias = te.placeholder(bv.shape, "float32", name="b")
    y = compute.varg_conv2d(shape, x, weights, bias)
    y = te.compute(y.shape, lambda *i: tirx.max(y(*i), 0.0), name="relu")
    func = te.create_prim_func([x, weights, bias, y])
    want = np.maximum(reference.grouped_conv2d(xv, wv, bv, (stride,) * 2, (1, 1), (1, 1), groups), 0)
    return func, {"x": xv, "w": packed, "b": bv}, want


@pytest.mark.parametrize("seed", [1, 2])
def test_sampled_knobs_build_and_compute_on_the_host(seed):
    # What MetaSchedule's ApplyCustomRule calls: the registered design space, knobs drawn by sampling.
    import tvm
    from tvm import s_tir

    target = get_preset("host").target
    func, inputs, want = kernel_case(SHAPES["gb8-factor2-stride1-odd"], target, seed)
    sch = s_tir.Schedule(func, seed=seed)
    design_space = tvm.get_global_func(f"s_tir.meta_schedule.cpu.{compute.SCHEDULE_RULE}")
    (sch,) = design_space(sch, sch.get_sblock(compute.CONV_BLOCK))
    kinds = [inst.kind.name for inst in sch.trace.insts]
    assert kinds.count("SamplePerfectTile") == 3
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr(builder.SCHEDULED_ATTR, True)}), target=target)
    out = tvm.runtime.tensor(np.zeros(want.shape, np.float32))
    lib["main"](*[tvm.runtime.tensor(inputs[b.name]) for b in func.params[:-1]], out)
    assert_close(out.numpy(), want)


@pytest.mark.parametrize("key, preset_name", [("cpu", "host"), ("arm_cpu", "arm-a53")])
def test_write_out_transposes_the_register_tile_on_x86_only(key, preset_name):
    from tvm import s_tir

    from tvm_effconv.intrin.transpose import transpose_name
    from tvm_effconv.ops.varg import cpu
    from tvm_effconv.schedule_rules import RULES

    target = get_preset(preset_name).target
    func, _, _ = kernel_case(SHAPES["gb8-factor2-stride1-odd"], target, 0)
    sch = s_tir.Schedule(func)
    conv = sch.get_sblock(compute.CONV_BLOCK)
    RULES[(compute.SCHEDULE_RULE, key)].function(sch, conv, DefaultKnobs(), "default")
    tensorized = [str(inst.attrs[0]) for inst in sch.trace.insts if inst.kind.name == "Tensorize"]
    # the default tile row: all 7 output columns, one register of a group's 16 channels (or a half, AVX2)
    lanes = cpu.vector_lanes(target, 16)
    assert tensorized == ([transpose_name(7, lanes, "float32", "global")] if key == "cpu" else [])
    # the float tile is a stack array, not a workspace allocated per tile (see ops/varg/cpu.py)
    assert sch.get(conv).writes[0].source.scope() == "global"


def test_x86_assembly_broadcasts_inputs_and_vectorises_channels():
    model, x = make_unit(SHAPES["gb8-factor2-stride1-odd"])
    executable, _ = compile_model(model, x, get_preset("host"))
    assembly = builder.generated_source(executable, "llvm", "asm")
    assert "vbroadcastss" in assembly and "vfmadd231ps" in assembly and "ymm" in assembly


def test_arm_assembly_vectorises_channels_with_fmla():
    # no emulation needed: the cross-compiled kernel's NEON multiply-adds over 4 output channels
    model, x = make_unit(SHAPES["gb8-factor2-stride1-odd"])
    executable, report = compile_model(model, x, get_preset("arm-a53"))
    assert len(varg_functions(report)) == 1
    assembly = builder.generated_source(executable, "llvm", "asm")
    assert any(line.split()[:1] == ["fmla"] and ".4s" in line for line in assembly.splitlines())


@pytest.mark.parametrize("preset_name", ["host", "cuda", pytest.param("arm", marks=pytest.mark.emulated)])
def test_vargnet_small_compiles_and_verifies(preset_name, tmp_path):
    import json

    from tvm_effconv.compile import compile_model as compile_cli

    if preset_name == "cuda" and shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: the CUDA build cannot be checked")
    out = compile_cli("tvm_effconv.models.vargnet:vargnet_small", preset_name, tmp_path / "out", log=lambda _m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    # Without a GPU the CUDA build is compiled to a fatbin by nvcc but cannot run.
    assert manifest["verification"]["status"] in (("passed", "compiled") if preset_name == "cuda" else ("passed",))
    kernels = manifest["kernels"]
    ours = {v["function"] for v in kernels["variants"] if v["rule"] in (compute.SCHEDULE_RULE, compute.SEPARABLE_RULE)}
    model, inputs = vargnet_small()
    # every separable unit (so every VarGConv2d) of the network runs as one of our kernels
    assert sum(call["function"] in ours for call in kernels["calls"]) == len(vargnet_conv_shapes(model, *inputs))


# --- CUDA ------------------------------------------------------------------------------------------

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
CUDA_CASES = ["gb8-factor2-stride1-odd", "gb16-factor2-stride2-batch3", "gb32-factor1-stride2-odd"]


def cuda_target():
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host="llvm")


@functools.cache
def cuda_build(name):
    import tvm
    from tvm import s_tir

    from tvm_effconv.ops.varg import cuda as varg_cuda

    func, inputs, want = kernel_case(SHAPES[name], cuda_target())
    sch = s_tir.Schedule(func)
    varg_cuda.schedule_varg_conv2d_cuda(sch, sch.get_sblock(compute.CONV_BLOCK), DefaultKnobs())
    scheduled = sch.mod["main"]
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr(builder.SCHEDULED_ATTR, True)}), target=cuda_target())
    (cuda,) = [m for m in lib.mod.imports if m.kind == "cuda"]
    return scheduled, lib, cuda.inspect_source("cuda"), inputs, want


@needs_nvcc
@pytest.mark.parametrize("name", CUDA_CASES)
def test_cuda_source_compiles_with_nvcc(name):
    from tvm.support import nvcc

    _, _, source, _, _ = cuda_build(name)
    with cuda_target():
        assert len(nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc")) > 0


@needs_cxx
@pytest.mark.parametrize("name", CUDA_CASES)
def test_cuda_source_computes_the_reference_on_the_host(name, tmp_path):
    from test_dsconv_cuda import run_on_host

    scheduled, _, source, inputs, want = cuda_build(name)
    assert_close(run_on_host(scheduled, source, inputs, tmp_path)[scheduled.params[-1].name], want)


@pytest.mark.skipif(not __import__("tvm").cuda(0).exist, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("name", CUDA_CASES)
def test_cuda_kernel_matches_the_reference_on_the_gpu(name):
    import tvm

    scheduled, lib, _, inputs, want = cuda_build(name)
    device = tvm.cuda(0)
    out = tvm.runtime.tensor(np.zeros(want.shape, np.float32), device)
    lib["main"](*[tvm.runtime.tensor(inputs[b.name], device) for b in scheduled.params[:-1]], out)
    assert_close(out.numpy(), want)


# --- emulated ARM ----------------------------------------------------------------------------------


@pytest.mark.emulated
@pytest.mark.parametrize("preset_name, cpu", [("arm-a53", "cortex-a53"), ("arm-a76", "cortex-a76")])
def test_arm_kernel_on_the_emulated_device(preset_name, cpu, emulated_device, tmp_path):
    preset = get_preset(preset_name)
    device = emulated_device(cpu)
    for name in ("gb8-factor2-stride1-odd", "gb16-factor2-stride2-batch3", "gb32-factor1-stride2-odd"):
        model, x = make_unit(SHAPES[name])
        executable, report = compile_model(model, x, preset)
        assert len(varg_functions(report)) == 1
        assert_close(run_remote(executable, preset, device.address, x, tmp_path), expected(model, x))


def one_varg_unit():
    model, x = make_unit(SHAPES["gb8-factor2-stride1-odd"])
    return model, (x,)


def test_tuning_samples_the_varg_knobs_and_compile_reuses_the_records(tmp_path):
    import json

    from tvm_effconv.compile import compile_model as compile_cli
    from tvm_effconv.tune import tune_model

    model = f"{__name__}:one_varg_unit"
    report = tune_model(model, "host", trials=2, records=str(tmp_path / "records"), only=["varg_conv2d"],
                        log=lambda _m: None)
    assert [t for t in report.tasks if "varg_conv2d" in t.name and t.tuned_ms]
    out = compile_cli(model, "host", tmp_path / "out", records=str(tmp_path / "records"), log=lambda _m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    # Reused either way: the tuned record applied, or the verdict that the default measured faster.
    reused = manifest["records"]["applied"] + manifest["records"]["default_by_measurement"]
    assert any("varg_conv2d" in name for name in reused)
    assert not any("varg_conv2d" in name for name in manifest["records"]["missing"])
    assert manifest["verification"]["status"] == "passed"
