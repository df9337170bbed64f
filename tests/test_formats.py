"""Tier (a): Format, packing, presets: bounds, exact re-quantization, bad input, slicing."""

import math

import pytest
import torch

import lowbit
from lowbit import Format, NonFiniteError, QTensor
from lowbit.formats import elements, scales
from lowbit.formats.packing import pack, packed_len, unpack

NON_LUT = [n for n, f in lowbit.PRESETS.items() if f.family != "lut"]
ALL = list(lowbit.PRESETS)


def randw(gen, rows=48, cols=256, spread=True):
    w = torch.randn(rows, cols, generator=gen)
    if spread:  # rows of very different magnitude
        w = w * torch.logspace(-3, 2, rows).unsqueeze(1)
    return w


# --- Format ----------------------------------------------------------------------------------
def test_format_round_trips_through_dict():
    for f in lowbit.PRESETS.values():
        assert Format.from_dict(f.to_dict()) == f


@pytest.mark.parametrize("kw, msg", [
    (dict(family="int", element="fp4_e2m1"), "element"),
    (dict(family="nope", element="int4"), "family"),
    (dict(family="int", element="int4", block_size=12), "multiple of 8"),
    (dict(family="int", element="int4", scale_dtype="fp8"), "scale_dtype"),
    (dict(family="mx", element="fp4_e2m1", scale_dtype="fp16"), "e8m0"),
    (dict(family="int", element="int4", zero="float", scale_dtype="e8m0"), "affine"),
    (dict(family="gguf", element="q4_0", block_size=64), "32"),
])
def test_format_validation_names_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Format(**kw)


def test_from_dict_refuses_unknown_keys():
    d = lowbit.PRESETS["int4"].to_dict() | {"bogus": 1}
    with pytest.raises(ValueError, match="bogus"):
        Format.from_dict(d)


def test_unknown_preset_suggests_close_names(gen):
    with pytest.raises(ValueError, match="int4"):
        lowbit.quantize_tensor(randw(gen), "int44")


# --- packing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 33, 64])
def test_pack_unpack_round_trip(bits, n, gen):
    codes = torch.randint(0, 1 << bits, (3, n), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_len(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


def test_pack_layouts_documented():
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00_11_10_01]
    # 3-bit: 8 codes in 3 bytes, little-endian bit stream
    c = torch.tensor([7, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8)
    v = 7 | (1 << 21)
    assert pack(c, 3).tolist() == [v & 255, (v >> 8) & 255, v >> 16]
    c = torch.tensor([63, 1, 0, 2], dtype=torch.uint8)
    v = 63 | (1 << 6) | (2 << 18)
    assert pack(c, 6).tolist() == [v & 255, (v >> 8) & 255, v >> 16]


# --- sizes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, bpw", [
    ("int4-e8m0", 4.25), ("mxfp4", 4.25), ("q4_0", 4.5), ("q4_1", 5.0), ("q8_0", 8.5),
    ("int4", 4.5), ("int4-asym", 5.0), ("int2", 3.0), ("int2-e8m0", 2.25), ("mxfp8-e4m3", 8.25),
    ("mxfp6-e3m2", 6.25), ("mxint8", 8.25), ("gguf-mxfp4", 4.25),
])
def test_bits_per_weight(preset, bpw, gen):
    qt = lowbit.quantize_tensor(randw(gen, 16, 512), preset)
    assert qt.bits_per_weight == bpw
    assert qt.nbytes == sum(p.numel() * p.element_size() for p in qt.planes.values())


def test_int8_per_channel_bits_on_4096_square():
    qt = lowbit.quantize_tensor(torch.randn(4096, 4096), "int8")
    assert qt.bits_per_weight == pytest.approx(8.0 + 32 / 4096)
    assert qt.scale.shape == (4096, 1)


# --- round-trip bounds -----------------------------------------------------------------------
def _block_view(t, b):
    return t.reshape(t.shape[0], -1, b)


@pytest.mark.parametrize("preset", [n for n in NON_LUT if lowbit.PRESETS[n].family == "int"] + ["q8_0", "q4_0", "q4_1"])
def test_int_round_trip_within_half_step(preset, gen):
    fmt = lowbit.PRESETS[preset]
    w = randw(gen)
    qt = lowbit.quantize_tensor(w, preset)
    err = (qt.dequantize() - w).abs()
    b = fmt.block_size or w.shape[1]
    step = scales.decode_scale(qt.scale, fmt.scale_dtype).unsqueeze(-1)
    bound = step / 2 * (1 + 2**-10) + 1e-30
    if fmt.zero == "float":  # the stored bias is rounded too
        bound = bound + (qt.zero.float() - _block_view(w, b).amin(-1)).abs().unsqueeze(-1)
    if fmt.family == "gguf":
        # llama.cpp picks codes with the fp32 scale d and then stores fp16(d): each code carries
        # that rounding too, and q4_0 maps the signed max to -8 so the other side clips at +7
        blocks = _block_view(w, b)
        d32, levels = {
            "q8_0": (blocks.abs().amax(-1) / 127, 128),
            "q4_0": (blocks.abs().amax(-1) / 8, 8),
            "q4_1": ((blocks.amax(-1) - blocks.amin(-1)) / 15, 15),
        }[preset]
        bound = bound + levels * (step - d32.unsqueeze(-1)).abs() + (step if preset == "q4_0" else 0)
    assert (_block_view(err, b) <= bound).all()


