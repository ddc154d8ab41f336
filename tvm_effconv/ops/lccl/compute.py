"""LCCL inference as TE compute: the cheap conv (the mask) first, then the main conv only where the mask is
non-zero, with the ReLU / product epilogue fused.

The op (``torch.ops.effconv.lccl_conv2d``, BNs folded) computes, per output element::

    y[n, k, p, q] = relu(b[k] + sum_{c, r, s} W[k, c, r, s] * x_pad[n, c, p*sh + r*dh, q*sw + s*dw]) * mask[n, k', p, q]
    mask = relu(cheap_b + cheap conv)     (k' = 0 in "spatial" mode, k' = k in "channel" mode)

Stages common to every algorithm (blocks, in order):

- ``lccl_pad``: the zero-padded input ``x_pad[n, c, H + 2 ph, W + 2 pw]``;
- ``lccl_cheap`` (reduction) and ``lccl_mask`` (bias + ReLU): "spatial" the R x S x C -> 1 conv with the
  main conv's stride and dilation; "channel" the 1 x 1 x C -> K conv read at the centre tap of each main
  window (an offset of ``dil * (R - 1) / 2`` into the padded input);
- ``lccl_main`` (reduction, annotated ``schedule_rule``, ``lccl_mode``, ``lccl_algorithm`` and for "compact"
  ``lccl_rows`` and ``lccl_tile_vectors``, the register tile's): the main conv;
- ``lccl_out``: ``mask > 0 ? relu(acc + b) * mask : 0`` (exact zeros where the mask is zero).

The main conv has three forms (``LCCLShape.algorithm``; the op's dispatch picks one per target, see
:mod:`tvm_effconv.ops.lccl`):

- "skip": ``lccl_main[n, k, p, q]`` over every output element, its update guarded by ``if mask != 0``
  ("channel" mode: the mask of any lane of the weight vector; see :func:`_guard_skip`). The condition depends
  only on (n, [ko,] p, q), so once the schedule puts the reduction loops inside the position (and vector)
  loops it is invariant in them, and LLVM's loop unswitching lifts it out (TVM's HoistIfThenElse leaves
  conditions that load from a buffer in place): one test per tile, around its whole reduction;
- "dense": the same without the guard (the benchmarks' baseline);
- "compact": the active units are listed first, and the main conv is a dense GEMM over the listed rows:
  ``lccl_main[n, l, t, j]`` for the ``t``-th active unit of list ``l`` and its ``j``-th output channel, then
  ``lccl_out`` reads row ``rank(n, l, p, q)`` of it (a gather: the scatter back is free).

Compaction. A *unit* is what one mask decision covers: a position (n, p, q) in "spatial" mode (one list per
image, every output channel), a (position, weight vector) in "channel" mode (one list per image and weight
vector of ``lanes`` channels, active where any of its lanes' masks is non-zero, as the skip kernel decides;
``lanes`` is the SIMD width on CPUs, 1 on CUDA, which skips every zero element). The list is a two-level
exclusive prefix sum over the units in raster order, with the output rows as the first level:

- ``lccl_active[n, l, p, q]``: 1 where the unit is active;
- ``lccl_row_count[n, l, p]`` = sum_q active; ``lccl_row_offset[n, l, p]`` = sum_{p' < p} row_count, for
  p = 0 .. P (``row_offset[n, l, P]`` is the list's length, the *count*);
- ``lccl_row_prefix[n, l, p, q]`` = sum_{q' < q} active[n, l, p, q']: the unit's rank in the list is
  ``row_offset[p] + row_prefix[p, q]``;
- ``lccl_row_of[n, l, t]`` = #{p >= 1 : row_offset[p] <= t} and ``lccl_column_of[n, l, t]`` = #{q :
  row_offset[r] + row_prefix[r, q] + active[r, q] <= t} at r = row_of: the output position of list entry t
  (the inverse of the rank, by counting instead of scattering).

Every stage is a TE reduction with static bounds whose elements are independent (no scan carried from one
element to the next, no scatter): TE cannot express data-dependent loop bounds or stores, and this way every
stage stays a TE block that MetaSchedule can schedule, parallel on CPUs and one thread per element on CUDA
(no barriers). The price is O(P + Q) work per unit instead of a work-efficient scan's O(1): about 3 (P + Q)
integer operations per position against the conv's C R S K multiply-adds (on this host, 1 thread, scalar:
0.2-0.3 ms for a 3x3, 64 -> 64 layer at 56 x 56, a few % of its dense conv).

The lists are allocated for the worst case (every unit active): ``t`` runs over ``P Q`` rows rounded up to
``rows``, and the GEMM's update is guarded by ``t // rows * rows < count``: the guard is invariant in a tile
of ``rows`` rows (the schedule's register tile), so it is tested once per tile, above the tile's reduction,
and tiles past the count cost nothing but the test. Entries past the count point at a valid position (the
last row), so every load stays in bounds; nothing reads their results. With ``gather`` (the CPU schedule)
the input is copied channels-last (``lccl_pad_nhwc``) and the active rows' windows into a dense matrix
``lccl_gather[n, l, t, r, s, c]`` (guarded the same way), one contiguous run of S x C floats per window row,
and the GEMM reduces over (r, s, c) along it; without (CUDA, where the copy would cost a round trip through
memory), the GEMM reads ``x_pad`` through the list.

Weights are packed at compile time (:func:`pack_weights`) as ``[K / lanes, C, R, S, lanes]`` (``[K / lanes,
R, S, C, lanes]`` with the gather, in its reduction order) so that the schedule vectorises over ``lanes``
output channels; ``lanes`` divides K (see :func:`lanes_for`).
"""

