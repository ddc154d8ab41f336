"""PyTorch layers with efficient convolutions, and the ``effconv::`` torch ops their eval mode calls."""

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
from .dsq import DSQConv2d, convert_to_dsq, dsq_quantize, qconv2d, qconv2d_integer_terms

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
__all__ += ["DSQConv2d", "convert_to_dsq", "dsq_quantize", "qconv2d", "qconv2d_integer_terms"]
