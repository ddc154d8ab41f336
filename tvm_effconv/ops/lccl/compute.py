"""LCCL inference as TE compute: the cheap conv (the mask) first, then the main conv only where the mask is
non-zero, with the ReLU / product epilogue fused.

The op (``torch.ops.effconv.lccl_conv2d``, BNs folded) computes, per output element::

    y[n, k, p, q] = relu(b[k] + sum_{c, r, s} W[k, c, r, s] * x_pad[n, c, p*sh + r*dh, q*sw + s*dw]) * mask[n, k', p, q]
    mask = relu(cheap_b + cheap conv)     (k' = 0 in "spatial" mode, k' = k in "channel" mode)

Stages (blocks), in order:

- ``lccl_pad``: the zero-padded input ``x_pad[n, c, H + 2 ph, W + 2 pw]``;
- ``lccl_cheap`` (reduction) and ``lccl_mask`` (bias + ReLU): "spatial" the R x S x C -> 1 conv with the
  main conv's stride and dilation; "channel" the 1 x 1 x C -> K conv read at the centre tap of each main
  window (an offset of ``dil * (R - 1) / 2`` into the padded input);
- ``lccl_main`` (reduction, annotated ``schedule_rule``): the main conv, its update guarded by ``if mask != 0``
  ("channel" mode: the mask of any lane of the weight vector; see :func:`guard_main_block`). The condition
  depends only on (n, [ko,] p, q), so once the schedule puts the reduction loops inside the position (and
  vector) loops, TVM's HoistIfThenElse pass lifts it out of them: one ``if`` around the whole reduction of a
  register tile;
- ``lccl_out``: ``mask > 0 ? relu(acc + b) * mask : 0`` (exact zeros where the mask is zero).

Weights are packed at compile time (:func:`pack_weights`) as ``[K / lanes, C, R, S, lanes]`` so that the
schedule vectorises over ``lanes`` output channels; ``lanes`` divides K (see :func:`lanes_for`).
``sparse=False`` drops the guard: the same kernel, dense (the benchmark's baseline).
"""

import functools
from dataclasses import dataclass

import numpy as np

from ...geometry import conv2d_output_size

SCHEDULE_RULE = "effconv_lccl_conv2d"
PAD_BLOCK = "lccl_pad"
CHEAP_BLOCK = "lccl_cheap"
MASK_BLOCK = "lccl_mask"
MAIN_BLOCK = "lccl_main"
OUT_BLOCK = "lccl_out"
MODE_ANNOTATION = "lccl_mode"
SPARSE_ANNOTATION = "lccl_sparse"
MODES = ("spatial", "channel")


