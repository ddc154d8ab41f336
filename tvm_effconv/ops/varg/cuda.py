"""CUDA schedules of the VarG grouped conv (rule ``effconv_varg_conv2d`` for the ``cuda`` target key; float
and int8, whose quads of input channels go through ``__dp4a``) and of the fused separable unit.

Kernels, in launch order:

1. ``varg_pad`` with the fused elementwise producers of the input inlined: one thread per element of
   the zero-padded input;
2. the convolution: grid (blockIdx.x = batch x row tiles x column tiles, blockIdx.y = channel tiles),
   block (threadIdx.x = positions, threadIdx.y = channel vectors), as
   :func:`..cuda_common.tile_threads` lays it out. Each thread owns ``ki * LANES`` output channels x
   ``yi * xi`` positions in registers; per step (c, r, s) of its group's reduction it loads its weight
   vectors with 16-byte loads and does one FMA per (channel, position); the bias and the fused
   consumers (PReLU, ReLU, residual adds) are applied as its accumulators are written out;
3. blocks that could not be inlined: one thread per element.

Knobs: those of :func:`..cuda_common.tile_threads` (channel vectors, rows, columns split three ways,
the auto-unroll depth).

The fused separable unit (rule ``effconv_varg_separable``): after the padding kernel, one kernel whose
thread blocks each own a spatial tile of the output. A block first computes the tile's intermediate (the
grouped conv, its bias and activation) for all channels into shared memory, one element per thread at a
time, then, after a barrier, each thread computes ``ki * LANES`` output channels x ``yi * xi`` positions of
the pointwise conv in registers, reading the intermediate from shared memory, and writes them with the
bias and activation. Knobs: the output-channel vectors split (threads, per thread), rows and columns
split three ways (blocks, threads, per thread).
"""

from ...intrin.cuda import dp4a_intrin
from ...schedule_rules import divisors, inline_consumers, register_rule
from ..cuda_common import bind_flat, bind_unbound, extent, load_vectors, tile_threads, unroll
from .compute import (
    CONV_BLOCK,
    LANES_ANNOTATION,
    MID_BLOCK,
    OUT_BLOCK,
    OUT_LANES_ANNOTATION,
    PAD_BLOCK,
    POINTWISE_BLOCK,
    SCHEDULE_RULE,
    SEPARABLE_RULE,
)
from .cpu import inline_elementwise

# Output channels per weight vector: one float4 load (fewer where a group's output count needs it).
LANES = 4


@register_rule(SCHEDULE_RULE, ["cuda"])
def schedule_varg_conv2d_cuda(sch, conv, knobs, variant="default"):
    lanes = int(sch.get(conv).annotations[LANES_ANNOTATION])
    pad = sch.get_sblock(PAD_BLOCK)
    padded = sch.get(pad).writes[0].source
    (weights,) = [r.source for r in sch.get(conv).reads if r.source.name not in (padded.name, "varg_conv")]

    inline_elementwise(sch, (PAD_BLOCK, CONV_BLOCK, OUT_BLOCK))
    sch.set_scope(conv, 0, "local")
    write_out = sch.get_sblock(OUT_BLOCK)
    inline_consumers(sch, write_out)

    n, y, x, k, *reduction = sch.get_loops(conv)
    quads = len(reduction) == 4  # the int8 compute: (c4, r, s, four channels), one dp4a per quad
    tile = tile_threads(sch, n, k, y, x, lanes, knobs, reduction=reduction[:3])
    sch.reverse_compute_at(write_out, tile.tx, preserve_unit_loops=True)
    depth_tx = len(sch.get_loops(conv)) - 7 - quads  # loops above the reduction: bx, kb, kt, tx
    for loop in sch.get_loops(write_out)[depth_tx:]:
        sch.unroll(loop)

    load_vectors(sch, conv, weights.name, reduction[2])
    depth_rs = depth_tx + 3
    tile_loops = sch.get_loops(conv)[depth_rs:]
    unroll(sch, tile_loops[:-1] if quads else tile_loops)
    init = sch.decompose_reduction(conv, reduction[0])
    for loop in sch.get_loops(init)[depth_tx:]:
        sch.unroll(loop)
    if quads:
        sch.tensorize(reduction[3], dp4a_intrin(padded.scope(), "local", "local", str(padded.dtype)))

    bind_flat(sch, sch.get_sblock(PAD_BLOCK), inner_loops=1)
    bind_unbound(sch)


