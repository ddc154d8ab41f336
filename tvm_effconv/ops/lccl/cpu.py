"""The LCCL schedules for LLVM CPU targets (AArch64 NEON, x86 AVX2 / AVX-512), one per main-conv algorithm.

"skip" (and "dense", its unguarded twin): skip the whole reduction of a zero position, vectorised over
output channels. The register tile is ``kv`` weight vectors (``lanes`` output channels each) for ONE output
position. Its reduction loops (c, r, s) sit inside the position loops, so the guard ``mask != 0`` is
invariant in them and LLVM lifts it out (TVM's HoistIfThenElse leaves conditions that load from a buffer
in place; the generated x86 code tests the mask once per position): per position, ``if mask != 0`` then the
tile's accumulators run the whole reduction (one broadcast input and ``kv`` weight vectors per step, fused
multiply-adds), else nothing. The tile is written once through the fused epilogue
``mask > 0 ? relu(acc + b) * mask : 0``. "channel" mode decides per weight vector (the gate is the max of
the mask over its lanes), so the vector loop goes outside the reduction: the tile is one vector, and ``kv``
only orders the work. Loop order: (batch, channel tiles, rows) in parallel, then columns, so that a channel
tile's weights (``kv * lanes * C * R * S`` floats) stay in cache across all the positions of a row.

"compact": the compaction stages run in parallel over (image, list, row) or (image, list, entry), their
short reductions serial; the input is copied channels-last and the active rows' windows gathered from it,
one vectorised run of C channels per tap, in parallel over tiles of ``rows`` entries (tiles past the list's
count skip their copy); the GEMM's register tile is ``rows`` list entries x ``kv`` weight vectors,
accumulated over (r, s, c) with the guard tested once per tile above it, so a step loads ``kv`` weight
vectors and ``rows`` broadcast inputs for ``rows * kv`` multiply-adds (the skip tile: ``kv`` + 1 loads for
``kv``), and a pass over a channel tile's weights serves ``rows`` positions. Loop order: (image, list,
channel tiles, row tiles) in parallel, so that a channel tile's weights stay in cache across all the rows of
a list. The output is written by its own loop nest, which reads each active position's row of the GEMM
(the scatter back) and writes zeros elsewhere.

The cheap conv (one output channel in "spatial" mode, a 1x1 conv in "channel" mode) is vectorised over the
output columns, its reduction outside them; the padded input is materialised once, in parallel.

Knob (default in brackets): ``knobs.tile(weight vectors, 2)`` = [channel tiles, kv]: kv up to 8
[the largest divisor of the vector count up to ``DEFAULT_VECTORS`` for skip, up to the compute's
``lccl_tile_vectors`` for compact]. The compact GEMM's ``rows`` is fixed by the compute (the guard's
granularity); :func:`compact_tile` sizes both to the target's register file.
"""

from tvm.target import codegen

from ...schedule_rules import (
    divisors,
    inline_consumers,
    inline_producers,
    parallel_outer,
    register_rule,
)
from .compute import (
    ALGORITHM_ANNOTATION,
    CHEAP_BLOCK,
    COMPACTION_BLOCKS,
    GATHER_BLOCK,
    MASK_BLOCK,
    MODE_ANNOTATION,
    OUT_BLOCK,
    PAD_BLOCK,
    PAD_NHWC_BLOCK,
    ROWS_ANNOTATION,
    SCHEDULE_RULE,
    VECTORS_ANNOTATION,
)

# Accumulator vectors of the default tile: with memory-operand weights a step costs kv + 1 loads for kv
# multiply-adds; 4 keeps the weight tile of a 3x3x512 layer (4 x 8 x 4608 floats, 590 KB) near L2.
DEFAULT_VECTORS = 4
MAX_VECTORS = 8


def _has(target, feature) -> bool:
    return bool(codegen.llvm_cpu_has_features(feature, target))


def is_aarch64(target) -> bool:
    return "aarch64" in str(target.attrs.get("mtriple", "")) or _has(target, "neon")


def vector_floats(target) -> int:
    """float32 lanes of the target's SIMD registers: 16 with AVX-512, 8 with AVX(2), 4 on NEON / SSE."""
    if is_aarch64(target):
        return 4
    if _has(target, "avx512f"):
        return 16
    if _has(target, "avx"):
        return 8
    return 4


def vector_registers(target) -> int:
    """SIMD registers of the target: 32 on AArch64 and with AVX-512, 16 otherwise."""
    return 32 if is_aarch64(target) or _has(target, "avx512f") else 16


def compact_tile(target) -> tuple[int, int]:
    """(list entries, weight vectors) of the compact GEMM's default register tile: 2 vectors with 16 registers,
    4 with 32, and as many entries as fit beside them and one broadcast input: 6 x 2 (x86 AVX2) and 6 x 4
    (AArch64, AVX-512). More entries per tile mean fewer passes over a channel tile's weights: on this host
    (Zen 2, AVX2, interleaved on the 3x3 ResNet-18 layers, noisy) 6 x 2 beat 2 x 4 by 10-40%, and 3 x 4, 4 x 2,
    3 x 3 by less; 7 x 2 spills."""
    vectors = 2 if vector_registers(target) == 16 else 4
    return (vector_registers(target) - vectors - 1) // vectors, vectors


