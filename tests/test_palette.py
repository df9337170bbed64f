"""Palettized formats (lut1 .. lut8): planes, modes, groups, scales, exactness, k-means quality."""

import math

import pytest
import torch

import lowbit
from lowbit import Format
from lowbit.formats import palette
from lowbit.formats.packing import pack, unpack

LUT = [n for n, f in lowbit.PRESETS.items() if f.family == "lut"]


def mse(a, b):
    return float(((a.double() - b.double()) ** 2).mean())


def banded(gen, rows=64, cols=128, group=16, factors=(0.01, 0.1, 1.0, 10.0)):
    """Rows in bands of `group` with very different ranges."""
    w = torch.randn(rows, cols, generator=gen)
    f = torch.tensor(factors).repeat_interleave(group)[:rows].unsqueeze(1)
    return w * f


# --- every preset ------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", LUT)
def test_presets_round_trip(preset, gen):
    w = torch.randn(48, 160, generator=gen)
    qt = lowbit.quantize_tensor(w, preset)
    k = 1 << qt.fmt.bits
    assert set(qt.planes) == {"data", "lut"}
    assert qt.planes["lut"].dtype == torch.float16 and qt.planes["lut"].shape == (1, k)
    assert qt.planes["data"].dtype == torch.uint8
    out = qt.dequantize()
    assert out.shape == w.shape and out.dtype == torch.float32
    assert out.unique().numel() <= k
    assert set(out.unique().tolist()) <= set(qt.planes["lut"].float().flatten().tolist())
    assert mse(out, w) < 0.4 * float(w.var())  # even 1 bit beats predicting 0
    assert torch.equal(lowbit.dequantize(qt), out)
    # the LUT is sorted ascending
    lut = qt.planes["lut"].float()
    assert torch.all(lut[:, 1:] >= lut[:, :-1])


def test_error_decreases_with_bits(gen):
    w = torch.randn(64, 256, generator=gen)
    errors = [mse(lowbit.quantize_tensor(w, p).dequantize(), w) for p in LUT]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # and lands near the Lloyd-Max optimum for a Gaussian (lut4: 0.0095 sigma^2)
    assert errors[LUT.index("lut4")] < 0.0105 * float(w.var())


def test_bits_per_weight_lut4_per_tensor_4096_square():
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    qt = lowbit.quantize_tensor(w, "lut4")
    assert qt.bits_per_weight == 4 + 16 * 16 / (4096 * 4096)


@pytest.mark.parametrize("kw, extra_bits", [
    (dict(), 16 * 16),  # one fp16 LUT of 16 entries
    (dict(group_size=16), 4 * 16 * 16),  # 4 LUTs
    (dict(group_size=16, lut_dtype="int8"), 4 * (16 * 8 + 16)),  # int8 entries + fp16 lut_scale
    (dict(per_channel_scale=True), 16 * 16 + 64 * 16),  # + fp16 scale per row
])
def test_bits_per_weight_by_hand(kw, extra_bits, gen):
    w = torch.randn(64, 256, generator=gen)
    qt = lowbit.quantize_tensor(w, "lut4", **kw)
    assert qt.bits_per_weight == 4 + extra_bits / w.numel()
    lut3 = lowbit.quantize_tensor(w, "lut3")  # 256 codes of 3 bits = 96 bytes per row
    assert lut3.planes["data"].shape == (64, 96)
    assert lut3.bits_per_weight == 3 + 8 * 16 / w.numel()


# --- groups, per-channel scales, int8 LUTs ----------------------------------------------------
def test_group_size_counts_output_channels_and_beats_per_tensor(gen):
    w = banded(gen)
    per_tensor = lowbit.quantize_tensor(w, "lut4")
    grouped = lowbit.quantize_tensor(w, "lut4", group_size=16)
    assert grouped.planes["lut"].shape == (4, 16)
    rel = lambda q: [mse(q.dequantize()[16 * i:16 * (i + 1)], w[16 * i:16 * (i + 1)])  # noqa: E731
                     / float((w[16 * i:16 * (i + 1)] ** 2).mean()) for i in range(4)]
    ours, theirs = rel(grouped), rel(per_tensor)
    assert max(ours) < 0.02 and theirs[0] > 0.5  # each band gets its own table
    assert mse(grouped.dequantize(), w) < mse(per_tensor.dequantize(), w)
    # each group's rows only use that group's LUT
    out = grouped.dequantize()
    for i in range(4):
        values = set(out[16 * i:16 * (i + 1)].unique().tolist())
        assert values <= set(grouped.planes["lut"][i].float().tolist())


