"""The built-in English corpus: Python's own documentation text (`pydoc_data.topics`).

It ships with every CPython, so calibration and evaluation need no download. Topics are split
deterministically by a hash of their name into disjoint parts: about 20% `eval`, 80% `calib`.

Example:
    >>> from lowbit.data import builtin_texts
    >>> ev, cal = builtin_texts("eval"), builtin_texts("calib")
    >>> len(ev) > 5 and not set(ev) & set(cal)
    True
"""

from __future__ import annotations

import hashlib
import re

import torch


def _is_eval(topic: str) -> bool:
    return hashlib.sha256(topic.encode()).digest()[0] % 5 == 0


def builtin_texts(split: str = "eval") -> list[str]:
    """Documentation texts of the `split` ("eval" or "calib"), in a fixed order."""
    if split not in ("eval", "calib"):
        raise ValueError(f"split must be 'eval' or 'calib', got {split!r}")
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics) if _is_eval(k) == (split == "eval")]


def require_tokenizer(src) -> None:
    """Raise a ValueError naming the fix when a loaded source has no tokenizer for the built-in corpus."""
    if getattr(src, "tokenizer", None) is None:
        where = getattr(src, "source_path", None) or getattr(src, "name", "the model")
        raise ValueError(f"{where}: no tokenizer files (tokenizer.json / tokenizer_config.json ...), and the built-in "
                         "evaluation and calibration texts need one: copy the model's tokenizer files into its folder, "
                         "or give your own data (Python: data=, token ids)")


def lm_sequences(tokenizer, texts: list[str], seq_len: int = 256, n_seqs: int = 16) -> torch.Tensor:
    """Token id sequences (n_seqs, seq_len): the texts joined by EOS, cut into equal pieces."""
    if tokenizer is None:
        raise ValueError("lm_sequences: no tokenizer: the texts cannot be turned into token ids")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= seq_len * n_seqs:
            break
    n = min(n_seqs, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def sentences(texts: list[str], n: int = 256, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Up to `n` prose sentences from `texts` (code listings and short fragments skipped)."""
    out: list[str] = []
    for t in texts:
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", t)):
            words = s.split()
            if min_words <= len(words) <= max_words and not s.startswith((">>>", "...")):
                out.append(s)
                if len(out) >= n:
                    return out
    return out
