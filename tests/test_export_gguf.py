"""GGUF export: lowbit planes rearranged into llama.cpp block bytes, never re-quantized."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import lowbit
from tiny_models import tiny_bpe_tokenizer, tiny_llama
from lowbit.export import export_gguf, qtensor_to_gguf_bytes
from lowbit.export.gguf import llama_permute_index

# exports reproduce the stored weights in fp32: compared with the reference path, not the CPU bf16 kernels
pytestmark = pytest.mark.usefixtures("reference_linear")

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
T = gguf.GGMLQuantizationType

GGUF_PRESETS = [("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("q4_1", T.Q4_1), ("gguf-mxfp4", T.MXFP4)]


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(16, 128, generator=g)
    ties = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, 1.0, -1.0, 0.25] * 4).repeat(4, 4)  # (4, 128)
    ties[1] *= 3.0
    ties[2, :32] = 8.0  # a constant block
    ties[3, 5] = -ties[3].abs().max()  # max magnitude negative, tie with a positive one
    outl = torch.randn(4, 128, generator=g) * 1e-3
    outl[:, 7] = 300.0
    outl[1, 40] = -5e4
    outl[2, 64:96] = 1e-6  # tiny block
    zeros = torch.zeros(2, 128)
    zeros[1, 32:64] = torch.randn(32, generator=g)  # zero blocks next to a normal one
    return {"random": rnd, "ties": ties, "outliers": outl, "zeros": zeros}


@pytest.mark.parametrize("preset,qtype", GGUF_PRESETS)
@pytest.mark.parametrize("case", ["random", "ties", "outliers", "zeros"])
def test_gguf_presets_are_byte_identical_to_gguf_py(preset, qtype, case):
    w = _inputs()[case]
    raw, t = qtensor_to_gguf_bytes(lowbit.quantize_tensor(w, preset))
    ref = gguf.quants.quantize(w.numpy(), qtype)
    assert t == qtype
    assert raw.dtype == np.uint8 and raw.shape == ref.shape
    assert np.array_equal(raw, ref)


EXACT = [
    ("int4", {}, T.Q4_0),
    ("int4-asym", {}, T.Q4_1),
    ("mxfp4", {}, T.MXFP4),
    ("int8", {"block_size": 32, "scale_dtype": "fp16"}, T.Q8_0),
]


@pytest.mark.parametrize("preset,kw,qtype", EXACT, ids=[e[0] for e in EXACT])
@pytest.mark.parametrize("case", ["random", "ties", "outliers", "zeros"])
def test_exact_reexpressions_dequantize_identically(preset, kw, qtype, case):
    w = _inputs()[case]
    qt = lowbit.quantize_tensor(w, preset, **kw)
    raw, t = qtensor_to_gguf_bytes(qt)
    assert t == qtype
    assert np.array_equal(gguf.quants.dequantize(raw, t), qt.dequantize().numpy())


@pytest.mark.parametrize("preset,kw", [("int4-e8m0", {}), ("lut4", {"kmeans_iters": 2}), ("mxfp6-e3m2", {}),
                                       ("int8", {}), ("int4", {"block_size": 64}),
                                       ("int4", {"scale_dtype": "bf16"})])
def test_inexact_formats_are_refused(preset, kw):
    qt = lowbit.quantize_tensor(torch.randn(8, 128), preset, **kw)
    with pytest.raises(ValueError) as e:
        qtensor_to_gguf_bytes(qt, name="model.layers.3.mlp.up_proj")
    msg = str(e.value)
    assert "model.layers.3.mlp.up_proj" in msg and repr(qt.fmt.name) in msg
    for alt in ("q8_0", "q4_0", "q4_1", "gguf-mxfp4", "int4-asym", "mxfp4", "block_size=32"):
        assert alt in msg


def test_padded_rows_are_refused():
    qt = lowbit.quantize_tensor(torch.randn(4, 40), "q4_0", pad=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        qtensor_to_gguf_bytes(qt, name="w")


# -- whole model ---------------------------------------------------------------------------------


def _expected(model) -> dict[str, tuple[np.ndarray, object]]:
    """gguf name -> (lowbit's dequantized weight, QTensor or None)."""
    from lowbit.export.gguf import _collect, gguf_tensor_name

    out = {}
    for hf, (kind, t) in _collect(model).items():
        if hf == "lm_head.weight":
            continue  # tied
        w = t.dequantize().numpy() if kind == "q" else t.detach().float().numpy()
        out[gguf_tensor_name(hf)] = (w, t if kind == "q" else None)
    return out


@pytest.mark.parametrize("recipe,main_type", [({"global": "q4_0"}, T.Q4_0),
                                              ({"global": "int4-asym", "types": {"Embedding": "q8_0"}}, T.Q4_1)])
def test_export_tiny_llama_roundtrip(tmp_path, recipe, main_type):
    model = tiny_llama()
    lowbit.quantize(model, recipe)
    out = tmp_path / "m.gguf"
    info = export_gguf(model, out, tokenizer=tiny_bpe_tokenizer())
    assert out.is_file() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # readable by others as a plain write is (was 0600)

    r = gguf.GGUFReader(out)
    names = {t.name for t in r.tensors}
    expected = _expected(model)
    assert names == set(expected) == set(info["tensors"])
    for n in range(2):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                     "attn_norm", "ffn_norm"):
            assert f"blk.{n}.{part}.weight" in names
    assert {"token_embd.weight", "output_norm.weight"} <= names and "output.weight" not in names

    for t in r.tensors:
        want, qt = expected[t.name]
        if qt is None:
            assert t.tensor_type == T.F32
            got = np.asarray(t.data).reshape(want.shape)
        else:
            assert t.tensor_type.name == info["tensors"][t.name]["gguf_type"] and t.tensor_type != T.F32
            assert t.tensor_type == qtensor_to_gguf_bytes(qt)[1]
            got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert list(t.shape) == list(reversed(want.shape))  # GGUF lists ne0 (columns) first
        assert got.shape == want.shape
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = 4 if "attn_q" in t.name else 2
            got = got[np.argsort(llama_permute_index(got.shape[0], heads))]  # undo llama.cpp's permute
        assert np.array_equal(got, want), t.name
    assert r.get_tensor(0) is not None
    assert sum(1 for t in r.tensors if t.tensor_type == main_type) >= 14

    def field(key):
        f = r.fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]][0]

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2
    assert field("llama.embedding_length") == 64
    assert field("llama.feed_forward_length") == 128
    assert field("llama.attention.head_count") == 4
    assert field("llama.attention.head_count_kv") == 2
    assert field("llama.vocab_size") == 256
    assert field("llama.context_length") == model.config.max_position_embeddings
    assert field("llama.rope.dimension_count") == 16
    assert field("llama.rope.freq_base") == pytest.approx(10000.0)
    # plain RoPE: no scaling keys and no rope_freqs tensor (`names == set(expected)` above)
    assert "rope_freqs.weight" not in names and not [k for k in r.fields if ".rope.scaling." in k]
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(model.config.rms_norm_eps)
    assert field("tokenizer.ggml.model") == "gpt2"
    toks = field("tokenizer.ggml.tokens")
    assert len(toks) == 256 and toks[27] == "abc"
    assert field("tokenizer.ggml.merges") == ["a b", "ab c"]
    assert info["tokenizer"]["written"]


