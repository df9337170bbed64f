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


# The most bytes of fp32 weight the reference dequantizes at once on CPU: a larger float copy comes
# from freshly mapped memory on every call (glibc maps allocations above 32 MiB anew each time) and
# its page faults cost several times the matmul (SmolLM2's 49152 x 576 int8 lm_head at M = 1 on this
# project's 2-core CPU: 76-88 ms a call against 11 ms for fp32 F.linear; in 4 MiB chunks 6.6-10 ms,
# in 1 / 2 / 8 MiB chunks 12.5 / 8.6 / 9.5 ms, and small layers pay the chunks' per-call overhead:
# RESULTS.md, session 32, CPU).
CHUNK_BYTES = 4 << 20


@register("*", "linear", "*", "reference")
def linear(x: torch.Tensor, qweight: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the dequantized weight (math in fp32, then the activation dtype). Large weights
    on CPU are dequantized CHUNK_BYTES of rows at a time, each chunk's outputs computed as the whole
    weight's would be (the same dot products over all of K).

    Example:
        >>> import torch, lowbit
        >>> qw = lowbit.quantize_tensor(torch.randn(8, 64), "int8")
        >>> bool(torch.allclose(linear(torch.ones(1, 64), qw), torch.ones(1, 64) @ qw.dequantize().T))
        True
    """
    dtype = _compute_dtype(x)
    rows, cols = qweight.shape if len(qweight.shape) == 2 else (0, 0)
    step = _chunk_rows(qweight, cols)
    if (x.device.type != "cpu" or dtype == torch.float16 or not step or rows <= step
            or torch.compiler.is_compiling()):  # (Inductor plans its own buffers)
        return _linear_whole(x, qweight, bias, dtype)
    out = torch.empty(*x.shape[:-1], rows, dtype=dtype, device=x.device)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        out[..., r0:r1] = _linear_whole(x, qweight[r0:r1], None if bias is None else bias[r0:r1], dtype)
    return out


def _chunk_rows(qweight: QTensor, cols: int) -> int:
    """Rows per chunk of `linear` (whole palette groups for LUT formats); 0 for a 1-D weight."""
    if not cols:
        return 0
    g = (qweight.fmt.group_size if qweight.fmt.family == "lut" else 0) or 1  # (0: one LUT for all rows)
    return max(g, CHUNK_BYTES // (4 * cols) // g * g)


def _linear_whole(x: torch.Tensor, qweight: QTensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    # fp16 activations with weights beyond fp16's range get bf16 weights rather than infinities
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
