"""Default CPU schedules for legalized, fused Relax modules, applied when there are no tuning records.

TVM's default Relax pipeline for ``llvm`` targets schedules nothing: every PrimFunc runs as the loop
nest LegalizeOps wrote, and a 3x3 conv of 1x64x56x56 takes ~150 ms instead of ~3 ms. This module gives
every PrimFunc a deterministic schedule derived from its loop nest in milliseconds: no tuning, no
measurement, no dependence on function names.

* Injective producers are inlined into their consumer (as MetaSchedule's AutoInline does), except
  padding (it would be evaluated once per multiply-add), blocks much smaller than their consumer
  (batch norm's per-channel scale would be recomputed per pixel) and blocks with several consumers
  (softmax's ``exp``).
* Reductions with data reuse (conv2d of any group count, dense, matmul) get a register tile. The
  vector loop is a spatial loop along which every operand is contiguous, invariant, or a constant
  that can be re-laid out. For NCHW convs that is the output channel, so the weights are packed as
  ``[O/(k*v), I, kh, kw, k, v]`` (``v`` lanes) and image widths that fill no vector (28, 14, 7) do
  not matter. A second spatial loop along which the vector operand is invariant (the image width
  for convs, the batch for dense) is unrolled in the tile, so each vector load feeds several FMAs.
  The reduction loops run outside the tile, which accumulates in a ``local`` buffer that LLVM keeps
  in registers, and the fused epilogue (bias, residual add, relu) is applied to the tile right
  after. Tile sizes follow the target's SIMD width and register count (:class:`SimdProfile`).
  Short reductions without reuse (pooling, depthwise conv) keep the plain loop nest, which LLVM
  unrolls and vectorizes better than a register tile.
* The remaining elementwise loop nests get their innermost loop vectorized.
* MetaSchedule's LLVM postprocessors then fuse and parallelize the outer loops, unroll small inner
  loops, split reductions into init and update, and lay out the packed constants
  (``RewriteLayout``); on the Relax side that layout transform becomes a function of its own that
  FoldConstant evaluates, so packing costs nothing at run time.

MetaSchedule's own design space with fixed decisions was tried first and dropped: its ``SSRSRS``
tiling vectorizes the innermost output loop (the image width in NCHW) and accumulates in memory
(3x3 convs 2-3x slower than this), and creating a TuneContext imports every tensor intrinsic, over a
minute per process. ``bench/default_schedule.py`` measures the result against the unscheduled build
and PyTorch.

Tuning records take precedence: given a MetaSchedule ``database``, every PrimFunc with a record gets
it and the rest get the default; functions already marked ``tirx.is_scheduled`` are left alone.
A PrimFunc whose default schedule fails keeps its unscheduled body, which still builds, and its name
is returned.
"""

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.sym.pattern import detect_linear_equation
from tvm.target import codegen

from .build import SCHEDULED_ATTR, is_scheduled
from .schedule_rules import divisors

__all__ = ["SimdProfile", "apply_default_schedules", "default_schedule"]

logger = logging.getLogger(__name__)

OPAQUE_OP_PATTERN = 8  # relax OpPatternKind kOpaque

# MetaSchedule's CPU defaults for RewriteParallelVectorizeUnroll: parallel loops fused up to this many
# jobs per core, and inner loops up to this many steps unrolled (one of its sampled choices).
PARALLEL_JOBS_PER_CORE = 16
UNROLL_MAX_STEP = 64
# Widest odd-sized vector loop given to LLVM (MetaSchedule's max_vectorize_extent).
MAX_VECTORIZE_EXTENT = 64
# A producer this many times smaller than its consumer is computed once, not inlined.
BROADCAST_RATIO = 8
# Independent accumulators needed to hide FMA latency (about 4 cycles x 2 FMA ports).
MIN_ACCUMULATORS = 8
# Reductions up to this many steps, when no vector load can be reused (depthwise conv, pooling), are
# left to LLVM, which unrolls them and vectorizes the plain loop nest better than a register tile.
LLVM_UNROLLED_REDUCTION = 64

_has_if_then_else = tvm.get_global_func("s_tir.schedule.HasIfThenElse")


