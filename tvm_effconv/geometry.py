"""Convolution geometry shared by the PyTorch layers, the TE computes and the references."""

from dataclasses import dataclass


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


@dataclass(frozen=True)
class ConvGeometry:
    """The static geometry of a 2-D convolution; each op's shape adds the fields of its own layout."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def out_size(self) -> tuple[int, int]:
        return conv2d_output_size((self.height, self.width), self.kernel, self.stride, self.padding, self.dilation)


@dataclass(frozen=True)
class GroupedConvGeometry(ConvGeometry):
    """A grouped convolution's geometry."""

    groups: int

    @property
    def group_in(self) -> int:
        return self.in_channels // self.groups

    @property
    def group_out(self) -> int:
        return self.out_channels // self.groups


class ChannelVectors:
    """For a grouped shape with ``lanes``: each group's output channels padded to whole weight vectors."""

    @property
    def group_vectors(self) -> int:  # weight vectors per group
        return -(-self.group_out // self.lanes)

    @property
    def padded_out(self) -> int:
        return self.groups * self.group_vectors * self.lanes

    @property
    def channels_padded(self) -> bool:
        return self.padded_out != self.out_channels

    def packed_channel(self, k):
        """Where output channel ``k`` (an int or a TIR expression) sits in the padded channel order."""
        return (k // self.group_out) * self.group_vectors * self.lanes + k % self.group_out
