"""One layer's weight -> QTensor, by algorithm name (the recipe's `algorithm`).

    rtn       round to nearest (the format's encoder); no data
    clip      per-block clip search; weighted by the inputs' energy diag(H) when calibration
              statistics exist, plain weight error otherwise
    gptq      GPTQ with block scales chosen (by clip search) before the error feedback
    awq       AWQ scales (searched and folded by the calibration driver), then clip search
    awq+gptq  AWQ scales, then GPTQ
    kmeans    palettes: k-means weighted by diag(H) (the sensitivity of each input column)

Example:
    >>> import torch
    >>> from lowbit.algorithms.layer import quantize_weight
    >>> quantize_weight(torch.randn(16, 64), "int4", "clip").shape
    (16, 64)
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats import QTensor, quantize_tensor
from ..formats.format import Format
from ..formats.presets import resolve

ALGORITHMS = ("rtn", "clip", "gptq", "awq", "awq+gptq", "kmeans")
NEEDS_DATA = {"gptq", "awq", "awq+gptq", "kmeans"}


def quantize_weight(w: torch.Tensor, fmt: "str | Format", algorithm: str = "rtn", stats: Any = None,
                    options: dict[str, Any] | None = None, *, pad: bool = False, name: str = "tensor") -> QTensor:
    """Quantize fp `w` (rows, cols) with `algorithm`; `stats` (a `LayerStats`) carries the calibration
    Hessian when the algorithm needs data."""
    from .clip import clip_search
    from .gptq import gptq

    fmt = resolve(fmt)
    options = options or {}
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{name}: unknown algorithm {algorithm!r}; available: {', '.join(ALGORITHMS)}")
    if algorithm in NEEDS_DATA and stats is None:
        raise ValueError(f"{name}: algorithm {algorithm!r} needs calibration data, and this layer saw none "
                         "(it is outside the model's blocks, or no calibration batches were given); "
                         "use 'rtn' or 'clip' for it")
    if algorithm == "rtn" or (algorithm in ("clip", "awq") and fmt.family == "lut"):
        return quantize_tensor(w, fmt, pad=pad, name=name)
    if w.numel() and not bool(torch.isfinite(w).all()):
        return quantize_tensor(w, fmt, pad=pad, name=name)  # raises NonFiniteError naming the layer
    if algorithm == "kmeans":
        if fmt.family != "lut":
            raise ValueError(f"{name}: algorithm 'kmeans' is for palettes (lut*), not {fmt.name}; use 'gptq' or 'clip'")
        imp = stats.importance.to(w.device).reshape(1, -1).expand(w.shape).contiguous()
        return quantize_tensor(w, fmt, pad=pad, name=name, importance=imp)

    w2, H, imp = _padded(w.to(torch.float32), fmt, stats, pad, name)
    if algorithm in ("clip", "awq"):
        qt = clip_search(w2, fmt, importance=imp)
    else:
        qt = gptq(w2, H, fmt, damp=float(options.get("damp", 0.01)), act_order=bool(options.get("act_order", False)),
                  clip=bool(options.get("clip", True)), block=int(options.get("block", 128)))
    return QTensor(qt.planes, fmt, tuple(w.shape))


def _padded(w: torch.Tensor, fmt: Format, stats: Any, pad: bool, name: str):
    cols = w.shape[1]
    b = None if fmt.family == "lut" else fmt.block_size
    extra = (-cols % b) if b else 0
    if extra and not pad:
        raise ValueError(f"{name}: input dim {cols} is not divisible by block_size {b} ({fmt.name})")
    H = None if stats is None else stats.hessian.to(w.device)
    imp = None if stats is None else stats.importance.to(w.device)
    if extra:
        w = torch.nn.functional.pad(w, (0, extra))
        if H is not None:
            H = torch.nn.functional.pad(H, (0, extra, 0, extra))  # zero columns: dead inputs
            imp = torch.nn.functional.pad(imp, (0, extra))
    return w, H, imp
