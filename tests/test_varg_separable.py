"""The VarG separable unit (group conv -> BN -> act -> pointwise -> BN (-> act)) as one op and one fused
kernel: the op against the unit's layers, the fused kernel (and the unfused pair) against PyTorch on the
host and the emulated ARM devices, its knobs as MetaSchedule draws them, the CUDA source (nvcc)."""

import functools

import numpy as np
import pytest
import torch
from test_dsconv_kernel import assert_close, run_remote
from test_varg_kernel import compile_model, cuda_target, needs_nvcc, run_local
from test_varg_layer import one_thread, randomize  # noqa: F401 - one_thread: the module's autouse fixture

from tvm_effconv import build as builder
from tvm_effconv.errors import LayerParameterError
from tvm_effconv.nn.varg import VarGSeparable, standard_layers, varg_separable
from tvm_effconv.ops import varg
from tvm_effconv.ops.varg import compute, reference
from tvm_effconv.schedule_rules import DefaultKnobs
from tvm_effconv.targets import get_preset

# (in, out, group_base, factor, stride, batch, (height, width), activation, pointwise activation)
UNITS = {
    "gb8-stride1-odd-act": (32, 24, 8, 2, 1, 2, (9, 7), "prelu", True),
    "gb8-stride2-odd-no-act": (24, 40, 8, 2, 2, 2, (11, 13), "prelu", False),
    "gb16-stride2-relu-act": (32, 32, 16, 2, 2, 2, (7, 9), "relu", True),
    "gb16-factor1-stride1-no-act": (48, 16, 16, 1, 1, 2, (5, 5), "prelu", False),
    "gb32-stride1-no-act": (64, 64, 32, 2, 1, 2, (6, 7), "prelu", False),
    "gb32-stride2-odd-act": (64, 48, 32, 2, 2, 2, (9, 9), "relu", True),
}


def make_unit(spec, seed=0):
    cin, cout, group_base, factor, stride, batch, size, act, pointwise_act = spec
    torch.manual_seed(seed)
    unit = randomize(VarGSeparable(cin, cout, stride=stride, factor=factor, group_base=group_base, activation=act,
                                   pointwise_activation=pointwise_act), seed)
    return unit, torch.randn(batch, cin, *size, generator=torch.Generator().manual_seed(seed + 1))


def layers_output(unit, x):
    with torch.no_grad(), standard_layers(unit):
        return unit(x).numpy()


def rules(report):
    return sorted(v["rule"] for v in report.kernel_variants)


# --- the op ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gb8-stride1-odd-act", "gb16-stride2-relu-act"])
def test_eval_unit_is_one_op_equal_to_its_layers(name):
    unit, x = make_unit(UNITS[name])
    torch.testing.assert_close(unit(x), torch.from_numpy(layers_output(unit, x)), rtol=1e-5, atol=1e-5)
    calls = [n for n in torch.export.export(unit, (x,)).run_decompositions().graph.nodes if n.op == "call_function"]
    assert [str(n.target) for n in calls] == ["effconv.varg_separable.default"]
    with standard_layers(unit):
        calls = [n for n in torch.export.export(unit, (x,)).graph.nodes if n.op == "call_function"]
        assert "effconv.varg_separable.default" not in {str(n.target) for n in calls}
    assert unit.single_op, "standard_layers restores the unit"
    unit.train()
    assert unit(x).requires_grad  # training runs the layers, with gradients


def test_op_refuses_a_slope_without_prelu():
    unit, x = make_unit(UNITS["gb16-stride2-relu-act"])
    g, p = unit.group_bn, unit.pointwise_bn
    with pytest.raises(LayerParameterError, match="slope"):
        varg_separable(x, unit.group_conv.weight, g.weight, g.bias, g.running_mean, g.running_var, g.weight,
                       unit.pointwise.weight, p.weight, p.bias, p.running_mean, p.running_var, None, [2, 2], [1, 1],
                       2, [g.eps, p.eps], "relu", "relu")


