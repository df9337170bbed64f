"""MLX export: planes move across without re-rounding; mx.dequantize == QTensor.dequantize exactly."""

import json
import os

import numpy as np
import pytest
import torch

try:
    import mlx.core as mx
except Exception as e:  # pragma: no cover - depends on the platform
    print(f"test_export_mlx skipped: mlx is not importable ({e!r})")
    pytest.skip(f"mlx is not importable ({e!r})", allow_module_level=True)

import lowbit
from tiny_models import tiny_bpe_tokenizer, tiny_llama
from lowbit.export.mlx import export_mlx, qtensor_to_mlx

# exports reproduce the stored weights in fp32: compared with the reference path, not the CPU bf16 kernels
pytestmark = pytest.mark.usefixtures("reference_linear")

transformers = pytest.importorskip("transformers")


def _inputs(gen) -> dict[str, torch.Tensor]:
    rand = torch.randn(16, 256, generator=gen)
    adv = torch.randn(16, 256, generator=gen)
    adv[0] = 0.0                                    # all-zero row
    adv[1] *= 1e-6                                  # tiny scales (fp16 subnormals)
    adv[2] = 3.0                                    # constant blocks (zero range)
    adv[3, ::7] = 900.0                             # outliers
    adv[4] = torch.arange(256, dtype=torch.float32) - 128  # exact grid values / ties
    adv[5] = -adv[5].abs()                          # one-signed blocks
    adv[6, :128] = 1e-30                            # E8M0 scale clamps at 2^-127
    return {"random": rand, "adversarial": adv}


EXACT = [
    ("int4-asym", {}), ("int2", {}), ("int4", {}),
    ("int8", {"block_size": 32, "scale_dtype": "fp16"}),
    ("int8", {"block_size": 128, "scale_dtype": "fp16"}),
    ("int4-asym", {"block_size": 64}), ("int4", {"scale_dtype": "bf16"}),
    ("q4_0", {}), ("q4_1", {}), ("q8_0", {}),
    ("mxfp4", {}), ("gguf-mxfp4", {}), ("mxfp8-e4m3", {}),
]


