"""What the CUDA schedules of the effconv ops share (see :mod:`.dsconv.cuda`, :mod:`.dsq.cuda`).

- the thread tile of a convolution: output channel vectors x rows x columns, each split three ways
  (grid, block, per-thread register tile) by knobs with :func:`default_knobs` as the defaults, bound to
  (blockIdx.x = batch x row tiles x column tiles, blockIdx.y = channel tiles) and (threadIdx.x =
  positions, threadIdx.y = channel vectors): :func:`tile_threads`;
- a weight operand cached in registers with vector loads: :func:`load_vectors`;
- one-thread-per-element kernels for the blocks around the convolution (packing, sums, unpadding),
  reductions serial in a register: :func:`bind_flat`, :func:`bind_unbound`.
"""

from dataclasses import dataclass

import tvm
from tvm import s_tir
from tvm.tirx.analysis import undefined_vars

from ..schedule_rules import divisors

UNROLL_CHOICES = (0, 16, 64, 512, 1024)
# Largest per-thread factor MetaSchedule may draw for each register-tile dimension.
MAX_INNER = 4
# Threads of the elementwise / pack kernels.
ELEMWISE_THREADS = 256
# Below this many threads in the grid, the default register tile shrinks to make more of them.
MIN_GRID_THREADS = 8192


def extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def realize(sch, block):
    """The SBlockRealize of a block (the body of its innermost loop)."""
    loops = sch.get_loops(block)
    stmt = sch.get(loops[-1]).body
    while not isinstance(stmt, s_tir.SBlockRealize):
        stmt = stmt.body
    return stmt


def uses_var(expr, var) -> bool:
    return any(v.same_as(var) for v in undefined_vars(expr))


def loop_kinds(sch, block, loops):
    """For each loop: 'R' if it drives a reduction iterator of ``block``, else 'S'."""
    block_realize = realize(sch, block)
    kinds = []
    for loop in loops:
        var = sch.get(loop).loop_var
        kind = "S"
        for iv, value in zip(block_realize.block.iter_vars, block_realize.iter_values):
            if iv.iter_type == tvm.tirx.IterVar.CommReduce and uses_var(value, var):
                kind = "R"
        kinds.append(kind)
    return kinds


def written(sch, block):
    """The buffer ``block`` writes."""
    return sch.get(block).writes[0].source


def is_bound(sch, block) -> bool:
    return any(sch.get(loop).kind == tvm.tirx.ForKind.THREAD_BINDING for loop in sch.get_loops(block))


def unroll(sch, loops) -> None:
    for loop in loops:
        sch.unroll(loop)


def bind_flat(sch, block, threads: int = ELEMWISE_THREADS, inner_loops: int = 0):
    """Own kernel for ``block``: its spatial loops fused over (blockIdx.x, threadIdx.x); reduction loops
    (accumulating in a register) and the ``inner_loops`` innermost spatial loops (unrolled) stay serial
    inside each thread."""
    loops = sch.get_loops(block)
    if not loops:
        loops = [sch.add_unit_loop(block)]
    kinds = loop_kinds(sch, block, loops)
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
    reduction = [loop for loop, kind in zip(loops, kinds) if kind == "R"]
    inner = spatial[len(spatial) - inner_loops :] if inner_loops else []
    outer = spatial[: len(spatial) - len(inner)]
    sch.reorder(*outer, *reduction, *inner)
    if outer:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    else:
        fused = sch.add_unit_loop(reduction[0] if reduction else inner[0])
    t = max(1, min(threads, extent(sch, fused)))
    bx, tx = sch.split(fused, [None, t])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    unroll(sch, inner)
    if reduction:
        write_out = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(write_out, tx, preserve_unit_loops=True)
        sch.decompose_reduction(block, reduction[0])


