"""Recipes and model surgery: precedence, validation, every preset on small HF models, ties, compile."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit import Recipe, RecipeError
from lowbit.kernels import PLACEMENT
from lowbit.nn import QuantEmbedding, QuantLinear

transformers = pytest.importorskip("transformers")


def tiny_llama(tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=300, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


# --- recipes ---------------------------------------------------------------------------------
def test_precedence_name_over_edge_over_type_over_global():
    r = Recipe.load({
        "global": "int4", "types": {"Embedding": "int8", "Linear": "mxfp4"},
        "names": {"model.layers.1.mlp.*": "q4_0", "model.layers.1.mlp.up_proj": "none"},
        "edge_blocks": 1, "edge_format": "int8",
    })
    assert r.config_for("model.layers.1.self_attn.q_proj", "Linear").name == "mxfp4"
    assert r.config_for("model.layers.1.mlp.down_proj", "Linear").name == "q4_0"
    assert r.config_for("model.layers.1.mlp.up_proj", "Linear") is None
    assert r.config_for("model.layers.0.mlp.down_proj", "Linear", edge=True).name == "int8"
    assert r.config_for("model.embed_tokens", "Embedding").name == "int8"
    assert r.config_for("x", "Conv1D").name == "int4"


def test_recipe_overrides_format_fields():
    r = Recipe.load({"global": {"format": "int4", "block_size": 128, "scale_dtype": "bf16"}})
    f = r.config_for("a", "Linear")
    assert (f.block_size, f.scale_dtype) == (128, "bf16")


@pytest.mark.parametrize("bad, msg", [
    ({"globl": "int4"}, "unknown key.*globl"),
    ({"global": "int44"}, "did you mean int4"),
    ({"global": {"format": "int4", "blocksize": 64}}, "blocksize"),
    ({"types": {"Linearr": "int4"}}, "did you mean Linear"),
    ({"divisibility": "maybe"}, "divisibility"),
    ({"nan_policy": "ignore"}, "nan_policy"),
    ({"weight_threshold": -1}, "weight_threshold"),
    ({"algorithm": {"name": "magic"}}, "algorithm"),
    ({"validate": {"max_ppl": 1}}, "max_ppl"),
    ({"global": {"format": "int4", "block_size": 12}}, "multiple of 8"),
    # `lowbit run` saves a package under the recipe's name: never a path
    ({"name": "/tmp/elsewhere", "global": "int8"}, "plain folder name"),
    ({"name": "..", "global": "int8"}, "plain folder name"),
    ({"name": "", "global": "int8"}, "plain folder name"),
    # a quoted number failed only after the whole run
    ({"global": "int8", "validate": {"max_delta_ppl": "1.0"}}, r"validate.max_delta_ppl = '1.0': a threshold is a number"),
])
def test_recipe_validation_names_the_key(bad, msg):
    with pytest.raises(RecipeError, match=msg):
        Recipe.load(bad)


def test_recipe_from_toml_and_unknown_name(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('divisibility = "pad"\n[global]\nformat = "int4"\nblock_size = 64\n[names."lm_head"]\nformat = "none"\n')
    r = Recipe.load(p)
    assert r.name == "r" and r.config_for("q", "Linear").block_size == 64 and r.config_for("lm_head", "Linear") is None
    (tmp_path / "bad.toml").write_text("global = [")
    with pytest.raises(RecipeError, match="not valid TOML"):
        Recipe.load(tmp_path / "bad.toml")
    with pytest.raises(RecipeError, match="did you mean int4"):
        Recipe.load("int44")
    odd = tmp_path / "my recipe (v2).toml"  # a file name is made a plain recipe name
    odd.write_text('[global]\nformat = "int8"\n')
    assert Recipe.load(odd).name == "my-recipe--v2-"


def test_pattern_matching_no_layer_lists_closest_names():
    model = tiny_llama()
    with pytest.raises(RecipeError, match=r"model\.layers\.0\.mlp\.up_projj.*closest layer names: model\.layers\.0\.mlp\.up_proj"):
        lowbit.quantize(model, {"global": "int4", "names": {"model.layers.0.mlp.up_projj": "int8"}}, progress=False)
    # nothing was swapped: errors come before work
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    # [algorithm.names] patterns are checked the same way (a typo silently gave its layers rtn)
    with pytest.raises(RecipeError, match=r"algorithm\.names\.'model\.layers\.\*\.mlp\.dwn_proj' matches no"):
        lowbit.quantize(model, {"global": "int4", "algorithm": {"name": "rtn", "names": {"model.layers.*.mlp.dwn_proj": "clip"}}},
                        progress=False)


def test_divisibility_policy_error_lists_layers_pad_and_skip():
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.raises(RecipeError, match=r"1 layer.*\b0 \(64, 40\).*divisibility = 'pad'"):
        lowbit.quantize(model, {"global": "int4"}, progress=False)
    x = torch.randn(3, 40)
    ref = model(x)
    r = lowbit.quantize(model, {"global": "int4", "divisibility": "pad"}, progress=False)
    assert [l["name"] for l in r.layers] == ["0", "2"]
    assert (model(x) - ref).abs().max() < 0.1
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 8))
    r = lowbit.quantize(model, {"global": "int4", "divisibility": "skip"}, progress=False)
    assert r.skipped[0]["name"] == "0" and "divisible" in r.skipped[0]["reason"]


def test_weight_threshold_and_nan_policy():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    with torch.no_grad():
        model[0].weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^0: 1 NaN/Inf"):
        lowbit.quantize(model, {"global": "int8"}, progress=False)
    r = lowbit.quantize(model, {"global": "int8", "nan_policy": "keep", "weight_threshold": 1000}, progress=False)
    reasons = {s["name"]: s["reason"] for s in r.skipped}
    assert "NaN" in reasons["0"] and "weight_threshold" in reasons["1"]
    assert isinstance(model[0], nn.Linear)


# --- models ----------------------------------------------------------------------------------
PRESETS = list(lowbit.PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_on_small_llama_and_bert(preset):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    extra = {}
    for model in (tiny_llama(), tiny_bert()):
        with torch.no_grad():
            ref = model(ids)[0]
        report = lowbit.quantize(model, {"global": {"format": preset, **extra}}, progress=False)
        assert report.layers and not report.skipped
        with torch.no_grad():
            out = model(ids)[0]
        assert torch.isfinite(out).all()
        rel = ((out - ref).norm() / ref.norm()).item()
        bound = {"int2": 1.0, "int2-e8m0": 1.5, "lut1": 1.5, "lut2": 1.0}.get(preset, 0.5)
        assert rel < bound, (preset, type(model).__name__, rel)
        for row in report.layers:
            # a LUT costs 2^bits entries: tiny tables (BERT's 2 x 64 token types) may not shrink
            assert row["format"] == preset and (row["bytes_after"] < row["bytes_before"] or row["shape"][0] <= 2)


def test_report_rows_and_placement():
    model = tiny_llama(tie=False)
    PLACEMENT.clear()
    report = lowbit.quantize(model, "int4", progress=False)
    names = {r["name"] for r in report.layers}
    assert "lm_head" in names and "model.embed_tokens" in names
    row = next(r for r in report.layers if r["name"] == "model.layers.0.mlp.up_proj")
    assert row["shape"] == [128, 64] and row["bits_per_weight"] == 4.5 and row["bytes_before"] == 128 * 64 * 4
    assert 15 < row["sqnr_db"] < 30 and row["max_abs"] > 0
    model(torch.randint(0, 256, (1, 5)))
    assert PLACEMENT["model.layers.0.mlp.up_proj"]["cpu_fast"] == 1  # int4 blocks: PyTorch's CPU int4 kernel
    assert PLACEMENT["model.embed_tokens"]["reference"] == 1


def test_tied_weights_stay_tied_and_are_quantized_once():
    model = tiny_llama(tie=True)
    report = lowbit.quantize(model, "int8", progress=False)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.weight_data is emb.weight_data and head.weight_scale is emb.weight_scale
    row = next(r for r in report.layers if r["name"] == "lm_head")
    assert row["tied_to"] == "model.embed_tokens"
    assert report.bytes_before == sum(r["bytes_before"] for r in report.layers if not r["tied_to"])


def test_a_tied_head_kept_float_by_name_is_refused_while_its_embedding_is_quantized():
    """[names] lm_head = "none" on a tied model: one weight cannot be float for the head and int8 for
    the embedding; the error names both and the fixes (before: lm_head silently came out int8)."""
    model = tiny_llama(tie=True)
    with pytest.raises(RecipeError, match=r"names.'lm_head' keeps lm_head float, but lm_head shares its weight with "
                                          r"model.embed_tokens .*give model.embed_tokens 'none' too"):
        lowbit.quantize(model, {"global": "int8", "names": {"lm_head": "none"}}, progress=False)
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    report = lowbit.quantize(model, {"global": "int8", "names": {"lm_head": "none", "model.embed_tokens": "none"}},
                             progress=False)
    assert {"lm_head", "model.embed_tokens"} <= {r["name"] for r in report.skipped}


def test_mixed_recipe_keeps_edges_and_embeddings_at_8_bits():
    model = tiny_llama()
    report = lowbit.quantize(model, "mixed", progress=False)
    fmt = {r["name"]: r["format"] for r in report.layers}
    assert fmt["model.embed_tokens"] == "int8" and fmt["lm_head"] == "int8"
    assert fmt["model.layers.0.mlp.up_proj"] == "int8" and fmt["model.layers.2.self_attn.o_proj"] == "int8"
    assert fmt["model.layers.1.mlp.up_proj"] == "int4"


def test_edge_blocks_count_blocks_not_the_lists_inside_a_block():
    """T5's blocks hold their sublayers in a ModuleList too (`block.1.layer.0`): only the first and
    last blocks are edges (before, every block's first and last sublayers were, so `mixed` left the
    whole encoder at 8 bits)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([nn.Linear(32, 32), nn.Linear(32, 32)])

    net = nn.Module()
    net.block = nn.ModuleList([Block() for _ in range(3)])
    report = lowbit.quantize(net, {"global": "int4", "edge_blocks": 1, "edge_format": "int8"}, progress=False)
    fmt = {r["name"]: r["format"] for r in report.layers}
    assert fmt == {"block.0.layer.0": "int8", "block.0.layer.1": "int8", "block.1.layer.0": "int4",
                   "block.1.layer.1": "int4", "block.2.layer.0": "int8", "block.2.layer.1": "int8"}


