"""lowbit attention inside Hugging Face models (attn_implementation="lowbit") and the quantized KV
cache under `model.generate`, on tiny seeded Llama / BERT models (head dim 64).

On CPU the reference path runs (and PLACEMENT says so); on a CUDA machine the same tests run the
fused kernels in bf16 and check PLACEMENT says "triton".
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
transformers = pytest.importorskip("transformers")

import lowbit.attention as la  # noqa: E402
from lowbit.kernels import PLACEMENT  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
DT = torch.bfloat16 if CUDA else torch.float32
BACKEND = "triton" if CUDA else "reference"
TOL = 3e-2 if CUDA else 1e-4


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=300, max_position_embeddings=256,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval().to(DEV, DT)


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                  vocab_size=300, max_position_embeddings=160, attn_implementation="sdpa")
    return transformers.BertModel(cfg, add_pooling_layer=False).eval().to(DEV, DT)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _left_padded(gen, lengths=(17, 9, 1), vocab=300):
    S = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), S), generator=gen)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, S - n:] = 1
    return ids.to(DEV), mask.to(DEV)


@torch.no_grad()
def test_llama_lowbit_attention_matches_sdpa_with_left_padding(gen):
    model = _llama()
    ids, mask = _left_padded(gen)
    ref = model(input_ids=ids, attention_mask=mask).logits
    la.enable(model, attention="lowbit")
    assert model.config._attn_implementation == "lowbit"
    PLACEMENT.clear()
    out = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert _rel(out[keep], ref[keep]) < TOL
    assert dict(PLACEMENT["model.layers.0.self_attn"]) == {BACKEND: 1}


@torch.no_grad()
def test_bert_lowbit_attention_matches_sdpa_with_right_padding(gen):
    model = _bert()
    ids = torch.randint(1, 300, (3, 130), generator=gen).to(DEV)
    mask = torch.ones(3, 130, dtype=torch.long, device=DEV)
    mask[1, 100:] = 0
    mask[2, 7:] = 0
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    la.enable(model, attention="lowbit")
    PLACEMENT.clear()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert _rel(out[keep], ref[keep]) < TOL
    assert dict(PLACEMENT["encoder.layer.0.attention.self"]) == {BACKEND: 1}


@torch.no_grad()
def test_generate_with_int8_cache_follows_the_float_cache(gen):
    """Greedy decoding on a left-padded batch: the int8 cache's next-token logits stay close to the
    float cache's at every step, and the decode steps run the fused kernel on GPU."""
    from lowbit.attention.evaluate import cache_kwarg
    from lowbit.attention.kv_cache import LowbitKVCache

    model = _llama()
    ids, mask = _left_padded(gen)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    la.enable(model, attention="lowbit", kv_cache="int8")
    PLACEMENT.clear()
    forced = model.generate(input_ids=ids, attention_mask=mask, **kw)  # the wrapper adds a LowbitKVCache
    assert dict(PLACEMENT["model.layers.1.self_attn"]) == {BACKEND: 6}  # 1 prefill + 5 decode steps
    assert torch.equal(forced.sequences[:, : ids.shape[1] + 1], ref.sequences[:, : ids.shape[1] + 1])
    # teacher-forced on the float sequence: step logits with the int8 cache stay close
    cache = LowbitKVCache("int8", config=model.config)
    seq, m = ref.sequences, torch.cat([mask, torch.ones_like(ref.sequences[:, ids.shape[1]:])], 1)
    n = ids.shape[1]
    model(input_ids=seq[:, :n], attention_mask=m[:, :n], **{cache_kwarg(): cache})
    for t in range(n, seq.shape[1] - 1):
        lq = model(input_ids=seq[:, t: t + 1], attention_mask=m[:, : t + 1], **{cache_kwarg(): cache}).logits[:, -1]
        assert _rel(lq, ref.logits[t - n + 1]) < 5e-2
    assert cache.layers[0].length == seq.shape[1] - 1 and cache.layers[0].planes[0].dtype == torch.int8


