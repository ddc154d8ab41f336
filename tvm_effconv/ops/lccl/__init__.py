"""LCCL (low-cost collaborative layer) for TVM: compute, schedules, dispatch, import.

- ``compute``: the TE compute (padded input, cheap conv, mask, the main conv in one of three algorithms,
  the fused ReLU / product epilogue), the compaction stages of the "compact" algorithm, the weight packing;
- ``reference``: the plain numpy reference of the sparse computation and of the compaction;
- ``cpu``: the schedules for ARM NEON and x86: "skip" (a register tile of output channels for one position,
  its whole reduction skipped where the mask is zero) and "compact" (the active positions listed, their
  windows gathered, a dense GEMM over them); ``cuda``: "compact" (the list, then a GEMM over the active rows
  x output channels);
- this module: the dispatch of an algorithm per target, and the converter of ``torch.ops.effconv.lccl_conv2d``
  that the frontend's table maps to it.

The layer and the op's eager reference are in :mod:`tvm_effconv.nn.lccl`.
"""

from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from . import compute, cpu
from . import cuda as cuda_schedule

OP_NAME = "lccl_conv2d.default"
OPAQUE = 8  # tvm.relay's OpPatternKind.kOpaque, the op_pattern attribute FuseOps reads

# The main-conv algorithm per target family (both CPU algorithms stay built and tested; see
# :func:`forcing_algorithm`):
# - x86: "compact", measured by bench/lccl.py on this host (AMD EPYC Zen 2, AVX2, 1 thread, the seven 3x3
#   ResNet-18 layers, interleaved; preliminary: a shared machine at load ~3.4 on 2 cores): compact / skip
#   geomean 1.57x at 0%, 25% and 50% zeros, 1.41x at 75%, 1.20x at 90%; compact beat skip on 6 of 7 layers at
#   every sparsity; on 64 -> 64 at 56 x 56, where its gather copies the most per multiply-add, 0.84x at 0%,
#   1.15x at 50%, 1.00x at 90%. Its 6 x 2 register tile does 12 multiply-adds per 8 loads where skip's 1 x 4
#   does 4 per 5, which outweighs the list, the gather and the write-back pass;
# - arm: no ARM hardware measured (emulated timings are no speed); "compact" by the same count (6 x 4 tile:
#   24 multiply-adds per 10 loads with NEON's 32 registers, skip 4 per 5);
# - cuda: "compact", the only CUDA schedule: masked-out threads of a one-thread-per-element kernel would
#   still hold their warp's slot while the others reduce.
ALGORITHM = {"x86": "compact", "arm": "compact", "cuda": "compact"}

# Set by :func:`forcing_algorithm`.
_FORCED_ALGORITHM: ContextVar[str | None] = ContextVar("forced_lccl_algorithm", default=None)


@contextmanager
def forcing_algorithm(algorithm: str):
    """Compile every LCCL layer with ``algorithm`` (one of ``compute.ALGORITHMS``) inside the block, whatever
    the dispatch would pick: for benchmarking and testing the algorithms against each other."""
    if algorithm not in compute.ALGORITHMS:
        raise ValueError(f"lccl_conv2d: algorithm={algorithm!r} is not allowed; expected one of {compute.ALGORITHMS}")
    token = _FORCED_ALGORITHM.set(algorithm)
    try:
        yield
    finally:
        _FORCED_ALGORITHM.reset(token)


def target_family(target) -> str:
    if target.kind.name == "cuda":
        return "cuda"
    return "arm" if cpu.is_aarch64(target) else "x86"


def algorithm_for(target) -> str:
    """The algorithm of ``target``'s LCCL kernels: the forced one, else :data:`ALGORITHM` of its family."""
    return _FORCED_ALGORITHM.get() or ALGORITHM[target_family(target)]


def lanes(target, out_channels: int, mode: str) -> int:
    """Output channels per weight vector. CPUs: the SIMD width. CUDA: "spatial" all K (the GEMM's weight rows
    contiguous along the channels its threads run over), "channel" 1 (a list per channel: every zero element
    is skipped)."""
    if target.kind.name == "cuda":
        return out_channels if mode == "spatial" else 1
    return compute.lanes_for(out_channels, cpu.vector_floats(target))


