"""Build a QTensor from chosen codes and per-block parameter planes (the algorithms' common exit).

For block formats (int, mx, gguf) every plane but the LUTs is laid out per row, one column per
block (scale, zero) or per code (data), so blocks chosen separately concatenate along columns.
"""

from __future__ import annotations

import torch

from ..formats import QTensor
from ..formats.format import Format
from ..formats.packing import pack


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
