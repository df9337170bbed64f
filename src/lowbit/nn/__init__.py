"""Quantized modules and model surgery."""

from .fused import FusedSlice, fuse_projections, join_rows, unfuse_projections
from .modules import QuantEmbedding, QuantLinear

__all__ = ["QuantLinear", "QuantEmbedding", "FusedSlice", "fuse_projections", "join_rows", "unfuse_projections"]
