"""Quantized modules and model surgery."""

from .fused import FusedSlice, fuse_projections, join_rows, unfuse_projections
from .gated import GatedMLP, GatedQuantLinear, fuse_gated_mlp, unfuse_gated_mlp
from .modules import QuantEmbedding, QuantLinear

__all__ = ["QuantLinear", "QuantEmbedding", "FusedSlice", "fuse_projections", "join_rows", "unfuse_projections",
           "GatedMLP", "GatedQuantLinear", "fuse_gated_mlp", "unfuse_gated_mlp"]
