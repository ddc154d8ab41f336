"""The bit-serial schedule for LLVM CPU targets: AArch64 NEON (``cnt`` on bytes with pairwise widening
accumulation, a tensor intrinsic), x86 with AVX-512 VPOPCNTDQ (``vpopcntd`` across 16 output channels)
and other x86 (64-bit words, four output channels unrolled; LLVM's SLP vectorizer turns their four
popcounts into the AVX2 nibble-lookup popcount, ``vpshufb`` + ``vpsadbw``, 176 GMAC/s effective at
A1W1 on this host's 256x14x14 layer).

The register tile: ``kv`` weight vectors (``lanes`` output channels each) x ``yt`` x ``xt`` output
positions. For each plane pair (i, j) the tile's popcount sums run over the window's taps and words from
zero, then are shifted by i + j into the integer accumulators; both stay in registers, and the tile is
written once through the fused epilogue (zero-point terms, scale, bias, ReLU, the next layer's
quantization).
"""

from dataclasses import dataclass

from tvm.target import codegen

from ...intrin import arm as arm_intrin
from ...intrin import in_scope
from ...schedule_rules import (
    REGISTER_SCOPE,
    RegisterBudget,
    inline_consumers,
    inline_producers,
    parallel_outer,
    register_rule,
    register_tile,
)
from .compute import CHANNEL_SUM_BLOCK, PACK_BLOCK, PLANE_SUM_BLOCK, SCHEDULE_RULE

POPCOUNT_ANNOTATION = "popcount_kind"
SCALAR = "scalar_popcnt"
VPOPCNTDQ = "avx512_vpopcntdq"


@dataclass(frozen=True)
class PopcountLayout:
    """How a target's popcount wants the bit planes: channels per word, words per operand, output
    channels per weight vector; and the registers a tile costs."""

    word_bits: int
    chunk: int
    lanes: int
    budget: RegisterBudget


def popcount_kind(target, group_in: int) -> str:
    """The popcount form for ``target`` and a conv with ``group_in`` input channels per group."""

    def has(feature):
        return bool(codegen.llvm_cpu_has_features(feature, target))

    if "aarch64" in str(target.attrs.get("mtriple", "")) or has("neon"):
        # 16-byte operands cover 128 channels; up to 64 channels the 8-byte form wastes nothing
        return arm_intrin.POPCOUNT_4x8 if group_in <= 64 else arm_intrin.POPCOUNT_4x16
    if has("avx512vpopcntdq"):
        return VPOPCNTDQ
    return SCALAR


LAYOUTS = {
    # u32x4 plane sums and accumulators per output; four 16-byte weight rows per vector; the input
    # operand per position; the intrinsic's seven temporaries
    arm_intrin.POPCOUNT_4x16: PopcountLayout(8, 16, 4, RegisterBudget(32, 2, 4, 1, 7)),
    arm_intrin.POPCOUNT_4x8: PopcountLayout(8, 8, 4, RegisterBudget(32, 2, 2, 1, 4)),
    # zmm: plane sums and accumulators per output, weights from memory, the broadcast input
    VPOPCNTDQ: PopcountLayout(32, 1, 16, RegisterBudget(32, 2, 0, 0, 2)),
    # general-purpose registers: four plane sums per output (lanes), the loaded input word per
    # position, a temporary and the loop's pointers (the accumulators live in vector registers)
    SCALAR: PopcountLayout(64, 1, 4, RegisterBudget(14, 4, 0, 1, 2)),
}


@register_rule(SCHEDULE_RULE, ["cpu", "arm_cpu"])
def schedule_bitserial_cpu(sch, accumulate, knobs, variant):
    kind = str(sch.get(accumulate).annotations.get(POPCOUNT_ANNOTATION, SCALAR))
    layout = LAYOUTS[kind]

    pack = sch.get_sblock(PACK_BLOCK)
    inline_producers(sch, pack)
    parallel_outer(sch, pack, 4)  # n, group, plane, h
    inline_producers(sch, sch.get_sblock(CHANNEL_SUM_BLOCK))
    plane_sum = sch.get_sblock(PLANE_SUM_BLOCK)

    n, k, y, x, i, j = sch.get_loops(accumulate)
    ko, ki = sch.split(k, [None, layout.lanes])
    vectors, height, width = (int(sch.get(loop).extent) for loop in (ko, y, x))
    kv0, yt0, xt0 = register_tile(vectors, height, width, layout.budget)
    kt, kv = sch.split(ko, knobs.tile(ko, 2, [vectors // kv0, kv0], max_innermost=8))
    yo, yt = sch.split(y, knobs.tile(y, 2, [height // yt0, yt0], max_innermost=4))
    xo, xt = sch.split(x, knobs.tile(x, 2, [width // xt0, xt0], max_innermost=16))
    sch.reorder(n, kt, yo, xo, i, j, yt, kv, xt, ki)
    sch.parallel(sch.fuse(n, kt, yo))

    writeback = sch.cache_write(accumulate, 0, REGISTER_SCOPE)
    inline_consumers(sch, writeback)
    sch.reverse_compute_at(writeback, xo)
    for consumer in sch.get_consumers(writeback):  # the dequantization, where channels were padded
        parallel_outer(sch, consumer, 2)

    # Unit loops kept: the trace must have the same loops whatever tile sizes MetaSchedule samples.
    sch.compute_at(plane_sum, j, preserve_unit_loops=True)
    sch.set_scope(plane_sum, 0, REGISTER_SCOPE)
    inner = sch.get_loops(plane_sum)[-11:]  # n, ko, i, j, y, x, lane, r, s, chunk, word
    pko, py, px, lane, r, s, ch, cw = (inner[idx] for idx in (1, 4, 5, 6, 7, 8, 9, 10))
    sch.reorder(r, s, ch, py, pko, px, lane, cw)
    if kind == VPOPCNTDQ:  # vectorize needs the reduction's init still in place
        sch.reorder(cw, lane)
        sch.vectorize(lane)
    init = sch.decompose_reduction(plane_sum, r)
    sch.vectorize(sch.get_loops(init)[-1])
    if kind in (arm_intrin.POPCOUNT_4x8, arm_intrin.POPCOUNT_4x16):
        sch.tensorize(lane, in_scope(kind, REGISTER_SCOPE))
    elif kind == SCALAR:
        sch.unroll(lane)
    for loop in (py, pko, px):
        sch.unroll(loop)

    sch.vectorize(ki)
    for loop in (xt, kv, yt):
        sch.unroll(loop)
    init = sch.decompose_reduction(accumulate, i)
    sch.vectorize(sch.get_loops(init)[-1])
