"""The VarG grouped convolution (fixed input channels per group) and the fused separable unit as TE
compute, float32.

A variable group conv has ``groups = C / group_base`` groups of ``group_base`` (8, 16, 32) input
channels and ``group_out`` (group_base * factor, factor 1 or 2) output channels each: a batch of
``groups`` small dense convs. The kernel vectorises across a group's output channels:

- input: NCHW, zero padding applied by a first stage (``varg_pad``; the fused elementwise producers
  of the input are inlined into it by the schedules);
- weights: ``w_packed[kv, c, r, s, lanes]``, output channels in vectors of ``lanes``, vector kv
  (channels kv * lanes ...) belonging to group kv // (group_out / lanes): ``group_out`` is a multiple of
  ``lanes`` (the dispatch picks such a width); batch norm scales folded in at compile time
  (:func:`pack_weights`);
- output: the main block ``varg_conv`` accumulates NHWC, (n, y, x, k) with k = (g * GV + ko) * lanes +
  lane, reducing over (c, r, s): the schedules keep a tile of it in registers (channels innermost: one
  SIMD register per position and weight vector); ``varg_out`` writes it NCHW, adding the bias (a folded
  batch norm's shift, the conv's bias). FuseOps appends the activation (PReLU, ReLU) and residual adds,
  which the schedules inline into ``varg_out``, computed per register tile.

The separable unit (:func:`varg_separable`) continues the same grouped accumulation with ``varg_mid``
(bias and activation, NHWC: the intermediate), the pointwise conv ``varg_pointwise`` (NHWC, output
channels in vectors of ``out_lanes``, reducing over the intermediate's channels) and ``varg_out``
(bias, activation, NCHW). Its schedules compute the intermediate per spatial tile into a small buffer
(cache or shared memory) and run the pointwise conv on it straight away.
"""

from dataclasses import dataclass

import numpy as np

from ...geometry import GroupedConvGeometry

SCHEDULE_RULE = "effconv_varg_conv2d"
CONV_BLOCK = "varg_conv"
PAD_BLOCK = "varg_pad"
OUT_BLOCK = "varg_out"
LANES_ANNOTATION = "varg_lanes"
GROUPS_ANNOTATION = "varg_groups"
# The fused separable unit (:func:`varg_separable`).
SEPARABLE_RULE = "effconv_varg_separable"
MID_BLOCK = "varg_mid"
POINTWISE_BLOCK = "varg_pointwise"
OUT_LANES_ANNOTATION = "varg_out_lanes"
ACTIVATIONS = ("prelu", "relu", "none")

GROUP_BASES = (8, 16, 32)


@dataclass(frozen=True)
class VarGShape(GroupedConvGeometry):
    """Static geometry of one grouped conv and its packed weight layout."""

    lanes: int  # output channels per weight vector

    def __post_init__(self):
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"groups={self.groups} must divide in_channels={self.in_channels} and "
                f"out_channels={self.out_channels}"
            )
        if self.group_out % self.lanes:
            raise ValueError(
                f"lanes={self.lanes} must divide the output channels per group ({self.group_out})"
            )

    @property
    def padded_size(self) -> tuple[int, int]:
        return self.height + 2 * self.padding[0], self.width + 2 * self.padding[1]

    @property
    def macs(self) -> int:
        oh, ow = self.out_size
        return self.batch * self.out_channels * oh * ow * self.group_in * self.kernel[0] * self.kernel[1]


