"""Plain numpy reference of the DSConv inference form, beside the TVM kernel it checks.

It follows the kernel's arithmetic, not the layer's: exact int64 block sums, then one float64
multiply-add per (k, block, r, s, p). ``torch.ops.effconv.dsconv2d`` computes the same function as a
float convolution with the dequantized weights; tests check all three against one another.
"""

import numpy as np

from ...geometry import conv2d_output_size, tap_windows


def block_sums(x_q, codes, stride, padding, dilation, groups: int, block: int):
    """isum[n, k, b, r, s, p, q] = sum over the channels c of block b of codes[k, c, r, s] * x_q[n, c, ...]."""
    k_, cg, kh, kw = codes.shape
    (ph, pw) = padding
    nblocks = -(-cg // block)
    out_size = conv2d_output_size(x_q.shape[2:], (kh, kw), stride, padding, dilation)
    x = np.pad(x_q.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    kg = k_ // groups
    out = np.zeros((x_q.shape[0], k_, nblocks, kh, kw, *out_size), np.int64)
    for r, s, window in tap_windows(x, (kh, kw), stride, dilation, out_size):
        for g in range(groups):
            for b in range(nblocks):
                lo, hi = b * block, min((b + 1) * block, cg)
                xs = window[:, g * cg + lo : g * cg + hi]  # (n, c, oh, ow)
                ws = codes[g * kg : (g + 1) * kg, lo:hi, r, s].astype(np.int64)  # (k, c)
                out[:, g * kg : (g + 1) * kg, b, r, s] = np.einsum("kc,ncpq->nkpq", ws, xs)
    return out


def input_block_sums(x_q, kernel, stride, padding, dilation, groups: int, block: int):
    """sum of x_q over each block's channels, at every input position a kernel tap reads:
    xsum[n, g*nblocks + b, r, s, p, q] (for the KDS bias term)."""
    ones = np.ones((groups, x_q.shape[1] // groups) + tuple(kernel), np.int64)
    per_group = block_sums(x_q, ones, stride, padding, dilation, groups, block)  # (n, groups, nb, r, s, p, q)
    return per_group.reshape(x_q.shape[0], -1, *per_group.shape[3:])


def dsconv2d(x_q, x_scale, codes, kds_scale, kds_bias, cds_scale, cds_bias, stride, padding, dilation, groups, block):
    """float64 output of the inference form. ``x_scale``: a scalar (int8 mode) or per-block scales
    [N, groups * nblocks, H, W] (block floating point)."""
    k_, _, kh, kw = codes.shape
    isum = block_sums(x_q, codes, stride, padding, dilation, groups, block).astype(np.float64)
    nblocks = isum.shape[2]
    kg = k_ // groups
    weight = kds_scale.astype(np.float64)[None, :, :, :, :, None, None] * isum
    if kds_bias is not None:
        xsum = input_block_sums(x_q, (kh, kw), stride, padding, dilation, groups, block).astype(np.float64)
        xsum = np.repeat(xsum.reshape(xsum.shape[0], groups, nblocks, *xsum.shape[2:]), kg, axis=1)
        weight = weight + kds_bias.astype(np.float64)[None, :, :, :, :, None, None] * xsum
    if np.ndim(x_scale) == 0:
        weight = weight * float(x_scale)
    else:
        weight = weight * _tap_scales(np.asarray(x_scale, np.float64), codes.shape, stride, padding, dilation, groups, nblocks)
    y = weight.sum(axis=(2, 3, 4))
    return cds_scale.astype(np.float64)[None, :, None, None] * y + cds_bias.astype(np.float64)[None, :, None, None]


def _tap_scales(x_scale, weight_shape, stride, padding, dilation, groups, nblocks):
    """The per-block activation scale each (k, b, r, s, p, q) term uses: [N, K, nb, R, S, P, Q]."""
    n_ = x_scale.shape[0]
    k_, _, kh, kw = weight_shape
    (ph, pw) = padding
    out_size = conv2d_output_size(x_scale.shape[2:], (kh, kw), stride, padding, dilation)
    padded = np.pad(x_scale, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # padding's sums are zero anyway
    taps = np.zeros((n_, groups, nblocks, kh, kw, *out_size))
    for r, s, window in tap_windows(padded, (kh, kw), stride, dilation, out_size):
        taps[:, :, :, r, s] = window.reshape(n_, groups, nblocks, *out_size)
    return np.repeat(taps, k_ // groups, axis=1)
