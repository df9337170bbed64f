"""AWQ: activation-aware per-input-channel scaling, searched on calibration data and folded away.

A channel whose inputs are large matters more; scaling its weight column up by s_k (and its input
down by 1/s_k) gives it a finer share of the block's grid at no cost in float:
    y = (x / s) @ (W * s)^T  ==  x @ W^T.
The scales are s = mean|x|^a (normalised so that max * min = 1), with `a` searched on a grid in
[0, 1) for the least output error of the layers that read this input, each quantized with its own
format (Lin et al., 2023). a = 0 (s = 1, plain round-to-nearest) is always a candidate, so the
search never does worse than RTN on the calibration inputs.

The 1/s is folded exactly into the op that produces the input: a norm's weight (and bias), or the
rows of a preceding linear (up_proj before down_proj, v_proj before o_proj). With grouped-query
attention, o_proj's input channels of the q-heads sharing one kv-head must share one scale; `tie`
averages them so the fold stays exact.

Example:
    >>> import torch
    >>> from lowbit.algorithms.awq import search_scales
    >>> x = torch.randn(256, 64) * torch.linspace(0.1, 4, 64)      # uneven channel magnitudes
    >>> s = search_scales(x, [torch.randn(32, 64)], ["int4"])
    >>> s.shape
    torch.Size([64])
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .._threads import single_thread
from ..formats import quantize_tensor
from ..formats.format import Format

GRID = 20


def search_scales(x: torch.Tensor, weights: list[torch.Tensor], fmts: list["str | Format"], *,
                  grid: int = GRID, tie: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-input-channel scales s (K,) for the layers `weights` (each (rows_i, K)) reading inputs
    `x` (n, K): the s = mean|x|^a, a in {0, 1/grid, ...}, with the least squared output error after
    quantizing each W * s with its format. Returns ones when no a > 0 helps."""
    with single_thread(x.device, x.numel() <= 1 << 22):
        return _search(x, weights, fmts, grid, tie)


def _search(x, weights, fmts, grid, tie):
    x = x.to(torch.float32)
    ws = [w.detach().to(device=x.device, dtype=torch.float32) for w in weights]
    mean_abs = x.abs().mean(0).clamp(min=1e-8)
    ref = [x @ w.T for w in ws]
    best_s, best_err = torch.ones_like(mean_abs), None
    for r in range(grid):
        a = r / grid
        s = mean_abs.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if tie is not None:
            s = tie(s)
        err = 0.0
        for w, y, fmt in zip(ws, ref, fmts):
            wq = quantize_tensor(w * s, fmt, pad=True).dequantize()[:, : w.shape[1]] / s
            err += float(((x @ wq.T - y) ** 2).mean())
        if best_err is None or err < best_err:
            best_s, best_err = (s if r else torch.ones_like(s)), err
    return best_s


def gqa_tie(n_kv_heads: int, rep: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Make o_proj input scales equal across the `rep` q-heads sharing each kv-head (geometric mean)."""
    def tie(s: torch.Tensor) -> torch.Tensor:
        t = s.reshape(n_kv_heads, rep, head_dim).log().mean(1, keepdim=True).exp()
        return t.expand(n_kv_heads, rep, head_dim).reshape(-1)
    return tie


@torch.no_grad()
def norm_weight_offset(norm: nn.Module) -> float:
    """What a norm adds to its weight before scaling: 1.0 for Gemma-style RMSNorms (x_hat * (1 + w)),
    0.0 for the usual x_hat * w; found by running the norm once with its weight set to zero.

    Example:
        >>> norm_weight_offset(nn.LayerNorm(8))
        0.0
    """
    w = norm.weight
    saved = w.detach().clone()
    try:
        w.zero_()
        x = torch.randn(2, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
        out = norm(x)
    finally:
        w.copy_(saved)
    bias = getattr(norm, "bias", None)
    if bias is not None:
        out = out - bias
    return 1.0 if bool(out.abs().amax() > 0) else 0.0


@torch.no_grad()
def fold(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor, *,
         gqa: tuple[int, int, int] | None = None) -> None:
    """Divide `producer`'s output channels by s and multiply the consumers' input columns by s.

    `producer`: a norm (1-D weight, optional bias; Gemma's x_hat * (1 + w) too: w becomes
    (1 + w) / s - 1, see `norm_weight_offset`) or a linear (its rows and bias). For a
    grouped-query v_proj -> o_proj fold pass `gqa = (n_kv_heads, rep, head_dim)`: s then has
    o_proj's width with equal values within each group (see `gqa_tie`), and v_proj's rows take
    one value per (kv-head, dim).
    """
    s = s.to(torch.float32)
    out_s = s
    if gqa is not None:
        n_kv, rep, hd = gqa
        out_s = s.reshape(n_kv, rep, hd)[:, 0, :].reshape(-1)
    w = producer.weight
    offset = norm_weight_offset(producer) if w.dim() == 1 else 0.0
    if offset:  # x_hat * (1 + w) / s = x_hat * (1 + w'), w' = (1 + w) / s - 1, in fp32
        w.copy_(((w.float() + offset) / out_s - offset).to(w.dtype))
    else:
        w.div_((out_s.reshape(-1, 1) if w.dim() == 2 else out_s).to(w.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(out_s.to(producer.bias.dtype))
    for c in consumers:
        c.weight.mul_(s.to(c.weight.dtype).reshape(1, -1))
