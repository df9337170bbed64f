"""lowbit attention as a Hugging Face attention implementation ("lowbit"), and `enable(model)`.

`register()` adds `lowbit_attention_forward` to transformers' `AttentionInterface` (and the SDPA
mask builder to `AttentionMaskInterface` under the same name), so any model whose attention goes
through the registry (Llama family, BERT family, ...) runs it with `attn_implementation="lowbit"`
and no code change. The function turns HF's boolean mask into per-batch valid key ranges, which is
what padded batches produce (left padding for generation, right padding for encoders); a mask of
any other shape (sliding windows, custom masks) runs the reference with the mask as given.

Example:
    >>> import lowbit.attention as la                                           # doctest: +SKIP
    >>> la.enable(model, attention="lowbit", kv_cache="int8")                   # doctest: +SKIP
    >>> model.generate(**ids, max_new_tokens=20)    # fused kernels on GPU, reference on CPU  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import functools
import types
import weakref

import torch
import torch.nn.functional as F

from . import _count, choose_backend, decode_attention, flash_attention
from .reference import attention_mask_from_ranges, split_kernel_wins

NAME = "lowbit"


@functools.cache
def register() -> str:
    """Register "lowbit" with transformers (idempotent); returns the implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, lowbit_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


_last: list = [None, None, None]  # [weakref to the mask, (Sq, Sk, causal), result]: layers share one mask


def _ranges(mask: torch.Tensor | None, B: int, Sq: int, Sk: int, causal: bool):
    """(ok, kv_start, kv_end): the mask as per-batch valid key ranges, or ok=False when it is not one.

    Every layer of a forward pass gets the same mask object: the check (which syncs with the GPU)
    runs once per mask, not once per layer."""
    if mask is None:
        return True, None, None
    if _last[0] is not None and _last[0]() is mask and _last[1] == (B, Sq, Sk, causal):
        return _last[2]
    res = _ranges_uncached(mask, B, Sq, Sk, causal)
    _last[:] = [weakref.ref(mask), (B, Sq, Sk, causal), res]
    return res


def _ranges_uncached(mask: torch.Tensor, B: int, Sq: int, Sk: int, causal: bool):
    m = mask if mask.dtype == torch.bool else mask == 0  # additive float masks: 0 keeps, -inf / min drops
    if m.dim() != 4 or m.shape[1] != 1:
        return False, None, None
    m = m.expand(B, 1, Sq, Sk)
    keys = m[:, 0].any(dim=1)  # (B, Sk): keys some query sees
    has = keys.any(dim=1)
    start = torch.where(has, keys.int().argmax(dim=1), 0).to(torch.int32)
    end = torch.where(has, Sk - keys.flip(1).int().argmax(dim=1), 0).to(torch.int32)
    if not torch.equal(attention_mask_from_ranges(B, Sq, Sk, causal, start, end, m.device), m):
        return False, None, None
    if bool((start == 0).all()) and bool((end == Sk).all()):
        return True, None, None
    return True, start, end


def _owner(module) -> str:
    return getattr(module, "_lowbit_attention_name", None) or f"{type(module).__name__}.{getattr(module, 'layer_idx', '?')}"


def lowbit_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: q (B, H, Sq, D), k/v (B, Hkv, Sk, D) -> ((B, Sq, H, D), None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{_owner(module)}: lowbit attention does not support softcap (Gemma-2's logit capping); "
                         "use attn_implementation='eager' (on the command line: leave out --attention lowbit)")
    owner = _owner(module)
    B, H, Sq, D = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    layer = getattr(key, "_lowbit_kv", None)
    if layer is not None and layer.length > Sq:  # earlier tokens live in the quantized planes only
        Sk = layer.length
        ok, start, end = _ranges(attention_mask, B, Sq, Sk, causal)
        rows = Sq * H // key.shape[1]  # query rows per kv head
        # a few new tokens, or a short prompt continuing a long cache: the planes as they are
        if ok and dropout == 0.0 and split_kernel_wins(B, rows, Sk, quantized=True):
            out = decode_attention(query, layer, scale=scaling, kv_start=start, kv_end=end, owner=owner,
                                   causal=causal)
            return out.transpose(1, 2).contiguous(), None
        key, value = layer.dequantized()  # a longer prompt on a cache, or an unusual mask
    Sk = key.shape[2]
    ok, start, end = _ranges(attention_mask, B, Sq, Sk, causal)
    if ok and dropout == 0.0 and kwargs.get("sliding_window") is None and kwargs.get("s_aux") is None:
        out = flash_attention(query, key, value, causal=causal, scale=scaling, kv_start=start, kv_end=end, owner=owner)
        return out.transpose(1, 2).contiguous(), None
    _count(owner, "reference")  # anything else: fp32 SDPA with the mask as HF built it
    mask = attention_mask
    if mask is None and causal and Sq > 1:
        mask = attention_mask_from_ranges(B, Sq, Sk, True, None, None, query.device)
    elif mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    out = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask,
                                         dropout_p=dropout, scale=scaling, enable_gqa=H != key.shape[1])
    return out.nan_to_num(0.0).to(query.dtype).transpose(1, 2).contiguous(), None


