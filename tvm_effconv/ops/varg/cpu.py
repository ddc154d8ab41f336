"""The VarG schedules for LLVM CPU targets: x86 (AVX2, AVX-512, VNNI) and AArch64 NEON (with or without
dotprod): the grouped conv (float32, int8) and the fused separable unit (float32).

Each group is a small dense conv (``group_base`` input channels, ``group_out`` outputs), so the schedule
treats the groups as a batch: the parallel loop runs over (batch, group, channel tiles, row tiles), and
inside it a register tile of ``kv`` weight vectors (``lanes`` output channels of one group each) x
``yt`` x ``xt`` output positions accumulates over the group's channels and the kernel taps (unrolled):
one broadcast input value feeds ``kv`` vector FMAs, one weight vector ``yt * xt`` of them. The tile is
written once, through the fused epilogue (folded batch norm's shift, PReLU/ReLU, residual adds); on x86
it is transposed in registers first, so that the NCHW write-out stores rows of positions
(:func:`transpose_tile`).

The int8 grouped conv has the same tile with int32 accumulators; per step one dot instruction per
(four input channels, weight vector, position): ``sdot`` (dotprod), ``smull`` + pairwise adds (NEON
without dotprod), ``vpdpbusd`` (VNNI), ``pmaddubsw`` + ``pmaddwd`` (AVX2 / AVX-512, weights of at most 7
bits), else widening multiplies that LLVM vectorises; the dispatch picks it and annotates the block.

Knobs (defaults from :func:`default_tile`): the splits of the group's weight vectors, of the output
rows and of the output columns into (outer, register tile). The fused unit's rule:
:func:`schedule_varg_separable_cpu`.
"""

import functools

from tvm.target import codegen

