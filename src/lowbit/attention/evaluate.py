"""How much a quantized KV cache changes a causal LM: KL of next-token distributions, and greedy
generation agreement with the float cache.

`kv_cache_kl` splits each evaluation sequence in two: the first part fills the cache (prefill),
the second part runs as one chunk against it, so every one of its tokens attends to quantized keys
and values (including its own); the reference is the same model with a float cache, i.e. one plain
forward pass. `generation_agreement` runs greedy generation twice (float cache, quantized cache) on
prompts from the built-in corpus and counts the positions where the tokens agree.

Example:
    >>> m = kv_cache_kl(model, ids, kinds=("int8", "int4"))                      # doctest: +SKIP
    >>> m["kv_int8_kl_mean"], m["kv_int4_kl_p99"]                               # doctest: +SKIP
"""

from __future__ import annotations

import torch


def cache_kwarg() -> str:
    """The keyword transformers' forward / generate take a cache under ("cache" from 5.x on)."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES

        return "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
    except ImportError:
        return "past_key_values"


@torch.no_grad()
def kv_cache_kl(model, ids: torch.Tensor, kinds=("int8", "int4"), prefix: int | None = None,
                batch_size: int = 4) -> dict[str, float]:
    """Per-token KL(float cache || quantized cache) over the second part of each sequence in `ids`
    (n, L): mean, p99, max, and top-1 agreement, keyed `kv_<kind>_...`."""
    from .kv_cache import LowbitKVCache

    L = ids.shape[1]
    h = prefix or L // 2
    kw = cache_kwarg()
    device = next(model.parameters()).device
    kls: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    agree: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i: i + batch_size].to(device)
        ref = model(input_ids=x).logits[:, h:].float().log_softmax(-1)
        for kind in kinds:
            cache = LowbitKVCache(kind, config=getattr(model, "config", None))
            model(input_ids=x[:, :h], **{kw: cache}, use_cache=True)
            lq = model(input_ids=x[:, h:], **{kw: cache}, use_cache=True).logits.float().log_softmax(-1)
            kls[kind].append((ref.exp() * (ref - lq)).sum(-1).flatten().clamp(min=0).cpu())
            agree[kind].append((ref.argmax(-1) == lq.argmax(-1)).float().flatten().cpu())
    out = {}
    for kind in kinds:
        v = torch.cat(kls[kind]).double()
        key = "kv_" + kind.replace("-", "_")
        out.update({f"{key}_kl_mean": float(v.mean()), f"{key}_kl_p99": float(torch.quantile(v, 0.99)),
                    f"{key}_kl_max": float(v.max()), f"{key}_top1_agreement": float(torch.cat(agree[kind]).mean())})
    return out


def corpus_prompts(n: int = 20, words: int = 12) -> list[str]:
    """`n` prompts: the first `words` words of sentences from the built-in corpus (eval split)."""
    from ..data import builtin_texts, sentences

    return [" ".join(s.split()[:words]) for s in sentences(builtin_texts("eval"), n, min_words=words + 2)][:n]


@torch.no_grad()
def generation_agreement(model, tokenizer, kind: str = "int8", prompts: list[str] | None = None,
                         new_tokens: int = 16) -> dict[str, float]:
    """Greedy generation with the float cache vs with a `kind` cache on the same prompts.

    Returns `match` (fraction of generated positions with the same token), `prefix` (mean length
    of the identical prefix, as a fraction) and the number of positions."""
    from .kv_cache import LowbitKVCache

    prompts = prompts or corpus_prompts()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    n = enc["input_ids"].shape[1]
    ref = model.generate(**enc, **gen)[:, n:]
    out = model.generate(**enc, **gen, **{cache_kwarg(): LowbitKVCache(kind, config=model.config)})[:, n:]
    same = ref == out
    first_diff = torch.where(same.all(1), same.shape[1], (~same).int().argmax(1))
    return {"match": float(same.float().mean()), "prefix": float(first_diff.float().mean() / same.shape[1]),
            "positions": int(same.numel()), "prompts": len(prompts)}
