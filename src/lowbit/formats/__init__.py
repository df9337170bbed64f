"""The numeric core: formats, multi-plane tensors, packing."""

from .api import NonFiniteError, dequantize, quantize_tensor
from .format import Format
from .presets import PRESETS
from .qtensor import QTensor

__all__ = ["Format", "QTensor", "PRESETS", "quantize_tensor", "dequantize", "NonFiniteError"]