@pytest.mark.parametrize("preset", [n for n in NON_LUT if lowbit.PRESETS[n].family == "mx"] + ["gguf-mxfp4"])
def test_mx_round_trip_within_half_ulp_times_scale(preset, gen):
    fmt = lowbit.PRESETS[preset]
    element = {"mxfp4": "fp4_e2m1"}.get(fmt.element, fmt.element)
    et = elements.ELEMENT_TYPES[element]
    w = randw(gen)
    qt = lowbit.quantize_tensor(w, preset)
    s = scales.e8m0_to_fp32(qt.scale).unsqueeze(-1)
    scaled = _block_view(w, 32) / s
    err = (_block_view(qt.dequantize(), 32) / s - scaled).abs()
    a = scaled.abs()
    if et.is_int:
        ulp = torch.full_like(a, 2.0**-6)
    else:
        e = torch.clamp(scales.floor_log2(torch.where(a > 0, a, 1.0)), min=et.emin)
        ulp = torch.ldexp(torch.ones_like(a), (e - et.mbits).float())
    saturated = a > et.max_value
    assert (err[~saturated] <= ulp[~saturated] / 2).all()
    assert torch.allclose(err[saturated], a[saturated] - et.max_value)


@pytest.mark.parametrize("preset", NON_LUT)
def test_requantizing_the_dequantized_tensor_reproduces_the_planes(preset, gen):
    w = randw(gen)
    w[w.abs() < 0.2 * w.abs().amax(1, keepdim=True)] = 0.0
    qt = lowbit.quantize_tensor(w, preset)
    again = lowbit.quantize_tensor(qt.dequantize(), preset)
    for name, plane in qt.planes.items():
        assert torch.equal(plane, again.planes[name]), name


@pytest.mark.parametrize("preset", NON_LUT)
def test_zeros_stay_zeros(preset, gen):
    w = randw(gen, 8, 128)
    w[0] = 0.0            # whole rows
    w[1:, :32] = 0.0      # whole blocks
    w[2, 40] = 0.0        # single values
    w[3, :32] = 1e-42     # denormal block
    out = lowbit.quantize_tensor(w, preset).dequantize()
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1:3, :32] == 0).all() and (out[4:, :32] == 0).all()
    # a denormal block comes back as zeros or as its own (tiny) values, never as garbage
    assert ((out[3, :32] == 0) | ((out[3, :32] - w[3, :32]).abs() <= 1e-42)).all()
    if lowbit.PRESETS[preset].zero == "none":
        assert out[2, 40] == 0


# --- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_refused_with_count_and_place(bad, gen):
    w = randw(gen)
    w[3, 17] = bad
    w[5, 2] = bad
    with pytest.raises(NonFiniteError, match=r"2 NaN/Inf .* row 3, column 17"):
        lowbit.quantize_tensor(w, "int4", name="layers.0.q_proj")


def test_non_divisible_input_dim_names_shape_and_block(gen):
    w = randw(gen, 4, 100)
    with pytest.raises(ValueError, match=r"100 .*\(4, 100\).*block_size 32"):
        lowbit.quantize_tensor(w, "int4")
    qt = lowbit.quantize_tensor(w, "int4", pad=True)
    assert qt.shape == (4, 100) and qt.padded_cols == 128
    assert qt.dequantize().shape == (4, 100)
    assert torch.allclose(qt.dequantize(), lowbit.quantize_tensor(torch.nn.functional.pad(w, (0, 28)), "int4").dequantize()[:, :100])