def bind_unbound(sch):
    """Every block of the root scope not yet bound to threads gets its own :func:`bind_flat` kernel."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if not is_bound(sch, block):
            bind_flat(sch, block)


def largest_divisor(n: int, limit: int) -> int:
    return max(d for d in divisors(n) if d <= max(1, limit))


def default_knobs(batch: int, k_vectors: int, out_h: int, out_w: int) -> dict:
    """Default tiles (perfect, like MetaSchedule's draws). Per thread: 2 channel vectors x 2 columns,
    shrunk towards 1 x 1 while the grid would have fewer than MIN_GRID_THREADS threads. Per block: up to
    32 positions first (a warp reads neighbouring activations and shares each weight load), then a
    multiple of 32 threads if the divisors allow, up to 128 threads (64 for small grids)."""
    ki, xi, yi = largest_divisor(k_vectors, 2), largest_divisor(out_w, 2), 1

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


@dataclass(frozen=True)
class ThreadTile:
    """The loops :func:`tile_threads` leaves: the fused block loop, the fused position-thread loop, and
    the per-thread register tile (channel vectors, rows, columns, lanes)."""

    bx: object
    tx: object
    inner: tuple


def tile_threads(sch, n, k, y, x, lanes: int, knobs, reduction=()) -> ThreadTile:
    """Split output channels ``k`` into vectors of ``lanes`` and tile vectors, rows ``y`` and columns ``x``
    three ways each (knobs ``tile(k_vectors, 3)``, ``tile(y, 3)``, ``tile(x, 3)`` with per-thread factors
    up to MAX_INNER, then ``choice(UNROLL_CHOICES)`` for ``pragma_auto_unroll_max_step``); bind the
    grid and the block. ``reduction`` loops, if any, go between the thread loops and the register tile.
    Unit loops are kept, so that the trace's structure does not depend on the drawn tile sizes."""
    k_vec, lane = sch.split(k, [None, lanes])
    defaults = default_knobs(extent(sch, n), extent(sch, k_vec), extent(sch, y), extent(sch, x))
    kb, kt, ki = sch.split(k_vec, knobs.tile(k_vec, 3, defaults["k"], max_innermost=MAX_INNER))
    yb, yt, yi = sch.split(y, knobs.tile(y, 3, defaults["y"], max_innermost=MAX_INNER))
    xb, xt, xi = sch.split(x, knobs.tile(x, 3, defaults["x"], max_innermost=MAX_INNER))
    sch.reorder(n, yb, xb, kb, kt, yt, xt, *reduction, ki, yi, xi, lane)
    bx = sch.fuse(n, yb, xb)
    tx = sch.fuse(yt, xt)
    sch.bind(bx, "blockIdx.x")
    sch.bind(kb, "blockIdx.y")
    sch.bind(kt, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.annotate(bx, "pragma_auto_unroll_max_step", knobs.choice(UNROLL_CHOICES, defaults["unroll"]))
    sch.annotate(bx, "pragma_unroll_explicit", 0)
    return ThreadTile(bx, tx, (ki, yi, xi, lane))


def load_vectors(sch, block, buffer_name: str, at):
    """Cache ``block``'s operand ``buffer_name`` in registers at loop ``at`` (e.g. a channel vector's
    weights per reduction step): the copy loops unrolled, its two innermost axes (a vector's lanes and
    their contiguous elements) fused and loaded 16, 8 or 4 bytes at a time."""
    local = sch.cache_read(block, buffer_name, "local")
    sch.compute_at(local, at, preserve_unit_loops=True)
    buffer = written(sch, local)
    copy = sch.get_loops(local)[-len(buffer.shape) :]
    unroll(sch, copy[:-2])
    vector = sch.fuse(copy[-2], copy[-1])
    element = tvm.DataType(str(buffer.dtype)).bits // 8
    size = extent(sch, vector) * element
    width = next(w for w in (16, 8, 4, element) if size % w == 0)  # bytes per load: int4, int2 or int
    if size > width:
        outer, vector = sch.split(vector, [None, width // element])
        sch.unroll(outer)
    sch.vectorize(vector)
