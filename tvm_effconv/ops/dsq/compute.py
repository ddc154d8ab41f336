"""DSQ inference (``effconv::qconv2d``) as TE compute: activation codes, bit packing, the bit-serial
integer convolution and the dequantizing epilogue.

With unsigned activation codes qa in [0, 2^ab - 1] and signed weight codes qw in [-2^(wb-1), 2^(wb-1) - 1],
the kernel works on the unsigned weight codes uw = qw + 2^(wb-1), split into bit planes:

    sum qa * uw = sum_{i < ab, j < wb} 2^(i+j) * popcount(a_i & w_j)      (a_i, w_j: bit planes,
                                                                          packed along channels)
    acc = sum qa * qw = sum qa * uw - 2^(wb-1) * act_sum                  (act_sum = sum qa)

and the float output (see :mod:`tvm_effconv.nn.dsq`) is, per output channel k,

    y = sa * sw[k] * (sum qa * uw - zu[k] * act_sum) + correction[k, p] + bias[k],   zu = zw + 2^(wb-1)

where ``correction`` sums sa * za * sw[k] * (zu[k] * C/g - sum_c uw) over the window's taps inside the
image; it is non-zero only when the activation zero point za is (the image is zero-padded in the
float domain, so taps on the padding add nothing at all).

Layouts (``word_bits`` channels per machine word, ``chunk`` words per SIMD operand, ``lanes`` output
channels per weight vector, all chosen per target by :mod:`tvm_effconv.ops.dsq`):

- activation bit planes ``a_packed[n, group, i, h, w, chunk_index, word]`` (spatial padding applied;
  bits past the group's channels are zero);
- weight bit planes ``w_packed[ko, j, r, s, chunk_index, lane, word]``, each group's output channels
  padded to a multiple of ``lanes`` (sliced off at the end, as in the DSConv kernel).
"""

from dataclasses import dataclass

import numpy as np

from ...geometry import ChannelVectors, GroupedConvGeometry

