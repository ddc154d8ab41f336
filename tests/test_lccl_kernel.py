"""The LCCL TVM kernels (effconv::lccl_conv2d) against the eager reference op and the numpy reference of the
sparse computation: mask sparsities 0%, 50%, 90%, 100%, both mask modes, odd shapes, stride 2, on the host
and on the emulated aarch64 device; the CUDA source compiles to a fatbin; the LCCL ResNet-18 compiles and
verifies."""

import json
import shutil
import uuid

import numpy as np
import pytest
import torch

from tvm_effconv import build as builder
from tvm_effconv import frontend
from tvm_effconv.nn.lccl import LCCLConv2d, calibrate_mask_sparsity
from tvm_effconv.ops import lccl
from tvm_effconv.ops.lccl import compute, reference
from tvm_effconv.targets import get_preset

MODES = ["spatial", "channel"]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
# (in, out, kernel, stride, padding, dilation, bias, batch, (H, W)): channels not multiples of 8, H != W
GEOMETRIES = {
    "odd-stride2": (13, 10, 3, 2, 1, 1, True, 1, (9, 7)),
    "dilated-batch2-no-bias": (6, 12, 3, 1, 2, 2, False, 2, (8, 11)),
    "pointwise-stride2": (9, 20, 1, 2, 0, 1, True, 1, (7, 6)),
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


def compile_layer(layer, x, preset):
    with torch.no_grad():
        exported = torch.export.export(layer, (x,))
    executable, report = builder.build(frontend.to_relax(exported, preset.target), preset)
    assert not report.unscheduled
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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_host_kernel_matches_the_reference_op_at_every_sparsity(mode, sparsity):
    layer, x = make_layer("odd-stride2", mode, sparsity)
    want = expected(layer, x)
    assert_close(run_local(compile_layer(layer, x, get_preset("host")), x), want, layer, x)
    if sparsity == 1.0:
        assert not want.any()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", ["dilated-batch2-no-bias", "pointwise-stride2"])
def test_host_kernel_on_odd_geometries(mode, geometry):
    layer, x = make_layer(geometry, mode, 0.5)
    assert_close(run_local(compile_layer(layer, x, get_preset("host")), x), expected(layer, x), layer, x)


@pytest.mark.parametrize("mode", MODES)
def test_numpy_reference_matches_the_op(mode):
    layer, x = make_layer("dilated-batch2-no-bias", mode, 0.5)
    got = reference.lccl_conv2d(x.numpy(), *op_arguments(layer))
    assert_close(got.astype(np.float32), expected(layer, x))


def test_the_sparse_kernel_skips_and_the_dense_build_computes_the_same():
    # With every mask entry positive both builds compute relu(main) * mask; the guard costs nothing in value.
    import tvm
    from tvm import te

    layer, x = make_layer("odd-stride2", "spatial", 0.0)
    target = get_preset("host").target
    shape = lccl.layer_shape(target, x.shape, layer.main_weight.shape, layer.stride, layer.padding, layer.dilation,
                             layer.mode)
    values = lccl.constants_of(shape, *op_arguments(layer)[:4])
    outputs = []
    for sparse in (True, False):
        holders = [te.placeholder(x.shape, "float32", "x"), *(te.placeholder(v.shape, "float32") for v in values)]
        func = compute.prim_func(shape, *holders, sparse=sparse)
        assert ("if " in func.script()) == sparse  # the main block's guard
        from tvm_effconv.schedule_rules import apply_default_rules

        mod, scheduled = apply_default_rules(tvm.IRModule({"main": func}), target)
        assert scheduled == ["main"]
        with target:
            lib = tvm.compile(mod, target=target)
        out = tvm.runtime.tensor(np.zeros((1, 10, *shape.out_size), np.float32))
        lib(*(tvm.runtime.tensor(a) for a in (x.numpy(), *values)), out)
        outputs.append(out.numpy())
    assert_close(outputs[0], expected(layer, x))
    assert_close(outputs[1], outputs[0])


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


# --- CUDA ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: the CUDA C cannot be compiled")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_source_compiles_to_a_fatbin(mode):
    import tvm
    from tvm import te
    from tvm.support import nvcc

    from tvm_effconv.schedule_rules import apply_default_rules

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host="llvm")
    layer, x = make_layer("odd-stride2", mode, 0.5)
    shape = lccl.layer_shape(target, x.shape, layer.main_weight.shape, layer.stride, layer.padding, layer.dilation, mode)
    values = lccl.constants_of(shape, *op_arguments(layer)[:4])
    holders = [te.placeholder(x.shape, "float32", "x"), *(te.placeholder(v.shape, "float32") for v in values)]
    mod, scheduled = apply_default_rules(tvm.IRModule({"main": compute.prim_func(shape, *holders)}), target)
    assert scheduled == ["main"]
    lib = tvm.compile(mod, target=target)
    (cuda,) = [m for m in lib.mod.imports if m.kind == "cuda"]
    source = cuda.inspect_source("cuda")
    assert "if (" in source  # the mask guard
    with target:
        fatbin = nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc")
    assert len(fatbin) > 0


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
    for mode, sparsity, geometry in (("spatial", 0.5, "odd-stride2"), ("channel", 0.9, "odd-stride2"),
                                     ("spatial", 0.0, "dilated-batch2-no-bias"), ("channel", 1.0, "pointwise-stride2")):
        layer, x = make_layer(geometry, mode, sparsity)
        got = run_remote(compile_layer(layer, x, preset), preset, device.address, x, tmp_path)
        assert_close(got, expected(layer, x), layer, x)


# --- the reference network ----------------------------------------------------------------------------

REFERENCE_NETWORK = "tvm_effconv.models.lccl_resnet:lccl_resnet18_small"


def test_the_lccl_resnet_compiles_and_verifies_on_the_host(tmp_path):
    from tvm_effconv.compile import compile_model

    out = compile_model(REFERENCE_NETWORK, "host", tmp_path / "host", log=lambda _m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["status"] == "passed", manifest["verification"]
