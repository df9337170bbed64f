"""Fused ops per (format family, op, device, backend); the reference backend is always present."""

from .registry import KERNELS, PLACEMENT, dispatch, register

__all__ = ["KERNELS", "PLACEMENT", "dispatch", "register"]
