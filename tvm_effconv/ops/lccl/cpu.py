"""The LCCL schedule for LLVM CPU targets (AArch64 NEON, x86 AVX2 / AVX-512): skip the whole reduction of a
zero position, vectorised over output channels.

The main conv's register tile is ``kv`` weight vectors (``lanes`` output channels each) for ONE output
position. Its reduction loops (c, r, s) sit inside the position loops, so the compute's ``where = mask > 0``
is invariant in them and TVM's HoistIfThenElse pass lifts it out: per position, ``if mask != 0`` then the
tile's accumulators run the whole reduction (one broadcast input and ``kv`` weight vectors per step, fused
multiply-adds), else nothing. The tile is written once through the fused epilogue
``mask > 0 ? relu(acc + b) * mask : 0`` (and any elementwise consumer FuseOps put after it).

"channel" mode decides per weight vector (the gate is the max of the mask over its lanes), so the vector
loop goes outside the reduction: the tile is one vector, and ``kv`` only orders the work.

Loop order: (batch, channel tiles, rows) in parallel, then columns, so that a channel tile's weights
(``kv * lanes * C * R * S`` floats) stay in cache across all the positions of a row.

The cheap conv (one output channel in "spatial" mode, a 1x1 conv in "channel" mode) is vectorised over the
output columns, its reduction outside them; the padded input is materialised once, in parallel.

Knob (default in brackets): ``knobs.tile(weight vectors, 2)`` = [channel tiles, kv]: kv up to 8
[the largest divisor of the vector count up to ``DEFAULT_VECTORS``].
"""

from tvm.target import codegen

from ...schedule_rules import (
    divisors,
    inline_consumers,
    inline_producers,
    parallel_outer,
    register_rule,
)
from .compute import CHEAP_BLOCK, MASK_BLOCK, MODE_ANNOTATION, PAD_BLOCK, SCHEDULE_RULE

# Accumulator vectors of the default tile: with memory-operand weights a step costs kv + 1 loads for kv
# multiply-adds; 4 keeps the weight tile of a 3x3x512 layer (4 x 8 x 4608 floats, 590 KB) near L2.
DEFAULT_VECTORS = 4
MAX_VECTORS = 8


def vector_floats(target) -> int:
    """float32 lanes of the target's SIMD registers: 16 with AVX-512, 8 with AVX(2), 4 on NEON / SSE."""

    def has(feature):
        return bool(codegen.llvm_cpu_has_features(feature, target))

    if "aarch64" in str(target.attrs.get("mtriple", "")) or has("neon"):
        return 4
    if has("avx512f"):
        return 16
    if has("avx"):
        return 8
    return 4


def _schedule_cheap(sch):
    """The cheap conv: (n, m, p) in parallel, its reduction, then the columns vectorised."""
    cheap = sch.get_sblock(CHEAP_BLOCK)
    n, m, p, q, *reduction = sch.get_loops(cheap)
    sch.reorder(n, m, p, *reduction, q)
    sch.parallel(sch.fuse(n, m, p))
    sch.vectorize(q)  # before decompose_reduction: vectorize needs the reduction's init in place
    init = sch.decompose_reduction(cheap, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])


@register_rule(SCHEDULE_RULE, ["cpu", "arm_cpu"], variants=("skip",))
def schedule_lccl_cpu(sch, main, knobs, variant):
    channel_mode = str(sch.get(main).annotations.get(MODE_ANNOTATION, "spatial")) == "channel"

    pad = sch.get_sblock(PAD_BLOCK)
    inline_producers(sch, pad)
    parallel_outer(sch, pad, 3)  # n, c, h
    _schedule_cheap(sch)
    parallel_outer(sch, sch.get_sblock(MASK_BLOCK), 3)

    n, k, p, q, c, r, s = sch.get_loops(main)
    lanes = _lanes(sch, main)
    ko, ki = sch.split(k, [None, lanes])
    vectors = int(sch.get(ko).extent)
    kv0 = max(d for d in divisors(vectors) if d <= DEFAULT_VECTORS)
    kt, kv = sch.split(ko, knobs.tile(ko, 2, [vectors // kv0, kv0], max_innermost=MAX_VECTORS))
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


def _lanes(sch, main) -> int:
    """The weight vector width: the last dimension of the packed main weights the block reads."""
    for region in sch.get(main).reads:
        if len(region.source.shape) == 5:
            return int(region.source.shape[-1])
    raise ValueError("lccl_main reads no packed (K / lanes, C, R, S, lanes) weights")
