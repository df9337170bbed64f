"""Gated MLPs (gate / up joined, silu(gate) * up in the matmul's epilogue): lowbit.nn.gated."""

import copy

import pytest
import torch

import lowbit
from lowbit.kernels import PLACEMENT
from lowbit.kernels.reference import silu_mul_pairs
from lowbit.kernels.registry import force_backend
from lowbit.nn import GatedMLP, GatedQuantLinear, QuantLinear, fuse_gated_mlp, fuse_projections, unfuse_projections
from lowbit.nn.gated import interleave_rows, split_pairs
from tiny_models import tiny_llama


def _ids(seed, shape=(2, 7)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["int4", "int8", "mxfp4"])
def test_interleaved_rows_split_back_exactly(fmt):
    g, u = (lowbit.quantize_tensor(torch.randn(12, 64), fmt) for _ in "gu")
    j = interleave_rows(g, u)
    assert j.shape == (24, 64)
    torch.testing.assert_close(j.dequantize()[0::2], g.dequantize(), rtol=0, atol=0)
    for a, b in zip(split_pairs(j), (g, u)):
        assert all(torch.equal(a.planes[n], b.planes[n]) for n in b.planes)


def test_rows_that_cannot_be_interleaved_are_refused():
    a = lowbit.quantize_tensor(torch.randn(8, 64), "int4")
    with pytest.raises(ValueError, match="formats differ"):
        interleave_rows(a, lowbit.quantize_tensor(torch.randn(8, 64), "int8"))
    with pytest.raises(ValueError, match="must be 2-D and alike"):
        interleave_rows(a, lowbit.quantize_tensor(torch.randn(16, 64), "int4"))
    with pytest.raises(ValueError, match="row pairs"):
        GatedQuantLinear(lowbit.quantize_tensor(torch.randn(7, 64), "int4"))


def test_gated_llama_gives_the_unfused_logits_and_unfuses_to_the_same_planes():
    model = tiny_llama()
    lowbit.quantize(model, "int4", progress=False)
    mlp0 = model.model.layers[0].mlp
    planes = {n: t.clone() for n, t in mlp0.up_proj.qweight.planes.items()}
    ids = _ids(1)
    with torch.no_grad(), force_backend("linear", "reference"):
        ref = model(ids).logits
        names = fuse_projections(model, gated_mlp=True)
        assert names == [f"model.layers.{i}.mlp.gate_proj+up_proj" for i in range(2)] + \
            [f"model.layers.{i}.self_attn.q_proj+k_proj+v_proj" for i in range(2)]
        assert isinstance(model.model.layers[1].mlp, GatedMLP)
        PLACEMENT.clear()
        fused = model(ids).logits
        assert dict(PLACEMENT["model.layers.0.mlp.gate_proj+up_proj"]) == {"reference": 1}
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)
        assert sorted(unfuse_projections(model)) == sorted(names)
        back = model(ids).logits
    mlp = model.model.layers[0].mlp
    assert type(mlp).__name__ == "LlamaMLP" and type(mlp.up_proj) is QuantLinear
    assert all(torch.equal(mlp.up_proj.qweight.planes[n], planes[n]) for n in planes)
    torch.testing.assert_close(back, ref, rtol=0, atol=0)


def test_gated_mlp_keeps_the_cpu_fast_path_and_a_bias():
    """On CPU the joined layer runs the format's own fast kernel, then the pairs (int8 per channel:
    PyTorch's int8 kernel), giving the unfused MLP's numbers exactly; gate / up biases are
    interleaved with their rows."""
    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = (QuantLinear.from_float(torch.nn.Linear(64, 48), "int8") for _ in "gu")
            self.down_proj = QuantLinear.from_float(torch.nn.Linear(48, 64), "int8")
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    root = torch.nn.Module()
    root.mlp = MLP()
    plain = copy.deepcopy(root)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    fuse_projections(root, gated_mlp=True)
    PLACEMENT.clear()
    y = root.mlp(x)
    assert dict(PLACEMENT["mlp.gate_proj+up_proj"]) == {"cpu_fast": 1}
    # off the fused GPU kernel the product is taken as the unfused model takes it: the same numbers
    torch.testing.assert_close(y, plain.mlp(x), rtol=0, atol=0)


def test_modules_that_are_not_gated_mlps_are_left_alone():
    model = tiny_llama()
    lowbit.quantize(model, "int4", progress=False)
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()  # not SiLU: another activation
    names = fuse_projections(model, gated_mlp=True)
    assert "model.layers.0.mlp.gate_proj+up_proj" in names  # plain (slice) fusion there
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP" and isinstance(model.model.layers[1].mlp, GatedMLP)


def test_gated_model_is_refused_by_save_quantize_and_validate(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    lowbit.quantize(model, "int8", progress=False)
    assert fuse_gated_mlp(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]  # the gated MLPs alone
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp' is fused .*unfuse_projections\(model\) before saving"):
        lowbit.save(model, tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"fused with its siblings .*unfuse_projections\(model\) first"):
        lowbit.quantize(model, "int8", progress=False)
    with pytest.raises(ValueError, match=r"fused gated MLP .*unfuse_projections\(model\) first"):
        lowbit.validate(base, model, _ids(0, (1, 8)))
    unfuse_projections(model)
    lowbit.save(model, tmp_path / "pkg")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["int4-e8m0", "int8", "mxfp4"])
def test_gated_mlp_on_the_gpu_takes_the_triton_entry_and_matches(fmt):
    """On CUDA the joined layer runs the Triton `glu_linear` entry (at M = 1 one launch, the GEMV's
    epilogue; above, the matmul then the pairs kernel), bf16 and fp16; against the reference of the
    same joined weight and against the unfused layers."""
    torch.manual_seed(0)
    gate, up = (QuantLinear.from_float(torch.nn.Linear(1024, 2816, bias=False, device="cuda"), fmt) for _ in "gu")
    layer = GatedQuantLinear(interleave_rows(gate.qweight, up.qweight))
    layer._lowbit_name = "gate_up"
    for rows, dtype in ((1, torch.bfloat16), (1, torch.float16), (4, torch.bfloat16), (16, torch.bfloat16)):
        x = torch.randn(rows, 1024, device="cuda", dtype=dtype)
        PLACEMENT.clear()
        out = layer(x)
        assert dict(PLACEMENT["gate_up"]) == {"triton": 1} and torch.isfinite(out).all()
        with force_backend("linear", "reference"):
            ref = layer(x).float()
        unfused = silu_mul_pairs(torch.stack((gate(x), up(x)), -1).flatten(-2)).float()
        for want in (ref, unfused):
            assert ((out.float() - want).norm() / want.norm()).item() < 1e-2, (fmt, rows, dtype)
