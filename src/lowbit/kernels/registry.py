"""The kernel table: (family, op, device type, backend) -> function, with placement counting.

`dispatch` picks, for a module's format and the input's device, the first registered backend in
`PREFERENCE` order (fused GPU kernels, then CPU fast paths, then the reference), calls it, and
counts what ran under the module's name in `PLACEMENT`, so `lowbit profile` reports what actually
ran, never a guess. Family "*" registers a backend for every family (the reference does this).

Example:
    >>> from lowbit.kernels import PLACEMENT, dispatch
    >>> # y = dispatch("linear", x, qweight, bias, owner="model.layers.0.mlp.up_proj")
    >>> # PLACEMENT["model.layers.0.mlp.up_proj"] -> Counter({'reference': 1})
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Callable

import torch

from ..formats import QTensor

PREFERENCE = ("triton", "cpu_fast", "reference")
KERNELS: dict[tuple[str, str, str, str], Callable] = {}
PLACEMENT: defaultdict[str, Counter] = defaultdict(Counter)
_forced: dict[str, str] = {}  # op -> backend, for tests and benchmarks


def register(family: str, op: str, device: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` for (family, op, device type, backend)."""
    if backend not in PREFERENCE:
        raise ValueError(f"unknown backend {backend!r}; known: {PREFERENCE}")

    def wrap(fn: Callable) -> Callable:
        KERNELS[(family, op, device, backend)] = fn
        return fn

    return wrap


def select(family: str, op: str, device: str, backend: str | None = None) -> tuple[str, Callable]:
    """(backend name, function) that would run; `backend` forces one (error if missing)."""
    backend = backend or _forced.get(op)
    order = (backend,) if backend else PREFERENCE
    for b in order:
        for fam in (family, "*"):
            for dev in (device, "*"):
                fn = KERNELS.get((fam, op, dev, b))
                if fn is not None:
                    return b, fn
    raise LookupError(f"no kernel for op {op!r}, family {family!r}, device {device!r}, backend {backend!r}")


def dispatch(op: str, x: torch.Tensor, qweight: QTensor, *args, owner: str = "?", **kwargs) -> torch.Tensor:
    backend, fn = select(qweight.fmt.family, op, x.device.type)
    if not torch.compiler.is_compiling():
        PLACEMENT[owner][backend] += 1
    return fn(x, qweight, *args, **kwargs)


class force_backend:
    """Context manager: run `op` through `backend` only (e.g. force_backend("linear", "reference"))."""

    def __init__(self, op: str, backend: str):
        self.op, self.backend = op, backend

    def __enter__(self):
        self.prev = _forced.get(self.op)
        _forced[self.op] = self.backend

    def __exit__(self, *exc):
        if self.prev is None:
            _forced.pop(self.op, None)
        else:
            _forced[self.op] = self.prev
