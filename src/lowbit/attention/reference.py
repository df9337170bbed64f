"""Reference twins for lowbit's attention kernels, in plain torch (fp32 math).

* `attention_reference`: scaled dot-product attention with GQA, causal masking aligned to the
  end of the keys (query i of Sq sees key j of Sk when j <= i + Sk - Sq) and a per-batch valid key
  range `[kv_start, kv_end)` (left / right padding). Rows that see no key output 0.
* `quantize_kv` / `dequantize_kv`: the KV cache planes (int8 or int4 codes plus one scale per
  token per head, or per block of `group` values along the head dim).

Byte layout of the planes, per (batch, kv head, token):
  int8: `data[..., d]` is the signed code of element d; value = code * scale[d // group].
  int4: `data[..., j]` holds element 2j in its low nibble and 2j+1 in its high nibble, each as
        code + 8 (offset binary, codes in [-7, 7]); value = code * scale[d // group].
  scale: fp16 (the scale itself) or E8M0 (uint8 e, scale = 2 ** (e - 127)).

Example:
    >>> import torch
    >>> k = torch.randn(1, 2, 5, 64)
    >>> data, scale = quantize_kv(k, bits=8)
    >>> (dequantize_kv(data, scale, bits=8, head_dim=64) - k).abs().max() < 0.05
    tensor(True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QMAX = {8: 127, 4: 7}

# kv_cache name -> (bits, scale group along the head dim (None = one per token per head), scale dtype)
KV_FORMATS = {
    "int8": (8, None, "fp16"),   # 8 bits + one fp16 scale per token per head: 8.25 bits/value at D = 64
    "int4": (4, 32, "fp16"),     # 4 bits + one fp16 scale per 32 values: 4.5 bits/value
    "int8-e8m0": (8, None, "e8m0"),
    "int4-e8m0": (4, 32, "e8m0"),
    "int4-token": (4, None, "fp16"),
}


# the most (query head, token) rows one program of the flash-decoding kernels holds: Sq * H / Hkv
# (`triton_decode`); more rows go in blocks of this many (up to SPLIT_ROWS) or to the prefill kernel
DECODE_ROWS = 64

# rows (query heads of a kv head x query tokens) up to which the split kernels take a call, in blocks
# of DECODE_ROWS rows: a prompt continuing a cache (multi-turn chat, chunked prefill); `flash_attention`
# and the HF attention send such calls there where `split_kernel_wins`
SPLIT_ROWS = 512


def split_kernel_wins(batch: int, rows: int, keys: int, quantized: bool = False) -> bool:
    """Whether the split kernel beats the prefill kernel for `rows` query rows per kv head (heads x
    tokens) over `keys` keys: always for up to DECODE_ROWS rows (one program's), else for caches of
    512+ keys with few rows in all, where the prefill kernel's (query block, batch, head) programs
    leave most SMs idle. H200, GQA 32/8, D = 128 (RESULTS.md, sessions 33-34): on a float cache the
    split kernel was 1.1x-3.2x faster up to batch x rows = 256 from 512 keys (e.g. 32 tokens over
    2048 keys 30.3 -> 14.2 us) and 512 from 16384, 0.45x-0.93x beyond. `quantized` (an int8 / int4
    cache, against dequantizing it for the prefill kernel): up to 256 rows at any batch (each block of
    rows decodes the tiles again: int8 1.21x-3.39x faster at 128-256 rows for batch 1-8 and 512-16384
    keys, 0.73x-0.89x at 512).

    Example:
        >>> split_kernel_wins(1, 128, 2048), split_kernel_wins(4, 128, 4096), split_kernel_wins(4, 64, 512)
        (True, False, True)
        >>> split_kernel_wins(1, 512, 16384), split_kernel_wins(1, 512, 16384, quantized=True)
        (True, False)
        >>> split_kernel_wins(4, 256, 2048, quantized=True), split_kernel_wins(1, 128, 256)
        (True, False)
    """
    if rows <= DECODE_ROWS:
        return True
    if keys < 512:  # not measured below 512 keys: the prefill kernel, as before
        return False
    if quantized:
        return rows <= 256
    return rows <= SPLIT_ROWS and batch * rows <= (512 if keys >= 16384 else 256)


def kv_format_misfit(name: str, head_dim: int | None) -> str | None:
    """Why the KV cache format `name` cannot store heads of `head_dim` values (a sentence naming
    the fix), or None where it can (or the head dim is unknown).

    Example:
        >>> kv_format_misfit("int4", 128) is None, kv_format_misfit("int8", 80) is None
        (True, True)
        >>> kv_format_misfit("int4", 80)[:47]
        "kv_cache='int4' stores one scale per 32 values "
    """
    bits, group, _ = kv_format(name)
    if not head_dim or (head_dim % (group or head_dim) == 0 and (bits == 8 or head_dim % 2 == 0)):
        return None
    return (f"kv_cache={name!r} stores one scale per {group or head_dim} values of the head dim, and this model's "
            f"head dim {head_dim} is not a multiple of it; use kv_cache='int8' or 'int4-token' (one scale per token)")


def model_head_dim(config) -> int | None:
    """A transformers config's attention head dim (`head_dim`, else hidden_size / heads), or None."""
    hd = getattr(config, "head_dim", None)
    if isinstance(hd, int) and hd > 0:
        return hd
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None


def kv_format(name: str) -> tuple[int, int | None, str]:
    """(bits, group, scale dtype) for a kv_cache name; the error lists the names.

    Example:
        >>> kv_format("int4")
        (4, 32, 'fp16')
    """
    try:
        return KV_FORMATS[name]
    except KeyError:
        raise ValueError(f"kv_cache={name!r}: unknown; expected one of {sorted(KV_FORMATS)}") from None


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        scale: float | None = None, kv_start: torch.Tensor | None = None,
                        kv_end: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 SDPA over (B, H, Sq, D) queries and (B, Hkv, Sk, D) keys/values; returns q's dtype.

    Example:
        >>> q = torch.randn(1, 4, 3, 64); k = v = torch.randn(1, 2, 3, 64)
        >>> attention_reference(q, k, v, causal=True).shape
        torch.Size([1, 4, 3, 64])
    """
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"attention: {H} query heads are not a multiple of {Hkv} key/value heads")
    masked = (causal and Sq > 1) or kv_start is not None or kv_end is not None  # (one causal query sees all)
    allowed = attention_mask_from_ranges(B, Sq, Sk, causal, kv_start, kv_end, q.device) if masked else None
    # PyTorch's SDPA in fp32 with GQA native (`enable_gqa`: the kv heads are not copied per query
    # head; one decode call over 2000 keys, GQA 9 / 3, took 1.03 ms with explicit repeats and softmax,
    # 0.26 ms so on this project's 2-core CPU); rows with no visible key -> 0 (CPU SDPA writes 0 there,
    # the math backend NaN)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed,
                                         scale=scale if scale is not None else D ** -0.5, enable_gqa=H != Hkv)
    return out.nan_to_num(0.0).to(q.dtype)


def attention_mask_from_ranges(B: int, Sq: int, Sk: int, causal: bool, kv_start, kv_end, device) -> torch.Tensor:
    """(B, 1, Sq, Sk) bool: key j visible to query i (causal aligned to the end, valid key range)."""
    j = torch.arange(Sk, device=device)
    i = torch.arange(Sq, device=device)
    allowed = torch.ones(B, 1, Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        allowed &= (j[None, :] <= i[:, None] + (Sk - Sq))[None, None]
    if kv_start is not None:
        allowed &= (j[None, :] >= kv_start.to(device).long()[:, None])[:, None, None, :]
    if kv_end is not None:
        allowed &= (j[None, :] < kv_end.to(device).long()[:, None])[:, None, None, :]
    return allowed


def _scale_of(amax: torch.Tensor, bits: int, scale_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored scale plane, the fp32 scale it means) for block maxima `amax`."""
    s = amax.float() / QMAX[bits]
    if scale_dtype == "fp16":
        stored = s.clamp(max=65504.0).to(torch.float16)
        return stored, stored.float()
    if scale_dtype == "e8m0":  # the smallest power of two >= s, so codes never clip
        e = torch.ceil(torch.log2(s.clamp(min=2.0 ** -126))).clamp(-127, 127)
        stored = (e + 127).to(torch.uint8)
        return stored, torch.exp2(e)
    raise ValueError(f"kv cache: scale_dtype={scale_dtype!r}; expected 'fp16' or 'e8m0'")


def quantize_kv(x: torch.Tensor, bits: int = 8, group: int | None = None,
                scale_dtype: str = "fp16") -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) planes for x (..., D): symmetric codes, one scale per `group` values of the
    head dim (None = one per token per head). int8 data is int8 (..., D), int4 data uint8 (..., D/2).

    Example:
        >>> d, s = quantize_kv(torch.randn(2, 3, 7, 64), bits=4, group=32)
        >>> d.shape, d.dtype, s.shape
        (torch.Size([2, 3, 7, 32]), torch.uint8, torch.Size([2, 3, 7, 2]))
    """
    if bits not in QMAX:
        raise ValueError(f"kv cache: bits={bits}; expected 8 or 4")
    D = x.shape[-1]
    group = group or D
    if D % group or (bits == 4 and D % 2):
        raise ValueError(f"kv cache: head dim {D} is not a multiple of the scale group {group}")
    xs = x.float().reshape(*x.shape[:-1], D // group, group)
    stored, s = _scale_of(xs.abs().amax(-1), bits, scale_dtype)
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(xs / s[..., None]).clamp(-QMAX[bits], QMAX[bits]).reshape(x.shape)
    if bits == 8:
        return codes.to(torch.int8), stored
    u = (codes + 8).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)), stored


def dequantize_kv(data: torch.Tensor, scale: torch.Tensor, bits: int, head_dim: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values the planes mean, (..., head_dim) in `dtype` (the definition every kernel follows)."""
    if bits == 8:
        codes = data.float()
    else:
        lo = (data & 0xF).float() - 8
        hi = (data >> 4).float() - 8
        codes = torch.stack((lo, hi), dim=-1).reshape(*data.shape[:-1], head_dim)
    s = torch.exp2(scale.float() - 127) if scale.dtype == torch.uint8 else scale.float()
    ng = s.shape[-1]
    out = codes.reshape(*codes.shape[:-1], ng, head_dim // ng) * s[..., None]
    return out.reshape(*codes.shape[:-1], head_dim).to(dtype)


# Tile-blocked value codes: how `LowbitKVCache` stores the value plane for the fused decode kernel.
# The logical plane (B, Hkv, cap, W) becomes (B, Hkv, cap / block, W, block): the codes of
# `block` consecutive tokens are contiguous per dimension w, and one tile (all W dims of those
# tokens) is one contiguous run of W * block bytes. The kernel's P @ V product contracts over the
# tokens, so it wants them contiguous (token-major); blocking also keeps each tile's bytes together
# in device memory (token-major rows of the whole capacity put each dim's 128-byte piece of a tile
# `cap` bytes apart: 2-5 % slower on an H200, benchmarks/RESULTS.md).
VALUE_BLOCK = 128


def block_tokens(plane: torch.Tensor, block: int = VALUE_BLOCK) -> torch.Tensor:
    """(B, Hkv, cap, W) -> (B, Hkv, cap // block, W, block), contiguous (cap a multiple of block).

    Example:
        >>> p = torch.arange(8).reshape(1, 1, 4, 2)
        >>> block_tokens(p, 2)[0, 0].tolist()   # tokens 0-1, then 2-3; each row one dim
        [[[0, 2], [1, 3]], [[4, 6], [5, 7]]]
        >>> torch.equal(unblock_tokens(block_tokens(p, 2)), p)
        True
    """
    B, H, cap, W = plane.shape
    if cap % block:
        raise ValueError(f"block_tokens: capacity {cap} is not a multiple of the block ({block} tokens)")
    return plane.reshape(B, H, cap // block, block, W).transpose(-1, -2).contiguous()


def unblock_tokens(blocked: torch.Tensor) -> torch.Tensor:
    """The logical plane (B, Hkv, cap, W) of a `block_tokens` plane (a copy)."""
    B, H, nb, W, block = blocked.shape
    return blocked.transpose(-1, -2).reshape(B, H, nb * block, W)


def write_block_tokens(blocked: torch.Tensor, start: int, t: torch.Tensor) -> None:
    """Store t (B, Hkv, n, W) as tokens start .. start + n - 1 of a `block_tokens` plane.

    Example:
        >>> b = torch.zeros(1, 1, 2, 1, 2, dtype=torch.int64)
        >>> write_block_tokens(b, 1, torch.tensor([[[[7], [8]]]]))
        >>> unblock_tokens(b).flatten().tolist()
        [0, 7, 8, 0]
    """
    block, count = blocked.shape[-1], t.shape[2]
    first = start // block
    if (start + count - 1) // block == first:  # inside one block (a decode step's append): one strided
        off = start - first * block            # copy, no index tensors (an index_put is ~4 small kernels)
        blocked[:, :, first, :, off: off + count] = t.transpose(2, 3).to(blocked.dtype)
        return
    n = torch.arange(start, start + count, device=blocked.device)
    blocked[:, :, n // block, :, n % block] = t.permute(2, 0, 1, 3).to(blocked.dtype)