def test_numpy_reference_matches_the_op():
    unit, x = make_unit(UNITS["gb8-stride2-odd-no-act"])
    g, p = unit.group_bn, unit.pointwise_bn

    def affine(bn):
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
        return scale, bn.bias.detach().numpy() - bn.running_mean.numpy() * scale

    got = reference.separable_unit(
        x.numpy(), unit.group_conv.weight.detach().numpy(), *affine(g), unit.pointwise.weight.detach().numpy(),
        *affine(p), (2, 2), (1, 1), unit.group_conv.groups, "prelu", "none", unit.group_act.weight.detach().numpy(),
    )
    assert_close(got, layers_output(unit, x))


# --- host ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNITS))
def test_host_fused_kernel_matches_pytorch(name):
    unit, x = make_unit(UNITS[name])
    with varg.forced_fusion(True):
        executable, report = compile_model(unit, x, get_preset("host"))
    assert rules(report) == [compute.SEPARABLE_RULE], "one fused kernel"
    assert_close(run_local(executable, x), layers_output(unit, x))


@pytest.mark.parametrize("name", ["gb8-stride2-odd-no-act", "gb32-stride2-odd-act"])
def test_host_unfused_pair_matches_pytorch(name):
    unit, x = make_unit(UNITS[name])
    with varg.forced_fusion(False):
        executable, report = compile_model(unit, x, get_preset("host"))
    assert rules(report) == [compute.SCHEDULE_RULE], "the grouped kernel, then TVM's pointwise conv"
    assert_close(run_local(executable, x), layers_output(unit, x))


def kernel_case(spec, target, seed=0):
    """(TE PrimFunc of the fused unit, inputs by buffer name, numpy reference)."""
    from tvm import te

    cin, cout, group_base, factor, stride, batch, (h, w), act, pointwise_act = spec
    groups, mid = cin // group_base, cin * factor
    conv = compute.VarGShape(batch, cin, h, w, mid, (3, 3), (stride,) * 2, (1, 1), (1, 1), groups,
                             varg.vector_lanes(target, mid // groups))
    shape = compute.SeparableShape(conv, cout, varg.vector_lanes(target, cout))
    pointwise_act = act if pointwise_act else "none"
    rng = np.random.default_rng(seed)
    xv = rng.standard_normal((batch, cin, h, w)).astype(np.float32)
    w1, w2 = rng.standard_normal((mid, group_base, 3, 3)), rng.standard_normal((cout, mid, 1, 1))
    s1, b1, slope1 = rng.random(mid) + 0.5, rng.standard_normal(mid), rng.random(mid) * 0.4
    s2, b2, slope2 = rng.random(cout) + 0.5, rng.standard_normal(cout), rng.random(cout) * 0.4
    inputs = {"x": xv, "w1": compute.pack_weights(conv, w1, s1), "b1": b1, "w2": compute.pack_pointwise_weights(shape, w2, s2),
              "b2": b2}
    slopes = {"slope1": slope1} if act == "prelu" else {}
    slopes.update({"slope2": slope2} if pointwise_act == "prelu" else {})
    inputs = {key: np.asarray(value, np.float32) for key, value in {**inputs, **slopes}.items()}
    holders = {key: te.placeholder(value.shape, "float32", name=key) for key, value in inputs.items()}
    y = compute.varg_separable(shape, holders["x"], holders["w1"], holders["b1"], holders["w2"], holders["b2"], act,
                               pointwise_act, holders.get("slope1"), holders.get("slope2"), varg.cpu_annotations(target))
    want = reference.separable_unit(xv, w1, s1, b1, w2, s2, b2, (stride,) * 2, (1, 1), groups, act, pointwise_act,
                                    slope1, slope2)
    return te.create_prim_func([*holders.values(), y]), inputs, want


@pytest.mark.parametrize("seed", [1, 2])
def test_sampled_knobs_build_and_compute_on_the_host(seed):
    import tvm
    from tvm import s_tir

    target = get_preset("host").target
    func, inputs, want = kernel_case(UNITS["gb8-stride2-odd-no-act"], target, seed)
    sch = s_tir.Schedule(func, seed=seed)
    design_space = tvm.get_global_func(f"s_tir.meta_schedule.cpu.{compute.SEPARABLE_RULE}")
    (sch,) = design_space(sch, sch.get_sblock(compute.POINTWISE_BLOCK))
    assert [inst.kind.name for inst in sch.trace.insts].count("SamplePerfectTile") == 4
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr(builder.SCHEDULED_ATTR, True)}), target=target)
    out = tvm.runtime.tensor(np.zeros(want.shape, np.float32))
    lib["main"](*[tvm.runtime.tensor(inputs[b.name]) for b in func.params[:-1]], out)
    assert_close(out.numpy(), want)


