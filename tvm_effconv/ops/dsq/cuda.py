"""CUDA schedule of the bit-serial kernel (rule ``effconv_qconv2d_bitserial`` for the ``cuda`` key).

Kernels, in launch order:

1. ``qconv2d_pack_input`` with the fused quantizer inlined: one thread per packed word
   ``a_packed[n, g, i, h, w, ch, cw]`` (32 channels of one bit plane), threads along ``w`` so that the
   NCHW code reads coalesce, the 32 bits serial in a register, 256 threads per block;
2. ``qconv2d_channel_sum``, ``qconv2d_window_sum``, the zero-point correction (with an activation zero
   point) and every block that could not be inlined: one thread per element, reductions serial in a
   register, 256 threads per block;
3. the convolution: grid (blockIdx.x = batch x row tiles x column tiles, blockIdx.y = channel tiles),
   block (threadIdx.x = ``yt * xt`` positions, threadIdx.y = ``kt`` channel vectors) as the DSConv
   kernel (:func:`..cuda_common.tile_threads`). Each thread owns ``ki * LANES`` output channels x
   ``yi * xi`` positions: int32 accumulators in registers, zeroed once; for every plane pair (i, j) it
   zeroes its int32 plane sums (``qconv2d_plane_sum`` computed there, in registers), then per (r, s,
   word) loads the weight words of its channel vectors with one 16-byte load each (``cache_read`` to
   registers) and adds ``__popc(a & w)`` for every (channel, position) of its tile, and shifts the plane
   sums by i + j into the accumulators. The epilogue (``- 2^(wb-1) * act_sum``, or the dequantization:
   scales, bias, zero-point correction) and the fused elementwise consumers (ReLU, the next layer's
   quantizer) are applied as the accumulators are written out.

The epilogue reads two intermediate results, the accumulators and the window sums, so it cannot be
inlined into the accumulators' write-out (``reverse_compute_inline`` takes one): the thread tile is laid
on the epilogue's own loops instead and the accumulators are computed there (``compute_at``), after the
window-sum kernel. That needs the epilogue to read the accumulator of its own output channel; where the
output channels are padded (a group's output channels not a multiple of LANES), the accumulators are
written to global memory from the same thread tile and the epilogue becomes one more kernel of kind 2.

Knobs (:func:`..cuda_common.tile_threads`, defaults :func:`..cuda_common.default_knobs`): the
output-channel vectors, rows and columns split [grid, block, thread] (per-thread factors up to 4) and
``pragma_auto_unroll_max_step``. The register tiles are always unrolled; unit loops are kept, so that
the trace's structure does not depend on the drawn tile sizes.
"""

from ...schedule_rules import (
    RegisterBudget,
    inline_consumers,
    inline_producers,
    register_rule,
)
from ..cuda_common import (
    bind_flat,
    bind_unbound,
    load_vectors,
    realize,
    tile_threads,
    unroll,
    written,
)
from .compute import CHANNEL_SUM_BLOCK, PACK_BLOCK, PLANE_SUM_BLOCK, SCHEDULE_RULE
from .cpu import PopcountLayout

POPC = "cuda_popc"
# 32 channels per word (__popc on 32-bit words), one word per operand, four output channels per vector:
# a vector's words are 16 contiguous bytes, one uint4 load. (The register budget is the CPU rules'
# tile model; this schedule takes its tile from knobs.)
LAYOUT = PopcountLayout(32, 1, 4, RegisterBudget(255, 1))


def _loops_reading(sch, block, buffer):
    """The loops of ``block`` that index ``buffer`` in its dimension order, where ``block`` reads one
    element of it per iteration, at distinct plain iterators; else None (e.g. the padded channel order)."""
    block_realize = realize(sch, block)
    binding = {iv.var: value for iv, value in zip(block_realize.block.iter_vars, block_realize.iter_values)}
    (region,) = [r.region for r in block_realize.block.reads if r.source.same_as(buffer)]
    loop_of = {sch.get(loop).loop_var: loop for loop in sch.get_loops(block)}
    loops = []
    for axis in region:
        value = binding.get(axis.min) if int(axis.extent) == 1 else None
        loop = next((lp for var, lp in loop_of.items() if value is not None and var.same_as(value)), None)
        if loop is None:
            return None
        loops.append(loop)
    return loops if len({sch.get(loop).loop_var for loop in loops}) == len(loops) else None


