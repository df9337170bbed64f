"""Element types of the OCP Microscaling spec v1.0 (section 5.3): encode to codes, decode by table.

A minifloat with `ebits` exponent bits, `mbits` mantissa bits and bias `bias` has its smallest
normal exponent at emin = 1 - bias. Code layout (most significant first):
sign (1 bit) | exponent field (ebits) | mantissa (mbits). Exponent field 0 means subnormal:
value = mant * 2^(emin - mbits); otherwise value = (1 + mant / 2^mbits) * 2^(field - bias).

MXINT8 elements are two's-complement int8 with an implicit scale of 2^-6 (spec section 5.3.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class ElementType:
    name: str
    ebits: int
    mbits: int
    bias: int
    max_value: float
    emax: int  # exponent of the largest normal value (the spec's emax_elem)
    is_int: bool = False

    @property
    def bits(self) -> int:
        return 8 if self.is_int else 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        return 1 - self.bias


ELEMENT_TYPES: dict[str, ElementType] = {
    "fp8_e4m3": ElementType("fp8_e4m3", 4, 3, 7, 448.0, 8),
    "fp8_e5m2": ElementType("fp8_e5m2", 5, 2, 15, 57344.0, 15),
    "fp6_e3m2": ElementType("fp6_e3m2", 3, 2, 3, 28.0, 4),
    "fp6_e2m3": ElementType("fp6_e2m3", 2, 3, 1, 7.5, 2),
    "fp4_e2m1": ElementType("fp4_e2m1", 2, 1, 1, 6.0, 2),
    "int8": ElementType("int8", 0, 6, 0, 127 / 64, 0, is_int=True),
}


@lru_cache(maxsize=None)
def _table_cpu(name: str) -> torch.Tensor:
    et = ELEMENT_TYPES[name]
    codes = torch.arange(1 << et.bits, dtype=torch.int64)
    if et.is_int:
        signed = torch.where(codes >= 128, codes - 256, codes)
        return signed.to(torch.float32) * 2.0**-6
    sign = torch.where((codes >> (et.ebits + et.mbits)) & 1 == 1, -1.0, 1.0)
    field = (codes >> et.mbits) & ((1 << et.ebits) - 1)
    mant = (codes & ((1 << et.mbits) - 1)).to(torch.float64)
    sub = mant * 2.0 ** (et.emin - et.mbits)
    normal = (1 + mant / (1 << et.mbits)) * torch.pow(2.0, (field - et.bias).to(torch.float64))
    values = sign * torch.where(field == 0, sub, normal)
    if name == "fp8_e4m3":  # "fn" variant: no infinities, S.1111.111 is NaN
        values[(codes & 0x7F) == 0x7F] = float("nan")
    if name == "fp8_e5m2":  # IEEE-like: all-ones exponent is Inf (mant 0) or NaN
        special = field == 31
        values[special] = torch.where(mant[special] == 0, sign[special] * float("inf"), float("nan")).double()
    return values.to(torch.float32)


def decode_table(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 value of every code of element type `name` (index = code)."""
    return _table_cpu(name).to(device)


def round_magnitude(m: torch.Tensor, rule: str) -> torch.Tensor:
    """Round non-negative values to integers under an `element_rounding` rule (see format.py)."""
    if rule == "nearest_even":
        return torch.round(m)
    if rule in ("nearest_away", "nearest_up"):  # identical for non-negative input
        return torch.floor(m + 0.5)
    if rule == "nearest_lower":
        return torch.ceil(m - 0.5)
    raise ValueError(f"unknown element_rounding {rule!r}")


def encode(x: torch.Tensor, name: str, rule: str = "nearest_even") -> torch.Tensor:
    """Encode fp32 values (already divided by the block scale) into element codes (uint8).

    Values beyond the element's max saturate to +-max. The sign bit follows `signbit(x)`, as a
    cast does, so -0.0 and small negatives that round to zero encode as negative zero.

    Example:
        >>> import torch
        >>> encode(torch.tensor([4.1, -0.5, 7.0]), "fp4_e2m1").tolist()  # 4.0, -0.5, 6.0 (saturated)
        [6, 9, 7]
    """
    et = ELEMENT_TYPES[name]
    x = x.to(torch.float32)
    if et.is_int:
        q = round_magnitude(x.abs() * 64.0, rule).clamp(max=127) * torch.where(torch.signbit(x), -1.0, 1.0)
        return q.to(torch.int16).to(torch.uint8)  # two's complement byte: -1 -> 255
    a = x.abs().clamp(max=et.max_value)
    _, exp = torch.frexp(a)  # a = f * 2^exp with f in [0.5, 1): floor(log2 a) = exp - 1
    e = torch.clamp(exp.to(torch.int32) - 1, min=et.emin)
    e = torch.where(a > 0, e, et.emin)  # frexp(0) reports exponent 0, not -inf
    # a / step with step = 2^(e - mbits): exact (power-of-two scaling of a normal fp32 value)
    r = round_magnitude(torch.ldexp(a, (et.mbits - e).to(torch.float32)), rule)
    # One formula covers subnormals, normals and a carry into the next binade:
    # code magnitude = (e - emin) * 2^mbits + r, with r in [0, 2^(mbits+1)].
    mag = ((e - et.emin) << et.mbits) + r.to(torch.int32)
    sign = torch.signbit(x).to(torch.int32) << (et.ebits + et.mbits)
    return (mag | sign).to(torch.uint8)


def decode(codes: torch.Tensor, name: str) -> torch.Tensor:
    """fp32 values of element codes."""
    return decode_table(name, codes.device)[codes.long()]
