"""Pieces every exporter shares: how a format is described and how a refusal reads."""

from __future__ import annotations

from typing import Iterable

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
