"""`quantize_tensor` and `dequantize`: the public verbs of the numeric core."""

from __future__ import annotations

import torch

from . import registry
from .format import Format
from .presets import resolve
from .qtensor import QTensor


class NonFiniteError(ValueError):
    """The tensor holds NaN or Inf values. Callers that want such layers kept in float catch this."""


def quantize_tensor(
    w: torch.Tensor,
    fmt: str | Format,
    *,
    pad: bool = False,
    importance: torch.Tensor | None = None,
    name: str = "tensor",
    **overrides,
) -> QTensor:
    """Quantize a float tensor into a `QTensor`.

    Args:
        w: weight of any float dtype and rank >= 1, on any device; the last dims are the input
            dims (a (out, in) Linear weight is blocked along `in`).
        fmt: a preset name (see `lowbit.PRESETS`) or a `Format`.
        pad: zero-pad the input dim up to a multiple of the block size instead of refusing.
        importance: palettes only: per-element weights for k-means (same shape as `w`).
        name: how errors refer to this tensor (a layer name, say).
        **overrides: `Format` fields to change, e.g. ``block_size=128``.

    Returns:
        A `QTensor` whose `dequantize()` approximates `w`. Math is fp32 whatever `w`'s dtype.

    Raises:
        TypeError: not a float tensor. ValueError: rank 0, shape not divisible by the block
        (without `pad`), or a scale the scale dtype cannot hold. NonFiniteError: NaN / Inf.

    Example:
        >>> import torch, lowbit
        >>> w = torch.randn(256, 512)
        >>> qt = lowbit.quantize_tensor(w, "mxfp4")
        >>> (lowbit.dequantize(qt) - w).abs().max() < w.abs().max() / 4
        tensor(True)
    """
    fmt = resolve(fmt, **overrides)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {w.dtype}; convert with .float() first")
    if w.dim() == 0:
        raise ValueError(f"{name}: cannot quantize a 0-d tensor (a scalar); keep it in float")
    shape = tuple(w.shape)
    rows, cols = QTensor.view_2d(shape)
    w2 = w.detach().reshape(rows, cols).to(torch.float32).contiguous()

    if w2.numel():
        bad = ~torch.isfinite(w2)
        n_bad = int(bad.sum())
        if n_bad:
            where = bad.nonzero()[0].tolist()
            raise NonFiniteError(
                f"{name}: {n_bad} NaN/Inf value(s) in a tensor of shape {shape} (first at row {where[0]}, "
                f"column {where[1]}); fix the weights or keep this layer in float (recipe nan_policy='keep')"
            )

    block = None if fmt.family == "lut" else fmt.block_size
    if block is not None and cols % block:
        if not pad:
            raise ValueError(
                f"{name}: input dim {cols} of shape {shape} is not divisible by block_size {block} "
                f"({fmt.name}); pass pad=True to zero-pad to {-(-cols // block) * block}, or choose a "
                f"block size dividing {cols}"
            )
        w2 = torch.nn.functional.pad(w2, (0, -cols % block))

    if w2.numel() == 0:
        return _empty(fmt, shape, w.device)
    options = {}
    if importance is not None:
        if fmt.family != "lut":
            raise ValueError(f"{name}: importance weights are used by palettes (lut*) only, not {fmt.name}")
        if tuple(importance.shape) != shape:
            raise ValueError(f"{name}: importance has shape {tuple(importance.shape)}, expected {shape}")
        options["importance"] = importance.detach().reshape(rows, cols).to(device=w2.device, dtype=torch.float32)
    planes = registry.handler(fmt.family).encode(w2, fmt, **options)
    return QTensor(planes, fmt, shape)


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor a `QTensor` stands for (see `QTensor.dequantize`).

    Example:
        >>> import torch, lowbit
        >>> lowbit.dequantize(lowbit.quantize_tensor(torch.ones(4, 32), "int8")).unique()
        tensor([1.])
    """
    if not isinstance(qt, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(qt).__name__}")
    return qt.dequantize(dtype)


def _empty(fmt: Format, shape: tuple[int, ...], device: torch.device) -> QTensor:
    """A QTensor with zero elements: every plane present, with its (empty) expected shape."""
    probe = QTensor.__new__(QTensor)
    probe.fmt, probe.shape = fmt, shape
    dtypes = {"data": torch.uint8, "lut_scale": torch.float16, "lut": torch.int8 if fmt.lut_dtype == "int8" else torch.float16}
    scale_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "e8m0": torch.uint8}[fmt.scale_dtype]
    planes = {
        k: torch.zeros(s, dtype=dtypes.get(k, scale_dtype), device=device)
        for k, s in probe.expected_plane_shapes().items()
    }
    return QTensor(planes, fmt, shape)
