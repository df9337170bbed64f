"""Fused attention and a quantized KV cache: Triton kernels, fp32 reference twins, HF integration.

* `flash_attention(q, k, v, causal=..., scale=..., kv_start=..., kv_end=...)`: FlashAttention-2
  forward (GQA/MQA, head dims 64/80/96/128/256, bf16/fp16, per-batch valid key ranges for padded
  prompts) on a CUDA GPU; the fp32 SDPA reference elsewhere. One or a few query tokens (decoding
  on a float cache, speculative decoding's drafts) run flash-decoding
  (`triton_decode.decode_attention_float`).
* `decode_attention(q, layer)`: one or a few new tokens against a `LowbitKVLayer`'s int8 / int4 planes
  (flash-decoding: split over the sequence, then merged), dequantized in registers.
* `enable(model, attention="lowbit", kv_cache="int8")`: registers "lowbit" in transformers'
  attention registry, switches the model to it, and makes `model.generate` use a `LowbitKVCache`.

What ran is counted per attention module in `lowbit.kernels.PLACEMENT` ("triton" or "reference"),
and `force_backend("attention", "reference")` pins the reference.

Example:
    >>> import torch
    >>> from lowbit.attention import flash_attention
    >>> q = k = v = torch.randn(1, 2, 5, 64)
    >>> flash_attention(q, k, v, causal=True).shape          # CPU: the fp32 reference runs
    torch.Size([1, 2, 5, 64])
"""

from __future__ import annotations

import functools

import torch

from .reference import attention_reference, dequantize_kv, quantize_kv

__all__ = ["flash_attention", "decode_attention", "attention_reference", "quantize_kv", "dequantize_kv",
           "enable", "register", "LowbitKVCache", "triton_available", "choose_backend"]


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def choose_backend(device: torch.device, dtype: torch.dtype, head_dim: int, owner: str = "?") -> str:
    """"triton" when the fused kernel can run these inputs, else "reference" (or what
    `force_backend("attention", ...)` pinned)."""
    from ..kernels.registry import _forced

    forced = _forced.get(("attention", owner)) or _forced.get("attention")
    if forced in ("triton", "reference"):
        return forced
    from .triton_prefill_dims import HEAD_DIMS

    ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim in HEAD_DIMS
    return "triton" if ok and triton_available() else "reference"


def _count(owner: str, backend: str) -> None:
    from ..kernels.registry import PLACEMENT

    if not torch.compiler.is_compiling():
        PLACEMENT[owner][backend] += 1


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, kv_start: torch.Tensor | None = None,
                    kv_end: torch.Tensor | None = None, owner: str = "attention") -> torch.Tensor:
    """Attention of q (B, H, Sq, D) over k, v (B, Hkv, Sk, D); (B, H, Sq, D) in q's dtype.

    Causal masking is aligned to the end of the keys; `kv_start` / `kv_end` (B,) give each batch
    row's valid key range (left / right padding); rows that see no key are 0.
    """
    backend = choose_backend(q.device, q.dtype, q.shape[-1], owner)
    _count(owner, backend)
    if backend == "triton":
        from .triton_decode import SPLIT_ROWS, float_decode_ok, split_kernel_wins, run_float_decode

        # a few query tokens (decoding on a float cache), or a short prompt continuing a long cache:
        # split the keys
        if (float_decode_ok(q, k, v, SPLIT_ROWS)
                and split_kernel_wins(q.shape[0], q.shape[2] * q.shape[1] // k.shape[1], k.shape[2])):
            return run_float_decode(q, k, v, causal=causal, scale=scale, kv_start=kv_start, kv_end=kv_end)
        from .triton_prefill import flash_attention_triton

        return flash_attention_triton(q, k, v, causal=causal, scale=scale, kv_start=kv_start, kv_end=kv_end)
    return attention_reference(q, k, v, causal=causal, scale=scale, kv_start=kv_start, kv_end=kv_end)


def decode_attention(q: torch.Tensor, layer, *, scale: float | None = None, kv_start: torch.Tensor | None = None,
                     kv_end: torch.Tensor | None = None, owner: str = "attention", causal: bool = False) -> torch.Tensor:
    """One or a few query tokens per sequence, q (B, H, Sq, D), against a `LowbitKVLayer`'s planes
    (`causal` aligned to the end of the cache; on the fused kernels Sq * H / Hkv <= 64 rows a
    program, up to `reference.SPLIT_ROWS` in blocks of 64)."""
    if getattr(layer, "fused", False) and choose_backend(q.device, q.dtype, q.shape[-1], owner) == "triton":
        from .triton_decode import decode_attention_triton

        _count(owner, "triton")
        kd, ks, vd, vs = layer.planes
        plans = layer.launch_plans() if hasattr(layer, "launch_plans") else None
        return decode_attention_triton(q, kd, ks, vd, vs, layer.length, bits=layer.bits, scale=scale,
                                       kv_start=kv_start, kv_end=kv_end, plans=plans, causal=causal)
    _count(owner, "reference")
    k, v = layer.dequantized()
    return attention_reference(q, k, v, causal=causal, scale=scale, kv_start=kv_start, kv_end=kv_end)


def __getattr__(name: str):
    # the transformers-facing pieces import transformers: load them on first use only
    if name == "LowbitKVCache":
        from .kv_cache import LowbitKVCache

        return LowbitKVCache
    if name in ("enable", "register"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'lowbit.attention' has no attribute {name!r}")
