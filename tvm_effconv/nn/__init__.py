"""PyTorch layers with efficient convolutions, and the ``effconv::`` torch ops their eval mode calls.

Importing this package registers every ``effconv::`` op, which loading a saved ``torch.export`` archive
that calls them needs."""

from .dsconv import (
    ConversionEntry,
    ConversionReport,
    DSConv2d,
    LayerParameterError,
    calibrate_activations,
    convert_to_dsconv,
    dsconv2d,
    quantize_activations,
)
from .dsq import DSQConv2d, DSQLinear, convert_to_dsq, dsq_quantize, qconv2d, qconv2d_integer_terms
from .lccl import LCCLBasicBlock, LCCLConv2d, calibrate_mask_sparsity, convert_to_lccl, lccl_conv2d
from .varg import (
    QuantizedVarGConv2d,
    VarGConv2d,
    VarGDownsampleBlock,
    VarGNormalBlock,
    VarGSeparable,
    quantize_varg,
    varg_qconv2d,
    varg_separable,
)

__all__ = [
    "ConversionEntry",
    "ConversionReport",
    "DSConv2d",
    "LayerParameterError",
    "calibrate_activations",
    "convert_to_dsconv",
    "dsconv2d",
    "quantize_activations",
]
__all__ += ["DSQConv2d", "DSQLinear", "convert_to_dsq", "dsq_quantize", "qconv2d", "qconv2d_integer_terms"]
__all__ += ["LCCLBasicBlock", "LCCLConv2d", "calibrate_mask_sparsity", "convert_to_lccl", "lccl_conv2d"]
__all__ += [
    "QuantizedVarGConv2d",
    "VarGConv2d",
    "VarGDownsampleBlock",
    "VarGNormalBlock",
    "VarGSeparable",
    "quantize_varg",
    "varg_qconv2d",
    "varg_separable",
]