def enable(model: torch.nn.Module, attention: str | None = "lowbit", kv_cache: str | None = None) -> torch.nn.Module:
    """Switch a transformers model to lowbit attention and/or a quantized KV cache, in place.

    Args:
        attention: "lowbit" (fused kernels on GPU, reference on CPU, counted in PLACEMENT) or None
            (leave the model's attention as it is).
        kv_cache: "int8", "int4" (or a name in `kv_cache.KV_FORMATS`), or None (float cache).
            `model.generate` then builds a `LowbitKVCache` unless given `past_key_values`.

    Example:
        >>> enable(model, attention="lowbit", kv_cache="int8")                   # doctest: +SKIP
    """
    config = getattr(model, "config", None)
    if attention not in (None, "lowbit"):
        raise ValueError(f"attention={attention!r}: expected 'lowbit' or None")
    if attention == "lowbit":
        if config is None:
            raise ValueError("enable(attention='lowbit'): the model has no transformers config")
        register()
        config = _own_config(model, config)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(NAME)
        else:  # pragma: no cover - older transformers
            config._attn_implementation = NAME
        for name, m in model.named_modules():  # PLACEMENT names attention by module path
            if hasattr(m, "is_causal") and any(hasattr(m, a) for a in ("q_proj", "query", "qkv_proj", "Wqkv")):
                m._lowbit_attention_name = name
    if kv_cache is not None:
        from .reference import kv_format_misfit, model_head_dim

        misfit = kv_format_misfit(kv_cache, model_head_dim(getattr(model, "config", None)))  # a bad name fails here too
        if misfit:
            raise ValueError(misfit)
        if not hasattr(model, "generate"):
            raise ValueError(f"kv_cache={kv_cache!r}: the model has no generate(); a KV cache needs a generating model")
        model._lowbit_kv_cache = kv_cache
        if not getattr(model, "_lowbit_generate_wrapped", False):
            original = model.generate

            def generate(self, *args, **kw):
                from .evaluate import cache_kwarg

                if all(kw.get(k) is None for k in ("cache", "past_key_values")) and getattr(self, "_lowbit_kv_cache", None):
                    kw[cache_kwarg()] = make_cache(self)
                return original(*args, **kw)

            model.generate = types.MethodType(generate, model)
            model._lowbit_generate_wrapped = True
    return model


def _own_config(model: torch.nn.Module, config):
    """Give `model` (and every submodule that shares it) a private copy of its config.

    transformers models built from one config object share it, and the attention implementation
    is read from the config at every forward: switching one model would switch all of them (a
    "SDPA" peer built from the same config would silently run lowbit attention).
    """
    own = copy.deepcopy(config)
    swap = {id(config): own}
    for name in getattr(config, "sub_configs", {}) or {}:  # multimodal: text_config, vision_config, ...
        old, new = getattr(config, name, None), getattr(own, name, None)
        if old is not None and new is not None:
            swap[id(old)] = new
    for m in model.modules():
        if id(getattr(m, "config", None)) in swap:
            m.config = swap[id(m.config)]
    return own


def make_cache(model: torch.nn.Module, kind: str | None = None):
    """A fresh `LowbitKVCache` for `model` (kind defaults to what `enable` set), or None."""
    kind = kind or getattr(model, "_lowbit_kv_cache", None)
    if not kind:
        return None
    from .kv_cache import LowbitKVCache

    return LowbitKVCache(kind, config=getattr(model, "config", None))


