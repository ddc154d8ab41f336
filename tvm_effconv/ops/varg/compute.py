"""The VarG grouped convolution (fixed input channels per group) as TE compute, float32.

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
"""

from dataclasses import dataclass

import numpy as np

from ...geometry import conv2d_output_size

SCHEDULE_RULE = "effconv_varg_conv2d"
CONV_BLOCK = "varg_conv"
PAD_BLOCK = "varg_pad"
OUT_BLOCK = "varg_out"
LANES_ANNOTATION = "varg_lanes"
GROUPS_ANNOTATION = "varg_groups"

GROUP_BASES = (8, 16, 32)


@dataclass(frozen=True)
class VarGShape:
    """Static geometry of one grouped conv and its packed weight layout."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
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
    def group_in(self) -> int:
        return self.in_channels // self.groups

    @property
    def group_out(self) -> int:
        return self.out_channels // self.groups

    @property
    def group_vectors(self) -> int:
        return self.group_out // self.lanes

    @property
    def out_size(self) -> tuple[int, int]:
        return conv2d_output_size((self.height, self.width), self.kernel, self.stride, self.padding, self.dilation)

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


def varg_conv2d(shape: VarGShape, x, weights, bias=None, annotations=None):
    """The grouped conv of ``x`` (float32 NCHW) with packed ``weights`` (placeholder of
    :func:`pack_weights`' array) and an optional per-channel ``bias`` [K]. Returns float32 NCHW."""
    from tvm import te, tirx

    s = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel, s.stride, s.padding, s.dilation
    oh, ow = s.out_size
    hp, wp = s.padded_size

    def pad(n, c, h, w):
        inside = tirx.all(h >= ph, h < s.height + ph, w >= pw, w < s.width + pw)
        value = x[n, c, _clamp(h - ph, s.height), _clamp(w - pw, s.width)]
        return tirx.if_then_else(inside, value, tirx.const(0.0, "float32"))

    padded = te.compute((s.batch, s.in_channels, hp, wp), pad, name=PAD_BLOCK)

    rc = te.reduce_axis((0, s.group_in), name="rc")
    rr = te.reduce_axis((0, kh), name="rr")
    rs = te.reduce_axis((0, kw), name="rs")

    def conv(n, y, xx, k):
        return te.sum(
            padded[n, k // s.group_out * s.group_in + rc, y * sh + rr * dh, xx * sw + rs * dw]
            * weights[k // s.lanes, rc, rr, rs, k % s.lanes],
            axis=[rc, rr, rs],
        )

    acc = te.compute(
        (s.batch, oh, ow, s.out_channels),
        conv,
        name=CONV_BLOCK,
        attrs={"schedule_rule": SCHEDULE_RULE, LANES_ANNOTATION: s.lanes, GROUPS_ANNOTATION: s.groups,
               **(annotations or {})},
    )

    def out(n, k, y, xx):
        return acc[n, y, xx, k] if bias is None else acc[n, y, xx, k] + bias[k]

    return te.compute((s.batch, s.out_channels, oh, ow), out, name=OUT_BLOCK)
