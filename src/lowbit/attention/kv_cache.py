"""A KV cache stored as int8 / int4 planes, usable by `model.generate` (transformers' Cache API).

Each layer keeps four growing planes, (B, Hkv, capacity, ...): key codes, key scales, value codes,
value scales (layout in `reference.quantize_kv`). New tokens are quantized once, on arrival: on fused
GPU layers with fp16 scales by one Triton launch into the planes (`triton_kv_write`), elsewhere by
`quantize_kv` and copies (the same bits).

Two modes, decided per layer when the first tokens arrive:
* fused (the model runs lowbit's attention on a CUDA GPU with Triton): `update` returns the new
  float states tagged with the layer (`tensor._lowbit_kv`); lowbit's attention function then runs
  the flash-decoding kernel straight on the planes (no float copy of the cache is ever built).
* reference (CPU, or any other attention implementation): `update` returns the dequantized cache,
  like transformers' own quantized caches, so every attention implementation sees the same values.
In both modes the prompt's own attention (prefill) uses the exact float keys and values.

In fused mode with fp16 scales the value codes are stored tile-blocked (`reference.block_tokens`:
(B, Hkv, cap / 128, W, 128), the codes of 128 consecutive tokens contiguous per dimension): the
decode kernel's P @ V product contracts over the tokens and reads its operand straight into the
tensor cores from that layout, and each 128-token tile is one contiguous run in memory (see
`triton_decode`). `dequantized()`, and so the reference twins, see the logical plane unchanged.

Example:
    >>> from lowbit.attention import LowbitKVCache                               # doctest: +SKIP
    >>> out = model.generate(**ids, past_key_values=LowbitKVCache("int8", config=model.config))  # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .reference import (KV_FORMATS, VALUE_BLOCK, dequantize_kv, kv_format, kv_format_misfit,  # noqa: F401
                        model_head_dim, quantize_kv, unblock_tokens, write_block_tokens)

class LowbitKVLayer(DynamicLayer):
    """One decoder layer's quantized keys and values (see the module docstring)."""

    is_croppable = False

    def __init__(self, bits: int = 8, group: int | None = None, scale_dtype: str = "fp16", fused: bool = False):
        super().__init__()
        self.bits, self.group, self.scale_dtype, self.fused_allowed = bits, group, scale_dtype, fused
        self.fused = False
        self.length = 0
        self.planes: list[torch.Tensor] | None = None  # [k codes, k scales, v codes, v scales]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype, self.head_dim = key_states.device, key_states.dtype, key_states.shape[-1]
        self.keys = self.values = torch.tensor([], dtype=key_states.dtype, device=key_states.device)
        self.fused = self.fused_allowed and key_states.is_cuda and _fused_decode_ok(self.head_dim, self.bits, self.group)
        self.is_initialized = True

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        kernel = self._kernel_writes()
        new = None if kernel else [*quantize_kv(k, self.bits, self.group, self.scale_dtype),
                                   *quantize_kv(v, self.bits, self.group, self.scale_dtype)]
        n = k.shape[-2]
        need = self.length + n
        cap = 0 if self.planes is None else self.planes[0].shape[2]
        if need > cap:  # grow by doubling: appends stay amortized O(1); a multiple of 128 tokens keeps the
            # fused decode's tile loads 16 bytes wide (`triton_decode`, CAP) and fills whole value blocks
            cap = -(-max(need, 2 * cap, VALUE_BLOCK) // VALUE_BLOCK) * VALUE_BLOCK
            grown = [self._empty(i, t, cap) for i, t in enumerate(new or self._no_tokens(k))]
            if self.planes is not None:
                for g, old in zip(grown, self.planes):
                    if g.dim() == 5:  # blocked values: the old blocks, whole
                        g[:, :, : old.shape[2]] = old
                    else:
                        g[:, :, : self.length] = old[:, :, : self.length]
            self.planes = grown
        if kernel:
            from .triton_kv_write import quantize_append_triton

            quantize_append_triton(self.planes, self.length, k, v, bits=self.bits, group=self.group,
                                   plans=self.launch_plans())
        else:
            for plane, t in zip(self.planes, new):
                if plane.dim() == 5:
                    write_block_tokens(plane, self.length, t)
                else:
                    plane[:, :, self.length: need] = t
        self.length = need

    def launch_plans(self) -> dict:
        """Remembered kernel launches (`kernels.launch`) for the current planes: a fresh dict whenever
        the planes list was replaced (growth, reorder, batch select, reset), so that no plan outlives
        (or keeps alive) the planes it was made for."""
        held = self.__dict__.get("_plans")
        if held is None or held[0] is not self.planes:
            held = self._plans = (self.planes, {})
        return held[1]

    def _kernel_writes(self) -> bool:
        """Fused layers with fp16 scales quantize new tokens straight into the planes in one Triton
        launch (`triton_kv_write`: same bits as `quantize_kv`; at batch 1 the ~30 small torch ops of
        the reference path cost more host time than the attention)."""
        on_gpu = self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"  # (CPU tests: interpreter)
        return self.fused and self.scale_dtype == "fp16" and on_gpu

    def _no_tokens(self, k: torch.Tensor) -> list[torch.Tensor]:
        """Zero-token planes with the shapes and dtypes `quantize_kv` gives (what `_empty` needs)."""
        B, H, _, D = k.shape
        w, ng = (D if self.bits == 8 else D // 2), D // (self.group or D)
        codes = torch.empty(B, H, 0, w, dtype=torch.int8 if self.bits == 8 else torch.uint8, device=k.device)
        scales = torch.empty(B, H, 0, ng, dtype=torch.float16, device=k.device)
        return [codes, scales, codes, scales]

    def _empty(self, i: int, t: torch.Tensor, cap: int) -> torch.Tensor:
        """An empty plane i (0 k codes, 1 k scales, 2 v codes, 3 v scales) with room for cap tokens."""
        if i == 2 and self._blocked_values():  # tile-blocked value codes (module docstring)
            shape = (*t.shape[:2], cap // VALUE_BLOCK, t.shape[3], VALUE_BLOCK)
            return torch.empty(shape, dtype=t.dtype, device=t.device)
        return torch.empty(*t.shape[:2], cap, t.shape[3], dtype=t.dtype, device=t.device)

    def _blocked_values(self) -> bool:
        """Value codes tile-blocked: fused layers with fp16 scales (the fast decode path's layout)."""
        return self.fused and self.scale_dtype == "fp16"

    def _logical(self, i: int) -> torch.Tensor:
        """Plane i as (B, Hkv, length, ...) (the blocked value plane unblocked: a copy)."""
        p = self.planes[i]
        return (unblock_tokens(p) if p.dim() == 5 else p)[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self.length == 0
        self._append(key_states, value_states)
        if self.fused:
            key_states._lowbit_kv = self  # lowbit's attention reads the planes, not these tensors
            return key_states, value_states
        if first:
            return key_states, value_states
        return self.dequantized()

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, Hkv, length, D) as the planes define them, in the model's dtype."""
        kd, ks, vd, vs = (self._logical(i) for i in range(4))
        return (dequantize_kv(kd, ks, self.bits, self.head_dim, self.dtype),
                dequantize_kv(vd, vs, self.bits, self.head_dim, self.dtype))

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes the planes hold for the cached tokens."""
        if self.planes is None:
            return 0
        return sum(p.numel() // p.shape[2] // (p.shape[-1] if p.dim() == 5 else 1) * self.length * p.element_size()
                   for p in self.planes)

    def reset(self) -> None:
        self.planes, self.length = None, 0
        super().reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.planes is not None:
            self.planes = [p.index_select(0, beam_idx.to(p.device)) for p in self.planes]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.planes is not None:
            self.planes = [p[indices] for p in self.planes]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.planes is not None:
            self.planes = [p.repeat_interleave(repeats, dim=0) for p in self.planes]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LowbitKVCache: cropping (assisted decoding) is not supported; use the float cache")


class LowbitKVCache(Cache):
    """A transformers `Cache` whose layers are `LowbitKVLayer`s; pass it as `past_key_values`.

    Args:
        kind: "int8" (one fp16 scale per token per head) or "int4" (one fp16 scale per 32 values),
            or a variant in `KV_FORMATS` (E8M0 scales: "int8-e8m0", "int4-e8m0").
        config: the model's config; when its attention implementation is "lowbit", layers on a CUDA
            GPU use the fused decode kernel on the planes.

    Example:
        >>> cache = LowbitKVCache("int4")
        >>> cache.layers
        []
    """

    def __init__(self, kind: str = "int8", config=None, fused: bool | None = None):
        bits, group, scale_dtype = kv_format(kind)
        misfit = kv_format_misfit(kind, model_head_dim(config)) if config is not None else None
        if misfit:
            raise ValueError(misfit)
        if fused is None:
            fused = getattr(config, "_attn_implementation", None) == "lowbit"
        self.kind = kind
        super().__init__(layer_class_to_replicate=lambda: LowbitKVLayer(bits, group, scale_dtype, fused))

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def _fused_decode_ok(head_dim: int, bits: int, group: int | None) -> bool:
    from . import triton_available

    g = group or head_dim
    return (triton_available() and head_dim >= 32 and head_dim & (head_dim - 1) == 0
            and g & (g - 1) == 0 and (bits == 8 or g >= 32))
