"""Clip search: per block, shrink the range the scale covers when that lowers the error.

Round-to-nearest sizes each block's scale to its largest magnitude, so one outlier stretches the
step for the other 31 values. Clipping the block to a fraction `alpha` of its max (values beyond
saturate) trades a larger error on the outlier for a finer grid everywhere else. The search tries
`alphas` and keeps, per block, the one with the least weighted squared error:

    err(block) = sum_k  importance_k * (w_k - q_k)^2

with importance 1 (data-free: weight error) or the calibration inputs' second moment
E[x_k^2] = diag(H) (the diagonal approximation of the layer's output error).

It works for every block family through the family's own encoder (clip the block, encode it), so
E8M0 exponents, affine zero points and llama.cpp rules all come out as their encoders define them.

Example:
    >>> import torch
    >>> from lowbit.algorithms.clip import clip_search
    >>> w = torch.randn(64, 128); w[0, 0] = 40.0               # an outlier
    >>> qt = clip_search(w, "int4")
    >>> from lowbit.formats import quantize_tensor
    >>> bool(((qt.dequantize() - w) ** 2).sum() <= ((quantize_tensor(w, "int4").dequantize() - w) ** 2).sum())
    True
"""

from __future__ import annotations

import torch

from .._threads import single_thread
from ..formats import QTensor, registry
from ..formats.format import Format
from ..formats.presets import resolve
from ..formats.packing import pack, unpack

DEFAULT_ALPHAS = tuple(round(1.0 - 0.04 * i, 2) for i in range(13))  # 1.00, 0.96, ..., 0.52


def clip_search(w: torch.Tensor, fmt: "str | Format", importance: torch.Tensor | None = None,
                alphas: tuple[float, ...] = DEFAULT_ALPHAS) -> QTensor:
    """QTensor of fp32 `w` (rows, cols; cols a multiple of the block) whose per-block scales minimise
    the (importance-weighted) squared error over the clip fractions `alphas` (1.0 = RTN, always tried).

    `importance`: per input column (cols,) or per element (rows, cols), >= 0.
    """
    fmt = resolve(fmt)
    with single_thread(w.device, w.numel() <= 1 << 22):
        planes = clip_planes(w.to(torch.float32), fmt, importance, alphas)
    return QTensor(planes, fmt, tuple(w.shape))


def clip_planes(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None,
                alphas: tuple[float, ...] = DEFAULT_ALPHAS) -> dict[str, torch.Tensor]:
    """The planes of `clip_search` for fp32 `w` (rows, cols)."""
    if fmt.family == "lut":
        raise ValueError(f"clip search applies to block formats (int, mx, gguf), not palette {fmt.name}; "
                         "palettes use algorithm 'kmeans' (sensitivity-weighted k-means)")
    rows, cols = w.shape
    bsz = fmt.block_size or cols
    nb = cols // bsz
    handler = registry.handler(fmt.family)
    imp = _importance(importance, rows, cols, w.device)
    alphas = sorted(set((1.0,) + tuple(alphas)), reverse=True)
    blocks = w.reshape(1, rows, nb, bsz)
    amax = blocks.abs().amax(-1, keepdim=True)
    a = torch.tensor(alphas, dtype=torch.float32, device=w.device).reshape(-1, 1, 1, 1)
    # every candidate clip at once: one encode / decode of (len(alphas) * rows, cols)
    clipped = torch.maximum(torch.minimum(blocks, a * amax), -a * amax)
    clipped[0] = blocks[0]  # alpha 1.0 is exactly round-to-nearest
    n = len(alphas)
    planes = handler.encode(clipped.reshape(n * rows, cols).contiguous(), fmt)
    deq = handler.decode(planes, fmt, n * rows, cols).reshape(n, rows, cols)
    err = ((deq - w) ** 2 * imp).reshape(n, rows, nb, bsz).sum(-1)  # (n, rows, nb)
    best = err.argmin(0)  # first minimum: ties keep the larger alpha (RTN first)
    out = {}
    for k, v in planes.items():
        if k == "data":
            codes = unpack(v, fmt.bits, cols).reshape(n, rows, nb, bsz)
            pick = codes.gather(0, best.reshape(1, rows, nb, 1).expand(1, rows, nb, bsz))[0]
            out[k] = pack(pick.reshape(rows, cols).contiguous(), fmt.bits)
        else:
            out[k] = v.reshape(n, rows, nb).gather(0, best.unsqueeze(0))[0]
    return out


def _importance(importance: torch.Tensor | None, rows: int, cols: int, device) -> torch.Tensor:
    if importance is None:
        return torch.ones(1, 1, device=device)
    imp = importance.to(device=device, dtype=torch.float32)
    if imp.dim() == 1:
        if imp.numel() != cols:
            raise ValueError(f"importance has {imp.numel()} entries, expected one per input column ({cols})")
        return imp.reshape(1, cols)
    if tuple(imp.shape) != (rows, cols):
        raise ValueError(f"importance has shape {tuple(imp.shape)}, expected {(rows, cols)} or ({cols},)")
    return imp
