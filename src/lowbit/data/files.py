"""User data files for calibration / evaluation: text, JSONL, .npy, safetensors.

Outside files are checked before use: `.npy` is read with `allow_pickle=False`; safetensors go
through lowbit's validating reader when the package layer is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def load_data_file(path: str | Path, field: str = "text") -> list[str] | torch.Tensor:
    """Texts (from .txt: paragraphs; .jsonl: the `field` of each line) or a tensor (.npy, .safetensors).

    Example:
        >>> load_data_file("prompts.jsonl")  # doctest: +SKIP
        ['first prompt', 'second prompt']
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".txt", ".md"):
        paras = [s.strip() for s in p.read_text(encoding="utf-8").split("\n\n")]
        return [s for s in paras if s]
    if suffix == ".jsonl":
        out = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise ValueError(f"{p}:{i}: expected an object with a string field {field!r}")
            out.append(rec[field])
        return out
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{p}: refused ({e}); lowbit never unpickles data") from None
        return torch.from_numpy(np.ascontiguousarray(arr))
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(p))
        if not tensors:
            raise ValueError(f"{p}: holds no tensors")
        return tensors.get("input", next(iter(tensors.values())))
    raise ValueError(f"{p}: unsupported data file type {suffix!r}; use .txt, .jsonl, .npy or .safetensors")
