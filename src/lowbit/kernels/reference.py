"""Reference backend: dequantize (only what is needed), then the plain torch op. Always present.

No dequantized copy is kept between calls: the float weight lives only for the op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import QTensor
from .registry import register


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float32


@register("*", "linear", "*", "reference")
def linear(x: torch.Tensor, qweight: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    dtype = _compute_dtype(x)
    # math in fp32, then the activation dtype; fp16 activations with weights beyond fp16's range
    # get bf16 weights rather than infinities
    w = qweight.dequantize(torch.float32)
    if dtype == torch.float16 and w.abs().max() > torch.finfo(torch.float16).max:
        return F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16)).to(dtype)
    return F.linear(x, w.to(dtype), None if bias is None else bias.to(dtype))


def silu_mul_pairs(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for outputs whose last dimension holds (gate, up) pairs (column 2j gate j,
    2j + 1 up j: a gated MLP's joined projection, `lowbit.nn.gated`), in y's dtype as the unfused
    model computes `act_fn(gate) * up` (so a gated MLP off the fused kernel gives the unfused
    numbers exactly); the reference twin of the GEMV's GLU epilogue, which takes it from the fp32
    sums instead (one rounding fewer).

    Example:
        >>> import torch
        >>> silu_mul_pairs(torch.tensor([[0.0, 5.0, 2.0, 1.0]]))
        tensor([[0.0000, 1.7616]])
    """
    return F.silu(y[..., 0::2]) * y[..., 1::2]


@register("*", "embedding", "*", "reference")
def embedding(ids: torch.Tensor, qweight: QTensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `ids` of the table; only those rows are dequantized."""
    flat = ids.reshape(-1)
    uniq, inverse = torch.unique(flat, return_inverse=True)
    rows = take_rows(qweight, uniq).dequantize(torch.float32).to(out_dtype)
    return rows[inverse].reshape(*ids.shape, qweight.cols)


def take_rows(qt: QTensor, idx: torch.Tensor) -> QTensor:
    """A QTensor of the rows `idx` (any order): per-row planes gathered, LUTs gathered per group."""
    planes = {}
    g = qt.fmt.group_size if qt.fmt.family == "lut" else 0
    n_luts = qt.planes["lut"].shape[0] if "lut" in qt.planes else 0
    for name, p in qt.planes.items():
        if name in ("lut", "lut_scale"):
            planes[name] = p[idx // g] if g else p
        else:
            planes[name] = p[idx]
    fmt = qt.fmt
    if g and n_luts:
        fmt = fmt.replace(group_size=1)  # each gathered row now carries its own LUT
    return QTensor(planes, fmt, (idx.numel(), *qt.shape[1:]))