def test_refusal_names_layer_and_leaves_no_file(tmp_path):
    model = tiny_llama()
    lowbit.quantize(model, {"global": "q4_0", "names": {"model.layers.1.mlp.down_proj": "int4-e8m0"}})
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*int4-e8m0"):
        export_gguf(model, out)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_refused_without_force(tmp_path):
    model = tiny_llama()
    lowbit.quantize(model, {"global": "q8_0"})
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="force=True"):
        export_gguf(model, out)
    assert out.read_bytes() == b"keep me"
    info = export_gguf(model, out, force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert info["tokenizer"]["written"] is False


def test_export_from_package(tmp_path):
    model = tiny_llama()
    lowbit.quantize(model, {"global": "gguf-mxfp4"})
    pkg = lowbit.save(model, tmp_path / "pkg", tokenizer=tiny_bpe_tokenizer())
    info = export_gguf(pkg, tmp_path / "m.gguf")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert info["tokenizer"]["written"]
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == T.MXFP4 and types["output_norm.weight"] == T.F32
    want = model.model.layers[0].self_attn.k_proj.qweight.dequantize().numpy()
    t = next(t for t in r.tensors if t.name == "blk.0.attn_k.weight")
    got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    assert np.array_equal(got[np.argsort(llama_permute_index(32, 2))], want)


def test_not_llama_refused(tmp_path):
    with pytest.raises(ValueError, match="Llama"):
        export_gguf(torch.nn.Linear(4, 4), tmp_path / "x.gguf")


def test_untied_head_and_float_layer(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    lowbit.quantize(model, {"global": "q4_1", "names": {"model.layers.0.self_attn.q_proj": None}})
    info = export_gguf(model, tmp_path / "m.gguf")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    t = {t.name: t for t in r.tensors}
    assert t["output.weight"].tensor_type == T.Q4_1
    assert np.array_equal(gguf.quants.dequantize(np.asarray(t["output.weight"].data), T.Q4_1),
                          model.lm_head.qweight.dequantize().numpy())
    q = t["blk.0.attn_q.weight"]
    assert q.tensor_type == T.F32 and info["tensors"]["blk.0.attn_q.weight"]["lowbit_format"] == "float"
    got = np.asarray(q.data).reshape(64, 64)[np.argsort(llama_permute_index(64, 4))]
    assert np.array_equal(got, model.model.layers[0].self_attn.q_proj.weight.detach().numpy())


# -- RoPE scaling --------------------------------------------------------------------------------

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}  # Llama 3.1's config


def _rope_llama(rope: dict, max_positions: int = 131072):
    """A 1-layer Llama (head_dim 16, 8 frequencies) with `rope` as its rope_parameters."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   max_position_embeddings=max_positions, rope_parameters=dict(rope))
    return transformers.LlamaForCausalLM(cfg).eval()


def _field(r, key):
    f = r.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]][0]


def _plain_inv_freq(theta: float, dim: int = 16) -> np.ndarray:
    return theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


@pytest.mark.parametrize("factor", [8.0, 32.0], ids=["llama3.1", "llama3.2"])
def test_llama3_rope_freqs_roundtrip_match_transformers(tmp_path, factor):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = _rope_llama({**LLAMA31_ROPE, "factor": factor})
    lowbit.quantize(model, {"global": "q8_0"})
    info = export_gguf(model, tmp_path / "m.gguf")

    r = gguf.GGUFReader(tmp_path / "m.gguf")
    t = {t.name: t for t in r.tensors}["rope_freqs.weight"]
    assert t.tensor_type == T.F32 and list(t.shape) == [8]
    assert info["tensors"]["rope_freqs.weight"]["gguf_type"] == "F32"
    freqs = np.asarray(t.data, dtype=np.float64).reshape(-1)
    theta = _field(r, "llama.rope.freq_base")
    assert theta == 500000.0  # the model's theta (transformers 5 keeps it in rope_parameters only)
    # llama.cpp runs plain-RoPE frequencies divided by the tensor's entries
    got = _plain_inv_freq(theta) / freqs
    want = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")[0].double().numpy()
    assert np.abs(got / want - 1).max() < 1e-6
    assert np.abs(got / model.model.rotary_emb.inv_freq.double().numpy() - 1).max() < 1e-6
    # every branch of the rule is exercised: kept (short wavelengths), divided by factor, blended
    assert (freqs == 1).sum() == 4 and (freqs == factor).sum() == 3 and 1.5 < freqs[4] < factor - 1
    # llama.cpp's converter writes no scaling keys for llama3, only the tensor
    assert not [k for k in r.fields if ".rope.scaling." in k]


def _ggml_yarn(theta: float, dim: int, factor: float, n_ctx_orig: int) -> tuple[np.ndarray, float]:
    """What llama.cpp computes for YaRN from the file's keys (ggml's rope_yarn with llama.cpp's
    defaults ext_factor 1, beta_fast 32, beta_slow 1, attn_factor 1): (frequencies, cos/sin scale)."""
    def corr_dim(rotations: float) -> float:
        return dim * np.log(n_ctx_orig / (rotations * 2 * np.pi)) / (2 * np.log(theta))

    low, high = max(0.0, np.floor(corr_dim(32.0))), min(dim - 1.0, np.ceil(corr_dim(1.0)))
    i = np.arange(dim // 2, dtype=np.float64)
    ramp = 1 - np.clip((i - low) / max(0.001, high - low), 0, 1)
    extrap = _plain_inv_freq(theta, dim)
    return extrap / factor * (1 - ramp) + extrap * ramp, 1 + 0.1 * np.log(factor)


@pytest.mark.parametrize("rope,keys", [
    ({"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
     {"type": "yarn", "factor": 4.0, "original_context_length": 512}),
], ids=["linear", "yarn"])
def test_linear_and_yarn_rope_write_scaling_keys(tmp_path, rope, keys):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = _rope_llama({**rope, "rope_theta": 1e6}, max_positions=2048)
    info = export_gguf(model, tmp_path / "m.gguf")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    got = {k.rpartition(".rope.scaling.")[2]: _field(r, k) for k in r.fields if k.startswith("llama.rope.scaling.")}
    assert got == keys
    assert {f"llama.rope.scaling.{k}" for k in keys} <= set(info["metadata"])
    assert _field(r, "llama.rope.freq_base") == 1e6
    assert "rope_freqs.weight" not in {t.name for t in r.tensors}
    # llama.cpp's reading of these keys reproduces transformers' frequencies and cos/sin scale
    want, want_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](model.config, "cpu")
    if keys["type"] == "linear":
        freqs, scale = _plain_inv_freq(1e6) / keys["factor"], 1.0
    else:
        freqs, scale = _ggml_yarn(1e6, 16, keys["factor"], keys["original_context_length"])
        assert 0 < (freqs / _plain_inv_freq(1e6)).min() < 0.26 and (freqs / _plain_inv_freq(1e6)).max() == 1  # ramps
    assert np.abs(freqs / want.double().numpy() - 1).max() < 1e-6
    assert scale == pytest.approx(want_scale, rel=1e-6)


@pytest.mark.parametrize("rope,needle", [
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
      "original_max_position_embeddings": 512}, "'longrope'"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 64.0}, "beta_fast=64"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "attention_factor": 1.0},
     "attention factor 1"),
], ids=["dynamic", "longrope", "yarn-beta", "yarn-attention-factor"])
def test_unmapped_rope_refused_before_writing(tmp_path, rope, needle):
    model = _rope_llama({**rope, "rope_theta": 1e4}, max_positions=2048)
    with pytest.raises(ValueError) as e:
        export_gguf(model, tmp_path / "m.gguf")
    msg = str(e.value)
    assert needle in msg and repr(rope["rope_type"]) in msg and "plain RoPE" in msg and "Fix:" in msg
    assert list(tmp_path.iterdir()) == []


def test_rope_settings_from_older_configs():
    from types import SimpleNamespace

    from lowbit.export.gguf import _rope_plan

    # transformers 4: top-level rope_theta, rope_scaling with the old "type" spelling
    old = SimpleNamespace(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=4096)
    assert _rope_plan(old, 16) == (1e6, {"type": "linear", "factor": 2.0}, None)
    # no scaling at all: plain RoPE, theta unchanged
    assert _rope_plan(SimpleNamespace(rope_theta=5e5, rope_scaling=None), 16) == (5e5, {}, None)
    # YaRN without a factor: transformers uses max_position_embeddings / original_max_position_embeddings
    yarn = SimpleNamespace(rope_theta=1e4, max_position_embeddings=4096,
                           rope_scaling={"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024})
    assert _rope_plan(yarn, 16)[1] == {"type": "yarn", "factor": 4.0, "original_context_length": 1024}
    llama3 = SimpleNamespace(rope_theta=5e5, rope_scaling={**LLAMA31_ROPE, "rope_theta": None})
    assert _rope_plan(llama3, 16)[2][4] == pytest.approx(2.695, abs=1e-3)
