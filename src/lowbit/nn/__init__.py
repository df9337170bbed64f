"""Quantized modules and model surgery."""

from .modules import QuantEmbedding, QuantLinear

__all__ = ["QuantLinear", "QuantEmbedding"]
