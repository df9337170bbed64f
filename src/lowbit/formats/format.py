"""`Format`: the frozen, validated description of how a `QTensor`'s planes are read.

A format is data, not code: the family handler (see `registry.py`) reads these fields to choose
plane values and to dequantize. Every field is checked in `__post_init__`, so an invalid format
cannot exist, and `to_dict` / `from_dict` round-trip through an allow-list of keys (the package
manifest stores formats this way).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# family -> the element types it accepts
FAMILY_ELEMENTS: dict[str, tuple[str, ...]] = {
    # integer codes times a per-block (or per-channel) scale, optional float bias
    "int": ("int8", "int4", "int3", "int2"),
    # OCP Microscaling v1.0: minifloat / int8 elements, E8M0 shared scale per block
    "mx": ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8"),
    # palettized: codes index a lookup table per group of output channels
    "lut": ("lut1", "lut2", "lut3", "lut4", "lut6", "lut8"),
    # llama.cpp block types, with llama.cpp's own rounding rules
    "gguf": ("q8_0", "q4_0", "q4_1", "mxfp4"),
}

ELEMENT_BITS: dict[str, int] = {
    "int8": 8, "int4": 4, "int3": 3, "int2": 2,
    "fp8_e4m3": 8, "fp8_e5m2": 8, "fp6_e3m2": 6, "fp6_e2m3": 6, "fp4_e2m1": 4,
    "lut1": 1, "lut2": 2, "lut3": 3, "lut4": 4, "lut6": 6, "lut8": 8,
    "q8_0": 8, "q4_0": 4, "q4_1": 4, "mxfp4": 4,
}

SCALE_DTYPES = ("fp32", "fp16", "bf16", "e8m0")
# How an E8M0 power-of-two scale is picked from a block's absolute maximum `amax`
# (`emax` = exponent of the element type's largest normal, `elem_max` = its largest value):
#   floor: 2^(floor(log2 amax) - emax)            the OCP MX v1.0 rule; values above elem_max saturate
#   rceil: 2^ceil(log2(amax / elem_max))          smallest power of two with no saturation
#   round: 2^round(log2(amax / elem_max))         nearest in log space; may saturate
SCALE_ROUNDINGS = ("floor", "rceil", "round")
# How a scaled value becomes a code:
#   nearest_even   round half to even (IEEE default, ml_dtypes casts, torch.round)
#   nearest_away   round half away from zero (C roundf; llama.cpp's q8_0)
#   nearest_up     floor(x + 0.5) (llama.cpp's q4_0 / q4_1 via trunc of a non-negative value)
#   nearest_lower  ties go to the smaller magnitude (llama.cpp's mxfp4 argmin over its table)
ELEMENT_ROUNDINGS = ("nearest_even", "nearest_away", "nearest_up", "nearest_lower")
ZERO_KINDS = ("none", "float")
LUT_MODES = ("kmeans", "uniform", "unique")
LUT_DTYPES = ("fp16", "int8")


@dataclass(frozen=True)
class Format:
    """How to read a quantized weight's planes.

    Args:
        family: "int", "mx", "lut" or "gguf".
        element: element type within the family (e.g. "int4", "fp4_e2m1", "lut4", "q4_0").
        block_size: values per scale along the input (last) dimension; ``None`` means one scale
            per output channel (row). Palettes ignore it.
        scale_dtype: "fp32", "fp16", "bf16" or "e8m0" (power of two, one byte).
        scale_rounding: E8M0 exponent rule: "floor" (OCP spec), "rceil" or "round".
        element_rounding: tie rule when a scaled value becomes a code.
        zero: "none" (symmetric) or "float" (affine: ``w = code * scale + zero``).
        lut_mode: palettes only: "kmeans", "uniform" or "unique".
        group_size: palettes only: output channels sharing one LUT (0 = one LUT for the whole
            tensor). This counts channels the way coremltools' ``group_size`` does.
        per_channel_scale: palettes only: divide each row by its max-abs before palettizing
            and keep that scale as the ``scale`` plane.
        lut_dtype: palettes only: "fp16", or "int8" (LUT entries int8 plus a ``lut_scale`` plane).
        kmeans_iters: palettes only: Lloyd iterations.
        seed: palettes only: seed of the k-means initialisation (results are deterministic).
        name: preset name, informational.

    Example:
        >>> from lowbit import Format
        >>> f = Format(family="int", element="int4", block_size=64)
        >>> Format.from_dict(f.to_dict()) == f
        True
    """

    family: str
    element: str
    block_size: int | None = 32
    scale_dtype: str = "fp16"
    scale_rounding: str = "floor"
    element_rounding: str = "nearest_even"
    zero: str = "none"
    lut_mode: str = "kmeans"
    group_size: int = 0
    per_channel_scale: bool = False
    lut_dtype: str = "fp16"
    kmeans_iters: int = 300
    seed: int = 0
    name: str = "custom"

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, allowed: Any) -> ValueError:
            return ValueError(f"Format({self.name!r}): {field}={value!r} is not allowed; expected {allowed}")

        if self.family not in FAMILY_ELEMENTS:
            raise bad("family", self.family, list(FAMILY_ELEMENTS))
        if self.element not in FAMILY_ELEMENTS[self.family]:
            raise bad("element", self.element, list(FAMILY_ELEMENTS[self.family]))
        if self.block_size is not None:
            if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
                raise bad("block_size", self.block_size, "a positive int or None (per channel)")
            if self.block_size % 8:
                raise bad("block_size", self.block_size, "a multiple of 8 (blocks must start on byte boundaries)")
        if self.scale_dtype not in SCALE_DTYPES:
            raise bad("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        if self.scale_rounding not in SCALE_ROUNDINGS:
            raise bad("scale_rounding", self.scale_rounding, SCALE_ROUNDINGS)
        if self.element_rounding not in ELEMENT_ROUNDINGS:
            raise bad("element_rounding", self.element_rounding, ELEMENT_ROUNDINGS)
        if self.zero not in ZERO_KINDS:
            raise bad("zero", self.zero, ZERO_KINDS)
        if self.lut_mode not in LUT_MODES:
            raise bad("lut_mode", self.lut_mode, LUT_MODES)
        if self.lut_dtype not in LUT_DTYPES:
            raise bad("lut_dtype", self.lut_dtype, LUT_DTYPES)
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise bad("group_size", self.group_size, "an int >= 0 (0 = per tensor)")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 1:
            raise bad("kmeans_iters", self.kmeans_iters, "an int >= 1")
        # family-specific rules
        if self.family == "mx":
            if self.scale_dtype != "e8m0" or self.zero != "none":
                raise ValueError(f"Format({self.name!r}): MX formats use an e8m0 scale and no zero point")
            if self.block_size is None:
                raise bad("block_size", None, "a block size (MX scales are per block; the spec uses 32)")
        if self.family == "int" and self.zero == "float" and self.scale_dtype == "e8m0":
            raise ValueError(f"Format({self.name!r}): an affine (zero='float') format needs a float scale, not e8m0")
        if self.family == "gguf" and self.block_size != 32:
            raise bad("block_size", self.block_size, "32 (llama.cpp's block types are fixed at 32)")

    # -- derived facts -------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Bits per code in the data plane."""
        return ELEMENT_BITS[self.element]

    @property
    def scale_bits(self) -> int:
        return {"fp32": 32, "fp16": 16, "bf16": 16, "e8m0": 8}[self.scale_dtype]

    def replace(self, **overrides: Any) -> "Format":
        """A copy with some fields changed (validated again)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown Format field(s) {sorted(unknown)}; valid: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON / TOML friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Format":
        """Build from `to_dict()` output; unknown keys are refused, never ignored."""
        if not isinstance(d, dict):
            raise TypeError(f"Format.from_dict expects a dict, got {type(d).__name__}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"Format.from_dict: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**d)
