"""Calibration-aware algorithms (issue 7): grids, clip search, GPTQ, AWQ folds, sequential
calibration with resume. Small sizes; references are round-to-nearest and exact float algebra."""

import copy

import pytest
import torch

from lowbit.algorithms.assemble import from_codes
from lowbit.algorithms.awq import fold, gqa_tie, search_scales
from lowbit.algorithms.clip import clip_search
from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.grid import code_grid, encode_params, nearest_codes
from lowbit.algorithms.layer import quantize_weight
from lowbit.formats import quantize_tensor
from lowbit.formats.presets import resolve
from lowbit.quantize import quantize
from lowbit.recipe import Recipe, RecipeError
from tiny_models import tiny_llama


def _correlated(gen, n=1024, k=128):
    mix = torch.randn(k, k, generator=gen) / k ** 0.5
    scale = torch.rand(k, generator=gen) * 3 + 0.1
    return (torch.randn(n, k, generator=gen) @ mix) * scale + 0.05 * torch.randn(n, k, generator=gen)


def _out_err(x, w, qt):
    return float(((x @ (qt.dequantize() - w).T) ** 2).sum())


@pytest.mark.parametrize("name", ["int4", "int4-asym", "int8", "int4-e8m0", "int2-e8m0", "mxfp4", "mxfp8-e4m3", "q4_0",
                                  "q8_0", "q4_1", "gguf-mxfp4"])
def test_grid_nearest_equals_round_to_nearest(gen, name):
    """Codes picked from the decoded grid with the encoder's scales reproduce RTN exactly; llama.cpp's
    q4_0 / q4_1 / q8_0 round with the fp32 scale before it is stored in fp16, so there the grid pick
    is only never farther from w than llama.cpp's."""
    fmt = resolve(name)
    w = torch.randn(24, 96, generator=gen)
    b = fmt.block_size or 96
    params, codes = [], []
    for j in range(0, 96, b):
        p = encode_params(w[:, j:j + b], fmt)
        grid, ok = code_grid(p, fmt, 24)
        params.append(p)
        codes.append(nearest_codes(w[:, j:j + b], grid, ok))
    qt = from_codes(torch.cat(codes, 1), params, fmt, (24, 96))
    rtn = quantize_tensor(w, fmt).dequantize()
    if name in ("q4_0", "q8_0", "q4_1"):
        assert bool(((qt.dequantize() - w).abs() <= (rtn - w).abs()).all())
    else:
        assert torch.equal(qt.dequantize(), rtn)


@pytest.mark.parametrize("fmt", ["int4", "int4-e8m0", "mxfp4", "lut4", "int3-b64"])
def test_gptq_beats_rtn_on_correlated_inputs(gen, fmt):
    fmt = resolve("int4", element="int3", block_size=64) if fmt == "int3-b64" else resolve(fmt)
    x = _correlated(gen)
    w = torch.randn(48, 128, generator=gen)
    H = x.T @ x / len(x)
    rtn = quantize_tensor(w, fmt)
    q = gptq(w, H, fmt)
    assert q.planes.keys() == rtn.planes.keys()
    assert all(q.planes[k].shape == rtn.planes[k].shape for k in q.planes)
    assert _out_err(x, w, q) < 0.75 * _out_err(x, w, rtn)
    q2 = gptq(w, H, fmt, act_order=True)
    assert _out_err(x, w, q2) < 0.85 * _out_err(x, w, rtn)


def test_gptq_pads_columns_not_divisible_by_block(gen):
    x = _correlated(gen, k=80)
    w = torch.randn(16, 80, generator=gen)
    st = type("S", (), {"hessian": x.T @ x / len(x), "importance": torch.diagonal(x.T @ x / len(x))})()
    q = quantize_weight(w, "int4", "gptq", st, pad=True)
    assert q.shape == (16, 80) and q.dequantize().shape == (16, 80)
    assert _out_err(x, w, q) < _out_err(x, w, quantize_tensor(w, "int4", pad=True))
    with pytest.raises(ValueError, match="not divisible"):
        quantize_weight(w, "int4", "gptq", st)


def test_clip_search_never_worse_and_helps_outliers(gen):
    w = torch.randn(32, 128, generator=gen)
    w[torch.arange(32), torch.randint(0, 128, (32,), generator=gen)] *= 12  # one outlier per row
    for name in ["int4", "int4-asym", "int4-e8m0", "mxfp4", "q4_0"]:
        rtn_err = float(((quantize_tensor(w, name).dequantize() - w) ** 2).sum())
        clip_err = float(((clip_search(w, name).dequantize() - w) ** 2).sum())
        assert clip_err <= rtn_err, name
    g = torch.randn(64, 256, generator=gen)  # Gaussian blocks: clipping the tails pays at 4 bits
    assert float(((clip_search(g, "int4").dequantize() - g) ** 2).sum()) < 0.97 * float(((quantize_tensor(g, "int4").dequantize() - g) ** 2).sum())
    with pytest.raises(ValueError, match="palette"):
        clip_search(w, "lut4")