def test_hf_conv1d_is_swapped():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(48, 64))  # nf=48 outputs, nx=64 inputs; weight (64, 48)
    x = torch.randn(2, 64)
    ref = model(x)
    report = lowbit.quantize(model, {"global": "int8"}, progress=False)
    assert isinstance(model[0], QuantLinear) and report.layers[0]["shape"] == [48, 64]
    assert (model(x) - ref).abs().max() < 0.02


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_scaled_word_embeddings_keep_their_scale(tmp_path):
    """Gemma's embedding (an nn.Embedding subclass returning the rows times sqrt(hidden)) becomes a
    QuantEmbedding with that scale; before, the plain lookup dropped it (int8 logits 0.92 off the
    float model's). The scale survives save / load, and the Core ML stand-in keeps it."""
    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=64, vocab_size=320)
    model = transformers.GemmaForCausalLM(cfg).eval()
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
        lowbit.quantize(model, "int8", progress=False)
        emb = model.model.embed_tokens
        assert isinstance(emb, QuantEmbedding) and emb.embed_scale == pytest.approx(128 ** 0.5, rel=1e-6)
        out = model(ids).logits
        assert _rel(out, ref) < 0.03
        lowbit.save(model, tmp_path / "pkg")
        again = lowbit.load(tmp_path / "pkg")
        assert torch.equal(again(ids).logits, out)
    from lowbit.export.coreml import _DenseEmbedding

    dense = _DenseEmbedding(320, 128)
    dense.embed_scale = emb.embed_scale
    dense.weight.data = emb.qweight.dequantize(torch.float32)
    assert torch.allclose(dense(ids), emb(ids), atol=1e-5)


