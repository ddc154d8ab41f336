"""The LCCL TVM kernels (effconv::lccl_conv2d) against the eager reference op and the numpy reference of the
sparse computation: both CPU algorithms ("skip", "compact") at mask sparsities 0%, 50%, 90%, 100%, both mask
modes, odd shapes, stride 2, on the host and on the emulated aarch64 device; the compaction's lists against
the numpy reference; the CUDA "compact" kernel's source compiles to a fatbin and, run on the host thread by
thread (tests/test_dsconv_cuda.py's runner), computes the reference (on the GPU too where there is one);
MetaSchedule's draws of the knobs build and compute the same; the LCCL ResNet-18 compiles and verifies."""

import functools
import json
import uuid

import numpy as np
import pytest
import test_dsconv_cuda as cuda_host
import torch
from test_dsq_cuda import roomy_launch_plan

from tvm_effconv import build as builder
from tvm_effconv import frontend
from tvm_effconv.nn.lccl import LCCLConv2d, calibrate_mask_sparsity
from tvm_effconv.ops import lccl
from tvm_effconv.ops.lccl import compute, reference
from tvm_effconv.targets import get_preset

MODES = ["spatial", "channel"]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
CPU_ALGORITHMS = ["skip", "compact"]
# (in, out, kernel, stride, padding, dilation, bias, batch, (H, W)): channels not multiples of 8, H != W
GEOMETRIES = {
    "odd-stride2": (13, 10, 3, 2, 1, 1, True, 1, (9, 7)),
    "odd-stride2-batch2": (13, 10, 3, 2, 1, 1, True, 2, (9, 7)),
    "dilated-batch2-no-bias": (6, 12, 3, 1, 2, 2, False, 2, (8, 11)),
    "pointwise-stride2": (9, 20, 1, 2, 0, 1, True, 1, (7, 6)),
    "one-position-batch2": (7, 8, 3, 2, 1, 1, True, 2, (2, 1)),  # a 1 x 1 output: one-entry lists
}


def randomize_batch_norm(bn, generator):
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=generator) * 0.3)
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.2)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)


def make_layer(geometry, mode, sparsity, seed=0):
    """An eval-mode LCCLConv2d whose mask is ``sparsity`` zero on its returned input."""
    cin, cout, k, stride, padding, dilation, bias, batch, size = GEOMETRIES[geometry]
    torch.manual_seed(seed)
    layer = LCCLConv2d(cin, cout, k, stride, padding, mode, bias, dilation=dilation)
    generator = torch.Generator().manual_seed(seed)
    randomize_batch_norm(layer.main_bn, generator)
    randomize_batch_norm(layer.cheap_bn, generator)
    x = torch.randn(batch, cin, *size, generator=generator)
    calibrate_mask_sparsity(layer, (x,), sparsity)
    return layer.eval(), x


def compile_layer(layer, x, preset, algorithm):
    with torch.no_grad():
        exported = torch.export.export(layer, (x,))
    with lccl.forcing_algorithm(algorithm):
        executable, report = builder.build(frontend.to_relax(exported, preset.target), preset)
    assert not report.unscheduled
    (variant,) = report.kernel_variants
    assert variant[compute.ALGORITHM_ANNOTATION] == algorithm  # recorded in the manifest
    return executable


def run_local(executable, x):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()


def expected(layer, x):
    with torch.no_grad():
        return layer(x).numpy()


