"""`lowbit.export.export(pkg, to=...)`: one entry point for the three targets.

Example:
    >>> from lowbit.export import export
    >>> export("out/smollm2-q4_0", to="gguf", out="out/smollm2-q4_0.gguf")   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TARGETS = ("gguf", "mlx", "coreml")


class _LogitsOnly(torch.nn.Module):
    """A Hugging Face model seen as input_ids -> logits (no KV cache), for tracing."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # an explicit all-ones mask keeps transformers off its packed-sequence detection (torch.diff,
        # which coremltools cannot convert)
        out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


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

        model = package.load(pkg) if isinstance(pkg, (str, Path)) else pkg
        example = kwargs.pop("example_inputs", None)
        if example is None:
            cfg = getattr(model, "config", None)
            if cfg is None or not hasattr(cfg, "vocab_size"):
                raise ValueError("Core ML export traces the model: pass example_inputs= (a tuple of tensors)")
            example = (torch.zeros(1, 8, dtype=torch.long),)
            model = _LogitsOnly(model)  # tracing needs tensors out, not a ModelOutput with a cache
        layers = export_coreml(model, out, example, force=force, **kwargs)
        return {"path": str(out), "tensors": {n: {"lowbit_format": w.description, "target": w.op, "exact": True}
                                             for n, w in layers.items()}}
    raise ValueError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")
