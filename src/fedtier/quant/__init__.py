"""Quantization: the paper's quantizer, affine quantizers, STE, QAT forward, PTQ copies."""

from fedtier.quant.model import (
    QuantSpec,
    forward_quantized,
    grid,
    quantize_copy,
    quantized_parameters,
    quantized_view,
)
from fedtier.quant.quantizers import (
    FULL_PRECISION,
    QUANTIZERS,
    affine_channel_quantize,
    affine_quantize,
    get_quantizer,
    paper_quantize,
    ste,
)

__all__ = [
    "FULL_PRECISION",
    "QUANTIZERS",
    "QuantSpec",
    "affine_channel_quantize",
    "affine_quantize",
    "forward_quantized",
    "get_quantizer",
    "grid",
    "paper_quantize",
    "quantize_copy",
    "quantized_parameters",
    "quantized_view",
    "ste",
]
