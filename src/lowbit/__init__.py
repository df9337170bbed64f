"""lowbit: make large models small and fast without losing them.

    >>> import torch, lowbit
    >>> qt = lowbit.quantize_tensor(torch.randn(128, 256), "int4-e8m0")
    >>> qt.bits_per_weight
    4.25
"""

from .formats import PRESETS, Format, NonFiniteError, QTensor, dequantize, quantize_tensor

__version__ = "0.1.0"
__all__ = ["Format", "QTensor", "PRESETS", "quantize_tensor", "dequantize", "NonFiniteError", "__version__"]
