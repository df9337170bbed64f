"""Format family -> handler module (encode planes from fp32, decode planes to fp32).

A handler module has:
    encode(w, fmt, **options) -> dict[str, Tensor]   w: finite fp32 (rows, padded_cols), contiguous
    decode(planes, fmt, rows, padded_cols) -> Tensor  fp32 (rows, padded_cols)
`decode` is the definition of what the planes mean; kernels and exporters are tested against it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_FAMILY_MODULES = {"int": "linear", "mx": "mx", "lut": "palette", "gguf": "gguf"}


def handler(family: str) -> ModuleType:
    try:
        module = _FAMILY_MODULES[family]
    except KeyError:
        raise ValueError(f"no handler for format family {family!r}; known: {sorted(_FAMILY_MODULES)}") from None
    return importlib.import_module(f"lowbit.formats.{module}")
