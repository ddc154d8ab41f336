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

Knobs, in the order the rule asks for them (defaults: :func:`default_knobs`):

- ``knobs.tile(k_vectors, 3)``: output-channel vectors ``K_padded / LANES`` = [kb, kt, ki];
- ``knobs.tile(out_h, 3)``: rows = [yb, yt, yi]; ``knobs.tile(out_w, 3)``: columns = [xb, xt, xi]
  (per-thread factors ki, yi, xi drawn up to ``MAX_INNER``);
- ``knobs.choice(UNROLL_CHOICES)``: ``pragma_auto_unroll_max_step`` of the convolution kernel.

The register tiles (block sums, weight quads, accumulators, their init and write-out loops) are always
unrolled. Unit loops are kept everywhere, so that the trace's structure does not depend on the drawn
tile sizes and MetaSchedule's mutations replay.
"""

import tvm
from tvm import s_tir
from tvm.tirx.analysis import undefined_vars

from ...intrin.cuda import dp4a_intrin
from ...schedule_rules import (
    divisors,
    inline_consumers,
    inline_producers,
    register_rule,
)
from .compute import BLOCK_SUM_BLOCK, PACK_BLOCK, SCHEDULE_RULE

# Output channels per weight vector: a vector's quad row is 16 contiguous bytes, and groups pad their
# output channels only to a multiple of 4.
LANES = 4
# Signed int8 activations: __dp4a multiplies signed int8x4 by signed int8x4 (sm_61+).
ACT_OFFSET = 0

UNROLL_CHOICES = (0, 16, 64, 512, 1024)
# Largest per-thread factor MetaSchedule may draw for each register-tile dimension.
MAX_INNER = 4
# Threads of the elementwise / pack kernels.
ELEMWISE_THREADS = 256


# --- helpers ---------------------------------------------------------------------------------------


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _realize(sch, block):
    """The SBlockRealize of a block (the body of its innermost loop)."""
    loops = sch.get_loops(block)
    stmt = sch.get(loops[-1]).body
    while not isinstance(stmt, s_tir.SBlockRealize):
        stmt = stmt.body
    return stmt


def _loop_kinds(sch, block, loops):
    """For each loop: 'R' if it drives a reduction iterator of ``block``, else 'S'."""
    realize = _realize(sch, block)
    kinds = []
    for loop in loops:
        var = sch.get(loop).loop_var
        kind = "S"
        for iv, value in zip(realize.block.iter_vars, realize.iter_values):
            if iv.iter_type == tvm.tirx.IterVar.CommReduce and _uses_var(value, var):
                kind = "R"
        kinds.append(kind)
    return kinds


def _uses_var(expr, var) -> bool:
    return any(v.same_as(var) for v in undefined_vars(expr))


def _written(sch, block):
    """The buffer ``block`` writes."""
    return sch.get(block).writes[0].source


def _is_bound(sch, block) -> bool:
    return any(sch.get(loop).kind == tvm.tirx.ForKind.THREAD_BINDING for loop in sch.get_loops(block))


def _bind_flat(sch, block, threads: int = ELEMWISE_THREADS, inner_loops: int = 0):
    """Own kernel for ``block``: its spatial loops fused over (blockIdx.x, threadIdx.x); reduction loops
    (accumulating in a register) and the ``inner_loops`` innermost spatial loops (unrolled) stay serial
    inside each thread."""
    loops = sch.get_loops(block)
    if not loops:
        loops = [sch.add_unit_loop(block)]
    kinds = _loop_kinds(sch, block, loops)
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
    reduction = [loop for loop, kind in zip(loops, kinds) if kind == "R"]
    inner = spatial[len(spatial) - inner_loops :] if inner_loops else []
    outer = spatial[: len(spatial) - len(inner)]
    sch.reorder(*outer, *reduction, *inner)
    if outer:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    else:
        fused = sch.add_unit_loop(reduction[0] if reduction else inner[0])
    t = max(1, min(threads, _extent(sch, fused)))
    bx, tx = sch.split(fused, [None, t])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    for loop in inner:
        sch.unroll(loop)
    if reduction:
        write_out = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(write_out, tx, preserve_unit_loops=True)
        sch.decompose_reduction(block, reduction[0])


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in divisors(n) if d <= max(1, limit))


# Below this many threads in the grid, the default register tile shrinks to make more of them.
MIN_GRID_THREADS = 8192


def default_knobs(batch: int, k_vectors: int, out_h: int, out_w: int) -> dict:
    """Default tiles (perfect, like MetaSchedule's draws). Per thread: 2 channel vectors x 2 columns,
    shrunk towards 1 x 1 while the grid would have fewer than MIN_GRID_THREADS threads. Per block: up to
    32 positions first (a warp reads neighbouring activations and shares each weight load), then a
    multiple of 32 threads if the divisors allow, up to 128 threads (64 for small grids)."""
    ki, xi, yi = _largest_divisor(k_vectors, 2), _largest_divisor(out_w, 2), 1

    def grid_threads():
        return batch * (k_vectors // ki) * (out_h // yi) * (out_w // xi)

    if grid_threads() < MIN_GRID_THREADS and xi > 1:
        xi = 1
    if grid_threads() < MIN_GRID_THREADS and ki > 1:
        ki = 1
    limit = 128 if grid_threads() >= 128 * 256 else 64
    best, best_score = (1, 1, 1), None
    for xt in divisors(out_w // xi):
        for yt in divisors(out_h // yi):
            for kt in divisors(k_vectors // ki):
                threads = xt * yt * kt
                if threads > limit:
                    continue
                score = (min(xt * yt, 32), threads % 32 == 0, threads, xt)
                if best_score is None or score > best_score:
                    best, best_score = (xt, yt, kt), score
    xt, yt, kt = best
    return {
        "k": [k_vectors // (kt * ki), kt, ki],
        "y": [out_h // (yt * yi), yt, yi],
        "x": [out_w // (xt * xi), xt, xi],
        "unroll": 512,
    }


# --- the rule --------------------------------------------------------------------------------------


@register_rule(SCHEDULE_RULE, ["cuda"])
def schedule_dsconv2d_cuda(sch, block, knobs, variant="default"):
    """Schedule the PrimFunc of ``sch`` whose ``dsconv2d_accumulate`` block is ``block``: every block
    ends up bound to threads (see the module docstring for the kernels and the knobs)."""
    acc = block
    block_sum = sch.get_sblock(BLOCK_SUM_BLOCK)
    pack = sch.get_sblock(PACK_BLOCK)
    lanes = int(_written(sch, block_sum).shape[-1])
    packed = _written(sch, pack)
    packed_dtype = str(packed.dtype)
    (weights,) = [r.source for r in sch.get(block_sum).reads if r.source.name != packed.name]
    weights_name, weights_dtype = weights.name, str(weights.dtype)

    # Fused producers of x_q into the pack stage; fused consumers into the accumulators' write-out.
    inline_producers(sch, pack)
    write_out = sch.cache_write(acc, 0, "local")
    inline_consumers(sch, write_out)

    # The convolution kernel.
    n, k, y, x, rb, rr, rq = sch.get_loops(acc)
    k_vec, lane = sch.split(k, [None, lanes])
    defaults = default_knobs(_extent(sch, n), _extent(sch, k_vec), _extent(sch, y), _extent(sch, x))
    kb, kt, ki = sch.split(k_vec, knobs.tile(k_vec, 3, defaults["k"], max_innermost=MAX_INNER))
    yb, yt, yi = sch.split(y, knobs.tile(y, 3, defaults["y"], max_innermost=MAX_INNER))
    xb, xt, xi = sch.split(x, knobs.tile(x, 3, defaults["x"], max_innermost=MAX_INNER))
    sch.reorder(n, yb, xb, kb, kt, yt, xt, rb, rr, rq, ki, yi, xi, lane)
    bx = sch.fuse(n, yb, xb)
    tx = sch.fuse(yt, xt)
    sch.bind(bx, "blockIdx.x")
    sch.bind(kb, "blockIdx.y")
    sch.bind(kt, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.annotate(bx, "pragma_auto_unroll_max_step", knobs.choice(UNROLL_CHOICES, defaults["unroll"]))
    sch.annotate(bx, "pragma_unroll_explicit", 0)

    # Accumulators written out (bias and fused consumers applied) by the thread that owns them.
    sch.reverse_compute_at(write_out, tx, preserve_unit_loops=True)
    depth_tx = len(sch.get_loops(acc)) - 7  # loops above rb: bx, kb, kt, tx
    for loop in sch.get_loops(write_out)[depth_tx:]:
        sch.unroll(loop)

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
    for loop in spatial:
        sch.unroll(loop)
    for loop in sch.get_loops(init)[depth_rq:]:
        sch.unroll(loop)
    # The weight quads of a channel vector (LANES x 4 contiguous bytes) in registers, one vector load
    # per (channel vector, quad step) instead of one load per lane.
    weights_local = sch.cache_read(block_sum, weights_name, "local")
    sch.compute_at(weights_local, c4, preserve_unit_loops=True)
    copy = sch.get_loops(weights_local)[depth_rq + 1 :]  # ko, b, c4, r, s, lane, i4
    for loop in copy[:-2]:
        sch.unroll(loop)
    vector = sch.fuse(copy[-2], copy[-1])
    width = next(w for w in (16, 8, 4) if lanes * 4 % w == 0)  # bytes per load: int4, int2 or int
    if lanes * 4 > width:
        outer, vector = sch.split(vector, [None, width])
        sch.unroll(outer)
    sch.vectorize(vector)
    if packed_dtype in ("int8", "uint8") and weights_dtype == "int8":
        sch.tensorize(quad, dp4a_intrin(packed.scope(), "local", "local", packed_dtype))

    # Float multiply-adds of the accumulators.
    for loop in sch.get_loops(acc)[depth_rq:]:
        sch.unroll(loop)
    acc_init = sch.decompose_reduction(acc, rb)
    for loop in sch.get_loops(acc_init)[depth_tx:]:
        sch.unroll(loop)

    # The pack kernel: threads along w, the quad's four channels serial inside a thread.
    _bind_flat(sch, sch.get_sblock(PACK_BLOCK), inner_loops=1)

    # Everything else not yet bound (input sums, blocks that could not be inlined): its own kernel.
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        if not _is_bound(sch, blk):
            _bind_flat(sch, blk)