def assert_close(got, want, layer=None, x=None):
    """1e-5 relative to the output's scale. With ``layer``: plus 1e-5 of max relu(main) x the cheap conv's term
    magnitude sum |w| |x|: a mask calibrated close to zero is the difference of larger float32 terms (the
    reference op works in float64), and that cancellation is the input's conditioning, not the kernel's error."""
    scale = max(float(np.abs(want).max()), 1e-30)
    if layer is not None:
        with torch.no_grad():
            main = torch.nn.functional.conv2d(x, layer.main_weight_folded, layer.main_bias_folded, layer.stride,
                                              layer.padding, layer.dilation).relu().max().item()
        cheap_terms = reference.mask(np.abs(x.numpy()), np.abs(layer.cheap_weight_folded.numpy()), None,
                                     layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.mode)
        scale += main * float(cheap_terms.max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_array_equal(got[want == 0], 0)  # masked-out outputs are exact zeros


def op_arguments(layer):
    return (
        layer.main_weight_folded.numpy(), layer.main_bias_folded.numpy(), layer.cheap_weight_folded.numpy(),
        layer.cheap_bias_folded.numpy(), layer.stride, layer.padding, layer.dilation, layer.mode,
    )


@pytest.mark.parametrize("algorithm", CPU_ALGORITHMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_host_kernel_matches_the_reference_op_at_every_sparsity(algorithm, mode, sparsity):
    layer, x = make_layer("odd-stride2", mode, sparsity)
    want = expected(layer, x)
    assert_close(run_local(compile_layer(layer, x, get_preset("host"), algorithm), x), want, layer, x)
    if sparsity == 1.0:
        assert not want.any()


@pytest.mark.parametrize("algorithm", CPU_ALGORITHMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", ["dilated-batch2-no-bias", "pointwise-stride2", "one-position-batch2"])
def test_host_kernel_on_odd_geometries(algorithm, mode, geometry):
    layer, x = make_layer(geometry, mode, 0.5)
    got = run_local(compile_layer(layer, x, get_preset("host"), algorithm), x)
    assert_close(got, expected(layer, x), layer, x)


def test_the_dispatch_picks_the_measured_algorithm_and_rejects_unknown_ones():
    import tvm

    host = get_preset("host").target
    assert lccl.algorithm_for(host) == lccl.ALGORITHM["x86"]
    assert lccl.algorithm_for(get_preset("arm-a76").target) == lccl.ALGORITHM["arm"]
    assert lccl.algorithm_for(tvm.target.Target({"kind": "cuda", "arch": "sm_80"})) == "compact"
    with lccl.forcing_algorithm("compact"):
        assert lccl.algorithm_for(host) == "compact"
    with pytest.raises(ValueError, match="algorithm='sparse'"):
        with lccl.forcing_algorithm("sparse"):
            pass


@pytest.mark.parametrize("mode", MODES)
def test_numpy_reference_matches_the_op(mode):
    layer, x = make_layer("dilated-batch2-no-bias", mode, 0.5)
    got = reference.lccl_conv2d(x.numpy(), *op_arguments(layer))
    assert_close(got.astype(np.float32), expected(layer, x))


def kernel_case(layer, x, target, algorithm=None):
    """(shape, PrimFunc, inputs by buffer name) of ``layer``'s kernel for ``target`` (``algorithm``: the
    dispatch's by default)."""
    from tvm import te

    shape = lccl.layer_shape(target, x.shape, layer.main_weight.shape, layer.stride, layer.padding, layer.dilation,
                             layer.mode, algorithm)
    inputs = dict(zip(ARGUMENTS, [x.numpy(), *lccl.constants_of(shape, *op_arguments(layer)[:4])]))
    holders = [te.placeholder(v.shape, "float32", name) for name, v in inputs.items()]
    return shape, compute.prim_func(shape, *holders), inputs


def build_kernel(layer, x, target, algorithm=None):
    """:func:`kernel_case` with the PrimFunc scheduled by the target's rule with its default knobs."""
    import tvm

    from tvm_effconv.schedule_rules import apply_default_rules

    shape, func, inputs = kernel_case(layer, x, target, algorithm)
    mod, scheduled = apply_default_rules(tvm.IRModule({"main": func}), target)
    assert scheduled == ["main"]
    return shape, mod["main"], inputs


ARGUMENTS = ("x", "main_weight", "main_bias", "cheap_weight", "cheap_bias")


def run_built(func, inputs, target, out_shape):
    import tvm

    with target:
        lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib(*(tvm.runtime.tensor(inputs[name]) for name in ARGUMENTS), out)
    return out.numpy()


def test_every_algorithm_computes_the_same_where_no_mask_is_zero():
    # With every mask entry positive all three compute relu(main) * mask; the guards cost nothing in value.
    layer, x = make_layer("odd-stride2", "spatial", 0.0)
    target = get_preset("host").target
    outputs = {}
    for algorithm in compute.ALGORITHMS:
        shape, func, inputs = build_kernel(layer, x, target, algorithm)
        assert (" if " in func.script()) == (algorithm != "dense")  # the main block's guard
        outputs[algorithm] = run_built(func, inputs, target, (1, 10, *shape.out_size))
    assert_close(outputs["skip"], expected(layer, x))
    assert_close(outputs["dense"], outputs["skip"])
    assert_close(outputs["compact"], outputs["skip"])


@pytest.mark.parametrize("mode, lanes", [("spatial", 1), ("channel", 1), ("channel", 4)])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("oh, ow", [(7, 5), (1, 1)])
def test_the_compaction_lists_the_active_units_in_order(mode, lanes, sparsity, oh, ow):
    # The list stages alone, as outputs of a plain (unscheduled) PrimFunc, against reference.compaction.
    import tvm
    from tvm import te

    n_, k_ = 2, 8
    shape = compute.LCCLShape(n_, 3, oh, ow, k_, (1, 1), (1, 1), (0, 0), (1, 1), mode, lanes, "compact", rows=3)
    rng = np.random.default_rng(int(sparsity * 10))
    size = (n_, shape.mask_channels, oh, ow)
    mask = np.where(rng.random(size) < sparsity, 0.0, rng.random(size) + 0.1).astype(np.float32)
    holder = te.placeholder(mask.shape, "float32", "mask")
    stages = compute.compaction(shape, holder)[1:]  # row_offset, row_prefix, row_of, column_of
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([holder, *stages])}), target="llvm")
    outs = [tvm.runtime.tensor(np.zeros([int(d) for d in t.shape], np.int32)) for t in stages]
    lib(tvm.runtime.tensor(mask), *outs)
    offset, prefix, rows, columns = (o.numpy() for o in outs)
    for n, lists in enumerate(reference.compaction(mask, mode, lanes)):
        for l, positions in enumerate(lists):
            count = len(positions)
            assert offset[n, l, oh] == count
            np.testing.assert_array_equal(rows[n, l, :count] * ow + columns[n, l, :count], positions)
            ranks = (offset[n, l, :oh, None] + prefix[n, l]).reshape(-1)[positions]
            np.testing.assert_array_equal(ranks, np.arange(count))  # the inverse: each unit finds its entry
            assert (rows[n, l, count:] < oh).all() and (np.minimum(columns[n, l, count:], ow - 1) < ow).all()