def test_linear_and_embedding_subclasses_with_their_own_forward_stay_float():
    """A subclass whose forward is not the lookup / product (OPT's learned positions take position ids)
    is left in float and listed in `skipped` with the reason; before, a plain QuantEmbedding took its
    place and the model failed at its first call."""

    class Positions(nn.Embedding):
        def forward(self, positions, offset=2):
            return super().forward(positions + offset)

    class Lora(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    class SameMath(nn.Linear):  # Falcon's FalconLinear: its own forward, the same product
        def forward(self, x):
            return x @ self.weight.T + self.bias

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(50, 64), Positions(40, 64)
            self.proj, self.mix, self.head = Lora(64, 64), SameMath(64, 64), nn.Linear(64, 50)

        def forward(self, ids):
            h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]), offset=2)
            return self.head(self.mix(self.proj(h)))

    torch.manual_seed(0)
    net = Net().eval()
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        ref = net(ids)
        report = lowbit.quantize(net, "int8", progress=False)
        out = net(ids)
    assert isinstance(net.tok, QuantEmbedding) and isinstance(net.head, QuantLinear) and isinstance(net.mix, QuantLinear)
    assert type(net.pos) is Positions and type(net.proj) is Lora
    skipped = {r["name"]: r["reason"] for r in report.skipped}
    assert set(skipped) == {"pos", "proj"} and "Positions has its own forward" in skipped["pos"]
    assert _rel(out, ref) < 0.03


