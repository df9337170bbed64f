"""Kernel modules compiled for one mode: the GPU (Triton JIT) or, under TRITON_INTERPRET=1, Triton's
interpreter on CPU tensors.

Triton fixes the mode of a `@triton.jit` function when it is decorated, so every kernels file gets
one copy per mode, loaded from its path under its own module name. Kernel files that share
`@triton.jit` helpers take them from here too (`kernel_module("triton_split_k")`), so the helpers
always run in the mode of the kernel calling them.

Example:
    >>> from lowbit.kernels.triton_modes import kernel_module          # doctest: +SKIP
    >>> kernel_module("triton_gemv")._gemv_fast_kernel                  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

_MODULES: dict[tuple[str, bool], object] = {}


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_module(module: str):
    """The kernels file `module` (a name in this folder, without `.py`) loaded for the current mode;
    one copy per (file, mode), reused."""
    interp = interpreting()
    mod = _MODULES.get((module, interp))
    if mod is None:
        name = f"lowbit.kernels._{module}_" + ("interp" if interp else "jit")
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{module}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _MODULES[(module, interp)] = mod
    return mod
