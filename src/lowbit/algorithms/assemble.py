"""Build a QTensor from chosen codes and per-block parameter planes (the algorithms' common exit).

For block formats (int, mx, gguf) every plane but the LUTs is laid out per row, one column per
block (scale, zero) or per code (data), so blocks chosen separately concatenate along columns.
"""

from __future__ import annotations

import torch

from ..formats import QTensor
from ..formats.format import Format
from ..formats.packing import pack, unpack


def from_codes(codes: torch.Tensor, params: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor],
               fmt: Format, shape: tuple[int, ...]) -> QTensor:
    """QTensor of uint8 `codes` (rows, padded cols) with `params`: one dict of planes for the whole
    tensor, or a list of per-block-column dicts (concatenated along columns)."""
    if isinstance(params, dict):
        planes = dict(params)
    else:
        planes = {k: torch.cat([p[k] for p in params], dim=1) for k in params[0]}
    planes["data"] = pack(codes.to(torch.uint8).contiguous(), fmt.bits)
    return QTensor(planes, fmt, shape)


def codes_of(qt: QTensor) -> torch.Tensor:
    """The unpacked uint8 codes (rows, padded cols) of a QTensor."""
    return unpack(qt.planes["data"], qt.fmt.bits, qt.padded_cols)


def select_blocks(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], take_b: torch.Tensor,
                  fmt: Format, cols: int) -> dict[str, torch.Tensor]:
    """Planes taking, per (row, block), `b`'s block where `take_b` (rows, nblocks) is True, else `a`'s.
    Block formats only (palettes share one table across blocks)."""
    rows, nb = take_b.shape
    bsz = cols // nb
    out = {}
    for k in a:
        if k == "data":
            ca = unpack(a[k], fmt.bits, cols).reshape(rows, nb, bsz)
            cb = unpack(b[k], fmt.bits, cols).reshape(rows, nb, bsz)
            out[k] = pack(torch.where(take_b[..., None], cb, ca).reshape(rows, cols).contiguous(), fmt.bits)
        else:
            out[k] = torch.where(take_b, b[k], a[k])
    return out
