"""Where models come from: bundled short names, Hugging Face folders, GGUF files, modules.

    >>> from lowbit.models import load_source
    >>> src = load_source("minilm")          # doctest: +SKIP
    >>> src.kind, src.name                # doctest: +SKIP
    ('embedding', 'minilm')

transformers is imported only when something is actually loaded, so importing this
package stays cheap.
"""

from .sources import BUNDLED, LoadedSource, bundled_models, is_causal_lm_class, load_source

__all__ = ["BUNDLED", "LoadedSource", "bundled_models", "is_causal_lm_class", "load_source"]