@pytest.mark.parametrize("preset,kw", EXACT, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_dequantize_matches_exactly(gen, preset, kw):
    for kind, w in _inputs(gen).items():
        qt = lowbit.quantize_tensor(w, preset, **kw)
        a = qtensor_to_mlx(qt, name="w")
        assert a["weight"].dtype == np.uint32 and a["weight"].shape == (16, 256 * a["bits"] // 32)
        if a["mode"] == "affine":
            assert a["scales"].dtype == a["biases"].dtype and a["scales"].dtype in (np.float16, np.float32)
            # MLX does the arithmetic in the scales' dtype (fp16 scales: fp16 math, even with
            # dtype=float32). The stored values are exactly lowbit's, so with the arrays widened to
            # fp32 (exact) MLX's decode is lowbit's fp32 decode bit for bit.
            scales, biases = mx.array(a["scales"].astype(np.float32)), mx.array(a["biases"].astype(np.float32))
        else:
            assert a["scales"].dtype == np.uint8 and "biases" not in a
            assert np.array_equal(a["scales"], qt.scale.numpy())  # lowbit's exponents, not recomputed
            scales, biases = mx.array(a["scales"]), None
        ref = qt.dequantize().numpy()
        got = mx.dequantize(mx.array(a["weight"]), scales, biases, group_size=a["group_size"],
                            bits=a["bits"], mode=a["mode"], dtype=mx.float32)
        np.testing.assert_array_equal(np.array(got), ref, err_msg=f"{preset} {kw} {kind}")
        if a["mode"] == "affine":  # as stored (fp16 math for fp16 scales): within fp16 rounding
            native = mx.dequantize(mx.array(a["weight"]), mx.array(a["scales"]), mx.array(a["biases"]),
                                   group_size=a["group_size"], bits=a["bits"], dtype=mx.float32)
            np.testing.assert_allclose(np.array(native), ref, rtol=2e-3, atol=1e-6 + 2e-3 * np.abs(ref).max())


def test_packing_matches_mx_quantize(gen):
    # MLX's own quantizer: its codes, repacked by lowbit's packer, give its uint32 words
    from lowbit.formats.packing import pack

    w = torch.randn(4, 128, generator=gen)
    for bits in (2, 3, 4, 6, 8):
        wq, s, b = mx.quantize(mx.array(w.numpy()), group_size=32, bits=bits)
        s, b = np.array(s)[..., None], np.array(b)[..., None]
        codes = np.clip(np.round((w.numpy().reshape(4, 4, 32) - b) / s), 0, 2**bits - 1).astype(np.uint8)
        ours = pack(torch.from_numpy(codes.reshape(4, 128)), bits).numpy().view("<u4")
        assert np.array_equal(ours, np.array(wq)), bits


@pytest.mark.parametrize("preset,kw,why", [
    ("int4-e8m0", {}, "E8M0"), ("lut4", {}, "palettized"), ("int8", {}, "per-channel"),
    ("mxfp6-e3m2", {}, "mxfp4"), ("int4", {"block_size": 16}, "not 16"),
])
def test_refusals_name_alternatives(gen, preset, kw, why):
    qt = lowbit.quantize_tensor(torch.randn(8, 64, generator=gen), preset, **kw)
    with pytest.raises(ValueError, match=why) as e:
        qtensor_to_mlx(qt, name="model.layers.0.mlp.up_proj")
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj" in msg and preset in msg and "int4-asym" in msg and "mxfp4" in msg


def test_refuses_bias_overflow():
    w = torch.full((2, 32), 60000.0)
    w[:, 0] = -60000.0
    qt = lowbit.quantize_tensor(w, "int4")  # fp16 scale ~8571: -8 * scale overflows fp16
    with pytest.raises(ValueError, match="overflows"):
        qtensor_to_mlx(qt, name="w")


def test_refuses_padded_rows(gen):
    qt = lowbit.quantize_tensor(torch.randn(4, 40, generator=gen), "int4-asym", pad=True)
    assert qt.padded_cols == 64
    with pytest.raises(ValueError, match="multiple of 32"):
        qtensor_to_mlx(qt, name="w")


# -- whole model ---------------------------------------------------------------------------------


def test_exporttiny_llama(tmp_path):
    from safetensors.numpy import load_file

    model = tiny_llama()
    lowbit.quantize(model, {"global": "int4-asym", "names": {
        "model.layers.0.self_attn.q_proj": "mxfp4", "model.layers.1.mlp.down_proj": None}})
    pkg = lowbit.save(model, tmp_path / "pkg", tokenizer=tiny_bpe_tokenizer())
    out = tmp_path / "mlx"
    info = export_mlx(pkg, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx", "pkg"]  # no temp folder left
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~mask}  # as a plain write (was 0600)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization"]
    assert q["group_size"] == 32 and q["bits"] == 4 and q["mode"] == "affine"
    assert q["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert q["model.layers.1.mlp.down_proj"] is False
    assert cfg["quantization_config"] == q and cfg["model_type"] == "llama"
    t = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in t  # tied and identical: dropped
    assert t["model.layers.0.self_attn.k_proj.weight"].dtype == np.uint32
    assert t["model.layers.0.self_attn.k_proj.biases"].dtype == np.float16
    assert "model.layers.0.self_attn.q_proj.biases" not in t
    assert t["model.layers.0.self_attn.q_proj.scales"].dtype == np.uint8
    assert t["model.layers.1.mlp.down_proj.weight"].dtype == np.float32
    assert info["quantization"] == q

    with pytest.raises(FileExistsError, match="force=True"):
        export_mlx(pkg, out)
    export_mlx(model, out, force=True)
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()

    # a refusal leaves nothing behind
    bad = tiny_llama()
    lowbit.quantize(bad, {"global": "int4-asym", "names": {"model.layers.1.mlp.up_proj": "lut4"}})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj"):
        export_mlx(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_mlx_lm_forward_matches(tmp_path):
    """mlx-lm loads the folder; its logits match lowbit's model loosely (MLX runs its own kernels)."""
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.utils import load_model

    model = tiny_llama()
    lowbit.quantize(model, {"global": "int4-asym", "names": {"model.layers.0.self_attn.q_proj": "mxfp4",
                                                             "model.layers.0.mlp.up_proj": "int4",
                                                             "model.layers.1.mlp.down_proj": None}})
    pkg = lowbit.save(model, tmp_path / "pkg", tokenizer=tiny_bpe_tokenizer())
    export_mlx(pkg, tmp_path / "mlx")
    mlx_model, _ = load_model(tmp_path / "mlx")
    ids = [[1, 5, 9, 27, 3, 200, 17]]
    got = np.array(mlx_model(mx.array(ids)).astype(mx.float32))
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.float().numpy()
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)

    # the full mlx_lm.load (model + tokenizer) and a two-token greedy generation run
    m2, tok = mlx_lm.load(str(tmp_path / "mlx"))
    text = mlx_lm.generate(m2, tok, prompt="abc", max_tokens=2)
    assert isinstance(text, str)


def test_exact_scales_make_the_file_itself_decode_bit_exactly(tmp_path):
    """With exact_scales=True, mx.dequantize of the arrays *as written in the file* equals lowbit."""
    from safetensors.numpy import load_file

    model = tiny_llama()
    lowbit.quantize(model, {"global": "int4-asym", "names": {"model.layers.0.mlp.up_proj": "int4",
                                                            "model.layers.1.mlp.up_proj": "mxfp4"}})
    export_mlx(model, tmp_path / "mlx", exact_scales=True)
    t = load_file(str(tmp_path / "mlx" / "model.safetensors"))
    q = json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]
    checked = 0
    for name, mod in model.named_modules():
        if not hasattr(mod, "qweight") or f"{name}.weight" not in t:
            continue
        params = q.get(name, {k: q[k] for k in ("group_size", "bits", "mode")})
        biases = t.get(f"{name}.biases")
        got = mx.dequantize(mx.array(t[f"{name}.weight"]), mx.array(t[f"{name}.scales"]),
                            None if biases is None else mx.array(biases), group_size=params["group_size"],
                            bits=params["bits"], mode=params["mode"], dtype=mx.float32)
        np.testing.assert_array_equal(np.array(got), mod.qweight.dequantize().numpy(), err_msg=name)
        checked += 1
    assert checked == 15  # 14 linear layers + the (tied) embedding


def test_cli_exact_scales_flag_writes_fp32_scales(tmp_path):
    """`lowbit export --to mlx --exact-scales` reaches the exporter: the scales in the file are fp32."""
    import lowbit
    from lowbit import package
    from lowbit.cli import main
    from safetensors import safe_open
    from tiny_models import tiny_llama

    m = tiny_llama()
    lowbit.quantize(m, {"global": "int4", "types": {"Embedding": "none"}}, progress=False)
    pkg = package.save(m, tmp_path / "pkg")
    assert main(["export", str(pkg), "--to", "mlx", "-o", str(tmp_path / "mlx"), "--exact-scales"]) == 0
    with safe_open(str(tmp_path / "mlx" / "model.safetensors"), "np") as f:
        scales = [f.get_tensor(k).dtype for k in f.keys() if k.endswith(".scales")]
    assert scales and all(str(d) == "float32" for d in scales)


# -- config.json as mlx-lm reads it (RoPE, model types, tied heads) ------------------------------

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, max_position_embeddings=128,
             initializer_range=0.2)  # large weights: attention (and so RoPE) moves the logits by whole units


def _tiny(arch: str, **kw) -> torch.nn.Module:
    """A seeded 2-layer `arch` causal LM (transformers config class name without "Config")."""
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(**{**_TINY, **kw})
    return getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()


def _mlx_vs_lowbit(model, out, ids) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mlx-lm logits, lowbit logits, config.json) for `model` exported to `out`."""
    pytest.importorskip("mlx_lm")
    from mlx_lm.utils import load_model

    export_mlx(model, out, exact_scales=True)  # fp32 scales: the check isolates the config, not fp16 rounding
    mlx_model, _ = load_model(out)
    got = np.array(mlx_model(mx.array(ids.numpy())).astype(mx.float32))
    with torch.no_grad():
        want = model(ids).logits.float().numpy()
    return got, want, json.loads((out / "config.json").read_text())


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
ROPES = {  # name: (LlamaConfig kwargs, expected rope_scaling)
    "theta-500000": ({"rope_theta": 5e5}, None),
    "llama3": ({"rope_theta": 5e5, "max_position_embeddings": 512, "rope_scaling": LLAMA3}, {**LLAMA3, "type": "llama3"}),
    "linear": ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
               {"rope_type": "linear", "type": "linear", "factor": 4.0}),
    "dynamic": ({"max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
                {"rope_type": "dynamic", "type": "dynamic", "factor": 4.0}),  # 40 tokens > 16: rescaled base
    "yarn": ({"max_position_embeddings": 512, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                                "original_max_position_embeddings": 128}},
             {"rope_type": "yarn", "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
}


@pytest.mark.parametrize("rope", list(ROPES))
def test_mlx_lm_runs_the_models_rope(tmp_path, gen, rope):
    """transformers 5 keeps RoPE only under "rope_parameters", which mlx-lm ignores (it silently used
    rope_theta 10000: logits off by ~8 here). The export writes rope_theta / rope_scaling as mlx-lm reads them."""
    kw, scaling = ROPES[rope]
    model = _tiny("Llama", **kw)
    lowbit.quantize(model, {"global": "int4-asym"}, progress=False)
    ids = torch.randint(0, 256, (1, 40), generator=gen)
    got, want, cfg = _mlx_vs_lowbit(model, tmp_path / "mlx", ids)
    assert cfg["rope_theta"] == kw.get("rope_theta", 10000.0) and cfg["rope_scaling"] == scaling
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"]  # transformers' own key is kept
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
    assert np.abs(want).max() > 3  # logits large enough for a wrong RoPE to show


@pytest.mark.parametrize("arch,kw", [
    ("Mistral", {"rope_theta": 1e6}), ("Qwen2", {"rope_theta": 5e4, "tie_word_embeddings": True}),
    ("Qwen3", {"rope_theta": 5e4, "head_dim": 32}), ("Phi3", {"rope_theta": 5e4, "pad_token_id": 0}),
    ("Gemma", {"rope_theta": 5e4, "head_dim": 16}), ("Gemma2", {"rope_theta": 5e4, "head_dim": 16}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_mlx_lm_runs_each_supported_model_type(tmp_path, gen, arch, kw):
    """Every model type in MLX_MODEL_TYPES loads in mlx-lm and matches lowbit, at a non-default rope_theta."""
    from lowbit.export.mlx import MLX_MODEL_TYPES

    model = _tiny(arch, **kw)
    assert model.config.model_type in MLX_MODEL_TYPES
    lowbit.quantize(model, {"global": "int4-asym"}, progress=False)
    ids = torch.randint(0, 256, (1, 40), generator=gen)
    got, want, cfg = _mlx_vs_lowbit(model, tmp_path / "mlx", ids)
    assert cfg["rope_theta"] == kw["rope_theta"]
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("arch,model_type", [("GPT2", "gpt2"), ("GPTNeoX", "gpt_neox")])
def test_refuses_model_types_mlx_lm_cannot_load(tmp_path, arch, model_type):
    torch.manual_seed(0)
    if arch == "GPT2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=1, n_head=4))
    else:
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1))
    lowbit.quantize(model, {"global": "int4-asym"}, progress=False)
    with pytest.raises(ValueError) as e:
        export_mlx(model, tmp_path / "mlx")
    msg = str(e.value)
    assert repr(model_type) in msg and "llama, mistral, qwen2, qwen3, phi3" in msg and "mlx_lm.convert" in msg
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_refuses_rope_mlx_lm_computes_differently(tmp_path):
    from lowbit.export.mlx import mlx_lm_config

    # phi3 longrope: mlx-lm always applies long_factor, transformers short_factor up to 4096 tokens
    phi = {"model_type": "phi3", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                     "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    with pytest.raises(ValueError, match="rope_type 'longrope'.*handles default"):
        mlx_lm_config(phi)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "attention_factor": 1.5}
    model = _tiny("Llama", max_position_embeddings=512, rope_scaling=yarn)
    with pytest.raises(ValueError, match="'yarn' with attention_factor"):
        export_mlx(model, tmp_path / "mlx")
    assert list(tmp_path.iterdir()) == []


def test_tied_head_follows_the_models_embedding(tmp_path, gen):
    """The tie check reads get_input/output_embeddings (not a fixed name); an untied head is written
    with tie_word_embeddings=false spelled out (mlx-lm's llama defaults to tied)."""
    from lowbit.export.common import collect
    from lowbit.export.mlx import _drop_tied_head

    # GPT-2's pair is transformer.wte / lm_head: the tied head is recognised and dropped
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=1, n_head=4))
    lowbit.quantize(gpt2, {"global": "int4-asym"}, progress=False)
    entries, float_layers = collect(gpt2)
    config = {"model_type": "gpt2", "tie_word_embeddings": True}
    _drop_tied_head(gpt2, entries, float_layers, config, [])
    assert "transformer.wte.weight" in entries and "lm_head.weight" not in entries and config["tie_word_embeddings"]

    # a tied pair quantized differently: llama writes the head untied and mlx-lm still matches ...
    for arch, kw in (("Llama", {}), ("Gemma", {"head_dim": 16})):
        model = _tiny(arch, tie_word_embeddings=True, **kw)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        lowbit.quantize(model, {"global": "int4-asym", "names": {"lm_head": "mxfp4", "model.embed_tokens": "int4"}},
                        progress=False)
        if arch == "Llama":
            ids = torch.randint(0, 256, (1, 12), generator=gen)
            got, want, cfg = _mlx_vs_lowbit(model, tmp_path / "llama", ids)
            assert cfg["tie_word_embeddings"] is False
            np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
        else:  # ... gemma, whose mlx-lm model has no lm_head, is refused
            with pytest.raises(ValueError, match="no separate output head"):
                export_mlx(model, tmp_path / "gemma")
            assert not (tmp_path / "gemma").exists()