def test_weights_no_recipe_reaches_are_reported():
    """Mixture-of-experts layers keeping their experts in one 3-D Parameter (transformers 5's
    Mixtral / Qwen3-MoE) and convolutions are not quantized; they are listed in `skipped` with the
    reason instead of vanishing from the report (82 % of a Mixtral's weights stayed fp32 unreported)."""

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up = nn.Parameter(torch.randn(4, 64, 32))
            self.bias = nn.Parameter(torch.zeros(4, 64))  # 2-D but small: under the threshold

        def forward(self, x):
            return torch.einsum("bk,enk->bn", x, self.gate_up)

    net = nn.Sequential(nn.Linear(32, 32), Experts(), nn.Conv1d(16, 32, 3))
    report = lowbit.quantize(net, {"global": "int8", "weight_threshold": 512}, progress=False)
    skipped = {r["name"]: r for r in report.skipped}
    assert [r["name"] for r in report.layers] == ["0"]
    assert set(skipped) == {"1.gate_up", "2.weight"}
    assert skipped["1.gate_up"]["shape"] == [4, 64, 32] and "3-D weight of Experts" in skipped["1.gate_up"]["reason"]


def test_torch_compile_matches_eager():
    """Compiled, the CPU fast paths trace the reference (kernels/cpu.py), so the compiled model gives
    the eager reference's numbers; the eager fast path (bf16 activations) is within 1e-2 of them."""
    from lowbit.kernels.registry import force_backend

    # a fresh dynamo: after other compiles in this process, transformers' shared method wrappers can
    # reach dynamo's recompile limit, and those frames then run eagerly (the fast path's numbers)
    torch._dynamo.reset()
    model = tiny_llama()
    lowbit.quantize(model, "int4", progress=False)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(ids).logits
        with force_backend("linear", "reference"):
            eager_ref = model(ids).logits
        compiled = torch.compile(model)(ids).logits
    assert torch.allclose(eager_ref, compiled, atol=1e-4, rtol=1e-4)
    assert ((eager - compiled).norm() / compiled.norm()).item() < 1e-2


def test_lut_groups_that_do_not_divide_the_rows_are_listed():
    model = tiny_bert()
    with pytest.raises(RecipeError, match=r"word_embeddings \(300, 64\): 300 rows not divisible by group_size 16.*group_size dividing"):
        lowbit.quantize(model, {"global": {"format": "lut4", "group_size": 16}}, progress=False)
    report = lowbit.quantize(model, {"global": {"format": "lut4", "group_size": 4}, "weight_threshold": 1000}, progress=False)
    assert all(r["format"] == "lut4" for r in report.layers) and report.skipped[0]["name"] == "embeddings.token_type_embeddings"
