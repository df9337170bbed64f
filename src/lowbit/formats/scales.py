"""Scale planes: float scales (fp32 / fp16 / bf16) and E8M0 power-of-two scales.

E8M0 (OCP MX v1.0 section 5.4.1): one unsigned byte, value 2^(byte - 127); 0xFF is NaN and is
never written here. Float scales are rounded to nearest in their dtype; fp32 scales are rounded
to 16 significant bits so that `qmax * scale` is exact in fp32, which makes
quantize(dequantize(q)) reproduce q bit for bit.
"""

from __future__ import annotations

import torch

FLOAT_SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
E8M0_BIAS = 127


def encode_float(s: torch.Tensor, scale_dtype: str, what: str = "scale") -> torch.Tensor:
    """Round fp32 scales (or biases) into the stored dtype; refuse values the dtype cannot hold."""
    dtype = FLOAT_SCALE_DTYPES[scale_dtype]
    if scale_dtype == "fp32":
        # keep 16 significant bits (round to nearest): 7 low mantissa bits cleared
        bits = s.contiguous().view(torch.int32)
        rounded = ((bits + 0x40) & ~0x7F).view(torch.float32)
        return torch.where(torch.isfinite(s), rounded, s)
    finfo = torch.finfo(dtype)
    big = s.abs().max() if s.numel() else s.new_zeros(())
    if big > finfo.max:
        raise ValueError(
            f"a {what} of {big.item():.4g} overflows {scale_dtype} (max {finfo.max:.4g}); "
            f"use scale_dtype='bf16' or 'fp32' for weights this large"
        )
    return s.to(dtype)


def decode_float(plane: torch.Tensor) -> torch.Tensor:
    return plane.to(torch.float32)


def step_down(plane: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """The next stored value toward zero of each positive scale in `plane` (fp16 / bf16: one unit in
    the last place; fp32 scales keep 16 significant bits, so one unit is 0x80 in the fp32 bits).

        >>> step_down(torch.tensor([3.5763e-07], dtype=torch.float16), "fp16").item()  # 6 -> 5 x 2^-24
        2.980232238769531e-07
    """
    if scale_dtype == "fp32":
        return (plane.contiguous().view(torch.int32) - 0x80).view(torch.float32)
    return (plane.contiguous().view(torch.int16) - 1).view(plane.dtype)


def e8m0_to_fp32(codes: torch.Tensor) -> torch.Tensor:
    """2^(code - 127) as fp32, exact, including the subnormal 2^-127 for code 0."""
    c = codes.to(torch.int32)
    bits = torch.where(c == 0, torch.full_like(c, 0x00400000), c << 23)
    bits = torch.where(c == 255, torch.full_like(c, 0x7FC00000), bits)
    return bits.view(torch.float32)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for a > 0, exact (also for subnormals), as int32."""
    _, exp = torch.frexp(a)
    return exp.to(torch.int32) - 1


def e8m0_exponent(amax: torch.Tensor, emax: int, elem_max: float, rule: str) -> torch.Tensor:
    """Shared exponent X (int32, clamped to [-127, 127]) for blocks with absolute maximum `amax`.

    floor: X = floor(log2 amax) - emax (OCP v1.0); rceil: smallest X with amax <= elem_max * 2^X;
    round: X = round(log2(amax / elem_max)). All-zero blocks get X = -127.
    """
    amax = amax.to(torch.float32)
    pos = amax > 0
    safe = torch.where(pos, amax, torch.ones_like(amax))
    x0 = floor_log2(safe) - emax
    if rule == "floor":
        x = x0
    elif rule == "rceil":
        # amax / 2^x0 lies in [2^emax, 2^(emax+1)) and so does elem_max: X is x0 or x0 + 1
        x = x0 + (safe > torch.ldexp(torch.full_like(safe, elem_max), x0.to(torch.float32))).to(torch.int32)
    elif rule == "round":
        x = torch.round(torch.log2(safe.double() / elem_max)).to(torch.int32)
    else:
        raise ValueError(f"unknown scale_rounding {rule!r}")
    x = torch.where(pos, x, torch.full_like(x, -E8M0_BIAS))
    return x.clamp(-E8M0_BIAS, E8M0_BIAS)


def e8m0_encode(x: torch.Tensor) -> torch.Tensor:
    """Store exponents X as E8M0 bytes."""
    return (x + E8M0_BIAS).to(torch.uint8)


def decode_scale(plane: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """fp32 value of a stored scale plane."""
    return e8m0_to_fp32(plane) if scale_dtype == "e8m0" else decode_float(plane)