def test_group_size_must_divide_the_rows(gen):
    w = torch.randn(60, 32, generator=gen)
    with pytest.raises(ValueError, match=r"\(60, 32\).*group_size 16"):
        lowbit.quantize_tensor(w, "lut4", group_size=16)


def test_per_channel_scale(gen):
    w = banded(gen, group=4, factors=tuple(10.0 ** (i / 4 - 2) for i in range(16)))
    w[5] = 0.0
    plain = lowbit.quantize_tensor(w, "lut4")
    qt = lowbit.quantize_tensor(w, "lut4", per_channel_scale=True)
    assert qt.planes["scale"].dtype == torch.float16 and qt.planes["scale"].shape == (64, 1)
    amax = w.abs().amax(1, keepdim=True)
    assert torch.equal(qt.planes["scale"], amax.half())
    out = qt.dequantize()
    assert torch.equal(out[5], torch.zeros(128))  # an all-zero row comes back exactly
    # relative error per row is bounded for every magnitude, unlike one LUT for all rows
    rel = ((out - w) ** 2).mean(1) / (w**2).mean(1).clamp(min=1e-30)
    rel_plain = ((plain.dequantize() - w) ** 2).mean(1) / (w**2).mean(1).clamp(min=1e-30)
    keep = torch.arange(64) != 5
    assert rel[keep].max() < 0.05 < rel_plain[keep].max()
    # decoding is lut[code] * scale[row]
    codes = unpack(qt.planes["data"], 4, 128).long()
    manual = qt.planes["lut"].float()[0][codes] * qt.planes["scale"].float()
    assert torch.equal(out, manual)


def test_int8_lut(gen):
    w = banded(gen)
    fp16 = lowbit.quantize_tensor(w, "lut4", group_size=16)
    qt = lowbit.quantize_tensor(w, "lut4", group_size=16, lut_dtype="int8")
    lut, ls = qt.planes["lut"], qt.planes["lut_scale"]
    assert lut.dtype == torch.int8 and lut.shape == (4, 16)
    assert ls.dtype == torch.float16 and ls.shape == (4, 1)
    assert torch.all(lut.abs().amax(1) == 127)  # symmetric: the largest entry uses the full range
    codes = unpack(qt.planes["data"], 4, 128).long().reshape(4, -1)
    manual = (lut.float() * ls.float()).gather(1, codes).reshape(64, 128)
    out = qt.dequantize()
    assert torch.equal(out, manual)
    assert mse(out, w) < 1.2 * mse(fp16.dequantize(), w)
    # codes pick the nearest entry of the int8 table actually stored
    table = lut.float() * ls.float()
    xg = w.reshape(4, -1)
    nearest = (xg.unsqueeze(-1) - table.unsqueeze(1)).abs().amin(-1)
    assert torch.allclose((out.reshape(4, -1) - xg).abs(), nearest, rtol=0, atol=1e-6)


def test_codes_pick_the_nearest_stored_fp16_entry(gen):
    w = torch.randn(32, 64, generator=gen)
    qt = lowbit.quantize_tensor(w, "lut3")
    table = qt.planes["lut"].float()[0]
    nearest = (w.unsqueeze(-1) - table).abs().amin(-1)
    assert torch.equal((qt.dequantize() - w).abs(), nearest)


