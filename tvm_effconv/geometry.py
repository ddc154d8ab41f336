"""Convolution geometry shared by the PyTorch layers, the TE computes and the references."""


def conv2d_output_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    """(P, Q) of a 2-D convolution over an input of spatial ``size`` (H, W), as torch and TVM compute it."""
    return tuple(
        (size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)
    )
