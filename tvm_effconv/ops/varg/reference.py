"""Plain numpy reference of the VarG grouped conv, beside the TVM kernel it checks: the PyTorch weight
layout, float64 accumulation per group and kernel tap."""

import numpy as np

from ...geometry import conv2d_output_size, tap_windows


def grouped_conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1):
    """y[n, k, p, q] = bias[k] + sum_{c, r, s} weight[k, c, r, s] * x_pad[n, g(k) * C/g + c, p * sh + r * dh,
    q * sw + s * dw], for x (N, C, H, W) and weight (K, C/groups, R, S); returns float64."""
    n_ = x.shape[0]
    k_, cg, kh, kw = weight.shape
    kg = k_ // groups
    (ph, pw) = padding
    out_size = conv2d_output_size(x.shape[2:], (kh, kw), stride, padding, dilation)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.zeros((n_, k_, *out_size), np.float64)
    for r, s, window in tap_windows(padded, (kh, kw), stride, dilation, out_size):
        for g in range(groups):
            xs = window[:, g * cg : (g + 1) * cg]  # (n, c, p, q)
            ws = weight[g * kg : (g + 1) * kg, :, r, s].astype(np.float64)  # (k, c)
            out[:, g * kg : (g + 1) * kg] += np.einsum("kc,ncpq->nkpq", ws, xs)
    if bias is not None:
        out += np.asarray(bias, np.float64)[None, :, None, None]
    return out


def activation(kind: str, y, slope=None):
    """PReLU with per-channel ``slope`` (axis 1), ReLU or none, in float64."""
    if kind == "prelu":
        return np.where(y > 0, y, y * np.asarray(slope, np.float64)[None, :, None, None])
    return np.maximum(y, 0) if kind == "relu" else y


def separable_unit(
    x, group_weight, group_scale, group_shift, pointwise_weight, pointwise_scale, pointwise_shift, stride, padding,
    groups: int, group_activation: str, pointwise_activation: str, group_slope=None, pointwise_slope=None,
):
    """The separable unit, float64: act(scale * grouped_conv(x) + shift) per channel, then
    act(scale * pointwise(.) + shift) with ``pointwise_weight`` (K, M, 1, 1); the scales and shifts are
    batch norms (or 1 and a bias)."""

    def affine(y, scale, shift):
        return y * np.asarray(scale, np.float64)[None, :, None, None] + np.asarray(shift, np.float64)[None, :, None, None]

    mid = grouped_conv2d(x, group_weight, None, stride, padding, (1, 1), groups)
    mid = activation(group_activation, affine(mid, group_scale, group_shift), group_slope)
    out = np.einsum("km,nmpq->nkpq", pointwise_weight.reshape(pointwise_weight.shape[:2]).astype(np.float64), mid)
    return activation(pointwise_activation, affine(out, pointwise_scale, pointwise_shift), pointwise_slope)


def grouped_qconv2d(x_q, codes, scale, bias, stride=(1, 1), padding=(0, 0), groups: int = 1):
    """The int8 grouped conv: ``scale[k] * sum(x_q * codes) + bias[k]``, the integer sum exact (int64);
    returns (float64 output, the int64 sums)."""
    sums = np.rint(grouped_conv2d(x_q.astype(np.float64), codes.astype(np.float64), None, stride, padding, (1, 1),
                                  groups)).astype(np.int64)
    out = sums * np.asarray(scale, np.float64)[None, :, None, None] + np.asarray(bias, np.float64)[None, :, None, None]
    return out, sums
