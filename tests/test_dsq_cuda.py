"""The CUDA schedule of the DSQ bit-serial kernel (``tvm_effconv.ops.dsq.cuda``), with and without a GPU.

As test_dsconv_cuda.py (whose host runner this module reuses, with ``__popc`` added to its shim):

- the integer kernel (``compute.qconv2d_integer``) generated as CUDA C for odd shapes uses ``__popc``,
  compiles to a fatbin with nvcc, and run on the host thread by thread equals the numpy bit-serial
  reference exactly; the epilogue is fused into the convolution's write-out unless channels are padded;
- the float kernel with a fused quantizer, a zero point, bias and ReLU against ``effconv::qconv2d``
  (on the host, and on the GPU where there is one);
- MetaSchedule's draws of the knobs build and compute the same;
- a small DSQ model compiles end to end for the ``cuda`` preset.
"""

import functools
import shutil
from collections import Counter

import numpy as np
import pytest
import test_dsconv_cuda as cuda_host
import torch
from torch import nn

from tvm_effconv.ops import dsq
from tvm_effconv.ops.dsq import compute, reference
from tvm_effconv.ops.dsq import cuda as dsq_cuda
from tvm_effconv.schedule_rules import DefaultKnobs

needs_nvcc, needs_cxx = cuda_host.needs_nvcc, cuda_host.needs_cxx
has_gpu = __import__("tvm").cuda(0).exist

POPC_SHIM = "static inline int __popc(unsigned x) { return __builtin_popcount(x); }\n"

# act_bits, weight_bits, batch, in, height, width, out, kernel, stride, padding, dilation, groups
CASES = {
    # 10 output channels: padded to 12, the epilogue is a kernel of its own
    "a1w1-odd-channels-stride2-batch2": (1, 1, 2, 33, 9, 7, 10, 3, 2, 1, 1, 1),
    # three words per pixel, groups with 35 input and 6 (padded) output channels each
    "a2w1-70-channels-groups2": (2, 1, 1, 70, 6, 5, 12, 3, 1, 1, 1, 2),
    # 16 output channels: the epilogue fused into the convolution
    "a4w4-odd-channels-stride2-no-padding": (4, 4, 2, 33, 8, 9, 16, 3, 2, 0, 1, 1),
    "a3w2-groups2-dilation2-fused": (3, 2, 1, 64, 7, 8, 16, 3, 1, 2, 2, 2),
    "a1w1-pointwise-default-register-tile": (1, 1, 1, 40, 32, 32, 64, 1, 1, 0, 1, 1),
}


def roomy_launch_plan(func, plan=cuda_host.launch_plan):
    """``launch_plan`` with room for TVM's storage reuse: StorageRewrite may give a buffer the memory of
    a smaller dead one (e.g. the padded accumulators that of the channel sums), which the generated code
    then indexes by that one's name; every intermediate buffer gets the bytes of all of them."""
    kernels, buffers = plan(func)
    params = {b.name for b in func.params}
    room = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for name, (shape, dtype) in buffers.items()
               if name not in params)
    return kernels, {name: (shape, dtype) if name in params else ((room,), "uint8")
                     for name, (shape, dtype) in buffers.items()}


@pytest.fixture(autouse=True)
def popc_on_the_host(monkeypatch):
    monkeypatch.setattr(cuda_host, "SHIM", cuda_host.SHIM + POPC_SHIM)
    monkeypatch.setattr(cuda_host, "launch_plan", roomy_launch_plan)


