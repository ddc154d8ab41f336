"""Convolution geometry shared by the PyTorch layers, the TE computes and the references."""


def conv2d_output_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    """(P, Q) of a 2-D convolution over an input of spatial ``size`` (H, W), as torch and TVM compute it."""
    return tuple(
        (size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)
    )


def tap_windows(padded, kernel, stride, dilation, out_size):
    """(r, s, the [.., P, Q] window of ``padded`` that kernel tap (r, s) reads) for every tap."""
    (sh, sw), (dh, dw), (oh, ow) = stride, dilation, out_size
    for r in range(kernel[0]):
        for s in range(kernel[1]):
            yield r, s, padded[..., r * dh : r * dh + sh * (oh - 1) + 1 : sh, s * dw : s * dw + sw * (ow - 1) + 1 : sw]