import functools
from dataclasses import dataclass

import numpy as np

from ...geometry import ConvGeometry

SCHEDULE_RULE = "effconv_lccl_conv2d"
PAD_BLOCK = "lccl_pad"
CHEAP_BLOCK = "lccl_cheap"
MASK_BLOCK = "lccl_mask"
MAIN_BLOCK = "lccl_main"
OUT_BLOCK = "lccl_out"
ACTIVE_BLOCK = "lccl_active"
ROW_COUNT_BLOCK = "lccl_row_count"
ROW_OFFSET_BLOCK = "lccl_row_offset"
ROW_PREFIX_BLOCK = "lccl_row_prefix"
ROW_OF_BLOCK = "lccl_row_of"
COLUMN_OF_BLOCK = "lccl_column_of"
PAD_NHWC_BLOCK = "lccl_pad_nhwc"
GATHER_BLOCK = "lccl_gather"
# The compaction's stages, in order (each reads only the ones before it and the mask).
COMPACTION_BLOCKS = (ACTIVE_BLOCK, ROW_COUNT_BLOCK, ROW_OFFSET_BLOCK, ROW_PREFIX_BLOCK, ROW_OF_BLOCK, COLUMN_OF_BLOCK)
MODE_ANNOTATION = "lccl_mode"
ALGORITHM_ANNOTATION = "lccl_algorithm"
ROWS_ANNOTATION = "lccl_rows"  # "compact": the guard's granularity, which the schedule's register tile follows
VECTORS_ANNOTATION = "lccl_tile_vectors"  # "compact": the register tile's default weight vectors (a knob)
MODES = ("spatial", "channel")
ALGORITHMS = ("skip", "compact", "dense")


