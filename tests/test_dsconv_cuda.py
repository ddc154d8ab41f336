"""The CUDA schedule of the DSConv kernel (``tvm_effconv.ops.dsconv.cuda``), with and without a GPU.

- the CUDA C generated for odd shapes uses ``__dp4a`` and compiles to a fatbin with nvcc (skipped
  without nvcc);
- the same source computes the numpy reference when run on the host: every kernel is compiled as C++
  behind a small CUDA shim and its threads run one after another, which is exact for these kernels
  since none uses shared memory or barriers (skipped without g++);
- MetaSchedule's draws of the knobs give schedules that pass its CUDA postprocessors, build and
  compute the same; fused producers (quantizers) and consumers (ReLU, requantize) are inlined;
- on a machine with a CUDA GPU, the kernel itself against the reference (skipped otherwise).
"""

import ctypes
import functools
import re
import shutil
import subprocess

import numpy as np
import pytest

from tvm_effconv.ops.dsconv import compute, reference
from tvm_effconv.ops.dsconv import cuda as dsconv_cuda
from tvm_effconv.schedule_rules import DefaultKnobs

TARGET = {"kind": "cuda", "arch": "sm_80"}

# batch, in, height, width, out, kernel, stride, padding, dilation, groups, block, bfp, kds_bias, act_offset
CASES = {
    "odd-channels-stride2-short-block": (2, 13, 9, 7, 10, 3, 2, 1, 1, 1, 5, False, True, 0),
    "groups2-dilation2-bfp-block3": (1, 14, 8, 9, 6, 3, 1, 2, 2, 2, 3, True, False, 0),
    "block32-short-last-block": (1, 40, 8, 8, 16, 3, 1, 1, 1, 1, 32, False, False, 0),
    "block64-pointwise-bfp-batch2": (2, 70, 6, 5, 12, 1, 1, 0, 1, 1, 64, True, True, 0),
    "groups2-block-wider-than-group-stride2-dilation2": (2, 6, 7, 9, 18, 3, 2, 2, 2, 2, 32, False, True, 0),
    "unsigned-activations-with-offset": (1, 9, 6, 6, 5, 3, 1, 1, 1, 1, 4, False, True, 128),
    # a grid big enough for the default register tile of 2 channel vectors x 2 columns
    "default-2x2-register-tile": (1, 20, 32, 64, 64, 3, 1, 1, 1, 1, 16, False, True, 0),
}

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None,
                                reason="nvcc is not installed: the CUDA C cannot be compiled")
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None,
                               reason="g++ is not installed: the CUDA C cannot run on the host")


def _target():
    import tvm

    return tvm.target.Target(TARGET, host="llvm")


