"""CUDA schedule of the VarG grouped conv (rule ``effconv_varg_conv2d`` for the ``cuda`` target key).

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
"""

from ...schedule_rules import inline_consumers, register_rule
from ..cuda_common import bind_flat, bind_unbound, load_vectors, tile_threads
from .compute import CONV_BLOCK, LANES_ANNOTATION, OUT_BLOCK, PAD_BLOCK, SCHEDULE_RULE
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

    n, y, x, k, rc, rr, rs = sch.get_loops(conv)
    tile = tile_threads(sch, n, k, y, x, lanes, knobs, reduction=(rc, rr, rs))
    sch.reverse_compute_at(write_out, tile.tx, preserve_unit_loops=True)
    depth_tx = len(sch.get_loops(conv)) - 7  # loops above rc: bx, kb, kt, tx
    for loop in sch.get_loops(write_out)[depth_tx:]:
        sch.unroll(loop)

    load_vectors(sch, conv, weights.name, rs)
    depth_rs = depth_tx + 3
    for loop in sch.get_loops(conv)[depth_rs:]:
        sch.unroll(loop)
    init = sch.decompose_reduction(conv, rc)
    for loop in sch.get_loops(init)[depth_tx:]:
        sch.unroll(loop)

    bind_flat(sch, sch.get_sblock(PAD_BLOCK), inner_loops=1)
    bind_unbound(sch)
