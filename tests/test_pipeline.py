"""Validate, profile, report and the run pipeline (issue: prove it and measure it)."""

import copy
import json

import pytest
import torch

import lowbit
from lowbit import cli
from lowbit.pipeline import ThresholdError, run
from lowbit.validate import check_thresholds, quantized_layer_names

transformers = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_lm_metrics_against_a_hand_computed_reference():
    base = tiny_llama()
    quant = copy.deepcopy(base)
    lowbit.quantize(quant, {"global": "int4"}, progress=False)
    ids = torch.randint(0, 256, (6, 20), generator=torch.Generator().manual_seed(2))
    res = lowbit.validate(base, quant, ids, batch_size=4)
    with torch.no_grad():
        lb, lq = base(ids).logits.log_softmax(-1), quant(ids).logits.log_softmax(-1)
    kl = (lb.exp() * (lb - lq)).sum(-1).flatten()
    nll = -lb[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert res.metrics["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert res.metrics["kl_p99"] == pytest.approx(torch.quantile(kl.double(), 0.99).item(), rel=1e-4)
    assert res.metrics["ppl_base"] == pytest.approx(nll.exp().item(), rel=1e-5)
    assert res.metrics["top1_agreement"] == pytest.approx((lb.argmax(-1) == lq.argmax(-1)).float().mean().item())
    assert res.metrics["tokens"] == 120 and len(res.samples["kl"]) == 120
    # every quantized layer gets an output SQNR from the hooks
    assert {r["name"] for r in res.layers} == set(quantized_layer_names(quant)) and len(res.layers) == 16


def test_threshold_failure_names_threshold_value_and_worst_layers():
    base = tiny_llama()
    quant = copy.deepcopy(base)
    lowbit.quantize(quant, {"global": "int2"}, progress=False)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    res = lowbit.validate(base, quant, ids, thresholds={"max_kl_p99": 1e-9, "min_top1_agreement": 0.0})
    assert len(res.failures) == 1 and not res.passed
    msg = res.failures[0]
    assert msg.startswith("max_kl_p99 = 1e-09 failed: measured kl_p99 = ") and "worst layers: model.layers." in msg
    with pytest.raises(ValueError, match="cosine"):
        check_thresholds(res, {"min_cosine_p1": 0.9})  # not measured for language models


def test_embedding_and_tensor_tasks():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    quant = copy.deepcopy(base)
    lowbit.quantize(quant, "int8", progress=False)
    x = torch.randn(40, 64)
    res = lowbit.validate(base, quant, x, task="tensor", thresholds={"min_sqnr_db": 25})
    assert res.passed and res.metrics["sqnr_db"] > 25 and res.metrics["abs_err_p99"] >= res.metrics["abs_err_p95"]
    cls = lowbit.validate(base, quant, x, task="classifier", labels=torch.zeros(40, dtype=torch.long))
    assert 0.8 <= cls.metrics["top1_agreement"] <= 1.0 and "accuracy_quant" in cls.metrics


def test_profile_counts_placement_and_flags_fallbacks(tmp_path):
    model = tiny_llama()
    lowbit.quantize(model, {"global": "int8", "names": {"model.layers.0.mlp.down_proj": "mxfp4"}}, progress=False)
    prof = lowbit.profile(model, batch_sizes=(1, 2), repeats=2, seq_len=8, decode_tokens=3)
    assert prof.decode_tokens_per_s > 0 and prof.prefill_tokens_per_s > 0 and prof.best_batch_size in (1, 2)
    assert prof.placement["model.layers.0.mlp.up_proj"].keys() == {"cpu_fast"}
    assert prof.placement["model.layers.0.mlp.down_proj"].keys() == {"reference"}
    assert "model.layers.0.mlp.down_proj" in prof.fallbacks and "model.layers.0.mlp.up_proj" not in prof.fallbacks
    # a previous run that was much faster makes this one a regression
    # (1000x: this run's own spread sets the noise margin, and two repeats on a loaded CPU can spread a lot)
    fast = prof.to_dict() | {"latency": [r | {"p50_ms": r["p50_ms"] / 1000, "spread": 0.0} for r in prof.latency]}
    (tmp_path / "prev.json").write_text(json.dumps(fast))
    again = lowbit.profile(model, batch_sizes=(1,), repeats=2, seq_len=8, decode_tokens=2, compare=tmp_path / "prev.json")
    assert again.regressions and again.regressions[0].startswith("batch 1: p50")


def test_profile_in_bf16_measures_a_copy_on_the_fast_path(tmp_path, capsys):
    """`profile(dtype=torch.bfloat16)` / `lowbit profile --dtype bfloat16`: the model runs in bf16
    (on CPU the int4 blocks take the fast path, which wants 16-bit activations), the module passed
    in is left in fp32 with its planes untouched."""
    model = tiny_llama()
    lowbit.quantize(model, {"global": "int4"}, progress=False)
    planes = {k: v.clone() for k, v in model.state_dict().items() if ".weight_" in k}
    prof = lowbit.profile(model, batch_sizes=(1,), repeats=2, seq_len=8, decode_tokens=3, dtype=torch.bfloat16)
    assert prof.dtype == "bfloat16" and prof.decode_tokens_per_s > 0
    assert prof.placement["model.layers.0.mlp.up_proj"].keys() == {"cpu_fast"}
    assert next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(model.state_dict()[k], v) for k, v in planes.items())
    from lowbit import package

    pkg = package.save(model, tmp_path / "pkg")
    assert cli.main(["profile", str(pkg), "--no-baseline", "--dtype", "bfloat16", "--batch-sizes", "1",
                     "--repeats", "2", "--decode-tokens", "2", "--json", str(tmp_path / "p.json")]) == 0
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["dtype"] == "bfloat16" and set(saved["placement"]["model.layers.1.self_attn.q_proj"]) == {"cpu_fast"}
    assert "cpu_fast" in capsys.readouterr().out


def test_profile_with_fused_projections_measures_a_fused_copy(tmp_path):
    """`profile(fuse=True)` / `lowbit profile --fuse`: q / k / v and gate / up run as one matmul each
    (placement under the joined names; the quantized MLPs as gated MLPs); the module passed in has its
    separate layers again after."""
    from lowbit.nn import FusedSlice, GatedMLP

    model = tiny_llama()
    lowbit.quantize(model, {"global": "int8"}, progress=False)
    prof = lowbit.profile(model, batch_sizes=(1,), repeats=2, seq_len=8, decode_tokens=3, fuse=True)
    assert sorted(prof.fused) == sorted(f"model.layers.{i}.{g}" for i in range(2)
                                        for g in ("self_attn.q_proj+k_proj+v_proj", "mlp.gate_proj+up_proj"))
    assert "model.layers.0.mlp.gate_proj+up_proj" in prof.placement and "model.layers.0.mlp.up_proj" not in prof.placement
    assert prof.decode_tokens_per_s > 0 and not any(isinstance(m, (FusedSlice, GatedMLP)) for m in model.modules())
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"  # the gated MLP unfused too
    assert not any("q_proj_k_proj_v_proj" in n for n, _ in model.named_modules())  # fused in place, unfused after
    assert prof.not_fused == {}
    mixed = tiny_llama()  # a mixed-precision recipe: one group cannot be joined, and the profile says why
    lowbit.quantize(mixed, {"global": "int8", "names": {"model.layers.1.self_attn.k_proj": "int4"}}, progress=False)
    prof = lowbit.profile(mixed, batch_sizes=(1,), repeats=1, seq_len=8, decode_tokens=2, fuse=True)
    assert prof.not_fused == {"model.layers.1.self_attn.q_proj+k_proj+v_proj": "formats differ: int4, int8"}
    assert len(prof.fused) == 3
    from lowbit import package

    pkg = package.save(model, tmp_path / "pkg")
    assert cli.main(["profile", str(pkg), "--no-baseline", "--fuse", "--batch-sizes", "1", "--repeats", "2",
                     "--decode-tokens", "2", "--json", str(tmp_path / "p.json")]) == 0
    assert len(json.loads((tmp_path / "p.json").read_text())["fused"]) == 4


def test_fusion_line_names_a_group_left_apart_and_why():
    from lowbit.pipeline import fusion_line

    assert fusion_line({"fused": ["a", "b"], "not_fused": {}}) == "   fused 2 group(s)"
    line = fusion_line({"fused": [], "not_fused": {"m.q_proj+k_proj+v_proj": "formats differ: int4, int8", "x": "y"}})
    assert line == "   fused 0 group(s); left apart 2, e.g. m.q_proj+k_proj+v_proj: formats differ: int4, int8"


@pytest.mark.slow
def test_run_on_minilm_writes_reports_and_exit_code_3_on_impossible_threshold(tmp_path, capsys):
    report = run("minilm", recipes=["int8"], output=tmp_path / "ok", profile_model=False, log=lambda s: None)
    m = report["runs"][0]["validation"]["metrics"]
    assert m["cosine_p1"] >= 0.995, m  # int8 on all-MiniLM-L6-v2 keeps the worst 1% of embeddings aligned
    saved = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert saved["schema_version"] == 1 and saved["runs"][0]["recipe"] == "int8"
    html = (tmp_path / "ok" / "report.html").read_text()
    assert html.count("<img") >= 3 and "data:image/png;base64," in html

    recipe = tmp_path / "strict.toml"
    recipe.write_text('[global]\nformat = "int4"\n[validate]\nmin_cosine_p1 = 1.01\n')
    with pytest.raises(ThresholdError, match="min_cosine_p1 = 1.01 failed: measured cosine_p1 = 0"):
        run("minilm", recipes=[str(recipe)], output=tmp_path / "bad", profile_model=False, log=lambda s: None)
    assert (tmp_path / "bad" / "report.json").exists()  # the evidence is written before failing
    code = cli.main(["run", "minilm", "-r", str(recipe), "-o", str(tmp_path / "cli"), "--no-profile"])
    assert code == 3
    err = capsys.readouterr().err
    assert "validation failed" in err and "min_cosine_p1" in err and "worst layers" in err


@pytest.mark.slow
def test_profile_cli_takes_an_encoder_package(tmp_path, capsys):
    """`lowbit profile PKG` of an encoder (MiniLM): the example input comes from the source's
    tokenizer and the built-in corpus (before, every encoder package failed with "pass example=")."""
    pkg = tmp_path / "minilm-int8"
    assert cli.main(["quantize", "minilm", "-r", "int8", "-o", str(pkg)]) == 0
    assert cli.main(["profile", str(pkg), "--batch-sizes", "1", "--repeats", "2", "--json", str(tmp_path / "p.json")]) == 0
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["latency"][0]["p50_ms"] > 0 and any("query" in k for k in saved["placement"])
    out = capsys.readouterr().out
    assert "lowbit profile" in out and "placement (layers per backend that ran)" in out


def test_a_model_folder_without_a_tokenizer_is_refused_before_any_output(tmp_path):
    """The built-in corpus needs the model's tokenizer: a folder without one gets the fix named
    (before: AttributeError 'NoneType' object has no attribute 'eos_token_id', and an empty output
    folder was left behind)."""
    tiny_llama().save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="no tokenizer files .* copy the model's tokenizer files into its folder"):
        run(str(tmp_path / "model"), recipes=["int8"], output=tmp_path / "out", profile_model=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_recipes_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    """A misspelt recipe, or one given twice (its package would be written twice under one name),
    fails before any loading or output (before: after the model had loaded / silently)."""
    from lowbit import models

    monkeypatch.setattr(models, "load_source", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(lowbit.RecipeError, match="did you mean int4"):
        run("minilm", recipes=["int44"], output=tmp_path / "out", log=lambda s: None)
    with pytest.raises(ValueError, match=r"recipe name\(s\) \['int8'\] given more than once"):
        run("minilm", recipes=["int8", "int4", "int8"], output=tmp_path / "out", log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_calibration_coverage_flags_inputs_outside_the_calibration_range():
    from lowbit.validate import calibration_coverage

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    calib = [torch.randn(64, 8)]
    wide = [torch.randn(64, 8) * 10]
    rows = calibration_coverage(model, ["0", "1"], calib, wide, lambda m, b: m(b))
    assert rows[0]["flagged"] and rows[0]["outside_fraction"] > 0.5
    same = calibration_coverage(model, ["0"], calib, calib, lambda m, b: m(b))
    assert same[0]["outside_fraction"] == 0 and not same[0]["flagged"]


def test_user_data_files(tmp_path):
    import numpy as np

    from lowbit.data import load_data_file

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert load_data_file(tmp_path / "a.jsonl") == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: expected an object with a string field 'text'"):
        load_data_file(tmp_path / "b.jsonl")
    (tmp_path / "c.txt").write_text("para one\nstill one\n\npara two\n")
    assert load_data_file(tmp_path / "c.txt") == ["para one\nstill one", "para two"]
    np.save(tmp_path / "d.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    assert load_data_file(tmp_path / "d.npy").shape == (2, 3)
    np.save(tmp_path / "e.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="never unpickles"):
        load_data_file(tmp_path / "e.npy")
    with pytest.raises(ValueError, match="unsupported"):
        (tmp_path / "f.pkl").write_bytes(b"x")
        load_data_file(tmp_path / "f.pkl")