def make_case(spec, seed=0):
    """(TE PrimFunc, inputs by buffer name, reference output) of one layer."""
    import tvm
    from tvm import te

    n, cin, h, w, cout, k, stride, padding, dilation, groups, block, bfp, kds_bias, act_offset = spec
    shape = compute.DSConvShape(n, cin, h, w, cout, (k, k), (stride,) * 2, (padding,) * 2, (dilation,) * 2, groups,
                                block, dsconv_cuda.LANES)
    rng = np.random.default_rng(seed)
    x_q = rng.integers(-128, 128, (n, cin, h, w)).astype(np.int8)
    codes = rng.integers(-8, 8, (cout, cin // groups, k, k)).astype(np.int8)
    nb = shape.nblocks
    kds = rng.standard_normal((cout, nb, k, k)).astype(np.float32)
    kdb = rng.standard_normal((cout, nb, k, k)).astype(np.float32) if kds_bias else None
    cds_s, cds_b = rng.standard_normal(cout).astype(np.float32), rng.standard_normal(cout).astype(np.float32)
    x_scale = (2.0 ** rng.integers(-8, -2, (n, groups * nb, h, w))).astype(np.float32) if bfp else np.float32(0.05)
    packed = compute.pack_constants(shape, codes, kds, kdb, cds_s, cds_b, None if bfp else x_scale, act_offset)
    packed = {key: value for key, value in packed.items() if value is not None}
    x = te.placeholder(x_q.shape, "int8", name="x")
    holders = {key: te.placeholder(v.shape, str(v.dtype), name=key) for key, v in packed.items()}
    xs = te.placeholder(x_scale.shape, "float32", name="xs") if bfp else None
    out = compute.dsconv2d(shape, x, holders["weights"], holders["scale"], holders["bias"], holders.get("offset"),
                           holders.get("bias_scale"), xs, act_offset)
    func = te.create_prim_func([x, *holders.values(), *([xs] if bfp else []), out])
    inputs = {"x": x_q, **packed, **({"xs": x_scale} if bfp else {})}
    expected = reference.dsconv2d(x_q, x_scale, codes, kds, kdb, cds_s, cds_b, (stride,) * 2, (padding,) * 2,
                                  (dilation,) * 2, groups, block)
    assert isinstance(func, tvm.tirx.PrimFunc)
    return func, inputs, expected


def schedule(func):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    dsconv_cuda.schedule_dsconv2d_cuda(sch, sch.get_sblock(compute.ACCUMULATE_BLOCK), DefaultKnobs(), "default")
    return sch


def build(scheduled):
    """(library, CUDA C) of a scheduled PrimFunc."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("tirx.is_scheduled", True)}), target=_target())
    (cuda,) = [m for m in lib.mod.imports if m.kind == "cuda"]
    return lib, cuda.inspect_source("cuda")


@functools.cache
def default_build(name):
    func, inputs, expected = make_case(CASES[name])
    scheduled = schedule(func).mod["main"]
    lib, source = build(scheduled)
    return scheduled, lib, source, inputs, expected


def assert_close(got, want):
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


# --- CUDA C on the host ----------------------------------------------------------------------------

SHIM = r"""
#include <cstdint>
#include <cmath>
#include <algorithm>
struct emu_dim3 { unsigned x, y, z; };
static emu_dim3 threadIdx, blockIdx;
#define __global__
#define __launch_bounds__(n)
#define __device__
#define __forceinline__ inline
#define uint unsigned int
#define uchar unsigned char
#define ushort unsigned short
using std::max; using std::min;
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
static inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
  return c;
}
static inline int __dp4a(unsigned a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += (int)(uint8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
  return c;
}
"""
KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\) \{')


def launch_plan(func):
    """Thread extents of each kernel of a scheduled PrimFunc, in launch order, and its global buffers."""
    import tvm

    root = func.body.block
    stmts = list(root.body.seq) if hasattr(root.body, "seq") else [root.body]
    plan = []
    for stmt in stmts:
        dims = {}
        while isinstance(stmt, tvm.tirx.For):
            if stmt.kind == tvm.tirx.ForKind.THREAD_BINDING:
                dims[stmt.thread_binding.thread_tag] = int(stmt.extent)
            stmt = stmt.body
        assert dims, "every top-level loop nest is a kernel"
        plan.append(dims)
    buffers = [b for b in func.params] + [b for b in root.alloc_buffers if b.scope() == "global"]
    return plan, {b.name: (tuple(int(d) for d in b.shape), str(b.dtype)) for b in buffers}


def run_on_host(func, source, inputs, workdir):
    """All global buffers after running the kernels of ``source`` (the CUDA C of ``func``) on the host."""
    assert "__shared__" not in source and "__syncthreads" not in source, "threads must be independent"
    body = source[source.index('extern "C" __global__'):]
    kernels = [(m.group(1), [p.strip() for p in m.group(2).split(",")]) for m in KERNEL.finditer(body)]
    launchers = []
    for name, params in kernels:
        casts = ", ".join(f"({p.split('__restrict__')[0].strip()})a[{i}]" for i, p in enumerate(params))
        launchers.append(
            f'extern "C" void launch_{name}(void** a, int gx, int gy, int gz, int bx, int by, int bz) {{\n'
            "  for (int z = 0; z < gz; ++z) for (int y = 0; y < gy; ++y) for (int x = 0; x < gx; ++x)\n"
            "  for (int tz = 0; tz < bz; ++tz) for (int ty = 0; ty < by; ++ty) for (int tx = 0; tx < bx; ++tx) {\n"
            "    blockIdx = {(unsigned)x, (unsigned)y, (unsigned)z};\n"
            "    threadIdx = {(unsigned)tx, (unsigned)ty, (unsigned)tz};\n"
            f"    {name}({casts});\n  }}\n}}\n"
        )
    (workdir / "kernels.cc").write_text(SHIM + body + "\n" + "\n".join(launchers))
    subprocess.run(["g++", "-std=c++17", "-O1", "-w", "-shared", "-fPIC", str(workdir / "kernels.cc"), "-o",
                    str(workdir / "kernels.so")], check=True)
    lib = ctypes.CDLL(str(workdir / "kernels.so"))
    plan, buffers = launch_plan(func)
    assert len(plan) == len(kernels)
    arrays = {name: np.ascontiguousarray(inputs[name]) if name in inputs else np.zeros(shape, dtype)
              for name, (shape, dtype) in buffers.items()}
    for (name, params), dims in zip(kernels, plan):
        names = [p.split()[-1].removesuffix("_ptr") for p in params]
        pointers = (ctypes.c_void_p * len(names))(*[arrays[n].ctypes.data for n in names])
        grid = [dims.get(f"blockIdx.{a}", 1) for a in "xyz"]
        block = [dims.get(f"threadIdx.{a}", 1) for a in "xyz"]
        getattr(lib, f"launch_{name}")(pointers, *grid, *block)
    return arrays


def output_name(func):
    return func.params[-1].name


# --- tests -----------------------------------------------------------------------------------------


@needs_nvcc
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_source_uses_dp4a_and_compiles_with_nvcc(name):
    from tvm.support import nvcc

    _, _, source, _, _ = default_build(name)
    assert "__dp4a(" in source
    with _target():
        fatbin = nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc")
    assert len(fatbin) > 0


@needs_cxx
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_source_computes_the_reference_on_the_host(name, tmp_path):
    scheduled, _, source, inputs, expected = default_build(name)
    got = run_on_host(scheduled, source, inputs, tmp_path)[output_name(scheduled)]
    assert_close(got, expected)


@needs_cxx
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sampled_knobs_build_and_compute(seed, tmp_path):
    # What MetaSchedule's ApplyCustomRule calls: the registered design space, its knobs drawn by
    # sampling instructions. (Its postprocessors need a TuneContext, whose import of
    # tvm.s_tir.tensor_intrin takes ~50 s: the drawn schedule is built and run instead.)
    import tvm
    from tvm import s_tir

    func, inputs, expected = make_case((1, 12, 6, 6, 16, 3, 1, 1, 1, 1, 8, False, True, 0), seed=seed)
    sch = s_tir.Schedule(func, seed=seed)
    design_space = tvm.get_global_func(f"s_tir.meta_schedule.cuda.{compute.SCHEDULE_RULE}")
    (sch,) = design_space(sch, sch.get_sblock(compute.ACCUMULATE_BLOCK))
    kinds = [inst.kind.name for inst in sch.trace.insts]
    assert kinds.count("SamplePerfectTile") == 3 and kinds.count("SampleCategorical") == 1
    scheduled = sch.mod["main"]
    _, source = build(scheduled)
    assert "__dp4a(" in source
    assert_close(run_on_host(scheduled, source, inputs, tmp_path)[output_name(scheduled)], expected)


def fused_case(mode, groups, out_channels):
    """A quantizer (int8 or block floating point) before the kernel, ReLU and a requantize after it."""
    import tvm
    from tvm import te

    n, cin, h, w, k, block = 1, 10, 6, 7, 3, 3
    shape = compute.DSConvShape(n, cin, h, w, out_channels, (k, k), (1, 1), (1, 1), (1, 1), groups, block,
                                dsconv_cuda.LANES)
    rng = np.random.default_rng(5)
    nb = shape.nblocks
    codes = rng.integers(-8, 8, (out_channels, cin // groups, k, k)).astype(np.int8)
    kds, kdb = (rng.standard_normal((out_channels, nb, k, k)).astype(np.float32) for _ in range(2))
    cds_s, cds_b = (rng.standard_normal(out_channels).astype(np.float32) for _ in range(2))
    packed = compute.pack_constants(shape, codes, kds, kdb, cds_s, cds_b, 0.05 if mode == "int8" else None, 0)
    packed = {key: value for key, value in packed.items() if value is not None}
    x = te.placeholder((n, cin, h, w), "float32", name="x")
    holders = {key: te.placeholder(v.shape, str(v.dtype), name=key) for key, v in packed.items()}
    if mode == "int8":
        x_q, x_scale = compute.quantize_int8(x, 20.0, 8), None
    else:
        x_q, x_scale = compute.quantize_bfp(x, groups, block, 8)
    y = compute.dsconv2d(shape, x_q, holders["weights"], holders["scale"], holders["bias"], None,
                         holders.get("bias_scale"), x_scale, 0)
    y = te.compute(y.shape, lambda *i: tvm.tirx.max(y(*i), 0.0), name="relu")
    y = compute.quantize_int8(y, 0.5, 8)
    func = te.create_prim_func([x, *holders.values(), y])
    return func, {"x": rng.standard_normal((n, cin, h, w)).astype(np.float32), **packed}


@needs_cxx
@pytest.mark.parametrize("mode, groups, out_channels, kernels", [
    ("int8", 1, 8, 3),  # quantize -> pack; ReLU and requantize in the convolution's write-out
    ("bfp", 2, 6, 5),  # + the block-peak reduction; padded channels: an unpad kernel takes the consumers
])
def test_fused_producers_and_consumers_are_inlined(mode, groups, out_channels, kernels, tmp_path):
    import tvm

    func, inputs = fused_case(mode, groups, out_channels)
    host = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    args = [tvm.runtime.tensor(inputs[b.name]) for b in func.params[:-1]]
    out = func.params[-1]
    want = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], str(out.dtype)))
    host["main"](*args, want)
    scheduled = schedule(func).mod["main"]
    _, source = build(scheduled)
    assert len(KERNEL.findall(source)) == kernels
    got = run_on_host(scheduled, source, inputs, tmp_path)[out.name]
    np.testing.assert_array_equal(got, want.numpy())


def test_default_rules_pick_the_cuda_schedule():
    import tvm

    from tvm_effconv.schedule_rules import apply_default_rules

    func, _, _ = make_case(CASES["odd-channels-stride2-short-block"])
    mod, scheduled = apply_default_rules(tvm.IRModule({"main": func}), _target())
    assert scheduled == ["main"]
    assert "blockIdx.x" in mod["main"].script()


@pytest.mark.skipif(not __import__("tvm").cuda(0).exist, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_kernel_matches_the_reference_on_the_gpu(name):
    import tvm

    scheduled, lib, _, inputs, expected = default_build(name)
    device = tvm.cuda(0)
    args = [tvm.runtime.tensor(inputs[b.name], device) for b in scheduled.params[:-1]]
    out = tvm.runtime.tensor(np.zeros(expected.shape, np.float32), device)
    lib["main"](*args, out)
    assert_close(out.numpy(), expected)