def _schedule_cheap(sch):
    """The cheap conv: (n, m, p) in parallel, its reduction, then the columns vectorised."""
    cheap = sch.get_sblock(CHEAP_BLOCK)
    n, m, p, q, *reduction = sch.get_loops(cheap)
    sch.reorder(n, m, p, *reduction, q)
    sch.parallel(sch.fuse(n, m, p))
    sch.vectorize(q)  # before decompose_reduction: vectorize needs the reduction's init in place
    init = sch.decompose_reduction(cheap, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])


@register_rule(SCHEDULE_RULE, ["cpu", "arm_cpu"])
def schedule_lccl_cpu(sch, main, knobs, variant="default"):
    annotations = sch.get(main).annotations
    channel_mode = str(annotations[MODE_ANNOTATION]) == "channel"

    pad = sch.get_sblock(PAD_BLOCK)
    inline_producers(sch, pad)
    parallel_outer(sch, pad, 3)  # n, c, h
    _schedule_cheap(sch)
    parallel_outer(sch, sch.get_sblock(MASK_BLOCK), 3)
    if str(annotations[ALGORITHM_ANNOTATION]) == "compact":
        _schedule_compact(sch, main, knobs, int(annotations[ROWS_ANNOTATION]), int(annotations[VECTORS_ANNOTATION]))
    else:
        _schedule_skip(sch, main, knobs, channel_mode)


def _channel_tile(sch, main, j, knobs, default_vectors: int):
    """Split output channels ``j`` into (channel tiles, kv weight vectors, lanes) by the ``tile`` knob (default
    kv: the largest divisor of the vector count up to ``default_vectors``)."""
    lanes = _lanes(sch, main)
    jo, ji = sch.split(j, [None, lanes])
    vectors = int(sch.get(jo).extent)
    kv0 = max(d for d in divisors(vectors) if d <= default_vectors)
    jt, jv = sch.split(jo, knobs.tile(jo, 2, [vectors // kv0, kv0], max_innermost=MAX_VECTORS))
    return jt, jv, ji


def _schedule_skip(sch, main, knobs, channel_mode: bool):
    n, k, p, q, c, r, s = sch.get_loops(main)
    kt, kv, ki = _channel_tile(sch, main, k, knobs, DEFAULT_VECTORS)
    if channel_mode:
        sch.reorder(n, kt, p, q, kv, c, r, s, ki)
    else:
        sch.reorder(n, kt, p, q, c, r, s, kv, ki)
    sch.parallel(sch.fuse(n, kt, p))

    writeback = sch.cache_write(main, 0, "local")
    inline_consumers(sch, writeback)
    sch.reverse_compute_at(writeback, q, preserve_unit_loops=True)
    for consumer in sch.get_consumers(writeback):  # a consumer that could not be inlined
        parallel_outer(sch, consumer, 2)

    sch.vectorize(ki)
    if not channel_mode:
        sch.unroll(kv)
    init = sch.decompose_reduction(main, c)
    sch.vectorize(sch.get_loops(init)[-1])


def _schedule_compact(sch, main, knobs, rows: int, vectors: int):
    for name in COMPACTION_BLOCKS:
        parallel_outer(sch, sch.get_sblock(name), 3)  # (n, l, row) or (n, l, entry): reductions stay serial
    parallel_outer(sch, sch.get_sblock(PAD_NHWC_BLOCK), 2)  # n, h
    gather = sch.get_sblock(GATHER_BLOCK)
    n, l, t, _, _, c = sch.get_loops(gather)
    to, _ = sch.split(t, [None, rows])  # the guard of a tile of rows is lifted above its copy
    sch.parallel(sch.fuse(n, l, to))
    sch.vectorize(c)  # a window row: contiguous channels on both sides

    n, l, t, j, *reduction = sch.get_loops(main)
    to, ti = sch.split(t, [None, rows])
    jt, jv, ji = _channel_tile(sch, main, j, knobs, vectors)
    sch.reorder(n, l, jt, to, *reduction, ti, jv, ji)
    tile = sch.fuse(n, l, jt, to)
    sch.parallel(tile)
    writeback = sch.cache_write(main, 0, "local")
    sch.reverse_compute_at(writeback, tile, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(writeback)[-1])
    sch.unroll(ti)
    sch.unroll(jv)
    sch.vectorize(ji)
    init = sch.decompose_reduction(main, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])

    out = sch.get_sblock(OUT_BLOCK)
    inline_consumers(sch, out)
    parallel_outer(sch, out, 3)  # n, k, p


def _lanes(sch, main) -> int:
    """The weight vector width: the last dimension of the packed main weights the block reads."""
    for region in sch.get(main).reads:
        if len(region.source.shape) == 5:
            return int(region.source.shape[-1])
    raise ValueError("lccl_main reads no packed (K / lanes, C, R, S, lanes) weights")