def shape_of(spec, target=None):
    import tvm

    ab, wb, n, c, h, w, k, r, stride, padding, dilation, groups = spec
    codes = np.zeros((k, c // groups, r, r), np.int8)
    target = target or tvm.target.Target(cuda_host.TARGET, host="llvm")
    shape, kind = dsq.bitserial_shape(target, n, c, h, w, codes, (stride,) * 2, (padding,) * 2, (dilation,) * 2,
                                      groups, wb, ab)
    assert kind == dsq_cuda.POPC and shape.word_bits == 32
    return shape


def integer_case(spec, seed=0):
    """(PrimFunc codes, packed weights -> sum qa * qw, inputs by buffer name, the reference)."""
    from tvm import te

    ab, wb, n, c, h, w, k, r, stride, padding, dilation, groups = spec
    shape = shape_of(spec)
    rng = np.random.default_rng(seed)
    qa = rng.integers(0, 2**ab, (n, c, h, w)).astype(np.uint8)
    qw = rng.integers(-(2 ** (wb - 1)), 2 ** (wb - 1), (k, c // groups, r, r)).astype(np.int8)
    packed = compute.pack_weights(shape, qw)
    codes = te.placeholder(qa.shape, "uint8", name="codes")
    weights = te.placeholder(packed.shape, str(packed.dtype), name="weights")
    out = compute.qconv2d_integer(shape, codes, weights)
    func = te.create_prim_func([codes, weights, out])
    expected = reference.bitserial_conv2d(qa, qw, (stride,) * 2, (padding,) * 2, (dilation,) * 2, groups, ab, wb)
    return func, {"codes": qa, "weights": packed}, expected.astype(np.int32)


def schedule(func):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    dsq_cuda.schedule_bitserial_cuda(sch, sch.get_sblock(compute.ACCUMULATE_BLOCK), DefaultKnobs(), "default")
    return sch.mod["main"]


@functools.cache
def default_build(name):
    """(scheduled PrimFunc, library, CUDA C, inputs, expected output) of a case of CASES or FLOAT_CASES."""
    func, inputs, expected = integer_case(CASES[name]) if name in CASES else float_case(FLOAT_CASES[name])
    scheduled = schedule(func)
    return scheduled, *cuda_host.build(scheduled), inputs, expected


def run_on_host(scheduled, source, inputs, tmp_path):
    return cuda_host.run_on_host(scheduled, source, inputs, tmp_path)[cuda_host.output_name(scheduled)]


# --- the integer kernel ----------------------------------------------------------------------------


@needs_nvcc
@pytest.mark.parametrize("name", ["a1w1-odd-channels-stride2-batch2", "a3w2-groups2-dilation2-fused"])
def test_cuda_source_uses_popc_and_compiles_with_nvcc(name):
    from tvm.support import nvcc

    _, _, source, _, _ = default_build(name)
    assert "__popc(" in source and "uint4" in source  # one 16-byte load per weight vector
    with cuda_host._target():
        assert len(nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc")) > 0


@needs_cxx
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_source_computes_the_reference_exactly_on_the_host(name, tmp_path):
    scheduled, _, source, inputs, expected = default_build(name)
    # pack, channel sums, window sums, the convolution; + the epilogue where channels are padded
    fused = not shape_of(CASES[name]).channels_padded
    assert len(cuda_host.KERNEL.findall(source)) == (4 if fused else 5)
    np.testing.assert_array_equal(run_on_host(scheduled, source, inputs, tmp_path), expected)


@needs_cxx
@pytest.mark.parametrize("seed", [1, 2])
def test_sampled_knobs_build_and_compute(seed, tmp_path):
    # What MetaSchedule's ApplyCustomRule calls: the registered design space, its knobs drawn by
    # sampling instructions (see test_dsconv_cuda.py on why MetaSchedule's own postprocessors are not run).
    import tvm
    from tvm import s_tir

    func, inputs, expected = integer_case((2, 2, 1, 40, 6, 8, 16, 3, 1, 1, 1, 1), seed=seed)
    space = tvm.get_global_func(f"s_tir.meta_schedule.cuda.{compute.SCHEDULE_RULE}")
    start = s_tir.Schedule(func, seed=seed)
    (drawn,) = space(start, start.get_sblock(compute.ACCUMULATE_BLOCK))
    draws = Counter(inst.kind.name for inst in drawn.trace.insts)
    assert (draws["SamplePerfectTile"], draws["SampleCategorical"]) == (3, 1)
    _, source = cuda_host.build(drawn.mod["main"])
    assert "__popc(" in source
    np.testing.assert_array_equal(run_on_host(drawn.mod["main"], source, inputs, tmp_path), expected)


def test_default_rules_pick_the_cuda_schedule():
    import tvm

    from tvm_effconv.schedule_rules import apply_default_rules

    func, _, _ = integer_case(CASES["a1w1-odd-channels-stride2-batch2"])
    mod, scheduled = apply_default_rules(tvm.IRModule({"main": func}), cuda_host._target())
    assert scheduled == ["main"]
    assert "blockIdx.x" in mod["main"].script()


# --- the float kernel against the op ---------------------------------------------------------------

# act_bits, weight_bits, batch, in, height, width, out, kernel, stride, padding, dilation, groups
FLOAT_CASES = {
    "a2w2-zero-point-groups2": (2, 2, 2, 20, 7, 6, 16, 3, 1, 1, 1, 2),
    "a1w1-zero-point-padded-channels": (1, 1, 1, 33, 6, 7, 10, 3, 2, 1, 1, 1),
}


def float_case(spec, seed=0):
    """(PrimFunc x -> ReLU(qconv2d(x)), inputs by buffer name, ReLU of ``effconv::qconv2d``)."""
    import tvm
    from tvm import te

    import tvm_effconv.nn.dsq  # noqa: F401  (registers torch.ops.effconv.qconv2d)

    ab, wb, n, c, h, w, k, r, stride, padding, dilation, groups = spec
    shape = shape_of(spec)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    qw = rng.integers(-(2 ** (wb - 1)), 2 ** (wb - 1), (k, c // groups, r, r)).astype(np.int8)
    weight_scale = (rng.random(k) * 0.1 + 0.05).astype(np.float32)
    weight_zero_point = (rng.random(k) - 0.5).astype(np.float32)
    act_scale, act_zero_point = 0.75, 1.25  # a zero point: the correction of the taps on padding
    bias = rng.standard_normal(k).astype(np.float32)
    offset = 2 ** (wb - 1)
    epilogue = compute.epilogue_constants(shape, weight_scale, weight_zero_point, act_scale, bias)
    tensors = {
        "w_packed": compute.pack_weights(shape, qw), "scale": epilogue.scale, "zero_scale": epilogue.zero_scale,
        "bias": epilogue.bias,
        "tap_correction": compute.tap_correction(qw, weight_scale, weight_zero_point, act_scale, act_zero_point, offset),
    }
    holders = {key: te.placeholder(v.shape, str(v.dtype), name=key) for key, v in tensors.items()}
    xh = te.placeholder(x.shape, "float32", name="x")
    codes = compute.quantize_codes(xh, act_scale, act_zero_point, ab)
    y = compute.qconv2d(shape, codes, *holders.values())
    y = te.compute(y.shape, lambda *i: tvm.tirx.max(y(*i), 0.0), name="y")
    func = te.create_prim_func([xh, *holders.values(), y])
    expected = torch.ops.effconv.qconv2d(
        torch.from_numpy(x), torch.from_numpy(qw), torch.from_numpy(weight_scale), torch.from_numpy(weight_zero_point),
        torch.tensor(act_scale), torch.tensor(act_zero_point), torch.from_numpy(bias), [stride] * 2, [padding] * 2,
        [dilation] * 2, groups, wb, ab,
    )
    return func, {"x": x, **tensors}, torch.relu(expected).numpy()


@needs_cxx
@pytest.mark.parametrize("name", list(FLOAT_CASES))
def test_float_kernel_matches_the_op_on_the_host(name, tmp_path):
    scheduled, _, source, inputs, expected = default_build(name)
    # the quantizer inlined into the pack and channel-sum kernels, the ReLU into the write-out
    assert "qconv2d_quantize" not in source and "qconv2d_dequantize" not in source
    cuda_host.assert_close(run_on_host(scheduled, source, inputs, tmp_path), expected)


def on_the_gpu(built):
    """The output of a ``default_build`` run on the GPU."""
    import tvm

    scheduled, lib, _, inputs, expected = built
    args = [tvm.runtime.tensor(inputs[b.name], tvm.cuda(0)) for b in scheduled.params[:-1]]
    out = tvm.runtime.tensor(np.zeros_like(expected), tvm.cuda(0))
    lib["main"](*args, out)
    return out.numpy()


@pytest.mark.skipif(not has_gpu, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("name", list(FLOAT_CASES))
def test_float_kernel_matches_the_op_on_the_gpu(name):
    built = default_build(name)
    cuda_host.assert_close(on_the_gpu(built), built[-1])


@pytest.mark.skipif(not has_gpu, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("name", list(CASES))
def test_integer_kernel_matches_the_reference_exactly_on_the_gpu(name):
    built = default_build(name)
    np.testing.assert_array_equal(on_the_gpu(built), built[-1])


# --- a model end to end ----------------------------------------------------------------------------


def tiny_dsq_model():
    """Three convs converted to DSQ at 1-bit weights and activations (the bit-serial path on CUDA); the
    first sees the raw input (an activation zero point), the second has odd channels and stride 2."""
    from tvm_effconv.nn.dsq import convert_to_dsq

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 10, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(10, 16, 1),
    )
    convert_to_dsq(model, weight_bits=1, act_bits=1, skip_first_last=False)
    x = torch.randn(1, 8, 12, 12)
    model.train()
    with torch.no_grad():
        model(x)  # sets the activation ranges
    return model.eval(), (x,)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: the CUDA build cannot be checked")
def test_a_dsq_model_compiles_for_cuda(tmp_path):
    import json

    from tvm_effconv.compile import compile_model

    out = compile_model(f"{__name__}:tiny_dsq_model", "cuda", tmp_path / "cuda", log=lambda _m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    variants = [v for v in manifest["kernels"]["variants"] if v["rule"] == compute.SCHEDULE_RULE]
    assert len(variants) == 3 and all(v[dsq.PATH_ANNOTATION] == dsq.BITSERIAL for v in variants)
    assert not manifest["unscheduled"]
    # Without a GPU the CUDA build is compiled to a fatbin by nvcc but cannot run.
    assert manifest["verification"]["status"] in (("passed",) if has_gpu else ("passed", "compiled"))