def test_bad_mode_and_shapes_fail_early():
    target = get_preset("host").target
    with pytest.raises(ValueError, match="mode='diagonal'"):
        lccl.layer_shape(target, (1, 4, 8, 8), (8, 4, 3, 3), (1, 1), (1, 1), (1, 1), "diagonal")
    with pytest.raises(ValueError, match="main_weight.shape"):
        lccl.layer_shape(target, (1, 4, 8, 8), (8, 5, 3, 3), (1, 1), (1, 1), (1, 1), "spatial")
    with pytest.raises(ValueError, match="centre tap"):
        lccl.layer_shape(target, (1, 4, 8, 8), (8, 4, 2, 2), (1, 1), (1, 1), (1, 1), "channel")
    shape = lccl.layer_shape(target, (1, 4, 8, 8), (8, 4, 3, 3), (1, 1), (1, 1), (1, 1), "channel")
    weight = np.zeros((8, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"cheap_weight.shape=\(1, 4, 3, 3\)"):
        lccl.constants_of(shape, weight, None, np.zeros((1, 4, 3, 3), np.float32), None)
    with pytest.raises(ValueError, match="algorithm='gemm'"):
        lccl.layer_shape(target, (1, 4, 8, 8), (8, 4, 3, 3), (1, 1), (1, 1), (1, 1), "spatial", "gemm")
    with pytest.raises(ValueError, match="rows=0"):
        compute.LCCLShape(1, 4, 8, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), "spatial", 8, "compact", rows=0)
    with pytest.raises(ValueError, match="algorithm='skip' has no CUDA schedule"):
        lccl.layer_shape(cuda_target(), (1, 4, 8, 8), (8, 4, 3, 3), (1, 1), (1, 1), (1, 1), "spatial", "skip")


