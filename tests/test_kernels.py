"""Tier (b): every fast path against its reference twin (dequantize, then the torch op)."""

import pytest
import torch

import lowbit
from lowbit.kernels import PLACEMENT
from lowbit.kernels.registry import force_backend, select
from lowbit.nn import QuantEmbedding, QuantLinear


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("k, n", [(80, 40), (576, 1536), (208, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_int8_fast_path_matches_reference(m, k, n, dtype):
    g = torch.Generator().manual_seed(m * 1000 + k)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=g))
    q = QuantLinear.from_float(lin, "int8")
    q._lowbit_name = "probe"
    x = torch.randn(2, m, k, generator=g).to(dtype)
    assert select(q.fmt, "linear", "cpu", shape=q.weight_shape)[0] == "cpu_fast"
    PLACEMENT.clear()
    fast = q(x)
    with force_backend("linear", "reference"):
        ref = q(x)
    assert fast.dtype == dtype and fast.shape == (2, m, n)
    rel = ((fast.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2
    assert PLACEMENT["probe"] == {"cpu_fast": 1, "reference": 1}


def test_shapes_the_int8_kernel_cannot_take_use_the_reference():
    fmt = lowbit.PRESETS["int8"]
    assert select(fmt, "linear", "cpu", shape=(40, 72))[0] == "reference"
    q = QuantLinear.from_float(torch.nn.Linear(72, 40), "int8")
    x = torch.randn(5, 72)
    with force_backend("linear", "reference"):
        ref = q(x)
    assert torch.equal(q(x), ref)


def test_formats_without_a_fast_path_use_the_reference():
    for preset in ("int4", "mxfp4", "q4_0"):
        fmt = lowbit.PRESETS[preset]
        assert select(fmt, "linear", "cpu")[0] == "reference"
    assert select(lowbit.PRESETS["int8"].replace(block_size=32), "linear", "cpu")[0] == "reference"


def test_forcing_a_layer_onto_an_unsupported_backend_is_reported():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    lowbit.quantize(model, {"global": "int4"}, progress=False)
    with force_backend("linear", "cpu_fast", layer="1"):
        with pytest.raises(LookupError, match=r"^1: no cpu_fast kernel .*int4"):
            model(torch.randn(2, 64))


def test_embedding_reference_dequantizes_only_needed_rows_and_matches_full_table():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(500, 64, generator=g)
    for preset, extra in [("int8", {}), ("int4", {}), ("mxfp4", {}), ("lut4", {"group_size": 50})]:
        qt = lowbit.quantize_tensor(table, preset, **extra)
        emb = QuantEmbedding(qt)
        ids = torch.tensor([[3, 499, 3, 0], [77, 120, 250, 51]])
        assert torch.equal(emb(ids), qt.dequantize()[ids])
