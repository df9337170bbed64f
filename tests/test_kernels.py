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


def _offset_copy(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """A copy of `t` whose data starts `offset_bytes` past a 64-byte boundary (as memory-mapped
    package planes and sliced activations do)."""
    es = t.element_size()
    buf = torch.empty(t.numel() + 128 // es, dtype=t.dtype)
    start = ((64 - buf.data_ptr() % 64) % 64 + offset_bytes) // es
    out = buf[start:start + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 64 == offset_bytes
    return out


@pytest.mark.parametrize("offset", [8, 40])
def test_cpu_int8_fast_path_takes_unaligned_planes_and_inputs(offset):
    """PyTorch's int8 CPU kernel crashed the process on a weight off 16-byte alignment (planes
    memory-mapped from a package are 8-byte aligned) or activations off 32; the fast path hands it
    aligned copies (the weight's once, kept with the QTensor)."""
    g = torch.Generator().manual_seed(offset)
    q = QuantLinear.from_float(torch.nn.Linear(128, 48), "int8")
    qt = q.qweight
    moved = lowbit.QTensor({**qt.planes, "data": _offset_copy(qt.data, offset)}, qt.fmt, qt.shape)
    q2 = QuantLinear(moved, q.bias)
    x = _offset_copy(torch.randn(3, 128, generator=g).to(torch.bfloat16), offset)
    with force_backend("linear", "reference"):
        ref = q(x)
    fast = q2(x)
    assert ((fast.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    assert q2.qweight.kernel_cache["cpu_int8_aligned"].data_ptr() % 64 == 0


def test_shapes_the_int8_kernel_cannot_take_use_the_reference():
    fmt = lowbit.PRESETS["int8"]
    assert select(fmt, "linear", "cpu", shape=(40, 72))[0] == "reference"
    q = QuantLinear.from_float(torch.nn.Linear(72, 40), "int8")
    x = torch.randn(5, 72)
    with force_backend("linear", "reference"):
        ref = q(x)
    assert torch.equal(q(x), ref)


def test_formats_without_a_fast_path_use_the_reference():
    for preset in ("mxfp4", "q4_0", "int2"):
        fmt = lowbit.PRESETS[preset]
        assert select(fmt, "linear", "cpu")[0] == "reference"
    assert select(lowbit.PRESETS["int8"].replace(block_size=16), "linear", "cpu")[0] == "reference"
    int4 = lowbit.PRESETS["int4"]
    assert select(int4.replace(block_size=16), "linear", "cpu")[0] == "reference"  # not a tinygemm group
    assert select(int4, "linear", "cpu", shape=(40, 64))[0] == "reference"  # rows not a multiple of 16
    assert select(int4, "linear", "cpu", shape=(48, 64))[0] == "cpu_fast"
    int8_blocks = lowbit.PRESETS["int8"].replace(block_size=32)  # exact reference for fp32 activations
    assert select(int8_blocks, "linear", "cpu", shape=(48, 64), dtype=torch.float32)[0] == "reference"
    assert select(int8_blocks, "linear", "cpu", shape=(48, 64), dtype=torch.bfloat16)[0] == "cpu_fast"
    assert select(int4, "linear", "cpu", shape=(48, 64), dtype=torch.float32)[0] == "cpu_fast"


_INT4_CPU = [("int4", {}), ("int4-asym", {}), ("int4-e8m0", {}), ("int4", {"block_size": 128, "scale_dtype": "bf16"}),
             ("int4", {"block_size": 64, "scale_dtype": "fp32"}), ("int4-asym", {"block_size": 256}),
             ("int8", {"block_size": 32, "scale_dtype": "fp16"}), ("int8", {"block_size": 128, "scale_dtype": "e8m0"})]


@pytest.mark.parametrize("preset,kw", _INT4_CPU)
@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_int4_fast_path_matches_reference(preset, kw, m, dtype):
    """int4 in blocks through PyTorch's CPU int4 kernel (bf16 activations): every scale dtype, affine
    zeros, group sizes 32-256, against the reference with the bias, in the activation dtype."""
    g = torch.Generator().manual_seed(m * 7 + len(kw))
    k, n = 512, 48
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.weight[:, :5] *= 20  # blocks with different scales
        lin.bias.copy_(torch.randn(n, generator=g))
    q = QuantLinear.from_float(lin, preset, **kw)
    q._lowbit_name = "probe4"
    x = torch.randn(2, m, k, generator=g).to(dtype)
    PLACEMENT.clear()
    fast = q(x)
    with force_backend("linear", "reference"):
        ref = q(x)
    assert fast.dtype == dtype and fast.shape == (2, m, n)
    if preset == "int8" and dtype == torch.float32:  # int8 blocks keep the exact reference for fp32
        assert torch.equal(fast, ref) and PLACEMENT["probe4"] == {"reference": 2}
        return
    assert ((fast.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    assert PLACEMENT["probe4"] == {"cpu_fast": 1, "reference": 1}


@pytest.mark.parametrize("preset,kw", [("int4-e8m0", {}), ("int4", {}), ("int4-asym", {}),
                                       ("int8", {"block_size": 32, "scale_dtype": "e8m0"}),
                                       ("int8", {"block_size": 32, "scale_dtype": "fp16"})])
def test_cpu_int4_fast_path_uses_the_stored_weights(preset, kw):
    """One-hot activations read the weight matrix back: with power-of-two scales (E8M0) every
    product is exact in bf16, so the output is the dequantized weight bit for bit (codes, nibble
    order, repacking and int8's split into two nibble terms all checked); fp16 scales go through
    two bf16 parts whose sum is the scale exactly, so each weight comes back within the parts'
    output roundings (2^-9 relative to each term)."""
    from lowbit.kernels.cpu import _int4_prepared
    from lowbit.formats.scales import decode_scale

    g = torch.Generator().manual_seed(3)
    k, n = 96, 32
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
    q = QuantLinear.from_float(lin, preset, **kw)
    w = q.qweight.dequantize(torch.float32)
    one_hot = torch.eye(k, dtype=torch.bfloat16 if preset == "int8" else torch.float32)  # int8: fp32 takes the reference
    assert select(q.fmt, "linear", "cpu", shape=q.weight_shape, dtype=one_hot.dtype)[0] == "cpu_fast"
    y = q(one_hot).float()  # row i = column i of W
    terms, zeros = _int4_prepared(q.qweight)
    s = decode_scale(q.qweight.scale, q.fmt.scale_dtype)
    if q.fmt.scale_dtype == "e8m0":
        assert torch.equal(y, w.t())
    else:  # the bf16 roundings apply to the (code - 8) * scale terms; zeros are added in fp32
        scaled = w - (0 if zeros is None else zeros.repeat_interleave(32, 1))
        bound = (scaled.abs() + (0 if zeros is None else 16 * s.repeat_interleave(32, 1))) * 2.0**-8
        bound = bound + (w.abs() * 2.0**-8 if preset == "int8" else 0)  # the bf16 output
        assert ((y - w.t()).abs() <= bound.t() + 1e-6).all()
    for (_, parts), mul in zip(terms, (16.0, 1.0) if len(terms) == 2 else (1.0,)):
        assert torch.equal(sum(p[..., 0].float() for p in parts).t(), mul * s)  # the parts add up exactly


def test_forcing_a_layer_onto_an_unsupported_backend_is_reported():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    lowbit.quantize(model, {"global": "mxfp4"}, progress=False)
    with force_backend("linear", "cpu_fast", layer="1"):
        with pytest.raises(LookupError, match=r"^1: no cpu_fast kernel .*mxfp4"):
            model(torch.randn(2, 64))


def test_model_dtype_casts_keep_the_stored_planes(gen):
    """`model.to(torch.bfloat16)` / `.half()` / `.float()` cast the bias and the embedding's output
    dtype but never the planes: fp16 / fp32 scales and fp16 palettes are stored values (a cast
    would round them, silently changing the weights); the output follows the activation dtype."""
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=gen) * 0.05)
    table = torch.randn(100, 64, generator=gen)
    for preset in ("int8", "int4", "lut4", "mxfp4"):
        model = torch.nn.Sequential(QuantEmbedding(lowbit.quantize_tensor(table, preset)),
                                    QuantLinear.from_float(lin, preset))
        before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("weight_scale", "weight_lut", "weight_data"))}
        ids = torch.tensor([[1, 7, 99]])
        y32 = model(ids)
        for cast, dt in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16),
                         (lambda m: m.float(), torch.float32)):
            cast(model)
            after = model.state_dict()
            for k, v in before.items():
                assert after[k].dtype == v.dtype and torch.equal(after[k], v), (preset, k, dt)
            assert model[1].bias.dtype == dt and model[0].out_dtype == dt
            y = model(ids)
            assert y.dtype == dt
            assert ((y.float() - y32).norm() / y32.norm()) < 1e-2, (preset, dt)


def test_embedding_reference_dequantizes_only_needed_rows_and_matches_full_table():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(500, 64, generator=g)
    for preset, extra in [("int8", {}), ("int4", {}), ("mxfp4", {}), ("lut4", {"group_size": 50})]:
        qt = lowbit.quantize_tensor(table, preset, **extra)
        emb = QuantEmbedding(qt)
        ids = torch.tensor([[3, 499, 3, 0], [77, 120, 250, 51]])
        assert torch.equal(emb(ids), qt.dequantize()[ids])


@pytest.mark.parametrize("fmt,kw", [("int8", {"block_size": 32, "scale_dtype": "fp16"}), ("int4", {}),
                                    ("lut4", {"group_size": 5}), ("lut4", {}), ("mxfp4", {})])
def test_reference_linear_in_row_chunks_equals_the_whole_weight(gen, monkeypatch, fmt, kw):
    """The reference dequantizes large CPU weights a few rows at a time (`reference.CHUNK_BYTES`):
    every output equals the whole dequantized weight's F.linear (same dot products over all of K;
    chunks on whole palette groups), with a bias and 3-D activations; fp16 activations keep the
    whole-weight path."""
    from lowbit.kernels import reference

    w = torch.randn(150, 64, generator=gen)
    qw = lowbit.quantize_tensor(w, fmt, **kw)
    x = torch.randn(2, 3, 64, generator=gen)
    bias = torch.randn(150, generator=gen)
    want = torch.nn.functional.linear(x, qw.dequantize(), bias)
    monkeypatch.setattr(reference, "CHUNK_BYTES", 9 * 64 * 4)  # 9 rows a chunk (5 for groups of 5)
    assert reference._chunk_rows(qw, 64) == (5 if kw.get("group_size") == 5 else 9)
    got = reference.linear(x, qw, bias)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    half = reference.linear(x.half(), qw, bias)
    torch.testing.assert_close(half, torch.nn.functional.linear(x.half(), qw.dequantize().half(), bias.half()))