# --- importance ---------------------------------------------------------------------------------
def test_importance_pulls_centroids_toward_important_values():
    w = torch.linspace(-1, 1, 4096).reshape(16, 256)
    important = w > 0.8
    imp = torch.where(important, 100.0, 1.0)
    plain = lowbit.quantize_tensor(w, "lut1")
    weighted = lowbit.quantize_tensor(w, "lut1", importance=imp)
    # unweighted 2-means of a uniform [-1, 1] is {-1/2, 1/2}
    assert torch.allclose(plain.planes["lut"].float(), torch.tensor([[-0.5, 0.5]]), atol=2e-3)
    top = float(weighted.planes["lut"].float().max())
    assert top > 0.8  # pulled into the important band
    err_plain = ((plain.dequantize() - w)[important] ** 2).mean()
    err_weighted = ((weighted.dequantize() - w)[important] ** 2).mean()
    assert err_weighted < 0.2 * err_plain


def test_importance_is_checked(gen):
    w = torch.randn(8, 32, generator=gen)
    with pytest.raises(ValueError, match="importance"):
        lowbit.quantize_tensor(w, "lut4", importance=torch.ones(8, 16))
    with pytest.raises(ValueError, match=">= 0"):
        lowbit.quantize_tensor(w, "lut4", importance=-torch.ones(8, 32))
    zero = lowbit.quantize_tensor(w, "lut4", importance=torch.zeros(8, 32))  # all zero: unweighted
    assert torch.equal(zero.dequantize(), lowbit.quantize_tensor(w, "lut4").dequantize())


# --- modes --------------------------------------------------------------------------------------
def test_uniform_mode(gen):
    w = banded(gen)
    qt = lowbit.quantize_tensor(w, "lut4", lut_mode="uniform", group_size=16)
    g = w.reshape(4, -1)
    t = torch.arange(16, dtype=torch.float64) / 15
    expected = (g.amin(1, keepdim=True).double() + (g.amax(1, keepdim=True) - g.amin(1, keepdim=True)).double() * t)
    assert torch.equal(qt.planes["lut"], expected.float().half())
    assert mse(qt.dequantize(), w) < mse(lowbit.quantize_tensor(w, "lut3", lut_mode="uniform", group_size=16).dequantize(), w)


def test_unique_mode_is_exact_and_sorted(gen):
    values = torch.tensor([-3.0, -0.5, 0.0, 0.25, 1.0, 7.5, 100.0, -42.0, 2.0, 0.125])
    w = values[torch.randint(0, 10, (32, 64), generator=gen)]
    qt = lowbit.quantize_tensor(w, "lut4", lut_mode="unique")
    assert torch.equal(qt.dequantize(), w)
    lut = qt.planes["lut"].float()[0]
    assert torch.equal(lut[:10], values.sort().values)
    assert torch.all(lut[10:] == 100.0)  # padded with the largest entry


def test_unique_mode_refuses_too_many_values(gen):
    w = torch.arange(17, dtype=torch.float32).repeat(4, 4)  # 17 distinct values
    with pytest.raises(ValueError, match=r"17 distinct values.*16 entries"):
        lowbit.quantize_tensor(w, "lut4", lut_mode="unique")
    assert torch.equal(lowbit.quantize_tensor(w[:, :16], "lut4", lut_mode="unique").dequantize(), w[:, :16])


@pytest.mark.parametrize("preset", LUT)
def test_kmeans_reproduces_few_distinct_values_exactly(preset, gen):
    k = 1 << lowbit.PRESETS[preset].bits
    values = (torch.randn(k, generator=gen) * 4).half().float()  # fp16-representable
    w = values[torch.randint(0, k, (24, 96), generator=gen)]
    qt = lowbit.quantize_tensor(w, preset)
    assert torch.equal(qt.dequantize(), w)


def test_exact_per_group_and_on_the_large_tensor_route(gen):
    # per group: each group has its own 4 values
    vals = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-8.0, -4.0, 4.0, 8.0], [0.5, 0.25, 0.125, 1.5], [5.0, 5.0, 5.0, 5.0]])
    idx = torch.randint(0, 4, (4, 16 * 40), generator=gen)
    w = vals.gather(1, idx).reshape(64, 40)
    assert torch.equal(lowbit.quantize_tensor(w, "lut2", group_size=16).dequantize(), w)
    # >= 2^18 elements on CPU goes through the histogram route, which must hand over to the exact rule
    big = torch.tensor([-1.5, -0.5, 0.0, 0.5, 2.0])[torch.randint(0, 5, (512, 1024), generator=gen)]
    assert big.numel() >= palette._HIST_MIN
    assert torch.equal(lowbit.quantize_tensor(big, "lut3").dequantize(), big)