@dataclass(frozen=True)
class LCCLShape(ConvGeometry):
    """Static geometry of one LCCL layer, its packed layout and the algorithm of its main conv."""

    mode: str
    lanes: int  # output channels per weight vector; divides out_channels
    algorithm: str = "skip"
    rows: int = 1  # "compact": list entries per guard (the register tile's rows)
    tile_vectors: int = 1  # "compact": weight vectors of the default register tile (the schedule's knob)
    gather: bool = False  # "compact": copy the active rows' input windows into a dense matrix first

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"lccl_conv2d: mode={self.mode!r} is not allowed; expected one of {MODES}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"lccl_conv2d: algorithm={self.algorithm!r} is not allowed; expected one of {ALGORITHMS}")
        for name in ("rows", "tile_vectors"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"lccl_conv2d: {name}={value!r} is not allowed; expected an integer >= 1")
        if self.out_channels % self.lanes:
            raise ValueError(f"lccl_conv2d: lanes={self.lanes} must divide out_channels={self.out_channels}")
        if self.mode == "channel" and any(d * (k - 1) % 2 for k, d in zip(self.kernel, self.dilation)):
            raise ValueError(
                f"lccl_conv2d: kernel {self.kernel} with dilation {self.dilation} has no centre tap, which "
                "'channel' mode reads; dilation * (kernel - 1) must be even"
            )
        if min(self.out_size) < 1:
            raise ValueError(f"lccl_conv2d: input {self.height}x{self.width} is too small (output {self.out_size})")

    @property
    def vectors(self) -> int:
        return self.out_channels // self.lanes

    @property
    def mask_channels(self) -> int:
        return 1 if self.mode == "spatial" else self.out_channels

    @property
    def centre(self) -> tuple[int, int]:
        """Offset of the main window's centre tap from its corner, in the padded input."""
        return tuple(d * (k - 1) // 2 for k, d in zip(self.kernel, self.dilation))

    @property
    def lists(self) -> int:
        """Compaction lists per image: one ("spatial"), one per weight vector ("channel")."""
        return 1 if self.mode == "spatial" else self.vectors

    @property
    def list_channels(self) -> int:
        """Output channels a list entry covers: all K ("spatial"), a weight vector's lanes ("channel")."""
        return self.out_channels // self.lists

    @property
    def channels_last(self) -> bool:
        """Whether the main conv reduces over (r, s, c), along the gathered windows' rows (and the packed weights
        follow, so that a weight vector's reduction steps are contiguous)."""
        return self.algorithm == "compact" and self.gather

    @property
    def packed_weight_shape(self) -> tuple[int, ...]:
        taps = (*self.kernel, self.in_channels) if self.channels_last else (self.in_channels, *self.kernel)
        return (self.vectors, *taps, self.lanes)

    @property
    def list_rows(self) -> int:
        """Rows allocated per list: every output position, rounded up to a multiple of ``rows``."""
        positions = self.out_size[0] * self.out_size[1]
        return -(-positions // self.rows) * self.rows


def lanes_for(out_channels: int, vector: int) -> int:
    """The widest power of two up to ``vector`` that divides ``out_channels``."""
    lanes = 1
    while lanes * 2 <= vector and out_channels % (lanes * 2) == 0:
        lanes *= 2
    return lanes


def pack_weights(shape: LCCLShape, weight: np.ndarray) -> np.ndarray:
    """(K, C, R, S) -> (K / lanes, C, R, S, lanes), or (K / lanes, R, S, C, lanes) where the main conv reduces
    channels last (:attr:`LCCLShape.channels_last`); float32."""
    k_, c_, r_, s_ = weight.shape
    vectors = weight.astype(np.float32).reshape(k_ // shape.lanes, shape.lanes, c_, r_, s_)
    return np.ascontiguousarray(vectors.transpose((0, 3, 4, 2, 1) if shape.channels_last else (0, 2, 3, 4, 1)))


def lccl_conv2d(shape: LCCLShape, x, main_weight, main_bias, cheap_weight, cheap_bias, annotations=None):
    """TE tensors of the LCCL op. ``main_weight`` packed (:attr:`LCCLShape.packed_weight_shape`); ``main_bias`` (K,);
    ``cheap_weight`` as the op takes it (spatial ``(1, C, R, S)``, channel ``(K, C, 1, 1)``); ``cheap_bias``
    (1,) or (K,). Returns the output (N, K, P, Q) float32."""
    from tvm import te, tirx

    s = shape
    (ph, pw) = s.padding
    zero = tirx.const(0.0, "float32")

    def pad(n, c, h, w):
        inside = tirx.all(h >= ph, h < s.height + ph, w >= pw, w < s.width + pw)
        hh = tirx.min(tirx.max(h - ph, 0), s.height - 1)
        ww = tirx.min(tirx.max(w - pw, 0), s.width - 1)
        return tirx.if_then_else(inside, x[n, c, hh, ww], zero)

    x_pad = te.compute((s.batch, s.in_channels, s.height + 2 * ph, s.width + 2 * pw), pad, name=PAD_BLOCK)
    mask = _mask(s, x_pad, cheap_weight, cheap_bias)
    attrs = {
        "schedule_rule": SCHEDULE_RULE, MODE_ANNOTATION: s.mode, ALGORITHM_ANNOTATION: s.algorithm,
        **({ROWS_ANNOTATION: s.rows, VECTORS_ANNOTATION: s.tile_vectors} if s.algorithm == "compact" else {}),
        **(annotations or {}),
    }
    main_at = (_compact_conv if s.algorithm == "compact" else _direct_conv)(s, x_pad, mask, main_weight, attrs)
    channel = s.mode == "channel"

    def out(n, k, p, q):
        m = mask[n, k if channel else 0, p, q]
        return tirx.Select(m > zero, tirx.max(main_at(n, k, p, q) + main_bias[k], zero) * m, zero)

    return te.compute((s.batch, s.out_channels, *s.out_size), out, name=OUT_BLOCK)


def _mask(s: LCCLShape, x_pad, cheap_weight, cheap_bias):
    """relu(cheap conv + cheap bias): (N, 1, P, Q) "spatial", (N, K, P, Q) "channel"."""
    from tvm import te, tirx

    (kh, kw), (sh, sw), (dh, dw) = s.kernel, s.stride, s.dilation
    oh, ow = s.out_size
    c = te.reduce_axis((0, s.in_channels), name="c")
    if s.mode == "spatial":
        r = te.reduce_axis((0, kh), name="r")
        q_ = te.reduce_axis((0, kw), name="s")
        cheap = te.compute(
            (s.batch, 1, oh, ow),
            lambda n, m, p, q: te.sum(
                cheap_weight[m, c, r, q_] * x_pad[n, c, p * sh + r * dh, q * sw + q_ * dw], axis=[c, r, q_]
            ),
            name=CHEAP_BLOCK,
        )
    else:
        ch, cw = s.centre
        cheap = te.compute(
            (s.batch, s.out_channels, oh, ow),
            lambda n, m, p, q: te.sum(cheap_weight[m, c, 0, 0] * x_pad[n, c, p * sh + ch, q * sw + cw], axis=[c]),
            name=CHEAP_BLOCK,
        )
    zero = tirx.const(0.0, "float32")
    return te.compute(
        cheap.shape, lambda n, m, p, q: tirx.max(cheap[n, m, p, q] + cheap_bias[m], zero), name=MASK_BLOCK
    )


def _window_sum(s: LCCLShape, main_weight, k, tap):
    """sum_{c, r, s} W[k, c, r, s] * tap(c, r, s), over the packed weights; the reduction runs (c, r, s), or
    (r, s, c) where the shape is :attr:`~LCCLShape.channels_last`."""
    from tvm import te

    c = te.reduce_axis((0, s.in_channels), name="c")
    r = te.reduce_axis((0, s.kernel[0]), name="r")
    s_ = te.reduce_axis((0, s.kernel[1]), name="s")
    if s.channels_last:
        return te.sum(main_weight[k // s.lanes, r, s_, c, k % s.lanes] * tap(c, r, s_), axis=[r, s_, c])
    return te.sum(main_weight[k // s.lanes, c, r, s_, k % s.lanes] * tap(c, r, s_), axis=[c, r, s_])


def _direct_conv(s: LCCLShape, x_pad, mask, main_weight, attrs):
    """The "skip" / "dense" main conv over every output element; returns ``(n, k, p, q) -> its value``."""
    from tvm import te

    (sh, sw), (dh, dw) = s.stride, s.dilation
    main = te.compute(
        (s.batch, s.out_channels, *s.out_size),
        lambda n, k, p, q: _window_sum(
            s, main_weight, k, lambda c, r, s_: x_pad[n, c, p * sh + r * dh, q * sw + s_ * dw]
        ),
        name=MAIN_BLOCK,
        attrs=attrs,
    )
    return lambda n, k, p, q: main[n, k, p, q]


def compaction(s: LCCLShape, mask):
    """The compaction stages (see the module docstring): (active, row_offset, row_prefix, row_of, column_of)."""
    from tvm import te, tirx

    n_, lists = s.batch, s.lists
    oh, ow = s.out_size
    zero = tirx.const(0.0, "float32")

    def is_active(n, l, p, q):
        if s.mode == "spatial":
            return mask[n, 0, p, q] > zero
        return functools.reduce(tirx.Or, [mask[n, l * s.lanes + i, p, q] > zero for i in range(s.lanes)])

    active = te.compute(
        (n_, lists, oh, ow), lambda n, l, p, q: is_active(n, l, p, q).astype("int32"), name=ACTIVE_BLOCK
    )
    q_ = te.reduce_axis((0, ow), name="q_")
    row_count = te.compute(
        (n_, lists, oh), lambda n, l, p: te.sum(active[n, l, p, q_], axis=q_), name=ROW_COUNT_BLOCK
    )
    p_ = te.reduce_axis((0, oh), name="p_")
    row_offset = te.compute(
        (n_, lists, oh + 1), lambda n, l, p: te.sum(tirx.Select(p_ < p, row_count[n, l, p_], 0), axis=p_),
        name=ROW_OFFSET_BLOCK,
    )
    q_ = te.reduce_axis((0, ow), name="q_")
    row_prefix = te.compute(
        (n_, lists, oh, ow), lambda n, l, p, q: te.sum(tirx.Select(q_ < q, active[n, l, p, q_], 0), axis=q_),
        name=ROW_PREFIX_BLOCK,
    )
    p_ = te.reduce_axis((0, oh), name="p_")  # rows 1 .. P - 1 counted (an empty reduction where P = 1 is not built)
    row_of = te.compute(
        (n_, lists, s.list_rows),
        lambda n, l, t: te.sum(tirx.Select(tirx.And(p_ > 0, row_offset[n, l, p_] <= t), 1, 0), axis=p_),
        name=ROW_OF_BLOCK,
    )
    q_ = te.reduce_axis((0, ow), name="q_")

    def column_of(n, l, t):
        r = row_of[n, l, t]
        return te.sum(tirx.Select(row_offset[n, l, r] + row_prefix[n, l, r, q_] + active[n, l, r, q_] <= t, 1, 0),
                      axis=q_)

    column = te.compute((n_, lists, s.list_rows), column_of, name=COLUMN_OF_BLOCK)
    return active, row_offset, row_prefix, row_of, column


def _compact_conv(s: LCCLShape, x_pad, mask, main_weight, attrs):
    """The "compact" main conv: a GEMM over the listed units; returns ``(n, k, p, q) -> its value`` (the row of
    (n, p, q) in the list of k's vector)."""
    from tvm import te, tirx

    (sh, sw), (dh, dw) = s.stride, s.dilation
    kh, kw = s.kernel
    oh, ow = s.out_size
    _, row_offset, row_prefix, row_of, column_of = compaction(s, mask)

    def corner(n, l, t):
        """The padded-input corner of list entry t's window (entries past the count: the last row's)."""
        return row_of[n, l, t] * sh, tirx.min(column_of[n, l, t], ow - 1) * sw

    rows = (s.batch, s.lists, s.list_rows)
    if s.gather:
        # Channels last, so that a window row (S taps x C channels) is one contiguous run to copy and to stream.
        x_nhwc = te.compute((s.batch, *x_pad.shape[2:], s.in_channels), lambda n, h, w, c: x_pad[n, c, h, w],
                            name=PAD_NHWC_BLOCK)

        def window(n, l, t, r, s_, c):
            h, w = corner(n, l, t)
            return x_nhwc[n, h + r * dh, w + s_ * dw, c]

        windows = te.compute((*rows, kh, kw, s.in_channels), window, name=GATHER_BLOCK)

        def tap(n, l, t, c, r, s_):
            return windows[n, l, t, r, s_, c]
    else:
        def tap(n, l, t, c, r, s_):
            h, w = corner(n, l, t)
            return x_pad[n, c, h + r * dh, w + s_ * dw]

    main = te.compute(
        (*rows, s.list_channels),
        lambda n, l, t, j: _window_sum(
            s, main_weight, l * s.list_channels + j, lambda c, r, s_: tap(n, l, t, c, r, s_)
        ),
        name=MAIN_BLOCK,
        attrs=attrs,
    )

    def main_at(n, k, p, q):
        l, j = k // s.list_channels, k % s.list_channels
        return main[n, l, row_offset[n, l, p] + row_prefix[n, l, p, q], j]

    return main_at


def prim_func(shape: LCCLShape, x, main_weight, main_bias, cheap_weight, cheap_bias, annotations=None):
    """The PrimFunc of :func:`lccl_conv2d` over these placeholders (arguments in this order, then the output),
    with the guards of ``shape.algorithm`` put in (:func:`_guard_skip`, :func:`_guard_compact`)."""
    from tvm import s_tir, te

    out = lccl_conv2d(shape, x, main_weight, main_bias, cheap_weight, cheap_bias, annotations)
    sch = s_tir.Schedule(te.create_prim_func([x, main_weight, main_bias, cheap_weight, cheap_bias, out]))
    if shape.algorithm == "skip":
        _guard_skip(sch, shape)
    elif shape.algorithm == "compact":
        _guard_compact(sch, shape)
    return sch.mod["main"]


def _guard_skip(sch, s: LCCLShape):
    """The main block's update runs where ``mask != 0`` ("channel" mode: the mask of any lane of the weight
    vector)."""
    from tvm import tirx

    mask = _written(sch, MASK_BLOCK)
    zero = tirx.const(0.0, "float32")

    def condition(n, k, p, q, *_):
        first = tirx.const(0, "int32") if s.mode == "spatial" else tirx.floordiv(k, s.lanes) * s.lanes
        lanes = 1 if s.mode == "spatial" else s.lanes
        loads = [tirx.BufferLoad(mask, [n, first + lane, p, q]) for lane in range(lanes)]
        return functools.reduce(tirx.Or, [load > zero for load in loads]), _region(mask, [n, first, p, q], lanes)

    _guard(sch, MAIN_BLOCK, condition)


def _guard_compact(sch, s: LCCLShape):
    """The GEMM's update (and the gather) run for the tiles of ``rows`` list entries that start before the
    list's count."""
    from tvm import tirx

    row_offset = _written(sch, ROW_OFFSET_BLOCK)

    def condition(n, l, t, *_):
        index = [n, l, tirx.const(s.out_size[0], "int32")]
        count = tirx.BufferLoad(row_offset, index)
        return tirx.floordiv(t, s.rows) * s.rows < count, _region(row_offset, index, 1)

    for name in (GATHER_BLOCK, MAIN_BLOCK) if s.gather else (MAIN_BLOCK,):
        _guard(sch, name, condition)


def _written(sch, name):
    return sch.get(sch.get_sblock(name)).writes[0].source


def _region(buffer, index, extent_1: int):
    """The BufferRegion of one element at ``index``, ``extent_1`` elements along axis 1."""
    from tvm import ir, tirx

    return tirx.BufferRegion(buffer, [ir.Range.from_min_extent(i, extent_1 if axis == 1 else 1)
                                      for axis, i in enumerate(index)])


def _guard(sch, name, condition):
    """Wrap the body of block ``name`` in ``if condition(*iter_vars)``; ``condition`` also returns the region
    the test reads (TE's ``where`` on a reduction is dropped by ``create_prim_func`` in TVM 0.27, so the
    condition is put in by hand). A reduction's init stays unconditional: the accumulators of a skipped tile
    are 0, and nothing reads them as a result."""
    from tvm import s_tir, tirx

    rv = sch.get_sblock(name)
    block = sch.get(rv)
    test, region = condition(*(iv.var for iv in block.iter_vars))
    guarded = s_tir.SBlock(
        block.iter_vars, [*block.reads, region], block.writes, block.name_hint, tirx.IfThenElse(test, block.body, None),
        block.init, block.alloc_buffers, block.match_buffers, block.annotations,
    )
    sch.state.replace(sch.get_sref(rv), guarded, {block: guarded})