SCHEDULE_RULE = "effconv_qconv2d_bitserial"
PACK_BLOCK = "qconv2d_pack_input"
PLANE_SUM_BLOCK = "qconv2d_plane_sum"
ACCUMULATE_BLOCK = "qconv2d_accumulate"
CHANNEL_SUM_BLOCK = "qconv2d_channel_sum"
WINDOW_SUM_BLOCK = "qconv2d_window_sum"
LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class QConvShape(ChannelVectors, GroupedConvGeometry):
    """Static geometry of one quantized conv and its bit-packed layout."""

    weight_bits: int
    act_bits: int
    word_bits: int = 64  # channels per packed word: 8, 32 or 64
    chunk: int = 1  # words per SIMD operand of the popcount intrinsic
    lanes: int = 4  # output channels per weight vector
    layout: str = "NCHW"  # of the activations and of the output

    @property
    def word_dtype(self) -> str:
        return f"uint{self.word_bits}"

    @property
    def chunks(self) -> int:  # SIMD operands per (group, bit plane, pixel)
        return -(-self.group_in // (self.word_bits * self.chunk))

    def activation_shape(self) -> tuple[int, ...]:
        n, c, h, w = self.batch, self.in_channels, self.height, self.width
        return (n, c, h, w) if self.layout == "NCHW" else (n, h, w, c)

    def output_shape(self, channels: int) -> tuple[int, ...]:
        (p, q), n = self.out_size, self.batch
        return (n, channels, p, q) if self.layout == "NCHW" else (n, p, q, channels)


def pack_bits(codes: np.ndarray, word_bits: int, words: int) -> np.ndarray:
    """Bit planes of unsigned ``codes`` (..., C) packed along the last axis: (bits ..., words) words of
    ``word_bits`` bits, channel c in bit c % word_bits of word c // word_bits; zeros past C.
    ``codes`` has a leading axis of planes already split off by the caller: this packs one plane."""
    flat = np.zeros(codes.shape[:-1] + (words * word_bits,), np.uint64)
    flat[..., : codes.shape[-1]] = codes
    weights = np.left_shift(np.uint64(1), np.arange(word_bits, dtype=np.uint64))
    packed = (flat.reshape(codes.shape[:-1] + (words, word_bits)) * weights).sum(axis=-1, dtype=np.uint64)
    return packed.astype(f"uint{word_bits}")


def pack_weights(shape: QConvShape, codes: np.ndarray) -> np.ndarray:
    """Numpy, at compile time: signed weight codes (K, C/g, R, S) -> ``w_packed`` (see the module doc)."""
    s = shape
    kh, kw = s.kernel
    unsigned = codes.astype(np.int64) + 2 ** (s.weight_bits - 1)
    words = s.chunks * s.chunk
    planes = np.stack([(unsigned >> j) & 1 for j in range(s.weight_bits)])  # (wb, K, C, R, S)
    packed = pack_bits(planes.transpose(0, 1, 3, 4, 2), s.word_bits, words)  # (wb, K, R, S, words)
    out = np.zeros((s.padded_out // s.lanes, s.weight_bits, kh, kw, s.chunks, s.lanes, s.chunk), s.word_dtype)
    for k in range(s.out_channels):
        ko, lane = divmod(s.packed_channel(k), s.lanes)
        out[ko, :, :, :, :, lane, :] = packed[:, k].reshape(s.weight_bits, kh, kw, s.chunks, s.chunk)
    return out


@dataclass(frozen=True)
class QConvConstants:
    """The float constants of the bit-serial kernel's epilogue, in the padded channel order."""

    scale: np.ndarray  # sa * sw[k]
    zero_scale: np.ndarray  # sa * sw[k] * zu[k]: multiplies act_sum
    bias: np.ndarray


def epilogue_constants(shape: QConvShape, weight_scale, weight_zero_point, act_scale, bias) -> QConvConstants:
    """Numpy float64 math, float32 results."""
    s = shape
    sw = np.asarray(weight_scale, np.float64)
    zu = np.asarray(weight_zero_point, np.float64) + 2 ** (s.weight_bits - 1)
    scale, zero_scale, bias_ = (np.zeros(s.padded_out, np.float32) for _ in range(3))
    for k in range(s.out_channels):
        p = s.packed_channel(k)
        scale[p] = float(act_scale) * sw[k]
        zero_scale[p] = float(act_scale) * sw[k] * zu[k]
        bias_[p] = 0.0 if bias is None else float(bias[k])
    return QConvConstants(scale, zero_scale, bias_)


def tap_correction(codes, weight_scale, weight_zero_point, act_scale, act_zero_point, weight_offset: int):
    """(K, R, S) float32: the zero-point term each kernel tap inside the image adds, or None when the
    activation zero point za is 0. With x = sa (qa - za) on the image and 0 on the padding, a tap
    inside the image contributes sa sw[k] sum_c (qa - za)(qw - zw), of which the kernel computes the
    terms in qa; the rest, sa * za * sw[k] * (zw * C/g - sum_c qw), depends on the tap only. It holds
    for unsigned weight codes too (``weight_offset`` added to both qw and zw)."""
    za = float(act_zero_point)
    if za == 0.0:
        return None
    sw = np.asarray(weight_scale, np.float64)[:, None, None]
    zw = np.asarray(weight_zero_point, np.float64)[:, None, None] + weight_offset
    code_sum = (codes.astype(np.int64) + weight_offset).sum(axis=1)
    return (float(act_scale) * za * sw * (zw * codes.shape[1] - code_sum)).astype(np.float32)


def quantize_codes(x, scale: float, zero_point: float, bits: int):
    """Unsigned activation codes as ``nn.dsq.quantize_codes`` picks them (float32 x / scale + zero_point,
    then half-to-even rounding, at 1 bit ``>= 0.5``), clamped to [0, 2^bits - 1], uint8."""
    from tvm import te, tirx

    top = float(2**bits - 1)

    def code(*i):
        t = x(*i) / tirx.const(scale, "float32") + tirx.const(zero_point, "float32")
        rounded = tirx.Select(t >= 0.5, tirx.const(1.0, "float32"), tirx.const(0.0, "float32")) if bits == 1 else tirx.nearbyint(t)
        return tirx.Cast("uint8", tirx.max(tirx.min(rounded, top), 0.0))

    return te.compute(x.shape, code, name="qconv2d_quantize", tag="elemwise")


def _clamp(index, extent: int):
    from tvm import tirx

    return tirx.min(tirx.max(index, 0), extent - 1)


def _code_at(shape: QConvShape, codes, n, c, h, w):
    return codes[n, c, h, w] if shape.layout == "NCHW" else codes[n, h, w, c]


def pack_input(shape: QConvShape, codes):
    """Activation bit planes (see the module doc), spatially padded; one block for the schedules."""
    from tvm import te, tirx

    s = shape
    ph, pw = s.padding
    b = te.reduce_axis((0, s.word_bits), name="b")

    def word(n, g, i, h, w, ch, cw):
        c = (ch * s.chunk + cw) * s.word_bits + b
        inside = tirx.all(c < s.group_in, h >= ph, h < s.height + ph, w >= pw, w < s.width + pw)
        code = _code_at(s, codes, n, g * s.group_in + tirx.min(c, s.group_in - 1), _clamp(h - ph, s.height), _clamp(w - pw, s.width))
        bit = tirx.if_then_else(inside, tirx.bitwise_and(tirx.shift_right(code, i.astype("uint8")), 1), 0)
        return te.sum(tirx.shift_left(bit.astype(s.word_dtype), b.astype(s.word_dtype)), axis=b)

    return te.compute(
        (s.batch, s.groups, s.act_bits, s.height + 2 * ph, s.width + 2 * pw, s.chunks, s.chunk), word, name=PACK_BLOCK
    )


def channel_sum(shape: QConvShape, codes):
    """sum of the codes over each group's channels, per pixel (int32)."""
    from tvm import te

    s = shape
    c = te.reduce_axis((0, s.group_in), name="c")
    return te.compute(
        (s.batch, s.groups, s.height, s.width),
        lambda n, g, h, w: te.sum(_code_at(s, codes, n, g * s.group_in + c, h, w).astype("int32"), axis=c),
        name=CHANNEL_SUM_BLOCK,
    )


def bitserial_conv2d(shape: QConvShape, a_packed, w_packed, annotations=None):
    """sum_{i,j} 2^(i+j) popcount(a_i & w_j) over each window: sum qa * uw, int32 [N, Kpad, P, Q].

    The plane sums stay int32 (TVM's old bit-serial kernels used int16 and overflow for large
    reductions); the shifts happen once per (output, plane pair), not per word."""
    from tvm import te, tirx

    s = shape
    (kh, kw), (sh, sw), (dh, dw) = s.kernel, s.stride, s.dilation
    oh, ow = s.out_size
    r = te.reduce_axis((0, kh), name="r")
    q = te.reduce_axis((0, kw), name="q")
    ch = te.reduce_axis((0, s.chunks), name="ch")
    cw = te.reduce_axis((0, s.chunk), name="cw")
    group_of = lambda ko: ko // s.group_vectors

    plane_sum = te.compute(
        (s.batch, s.padded_out // s.lanes, s.act_bits, s.weight_bits, oh, ow, s.lanes),
        lambda n, ko, i, j, y, x, lane: te.sum(
            tirx.popcount(
                tirx.bitwise_and(
                    a_packed[n, group_of(ko), i, y * sh + r * dh, x * sw + q * dw, ch, cw], w_packed[ko, j, r, q, ch, lane, cw]
                )
            ).astype("int32"),
            axis=[r, q, ch, cw],
        ),
        name=PLANE_SUM_BLOCK,
    )
    i = te.reduce_axis((0, s.act_bits), name="i")
    j = te.reduce_axis((0, s.weight_bits), name="j")
    return te.compute(
        (s.batch, s.padded_out, oh, ow),
        lambda n, k, y, x: te.sum(
            tirx.shift_left(plane_sum[n, k // s.lanes, i, j, y, x, k % s.lanes], (i + j).astype("int32")), axis=[i, j]
        ),
        name=ACCUMULATE_BLOCK,
        attrs={"schedule_rule": SCHEDULE_RULE, **(annotations or {})},
    )


def window_sum(shape: QConvShape, codes):
    """act_sum: the sum of the codes over each output's window (the channels of each group and the
    taps inside the image), int32 [N, groups, P, Q]; from per-pixel channel sums, R * S adds each."""
    from tvm import te, tirx

    s = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel, s.stride, s.padding, s.dilation
    sums = channel_sum(s, codes)
    r = te.reduce_axis((0, kh), name="wr")
    q = te.reduce_axis((0, kw), name="wq")

    def window(n, g, y, x):
        h, w = y * sh + r * dh - ph, x * sw + q * dw - pw
        inside = tirx.all(h >= 0, h < s.height, w >= 0, w < s.width)
        return te.sum(tirx.if_then_else(inside, sums[n, g, _clamp(h, s.height), _clamp(w, s.width)], 0), axis=[r, q])

    return te.compute((s.batch, s.groups, *s.out_size), window, name=WINDOW_SUM_BLOCK)


def _output(shape: QConvShape, value, name: str):
    """The [N, K, P, Q] (or NHWC) output whose element is ``value(n, k, y, x)``."""
    from tvm import te

    def at(*index):
        n, k, y, x = index if shape.layout == "NCHW" else (index[0], index[3], index[1], index[2])
        return value(n, k, y, x)

    return te.compute(shape.output_shape(shape.out_channels), at, name=name)


def qconv2d_integer(shape: QConvShape, codes, w_packed, annotations=None):
    """acc = sum qa * qw (int32) from activation codes: the integer part, which tests check exactly."""
    s = shape
    acc = bitserial_conv2d(s, pack_input(s, codes), w_packed, annotations)
    window = window_sum(s, codes)
    offset = 2 ** (s.weight_bits - 1)
    return _output(
        s, lambda n, k, y, x: acc[n, s.packed_channel(k), y, x] - offset * window[n, k // s.group_out, y, x],
        "qconv2d_integer",
    )


def qconv2d(shape: QConvShape, codes, w_packed, scale, zero_scale, bias, tap_correction=None, annotations=None):
    """The bit-serial quantized conv from activation codes (uint8, ``shape.layout``) to float32 output.

    ``w_packed`` (:func:`pack_weights`), ``scale``/``zero_scale``/``bias`` [Kpad]
    (:func:`epilogue_constants`) and ``tap_correction`` [K, R, S] (:func:`tap_correction`, None when
    the activation zero point is 0) are placeholders or constants. Reads the padded channel order
    directly: no separate unpadding pass."""
    s = shape
    acc = bitserial_conv2d(s, pack_input(s, codes), w_packed, annotations)
    window = window_sum(s, codes)
    correction = None if tap_correction is None else zero_point_correction(s, tap_correction)

    def dequantize(n, k, y, x):
        p = s.packed_channel(k)
        value = scale[p] * acc[n, p, y, x].astype("float32") - zero_scale[p] * window[n, k // s.group_out, y, x].astype("float32")
        value = value + bias[p]
        return value if correction is None else value + correction[k, y, x]

    return _output(s, dequantize, "qconv2d_dequantize")


def zero_point_correction(geometry, tap_correction):
    """[K, P, Q]: the sum of ``tap_correction[k, r, s]`` over the taps of output (p, q) inside the image
    (see :func:`tap_correction`). ``geometry`` has the conv's kernel, stride, padding, dilation,
    height, width and out_size (a QConvShape or a DSConvShape)."""
    from tvm import te, tirx

    g = geometry
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel, g.stride, g.padding, g.dilation
    r = te.reduce_axis((0, kh), name="cr")
    q = te.reduce_axis((0, kw), name="cq")

    def correct(k, y, x):
        h, w = y * sh + r * dh - ph, x * sw + q * dw - pw
        inside = tirx.all(h >= 0, h < g.height, w >= 0, w < g.width)
        return te.sum(tirx.if_then_else(inside, tap_correction[k, r, q], tirx.const(0.0, "float32")), axis=[r, q])

    return te.compute((int(tap_correction.shape[0]), *g.out_size), correct, name="qconv2d_zero_point_correction")


def add_zero_point_terms(shape: QConvShape, out, codes, zero_scale, tap_correction=None):
    """The epilogue of a kernel that computes ``out`` = sa sw[k] sum qa qw (+ bias) alone, float32 NCHW:
    minus ``zero_scale[k]`` (sa sw[k] zw[k]) times each window's code sum, plus :func:`zero_point_correction`
    where the activations have a zero point."""
    from tvm import te

    window = window_sum(shape, codes)
    correction = None if tap_correction is None else zero_point_correction(shape, tap_correction)

    def value(n, k, y, x):
        v = out[n, k, y, x] - zero_scale[k] * window[n, k // shape.group_out, y, x].astype("float32")
        return v if correction is None else v + correction[k, y, x]

    return te.compute(out.shape, value, name="qconv2d_zero_point_terms")