@register_rule(SCHEDULE_RULE, ["cuda"])
def schedule_bitserial_cuda(sch, accumulate, knobs, variant="default"):
    """Schedule the PrimFunc of ``sch`` whose ``qconv2d_accumulate`` block is ``accumulate``: every block
    ends up bound to threads (see the module docstring for the kernels and the knobs)."""
    plane_sum = sch.get_sblock(PLANE_SUM_BLOCK)
    pack = sch.get_sblock(PACK_BLOCK)
    lanes = int(written(sch, plane_sum).shape[-1])
    packed_name = written(sch, pack).name
    (weights,) = [r.source for r in sch.get(plane_sum).reads if r.source.name != packed_name]
    accumulators = written(sch, accumulate)

    # Fused producers (the quantizer) into the pack and channel-sum stages; fused consumers into the
    # epilogue.
    inline_producers(sch, pack)
    inline_producers(sch, sch.get_sblock(CHANNEL_SUM_BLOCK))
    (epilogue,) = sch.get_consumers(accumulate)
    inline_consumers(sch, epilogue)

    # The block whose loops carry the thread tile: the epilogue, or the accumulators' write-out.
    loops = _loops_reading(sch, epilogue, accumulators)
    if loops is None:
        anchor = sch.cache_write(accumulate, 0, "local")
        loops = sch.get_loops(anchor)
    else:
        sch.set_scope(accumulate, 0, "local")
    n, k, y, x = loops
    tile = tile_threads(sch, n, k, y, x, lanes, knobs)
    unroll(sch, tile.inner)

    # The accumulators in registers, in the thread that writes them out: plane pairs outermost.
    sch.compute_at(accumulate, tile.tx, preserve_unit_loops=True)
    depth = len(sch.get_loops(accumulate)) - 6  # loops down to tx
    an, ak, ay, ax, i, j = sch.get_loops(accumulate)[depth:]
    sch.reorder(i, j, an, ak, ay, ax)
    unroll(sch, (an, ak, ay, ax))
    init = sch.decompose_reduction(accumulate, i)
    unroll(sch, sch.get_loops(init)[depth:])

    # Plane sums in registers per plane pair: __popc(a & w) over the window's taps and words.
    sch.compute_at(plane_sum, j, preserve_unit_loops=True)
    sch.set_scope(plane_sum, 0, "local")
    inner = sch.get_loops(plane_sum)[depth + 2 :]
    assert len(inner) == 11, "plane_sum iterators: n, ko, i, j, y, x, lane, r, q, chunk, word"
    spatial, taps = inner[:7], inner[7:]
    sch.reorder(*taps, *spatial)
    ps_init = sch.decompose_reduction(plane_sum, taps[0])
    unroll(sch, spatial)
    unroll(sch, sch.get_loops(ps_init)[depth + 2 :])
    # The words of a channel vector (LANES x chunk contiguous words) in registers, one vector load per
    # (channel vector, word step) instead of one load per lane.
    load_vectors(sch, plane_sum, weights.name, taps[-1])

    # The pack kernel: threads along w (coalesced NCHW reads), the word's bits serial in a thread.
    _, _, _, ph, pw, pch, pcw, _ = sch.get_loops(pack)  # n, group, plane, h, w, chunk, word, bit
    sch.reorder(pch, pcw, ph, pw)
    bind_flat(sch, pack)

    # Everything else not yet bound (sums, corrections, a padded epilogue): its own kernel.
    bind_unbound(sch)
