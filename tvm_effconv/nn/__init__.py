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
