"""Calibration-aware quantization: clip search, GPTQ, AWQ, sensitivity-weighted k-means, the
sequential calibration driver, sensitivity analysis and automatic mixed precision."""

from .clip import clip_search
from .gptq import gptq
from .layer import ALGORITHMS, NEEDS_DATA, quantize_weight

__all__ = ["ALGORITHMS", "NEEDS_DATA", "clip_search", "gptq", "quantize_weight"]