@pytest.mark.parametrize("kw", [dict(), dict(lut_mode="uniform"), dict(lut_mode="unique"), dict(lut_dtype="int8"),
                                dict(per_channel_scale=True), dict(group_size=8)])
def test_zero_tensor_gives_zeros(kw):
    w = torch.zeros(32, 64)
    for preset in ("lut1", "lut4"):
        assert torch.equal(lowbit.quantize_tensor(w, preset, **kw).dequantize(), w)


# --- re-quantization, slicing, determinism ---------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(group_size=16), dict(lut_dtype="int8"), dict(lut_mode="unique")])
def test_requantizing_the_dequantized_tensor_reproduces_it(kw, gen):
    w = banded(gen) if kw.get("lut_mode") != "unique" else torch.randint(-8, 8, (64, 128), generator=gen).float()
    qt = lowbit.quantize_tensor(w, "lut4", **kw)
    out = qt.dequantize()
    again = lowbit.quantize_tensor(out, "lut4", **kw)
    assert torch.equal(again.dequantize(), out)
    for name, plane in qt.planes.items():  # every LUT entry is used here, so the planes match too
        assert torch.equal(again.planes[name], plane), name


@pytest.mark.parametrize("kw", [dict(group_size=16), dict(group_size=16, per_channel_scale=True),
                                dict(group_size=16, lut_dtype="int8"), dict()])
def test_row_slices_on_group_boundaries(kw, gen):
    w = banded(gen)
    qt = lowbit.quantize_tensor(w, "lut4", **kw)
    part = qt[16:32]
    assert part.shape == (16, 128)
    assert torch.equal(part.dequantize(), qt.dequantize()[16:32])
    assert torch.equal(qt[16:48, 32:96].dequantize(), qt.dequantize()[16:48, 32:96])
    if kw.get("group_size"):
        with pytest.raises(ValueError, match="group boundaries"):
            qt[8:24]


def test_deterministic(gen):
    w = torch.randn(64, 256, generator=gen)
    imp = torch.rand(64, 256, generator=gen)
    for kw in (dict(), dict(importance=imp), dict(group_size=16, per_channel_scale=True)):
        a = lowbit.quantize_tensor(w, "lut4", **kw)
        b = lowbit.quantize_tensor(w.clone(), "lut4", **kw)
        assert all(torch.equal(a.planes[k], b.planes[k]) for k in a.planes)
    assert lowbit.quantize_tensor(w, "lut4", seed=7).dequantize().equal(lowbit.quantize_tensor(w, "lut4").dequantize())


def test_shapes_and_dtypes(gen):
    w1 = torch.randn(300, generator=gen)
    qt = lowbit.quantize_tensor(w1, "lut3")
    assert qt.dequantize().shape == (300,)
    w3 = torch.randn(8, 4, 3, 3, generator=gen).to(torch.bfloat16)
    qt = lowbit.quantize_tensor(w3, "lut4", group_size=2)
    assert qt.dequantize().shape == (8, 4, 3, 3) and qt.planes["lut"].shape == (4, 16)


# --- the k-means itself ---------------------------------------------------------------------------
def test_kmeans_quality_against_scikit_learn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    w = torch.randn(100, 200, generator=torch.Generator().manual_seed(0))  # 20000 Gaussian values
    ours = mse(lowbit.quantize_tensor(w, "lut4").dequantize(), w)
    km = sklearn_cluster.KMeans(n_clusters=16, n_init=10, random_state=0).fit(w.reshape(-1, 1).double().numpy())
    theirs = km.inertia_ / w.numel()  # float64 centroids; ours are rounded to fp16
    assert ours <= theirs * 1.001, (ours, theirs)


