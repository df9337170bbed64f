"""Named formats (`lowbit.PRESETS`). Override fields per call: quantize_tensor(w, "int4", block_size=128)."""

from __future__ import annotations

from types import MappingProxyType

from .format import Format


def _p(name: str, family: str, element: str, **kw) -> tuple[str, Format]:
    return name, Format(family=family, element=element, name=name, **kw)


_LINEAR = [
    # per output channel, symmetric; fp32 scale kept to 16 significant bits (scales.py)
    _p("int8", "int", "int8", block_size=None, scale_dtype="fp32"),
    _p("int4", "int", "int4", block_size=32, scale_dtype="fp16"),
    _p("int4-asym", "int", "int4", block_size=32, scale_dtype="fp16", zero="float"),
    # 2-bit symmetric would be ternary; the affine grid keeps all four levels
    _p("int2", "int", "int2", block_size=32, scale_dtype="fp16", zero="float"),
    # power-of-two scales: rceil so no value is clipped (the round-trip stays within half a step)
    _p("int4-e8m0", "int", "int4", block_size=32, scale_dtype="e8m0", scale_rounding="rceil"),
    _p("int2-e8m0", "int", "int2", block_size=32, scale_dtype="e8m0", scale_rounding="rceil"),
]
_MX = [
    _p(name, "mx", element, block_size=32, scale_dtype="e8m0", scale_rounding="floor")
    for name, element in [
        ("mxfp8-e4m3", "fp8_e4m3"), ("mxfp8-e5m2", "fp8_e5m2"), ("mxfp6-e3m2", "fp6_e3m2"),
        ("mxfp6-e2m3", "fp6_e2m3"), ("mxfp4", "fp4_e2m1"), ("mxint8", "int8"),
    ]
]
_LUT = [_p(f"lut{b}", "lut", f"lut{b}", block_size=None, lut_mode="kmeans") for b in (1, 2, 3, 4, 6, 8)]
_GGUF = [
    _p("q8_0", "gguf", "q8_0", scale_dtype="fp16"),
    _p("q4_0", "gguf", "q4_0", scale_dtype="fp16"),
    _p("q4_1", "gguf", "q4_1", scale_dtype="fp16", zero="float"),
    _p("gguf-mxfp4", "gguf", "mxfp4", scale_dtype="e8m0"),
]

PRESETS: MappingProxyType[str, Format] = MappingProxyType(dict(_LINEAR + _MX + _LUT + _GGUF))


def resolve(fmt: str | Format, **overrides) -> Format:
    """A `Format` from a preset name or a Format, with field overrides applied."""
    if isinstance(fmt, str):
        try:
            base = PRESETS[fmt]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(fmt, list(PRESETS), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown format preset {fmt!r}{hint} (lowbit.PRESETS lists {len(PRESETS)})") from None
    elif isinstance(fmt, Format):
        base = fmt
    else:
        raise TypeError(f"format must be a preset name or a lowbit.Format, got {type(fmt).__name__}")
    return base.replace(**overrides) if overrides else base
