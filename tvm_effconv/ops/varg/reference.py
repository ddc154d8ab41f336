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
