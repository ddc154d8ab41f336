"""Plain numpy reference of the bit-serial quantized conv, beside the TVM kernel it checks.

It follows the kernel's arithmetic, not the layer's: activation codes and unsigned weight codes split
into bit planes, packed along channels into 64-bit words, and ``sum_{i,j} 2^(i+j) popcount(a_i & w_j)``
per window; then ``acc = that - 2^(wb-1) * act_sum``. ``nn.dsq.qconv2d_integer_terms`` computes the
same ``acc`` as a float64 convolution; tests check all three against one another.
"""

import numpy as np

from ...geometry import conv2d_output_size, tap_windows
from .compute import pack_bits

WORD_BITS = 64


def bitserial_conv2d(qa, qw, stride, padding, dilation, groups: int, act_bits: int, weight_bits: int):
    """acc[n, k, p, q] = sum qa * qw (int64) through bit planes and popcounts.

    qa: unsigned activation codes (N, C, H, W); qw: signed weight codes (K, C/g, R, S)."""
    k_, cg, kh, kw = qw.shape
    out_size = conv2d_output_size(qa.shape[2:], (kh, kw), stride, padding, dilation)
    (ph, pw), kg = padding, k_ // groups
    words = -(-cg // WORD_BITS)
    padded = np.pad(qa.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    unsigned_w = qw.astype(np.int64) + 2 ** (weight_bits - 1)
    out = np.zeros((qa.shape[0], k_, *out_size), np.int64)
    for r, s, window in tap_windows(padded, (kh, kw), stride, dilation, out_size):
        for g in range(groups):
            xs = window[:, g * cg : (g + 1) * cg].transpose(0, 2, 3, 1)  # (n, p, q, c)
            ws = unsigned_w[g * kg : (g + 1) * kg, :, r, s]  # (k, c)
            for i in range(act_bits):
                a_i = pack_bits((xs >> i) & 1, WORD_BITS, words)  # (n, p, q, words)
                for j in range(weight_bits):
                    w_j = pack_bits((ws >> j) & 1, WORD_BITS, words)  # (k, words)
                    ones = np.bitwise_count(a_i[:, None] & w_j[None, :, None, None]).sum(axis=-1, dtype=np.int64)
                    out[:, g * kg : (g + 1) * kg] += ones << (i + j)
            act_sum = xs.sum(axis=-1)  # (n, p, q)
            out[:, g * kg : (g + 1) * kg] -= 2 ** (weight_bits - 1) * act_sum[:, None]
    return out
