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
SUPPORTS: dict[tuple[str, str, str, str], Callable] = {}  # key -> predicate(fmt, shape) -> bool
PLACEMENT: defaultdict[str, Counter] = defaultdict(Counter)
_forced: dict[str, str] = {}  # op -> backend, for tests and benchmarks
_generation = 0  # bumped by `register`


def register(family: str, op: str, device: str, backend: str,
             supports: Callable | None = None) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` for (family, op, device type, backend); `supports(fmt, shape, dtype)`
    narrows it to the formats whose numbers it reproduces, the weight shapes it handles and the
    activation dtypes it takes (shape and dtype None when unknown: answer for the format)."""
    if backend not in PREFERENCE:
        raise ValueError(f"unknown backend {backend!r}; known: {PREFERENCE}")

    def wrap(fn: Callable) -> Callable:
        global _generation
        _generation += 1  # choices remembered by `dispatch` before this registration are stale
        KERNELS[(family, op, device, backend)] = fn
        if supports is not None:
            SUPPORTS[(family, op, device, backend)] = supports
        return fn

    return wrap


def select(fmt, op: str, device: str, backend: str | None = None, owner: str = "?",
           shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> tuple[str, Callable]:
    """(backend name, function) that would run for Format `fmt` (and weight `shape` and activation
    `dtype`, when known)."""
    backend = backend or _forced.get((op, owner)) or _forced.get(op)
    order = (backend,) if backend else PREFERENCE
    for b in order:
        for fam in (fmt.family, "*"):
            for dev in (device, "*"):
                key = (fam, op, dev, b)
                fn = KERNELS.get(key)
                if fn is not None and (key not in SUPPORTS or SUPPORTS[key](fmt, shape, dtype)):
                    return b, fn
    raise LookupError(f"{owner}: no {backend or 'any'} kernel for op {op!r}, format {fmt.name!r}, device {device!r}; "
                      f"the reference backend covers every format")


def dispatch(op: str, x: torch.Tensor, qweight: QTensor, *args, owner: str = "?", **kwargs) -> torch.Tensor:
    """Run `op` for `qweight` through the backend `select` picks, counting it under `owner`. The
    choice is remembered in the QTensor's `kernel_cache` (a module keeps its QTensor from call to
    call), except while `force_backend` is active."""
    device, dtype = x.device.type, x.dtype
    if _forced:
        backend, fn = select(qweight.fmt, op, device, owner=owner, shape=qweight.shape, dtype=dtype)
    else:
        key = ("select", op, device, dtype, _generation)
        hit = qweight.kernel_cache.get(key)
        if hit is None:
            hit = qweight.kernel_cache[key] = select(qweight.fmt, op, device, owner=owner, shape=qweight.shape,
                                                     dtype=dtype)
        backend, fn = hit
    if not torch.compiler.is_compiling():
        PLACEMENT[owner][backend] += 1
    return fn(x, qweight, *args, **kwargs)


def forced_backend(op: str, owner: str | None = None) -> str | None:
    """The backend `force_backend` currently imposes on `op` (for layer `owner`), or None."""
    return (_forced.get((op, owner)) if owner else None) or _forced.get(op)


class force_backend:
    """Context manager: run `op` through `backend` only, for every layer or for one `layer` name.

    Example:
        >>> with force_backend("linear", "reference"):  # doctest: +SKIP
        ...     model(x)
    """

    def __init__(self, op: str, backend: str, layer: str | None = None):
        self.key = (op, layer) if layer else op
        self.backend = backend

    def __enter__(self):
        self.prev = _forced.get(self.key)
        _forced[self.key] = self.backend

    def __exit__(self, *exc):
        if self.prev is None:
            _forced.pop(self.key, None)
        else:
            _forced[self.key] = self.prev
