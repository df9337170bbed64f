"""Property tests (hypothesis) over shapes, dtypes and block sizes for the linear and MX families."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.formats import scales

LINEAR_AND_MX = [n for n, f in lowbit.PRESETS.items() if f.family in ("int", "mx")]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    preset = draw(st.sampled_from(LINEAR_AND_MX))
    fmt = lowbit.PRESETS[preset]
    block = fmt.block_size if fmt.block_size is None else draw(st.sampled_from([32, 64, 128]))
    rows = draw(st.integers(1, 9))
    nblocks = draw(st.integers(1, 4))
    cols = (block or 8) * nblocks - draw(st.integers(0, 7))  # sometimes ragged: padded
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    log_scale = draw(st.floats(-6, 4))
    return preset, block, rows, cols, dtype, seed, log_scale


@SETTINGS
@given(cases())
# an fp16 scale in the subnormal range that rounded up 8 %: the largest code was 6, not 7, and
# re-quantizing picked a smaller scale (found by hypothesis in CI; fixed in formats/linear.py)
@example(("int4", 32, 1, 31, torch.float32, 0, -6.0))
# the same for affine codes (int4-asym, found by hypothesis in CI, 2026-11-25; fixed in formats/linear.py)
@example(("int4-asym", 32, 2, 63, torch.float32, 1, -6.0))
@example(("int4-asym", 32, 1, 29, torch.float32, 0, -6.0))
def test_round_trip_is_bounded_and_requantization_is_exact(case):
    preset, block, rows, cols, dtype, seed, log_scale = case
    fmt = lowbit.PRESETS[preset]
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 10**log_scale).to(dtype)
    overrides = {} if block is None else {"block_size": block}
    qt = lowbit.quantize_tensor(w, preset, pad=True, **overrides)
    out = qt.dequantize()
    assert out.shape == w.shape and torch.isfinite(out).all()
    # error never exceeds the block's largest representable step (a loose, format-agnostic bound)
    b = block or qt.padded_cols
    s = scales.decode_scale(qt.scale, fmt.scale_dtype)
    wide = torch.nn.functional.pad(w.float(), (0, qt.padded_cols - cols)).reshape(rows, -1, b)
    err = torch.nn.functional.pad((out - w.float()).abs(), (0, qt.padded_cols - cols)).reshape(rows, -1, b)
    step_max = s.unsqueeze(-1) * (64.0 if fmt.family == "mx" else 1.0)
    if fmt.zero == "float":
        step_max = step_max + (qt.zero.float() - wide.amin(-1)).abs().unsqueeze(-1)
    if fmt.family == "int" and fmt.scale_dtype in ("fp16", "bf16"):
        # a subnormal fp16 scale keeps only a few significant bits; encode takes the stored value below
        # where the nearest one would leave qmax unreached (so re-quantizing is exact), and the block's
        # top then saturates by up to 2^bits units in the scale's last place (0 for normal scales: the
        # step-down never happens there)
        ulp = s - scales.decode_float(scales.step_down(qt.scale, fmt.scale_dtype))
        step_max = step_max + ((1 << fmt.bits) * ulp * (s < 6.2e-5)).unsqueeze(-1)
    assert (err <= step_max + wide.abs().amax(-1, keepdim=True) * 0.14 + 1e-30).all()
    again = lowbit.quantize_tensor(out, preset, pad=True, **overrides)
    for name, plane in qt.planes.items():
        assert torch.equal(plane, again.planes[name]), name


@SETTINGS
@given(cases())
def test_slices_on_block_boundaries_equal_sliced_dequantize(case):
    preset, block, rows, cols, dtype, seed, log_scale = case
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    overrides = {} if block is None else {"block_size": block}
    qt = lowbit.quantize_tensor(w, preset, pad=True, **overrides)
    full = qt.dequantize()
    unit = block or 8
    c0 = unit * (seed % max(1, qt.padded_cols // unit))
    if c0 < cols:
        r0 = seed % rows
        assert torch.equal(qt[r0:, c0:].dequantize(), full[r0:, c0:])


@pytest.mark.parametrize("preset", LINEAR_AND_MX)
def test_transposed_and_strided_views_match(preset):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).t()  # (64, 96) view, not contiguous
    a = lowbit.quantize_tensor(w, preset)
    b = lowbit.quantize_tensor(w.contiguous(), preset)
    assert all(torch.equal(a.planes[k], b.planes[k]) for k in a.planes)