# Shared memory the separable kernel's intermediate may take per block without a tuning record (the
# CUDA presets' 48 KiB per block, less room for the compiler's own).
SHARED_BYTES = 40 * 1024
# Positions per thread block without a tuning record (one warp), and output-channel vectors per thread.
BLOCK_POSITIONS = 32
THREAD_VECTORS = 2
BLOCK_THREADS = 256


def default_separable_tile(out_vectors: int, height: int, width: int, mid_channels: int) -> dict:
    """One position per thread, as many positions per block as fit BLOCK_POSITIONS and the intermediate's
    shared memory (whole rows first), THREAD_VECTORS channel vectors per thread and threads over the
    remaining vectors up to BLOCK_THREADS."""
    positions = min(BLOCK_POSITIONS, max(1, SHARED_BYTES // (4 * mid_channels)))
    xt = max(d for d in divisors(width) if d <= positions)
    yt = max(d for d in divisors(height) if d * xt <= positions)
    ki = max(d for d in divisors(out_vectors) if d <= THREAD_VECTORS)
    kt = max(d for d in divisors(out_vectors // ki) if d * yt * xt <= BLOCK_THREADS)
    return {"k": [kt, out_vectors // kt], "y": [height // yt, yt, 1], "x": [width // xt, xt, 1]}


@register_rule(SEPARABLE_RULE, ["cuda"])
def schedule_varg_separable_cuda(sch, pointwise, knobs, variant="default"):
    lanes = int(sch.get(pointwise).annotations[OUT_LANES_ANNOTATION])
    conv, mid, writeback = (sch.get_sblock(name) for name in (CONV_BLOCK, MID_BLOCK, OUT_BLOCK))
    inline_elementwise(sch, (PAD_BLOCK, CONV_BLOCK, MID_BLOCK, POINTWISE_BLOCK, OUT_BLOCK))
    inline_consumers(sch, writeback)

    n, y, x, k, rm = sch.get_loops(pointwise)
    kvec, lane = sch.split(k, [None, lanes])
    defaults = default_separable_tile(extent(sch, kvec), extent(sch, y), extent(sch, x), extent(sch, rm))
    kt, ki = sch.split(kvec, knobs.tile(kvec, 2, defaults["k"], max_innermost=4))
    y_factors = knobs.tile(y, 3, defaults["y"], max_innermost=4)
    x_factors = knobs.tile(x, 3, defaults["x"], max_innermost=4)
    yb, yt, yi = sch.split(y, y_factors)
    xb, xt, xi = sch.split(x, x_factors)
    sch.reorder(n, yb, xb, kt, yt, xt, rm, ki, yi, xi, lane)
    bx, tx = sch.fuse(n, yb, xb), sch.fuse(yt, xt)
    sch.bind(bx, "blockIdx.x")
    sch.bind(kt, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")

    # the pointwise conv: a register tile per thread, written out with the bias and the activation
    sch.set_scope(pointwise, 0, "local")
    sch.reverse_compute_at(writeback, tx, preserve_unit_loops=True)
    depth = len(sch.get_loops(pointwise)) - 5  # loops above rm: bx, kt, tx
    unroll(sch, sch.get_loops(writeback)[depth:])
    unroll(sch, sch.get_loops(pointwise)[depth + 1:])
    init = sch.decompose_reduction(pointwise, rm)
    unroll(sch, sch.get_loops(init)[depth:])

    # the block's intermediate in shared memory: the same threads, one element each per step
    sch.compute_at(mid, bx, preserve_unit_loops=True)
    sch.set_scope(mid, 0, "shared")
    _, my, mx, mm = sch.get_loops(mid)[-4:]
    my_t, my_i = sch.split(my, y_factors[1:])
    mx_t, mx_i = sch.split(mx, x_factors[1:])
    mm_o, mm_t = sch.split(mm, [None, extent(sch, kt)])
    sch.reorder(mm_o, my_i, mx_i, mm_t, my_t, mx_t)
    sch.bind(mm_t, "threadIdx.y")
    sch.bind(sch.fuse(my_t, mx_t), "threadIdx.x")
    sch.compute_at(conv, sch.get_loops(mid)[-1], preserve_unit_loops=True)
    sch.set_scope(conv, 0, "local")
    unroll(sch, sch.get_loops(conv)[-2:])  # the kernel taps

    bind_flat(sch, sch.get_sblock(PAD_BLOCK), inner_loops=1)
    bind_unbound(sch)
