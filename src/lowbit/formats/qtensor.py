"""`QTensor`: a quantized weight as named planes that always travel together, plus its `Format`.

Geometry. A weight of logical shape (rows, *rest) is viewed as a matrix (rows, cols) with
cols = prod(rest); blocks run along cols. When cols is not a multiple of the block size and the
caller asked for padding, the planes cover `padded_cols` columns (zero-filled); `dequantize()`
crops back to the logical shape.

Planes (every family; see the family modules for dtypes and meaning):
    data       uint8 (rows, packed bytes per row)      codes
    scale      (rows, padded_cols / B)                 per block; (rows, 1) per channel
    zero       like scale                               affine formats
    lut        (n_luts, 2^bits)                         palettes; n_luts = rows / group_size or 1
    lut_scale  (n_luts, 1)                              palettes with an int8 LUT
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from . import registry
from .format import Format
from .packing import group_codes, packed_len

PLANE_NAMES = ("data", "scale", "zero", "lut", "lut_scale")


class QTensor:
    """A quantized tensor: planes + `Format` + logical shape.

    Example:
        >>> import torch, lowbit
        >>> qt = lowbit.quantize_tensor(torch.randn(64, 128), "int4")
        >>> qt.bits_per_weight, qt.dequantize().shape
        (4.5, torch.Size([64, 128]))
        >>> qt[:32, 64:].shape   # slices every plane in step, on block boundaries
        (32, 64)
    """

    # kernel_cache: what a kernel backend derives from these planes once and reuses on every call
    # (e.g. triton_linear's launch plans); it lives and dies with this object, which a module keeps
    # for as long as its plane tensors stay the same objects (nn/modules.py)
    __slots__ = ("_planes", "fmt", "shape", "kernel_cache")

    def __init__(self, planes: dict[str, torch.Tensor], fmt: Format, shape: Iterable[int]):
        if not isinstance(fmt, Format):
            raise TypeError(f"QTensor needs a Format, got {type(fmt).__name__}")
        self.fmt = fmt
        self.shape = tuple(int(s) for s in shape)
        self._planes = dict(planes)
        self.kernel_cache: dict = {}
        self._check_planes()

    def __reduce__(self):
        """Copies and pickles carry the planes, format and shape; `kernel_cache` starts empty."""
        return QTensor, (self._planes, self.fmt, self.shape)

    # -- geometry --------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else (self.shape[0] if self.shape else 1)

    @property
    def block(self) -> int | None:
        """Columns per scale, or None when the scale is per row (or the format has no blocks)."""
        return None if self.fmt.family == "lut" else self.fmt.block_size

    @property
    def padded_cols(self) -> int:
        b = self.block
        return self.cols if b is None else -(-self.cols // b) * b

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @staticmethod
    def view_2d(shape: tuple[int, ...]) -> tuple[int, int]:
        """(rows, cols) of the matrix view of a logical shape (1-D tensors are one row)."""
        if len(shape) == 1:
            return 1, shape[0]
        return shape[0], math.prod(shape[1:])

    def expected_plane_shapes(self) -> dict[str, tuple[int, ...]]:
        """Plane name -> shape these planes must have for this format and logical shape."""
        rows, cols = self.view_2d(self.shape)
        fmt = self.fmt
        out = {"data": (rows, packed_len(self.padded_cols, fmt.bits))}
        if fmt.family == "lut":
            n_luts = rows // fmt.group_size if fmt.group_size else 1
            out["lut"] = (n_luts, 1 << fmt.bits)
            if fmt.lut_dtype == "int8":
                out["lut_scale"] = (n_luts, 1)
            if fmt.per_channel_scale:
                out["scale"] = (rows, 1)
            return out
        nb = self.padded_cols // (self.block or max(cols, 1)) if cols else 0
        out["scale"] = (rows, nb if self.block else 1)
        if fmt.zero == "float":
            out["zero"] = out["scale"]
        return out

    def _check_planes(self) -> None:
        expected = self.expected_plane_shapes()
        got = set(self._planes)
        if got != set(expected):
            missing, extra = sorted(set(expected) - got), sorted(got - set(expected))
            raise ValueError(
                f"QTensor({self.fmt.name}, shape={self.shape}): planes {sorted(got)} do not match the format"
                + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else "")
            )
        for name, shp in expected.items():
            p = self._planes[name]
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"plane {name!r} must be a torch.Tensor, got {type(p).__name__}")
            if tuple(p.shape) != shp:
                raise ValueError(
                    f"QTensor({self.fmt.name}, shape={self.shape}): plane {name!r} has shape "
                    f"{tuple(p.shape)}, expected {shp}"
                )

    # -- planes and sizes ------------------------------------------------------------------
    @property
    def planes(self) -> dict[str, torch.Tensor]:
        """Plane name -> tensor (a new dict; the tensors are shared)."""
        return dict(self._planes)

    def __getattr__(self, name: str) -> torch.Tensor | None:
        if name in PLANE_NAMES:
            return self._planes.get(name)
        raise AttributeError(name)

    @property
    def nbytes(self) -> int:
        """Bytes of all planes together."""
        return sum(p.numel() * p.element_size() for p in self._planes.values())

    @property
    def bits_per_weight(self) -> float:
        """All planes' bits divided by the number of logical weights (padding counted as cost)."""
        return 8 * self.nbytes / self.numel if self.numel else 0.0

    @property
    def device(self) -> torch.device:
        return self._planes["data"].device

    def to(self, device: torch.device | str) -> "QTensor":
        """The same QTensor with every plane on `device`."""
        return QTensor({k: v.to(device) for k, v in self._planes.items()}, self.fmt, self.shape)

    # -- values ----------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor these planes mean, in `dtype` (math in fp32).

        Refuses fp16 output when a value exceeds fp16's range (use bfloat16 or float32).
        """
        rows, _ = self.view_2d(self.shape)
        if self.numel == 0:
            return torch.empty(self.shape, dtype=dtype, device=self.device)
        w = registry.handler(self.fmt.family).decode(self._planes, self.fmt, rows, self.padded_cols)
        w = w[:, : self.cols].reshape(self.shape)
        if dtype == torch.float16:
            big = w.abs().max()
            if big > torch.finfo(torch.float16).max:
                raise ValueError(
                    f"dequantized values reach {big.item():.4g}, beyond float16's range; "
                    "dequantize to torch.bfloat16 or torch.float32 instead"
                )
        return w.to(dtype)

    # -- slicing ---------------------------------------------------------------------------
    def __getitem__(self, key: slice | tuple[slice, slice]) -> "QTensor":
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError("QTensor slicing takes [rows] or [rows, cols]")
            row_key, col_key = key
        else:
            row_key, col_key = key, None
        qt = self._slice_rows(row_key)
        return qt._slice_cols(col_key) if col_key is not None else qt

    def _span(self, key: slice, n: int, what: str) -> tuple[int, int]:
        if not isinstance(key, slice):
            raise TypeError(f"QTensor {what} index must be a slice (planes are sliced in step), got {type(key).__name__}")
        start, stop, step = key.indices(n)
        if step != 1:
            raise ValueError(f"QTensor {what} slices must have step 1, got {step}")
        return start, max(start, stop)

    def _slice_rows(self, key: slice) -> "QTensor":
        rows, _ = self.view_2d(self.shape)
        r0, r1 = self._span(key, rows, "row")
        if (r0, r1) == (0, rows):
            return self
        if len(self.shape) == 1:
            raise IndexError("a 1-D QTensor is a single row; slice its columns with qt[:, c0:c1]")
        planes = {}
        g = self.fmt.group_size if self.fmt.family == "lut" else 0
        if g and (r0 % g or (r1 % g and r1 != rows)):
            raise ValueError(f"rows {r0}:{r1} do not fall on LUT group boundaries (group_size={g})")
        for name, p in self._planes.items():
            if name in ("lut", "lut_scale"):
                planes[name] = p[r0 // g: -(-r1 // g)] if g else p
            else:
                planes[name] = p[r0:r1]
        return QTensor(planes, self.fmt, (r1 - r0, *self.shape[1:]))

    def _slice_cols(self, key: slice) -> "QTensor":
        rows, cols = self.view_2d(self.shape)
        c0, c1 = self._span(key, cols, "column")
        if (c0, c1) == (0, cols):
            return self
        b = self.block
        unit = b if b is not None else group_codes(self.fmt.bits)  # columns per byte-aligned step
        if c0 % unit or (c1 % unit and c1 != cols):
            raise ValueError(
                f"columns {c0}:{c1} of {self.fmt.name} must start and end on multiples of {unit} "
                f"({'block size' if b else 'byte-aligned code groups'}), or end at {cols}"
            )
        c1_padded = -(-c1 // unit) * unit if b is not None else c1
        planes = dict(self._planes)
        planes["data"] = self._planes["data"][:, packed_len(c0, self.fmt.bits): packed_len(c1_padded, self.fmt.bits)]
        if b is not None:
            for name in ("scale", "zero"):
                if name in planes:
                    planes[name] = planes[name][:, c0 // b: c1_padded // b]
        return QTensor(planes, self.fmt, (rows, c1 - c0))

    # -- misc ------------------------------------------------------------------------------
    def __repr__(self) -> str:
        planes = ", ".join(f"{k}={tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}" for k, v in self._planes.items())
        return f"QTensor({self.fmt.name}, shape={self.shape}, {self.bits_per_weight:.3f} bits/weight, {planes})"
