"""Plain numpy reference of the LCCL kernels' sparse computation, beside the TVM kernels it checks.

The mask first (the cheap conv, bias, ReLU), then the main conv evaluated only at the (n, position) or
(n, channel, position) entries whose mask is non-zero, in float64; exact zeros elsewhere. The op's eager
implementation (``torch.ops.effconv.lccl_conv2d``) computes the same function; the tests check all three.
:func:`compaction` lists the active units the "compact" kernels compute, for checking their list stages.
"""

import numpy as np

from ...geometry import conv2d_output_size, tap_windows


def _columns(x, kernel, stride, padding, dilation):
    """im2col of the zero-padded input: (N, C * R * S, P, Q) in (c, r, s) order, float64."""
    (ph, pw) = padding
    out_size = conv2d_output_size(x.shape[2:], kernel, stride, padding, dilation)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n_, c_ = x.shape[:2]
    cols = np.zeros((n_, c_, kernel[0], kernel[1], *out_size))
    for r, s, window in tap_windows(padded, kernel, stride, dilation, out_size):
        cols[:, :, r, s] = window
    return cols.reshape(n_, -1, *out_size), padded, out_size


def mask(x, cheap_weight, cheap_bias, kernel, stride, padding, dilation, mode):
    """The mask relu(cheap conv + bias): (N, 1, P, Q) "spatial", (N, K, P, Q) "channel"; float64."""
    cols, padded, (oh, ow) = _columns(x, kernel, stride, padding, dilation)
    if mode == "spatial":
        pre = np.einsum("i,nipq->npq", cheap_weight.reshape(-1).astype(np.float64), cols)[:, None]
    else:
        ch, cw = (d * (k - 1) // 2 for k, d in zip(kernel, dilation))
        (sh, sw) = stride
        centre = padded[:, :, ch : ch + sh * (oh - 1) + 1 : sh, cw : cw + sw * (ow - 1) + 1 : sw]
        pre = np.einsum("kc,ncpq->nkpq", cheap_weight[:, :, 0, 0].astype(np.float64), centre)
    bias = np.zeros(pre.shape[1]) if cheap_bias is None else cheap_bias.astype(np.float64)
    return np.maximum(pre + bias[None, :, None, None], 0.0)


def lccl_conv2d(x, main_weight, main_bias, cheap_weight, cheap_bias, stride, padding, dilation, mode):
    """float64 (N, K, P, Q): relu(main) * mask, with main computed only where the mask is non-zero."""
    k_ = main_weight.shape[0]
    kernel = tuple(main_weight.shape[2:])
    m = mask(x, cheap_weight, cheap_bias, kernel, stride, padding, dilation, mode)
    cols, _, out_size = _columns(x, kernel, stride, padding, dilation)
    weight = main_weight.reshape(k_, -1).astype(np.float64)
    bias = np.zeros(k_) if main_bias is None else main_bias.astype(np.float64)
    y = np.zeros((x.shape[0], k_, *out_size))
    if mode == "spatial":
        for n, p, q in zip(*np.nonzero(m[:, 0])):
            y[n, :, p, q] = np.maximum(weight @ cols[n, :, p, q] + bias, 0.0) * m[n, 0, p, q]
    else:
        for n, k, p, q in zip(*np.nonzero(m)):
            y[n, k, p, q] = max(weight[k] @ cols[n, :, p, q] + bias[k], 0.0) * m[n, k, p, q]
    return y


def compaction(mask, mode, lanes):
    """The lists of the "compact" kernels: for each image and list (one per image "spatial", one per weight
    vector of ``lanes`` channels "channel"), the raster indices p * Q + q of its active units in order.
    A unit is active where its mask (any lane's, "channel") is positive."""
    n_, k_, oh, ow = mask.shape
    if mode == "spatial":
        active = mask > 0
    else:
        active = (mask.reshape(n_, k_ // lanes, lanes, oh, ow) > 0).any(axis=2)
    return [[np.flatnonzero(active[n, l]) for l in range(active.shape[1])] for n in range(n_)]
