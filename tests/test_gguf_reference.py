"""Tier (a): GGUF-compatible presets against gguf-py's own quantizers, bit for bit."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

import lowbit  # noqa: E402

PAIRS = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "gguf-mxfp4": T.MXFP4}


def adversarial(rows: int = 64) -> torch.Tensor:
    """Random blocks plus the cases that break sloppy ports: ties, outliers, zeros, powers of two."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(rows, 256, generator=g)
    w[0] = 0.0                                          # all-zero row
    w[1, :32] = torch.arange(32) - 16.0                 # integer grid: exact ties for q4_0 / q4_1
    w[2] = torch.randn(256, generator=g) * 1e-3
    w[2, 5] = 40.0                                      # outlier
    w[3, :32] = 4.0 * (1 - 2.0**-24)                    # just below a power of two (log2 rounding)
    w[3, 32:64] = torch.tensor([4.1, 2.5, 1.25, 0.75, 3.5, 5.0, -2.5, -1.75] * 4)  # E2M1 ties
    w[4] = -w[4].abs()                                  # one-signed blocks
    w[5, ::2] = 0.0                                     # half zeros
    w[6] = torch.round(w[6] * 8) / 8                    # values on a coarse grid: many ties
    w[7] = w[7] * 1000.0                                # large magnitudes (still in fp16 range)
    return w


@pytest.mark.parametrize("preset", sorted(PAIRS))
@pytest.mark.parametrize("data", ["random", "adversarial"])
def test_dequantized_values_equal_gguf_py(preset, data):
    w = torch.randn(48, 320, generator=torch.Generator().manual_seed(3)) if data == "random" else adversarial()
    ref = quants.dequantize(quants.quantize(w.numpy(), PAIRS[preset]), PAIRS[preset])
    ours = lowbit.quantize_tensor(w, preset).dequantize()
    assert ours.shape == w.shape
    np.testing.assert_array_equal(ours.numpy(), ref)  # bit-exact, not approximately


@pytest.mark.parametrize("preset", sorted(PAIRS))
def test_scales_equal_gguf_py_bytes(preset):
    """The stored scale bytes are llama.cpp's (the exporter copies them)."""
    w = adversarial()
    raw = quants.quantize(w.numpy(), PAIRS[preset]).reshape(w.shape[0], -1, {T.Q8_0: 34, T.Q4_0: 18, T.Q4_1: 20, T.MXFP4: 17}[PAIRS[preset]])
    qt = lowbit.quantize_tensor(w, preset)
    if preset == "gguf-mxfp4":
        np.testing.assert_array_equal(qt.scale.numpy(), raw[..., 0])
    else:
        np.testing.assert_array_equal(qt.scale.numpy().view(np.uint8).reshape(raw.shape[0], -1, 2), raw[..., :2])