@torch.no_grad()
@pytest.mark.parametrize("new", [4, 40])
def test_a_few_new_tokens_at_once_on_the_int8_cache(gen, new, monkeypatch):
    """Several new tokens in one forward on a filled int8 cache (speculative decoding's drafts, a
    chunked prompt): they attend to the quantized planes through the decode kernel on GPU (no
    dequantized copy of the cache), causally among themselves, and their logits stay close to the
    float model's for the same positions. 40 tokens: more rows than one program's, in blocks, where
    `split_kernel_wins` sends them (forced here: the rule wants a cache of 512+ keys)."""
    from lowbit.attention import hf
    from lowbit.attention.evaluate import cache_kwarg
    from lowbit.attention.kv_cache import LowbitKVCache

    monkeypatch.setattr(hf, "split_kernel_wins", lambda *a, **kw: True)
    model = _llama()
    ids = torch.randint(1, 300, (2, 20 + new), generator=gen).to(DEV)
    ref = model(input_ids=ids).logits
    la.enable(model, attention="lowbit")
    cache = LowbitKVCache("int8", config=model.config)
    model(input_ids=ids[:, :20], **{cache_kwarg(): cache})
    layer = cache.layers[0]
    if CUDA:
        assert layer.fused
        layer.dequantized = None  # the few-token step must not dequantize the cache
    PLACEMENT.clear()
    out = model(input_ids=ids[:, 20:], **{cache_kwarg(): cache}).logits
    assert dict(PLACEMENT["model.layers.1.self_attn"]) == {BACKEND: 1}
    assert _rel(out, ref[:, 20:]) < 5e-2
    assert layer.length == 20 + new


@torch.no_grad()
def test_kv_cache_kl_is_small_for_int8_and_larger_for_int4(gen):
    from lowbit.attention.evaluate import kv_cache_kl

    model = _llama().float() if not CUDA else _llama()
    ids = torch.randint(1, 300, (2, 40), generator=gen).to(DEV)
    m = kv_cache_kl(model, ids, kinds=("int8", "int4"))
    assert 0 <= m["kv_int8_kl_mean"] < m["kv_int4_kl_mean"]
    assert m["kv_int8_top1_agreement"] >= 0.9


