"""DSConv inference as TE compute: activation quantization, and the block-integer convolution.

The layer (``tvm_effconv.nn.DSConv2d``, reference: its ``torch.ops.effconv.dsconv2d`` eager
implementation) computes, per output channel k and position p::

    y[k, p] = cds_b[k] + cds_s[k] * sum_{b, r, s} kds[k, b, r, s] * s_x * isum[k, b, r, s, p]
    isum[k, b, r, s, p] = sum_{c in block b} q[k, c, r, s] * x_q[c, p + (r, s)]      (int32, exact)

so a float multiply-add happens once per (k, block, r, s, p), BLK times less often than a MAC.
CDS and, in int8 mode, the activation scale fold into one float per (k, b, r, s) at compile time
(:func:`pack_constants`); block floating point activations carry a scale per (n, block, h, w).

Layouts, chosen so that the integer dot product is one SIMD instruction on every target:

- activations: ``x_packed[n, group, block, c4, h, w, 4]``, channels of a block in groups of four
  (zero-filled past the block's end), spatial padding applied; ``+ act_offset`` when the target's
  dot instruction wants unsigned activations (x86 ``pmaddubsw``/``vpdpbusd``), corrected exactly by
  subtracting ``act_offset * sum(q)`` per (k, b, r, s);
- weights: ``w_packed[ko, block, c4, r, s, lanes, 4]`` with output channels in vectors of ``lanes``;
  each group's output channels are padded to a multiple of ``lanes`` (sliced off at the end).
"""

from dataclasses import dataclass

import numpy as np

from ...geometry import ChannelVectors, GroupedConvGeometry

# Block annotation that routes the main block to the registered schedule rules.
SCHEDULE_RULE = "effconv_dsconv2d"
# The packed-output block whose name schedules look up.
ACCUMULATE_BLOCK = "dsconv2d_accumulate"
BLOCK_SUM_BLOCK = "dsconv2d_block_sum"
PACK_BLOCK = "dsconv2d_pack_input"