def test_default_cache_tile_keeps_the_intermediate_within_its_budget():
    from tvm_effconv.ops.varg import cpu

    for mid, size in ((512, 7), (256, 14), (128, 28), (64, 56)):
        tile = cpu.default_separable_tile(2, mid // 16, size, size, mid, 16)
        rows = tile["y"][1] * tile["y"][2]
        assert tile["x"][0] == 1 and size % rows == 0
        assert rows * size * mid * 4 <= cpu.CACHE_TILE_BYTES or rows == tile["y"][2]


# --- emulated ARM ----------------------------------------------------------------------------------


@pytest.mark.emulated
@pytest.mark.parametrize("preset_name, cpu", [("arm-a53", "cortex-a53"), ("arm-a76", "cortex-a76")])
def test_arm_fused_kernel_on_the_emulated_device(preset_name, cpu, emulated_device, tmp_path):
    preset = get_preset(preset_name)
    device = emulated_device(cpu)
    for name in ("gb8-stride2-odd-no-act", "gb16-stride2-relu-act", "gb32-stride1-no-act"):
        unit, x = make_unit(UNITS[name])
        with varg.forced_fusion(True):
            executable, report = compile_model(unit, x, preset)
        assert rules(report) == [compute.SEPARABLE_RULE]
        assert_close(run_remote(executable, preset, device.address, x, tmp_path), layers_output(unit, x))


# --- CUDA ------------------------------------------------------------------------------------------

CUDA_UNITS = ["gb8-stride1-odd-act", "gb16-stride2-relu-act", "gb32-stride2-odd-act"]


@functools.cache
def cuda_build(name):
    import tvm
    from tvm import s_tir

    from tvm_effconv.ops.varg import cuda as varg_cuda

    func, inputs, want = kernel_case(UNITS[name], cuda_target())
    sch = s_tir.Schedule(func)
    varg_cuda.schedule_varg_separable_cuda(sch, sch.get_sblock(compute.POINTWISE_BLOCK), DefaultKnobs())
    scheduled = sch.mod["main"]
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr(builder.SCHEDULED_ATTR, True)}), target=cuda_target())
    (cuda,) = [m for m in lib.mod.imports if m.kind == "cuda"]
    return scheduled, lib, cuda.inspect_source("cuda"), inputs, want


@needs_nvcc
@pytest.mark.parametrize("name", CUDA_UNITS)
def test_cuda_fused_source_keeps_the_intermediate_in_shared_memory_and_compiles(name):
    from tvm.support import nvcc

    _, _, source, _, _ = cuda_build(name)
    assert "__shared__" in source and "__syncthreads()" in source
    with cuda_target():
        assert len(nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc")) > 0


@pytest.mark.skipif(not __import__("tvm").cuda(0).exist, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("name", CUDA_UNITS)
def test_cuda_fused_kernel_matches_the_reference_on_the_gpu(name):
    import tvm

    scheduled, lib, _, inputs, want = cuda_build(name)
    device = tvm.cuda(0)
    out = tvm.runtime.tensor(np.zeros(want.shape, np.float32), device)
    lib["main"](*[tvm.runtime.tensor(inputs[b.name], device) for b in scheduled.params[:-1]], out)
    assert_close(out.numpy(), want)
