"""Exporters that carry lowbit's planes into other runtimes' files without re-quantizing."""

from .gguf import EXACT_PRESETS, export_gguf, qtensor_to_gguf_bytes

__all__ = ["export_gguf", "qtensor_to_gguf_bytes", "EXACT_PRESETS"]