def test_outliers_get_their_own_entries():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g) * 0.02
    w.view(-1)[torch.randperm(w.numel(), generator=g)[:64]] = 0.5
    qt = lowbit.quantize_tensor(w, "lut4")
    assert 0.5 in qt.planes["lut"].float().flatten().tolist()
    assert mse(qt.dequantize(), w) < 0.011 * 0.02**2 * 1.2


def test_histogram_route_matches_the_sort_route(gen, monkeypatch):
    w = torch.randn(512, 1024, generator=gen) * 0.02
    w.view(-1)[:300] = torch.linspace(-0.3, 0.3, 300)
    fast = lowbit.quantize_tensor(w, "lut4")
    monkeypatch.setattr(palette, "_HIST_MIN", 1 << 62)
    exact = lowbit.quantize_tensor(w, "lut4")
    assert math.isclose(mse(fast.dequantize(), w), mse(exact.dequantize(), w), rel_tol=1e-3)
    # weighted, grouped
    imp = torch.rand(512, 1024, generator=gen)
    monkeypatch.undo()
    fast = lowbit.quantize_tensor(w, "lut3", group_size=256, importance=imp)
    monkeypatch.setattr(palette, "_HIST_MIN", 1 << 62)
    exact = lowbit.quantize_tensor(w, "lut3", group_size=256, importance=imp)
    werr = lambda q: float((imp * (q.dequantize() - w) ** 2).sum())  # noqa: E731
    assert math.isclose(werr(fast), werr(exact), rel_tol=2e-3)


def test_histogram_route_assigns_the_nearest_entry(gen):
    w = torch.randn(512, 1024, generator=gen) * 0.02
    for preset in ("lut2", "lut4", "lut6"):
        qt = lowbit.quantize_tensor(w, preset)
        table = qt.planes["lut"].float()[0]
        codes = unpack(qt.planes["data"], qt.fmt.bits, 1024).long()
        below = torch.searchsorted(table, w.contiguous())  # nearest is below or at this index
        lo = table[(below - 1).clamp(min=0)]
        hi = table[below.clamp(max=table.numel() - 1)]
        nearest = torch.minimum((w - lo).abs(), (w - hi).abs())
        assert torch.equal((table[codes] - w).abs(), nearest)
        assert int(codes.max()) < int((table[1:] != table[:-1]).sum()) + 1  # never a padding duplicate


def test_bin_lookup_falls_back_when_a_bin_holds_two_midpoints():
    base = torch.tensor(1.0).view(torch.int32)
    x = (base + torch.arange(0, 4096, 7, dtype=torch.int32)).view(torch.float32).reshape(1, -1)  # one bin
    raw = x.view(torch.int32) >> palette._HIST_SHIFT
    bins = palette._Bins(index=(raw - raw.min()).reshape(-1), rmin=int(raw.min()), nb=1)
    values = torch.stack([x[0, 0], x[0, 200], x[0, 400], x[0, 580]]).reshape(1, 4)
    count = torch.tensor([4])
    mid = ((values[:, :-1].double() + values[:, 1:].double()) / 2).float()
    assert palette._assign_by_bins(x, mid, bins) is None
    assert torch.equal(palette._assign(x, values, count, bins), palette._assign(x, values, count))


def test_empty_clusters_do_not_produce_nan():
    # 3 distinct values far apart plus a dense cluster: more entries than the data needs in places
    w = torch.cat([torch.full((1000,), -100.0), torch.full((5,), 50.0), torch.linspace(0, 1e-3, 3000), torch.tensor([7.0])])
    for preset in ("lut2", "lut3", "lut6"):
        qt = lowbit.quantize_tensor(w.reshape(1, -1), preset)
        out = qt.dequantize()
        assert torch.isfinite(qt.planes["lut"].float()).all() and torch.isfinite(out).all()
        assert out.flatten()[:1000].eq(-100.0).all() and out.flatten()[1000:1005].eq(50.0).all()


def test_fp16_lut_overflow_is_refused(gen):
    w = torch.randn(8, 32, generator=gen) * 1e6
    with pytest.raises(ValueError, match="overflows fp16"):
        lowbit.quantize_tensor(w, "lut4")
    assert torch.isfinite(lowbit.quantize_tensor(w, "lut4", lut_dtype="int8").dequantize()).all()