def pack_weights(shape: VarGShape, weight: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Numpy, at compile time: the PyTorch weight (K, C/g, R, S), times a per-output-channel ``scale``
    (a folded batch norm) if given, as float32 ``[K / lanes, c, r, s, lanes]``."""
    s = shape
    w = weight.astype(np.float64 if scale is not None else np.float32)
    if scale is not None:
        w = w * np.asarray(scale, np.float64)[:, None, None, None]
    kh, kw = s.kernel
    w = w.astype(np.float32).reshape(s.out_channels // s.lanes, s.lanes, s.group_in, kh, kw)
    return np.ascontiguousarray(w.transpose(0, 2, 3, 4, 1))


def _clamp(index, extent: int):
    from tvm import tirx

    return tirx.min(tirx.max(index, 0), extent - 1)


def _pad(shape: VarGShape, x):
    """The zero-padded input (float32 NCHW), a stage of its own: the schedules inline the fused
    elementwise producers of ``x`` into it and keep the padding test out of the multiply-adds."""
    from tvm import te, tirx

    s = shape
    ph, pw = s.padding

    def pad(n, c, h, w):
        inside = tirx.all(h >= ph, h < s.height + ph, w >= pw, w < s.width + pw)
        value = x[n, c, _clamp(h - ph, s.height), _clamp(w - pw, s.width)]
        return tirx.if_then_else(inside, value, tirx.const(0.0, "float32"))

    return te.compute((s.batch, s.in_channels, *s.padded_size), pad, name=PAD_BLOCK)


def _grouped_accumulate(shape: VarGShape, padded, weights, attrs: dict):
    """``varg_conv``: the grouped conv accumulated NHWC, (n, y, x, k), reducing over (c, r, s)."""
    from tvm import te

    s = shape
    (kh, kw), (sh, sw), (dh, dw) = s.kernel, s.stride, s.dilation
    rc = te.reduce_axis((0, s.group_in), name="rc")
    rr = te.reduce_axis((0, kh), name="rr")
    rs = te.reduce_axis((0, kw), name="rs")

    def conv(n, y, xx, k):
        return te.sum(
            padded[n, k // s.group_out * s.group_in + rc, y * sh + rr * dh, xx * sw + rs * dw]
            * weights[k // s.lanes, rc, rr, rs, k % s.lanes],
            axis=[rc, rr, rs],
        )

    attrs = {LANES_ANNOTATION: s.lanes, GROUPS_ANNOTATION: s.groups, **attrs}
    return te.compute((s.batch, *s.out_size, s.out_channels), conv, name=CONV_BLOCK, attrs=attrs)


def varg_conv2d(shape: VarGShape, x, weights, bias=None, annotations=None):
    """The grouped conv of ``x`` (float32 NCHW) with packed ``weights`` (placeholder of
    :func:`pack_weights`' array) and an optional per-channel ``bias`` [K]. Returns float32 NCHW."""
    from tvm import te

    s = shape
    acc = _grouped_accumulate(shape, _pad(shape, x), weights, {"schedule_rule": SCHEDULE_RULE, **(annotations or {})})

    def out(n, k, y, xx):
        return acc[n, y, xx, k] if bias is None else acc[n, y, xx, k] + bias[k]

    return te.compute((s.batch, s.out_channels, *s.out_size), out, name=OUT_BLOCK)


def activation(kind: str, value, slope=None, channel=None):
    """``kind`` of ACTIVATIONS applied to ``value`` (TE expression) of ``channel``: PReLU with the
    per-channel ``slope`` placeholder, ReLU, or none."""
    from tvm import tirx

    zero = tirx.const(0.0, "float32")
    if kind == "prelu":
        # max(v, 0) + slope * min(v, 0) equals PyTorch's v > 0 ? v : slope * v exactly, without a branch:
        # the schedules' write-outs are unrolled scalar code, where LLVM turns a select into a branch per
        # element (mispredicted on signs at random: the PReLU unit ran 1.9x slower than without it).
        return tirx.max(value, zero) + slope[channel] * tirx.min(value, zero)
    if kind == "relu":
        return tirx.max(value, zero)
    if kind == "none":
        return value
    raise ValueError(f"activation={kind!r} is not allowed; activation must be one of {ACTIVATIONS}")


@dataclass(frozen=True)
class SeparableShape:
    """The separable unit: the grouped conv ``conv`` (C -> M) and the pointwise conv M -> ``out_channels``,
    its output channels in vectors of ``out_lanes``."""

    conv: VarGShape
    out_channels: int
    out_lanes: int

    def __post_init__(self):
        if self.out_channels % self.out_lanes:
            raise ValueError(f"out_lanes={self.out_lanes} must divide out_channels={self.out_channels}")

    @property
    def mid_channels(self) -> int:
        return self.conv.out_channels

    @property
    def macs(self) -> int:
        oh, ow = self.conv.out_size
        return self.conv.macs + self.conv.batch * oh * ow * self.mid_channels * self.out_channels


def pack_pointwise_weights(shape: SeparableShape, weight: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Numpy, at compile time: the pointwise weight (K, M, 1, 1), times a per-output-channel ``scale``
    if given, as float32 ``[K / out_lanes, M, out_lanes]``."""
    w = weight.reshape(shape.out_channels, shape.mid_channels).astype(np.float64)
    if scale is not None:
        w = w * np.asarray(scale, np.float64)[:, None]
    w = w.astype(np.float32).reshape(shape.out_channels // shape.out_lanes, shape.out_lanes, shape.mid_channels)
    return np.ascontiguousarray(w.transpose(0, 2, 1))


def varg_separable(
    shape: SeparableShape, x, group_weights, group_bias, pointwise_weights, pointwise_bias,
    group_activation: str, pointwise_activation: str, group_slope=None, pointwise_slope=None, annotations=None,
):
    """The fused separable unit on ``x`` (float32 NCHW): the grouped conv (packed ``group_weights``, batch
    norm folded: ``group_bias``) accumulated NHWC (``varg_conv``), its activation applied as it is stored
    (``varg_mid``, the intermediate the schedules keep in cache per spatial tile), the pointwise conv over
    the intermediate's channels (``varg_pointwise``, NHWC, packed ``pointwise_weights``
    [K / out_lanes, M, out_lanes]) and the write-out with ``pointwise_bias`` and the last activation
    (``varg_out``, NCHW). Returns float32 NCHW."""
    from tvm import te

    s, g = shape, shape.conv
    oh, ow = g.out_size
    acc = _grouped_accumulate(g, _pad(g, x), group_weights, {})
    mid = te.compute(
        acc.shape,
        lambda n, y, xx, m: activation(group_activation, acc[n, y, xx, m] + group_bias[m], group_slope, m),
        name=MID_BLOCK,
    )
    rm = te.reduce_axis((0, s.mid_channels), name="rm")
    pointwise = te.compute(
        (g.batch, oh, ow, s.out_channels),
        lambda n, y, xx, k: te.sum(mid[n, y, xx, rm] * pointwise_weights[k // s.out_lanes, rm, k % s.out_lanes], axis=rm),
        name=POINTWISE_BLOCK,
        attrs={"schedule_rule": SEPARABLE_RULE, LANES_ANNOTATION: g.lanes, GROUPS_ANNOTATION: g.groups,
               OUT_LANES_ANNOTATION: s.out_lanes, **(annotations or {})},
    )
    return te.compute(
        (g.batch, s.out_channels, oh, ow),
        lambda n, k, y, xx: activation(pointwise_activation, pointwise[n, y, xx, k] + pointwise_bias[k], pointwise_slope, k),
        name=OUT_BLOCK,
    )


def pack_int8_weights(shape: VarGShape, codes: np.ndarray, act_offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Numpy, at compile time: int8 weight ``codes`` (K, C/g, R, S) as ``[K / lanes, C/g / 4, R, S, lanes, 4]``
    (four input channels per dot instruction; C/g is a multiple of 4), and the int32 correction
    ``act_offset * sum(codes[k])`` per output channel [K] for activations stored with that offset."""
    s = shape
    kh, kw = s.kernel
    w = codes.astype(np.int8).reshape(s.out_channels // s.lanes, s.lanes, s.group_in // 4, 4, kh, kw)
    packed = np.ascontiguousarray(w.transpose(0, 2, 4, 5, 1, 3))
    return packed, act_offset * codes.astype(np.int32).reshape(s.out_channels, -1).sum(axis=1).astype(np.int32)


def varg_qconv2d(shape: VarGShape, x_q, weights, scale, bias, offset=None, act_offset: int = 0, annotations=None):
    """The int8 grouped conv of ``x_q`` (int8 NCHW) with :func:`pack_int8_weights`' ``weights``:

    - ``varg_pad``: the zero-padded input in quads of channels, ``x_packed[n, g, c4, h, w, 4]``, plus
      ``act_offset`` (uint8) where the dot instruction wants unsigned activations (x86);
    - ``varg_conv``: int32 NHWC accumulation over (c4, r, s, i4): one dot instruction per (four channels,
      weight vector, position), exact;
    - ``varg_out``: ``scale[k] * (acc - offset[k]) + bias[k]`` (float32 NCHW): the offset correction is
      integer, so the only rounding is that of one float multiply-add.

    ``scale`` [K] is act_scale * weight_scale (and a folded batch norm's scale), ``bias`` [K]."""
    from tvm import te, tirx

    s = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel, s.stride, s.padding, s.dilation
    packed_dtype = "uint8" if act_offset else "int8"

    def pack(n, g, c4, h, w, i):
        inside = tirx.all(h >= ph, h < s.height + ph, w >= pw, w < s.width + pw)
        value = x_q[n, g * s.group_in + c4 * 4 + i, _clamp(h - ph, s.height), _clamp(w - pw, s.width)]
        return (tirx.if_then_else(inside, value.astype("int32"), 0) + act_offset).astype(packed_dtype)

    x_packed = te.compute((s.batch, s.groups, s.group_in // 4, *s.padded_size, 4), pack, name=PAD_BLOCK)
    rc = te.reduce_axis((0, s.group_in // 4), name="rc")
    rr = te.reduce_axis((0, kh), name="rr")
    rs = te.reduce_axis((0, kw), name="rs")
    ri = te.reduce_axis((0, 4), name="ri")

    def conv(n, y, xx, k):
        return te.sum(
            x_packed[n, k // s.group_out, rc, y * sh + rr * dh, xx * sw + rs * dw, ri].astype("int32")
            * weights[k // s.lanes, rc, rr, rs, k % s.lanes, ri].astype("int32"),
            axis=[rc, rr, rs, ri],
        )

    attrs = {"schedule_rule": SCHEDULE_RULE, LANES_ANNOTATION: s.lanes, GROUPS_ANNOTATION: s.groups, **(annotations or {})}
    acc = te.compute((s.batch, *s.out_size, s.out_channels), conv, name=CONV_BLOCK, attrs=attrs)

    def out(n, k, y, xx):
        integer = acc[n, y, xx, k] if offset is None else acc[n, y, xx, k] - offset[k]
        return scale[k] * integer.astype("float32") + bias[k]

    return te.compute((s.batch, s.out_channels, *s.out_size), out, name=OUT_BLOCK)