# --- CUDA ---------------------------------------------------------------------------------------------

needs_nvcc, needs_cxx = cuda_host.needs_nvcc, cuda_host.needs_cxx
has_gpu = __import__("tvm").cuda(0).exist


def cuda_target():
    import tvm

    return tvm.target.Target(cuda_host.TARGET, host="llvm")


@pytest.fixture
def roomy_buffers(monkeypatch):
    # StorageRewrite gives later compaction stages the memory of dead earlier ones (see test_dsq_cuda.py)
    monkeypatch.setattr(cuda_host, "launch_plan", roomy_launch_plan)


@functools.cache
def cuda_build(mode, sparsity, geometry="odd-stride2-batch2"):
    """(layer, x, shape, scheduled PrimFunc, library, CUDA C, inputs by buffer name) with default knobs."""
    layer, x = make_layer(geometry, mode, sparsity)
    shape, func, inputs = build_kernel(layer, x, cuda_target())
    lib, source = cuda_host.build(func)
    return layer, x, shape, func, lib, source, inputs


@needs_nvcc
@pytest.mark.parametrize("mode", MODES)
def test_cuda_source_compiles_to_a_fatbin(mode):
    from tvm.support import nvcc

    *_, shape, _, _, source, _ = cuda_build(mode, 0.5)
    assert shape.algorithm == "compact" and shape.lanes == (10 if mode == "spatial" else 1)
    # pad, cheap conv, five list stages, the GEMM over the list, the write
    assert len(cuda_host.KERNEL.findall(source)) == 9
    with cuda_host._target():
        assert len(nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc")) > 0


@needs_cxx
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_cuda_source_computes_the_reference_on_the_host(mode, sparsity, roomy_buffers, tmp_path):
    layer, x, _, func, _, source, inputs = cuda_build(mode, sparsity)
    got = cuda_host.run_on_host(func, source, inputs, tmp_path)[cuda_host.output_name(func)]
    assert_close(got, expected(layer, x), layer, x)


@needs_cxx
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", ["dilated-batch2-no-bias", "pointwise-stride2", "one-position-batch2"])
def test_cuda_source_on_odd_geometries(mode, geometry, roomy_buffers, tmp_path):
    layer, x, _, func, _, source, inputs = cuda_build(mode, 0.5, geometry)
    got = cuda_host.run_on_host(func, source, inputs, tmp_path)[cuda_host.output_name(func)]
    assert_close(got, expected(layer, x), layer, x)


@pytest.mark.skipif(not has_gpu, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_cuda_kernel_matches_the_reference_on_the_gpu(mode, sparsity):
    import tvm

    layer, x, shape, func, lib, _, inputs = cuda_build(mode, sparsity)
    device = tvm.cuda(0)
    out = tvm.runtime.tensor(np.zeros((x.shape[0], shape.out_channels, *shape.out_size), np.float32), device)
    lib["main"](*(tvm.runtime.tensor(inputs[name], device) for name in ARGUMENTS), out)
    assert_close(out.numpy(), expected(layer, x), layer, x)


def drawn_schedule(func, rule_key, seed):
    """What MetaSchedule's ApplyCustomRule calls: the registered design space with its knobs drawn by
    sampling instructions (one space: the algorithm is the compute's, not a design-space variant)."""
    import tvm
    from tvm import s_tir

    space = tvm.get_global_func(f"s_tir.meta_schedule.{rule_key}.{compute.SCHEDULE_RULE}")
    start = s_tir.Schedule(func, seed=seed)
    (drawn,) = space(start, start.get_sblock(compute.MAIN_BLOCK))
    return drawn


@needs_cxx
@pytest.mark.parametrize("seed", [1, 2])
def test_sampled_cuda_knobs_build_and_compute(seed, roomy_buffers, tmp_path):
    from collections import Counter

    from tvm_effconv.ops.lccl import cuda as lccl_cuda

    layer, x = make_layer("odd-stride2-batch2", "spatial", 0.5)
    shape, func, inputs = kernel_case(layer, x, cuda_target())
    drawn = drawn_schedule(func, "cuda", seed)
    draws = Counter(inst.kind.name for inst in drawn.trace.insts)
    assert (draws["SamplePerfectTile"], draws["SampleCategorical"]) == (2, 1)
    assert lccl_cuda.ROWS == shape.rows
    _, source = cuda_host.build(drawn.mod["main"])
    got = cuda_host.run_on_host(drawn.mod["main"], source, inputs, tmp_path)[cuda_host.output_name(func)]
    assert_close(got, expected(layer, x), layer, x)


@pytest.mark.parametrize("algorithm", CPU_ALGORITHMS)
def test_sampled_cpu_knobs_build_and_compute(algorithm):
    layer, x = make_layer("odd-stride2", "spatial", 0.5)
    target = get_preset("host").target
    shape, func, inputs = kernel_case(layer, x, target, algorithm)
    drawn = drawn_schedule(func, "cpu", 3)
    assert [inst.kind.name for inst in drawn.trace.insts].count("SamplePerfectTile") == 1
    got = run_built(drawn.mod["main"].with_attr(builder.SCHEDULED_ATTR, True), inputs, target,
                    (1, 10, *shape.out_size))
    assert_close(got, expected(layer, x), layer, x)


# --- the emulated ARM device --------------------------------------------------------------------------


def run_remote(executable, preset, address, x, tmp_path):
    from tvm_effconv.device import rpc
    from tvm_effconv.verify import run_vm

    library = tmp_path / f"lccl-{uuid.uuid4().hex}.so"
    builder.export_library(executable, preset, library)
    session = rpc.connect(address)
    session.upload(str(library), target=library.name)
    return run_vm(session.load_module(library.name), session.cpu(), [x.numpy()])[0]


@pytest.mark.emulated
@pytest.mark.parametrize("preset_name, cpu", [("arm-a53", "cortex-a53"), ("arm-a76", "cortex-a76")])
def test_arm_kernel_on_the_emulated_device(preset_name, cpu, emulated_device, tmp_path):
    preset = get_preset(preset_name)
    device = emulated_device(cpu)
    cases = (("spatial", 0.5, "odd-stride2"), ("channel", 0.9, "odd-stride2"),
             ("spatial", 0.0, "dilated-batch2-no-bias"), ("channel", 1.0, "pointwise-stride2"))
    for algorithm in CPU_ALGORITHMS:
        for mode, sparsity, geometry in cases:
            layer, x = make_layer(geometry, mode, sparsity)
            got = run_remote(compile_layer(layer, x, preset, algorithm), preset, device.address, x, tmp_path)
            assert_close(got, expected(layer, x), layer, x)


# --- the reference network ----------------------------------------------------------------------------

REFERENCE_NETWORK = "tvm_effconv.models.lccl_resnet:lccl_resnet18_small"


def test_the_lccl_resnet_compiles_and_verifies_on_the_host(tmp_path):
    from tvm_effconv.compile import compile_model

    out = compile_model(REFERENCE_NETWORK, "host", tmp_path / "host", log=lambda _m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["status"] == "passed", manifest["verification"]
