"""Per-row code grids: the values each code can take once a block's scale (and zero / LUT) is fixed.

Calibration-aware algorithms choose codes themselves (GPTQ's error feedback, clip search), so they
need, for a block of columns whose scale planes are already chosen, the value of every code in
every row. Rather than re-implementing each family's arithmetic, the grid is read through the
family's own decoder: enumerate all 2^bits codes as a fake block with the chosen scale planes and
decode it. So a code picked from the grid decodes to exactly that value in the final planes.

Example:
    >>> import torch
    >>> from lowbit.formats.presets import resolve
    >>> from lowbit.algorithms.grid import encode_params, code_grid, nearest_codes
    >>> fmt = resolve("int4")
    >>> w = torch.randn(8, 32)
    >>> params = encode_params(w, fmt)              # scale planes chosen for this block
    >>> grid, ok = code_grid(params, fmt, rows=8)    # (8, 16) values, (16,) usable codes
    >>> codes = nearest_codes(w, grid, ok)           # the RTN codes of w
    >>> codes.shape
    torch.Size([8, 32])
"""

from __future__ import annotations

import torch

from ..formats import registry
from ..formats.format import Format
from ..formats.packing import pack

_DATA_PLANES = ("data",)


def block_width(fmt: Format, cols: int) -> int:
    """Columns sharing one scale: the block size, or the whole row (per-channel, palettes)."""
    if fmt.family == "lut":
        return cols
    return fmt.block_size or cols


def encode_params(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The non-data planes the family's encoder picks for fp32 `w` (rows, cols), cols a multiple of
    the block width: scale / zero / lut / lut_scale, exactly as round-to-nearest would store them."""
    options = {} if importance is None else {"importance": importance}
    planes = registry.handler(fmt.family).encode(w.to(torch.float32).contiguous(), fmt, **options)
    return {k: v for k, v in planes.items() if k not in _DATA_PLANES}


def code_grid(params: dict[str, torch.Tensor], fmt: Format, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid, usable): grid[r, c] is the fp32 value code c decodes to in row r under `params`
    (planes of ONE block of columns per row, or a palette's tables); usable[c] is False for codes
    the encoder never emits (the most negative code of a symmetric integer grid), which the
    algorithms avoid so that exporters' symmetric assumptions keep holding."""
    bits = fmt.bits
    n = 1 << bits
    width = n if fmt.family == "lut" or not fmt.block_size else -(-n // fmt.block_size) * fmt.block_size
    codes = (torch.arange(width, device=_device(params)) % n).to(torch.uint8).expand(rows, width)
    fake = {"data": pack(codes.contiguous(), bits)}
    reps = width // (fmt.block_size or width) if fmt.family != "lut" and fmt.block_size else 1
    for k, v in params.items():
        if k in ("scale", "zero") and fmt.family != "lut":
            fake[k] = v.reshape(rows, -1)[:, :1].repeat(1, reps)
        else:
            fake[k] = v
    grid = registry.handler(fmt.family).decode(fake, fmt, rows, width)[:, :n]
    usable = torch.ones(n, dtype=torch.bool, device=grid.device)
    if fmt.family in ("int", "gguf") and fmt.zero == "none" and fmt.element not in ("q4_0", "mxfp4"):
        usable[(1 << (bits - 1)) if bits == 8 else 0] = False  # -2^(bits-1): never emitted
    usable &= torch.isfinite(grid).all(0)  # NaN / Inf codes of the minifloats (fp8 e4m3's 0x7f)
    return grid, usable


def masked_grid(grid: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """The grid with unusable codes at +inf, so a nearest-value search never picks them."""
    return torch.where(usable, grid, torch.full_like(grid, float("inf")))


def nearest_in(w: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """int64 codes (rows, cols): per element, the nearest value of its row in `masked` (rows, n)."""
    return (w[:, :, None] - masked[:, None, :]).abs_().argmin(-1)


def nearest_codes(w: torch.Tensor, grid: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """uint8 codes (rows, cols): per element, the usable grid value of its row nearest to it
    (ties to the lower code)."""
    g = masked_grid(grid, usable)
    best = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    step = max(1, (1 << 22) // max(1, w.shape[0] * grid.shape[1]))  # bound the (rows, step, n) tensor
    for c in range(0, w.shape[1], step):
        best[:, c:c + step] = nearest_in(w[:, c:c + step], g).to(torch.uint8)
    return best


def _device(params: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(params.values())).device