@dataclass(frozen=True)
class LCCLShape:
    """Static geometry of one LCCL layer and its packed layout."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    mode: str
    lanes: int  # output channels per weight vector; divides out_channels

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"lccl_conv2d: mode={self.mode!r} is not allowed; expected one of {MODES}")
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
    def out_size(self) -> tuple[int, int]:
        return conv2d_output_size((self.height, self.width), self.kernel, self.stride, self.padding, self.dilation)

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


def lanes_for(out_channels: int, vector: int) -> int:
    """The widest power of two up to ``vector`` that divides ``out_channels``."""
    lanes = 1
    while lanes * 2 <= vector and out_channels % (lanes * 2) == 0:
        lanes *= 2
    return lanes


def pack_weights(shape: LCCLShape, weight: np.ndarray) -> np.ndarray:
    """(K, C, R, S) -> (K / lanes, C, R, S, lanes), float32."""
    k_, c_, r_, s_ = weight.shape
    return np.ascontiguousarray(
        weight.astype(np.float32).reshape(k_ // shape.lanes, shape.lanes, c_, r_, s_).transpose(0, 2, 3, 4, 1)
    )


def lccl_conv2d(shape: LCCLShape, x, main_weight, main_bias, cheap_weight, cheap_bias, sparse: bool = True,
                annotations=None):
    """TE tensors of the LCCL op. ``main_weight`` packed ``(K / lanes, C, R, S, lanes)``; ``main_bias`` (K,);
    ``cheap_weight`` as the op takes it (spatial ``(1, C, R, S)``, channel ``(K, C, 1, 1)``); ``cheap_bias``
    (1,) or (K,). Returns the output (N, K, P, Q) float32."""
    from tvm import te, tirx

    s = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel, s.stride, s.padding, s.dilation
    oh, ow = s.out_size
    lanes = s.lanes
    zero = tirx.const(0.0, "float32")

    def pad(n, c, h, w):
        inside = tirx.all(h >= ph, h < s.height + ph, w >= pw, w < s.width + pw)
        hh = tirx.min(tirx.max(h - ph, 0), s.height - 1)
        ww = tirx.min(tirx.max(w - pw, 0), s.width - 1)
        return tirx.if_then_else(inside, x[n, c, hh, ww], zero)

    x_pad = te.compute((s.batch, s.in_channels, s.height + 2 * ph, s.width + 2 * pw), pad, name=PAD_BLOCK)

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
    mask = te.compute(
        cheap.shape, lambda n, m, p, q: tirx.max(cheap[n, m, p, q] + cheap_bias[m], zero), name=MASK_BLOCK
    )
    c = te.reduce_axis((0, s.in_channels), name="c")
    r = te.reduce_axis((0, kh), name="r")
    q_ = te.reduce_axis((0, kw), name="s")
    main = te.compute(
        (s.batch, s.out_channels, oh, ow),
        lambda n, k, p, q: te.sum(
            main_weight[k // lanes, c, r, q_, k % lanes] * x_pad[n, c, p * sh + r * dh, q * sw + q_ * dw],
            axis=[c, r, q_],
        ),
        name=MAIN_BLOCK,
        attrs={
            "schedule_rule": SCHEDULE_RULE, MODE_ANNOTATION: s.mode, SPARSE_ANNOTATION: int(sparse),
            **(annotations or {}),
        },
    )
    channel = s.mode == "channel"

    def out(n, k, p, q):
        m = mask[n, k if channel else 0, p, q]
        return tirx.Select(m > zero, tirx.max(main[n, k, p, q] + main_bias[k], zero) * m, zero)

    return te.compute(main.shape, out, name=OUT_BLOCK)


def prim_func(shape: LCCLShape, x, main_weight, main_bias, cheap_weight, cheap_bias, sparse: bool = True,
              annotations=None):
    """The PrimFunc of :func:`lccl_conv2d` over these placeholders (arguments in this order, then the output),
    with the main block's update guarded by ``if gate > 0`` (see :func:`guard_main_block`)."""
    from tvm import te

    out = lccl_conv2d(shape, x, main_weight, main_bias, cheap_weight, cheap_bias, sparse, annotations)
    func = te.create_prim_func([x, main_weight, main_bias, cheap_weight, cheap_bias, out])
    return guard_main_block(func) if sparse else func


def guard_main_block(func):
    """Wrap the body of ``func``'s main block in ``if mask != 0`` (channel mode: the mask of any lane of the
    weight vector) (TE's ``where`` on a reduction is
    dropped by ``create_prim_func`` in TVM 0.27, so the condition is put in by hand). The block's init stays
    unconditional: the accumulators of a skipped position are 0, and the epilogue writes 0 there anyway."""
    from tvm import ir, s_tir, tirx

    sch = s_tir.Schedule(func)
    main = sch.get(sch.get_sblock(MAIN_BLOCK))
    mask = sch.get(sch.get_sblock(MASK_BLOCK)).writes[0].source
    n, k, p, q = (iv.var for iv in main.iter_vars[:4])
    zero = tirx.const(0.0, "float32")
    if int(mask.shape[1]) == 1:
        index = [[n, tirx.const(0, "int32"), p, q]]
    else:
        lanes = next(int(r.source.shape[-1]) for r in main.reads if len(r.source.shape) == 5)
        first = tirx.floordiv(k, lanes) * lanes
        index = [[n, first + lane, p, q] for lane in range(lanes)]
    condition = functools.reduce(tirx.Or, [tirx.BufferLoad(mask, i) > zero for i in index])
    region = [ir.Range.from_min_extent(n, 1), ir.Range.from_min_extent(index[0][1], len(index)),
              ir.Range.from_min_extent(p, 1), ir.Range.from_min_extent(q, 1)]
    reads = [*main.reads, tirx.BufferRegion(mask, region)]
    guarded = s_tir.SBlock(
        main.iter_vars, reads, main.writes, main.name_hint, tirx.IfThenElse(condition, main.body, None), main.init,
        main.alloc_buffers, main.match_buffers, main.annotations,
    )
    sch.state.replace(sch.get_sref(sch.get_sblock(MAIN_BLOCK)), guarded, {main: guarded})
    return sch.mod["main"]