def test_weighted_kmeans_lowers_weighted_error(gen):
    w = torch.randn(32, 64, generator=gen)
    w[:, :16] *= 0.1  # small-valued columns that the inputs make important
    imp = torch.ones(64)
    imp[:16] = 100.0
    st = type("S", (), {"importance": imp, "hessian": torch.diag(imp)})()
    plain = quantize_tensor(w, "lut3")
    weighted = quantize_weight(w, "lut3", "kmeans", st)
    werr = lambda q: float((((q.dequantize() - w) ** 2) * imp).sum())
    assert werr(weighted) < 0.9 * werr(plain)
    with pytest.raises(ValueError, match="palettes"):
        quantize_weight(w, "int4", "kmeans", st)


def test_awq_scales_fold_exactly_llama():
    """Folding AWQ scales (norm -> q/k/v, norm -> gate/up, up -> down, GQA v -> o) leaves the float
    model's output unchanged."""
    torch.manual_seed(0)
    m = tiny_llama().float()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = m(ids).logits
        layer = m.model.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        s = torch.rand(64) + 0.5
        fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], s)
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], torch.rand(64) + 0.5)
        fold(mlp.up_proj, [mlp.down_proj], torch.rand(128) + 0.5)
        hd = 16
        so = gqa_tie(2, 2, hd)(torch.rand(64) + 0.5)
        fold(attn.v_proj, [attn.o_proj], so, gqa=(2, 2, hd))
        out = m(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def _tiny_gemma(version=1):
    import transformers

    torch.manual_seed(0)
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=32, vocab_size=256)
    if version == 1:
        m = transformers.GemmaForCausalLM(transformers.GemmaConfig(**kw))
    else:
        m = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**kw))
    with torch.no_grad():  # trained norms are not all zero (Gemma initialises w = 0 in x_hat * (1 + w))
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)
    return m.eval().float()


