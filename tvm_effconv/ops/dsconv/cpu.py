"""The DSConv schedule for LLVM CPU targets: AArch64 NEON (sdot, or smull without dotprod) and x86
(AVX2, AVX-512, VNNI). One schedule serves all of them; the dot-product intrinsic is the only
difference, chosen per target by :func:`dot_intrinsic` and recorded in the compute's annotations.

The register tile: ``kv`` weight vectors (``lanes`` output channels each) x ``yt`` x ``xt`` output
positions. For each kernel tap (block, r, s) the tile's int32 block sums are computed from zero with
one dot instruction per (4 input channels, vector, position), then folded into the float accumulators
with one multiply-add; both tiles stay in registers, and the float tile is written once, with the
fused epilogue (bias, ReLU, requantization of the next layer) applied on the way out.
"""

from tvm.target import codegen

from ...intrin import arm as arm_intrin
from ...intrin import in_scope
from ...intrin import x86 as x86_intrin
from ...schedule_rules import (
    REGISTER_SCOPE,
    RegisterBudget,
    inline_consumers,
    inline_producers,
    parallel_outer,
    register_rule,
    register_tile,
)
from .compute import BLOCK_SUM_BLOCK, PACK_BLOCK, SCHEDULE_RULE

DOT_ANNOTATION = "dot_intrinsic"
PLAIN = "none"  # no intrinsic: the loops are left for LLVM to vectorize

# intrinsic -> (output channels per instruction, SIMD registers, int32 lanes per register,
#               x86: unsigned activations, and weight vectors read as memory operands, not registers)
DOTS = {
    arm_intrin.SDOT_4x4: (4, 32, 4, False),
    arm_intrin.NEON_DOT_4x4: (4, 32, 4, False),
    x86_intrin.AVX2_DOT_8x4: (8, 16, 8, True),
    x86_intrin.AVX512_DOT_16x4: (16, 32, 16, True),
    x86_intrin.VNNI_DOT_16x4: (16, 32, 16, True),
}
# Vector registers a tile leaves free for the broadcast input and temporaries (x86: a spill of one
# of them costs less than a smaller tile, measured on the 7-wide layers).
RESERVED_REGISTERS = {"x86": 2, "arm": 3}


def dot_intrinsic(target, weight_bits: int) -> str:
    """The dot-product intrinsic for ``target`` and weights of ``weight_bits`` bits."""

    def has(feature):
        return bool(codegen.llvm_cpu_has_features(feature, target))

    if "aarch64" in str(target.attrs.get("mtriple", "")) or has("neon"):
        return arm_intrin.SDOT_4x4 if has("dotprod") else arm_intrin.NEON_DOT_4x4
    if has("avx512vnni"):
        return x86_intrin.VNNI_DOT_16x4
    if weight_bits <= x86_intrin.PMADDUBSW_MAX_WEIGHT_BITS:
        if has("avx512bw"):
            return x86_intrin.AVX512_DOT_16x4
        if has("avx2"):
            return x86_intrin.AVX2_DOT_8x4
    return PLAIN


def kernel_layout(intrinsic: str) -> tuple[int, int]:
    """(output channels per packed weight vector, activation offset) the intrinsic wants."""
    if intrinsic == PLAIN:
        return 8, 0
    lanes, _, _, unsigned = DOTS[intrinsic]
    return lanes, 128 if unsigned else 0


def tile_budget(intrinsic: str) -> RegisterBudget:
    """The registers a tile of ``intrinsic`` costs: int32 block sums and float accumulators per
    output, weight vectors in registers on ARM (x86 reads them as memory operands). Measured on this
    host's 7x7 layers: (1, 1, 7) 1.8 ms against 2.2-2.7 ms for (4, 1, 1), which counting weight
    registers on x86 had picked."""
    lanes, registers, int32_lanes, x86 = DOTS.get(intrinsic, (8, 16, 8, True))
    per_vector = max(1, lanes // int32_lanes)
    return RegisterBudget(
        registers, 2 * per_vector, 0 if x86 else per_vector, 0, RESERVED_REGISTERS["x86" if x86 else "arm"]
    )


@register_rule(SCHEDULE_RULE, ["cpu", "arm_cpu"])
def schedule_dsconv2d_cpu(sch, accumulate, knobs, variant):
    annotations = sch.get(accumulate).annotations
    intrinsic = str(annotations.get(DOT_ANNOTATION, PLAIN))
    lanes, _ = kernel_layout(intrinsic)  # for an intrinsic: its width, so one call covers a weight vector

    pack = sch.get_sblock(PACK_BLOCK)
    block_sum = sch.get_sblock(BLOCK_SUM_BLOCK)
    inline_producers(sch, pack)
    parallel_outer(sch, pack, 5)  # n, group, block, c4, h
    sch.unroll(sch.get_loops(pack)[-1])
    for consumer in sch.get_consumers(pack):
        if not sch.get(consumer).same_as(sch.get(block_sum)):  # the KDS bias' input sums
            parallel_outer(sch, consumer, 3)

    n, k, y, x, rb, rr, rq = sch.get_loops(accumulate)
    ko, ki = sch.split(k, [None, lanes])
    vectors, height, width = (int(sch.get(loop).extent) for loop in (ko, y, x))
    kv0, yt0, xt0 = register_tile(vectors, height, width, tile_budget(intrinsic))
    kt, kv = sch.split(ko, knobs.tile(ko, 2, [vectors // kv0, kv0], max_innermost=8))
    yo, yt = sch.split(y, knobs.tile(y, 2, [height // yt0, yt0], max_innermost=4))
    xo, xt = sch.split(x, knobs.tile(x, 2, [width // xt0, xt0], max_innermost=16))
    sch.reorder(n, kt, yo, xo, rb, rr, rq, yt, kv, xt, ki)
    # before tensorize: parallel needs the blocks under the loop complete or reductions with init
    sch.parallel(sch.fuse(n, kt, yo))

    writeback = sch.cache_write(accumulate, 0, REGISTER_SCOPE)
    inline_consumers(sch, writeback)
    sch.reverse_compute_at(writeback, xo)
    for consumer in sch.get_consumers(writeback):  # the unpadding of odd channel counts
        parallel_outer(sch, consumer, 2)

    # Unit loops kept: the trace must have the same loops whatever tile sizes MetaSchedule samples.
    sch.compute_at(block_sum, rq, preserve_unit_loops=True)
    sch.set_scope(block_sum, 0, REGISTER_SCOPE)
    inner = sch.get_loops(block_sum)[-10:]  # n, ko, block, r, s, y, x, lane, c4, i4
    bko, by, bx, blane, c4, i4 = (inner[i] for i in (1, 5, 6, 7, 8, 9))
    sch.reorder(c4, by, bko, bx, blane, i4)
    if intrinsic == PLAIN:  # vectorize needs the reduction's init still in place
        sch.reorder(i4, blane)
        sch.vectorize(blane)
        sch.unroll(i4)
    init = sch.decompose_reduction(block_sum, c4)
    sch.vectorize(sch.get_loops(init)[-1])
    if intrinsic != PLAIN:
        sch.tensorize(blane, in_scope(intrinsic, REGISTER_SCOPE))
    for loop in (by, bko, bx):
        sch.unroll(loop)

    sch.vectorize(ki)
    for loop in (xt, kv, yt):
        sch.unroll(loop)
    init = sch.decompose_reduction(accumulate, rb)
    sch.vectorize(sch.get_loops(init)[-1])
