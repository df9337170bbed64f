"""CPU fast paths built on the int8 matmul that ships inside PyTorch.

`torch._weight_int8pack_mm(x, w_int8, scales)` computes x @ w^T * scales with an int8 weight and
per-output-channel scales, which is exactly the `int8` preset's meaning (w = q * scale, q the
two's-complement data plane, so the plane is passed as is: no repack, no copy). The kernel is fast
with bf16 activations; fp32 activations are rounded to bf16 for the product and the result is
returned in fp32 (relative error ~ 2^-9, the same as running the layer in bf16).
"""

from __future__ import annotations

import torch

from ..formats import Format, QTensor
from .registry import register


def _int8_per_channel(fmt: Format, shape: tuple[int, ...] | None) -> bool:
    # PyTorch 2.13's CPU kernel crashes (SIGSEGV) for more than one row when K is not a multiple
    # of 16 (seen at K = 8, 72, 200); such layers take the reference path.
    k_ok = shape is None or (len(shape) == 2 and shape[1] % 16 == 0)
    return fmt.family == "int" and fmt.element == "int8" and fmt.block_size is None and fmt.zero == "none" and k_ok


@register("int", "linear", "cpu", "cpu_fast", supports=_int8_per_channel)
def int8_linear(x: torch.Tensor, qweight: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # inductor (torch 2.13) fails to lower _weight_int8pack_mm fed by a fused cast; under
        # torch.compile the reference path is traced instead (same numbers as the eager reference)
        from .reference import linear

        return linear(x, qweight, bias)
    out_dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    w = qweight.data.view(torch.int8)
    s = qweight.scale.reshape(-1).to(torch.bfloat16)
    y = torch._weight_int8pack_mm(x2, w, s).to(out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])