# --- packing fast paths ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("n", [8, 24, 13])
def test_pack_fast_paths_match_packing(bits, n, gen):
    codes = torch.randint(0, 1 << bits, (5, n), generator=gen).to(torch.uint8)
    packed = palette._pack(codes, bits)
    assert torch.equal(packed, pack(codes, bits))
    assert torch.equal(palette._unpack(packed, bits, n), unpack(packed, bits, n))


def test_format_docs_group_size_as_channels():
    assert "output channels" in palette.__doc__.lower() and "coremltools" in palette.__doc__
    assert Format(family="lut", element="lut4").kmeans_iters >= 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("kw", [dict(), dict(group_size=16, per_channel_scale=True), dict(lut_dtype="int8")])
def test_cuda_matches_cpu(kw, gen):
    w = banded(gen)
    a = lowbit.quantize_tensor(w, "lut4", **kw)
    b = lowbit.quantize_tensor(w.cuda(), "lut4", **kw)
    assert b.device.type == "cuda"
    assert math.isclose(mse(a.dequantize(), w), mse(b.dequantize().cpu(), w), rel_tol=1e-4)
    big = torch.randn(1024, 1024, generator=gen)
    qa, qb = lowbit.quantize_tensor(big, "lut4"), lowbit.quantize_tensor(big.cuda(), "lut4")
    assert math.isclose(mse(qa.dequantize(), big), mse(qb.dequantize().cpu(), big), rel_tol=1e-3)


# --- properties ---------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=30, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(
    preset=st.sampled_from(LUT), groups=st.integers(1, 4), group_rows=st.integers(1, 6), cols=st.integers(1, 70),
    mode=st.sampled_from(["kmeans", "uniform"]), per_channel=st.booleans(), lut_dtype=st.sampled_from(["fp16", "int8"]),
    weighted=st.booleans(), distinct=st.sampled_from([None, 1, 3, 40]), seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-4, 3),
)
def test_properties(preset, groups, group_rows, cols, mode, per_channel, lut_dtype, weighted, distinct, seed, log_scale):
    g = torch.Generator().manual_seed(seed)
    rows = groups * group_rows
    w = torch.randn(rows, cols, generator=g) * 10**log_scale
    if distinct is not None:  # few distinct values, repeated
        w = w.flatten()[torch.randint(0, min(distinct, w.numel()), (rows * cols,), generator=g)].reshape(rows, cols)
    imp = torch.rand(rows, cols, generator=g) if weighted and mode == "kmeans" else None
    kw = dict(group_size=group_rows if groups > 1 else 0, lut_mode=mode, per_channel_scale=per_channel, lut_dtype=lut_dtype)
    qt = lowbit.quantize_tensor(w, preset, importance=imp, **kw)
    out = qt.dequantize()
    assert out.shape == w.shape and torch.isfinite(out).all()
    again = lowbit.quantize_tensor(w, preset, importance=imp, **kw)
    assert all(torch.equal(qt.planes[k], again.planes[k]) for k in qt.planes)  # deterministic
    k = 1 << qt.fmt.bits
    table = qt.planes["lut"].float()
    if "lut_scale" in qt.planes:
        table = table * qt.planes["lut_scale"].float()
    assert torch.all(table[:, 1:] >= table[:, :-1])
    if not per_channel:  # every value maps to the nearest entry of its group's table
        xg = w.reshape(table.shape[0], -1)
        nearest = (xg.unsqueeze(-1) - table.unsqueeze(1)).abs().amin(-1)
        assert torch.allclose((out.reshape(xg.shape) - xg).abs(), nearest, rtol=0, atol=1e-6 * float(w.abs().max()))
        if mode == "kmeans" and lut_dtype == "fp16" and distinct is not None and w.half().float().equal(w):
            per_group = [xg[i].unique().numel() for i in range(xg.shape[0])]
            if max(per_group) <= k:
                assert torch.equal(out, w)