def layer_shape(target, x_shape, main_weight_shape, stride, padding, dilation, mode: str,
                algorithm: str | None = None) -> compute.LCCLShape:
    """The LCCLShape of a layer for ``target``, with ``algorithm`` (default: :func:`algorithm_for`)."""
    n, c, h, w = (int(d) for d in x_shape)
    k, c_w, kh, kw = (int(d) for d in main_weight_shape)
    if c_w != c:
        raise ValueError(f"lccl_conv2d: main_weight.shape={tuple(main_weight_shape)} does not match x.shape={tuple(x_shape)}: "
                         f"expected (K, {c}, R, S)")
    algorithm = algorithm or algorithm_for(target)
    cuda = target.kind.name == "cuda"
    if cuda and algorithm != "compact":
        raise ValueError(f"lccl_conv2d: algorithm={algorithm!r} has no CUDA schedule; CUDA runs 'compact'")
    if algorithm != "compact":
        rows, tile_vectors = 1, 1
    elif cuda:
        rows, tile_vectors = cuda_schedule.ROWS, 1  # the CUDA schedule's channel tile is its own knob
    else:
        rows, tile_vectors = cpu.compact_tile(target)
    return compute.LCCLShape(
        n, c, h, w, k, (kh, kw), tuple(int(v) for v in stride), tuple(int(v) for v in padding),
        tuple(int(v) for v in dilation), str(mode), lanes(target, k, str(mode)), algorithm, rows, tile_vectors,
        gather=algorithm == "compact" and not cuda,
    )


def constants_of(shape: compute.LCCLShape, main_weight, main_bias, cheap_weight, cheap_bias) -> list[np.ndarray]:
    """The kernel's constant arguments after x, in order: packed main weight, main bias, cheap weight, cheap bias
    (absent biases as zeros)."""
    k, m = shape.out_channels, shape.mask_channels
    cheap_shape = (1, shape.in_channels, *shape.kernel) if shape.mode == "spatial" else (k, shape.in_channels, 1, 1)
    if tuple(cheap_weight.shape) != cheap_shape:
        raise ValueError(f"lccl_conv2d: cheap_weight.shape={tuple(cheap_weight.shape)}; expected {cheap_shape} in "
                         f"{shape.mode!r} mode")
    return [
        compute.pack_weights(shape, main_weight),
        np.zeros(k, np.float32) if main_bias is None else main_bias.astype(np.float32),
        cheap_weight.astype(np.float32),
        np.zeros(m, np.float32) if cheap_bias is None else cheap_bias.astype(np.float32),
    ]


def emit(bb, x, shape: compute.LCCLShape, values: list[np.ndarray], name: str = "lccl_conv2d"):
    """Add the kernel's PrimFunc to ``bb`` and emit its call on ``x`` with ``values`` as constants."""
    from tvm import relax, te

    holders = [te.placeholder((shape.batch, shape.in_channels, shape.height, shape.width), "float32", "x")]
    holders += [te.placeholder(v.shape, "float32", n) for v, n in zip(values, ("main_weight", "main_bias", "cheap_weight", "cheap_bias"))]
    func = compute.prim_func(shape, *holders)
    # Opaque (op_pattern 8) to FuseOps: FuseTIR cannot merge this hand-built function with its neighbours (it
    # maps their buffers inconsistently); the epilogue is already fused inside it.
    func = func.without_attr("global_symbol").with_attr("op_pattern", OPAQUE)
    gv = bb.add_func(func, name)  # one per layer: the builder makes the names unique
    out = relax.TensorType((shape.batch, shape.out_channels, *shape.out_size), "float32")
    return bb.emit(relax.call_tir(gv, [x, *(relax.const(v) for v in values)], out))


def converter(target, constants: dict, folded: set):
    """The frontend converter ``fn(node, importer)`` of ``lccl_conv2d.default`` for ``target``; ``constants``
    maps graph input names to the model's weights (BNs are already folded into them by the layer; nothing
    after the op is folded: its output is a product of two ReLUs)."""
    from ...frontend import constant_argument

    def convert(node, importer):
        x_arg, main_weight, main_bias, cheap_weight, cheap_bias, stride, padding, dilation, mode = node.args
        x = importer.env[x_arg]
        weights = [
            constant_argument(constants, arg, "lccl_conv2d", name)
            for arg, name in ((main_weight, "main_weight"), (main_bias, "main_bias"), (cheap_weight, "cheap_weight"),
                              (cheap_bias, "cheap_bias"))
        ]
        shape = layer_shape(target, x.ty.shape, weights[0].shape, stride, padding, dilation, mode)
        return emit(importer.block_builder, x, shape, constants_of(shape, *weights))

    return convert
