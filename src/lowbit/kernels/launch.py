"""Re-launching a compiled Triton kernel without Triton's per-call argument binding.

A Triton launch through `kernel[grid](...)` binds and specializes every argument in Python on every
call (about 25-30 us of host time for the GEMV's 40 arguments on an H200 host); a decoder's eager
step makes hundreds of such calls. A `LaunchPlan` keeps the `CompiledKernel` that a first, normal
launch returned together with its full argument list, and later launches only swap the arguments
that change between calls (the activations, the output) through the compiled kernel's own launcher.

Correctness rests on the caller's key: a plan may only be reused for calls whose every argument
would specialize the same way (Triton specializes integers equal to 1 or divisible by 16 and
pointers aligned to 16 bytes), so the key must hold every integer argument that can change and the
alignment of every swapped pointer (`triton_linear.run_fast_gemv`: M, dtype, x's row stride and
alignment, the bias; the output and workspace come from the caching allocator, 512-byte aligned).

Example:
    >>> # compiled = kern[grid](*args, **consts)          # the normal launch, once
    >>> # plan = LaunchPlan.of(kern, compiled, grid, args, consts, {"x": 0, "y": 6})
    >>> # plan.launch(x=x2, y=y)                           # later calls with the same key
"""

from __future__ import annotations

import inspect
from typing import Any


class LaunchPlan:
    """A compiled kernel, its grid and full argument list (signature order) with swappable slots."""

    __slots__ = ("compiled", "grid", "args", "slots", "consts")

    def __init__(self, compiled, grid: tuple, args: list, slots: dict[str, int], consts: dict[str, Any]):
        self.compiled, self.grid, self.args, self.slots, self.consts = compiled, grid, args, slots, consts

    @property
    def split(self) -> int:
        return int(self.consts.get("SPLIT_K", 1))

    @staticmethod
    def of(jit_fn, compiled, grid: tuple, args: tuple, consts: dict[str, Any], slots: dict[str, int]) -> "LaunchPlan | None":
        """The plan of a launch `jit_fn[grid](*args, **consts)` that returned `compiled`; None where
        that is not a compiled kernel (Triton's interpreter) or the signature cannot be filled."""
        try:
            from triton.compiler import CompiledKernel
        except ImportError:  # pragma: no cover - Triton without the compiler package
            return None
        if not isinstance(compiled, CompiledKernel):
            return None
        names = list(jit_fn.arg_names)
        params = jit_fn.signature.parameters
        full = list(args)
        for name in names[len(args):]:
            if name in consts:
                full.append(consts[name])
            elif params[name].default is not inspect.Parameter.empty:
                full.append(params[name].default)
            else:
                return None
        if len(full) != len(names):
            return None
        for i in slots.values():
            full[i] = None  # filled on every launch; no tensor of the first call is kept alive
        return LaunchPlan(compiled, tuple(grid) + (1,) * (3 - len(grid)), full, dict(slots), dict(consts))

    def launch(self, **swap) -> None:
        """Launch with the slots named in `swap` set (every slot must be given)."""
        a = list(self.args)
        for name, i in self.slots.items():
            a[i] = swap[name]
        self.compiled[self.grid](*a)