def test_awq_fold_into_gemma_norms_is_exact():
    """Gemma's RMSNorm scales by (1 + w): the fold writes (1 + w) / s - 1 (dividing w alone, as for
    Llama, changed the float model: AWQ int8 logits 50x further off than plain rounding)."""
    from lowbit.algorithms.awq import norm_weight_offset

    m = _tiny_gemma()
    layer = m.model.layers[0]
    assert norm_weight_offset(layer.input_layernorm) == 1.0 and norm_weight_offset(torch.nn.LayerNorm(8)) == 0.0
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = m(ids).logits
        fold(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
             torch.rand(64) + 0.5)
        fold(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj], torch.rand(64) + 0.5)
        out = m(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("version", [1, 2])
def test_awq_on_gemma_is_no_worse_than_rounding(version):
    """AWQ on Gemma (norm offset) and Gemma-2 (`post_attention_layernorm` is a norm after attention
    there, not the MLP's input: that fold is undone and noted) stays at least as close to the float
    model as round-to-nearest (before: 50x / 8.8x further off)."""
    m = _tiny_gemma(version)
    ev = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m(ev).logits
    errs, notes = {}, {}
    for alg in ["rtn", "awq"]:
        q = copy.deepcopy(m)
        rep = quantize(q, {"global": "int8", "types": {"Embedding": "none"}, "algorithm": alg},
                       calibration=_batches(), progress=False)
        with torch.no_grad():
            errs[alg] = float((q(ev).logits - ref).norm() / ref.norm())
        notes[alg] = {r["name"]: r["algorithm"] for r in rep.layers}
    assert errs["awq"] <= 1.2 * errs["rtn"], errs
    undone = [n for n, a in notes["awq"].items() if "not folded" in a]
    if version == 2:  # gate / up of every block: the post-attention norm does not feed them
        assert sorted(undone) == sorted(f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up"))
    else:
        assert not undone


def test_awq_search_prefers_scaling_for_uneven_channels(gen):
    x = torch.randn(512, 64, generator=gen) * torch.linspace(0.05, 6, 64)
    w = torch.randn(32, 64, generator=gen)
    s = search_scales(x, [w], ["int4"])
    wq = quantize_tensor(w * s, "int4").dequantize() / s
    err = lambda wh: float(((x @ (wh - w).T) ** 2).mean())
    assert err(wq) <= err(quantize_tensor(w, "int4").dequantize())


def _batches():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (8, 24), generator=g)
    return [{"input_ids": ids[i:i + 4]} for i in range(0, 8, 4)]


def test_calibrated_quantize_lowers_kl_and_reports_algorithm():
    m = tiny_llama().float()
    ev = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m(ev).logits.log_softmax(-1)
    kls = {}
    for alg in ["rtn", "gptq", "awq+gptq"]:
        q = copy.deepcopy(m)
        rep = quantize(q, {"global": "int4", "types": {"Embedding": "none"}, "algorithm": alg},
                       calibration=_batches(), progress=False)
        with torch.no_grad():
            out = q(ev).logits.log_softmax(-1)
        kls[alg] = float((ref.exp() * (ref - out)).sum(-1).mean())
        inside = [r for r in rep.layers if ".layers." in r["name"]]
        assert all(r["algorithm"].startswith(alg.split("+")[0]) or "awq" in r["algorithm"] for r in inside)
    assert kls["gptq"] < kls["rtn"] and kls["awq+gptq"] < kls["rtn"]


def test_calibration_resume_after_failure_gives_same_planes(tmp_path):
    """A calibration interrupted after block 0 and resumed from its state file gives the
    uninterrupted run's planes bit for bit (GPTQ, and AWQ + GPTQ with its folds)."""
    from safetensors.torch import load_file

    from lowbit.algorithms.calibrate import calibrate

    def run(alg, state_dir=None, fail=None):
        m = tiny_llama().float()
        plan = {n: (resolve("int4"), False) for n, mod in m.named_modules()
                if isinstance(mod, torch.nn.Linear) and ".layers." in n}
        return m, calibrate(m, plan, _batches(), lambda n: alg, {}, state_dir=state_dir,
                            progress=False, fail_after_block=fail)

    # GPTQ: a resumed run gives the uninterrupted run's planes bit for bit
    _, full = run("gptq")
    with pytest.raises(RuntimeError, match="injected failure after block 0"):
        run("gptq", tmp_path / "g", fail=0)
    _, resumed = run("gptq", tmp_path / "g")
    assert resumed.resumed_from == 1
    assert full.qtensors.keys() == resumed.qtensors.keys()
    for n, qt in full.qtensors.items():
        for p, t in qt.planes.items():
            assert torch.equal(t, resumed.qtensors[n].planes[p]), (n, p)
    # AWQ: the folds of the finished block are restored into the model's float weights (as saved in
    # the state file), and the resumed run ends with the uninterrupted run's planes and folds
    m1, full = run("awq+gptq")
    with pytest.raises(RuntimeError, match="injected failure after block 0"):
        run("awq+gptq", tmp_path / "a", fail=0)
    saved = load_file(str(tmp_path / "a" / "calibration-state.safetensors"))
    folds = {k[3:]: v for k, v in saved.items() if k.startswith("f::")}
    assert folds and all(".layers.0." in k for k in folds)
    m2, resumed = run("awq+gptq", tmp_path / "a")
    assert resumed.resumed_from == 1
    params = dict(m2.named_parameters())
    for k, v in folds.items():
        assert torch.equal(params[k], v), k
    assert any("awq: scaled" in v for k, v in full.notes.items() if ".layers.1." in k)  # block 1 folded too
    assert full.notes == resumed.notes and full.qtensors.keys() == resumed.qtensors.keys()
    for n, qt in full.qtensors.items():
        for p, t in qt.planes.items():
            assert torch.equal(t, resumed.qtensors[n].planes[p]), (n, p)
    for k, v in m1.named_parameters():
        assert torch.equal(v, params[k]), k
    tmp_path = tmp_path / "g"
    # a state from other data is refused, not silently reused
    with pytest.raises(ValueError, match="belongs to another"):
        from lowbit.algorithms.calibrate import calibrate as cal
        m = tiny_llama().float()
        plan = {n: (resolve("int8"), False) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in n}
        cal(m, plan, _batches(), lambda n: "gptq", {}, state_dir=tmp_path, progress=False)


def test_calibration_stacks_only_layers_reading_one_input():
    """Layers are GPTQ-quantized in one stacked sweep (under the first one's Hessian) only when
    they read the same input. Here c and d read a buffer at a's and b's address after the block
    overwrote it: the statistics are each layer's own (checked against E[x x^T] computed
    directly) and the stacks are {a, b} and {c, d}, not one stack under a's Hessian."""
    from torch import nn

    from lowbit.algorithms.calibrate import _collect_stats, _stack_groups

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.n1, self.n2 = nn.LayerNorm(32), nn.LayerNorm(32)
            nn.init.uniform_(self.n2.weight, 0.5, 2.0)
            self.a, self.b, self.c, self.d = (nn.Linear(32, 16) for _ in range(4))

        def forward(self, x):
            buf = self.n1(x)
            y = self.a(buf) + self.b(buf)
            buf.copy_(self.n2(x))  # same tensor, same address, other values
            return y + self.c(buf) + self.d(buf)

    blk = Block()
    xs = [torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    names = {n: getattr(blk, n) for n in "abcd"}
    with torch.no_grad():
        stats, source = _collect_stats(blk, names, [((x,), {}) for x in xs], 64)
        refs = {}
        for n, norm in (("a", blk.n1), ("c", blk.n2)):
            h = torch.cat([norm(x).reshape(-1, 32) for x in xs]).double()
            refs[n] = (h.T @ h / len(h)).float()
    for n, r in (("a", "a"), ("b", "a"), ("c", "c"), ("d", "c")):
        torch.testing.assert_close(stats[n].hessian, refs[r], rtol=1e-5, atol=1e-6)
        assert stats[n].tokens == 96
    assert not torch.allclose(refs["a"], refs["c"], rtol=1e-2)  # the inputs really differ
    plan = {n: (resolve("int4"), False) for n in names}
    assert _stack_groups(names, plan, lambda n: "gptq", source, stats) == [["a", "b"], ["c", "d"]]


def test_recipe_algorithm_validation_and_per_layer_choice():
    r = Recipe.load({"global": "int4", "algorithm": {"name": "gptq", "damp": 0.02, "names": {"*.mlp.*": "rtn"}}})
    assert r.algorithm_for("model.layers.0.mlp.up_proj") == "rtn"
    assert r.algorithm_for("model.layers.0.self_attn.q_proj") == "gptq"
    assert r.needs_calibration
    with pytest.raises(RecipeError, match="did you mean 'gptq'"):
        Recipe.load({"global": "int4", "algorithm": "gtpq"})
    with pytest.raises(RecipeError, match="unknown key"):
        Recipe.load({"global": "int4", "algorithm": {"name": "gptq", "dampening": 0.1}})
    with pytest.raises(RecipeError, match="needs calibration data"):
        quantize(tiny_llama(), {"global": "int4", "algorithm": "gptq"}, progress=False)


def test_sensitivity_replay_matches_full_forward_and_plan_meets_bits():
    """Scores with earlier blocks replayed from cache equal a plain full forward; the plan for a
    bits target meets it and the written TOML is an ordinary, loadable recipe."""
    import tomllib

    from lowbit.algorithms.mixed import dump_toml, plan_bits, plan_for_bits, plan_for_budget, to_recipe
    from lowbit.algorithms.sensitivity import sensitivity

    m = tiny_llama().float()
    batches = _batches()
    layer = "model.layers.1.mlp.down_proj"
    rows = sensitivity(m, ["int8", "int4", "int2"], batches, layers=[layer, "model.layers.0.self_attn.q_proj"], progress=False)
    got = {r["format"]: r["score"] for r in rows if r["layer"] == layer}
    # independent: quantize that one layer for real and run the whole model
    with torch.no_grad():
        ref = [m(**b).logits.log_softmax(-1) for b in batches]
        q = copy.deepcopy(m)
        mod = dict(q.named_modules())[layer]
        mod.weight.data = quantize_tensor(mod.weight.data, "int2").dequantize()
        out = [q(**b).logits.log_softmax(-1) for b in batches]
    kl = sum(float((r.exp() * (r - o)).sum(-1).clamp(min=0).mean()) for r, o in zip(ref, out)) / len(batches)
    assert got["int2"] == pytest.approx(kl, rel=1e-4)
    assert got["int8"] < got["int4"] < got["int2"]
    all_rows = sensitivity(m, ["int8", "int4", "int2"], batches, progress=False)
    plan = plan_for_bits(all_rows, 4.6)
    assert plan_bits(all_rows, plan) <= 4.6 and len(set(plan.values())) > 1
    recipe = to_recipe(plan, {"int8": "int8", "int4": "int4", "int2": "int2"}, base={"types": {"Embedding": "none"}})
    loaded = Recipe.load(tomllib.loads(dump_toml(recipe)))
    q = copy.deepcopy(m)
    rep = quantize(q, loaded, progress=False)
    lin = [r for r in rep.layers if r["name"] in plan]
    measured = 8 * sum(r["bytes_after"] for r in lin) / sum(r["shape"][0] * r["shape"][1] for r in lin)
    assert measured <= 4.6 + 1e-6
    # accuracy budget: the smallest plan whose measured check passes, with the check really called
    calls = []
    def passes(p):
        calls.append(plan_bits(all_rows, p))
        return plan_bits(all_rows, p) >= 5.0
    p, probes = plan_for_budget(all_rows, passes)
    assert plan_bits(all_rows, p) >= 5.0 and len(calls) == len(probes) >= 2