@dataclass(frozen=True)
class DSConvShape(ChannelVectors, GroupedConvGeometry):
    """Static geometry of one DSConv layer, and its packed layout for a given vector width."""

    block: int
    lanes: int  # output channels per weight vector

    @property
    def nblocks(self) -> int:
        return -(-self.group_in // self.block)

    @property
    def block_quads(self) -> int:  # groups of four channels per (padded) block
        return -(-min(self.block, self.group_in) // 4)


def pack_constants(shape: DSConvShape, codes, kds_scale, kds_bias, cds_scale, cds_bias, act_scale, act_offset):
    """Numpy, at compile time: the layer's constants in the kernel's layouts.

    Returns a dict with ``weights`` (int8 [KO, NB, C4, R, S, lanes, 4]), ``scale`` (float32
    [KO, NB, R, S, lanes]: kds * cds (* act_scale in int8 mode)), ``offset`` (int32, same shape:
    act_offset * sum of the block's codes; None when act_offset is 0), ``bias_scale`` (float32, same
    shape: the KDS bias times cds; None without KDS bias) and ``bias`` (float32 [padded K])."""
    s = shape
    kh, kw = s.kernel
    ko_total = s.padded_out // s.lanes
    weights = np.zeros((ko_total, s.nblocks, s.block_quads, kh, kw, s.lanes, 4), np.int8)
    scale = np.zeros((ko_total, s.nblocks, kh, kw, s.lanes), np.float32)
    offset = np.zeros_like(scale, dtype=np.int32)
    bias_scale = np.zeros_like(scale)
    bias = np.zeros(s.padded_out, np.float32)
    act = np.float32(1.0 if act_scale is None else act_scale)
    for k in range(s.out_channels):
        ko, lane = divmod(s.packed_channel(k), s.lanes)
        for b in range(s.nblocks):
            block_codes = codes[k, b * s.block : (b + 1) * s.block].astype(np.int8)  # (c, kh, kw)
            quads = np.zeros((s.block_quads * 4, kh, kw), np.int8)
            quads[: len(block_codes)] = block_codes
            weights[ko, b, :, :, :, lane, :] = quads.reshape(s.block_quads, 4, kh, kw).transpose(0, 2, 3, 1)
            offset[ko, b, :, :, lane] = act_offset * block_codes.astype(np.int32).sum(axis=0)
        scale[ko, :, :, :, lane] = kds_scale[k] * cds_scale[k] * act
        if kds_bias is not None:
            bias_scale[ko, :, :, :, lane] = kds_bias[k] * cds_scale[k] * act
        bias[s.packed_channel(k)] = cds_bias[k]
    return {
        "weights": weights,
        "scale": scale,
        "offset": offset if act_offset else None,
        "bias_scale": bias_scale if kds_bias is not None else None,
        "bias": bias,
    }


def quantize_int8(x, inv_scale: float, bits: int):
    """x_q = clamp(round_half_even(x * inv_scale)), as the reference does it."""
    from tvm import te, tirx

    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    inv = tirx.const(inv_scale, "float32")
    return te.compute(
        x.shape,
        lambda *i: tirx.Cast("int8", tirx.max(tirx.min(tirx.nearbyint(x(*i) * inv), float(hi)), float(lo))),
        name="dsconv2d_quantize",
        tag="elemwise",
    )


def quantize_bfp(x, groups: int, block: int, bits: int):
    """Block floating point: one power-of-two scale per (n, group, block, h, w), shared by the block's
    channels. Returns (x_q int8 [N, C, H, W], scale float32 [N, groups * nblocks, H, W])."""
    from tvm import te, tirx

    n_, c_, h_, w_ = (int(d) for d in x.shape)
    group_in = c_ // groups
    nblocks = -(-group_in // block)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def channel(gb, j):
        return (gb // nblocks) * group_in + (gb % nblocks) * block + j

    j = te.reduce_axis((0, block), name="j")
    peak = te.compute(
        (n_, groups * nblocks, h_, w_),
        lambda n, gb, h, w: te.max(
            tirx.if_then_else(
                (gb % nblocks) * block + j < group_in,
                tirx.abs(x[n, tirx.min(channel(gb, j), c_ - 1), h, w]),
                tirx.const(0.0, "float32"),
            ),
            axis=j,
        ),
        name="dsconv2d_block_peak",
    )

    def exponent(n, gb, h, w):
        bits_ = tirx.reinterpret("int32", peak[n, gb, h, w])
        e = tirx.bitwise_and(tirx.shift_right(bits_, 23), 255) - 126
        return tirx.max(e - (bits - 1), -126)

    scale = te.compute(
        peak.shape,
        lambda n, gb, h, w: tirx.reinterpret("float32", tirx.shift_left(exponent(n, gb, h, w) + 127, 23)),
        name="dsconv2d_block_scale",
    )
    codes = te.compute(
        x.shape,
        lambda n, c, h, w: tirx.Cast(
            "int8",
            tirx.max(
                tirx.min(tirx.nearbyint(x[n, c, h, w] / scale[n, (c // group_in) * nblocks + (c % group_in) // block, h, w]), float(hi)),
                float(lo),
            ),
        ),
        name="dsconv2d_quantize",
    )
    return codes, scale


def _clamp(index, extent: int):
    from tvm import tirx

    return tirx.min(tirx.max(index, 0), extent - 1)


def dsconv2d(
    shape: DSConvShape, x_q, weights, scale, bias, offset=None, bias_scale=None, x_scale=None, act_offset=0, annotations=None
):
    """The block-integer convolution on quantized activations ``x_q`` (int8 NCHW).

    ``weights``/``scale``/``offset``/``bias_scale``/``bias`` are the placeholders of
    :func:`pack_constants`' arrays; ``x_scale`` the per-block activation scales in bfp mode;
    ``annotations`` extra annotations of the main block for its schedule (e.g. the dot intrinsic).
    Returns float32 NCHW."""
    from tvm import te, tirx

    s = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel, s.stride, s.padding, s.dilation
    oh_, ow_ = s.out_size
    hp, wp = s.height + 2 * ph, s.width + 2 * pw
    packed_dtype = "uint8" if act_offset else "int8"

    def in_channel(g, b, c4, i):
        return g * s.group_in + b * s.block + c4 * 4 + i

    def pack(n, g, b, c4, h, w, i):
        inside = tirx.all(
            b * s.block + c4 * 4 + i < s.group_in,
            c4 * 4 + i < s.block,
            h >= ph, h < s.height + ph, w >= pw, w < s.width + pw,
        )
        value = x_q[n, tirx.min(in_channel(g, b, c4, i), s.in_channels - 1), _clamp(h - ph, s.height), _clamp(w - pw, s.width)]
        code = tirx.if_then_else(inside, value.astype("int32"), 0) + act_offset
        return code.astype(packed_dtype)

    x_packed = te.compute(
        (s.batch, s.groups, s.nblocks, s.block_quads, hp, wp, 4), pack, name=PACK_BLOCK
    )

    c4 = te.reduce_axis((0, s.block_quads), name="c4")
    i4 = te.reduce_axis((0, 4), name="i4")
    group_of = lambda ko: ko // s.group_vectors

    isum = te.compute(
        (s.batch, s.padded_out // s.lanes, s.nblocks, kh, kw, oh_, ow_, s.lanes),
        lambda n, ko, b, r, q, y, x, lane: te.sum(
            x_packed[n, group_of(ko), b, c4, y * sh + r * dh, x * sw + q * dw, i4].astype("int32")
            * weights[ko, b, c4, r, q, lane, i4].astype("int32"),
            axis=[c4, i4],
        ),
        name=BLOCK_SUM_BLOCK,
    )

    if bias_scale is not None:
        j = te.reduce_axis((0, s.block_quads * 4), name="j")
        x_sum = te.compute(
            (s.batch, s.groups, s.nblocks, hp, wp),
            lambda n, g, b, h, w: te.sum(
                x_packed[n, g, b, j // 4, h, w, j % 4].astype("int32") - act_offset, axis=j
            ),
            name="dsconv2d_input_sum",
        )

    rb = te.reduce_axis((0, s.nblocks), name="rb")
    rr = te.reduce_axis((0, kh), name="rr")
    rq = te.reduce_axis((0, kw), name="rq")

    def term(n, k, y, x):
        ko, lane = k // s.lanes, k % s.lanes
        integer = isum[n, ko, rb, rr, rq, y, x, lane]
        if offset is not None:
            integer = integer - offset[ko, rb, rr, rq, lane]
        value = scale[ko, rb, rr, rq, lane] * integer.astype("float32")
        if bias_scale is not None:
            h, w = y * sh + rr * dh, x * sw + rq * dw
            value = value + bias_scale[ko, rb, rr, rq, lane] * x_sum[n, group_of(ko), rb, h, w].astype("float32")
        if x_scale is not None:
            # Padding contributes a zero integer sum: any finite scale will do there.
            h, w = y * sh + rr * dh - ph, x * sw + rq * dw - pw
            value = value * x_scale[n, group_of(ko) * s.nblocks + rb, _clamp(h, s.height), _clamp(w, s.width)]
        return value

    accumulate = te.compute(
        (s.batch, s.padded_out, oh_, ow_),
        lambda n, k, y, x: te.sum(term(n, k, y, x), axis=[rb, rr, rq]),
        name=ACCUMULATE_BLOCK,
        attrs={"schedule_rule": SCHEDULE_RULE, **(annotations or {})},
    )
    out = te.compute(
        (s.batch, s.padded_out, oh_, ow_),
        lambda n, k, y, x: accumulate[n, k, y, x] + bias[k],
        name="dsconv2d_bias",
    )
    if not s.channels_padded:
        return out
    return te.compute(
        (s.batch, s.out_channels, oh_, ow_),
        lambda n, k, y, x: out[n, (k // s.group_out) * s.group_vectors * s.lanes + k % s.group_out, y, x],
        name="dsconv2d_unpad",
    )
