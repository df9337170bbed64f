"""GPTQ: quantize a layer's columns one at a time, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

For a linear layer y = W x, the output error over calibration inputs X is
tr((W - Q) H (W - Q)^T) with H = X X^T / n. GPTQ (Frantar et al., 2022) minimises it greedily:
with U the upper Cholesky factor of H^-1, after rounding column i,
    err      = (w_i - q_i) / U[i, i]
    W[:, j] -= err * U[i, j]          for j > i
Updates are applied lazily per `block` columns (a rank-`block` update for the rest), dampening adds
`damp * mean(diag H)` to the diagonal, and `act_order` visits columns by decreasing diag(H).

Scales are chosen per block of the format *before* the error feedback reaches that block: when the
sweep enters a block of columns, its scale planes (scale / zero / E8M0 exponent) are encoded from
the current, error-updated weights (optionally by clip search weighted by diag H), then each column
is rounded to the nearest value of that fixed grid (`grid.py`). With `act_order` the sweep order
and the block order differ, so block parameters are chosen up front from the original weights
("static groups"). Palettes fix their table(s) first (k-means weighted by diag H, the inputs'
energy per column), then GPTQ assigns codes.

Every row is independent given H, so layers that read the same input (q, k, v) can be stacked
along rows and quantized in one sweep.

Example:
    >>> import torch
    >>> from lowbit.algorithms.gptq import gptq
    >>> x = torch.randn(512, 64) @ torch.randn(64, 64)         # correlated inputs
    >>> w = torch.randn(32, 64)
    >>> qt = gptq(w, x.T @ x / 512, "int4")
    >>> qt.shape
    (32, 64)
"""

from __future__ import annotations

import torch

from .._threads import single_thread
from ..formats import QTensor
from ..formats.format import Format
from ..formats.presets import resolve
from .assemble import from_codes
from .clip import DEFAULT_ALPHAS, clip_planes
from .grid import code_grid, encode_params, masked_grid, nearest_in


def gptq(w: torch.Tensor, hessian: torch.Tensor, fmt: "str | Format", *, block: int = 128, damp: float = 0.01,
         act_order: bool = False, clip: bool = True, alphas: tuple[float, ...] = DEFAULT_ALPHAS) -> QTensor:
    """GPTQ-quantize `w` (rows, cols) given `hessian` (cols, cols) = E[x x^T] of the layer's inputs.

    Args:
        block: lazy-update width (rounded up to a multiple of the format's block).
        damp: fraction of mean(diag H) added to the diagonal (numerical stability).
        act_order: visit columns by decreasing diag(H); block scales then come from the original weights.
        clip: choose each block's scale by clip search (weighted by diag H) instead of plain max-abs.
    Math runs in fp32 on `w`'s device.
    """
    fmt = resolve(fmt)
    with single_thread(w.device):  # thousands of tiny per-column ops: threads only stall on CPU
        return _gptq(w, hessian, fmt, block, damp, act_order, clip, alphas)


def _gptq(w, hessian, fmt, block, damp, act_order, clip, alphas) -> QTensor:
    W = w.detach().to(torch.float32).clone()
    rows, cols = W.shape
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    if H.shape != (cols, cols):
        raise ValueError(f"gptq: hessian shape {tuple(H.shape)} does not match the weight's {cols} input columns")
    diag = torch.diagonal(H)
    dead = diag <= 0
    if bool(dead.any()):  # inputs that were always zero: their weights cannot matter
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    importance = torch.diagonal(H).clone()

    bsz = fmt.block_size if fmt.family != "lut" and fmt.block_size else cols
    if cols % bsz:
        raise ValueError(f"gptq: {cols} input columns are not a multiple of block_size {bsz} ({fmt.name})")
    nblocks = cols // bsz

    def choose(wslice: torch.Tensor, imp: torch.Tensor) -> dict[str, torch.Tensor]:
        if fmt.family == "lut":
            return encode_params(wslice, fmt, importance=imp.reshape(1, -1).expand_as(wslice).contiguous())
        if clip:
            planes = clip_planes(wslice, fmt, imp, alphas)
            return {k: v for k, v in planes.items() if k != "data"}
        return encode_params(wslice, fmt)

    perm = torch.argsort(importance, descending=True) if act_order else None
    static = None
    if act_order or bsz == cols:  # parameters fixed before any error feedback
        static = [choose(W[:, b * bsz:(b + 1) * bsz], importance[b * bsz:(b + 1) * bsz]) for b in range(nblocks)]
    params: list[dict[str, torch.Tensor] | None] = list(static) if static else [None] * nblocks
    grids: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * nblocks

    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diagonal(H).mean() * torch.eye(cols, device=H.device)
    U = _inverse_cholesky_upper(H)

    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    lazy = max(block, bsz) if bsz < cols else block
    lazy = -(-lazy // min(bsz, lazy)) * min(bsz, lazy)
    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col]) if perm is not None else col
            b = orig // bsz
            if params[b] is None:  # entering block b (natural order): fix its scale now
                params[b] = choose(W1[:, i:i + bsz], importance[col:col + bsz])
            if grids[b] is None:
                grid, usable = code_grid(params[b], fmt, rows)
                grids[b] = (grid, masked_grid(grid, usable))
            grid, masked = grids[b]
            wcol = W1[:, i:i + 1]
            c = nearest_in(wcol, masked)  # (rows, 1): nearest usable grid value per row
            q = grid.gather(1, c)
            codes[:, orig] = c[:, 0].to(torch.uint8)
            err = (wcol - q) / U1[i, i]
            W1[:, i:] -= err * U1[i:i + 1, i:]
            E1[:, i:i + 1] = err
        if i2 < cols:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if fmt.family == "lut":
        return from_codes(codes, params[0], fmt, tuple(w.shape))
    return from_codes(codes, params, fmt, tuple(w.shape))


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding more dampening if H is not positive definite."""
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    extra = 0.0
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + extra * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0:
                return U
        extra = max(extra * 10, 1e-4 * float(torch.diagonal(H).mean()))
    raise RuntimeError("gptq: the Hessian is not positive definite even after extra dampening; "
                       "use more calibration samples or a larger damp")
