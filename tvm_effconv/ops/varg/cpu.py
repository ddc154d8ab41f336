"""The VarG grouped-conv schedule for LLVM CPU targets: x86 (AVX2, AVX-512) and AArch64 NEON, float32.

Each group is a small dense conv (``group_base`` input channels, ``group_out`` outputs), so the schedule
treats the groups as a batch: the parallel loop runs over (batch, group, channel tiles, row tiles), and
inside it a register tile of ``kv`` weight vectors (``lanes`` output channels of one group each) x
``yt`` x ``xt`` output positions accumulates over the group's channels and the kernel taps (unrolled):
one broadcast input value feeds ``kv`` vector FMAs, one weight vector ``yt * xt`` of them. The tile is
written once, through the fused epilogue (folded batch norm's shift, PReLU/ReLU, residual adds).

Knobs (defaults from :func:`default_tile`): the splits of the group's weight vectors, of the output
rows and of the output columns into (outer, register tile).
"""

from tvm.target import codegen

from ...schedule_rules import (
    RegisterBudget,
    inline_consumers,
    parallel_outer,
    register_rule,
    register_tile,
)
from .compute import (
    CONV_BLOCK,
    GROUPS_ANNOTATION,
    LANES_ANNOTATION,
    OUT_BLOCK,
    PAD_BLOCK,
    SCHEDULE_RULE,
)

# (float32 lanes per SIMD register, SIMD registers)
SIMD = {"avx512": (16, 32), "avx2": (8, 16), "neon": (4, 32)}
# Annotation of the conv block: the target's SIMD register count, which sizes the default tile.
REGISTERS_ANNOTATION = "varg_simd_registers"
# Registers left for temporaries.
RESERVED_REGISTERS = 1


def simd_kind(target) -> str:
    def has(feature):
        return bool(codegen.llvm_cpu_has_features(feature, target))

    if "aarch64" in str(target.attrs.get("mtriple", "")) or has("neon"):
        return "neon"
    if has("avx512f"):
        return "avx512"
    return "avx2"


def vector_lanes(target, group_out: int) -> int:
    """Output channels per weight vector for ``target``: the SIMD width, or less where a group has fewer
    output channels (a power of two dividing ``group_out``)."""
    lanes = SIMD[simd_kind(target)][0]
    while group_out % lanes:
        lanes //= 2
    return lanes


def simd_registers(target) -> int:
    return SIMD[simd_kind(target)][1]


def tile_budget(registers: int) -> RegisterBudget:
    """One accumulator per (vector, position), a weight vector per vector and a broadcast input per
    position (LLVM keeps the broadcasts of neighbouring taps alive: at stride 1 tap s + 1 of position x
    reads what tap s of position x + 1 read). Counting the broadcasts matters: on this host (AVX2) the
    2 x 7 tile the budget without them picks spills and runs at 21 GMAC/s, 1 x 7 and 2 x 2 x 2 at 29."""
    return RegisterBudget(registers, 1, 1, 1, RESERVED_REGISTERS)


def default_tile(group_vectors: int, height: int, width: int, registers: int) -> tuple[int, int, int]:
    """(kv, yt, xt): the register tile without a tuning record."""
    return register_tile(group_vectors, height, width, tile_budget(registers))


def inline_elementwise(sch, keep) -> None:
    """compute_inline every block but ``keep`` (names) into its consumers, as long as any can be: the
    fused producers of the input into the padding, and the epilogue's intermediates (the three blocks
    of a decomposed PReLU each read the conv's output) into the last block, which then reverse-inlines
    into the register tile's write-out (``varg_out``)."""
    from tvm.s_tir import ScheduleError

    progress = True
    while progress:
        progress = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(block).name_hint in keep:
                continue
            try:
                sch.compute_inline(block)
                progress = True
                break
            except ScheduleError:
                continue


# Loop annotation that marks the loops this rule parallelised or vectorised as final: MetaSchedule's
# RewriteParallelVectorizeUnroll postprocessor stops at annotated loops; without it, it fuses the
# parallel loop with the tile loop below it (or the vector loop with the unrolled ones above it) and
# fails on every candidate.
KEEP_ANNOTATION = "effconv_keep"


def keep_loops(sch) -> None:
    """Annotate the outermost and innermost loop of every block with KEEP_ANNOTATION."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        for loop in {id(loop): loop for loop in (loops[:1] + loops[-1:])}.values():
            if KEEP_ANNOTATION not in sch.get(loop).annotations:
                sch.annotate(loop, KEEP_ANNOTATION, 1)


@register_rule(SCHEDULE_RULE, ["cpu", "arm_cpu"])
def schedule_varg_conv2d_cpu(sch, conv, knobs, variant="default"):
    annotations = sch.get(conv).annotations
    lanes, groups = int(annotations[LANES_ANNOTATION]), int(annotations[GROUPS_ANNOTATION])
    registers = int(annotations.get(REGISTERS_ANNOTATION, SIMD["avx2"][1]))
    pad = sch.get_sblock(PAD_BLOCK)

    inline_elementwise(sch, (PAD_BLOCK, CONV_BLOCK, OUT_BLOCK))
    parallel_outer(sch, pad, 2)  # n, c
    sch.vectorize(sch.get_loops(pad)[-1])

    n, y, x, k, rc, rr, rs = sch.get_loops(conv)
    group_vectors = int(sch.get(k).extent) // (groups * lanes)
    g, kvec, lane = sch.split(k, [groups, group_vectors, lanes])
    height, width = (int(sch.get(loop).extent) for loop in (y, x))
    kv0, yt0, xt0 = default_tile(group_vectors, height, width, registers)
    kt, kv = sch.split(kvec, knobs.tile(kvec, 2, [group_vectors // kv0, kv0], max_innermost=8))
    yo, yt = sch.split(y, knobs.tile(y, 2, [height // yt0, yt0], max_innermost=4))
    xo, xt = sch.split(x, knobs.tile(x, 2, [width // xt0, xt0], max_innermost=16))
    sch.reorder(n, g, kt, yo, xo, rc, rr, rs, yt, xt, kv, lane)
    sch.parallel(sch.fuse(n, g, kt, yo))

    # the register tile, channels innermost: one SIMD register per (position, weight vector)
    sch.set_scope(conv, 0, "local")
    writeback = sch.get_sblock(OUT_BLOCK)
    inline_consumers(sch, writeback)
    sch.reverse_compute_at(writeback, xo, preserve_unit_loops=True)
    for loop in sch.get_loops(writeback)[2:]:  # the tile's channels, rows, columns: registers
        sch.unroll(loop)
    for consumer in sch.get_consumers(writeback):  # blocks that could not be inlined
        parallel_outer(sch, consumer, 2)

    sch.vectorize(lane)
    for loop in (rr, rs, yt, xt, kv):
        sch.unroll(loop)
    init = sch.decompose_reduction(conv, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    keep_loops(sch)
