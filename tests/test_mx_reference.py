"""Tier (a): MX element encodings against ml_dtypes casts, and golden blocks from the OCP spec."""

import numpy as np
import pytest
import torch

ml_dtypes = pytest.importorskip("ml_dtypes")

import lowbit  # noqa: E402
from lowbit.formats import elements  # noqa: E402
from lowbit.formats.packing import unpack  # noqa: E402

ML = {
    "mxfp8-e4m3": ("fp8_e4m3", ml_dtypes.float8_e4m3fn),
    "mxfp8-e5m2": ("fp8_e5m2", ml_dtypes.float8_e5m2),
    "mxfp6-e3m2": ("fp6_e3m2", ml_dtypes.float6_e3m2fn),
    "mxfp6-e2m3": ("fp6_e2m3", ml_dtypes.float6_e2m3fn),
    "mxfp4": ("fp4_e2m1", ml_dtypes.float4_e2m1fn),
}


def test_decode_tables_match_ml_dtypes():
    for element, dt in ML.values():
        bits = elements.ELEMENT_TYPES[element].bits
        ours = elements.decode_table(element).numpy()
        ref = np.arange(1 << bits, dtype=np.uint8).view(dt).astype(np.float32) if bits == 8 else \
            np.array([np.array(c, dtype=np.uint8).view(dt) for c in range(1 << bits)]).astype(np.float32)
        np.testing.assert_array_equal(ours, ref, err_msg=element)


@pytest.mark.parametrize("preset", sorted(ML))
def test_elements_equal_ml_dtypes_cast_of_scaled_values(preset):
    element, dt = ML[preset]
    et = elements.ELEMENT_TYPES[element]
    g = torch.Generator().manual_seed(11)
    w = torch.randn(32, 256, generator=g) * torch.logspace(-4, 4, 32).unsqueeze(1)
    w[0, :32] = 0.0
    qt = lowbit.quantize_tensor(w, preset)
    x = qt.scale.to(torch.int32) - 127                          # shared exponents chosen by lowbit
    # independent: spec rule floor(log2(amax)) - emax_elem, computed with numpy
    amax = w.reshape(32, -1, 32).abs().amax(-1).numpy().astype(np.float64)
    with np.errstate(divide="ignore"):
        expect = np.where(amax > 0, np.floor(np.log2(amax)) - et.emax, -127)
    np.testing.assert_array_equal(x.numpy(), np.clip(expect, -127, 127))
    scaled = (w.reshape(32, -1, 32) / torch.pow(2.0, x.double()).unsqueeze(-1).float()).numpy()
    scaled = np.clip(scaled, -et.max_value, et.max_value)     # the spec saturates
    ref = scaled.astype(dt).astype(np.float32)                # ml_dtypes: round to nearest even
    codes = unpack(qt.data, et.bits, 256).reshape(32, -1, 32)
    ours = elements.decode(codes, element).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_mxint8_elements():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    qt = lowbit.quantize_tensor(w, "mxint8")
    x = (qt.scale.to(torch.int32) - 127).double()
    scaled = w.reshape(8, 2, 32).double() / torch.pow(2.0, x).unsqueeze(-1)
    ref = torch.clamp(torch.round(scaled * 64), -127, 127) / 64  # int8 with implicit 2^-6
    codes = qt.data.reshape(8, 2, 32)
    assert torch.equal(elements.decode(codes, "int8").double(), ref)


# --- golden blocks written by hand from the OCP MX v1.0 spec -------------------------------
def block(*values):
    b = torch.zeros(1, 32)
    b[0, : len(values)] = torch.tensor(values)
    return b


def test_mxfp4_golden_amax_4_1():
    # floor: X = floor(log2 4.1) - 2 = 0 -> scale 1, 4.1 rounds to 4.0 (E2M1 grid ... 3, 4, 6)
    assert lowbit.quantize_tensor(block(4.1, 1.0), "mxfp4").dequantize()[0, 0].item() == 4.0
    # round: X = round(log2(4.1 / 6)) = -1 -> 4.1 / 0.5 = 8.2 saturates to 6 -> 3.0
    assert lowbit.quantize_tensor(block(4.1, 1.0), "mxfp4", scale_rounding="round").dequantize()[0, 0].item() == 3.0
    # rceil: X = ceil(log2(4.1 / 6)) = 0 -> 4.0 again, and never saturates
    assert lowbit.quantize_tensor(block(4.1, 1.0), "mxfp4", scale_rounding="rceil").dequantize()[0, 0].item() == 4.0


def test_mxfp4_golden_codes_and_scale():
    # amax 6.0: X = 2 - 2 = 0. Values -> E2M1 codes (sign|e1e0|m): 6 = 0b0111, 0.5 = 0b0001,
    # -3 = 0b1101, 1.25 ties to 1.0 (even mantissa) = 0b0010, 0.25 ties to 0 = 0b0000
    qt = lowbit.quantize_tensor(block(6.0, 0.5, -3.0, 1.25, 0.25), "mxfp4")
    assert qt.scale[0, 0].item() == 127
    codes = unpack(qt.data, 4, 32)[0, :5].tolist()
    assert codes == [0b0111, 0b0001, 0b1101, 0b0010, 0b0000]
    assert qt.data[0, 0].item() == 0b0001_0111  # c0 in the low nibble


def test_mxfp8_e4m3_saturates_under_floor():
    # amax 500: X = floor(log2 500) - 8 = 0; 500 > 448 saturates to 448 (no NaN, unlike a raw cast)
    out = lowbit.quantize_tensor(block(500.0, -500.0, 1.0), "mxfp8-e4m3").dequantize()[0, :3]
    assert out.tolist() == [448.0, -448.0, 1.0]


def test_mx_all_zero_and_denormal_blocks_give_zeros():
    w = torch.zeros(2, 64)
    w[1, :32] = 1e-45  # denormal fp32
    for preset in ML:
        out = lowbit.quantize_tensor(w, preset).dequantize()
        assert torch.isfinite(out).all()
        assert (out[0] == 0).all() and (out[1, 32:] == 0).all()
