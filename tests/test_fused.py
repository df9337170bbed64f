"""Sibling projections fused into one matmul (`lowbit.nn.fused`): joined planes are the members'
planes, fused models give the unfused models' numbers, the joined matmul runs once per input."""

import copy

import pytest
import torch

import lowbit
from lowbit.kernels import PLACEMENT
from lowbit.kernels.registry import force_backend
from lowbit.nn import FusedSlice, QuantLinear, fuse_projections, join_rows, unfuse_projections
from tiny_models import tiny_llama


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-asym", "int4-e8m0", "mxfp4", {"format": "lut4", "group_size": 8}])
def test_joined_rows_dequantize_to_the_members(fmt):
    g = torch.Generator().manual_seed(3)
    f = lowbit.PRESETS[fmt] if isinstance(fmt, str) else lowbit.PRESETS[fmt["format"]].replace(group_size=8)
    parts = [lowbit.quantize_tensor(torch.randn(n, 96, generator=g), f) for n in (40, 16, 24)]
    joined = join_rows(parts)
    assert joined.shape == (80, 96) and joined.fmt == f
    assert torch.equal(joined.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_rows_that_cannot_be_joined_are_refused():
    a = lowbit.quantize_tensor(torch.randn(8, 64), "int4")
    with pytest.raises(ValueError, match="formats differ"):
        join_rows([a, lowbit.quantize_tensor(torch.randn(8, 64), "int8")])
    with pytest.raises(ValueError, match="column counts differ"):
        join_rows([a, lowbit.quantize_tensor(torch.randn(8, 32), "int4")])
    lut = lowbit.quantize_tensor(torch.randn(8, 64), "lut4")
    with pytest.raises(ValueError, match="one palette per tensor"):
        join_rows([lut, lut])


def _attn(fmts=("int8", "int8", "int8"), bias=(False, True, False)):
    torch.manual_seed(0)
    m = torch.nn.Module()
    for name, n, f, b in zip(("q_proj", "k_proj", "v_proj"), (48, 16, 16), fmts, bias):
        setattr(m, name, QuantLinear.from_float(torch.nn.Linear(64, n, bias=b), f))
    return m


def test_fused_group_runs_once_per_input_and_gives_each_member_its_columns():
    m = _attn()
    plain = copy.deepcopy(m)
    x = torch.randn(2, 5, 64)
    before = [getattr(m, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
    assert fuse_projections(m) == ["q_proj+k_proj+v_proj"]
    assert all(isinstance(getattr(m, n), FusedSlice) for n in ("q_proj", "k_proj", "v_proj"))
    PLACEMENT.clear()
    after = [getattr(m, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
    assert sum(PLACEMENT["q_proj+k_proj+v_proj"].values()) == 1  # one joined matmul for three members
    for a, b in zip(before, after):  # k_proj's bias (the others have none) lands on its columns only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert m.q_proj.shared.state is None  # every member had it: the output is not kept
    # another input, or the same tensor changed in place, runs the joined matmul again
    y = torch.randn(2, 5, 64)
    PLACEMENT.clear()
    m.q_proj(x)
    torch.testing.assert_close(m.v_proj(y), plain.v_proj(y), rtol=1e-5, atol=1e-6)  # another tensor
    assert sum(PLACEMENT["q_proj+k_proj+v_proj"].values()) == 2
    m.q_proj.shared.state = None
    PLACEMENT.clear()
    m.q_proj(x)  # keeps x's output for k / v ...
    x.mul_(2.0)  # ... but x changes in place: same object, new version
    torch.testing.assert_close(m.k_proj(x), plain.k_proj(x), rtol=1e-5, atol=1e-6)
    assert sum(PLACEMENT["q_proj+k_proj+v_proj"].values()) == 2


def test_fused_members_under_inference_mode():
    m = _attn()
    plain = copy.deepcopy(m)
    fuse_projections(m)
    with torch.inference_mode():
        x = torch.randn(2, 64)
        PLACEMENT.clear()
        for n in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(getattr(m, n)(x), getattr(plain, n)(x), rtol=1e-5, atol=1e-6)
        assert sum(PLACEMENT["q_proj+k_proj+v_proj"].values()) == 1


def test_members_that_differ_are_left_alone():
    m = _attn(fmts=("int8", "int4", "int8"))
    skipped: dict = {}
    assert fuse_projections(m, skipped=skipped) == []
    assert isinstance(m.k_proj, QuantLinear)
    assert skipped == {"q_proj+k_proj+v_proj": "formats differ: int4, int8"}  # says why, for a mixed recipe


def test_fused_llama_gives_the_unfused_logits_and_moves_with_the_model():
    model = tiny_llama()
    lowbit.quantize(model, "int4", progress=False)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), force_backend("linear", "reference"):
        ref = model(ids).logits
        names = fuse_projections(model)
        assert names == [f"model.layers.{i}.{p}" for i in range(2)
                         for p in ("self_attn.q_proj+k_proj+v_proj", "mlp.gate_proj+up_proj")]
        fused = model(ids).logits
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    # the joined planes are registered once (state_dict), and `.to()` moves what the slices use
    keys = [k for k in model.state_dict() if "layers.0.self_attn" in k]
    assert any("q_proj_k_proj_v_proj.weight_data" in k for k in keys) and not any(".q_proj." in k for k in keys)
    model.to(torch.float64)
    assert model.model.layers[0].mlp.up_proj.joined.weight_data.dtype == torch.uint8


@pytest.mark.parametrize("gated_mlp", [False, True])
def test_fused_llama_under_torch_compile(gated_mlp):
    model = tiny_llama()
    lowbit.quantize(model, "int8", progress=False)
    fuse_projections(model, gated_mlp=gated_mlp)  # gated: lowbit.nn.gated.GatedMLP (tests/test_gated.py)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    try:
        with torch.no_grad(), force_backend("linear", "reference"):
            eager = model(ids).logits
            compiled = torch.compile(model, backend="aot_eager")(ids).logits
    finally:
        torch._dynamo.reset()  # leave no compiled frames (or recompile counts) to later tests
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_unfuse_gives_back_layers_with_the_same_outputs():
    m = _attn()
    plain = copy.deepcopy(m)
    fuse_projections(m)
    assert unfuse_projections(m) == ["q_proj+k_proj+v_proj"]
    assert [type(getattr(m, n)) for n in ("q_proj", "k_proj", "v_proj")] == [QuantLinear] * 3
    assert not hasattr(m, "q_proj_k_proj_v_proj")
    x = torch.randn(4, 64)
    for n in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(getattr(m, n)(x), getattr(plain, n)(x), rtol=1e-5, atol=1e-6)


def test_saving_a_fused_model_names_the_fix(tmp_path):
    m = _attn()
    fuse_projections(m)
    with pytest.raises(ValueError, match=r"'q_proj' is fused .*unfuse_projections\(model\) before saving"):
        lowbit.save(m, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists() and list(tmp_path.iterdir()) == []
    unfuse_projections(m)
    lowbit.save(m, tmp_path / "pkg")
    assert (tmp_path / "pkg").is_dir()
    back = lowbit.load(tmp_path / "pkg", model=_attn(), fuse=True)  # fused again as it loads
    assert isinstance(back.v_proj, FusedSlice)
    x = torch.randn(2, 64)
    torch.testing.assert_close(back.v_proj(x), m.v_proj(x), rtol=1e-5, atol=1e-6)


def test_float_linears_fuse_too():
    torch.manual_seed(0)
    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(32, 48)
    x = torch.randn(3, 32)
    with torch.no_grad():
        ref = (mlp.gate_proj(x), mlp.up_proj(x))
        assert fuse_projections(mlp) == ["gate_proj+up_proj"]
        torch.testing.assert_close((mlp.gate_proj(x), mlp.up_proj(x)), ref)
        unfuse_projections(mlp)
        torch.testing.assert_close(mlp.up_proj(x), ref[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["int4-e8m0", "int8", "mxfp4"])
def test_fused_projections_on_the_gpu_match_the_members(fmt):
    """On the GPU the joined shape may take another kernel path than a member's (e.g. 4096 x 6144
    through the Hopper int4 kernel where 4096 x 1024 takes the GEMV): the same codes, rounded in
    another order, so within 1e-2 rather than equal."""
    torch.manual_seed(0)
    m = torch.nn.Module()
    for name, n in (("q_proj", 512), ("k_proj", 128), ("v_proj", 128)):
        setattr(m, name, QuantLinear.from_float(torch.nn.Linear(1024, n, bias=False, device="cuda"), fmt))
    plain = copy.deepcopy(m)
    fuse_projections(m)
    for rows in (1, 4, 16, 70):
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        PLACEMENT.clear()
        outs = [getattr(m, n)(x).float() for n in ("q_proj", "k_proj", "v_proj")]
        assert dict(PLACEMENT["q_proj+k_proj+v_proj"]) == {"triton": 1}
        for n, o in zip(("q_proj", "k_proj", "v_proj"), outs):
            ref = getattr(plain, n)(x).float()
            assert ((o - ref).norm() / ref.norm()).item() < 1e-2, (fmt, rows, n)


def test_bert_self_attention_fuses_query_key_value():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    lowbit.quantize(model, "int8", progress=False)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), force_backend("linear", "reference"):
        ref = model(ids).last_hidden_state
        assert fuse_projections(model) == [f"encoder.layer.{i}.attention.self.query+key+value" for i in range(2)]
        fused = model(ids).last_hidden_state
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_validate_reads_a_fused_model_layer_by_layer():
    """`lowbit.validate` taps the fused members (named as in the float model), not the joined layers."""
    base = tiny_llama()
    quant = copy.deepcopy(base)
    lowbit.quantize(quant, "int8", progress=False)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with force_backend("linear", "reference"):
        plain = lowbit.validate(base, quant, ids)
        fuse_projections(quant)
        fused = lowbit.validate(base, quant, ids)
    assert fused.metrics["kl_mean"] == pytest.approx(plain.metrics["kl_mean"], rel=1e-4, abs=1e-7)
    assert sorted(r["name"] for r in fused.layers) == sorted(r["name"] for r in plain.layers)
    sqnr = {r["name"]: r["output_sqnr_db"] for r in plain.layers}
    assert all(r["output_sqnr_db"] == pytest.approx(sqnr[r["name"]], abs=0.05) for r in fused.layers)


def test_quantizing_a_fused_model_names_the_fix():
    """A fused float model would have its joined layer quantized while the members kept running the
    float one: refused, with the order that works."""
    model = tiny_llama()
    fuse_projections(model)
    with pytest.raises(ValueError, match=r"fused with its siblings .*unfuse_projections\(model\) first"):
        lowbit.quantize(model, "int8", progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    unfuse_projections(model)
    lowbit.quantize(model, "int8", progress=False)
    assert fuse_projections(model)