from ...intrin import in_scope
from ...intrin import x86 as x86_intrin
from ...intrin.transpose import transpose_intrin
from ...schedule_rules import (
    REGISTER_SCOPE,
    RegisterBudget,
    divisors,
    inline_consumers,
    parallel_outer,
    register_rule,
    register_tile,
)
from ..dsconv.cpu import DOT_ANNOTATION, PLAIN
from .compute import (
    CONV_BLOCK,
    GROUPS_ANNOTATION,
    LANES_ANNOTATION,
    MID_BLOCK,
    OUT_BLOCK,
    OUT_LANES_ANNOTATION,
    PAD_BLOCK,
    POINTWISE_BLOCK,
    SCHEDULE_RULE,
    SEPARABLE_RULE,
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
    """(kv, yt, xt): the float kernel's register tile without a tuning record."""
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


def extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def tile_grouped_conv(sch, conv, lanes: int, groups: int, tiles):
    """Split and order the grouped conv's loops (n, y, x, k, rc, rr, rs, and ri, the four channels of a dot
    instruction, in the int8 compute) into (n, g, kt, yo, xo, rc, rr, rs, yt, xt, kv, lane[, ri]): the
    register tile of ``kv`` weight vectors x ``yt`` x ``xt`` positions innermost. ``tiles(kvec, y, x)``
    gives the factors of the group's weight vectors, the rows and the columns (outer, register tile).
    Returns the loops by name."""
    names = ("n", "y", "x", "k", "rc", "rr", "rs", "ri")[: len(sch.get(conv).iter_vars)]
    loops = dict(zip(names, sch.get_loops(conv)[-len(names):]))
    group_vectors = extent(sch, loops["k"]) // (groups * lanes)
    loops["g"], kvec, loops["lane"] = sch.split(loops.pop("k"), [groups, group_vectors, lanes])
    kv_factors, y_factors, x_factors = tiles(kvec, loops["y"], loops["x"])
    loops["kt"], loops["kv"] = sch.split(kvec, kv_factors)
    loops["yo"], loops["yt"] = sch.split(loops.pop("y"), y_factors)
    loops["xo"], loops["xt"] = sch.split(loops.pop("x"), x_factors)
    order = ("n", "g", "kt", "yo", "xo", "rc", "rr", "rs", "yt", "xt", "kv", "lane", "ri")
    sch.reorder(*(loops[name] for name in order if name in loops))
    return loops


def accumulate_in_registers(sch, block, writeback, at, reduction, unrolled, vector=None,
                            transpose_lanes=None) -> None:
    """``block``'s tile accumulates in registers (a small buffer in REGISTER_SCOPE) over the
    ``reduction`` loop and the ``unrolled`` tile loops, the ``vector`` loop (if given) vectorised;
    ``writeback`` (its consumer: bias, activation) runs once per tile, at loop ``at``, its tile loops
    unrolled. With ``transpose_lanes`` (lanes per register) and more than one position per tile row, the
    tile is first transposed in registers (:func:`transpose_tile`) and the write-out vectorised along the
    positions."""
    sch.set_scope(block, 0, REGISTER_SCOPE)
    depth = 1 + [sch.get(loop).same_as(sch.get(at)) for loop in sch.get_loops(block)].index(True)
    sch.reverse_compute_at(writeback, at, preserve_unit_loops=True)
    tile_loops = sch.get_loops(writeback)[depth:]  # an NCHW write-out's (n, k, y, x): positions last
    rows = extent(sch, tile_loops[-1])
    if transpose_lanes is not None and rows > 1:
        transpose_tile(sch, block, writeback, transpose_lanes, rows)
        sch.vectorize(tile_loops[-1])
        tile_loops = tile_loops[:-1]
    for loop in tile_loops:
        sch.unroll(loop)
    if vector is not None:  # before the reduction's init is split off: vectorize needs it in place
        sch.vectorize(vector)
    for loop in unrolled:
        sch.unroll(loop)
    init = sch.decompose_reduction(block, reduction)
    sch.vectorize(sch.get_loops(init)[-1])


def transpose_tile(sch, block, writeback, lanes: int, rows: int) -> None:
    """Copy ``block``'s register tile (n, y, x, k), channels innermost, into a second one (n, y, k, x),
    positions innermost, by in-register transposes of ``rows`` positions x ``lanes`` channels
    (:mod:`tvm_effconv.intrin.transpose`), so that ``writeback`` (NCHW) reads each channel's row of
    positions as one vector instead of one lane of each register: on x86 (AVX-512) the lane extracts run
    on the port of the second FMA unit."""
    accumulator = sch.get(block).writes[0].source
    index = [region.source.same_as(accumulator) for region in sch.get(writeback).reads].index(True)
    copy = sch.cache_read(writeback, index, accumulator.scope())  # lands in the tile loop, before writeback
    sch.transform_layout(copy, ("write", 0), lambda n, y, x, k: (n, y, k, x))
    *_, x, k = sch.get_loops(copy)
    kv, lane = sch.split(k, [None, lanes])
    sch.reorder(kv, x, lane)
    sch.unroll(kv)
    sch.tensorize(x, transpose_intrin(rows, lanes, str(accumulator.dtype), accumulator.scope()))


def prepare_input(sch) -> None:
    """Inline the fused elementwise blocks, and pad the input in parallel over (n, c), rows vectorised."""
    pad = sch.get_sblock(PAD_BLOCK)
    inline_elementwise(sch, (PAD_BLOCK, CONV_BLOCK, MID_BLOCK, POINTWISE_BLOCK, OUT_BLOCK))
    parallel_outer(sch, pad, 2)  # n, c
    sch.vectorize(sch.get_loops(pad)[-1])


def block_registers(sch, block) -> int:
    return int(sch.get(block).annotations.get(REGISTERS_ANNOTATION, SIMD["avx2"][1]))


def int8_tile_budget(intrinsic: str, registers: int) -> RegisterBudget:
    """The int8 kernel's tile: one int32 accumulator per (vector, position) and a broadcast input quad per
    position; weight vectors in registers on ARM (x86 reads them as memory operands); two registers for
    the dot instruction's temporaries (pmaddubsw's int16 pairs, smull's products)."""
    x86 = intrinsic in (x86_intrin.AVX2_DOT_8x4, x86_intrin.AVX512_DOT_16x4, x86_intrin.VNNI_DOT_16x4)
    return RegisterBudget(registers, 1, 0 if x86 else 1, 1, 2)


def schedule_varg_conv2d_cpu(sch, conv, knobs, variant="default", transposed_writeout=True):
    """The grouped conv, float (FMA) or int8 (the dot intrinsic the dispatch annotated, or plain
    widening multiplies that LLVM vectorises); the register tile transposed for the write-out where
    ``transposed_writeout`` (:func:`transpose_tile`)."""
    annotations = sch.get(conv).annotations
    lanes, groups = int(annotations[LANES_ANNOTATION]), int(annotations[GROUPS_ANNOTATION])
    intrinsic = str(annotations[DOT_ANNOTATION]) if DOT_ANNOTATION in annotations else None
    prepare_input(sch)

    _, y, x, k = sch.get_loops(conv)[:4]
    group_vectors = extent(sch, k) // (groups * lanes)
    height, width = extent(sch, y), extent(sch, x)
    registers = block_registers(sch, conv)
    budget = tile_budget(registers) if intrinsic is None else int8_tile_budget(intrinsic, registers)
    kv0, yt0, xt0 = register_tile(group_vectors, height, width, budget)

    def tiles(kvec, y, x):
        return (knobs.tile(kvec, 2, [group_vectors // kv0, kv0], max_innermost=8),
                knobs.tile(y, 2, [height // yt0, yt0], max_innermost=4),
                knobs.tile(x, 2, [width // xt0, xt0], max_innermost=16))

    loops = tile_grouped_conv(sch, conv, lanes, groups, tiles)
    sch.parallel(sch.fuse(*(loops[name] for name in ("n", "g", "kt", "yo"))))

    # the register tile, channels innermost: one SIMD register per (position, weight vector)
    writeback = sch.get_sblock(OUT_BLOCK)
    inline_consumers(sch, writeback)
    unrolled = [loops[name] for name in ("rr", "rs", "yt", "xt", "kv")]
    if intrinsic == PLAIN:  # int8 without a dot instruction: the quad's channels unrolled, lanes vectorised
        sch.reorder(loops["ri"], loops["lane"])
        unrolled.append(loops["ri"])
    vector = None if intrinsic not in (None, PLAIN) else loops["lane"]
    accumulate_in_registers(sch, conv, writeback, loops["xo"], loops["rc"], unrolled, vector,
                            lanes if transposed_writeout else None)
    if vector is None:
        sch.tensorize(loops["lane"], in_scope(intrinsic, REGISTER_SCOPE))
    for consumer in sch.get_consumers(writeback):  # blocks that could not be inlined
        parallel_outer(sch, consumer, 2)
    keep_loops(sch)


# Bytes of the separable unit's intermediate per spatial tile without a tuning record: a tile of
# ``varg_mid`` this size stays in L1/L2 between the grouped conv that writes it and the pointwise conv.
CACHE_TILE_BYTES = 64 * 1024
# Cache tiles the default asks for at least (where the rows allow): the tiles are the parallel loop, and
# one tile of a small layer (7 x 7 outputs) left every core but one idle: 2 threads ran slower than 1.
MIN_PARALLEL_TILES = 8


def default_separable_tile(group_vectors: int, out_vectors: int, height: int, width: int, mid_channels: int,
                           registers: int) -> dict:
    """The separable kernel's tiles without a tuning record: the grouped conv's register tile (kv, yt, xt)
    as :func:`default_tile` picks it, the pointwise conv's weight vectors per tile (the most that fit
    beside the same yt x xt positions), and the cache tile: whole rows (every column), as many as keep the
    intermediate within CACHE_TILE_BYTES and leave at least MIN_PARALLEL_TILES tiles (or one per row)."""
    budget = tile_budget(registers)
    kv, yt, xt = default_tile(group_vectors, height, width, registers)
    out_kv = max((d for d in divisors(out_vectors) if d <= 8 and budget.fits(d, yt, xt)), default=1)
    row_tiles = height // yt
    rows = max(d for d in divisors(row_tiles) if d == 1 or (d * yt * width * mid_channels * 4 <= CACHE_TILE_BYTES
                                                           and row_tiles // d >= min(MIN_PARALLEL_TILES, row_tiles)))
    return {
        "kv": [group_vectors // kv, kv],
        "out_kv": [out_vectors // out_kv, out_kv],
        "y": [height // (rows * yt), rows, yt],
        "x": [1, width // xt, xt],
    }


def schedule_varg_separable_cpu(sch, pointwise, knobs, variant="default", transposed_writeout=True):
    """The fused separable unit: per spatial (cache) tile, in parallel, the grouped conv writes the tile's
    intermediate for all channels (register tiles of kv vectors x yt x xt positions, activation applied
    as they are stored), then the pointwise conv reads it back from cache (register tiles of out_kv
    vectors x the same yt x xt positions) and writes the output with its bias and activation (NCHW; its
    tile transposed in registers first where ``transposed_writeout``).

    Knobs: the grouped conv's and the pointwise conv's weight vectors per register tile, and the rows and
    columns split three ways (cache tiles, register tiles per cache tile, register tile)."""
    annotations = sch.get(pointwise).annotations
    lanes, groups = int(annotations[LANES_ANNOTATION]), int(annotations[GROUPS_ANNOTATION])
    out_lanes = int(annotations[OUT_LANES_ANNOTATION])
    conv, mid, writeback = (sch.get_sblock(name) for name in (CONV_BLOCK, MID_BLOCK, OUT_BLOCK))
    prepare_input(sch)

    n, y, x, k, rm = sch.get_loops(pointwise)
    group_vectors = extent(sch, sch.get_loops(conv)[3]) // (groups * lanes)
    out_vectors, height, width, mid_channels = extent(sch, k) // out_lanes, extent(sch, y), extent(sch, x), extent(sch, rm)
    defaults = default_separable_tile(group_vectors, out_vectors, height, width, mid_channels, block_registers(sch, pointwise))
    y_factors = knobs.tile(y, 3, defaults["y"], max_innermost=4)
    x_factors = knobs.tile(x, 3, defaults["x"], max_innermost=16)
    yo, yi, yt = sch.split(y, y_factors)
    xo, xi, xt = sch.split(x, x_factors)
    kvec, lane = sch.split(k, [out_vectors, out_lanes])
    kt, kv = sch.split(kvec, knobs.tile(kvec, 2, defaults["out_kv"], max_innermost=8))
    # weight vectors outside the positions: a slice of the pointwise weights stays in L1 over the cache tile
    sch.reorder(n, yo, xo, kt, yi, xi, rm, yt, xt, kv, lane)
    tile = sch.fuse(n, yo, xo)
    sch.parallel(tile)
    inline_consumers(sch, writeback)
    accumulate_in_registers(sch, pointwise, writeback, xi, rm, [yt, xt, kv], lane,
                            out_lanes if transposed_writeout else None)

    # the cache tile's intermediate, all its channels, written by the grouped conv's register tiles
    sch.compute_at(mid, tile, preserve_unit_loops=True)
    sch.compute_at(conv, tile, preserve_unit_loops=True)
    def tiles(kvec, y, x):  # the register tile's positions are the pointwise conv's
        return knobs.tile(kvec, 2, defaults["kv"], max_innermost=8), [None, y_factors[2]], [None, x_factors[2]]

    loops = tile_grouped_conv(sch, conv, lanes, groups, tiles)
    accumulate_in_registers(sch, conv, mid, loops["xo"], loops["rc"],
                            [loops[name] for name in ("rr", "rs", "yt", "xt", "kv")], loops["lane"])
    # the intermediate is channels-last: its store is vectorised along the tile's channels
    sch.vectorize(sch.get_loops(mid)[-1])
    keep_loops(sch)


for _rule, _function in ((SCHEDULE_RULE, schedule_varg_conv2d_cpu), (SEPARABLE_RULE, schedule_varg_separable_cpu)):
    # x86 transposes the write-out's tile (see transpose_tile); NEON keeps the lane stores, which issue on
    # ports of their own there, and no ARM hardware measured the difference.
    register_rule(_rule, ["cpu"])(_function)
    register_rule(_rule, ["arm_cpu"])(functools.partial(_function, transposed_writeout=False))
