"""Pieces every exporter shares: how a format is described and how a refusal reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch

from ..formats import Format


def describe(fmt: Format) -> str:
    bs = "per channel" if fmt.block_size is None else f"block_size={fmt.block_size}"
    zero = ", float zero" if fmt.zero == "float" else ""
    return f"{fmt.family}/{fmt.element}, {bs}, {fmt.scale_dtype} scale{zero}"


def refusal(target: str, name: str, fmt: Format, why: str, exact: Iterable[str]) -> ValueError:
    """The error for a layer whose format `target` cannot hold exactly, naming the exact choices."""
    return ValueError(
        f"layer {name!r}: lowbit format {fmt.name!r} ({describe(fmt)}) cannot be exported to {target} "
        f"exactly: {why}. Formats that export exactly (no re-quantization): {', '.join(exact)}; "
        "re-quantize this layer with one of them, or keep it float (recipe format 'none')"
    )


def same_entry(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    """Whether two collected tensors, ("f", float tensor) or ("q", QTensor), hold the same values
    (used to drop an output head tied to the embedding)."""
    if a[0] != b[0]:
        return False
    if a[0] == "f":
        return a[1].shape == b[1].shape and torch.equal(a[1].detach().cpu(), b[1].detach().cpu())
    qa, qb = a[1], b[1]
    pa, pb = qa.planes, qb.planes
    return (qa.fmt == qb.fmt and qa.shape == qb.shape and set(pa) == set(pb)
            and all(torch.equal(pa[k].cpu(), pb[k].cpu()) for k in pa))


def collect(model: torch.nn.Module) -> tuple[dict[str, tuple[str, Any]], dict[str, str]]:
    """(HF tensor name -> ("q", QTensor) | ("f", float tensor), module path -> type of the Linear /
    Embedding layers kept float). Quantized modules contribute their QTensor once as `.weight`."""
    from ..nn.modules import QuantLinear, _QuantWeight

    out: dict[str, tuple[str, Any]] = {}
    float_layers: dict[str, str] = {}
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, _QuantWeight):
            out[prefix + "weight"] = ("q", mod.qweight)
            if isinstance(mod, QuantLinear) and mod.bias is not None:
                out[prefix + "bias"] = ("f", mod.bias)
            continue
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and mname:
            float_layers[mname] = type(mod).__name__
        for pname, p in mod.named_parameters(recurse=False):
            out[prefix + pname] = ("f", p)
    return out, float_layers


def usual_permissions(path: str | os.PathLike) -> None:
    """Give an exported file (or every file and folder under an exported folder) the mode a plain
    write would: 0666 / 0777 less the umask. Temporary files from `tempfile` are 0600, so a file
    renamed into place from one would stay unreadable to the other users (a llama.cpp server
    running as its own user).

    Example:
        >>> import tempfile
        >>> fd, p = tempfile.mkstemp(); os.close(fd); usual_permissions(p)
        >>> oct(os.stat(p).st_mode & 0o777) == oct(0o666 & ~_umask())
        True
    """
    mask = _umask()
    path = Path(path)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in items:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask
