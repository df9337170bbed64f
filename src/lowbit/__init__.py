"""lowbit: make large models small and fast without losing them.

    >>> import torch, lowbit
    >>> qt = lowbit.quantize_tensor(torch.randn(128, 256), "int4-e8m0")
    >>> qt.bits_per_weight
    4.25
"""

__version__ = "0.1.0"  # before the imports: pipeline reads it

from .formats import PRESETS, Format, NonFiniteError, QTensor, dequantize, quantize_tensor
from .quantize import QuantReport, quantize
from .recipe import Recipe, RecipeError
from .validate import ValidationResult, validate
from .profile import ProfileResult, profile  # noqa: E402  (function shadows the submodule on purpose)
from .pipeline import ThresholdError, run
from . import models  # noqa: E402  (lowbit.models.load_source; imports transformers lazily)



def __getattr__(name: str):
    # the package layer pulls in safetensors I/O; load it on first use
    if name in ("save", "load", "inspect", "PackageError"):
        from . import package

        return getattr(package, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


__all__ = ["Format", "QTensor", "PRESETS", "quantize_tensor", "dequantize", "NonFiniteError",
           "quantize", "QuantReport", "Recipe", "RecipeError", "validate", "ValidationResult", "profile", "ProfileResult", "run", "ThresholdError", "inspect", "PackageError", "save", "load", "__version__"]
