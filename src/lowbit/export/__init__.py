"""Exporters that carry lowbit's planes into other runtimes' files without re-quantizing."""

from .api import TARGETS, export
from .coreml import EXACT_PRESETS as COREML_EXACT_PRESETS
from .coreml import export_coreml, qtensor_to_coreml_op_inputs
from .coreml_eval import evaluate_mlpackage
from .coreml_hf import export_coreml_hf
from .mlx import export_mlx, qtensor_to_mlx
from .gguf import EXACT_PRESETS, export_gguf, qtensor_to_gguf_bytes

__all__ = ["export", "TARGETS", "export_gguf", "qtensor_to_gguf_bytes", "EXACT_PRESETS", "export_coreml",
           "qtensor_to_coreml_op_inputs", "COREML_EXACT_PRESETS",
           "export_coreml_hf", "evaluate_mlpackage", "export_mlx", "qtensor_to_mlx"]
