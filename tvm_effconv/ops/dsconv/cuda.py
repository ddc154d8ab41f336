"""CUDA schedule of the DSConv kernel (rule ``effconv_dsconv2d`` for the ``cuda`` target key).

Kernels, in launch order:

1. ``dsconv2d_pack_input``, with the fused elementwise producers of ``x_q`` (a quantizer) inlined: one
   thread per packed quad ``x_packed[n, g, b, c4, h, w, 0:4]``, threads along ``w`` so that the NCHW
   reads coalesce, 256 threads per block;
2. ``dsconv2d_input_sum`` (with a KDS bias only) and every block that could not be inlined (e.g. the
   block-peak reduction of a fused bfp quantizer, or the unpad stage when the output channels are
   padded: ``reverse_compute_inline`` cannot invert its index): one thread per output element,
   reductions serial in a register, 256 threads per block;
3. the convolution: grid (blockIdx.x = batch x row tiles x column tiles, blockIdx.y = channel tiles),
   block (threadIdx.x = ``yt * xt`` positions, threadIdx.y = ``kt`` channel vectors). Each thread owns
   ``ki * LANES`` output channels x ``yi * xi`` positions. For every (block, r, s) of the reduction it
   zeroes its int32 block sums (``dsconv2d_block_sum`` computed at the innermost reduction loop,
   in registers), then per quad step loads the weight quads of its channel vectors with one 16-byte
   load each (``cache_read`` to registers) and does ``__dp4a`` (x quad . weight quad) for every
   (channel, position) of its tile, then one float multiply-add per (k, block, r, s, position) into its
   float accumulators. The bias and the fused elementwise consumers (ReLU, adds, a requantize) are
   applied as the accumulators are written out.

Knobs, in the order the rule asks for them (defaults: :func:`..cuda_common.default_knobs`):

- ``knobs.tile(k_vectors, 3)``: output-channel vectors ``K_padded / LANES`` = [kb, kt, ki];
- ``knobs.tile(out_h, 3)``: rows = [yb, yt, yi]; ``knobs.tile(out_w, 3)``: columns = [xb, xt, xi]
  (per-thread factors ki, yi, xi drawn up to ``MAX_INNER``);
- ``knobs.choice(UNROLL_CHOICES)``: ``pragma_auto_unroll_max_step`` of the convolution kernel.

The register tiles (block sums, weight quads, accumulators, their init and write-out loops) are always
unrolled. Unit loops are kept everywhere, so that the trace's structure does not depend on the drawn
tile sizes and MetaSchedule's mutations replay.
"""

from ...intrin.cuda import dp4a_intrin
from ...schedule_rules import inline_consumers, inline_producers, register_rule
from ..cuda_common import (
    bind_flat,
    bind_unbound,
    load_vectors,
    tile_threads,
    unroll,
    written,
)
from .compute import BLOCK_SUM_BLOCK, PACK_BLOCK, SCHEDULE_RULE

# Output channels per weight vector: a vector's quad row is 16 contiguous bytes, and groups pad their
# output channels only to a multiple of 4.
LANES = 4
# Signed int8 activations: __dp4a multiplies signed int8x4 by signed int8x4 (sm_61+).
ACT_OFFSET = 0


# --- the rule --------------------------------------------------------------------------------------


@register_rule(SCHEDULE_RULE, ["cuda"])
def schedule_dsconv2d_cuda(sch, block, knobs, variant="default"):
    """Schedule the PrimFunc of ``sch`` whose ``dsconv2d_accumulate`` block is ``block``: every block
    ends up bound to threads (see the module docstring for the kernels and the knobs)."""
    acc = block
    block_sum = sch.get_sblock(BLOCK_SUM_BLOCK)
    pack = sch.get_sblock(PACK_BLOCK)
    lanes = int(written(sch, block_sum).shape[-1])
    packed = written(sch, pack)
    packed_dtype = str(packed.dtype)
    (weights,) = [r.source for r in sch.get(block_sum).reads if r.source.name != packed.name]
    weights_name, weights_dtype = weights.name, str(weights.dtype)

    # Fused producers of x_q into the pack stage; fused consumers into the accumulators' write-out.
    inline_producers(sch, pack)
    write_out = sch.cache_write(acc, 0, "local")
    inline_consumers(sch, write_out)

    # The convolution kernel.
    n, k, y, x, rb, rr, rq = sch.get_loops(acc)
    tile = tile_threads(sch, n, k, y, x, lanes, knobs, reduction=(rb, rr, rq))
    tx = tile.tx

    # Accumulators written out (bias and fused consumers applied) by the thread that owns them.
    sch.reverse_compute_at(write_out, tx, preserve_unit_loops=True)
    depth_tx = len(sch.get_loops(acc)) - 7  # loops above rb: bx, kb, kt, tx
    unroll(sch, sch.get_loops(write_out)[depth_tx:])

    # Block sums in registers, per (block, r, s) of the reduction: dp4a over the block's quads. Unit
    # loops are kept so that the loop structure, hence the trace, does not depend on the tile sizes.
    sch.compute_at(block_sum, rq, preserve_unit_loops=True)
    sch.set_scope(block_sum, 0, "local")
    depth_rq = len(sch.get_loops(acc)) - 4  # loops down to rq
    inner = sch.get_loops(block_sum)[depth_rq:]
    assert len(inner) == 10, "block_sum iterators: n, ko, b, r, q, y, x, lane, c4, i4"
    spatial, c4, quad = inner[:8], inner[8], inner[9]
    sch.reorder(c4, *spatial, quad)
    init = sch.decompose_reduction(block_sum, c4)
    unroll(sch, spatial)
    unroll(sch, sch.get_loops(init)[depth_rq:])
    # The weight quads of a channel vector (LANES x 4 contiguous bytes) in registers, one vector load
    # per (channel vector, quad step) instead of one load per lane.
    load_vectors(sch, block_sum, weights_name, c4)
    if packed_dtype in ("int8", "uint8") and weights_dtype == "int8":
        sch.tensorize(quad, dp4a_intrin(packed.scope(), "local", "local", packed_dtype))

    # Float multiply-adds of the accumulators.
    unroll(sch, sch.get_loops(acc)[depth_rq:])
    acc_init = sch.decompose_reduction(acc, rb)
    unroll(sch, sch.get_loops(acc_init)[depth_tx:])

    # The pack kernel: threads along w, the quad's four channels serial inside a thread.
    bind_flat(sch, sch.get_sblock(PACK_BLOCK), inner_loops=1)

    # Everything else not yet bound (input sums, blocks that could not be inlined): its own kernel.
    bind_unbound(sch)
