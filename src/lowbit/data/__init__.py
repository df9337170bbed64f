"""Calibration and evaluation data: the built-in corpus and user files."""

from .corpus import builtin_texts, lm_sequences, require_tokenizer, sentences
from .files import load_data_file

__all__ = ["builtin_texts", "lm_sequences", "require_tokenizer", "sentences", "load_data_file"]
