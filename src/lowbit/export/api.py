"""`lowbit.export.export(pkg, to=...)`: one entry point for the three targets.

Example:
    >>> from lowbit.export import export
    >>> export("out/smollm2-q4_0", to="gguf", out="out/smollm2-q4_0.gguf")   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


TARGETS = ("gguf", "mlx", "coreml")


def export(pkg: str | Path, to: str, out: str | Path, *, force: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Export a saved package to `to` ("gguf", "mlx" or "coreml") at `out`; returns the exporter's
    per-layer table. Formats a target cannot hold exactly are refused, naming the exact alternatives."""
    if to == "gguf":
        from .gguf import export_gguf

        return export_gguf(pkg, out, force=force, **kwargs)
    if to == "mlx":
        from .mlx import export_mlx

        return export_mlx(pkg, out, force=force, **kwargs)
    if to == "coreml":
        from .. import package
        from .coreml import export_coreml
        from .coreml_hf import export_coreml_hf

        model = package.load(pkg) if isinstance(pkg, (str, Path)) else pkg
        example = kwargs.pop("example_inputs", None)
        if example is None:
            if getattr(getattr(model, "config", None), "model_type", None) is None:
                raise ValueError("Core ML export traces the model: pass example_inputs= (a tuple of tensors)")
            return export_coreml_hf(model, out, force=force, **kwargs)  # HF transformer: mask-free wrapper
        return export_coreml(model, out, example, force=force, **kwargs)
    raise ValueError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")