@pytest.mark.parametrize("preset", NON_LUT)
def test_non_contiguous_inputs_give_the_same_planes(preset, gen):
    base = randw(gen, 64, 128)
    for view in (base.t().contiguous().t(), torch.randn(128, 64, generator=gen).t(), torch.randn(64, 256, generator=gen)[:, ::2]):
        a = lowbit.quantize_tensor(view, preset)
        b = lowbit.quantize_tensor(view.contiguous(), preset)
        assert all(torch.equal(a.planes[k], b.planes[k]) for k in a.planes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_in(dtype, gen):
    w = randw(gen, 8, 64, spread=False).to(dtype)
    out = lowbit.quantize_tensor(w, "int8").dequantize()
    assert out.dtype == torch.float32 and (out - w.float()).abs().max() < 0.05


def test_fp16_near_max_is_computed_in_fp32(gen):
    w = (torch.rand(4, 64, generator=gen) * 2 - 1) * 65504
    w[0, 0] = 65504.0
    w = w.half()
    for preset in ("int8", "int4", "q8_0", "mxfp8-e4m3", "int4-e8m0"):
        out = lowbit.quantize_tensor(w, preset).dequantize()
        assert torch.isfinite(out).all(), preset
        # mxfp8-e4m3's spec (floor) scale saturates the block max at 448/512 of itself
        assert abs(out[0, 0].item() - 65504) / 65504 <= (0.125 if preset.startswith("mx") else 0.01), preset
    big = lowbit.quantize_tensor(w.float() * 4, "int8")
    with pytest.raises(ValueError, match="bfloat16"):
        big.dequantize(torch.float16)
    assert torch.isfinite(big.dequantize(torch.bfloat16)).all()


def test_scale_overflowing_fp16_is_refused_with_advice():
    with pytest.raises(ValueError, match="overflows fp16.*bf16"):
        lowbit.quantize_tensor(torch.full((2, 32), 1e9), "int4")
    assert torch.isfinite(lowbit.quantize_tensor(torch.full((2, 32), 1e9), "int4", scale_dtype="bf16").dequantize()).all()


@pytest.mark.parametrize("w, err", [
    (torch.randint(0, 5, (4, 32)), TypeError),
    (torch.ones(4, 32, dtype=torch.bool), TypeError),
    (torch.tensor(1.0), ValueError),
    ([[1.0] * 32], TypeError),
])
def test_wrong_type_or_rank(w, err):
    with pytest.raises(err):
        lowbit.quantize_tensor(w, "int4")


@pytest.mark.parametrize("preset", ALL)
def test_empty_tensor_gives_empty_qtensor(preset):
    qt = lowbit.quantize_tensor(torch.empty(0, 64), preset)
    assert qt.shape == (0, 64) and qt.dequantize().shape == (0, 64) and qt.data.numel() == 0


def test_one_dim_and_conv_shaped_weights(gen):
    v = torch.randn(96, generator=gen)
    qt = lowbit.quantize_tensor(v, "int8")
    assert qt.shape == (96,) and (qt.dequantize() - v).abs().max() < 0.05
    conv = torch.randn(16, 8, 2, 2, generator=gen)  # blocks run over in*kh*kw = 32
    qt = lowbit.quantize_tensor(conv, "int4")
    assert qt.dequantize().shape == conv.shape


# --- slicing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", NON_LUT)
def test_slicing_slices_every_plane_in_step(preset, gen):
    w = randw(gen, 48, 256)
    qt = lowbit.quantize_tensor(w, preset)
    full = qt.dequantize()
    for rows, cols in [(slice(8, 40), slice(None)), (slice(None), slice(64, 192)), (slice(3, 5), slice(32, 256))]:
        part = qt[rows, cols]
        assert isinstance(part, QTensor)
        assert torch.equal(part.dequantize(), full[rows, cols])
    assert torch.equal(qt[10:20].dequantize(), full[10:20])


def test_slicing_refuses_cuts_inside_a_block(gen):
    qt = lowbit.quantize_tensor(randw(gen), "int4")
    with pytest.raises(ValueError, match="multiples of 32"):
        qt[:, 16:64]
    with pytest.raises(ValueError, match="step 1"):
        qt[::2]


def test_slicing_a_padded_tensor_keeps_the_tail(gen):
    w = randw(gen, 4, 100)
    qt = lowbit.quantize_tensor(w, "int4", pad=True)
    assert torch.equal(qt[:, 64:100].dequantize(), qt.dequantize()[:, 64:100])


def test_to_device_and_repr(gen):
    qt = lowbit.quantize_tensor(randw(gen), "mxfp4").to("cpu")
    assert qt.device.type == "cpu"
    assert "mxfp4" in repr(qt) and "4.250 bits/weight" in repr(qt)


def test_planes_are_validated_against_the_format(gen):
    qt = lowbit.quantize_tensor(randw(gen), "int4-asym")
    planes = qt.planes
    planes.pop("zero")
    with pytest.raises(ValueError, match="missing \\['zero'\\]"):
        QTensor(planes, qt.fmt, qt.shape)
    planes = qt.planes
    planes["scale"] = planes["scale"][:, :3]
    with pytest.raises(ValueError, match="plane 'scale' has shape"):
        QTensor(planes, qt.fmt, qt.shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("preset", NON_LUT)
def test_cuda_planes_equal_cpu_planes(preset, gen):
    w = randw(gen)
    a = lowbit.quantize_tensor(w, preset)
    b = lowbit.quantize_tensor(w.cuda(), preset).to("cpu")
    assert all(torch.equal(a.planes[k], b.planes[k]) for k in a.planes)
    assert math.isclose(a.bits_per_weight, b.bits_per_weight)