def test_unusual_mask_runs_the_reference(gen):
    """A mask that is not a per-row key range (here: a hole in the middle) goes to the reference,
    which applies it exactly as given."""
    from lowbit.attention.hf import lowbit_attention_forward

    q = torch.randn(1, 2, 5, 64, generator=gen).to(DEV, DT)
    k = torch.randn(1, 2, 5, 64, generator=gen).to(DEV, DT)
    v = torch.randn(1, 2, 5, 64, generator=gen).to(DEV, DT)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool, device=DEV)
    mask[..., 2] = False
    mod = torch.nn.Module()
    mod.is_causal = False
    PLACEMENT.clear()
    out, _ = lowbit_attention_forward(mod, q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert _rel(out.transpose(1, 2), ref) < 1e-2
    assert dict(PLACEMENT["Module.?"]) == {"reference": 1}


def test_recipe_keys_and_errors():
    from lowbit.recipe import Recipe, RecipeError

    r = Recipe.load({"global": "int4", "attention": "lowbit", "kv_cache": "int4"})
    assert (r.attention, r.kv_cache) == ("lowbit", "int4")
    assert Recipe.load({"global": "int4", "kv_cache": "none"}).kv_cache is None
    with pytest.raises(RecipeError, match="kv_cache"):
        Recipe.load({"kv_cache": "int3"})
    with pytest.raises(RecipeError, match="attention"):
        Recipe.load({"attention": "flash"})
    with pytest.raises(ValueError, match="kv_cache"):
        la.enable(_llama(), kv_cache="fp8")


def test_profile_reports_where_attention_ran():
    import lowbit
    from lowbit.profile import profile

    model = _llama().float()
    lowbit.quantize(model, "int8", progress=False)
    la.enable(model, attention="lowbit", kv_cache="int8")
    p = profile(model, batch_sizes=(1,), repeats=1, seq_len=16, decode_tokens=3, device=DEV)
    # the fp32 model runs the reference even on a GPU (the fused kernels take bf16 / fp16)
    assert p.attention_placement == {"reference": 2}
    assert not any(name.endswith("self_attn") for name in p.fallbacks)
    assert p.decode_tokens_per_s > 0


def test_fused_layer_stores_values_tile_blocked(gen):
    """A fused layer keeps its value codes tile-blocked (what the fast decode kernel reads), through
    appends across a block boundary, growth and beam reordering; its logical planes (what the
    reference and `dequantized` see) are the same as an unfused layer's, and so is its byte count."""
    from lowbit.attention.kv_cache import LowbitKVLayer
    from lowbit.attention.reference import VALUE_BLOCK, unblock_tokens

    n = VALUE_BLOCK + 9  # the second block, then growth past the first capacity
    k, v = torch.randn(2, 2, 2 * n, 64, generator=gen), torch.randn(2, 2, 2 * n, 64, generator=gen)
    plain, fused = LowbitKVLayer(4, 32), LowbitKVLayer(4, 32)
    for layer in (plain, fused):
        layer.lazy_initialization(k, v)
    fused.fused = True  # as on a CUDA GPU with lowbit's attention
    for a, b in ((0, 5), (5, n), (n, n + 1), (n + 1, 2 * n)):  # prefill-sized and decode-sized appends
        for layer in (plain, fused):
            layer._append(k[:, :, a:b], v[:, :, a:b])
    L = 2 * n
    assert fused.planes[2].dim() == 5 and fused.planes[2].shape[-1] == VALUE_BLOCK and plain.planes[2].dim() == 4
    for i in range(4):
        assert torch.equal(plain._logical(i), fused._logical(i)), i
    assert torch.equal(unblock_tokens(fused.planes[2])[:, :, :L], plain.planes[2][:, :, :L])
    # int4 per 32 values: 32 code bytes + two fp16 scales per token per head, keys and values
    assert fused.nbytes() == plain.nbytes() == 2 * 2 * 2 * L * (32 + 2 * 2)
    fk, fv = fused.dequantized()
    pk, pv = plain.dequantized()
    assert torch.equal(fk, pk) and torch.equal(fv, pv)
    fused.reorder_cache(torch.tensor([1, 0]))
    assert fused.planes[2].dim() == 5
    assert torch.equal(fused._logical(2), plain._logical(2)[[1, 0]])


@torch.no_grad()
def test_enable_leaves_models_that_share_the_config_alone(gen):
    """Two models built from one config object: switching one must not switch the other."""
    model = _llama()
    peer = transformers.LlamaForCausalLM(model.config).eval().to(DEV, DT)
    peer.load_state_dict(model.state_dict())
    assert peer.config is model.config
    la.enable(model, attention="lowbit")
    assert peer.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "lowbit"
    assert all(m.config is model.config for m in model.modules() if hasattr(m, "config"))
    ids, mask = _left_padded(gen)
    PLACEMENT.clear()
    ref = peer(input_ids=ids, attention_mask=mask).logits
    assert not PLACEMENT  # the peer ran its own SDPA attention
    out = model(input_ids=ids, attention_mask=mask).logits
    assert dict(PLACEMENT["model.layers.0.self_attn"]) == {BACKEND: 1}
    keep = mask.bool()
    assert _rel(out[keep], ref[keep]) < TOL


def test_a_kv_cache_format_the_heads_do_not_divide_into_is_refused_up_front():
    """int4 keeps one scale per 32 values: a head dim of 80 (Phi-2) does not divide. `enable` and the
    cache refuse it with the fix named (before: a bare "head dim 80 is not a multiple of the scale
    group 32" at the first generate step, and `lowbit validate` failed whole on its default int4
    check); per-token scales fit."""
    from lowbit.attention.kv_cache import LowbitKVCache

    cfg = transformers.LlamaConfig(hidden_size=160, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=300)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="head dim 80 is not a multiple of it; use kv_cache='int8' or 'int4-token'"):
        la.enable(model, kv_cache="int4")
    with pytest.raises(ValueError, match="kv_cache='int4' stores one scale per 32 values"):
        LowbitKVCache("int4", config=cfg)
    la.enable(model, kv_cache="int4-token")
    ids = torch.randint(0, 300, (1, 5))
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, 8)