@dataclass(frozen=True)
class SimdProfile:
    """What the default tiles need to know about an LLVM target's SIMD unit."""

    vector_bits: int
    registers: int

    @classmethod
    def of(cls, target: tvm.target.Target) -> "SimdProfile":
        def has(feature):
            return bool(codegen.llvm_cpu_has_features(feature, target))

        if has("avx512f"):
            return cls(512, 32)
        if has("avx"):
            return cls(256, 16)
        if has("neon") or has("sve"):
            return cls(128, 32)
        return cls(128, 16)

    def lanes(self, dtype: str) -> int:
        return max(1, self.vector_bits // tvm.runtime.DataType(dtype).bits)


def _mark_scheduled(func: tirx.PrimFunc) -> tirx.PrimFunc:
    # Opaque to FuseOps: tvm.compile reruns it, and a fusion would replace the function by an
    # unscheduled merge.
    return func.with_attr("op_pattern", OPAQUE_OP_PATTERN).with_attr(SCHEDULED_ATTR, True)


# ---------------------------------------------------------------------------------------------
# Loop-nest analysis.


@dataclass
class _Iter:
    loop: LoopRV
    var: tirx.Var
    extent: int | None  # None: a symbolic (dynamic) extent
    spatial: bool


def _static(expr) -> int | None:
    return int(expr) if isinstance(expr, tirx.IntImm) else None


def _access_stride(indices, shape, var) -> float | None:
    """Element stride of ``var`` in a row-major buffer access; None if the access is not linear in it,
    infinity if it is linear but strided by a symbolic (dynamic) dimension."""
    stride, inner = 0, 1
    for index, dim in zip(reversed(list(indices)), reversed(list(shape))):
        coeffs = detect_linear_equation(index, [var])
        if len(coeffs) == 0 or not isinstance(coeffs[0], tirx.IntImm):
            return None
        if int(coeffs[0]) != 0:
            stride += abs(int(coeffs[0])) * inner
        inner *= _static(dim) or math.inf
    return stride


@dataclass(eq=False)  # identity: buffers are TVM expressions, == would build one
class _Operand:
    buffer: tirx.Var
    constant: bool  # a compile-time constant whose layout the schedule may choose
    strides: list[float | None]  # per iterator of the nest, see _access_stride


class _LoopNest:
    """A single-output block under a perfect loop nest with trivial bindings (what LegalizeOps writes)."""

    def __init__(self, sch: s_tir.Schedule, block_rv: SBlockRV, constants: list[tirx.Var]):
        self.block_rv = block_rv
        block = sch.get(block_rv)
        loops = sch.get_loops(block_rv)
        if not loops or len(block.writes) != 1:
            raise ValueError("not a single-output loop nest")
        realize = sch.get(loops[-1]).body
        if not isinstance(realize, s_tir.SBlockRealize) or len(loops) != len(block.iter_vars):
            raise ValueError("not a perfect loop nest")
        self.iters = []
        for loop, iter_var, value in zip(loops, block.iter_vars, realize.iter_values):
            loop_stmt = sch.get(loop)
            if not value.same_as(loop_stmt.loop_var):
                raise ValueError("non-trivial binding")
            self.iters.append(_Iter(loop, iter_var.var, _static(loop_stmt.extent), iter_var.iter_type == 0))
        write = block.writes[0]
        self.output = write.source
        self.output_indices = [r.min for r in write.region]
        self.dtype = str(write.source.ty.dtype)
        self.operands = [
            _Operand(
                read.source,
                any(read.source.same_as(c) for c in constants),
                [_access_stride([r.min for r in read.region], read.source.shape, it.var) for it in self.iters],
            )
            for read in block.reads
            if not read.source.same_as(write.source)  # a reduction reads its accumulator
        ]

    @property
    def spatial(self) -> list[_Iter]:
        return [it for it in self.iters if it.spatial]

    @property
    def reduction(self) -> list[_Iter]:
        return [it for it in self.iters if not it.spatial]

    def strides(self, it: _Iter) -> list[tuple[_Operand, float | None]]:
        i = self.iters.index(it)
        return [(op, op.strides[i]) for op in self.operands]

    def output_stride(self, it: _Iter) -> float | None:
        return _access_stride(self.output_indices, self.output.shape, it.var)

    def vectorizes(self, it: _Iter) -> bool:
        """Every operand is invariant or contiguous along ``it``, or a constant that can be packed so."""
        return all(s is not None and (s <= 1 or op.constant) for op, s in self.strides(it))

    def packs(self, it: _Iter) -> list[tirx.Var]:
        """The constants that vary along ``it``: packed, they give aligned vector loads."""
        return [op.buffer for op, s in self.strides(it) if op.constant and s != 0]


# ---------------------------------------------------------------------------------------------
# Tile sizes.


def _vector_unit(extent: int, lanes: int) -> int:
    """Width of one vector op along a loop: a full or half SIMD register if one divides the loop, else
    the largest divisor up to two registers (an odd width, which LLVM splits into a few ops)."""
    for width in (lanes, lanes // 2):
        if width > 1 and extent % width == 0:
            return width
    return max(d for d in divisors(extent) if d <= 2 * lanes)


def _elementwise_vector(extent: int, lanes: int) -> int:
    """Vector loop factor of an elementwise loop: one register if it divides the loop, else the widest
    divisor up to MAX_VECTORIZE_EXTENT lanes (padded rows such as 58 or 114 wide), split by LLVM."""
    if extent % lanes == 0:
        return lanes
    return max(d for d in divisors(extent) if d <= MAX_VECTORIZE_EXTENT)


def _register_tile(vector_extent: int, reuse_extent: int, lanes: int, registers: int) -> tuple[int, int, int]:
    """Register tile of a reduction: (vector loop factor, reuse loop factor, vector op width).

    An ``a x b`` tile (``a`` vector registers, ``b`` reuse steps) does ``a*b`` FMAs for ``a+b`` loads
    and needs ``a*b`` accumulators plus ``a`` vector operands and one broadcast in registers, with an
    eighth of the register file left for the scalars LLVM keeps for the next window step. Maximize
    FMAs per load while keeping enough independent accumulators to hide FMA latency; on ties, the
    longer reuse loop. Factors divide their loops, so there are no remainder tiles.
    """
    unit = _vector_unit(vector_extent, lanes)
    unit_registers = math.ceil(unit / lanes)

    def vectors(vt):
        return vt // unit * unit_registers

    candidates = [
        (vt, rt)
        for vt in divisors(vector_extent)
        if vt % unit == 0
        for rt in divisors(reuse_extent)
        if vectors(vt) * (rt + 1) + 1 <= registers - registers // 8
    ] or [(unit, 1)]

    def score(tile):
        vt, rt = tile
        accumulators = vectors(vt) * rt
        reuse = accumulators / (vectors(vt) + rt)
        latency = min(1.0, accumulators / MIN_ACCUMULATORS)
        return reuse * latency, rt

    vt, rt = max(candidates, key=score)
    return vt, rt, unit


# ---------------------------------------------------------------------------------------------
# Block schedules.


def _inline_elementwise(sch: s_tir.Schedule) -> None:
    """Inline injective blocks into their consumer, last block first."""
    for block_rv in reversed(sch.get_child_blocks(sch.get_sblock("root"))):
        block = sch.get(block_rv)
        consumers = [sch.get(c) for c in sch.get_consumers(block_rv)]
        if (
            any(iv.iter_type != 0 for iv in block.iter_vars)
            or _has_if_then_else(block)
            or len(consumers) != 1
            or _much_smaller(_domain_size(block), _domain_size(consumers[0]))
        ):
            continue
        try:
            sch.compute_inline(block_rv)
        except s_tir.ScheduleError:
            pass  # a producer that cannot be substituted into its consumer: keep it


def _domain_size(block: s_tir.SBlock) -> float:
    return math.prod(_static(iv.dom.extent) or math.inf for iv in block.iter_vars)


def _much_smaller(size: float, other: float) -> bool:
    return math.isfinite(size) and size * BROADCAST_RATIO <= other


def _schedule_reduction(sch: s_tir.Schedule, nest: _LoopNest, simd: SimdProfile) -> list[tirx.Var]:
    """Register-tile a reduction; returns the constants to pack for its vector loads."""
    lanes = simd.lanes(nest.dtype)
    candidates = [it for it in nest.spatial if (it.extent or 0) > 1 and nest.vectorizes(it)]
    if not candidates:
        return []  # e.g. global pooling over the contiguous axis: left to LLVM

    def preference(it):  # whole vectors, and aligned loads from a packed constant
        return it.extent % lanes == 0, bool(nest.packs(it)), nest.iters.index(it)

    vec = max(candidates, key=preference)
    # Reuse loop: the vector operands do not depend on it, so each vector load feeds it.extent FMAs.
    vector_operands = [op for op, s in nest.strides(vec) if s != 0]

    def feeds_vector_operands(it):
        return any(s != 0 for op, s in nest.strides(it) if op in vector_operands)

    reuse = [it for it in nest.spatial if it is not vec and (it.extent or 0) > 1 and not feeds_vector_operands(it)]
    reg = reuse[-1] if reuse else None
    if reg is None and math.prod(it.extent or math.inf for it in nest.reduction) <= LLVM_UNROLLED_REDUCTION:
        return []  # depthwise conv, pooling: LLVM unrolls the window and vectorizes the plain nest well
    vt, rt, unit = _register_tile(vec.extent, reg.extent if reg else 1, lanes, simd.registers)

    # The tile: reuse loop (unrolled), then vector ops (unrolled) of ``unit`` lanes (vectorized), so
    # that LLVM sees register-sized vectors and keeps the accumulators in registers.
    vec_loops = sch.split(vec.loop, [None, vt // unit, unit])
    reg_loops = sch.split(reg.loop, [None, rt]) if reg is not None else []
    tile_outer = {vec.var: vec_loops[0], **({reg.var: reg_loops[0]} if reg is not None else {})}
    # Loops the vector operand (the weights) depends on go outermost: each of its tiles is loaded once
    # and reused from cache by all the iterations of the others.
    spatial = sorted(nest.spatial, key=lambda it: not feeds_vector_operands(it))
    outer = [tile_outer.get(it.var, it.loop) for it in spatial]
    inner = reg_loops[1:] + vec_loops[1:]
    sch.reorder(*outer, *[it.loop for it in nest.reduction], *inner)
    for loop in inner[:-1]:
        sch.unroll(loop)
    sch.vectorize(inner[-1])

    # Accumulate the tile in a local buffer (registers) whose vector dimension is contiguous.
    writeback = sch.cache_write(nest.block_rv, 0, "local")
    sch.reverse_compute_at(writeback, outer[-1], preserve_unit_loops=True)
    vec_dims = [d for d, index in enumerate(nest.output_indices) if index.same_as(vec.var)]
    if vec_dims:
        ndim, dim = len(nest.output_indices), vec_dims[0]
        to_last = tirx.IndexMap.from_func(lambda *idx: [*idx[:dim], *idx[dim + 1 :], idx[dim]], ndim=ndim)
        sch.transform_layout(nest.block_rv, ("write", 0), to_last)
    _store_tile(sch, writeback, outer[-1])
    return nest.packs(vec)


def _store_tile(sch: s_tir.Schedule, writeback: SBlockRV, tile_loop: LoopRV) -> None:
    """Store the tile, through its elementwise epilogue when there is one (read from registers)."""
    consumers = sch.get_consumers(writeback)
    store = writeback
    if len(consumers) == 1:
        try:
            sch.reverse_compute_at(consumers[0], tile_loop, preserve_unit_loops=True)
            sch.compute_inline(writeback)
            store = consumers[0]
        except s_tir.ScheduleError:
            pass  # the epilogue stays a loop nest of its own, vectorized with the other elementwise ones
    innermost = sch.get_loops(store)[-1]
    if int(sch.get(innermost).extent) > 1:
        sch.vectorize(innermost)


def _vectorize_elementwise(sch: s_tir.Schedule, nest: _LoopNest, simd: SimdProfile) -> None:
    """Vectorize the innermost non-unit loop of an elementwise nest if the output is contiguous along it."""
    non_unit = [it for it in nest.iters if it.extent != 1]
    if not non_unit or non_unit[-1].extent is None or nest.output_stride(non_unit[-1]) != 1:
        return
    vec = non_unit[-1]
    _, vector_loop = sch.split(vec.loop, [None, _elementwise_vector(vec.extent, simd.lanes(nest.dtype))])
    sch.vectorize(vector_loop)


def _schedule_blocks(sch: s_tir.Schedule, simd: SimdProfile, constants: list[tirx.Var]) -> list[tirx.Var]:
    """Schedule every block at the root; returns the constants to pack for vector loads."""
    packed = []
    for block_rv in sch.get_child_blocks(sch.get_sblock("root")):
        try:
            nest = _LoopNest(sch, block_rv, constants)
        except ValueError:
            continue  # not a plain loop nest: the postprocessors still parallelize it
        if nest.reduction:
            packed += _schedule_reduction(sch, nest, simd)
        else:
            _vectorize_elementwise(sch, nest, simd)
    return packed


# ---------------------------------------------------------------------------------------------
# Per function and per module.


def default_schedule(
    func: tirx.PrimFunc, target: tvm.target.Target, constant_params: Sequence[int] = ()
) -> tirx.PrimFunc:
    """The default schedule of one PrimFunc (raises if it cannot be scheduled).

    ``constant_params`` are the indices of parameters that are compile-time constants (weights). The
    schedule may pack some of them: the returned function then starts with a
    ``meta_schedule.layout_rewrite_preproc`` block, which ``relax.transform.SplitLayoutRewritePreproc``
    moves into a function of its own for FoldConstant to evaluate.
    """
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    _inline_elementwise(sch)
    packed = _schedule_blocks(sch, SimdProfile.of(target), [func.params[i] for i in constant_params])
    cores = int(target.attrs.get("num-cores", os.cpu_count() or 1))
    root = sch.get_sblock("root")
    sch.annotate(root, "meta_schedule.parallel", PARALLEL_JOBS_PER_CORE * cores)
    sch.annotate(root, "meta_schedule.unroll_explicit", UNROLL_MAX_STEP)
    func = _postprocess(sch, [ms.postproc.RewriteParallelVectorizeUnroll(), ms.postproc.RewriteReductionBlock()])
    if not packed:
        return func
    # RewriteLayout packs the buffers named in "layout_free_buffers" in the order the loops read them.
    indices = [i for i, param in enumerate(func.params) if any(param.same_as(b) for b in packed)]
    sch = s_tir.Schedule(tvm.IRModule({"main": func.with_attr("layout_free_buffers", indices)}))
    return _postprocess(sch, [ms.postproc.RewriteLayout()]).without_attr("layout_free_buffers")


def _postprocess(sch: s_tir.Schedule, postprocs: list) -> tirx.PrimFunc:
    for postproc in postprocs:
        if not postproc.apply(sch):
            raise RuntimeError(f"{postproc} rejected the schedule")
    return sch.mod["main"]


def constant_params(mod: tvm.IRModule) -> dict[str, list[int]]:
    """For each PrimFunc, the parameters to which every Relax call site passes a constant."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    constant: dict[str, set[int]] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir) and isinstance(expr.args[1], relax.Tuple):
            here = {i for i, arg in enumerate(expr.args[1].fields) if isinstance(arg, tvm.ir.expr.GenericConst)}
            name = expr.args[0].name_hint
            constant[name] = constant[name] & here if name in constant else here

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return {name: sorted(indices) for name, indices in constant.items()}


def apply_default_schedules(
    mod: tvm.IRModule, target: tvm.target.Target, database: "ms.database.Database | None" = None
) -> tuple[tvm.IRModule, list[str]]:
    """Schedule every unscheduled PrimFunc of a legalized, fused Relax module.

    With a MetaSchedule ``database``, PrimFuncs that have a tuning record for ``target`` get it; the
    default schedule covers the rest. Returns the module and the names of the PrimFuncs left
    unscheduled because their default schedule failed.
    """
    if target.kind.name != "llvm":
        raise ValueError(f"default CPU schedules need an llvm target, not {target.kind.name}")
    scheduled, failed = {}, []  # by function name
    if database is not None:
        with target, database:
            tuned = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        scheduled = {
            gvar.name_hint: _mark_scheduled(func)
            for gvar, func in tuned.functions.items()
            if not func.same_as(mod[gvar.name_hint])
        }
    constants = constant_params(mod)
    for gvar, func in mod.functions.items():
        name = gvar.name_hint
        if name in scheduled or not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
            continue
        try:
            scheduled[name] = _mark_scheduled(default_schedule(func, target, constants.get(name, ())))
        except Exception as err:  # noqa: BLE001 - any failure leaves the function as it was, which builds
            logger.warning("no default schedule for %s: %s", name, str(err).strip().splitlines()[0])
            failed.append(name)
    mod = mod.clone()  # IRModule updates are in place; leave the caller's module as it was
    for name, func in scheduled.items():
        mod[name] = func
    if not any(constants.values()):
        return mod, failed
    # Constant weights the schedules packed: transform them once, at compile time, and drop the
    # then unused transform functions.
    mod = relax.transform.SplitLayoutRewritePreproc()(mod)
    mod = relax.transform.FoldConstant()(mod)
    return relax.transform.DeadCodeElimination()(mod), failed
