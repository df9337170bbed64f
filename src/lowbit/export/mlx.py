"""MLX / mlx-lm export that carries lowbit's planes across without re-quantization.

MLX's quantized layers hold, per weight of shape (rows, cols) and group size G:

    affine  weight uint32 (rows, cols * bits / 32), scales, biases (rows, cols / G)
            w = scales * code + biases; bits 2, 3, 4, 6, 8; G in 32, 64, 128
    mxfp4   weight uint32 (E2M1 codes), scales uint8 (E8M0), G = 32, no biases
    mxfp8   weight uint32 (E4M3 codes), scales uint8 (E8M0), G = 32, no biases

MLX packs codes little-endian into uint32 words, code 0 in the lowest bits (checked against
`mx.quantize` for 2, 3, 4, 6 and 8 bits); that is lowbit's per-row byte packing read as
little-endian uint32, so the packed bytes move as they are. Exact mappings (`EXACT_FORMATS`):

    int4-asym, int2, any int/zero="float"   affine, biases = the zero plane
    int4 (symmetric, offset-8 codes)        affine, biases = -8 * scale  (a power-of-two multiple:
                                            exact in the scale dtype unless it overflows)
    int8 with a block size (two's compl.)   affine, codes = q + 128, biases = -128 * scale
    q4_0 / q4_1 / q8_0                      as int4 / int4-asym / int8 block 32
    mxfp4, gguf-mxfp4                       mxfp4 (lowbit's E8M0 bytes, never recomputed)
    mxfp8-e4m3                              mxfp8

Scales may be fp16, bf16 or fp32 (bf16 planes are written widened to fp32, which is exact) with
block size 32, 64 or 128. The stored scale/bias/exponent values are exactly lowbit's. MLX does
its affine arithmetic in the scales' dtype: with the arrays widened to float32 (exact),
`mx.dequantize` equals `QTensor.dequantize()` bit for bit; with the fp16 arrays as written (what
mlx-lm runs), the result is that value up to fp16 rounding of MLX's own arithmetic (mxfp4/mxfp8
decode exactly as stored). Everything else (E8M0 scales on int formats,
per-channel scales, other block sizes, fp6 / e5m2 / mxint8 elements, palettes, padded rows) is
refused with a `ValueError` naming the layer and the formats that do export.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..formats import Format, QTensor
from .common import refusal
from .common import collect as _collect
from .common import same_entry as _same

AFFINE_GROUP_SIZES = (32, 64, 128)
AFFINE_BITS = (2, 3, 4, 6, 8)

EXACT_FORMATS: tuple[str, ...] = (
    "int4-asym", "int2", "int4", "mxfp4", "mxfp8-e4m3", "q4_0", "q4_1", "q8_0", "gguf-mxfp4",
    "int8 with block_size=32/64/128",
    "any 'int' format with block_size 32/64/128 and fp16/bf16/fp32 scales",
)


def _refuse(name: str, fmt: Format, why: str) -> ValueError:
    return refusal("MLX", name, fmt, why, EXACT_FORMATS)


def mlx_params_of(fmt: Format) -> dict[str, Any] | None:
    """{"group_size", "bits", "mode"} of the MLX layout `fmt` maps to exactly, or None (see `_why_not`)."""
    return None if _why_not(fmt) else _params(fmt)


def _params(fmt: Format) -> dict[str, Any]:
    if fmt.family == "mx" or (fmt.family == "gguf" and fmt.element == "mxfp4"):
        mode = "mxfp8" if fmt.element == "fp8_e4m3" else "mxfp4"
        return {"group_size": 32, "bits": 8 if mode == "mxfp8" else 4, "mode": mode}
    bits = 8 if fmt.element == "q8_0" else 4 if fmt.family == "gguf" else fmt.bits
    return {"group_size": fmt.block_size if fmt.family == "int" else 32, "bits": bits, "mode": "affine"}


def _why_not(fmt: Format) -> str | None:
    """Why `fmt` has no exact MLX layout, or None when it has one."""
    if fmt.family == "lut":
        return "MLX has no palettized (lookup-table) layers"
    if fmt.family == "gguf":
        return None if fmt.scale_dtype in ("fp16", "e8m0") else f"its scale dtype is {fmt.scale_dtype}"
    if fmt.family == "mx":
        if fmt.element not in ("fp4_e2m1", "fp8_e4m3"):
            return f"MLX's microscaling modes are mxfp4 (E2M1) and mxfp8 (E4M3), not {fmt.element}"
        if fmt.block_size != 32:
            return f"MLX's mx modes use blocks of 32, not {fmt.block_size}"
        return None
    # family "int"
    if fmt.block_size is None:
        return f"MLX groups hold {'/'.join(map(str, AFFINE_GROUP_SIZES))} values; per-channel scales have no group size"
    if fmt.block_size not in AFFINE_GROUP_SIZES:
        return f"MLX groups hold {'/'.join(map(str, AFFINE_GROUP_SIZES))} values, not {fmt.block_size}"
    if fmt.scale_dtype == "e8m0":
        return "MLX's affine scales are float arrays and its mxfp4 mode has E2M1, not integer, elements (E8M0-scaled ints have no MLX layout)"
    if fmt.bits not in AFFINE_BITS:
        return f"MLX has no {fmt.bits}-bit affine layout"
    return None


def _float_np(p: torch.Tensor) -> np.ndarray:
    """fp16 stays fp16, bf16 / fp32 become fp32 (exact widening; numpy has no bfloat16)."""
    p = p.detach().cpu().contiguous()
    return p.numpy() if p.dtype in (torch.float16, torch.float32) else p.to(torch.float32).numpy()


def qtensor_to_mlx(qt: QTensor, name: str = "tensor", exact_scales: bool = False) -> dict[str, Any]:
    """MLX quantized arrays of `qt`, moved across without re-rounding.

    Returns {"weight": uint32 (rows, cols*bits/32), "scales": fp16/fp32 (affine) or uint8 E8M0
    (mx modes), "biases": like scales (affine only), "bits", "group_size", "mode"}, such that
    ``mx.dequantize(weight, scales, biases, group_size=, bits=, mode=, dtype=mx.float32)`` equals
    ``qt.dequantize()`` exactly (affine: with scales and biases passed as float32, since MLX
    computes in the scales' dtype).

    Raises ValueError naming `name`, the format and the exact alternatives when `qt` cannot be
    expressed exactly (including a symmetric layer whose -2^(bits-1) * scale bias overflows).

    Example:
        >>> import torch, lowbit
        >>> a = qtensor_to_mlx(lowbit.quantize_tensor(torch.randn(4, 64), "int4-asym"))
        >>> a["weight"].shape, a["weight"].dtype.name, a["bits"], a["group_size"]
        ((4, 8), 'uint32', 4, 32)
    """
    fmt = qt.fmt
    why = _why_not(fmt)
    if why:
        raise _refuse(name, fmt, why)
    if len(qt.shape) != 2:
        raise ValueError(f"layer {name!r}: MLX export takes 2-D quantized weights, got shape {qt.shape}")
    params = _params(fmt)
    rows, cols = qt.shape
    if qt.padded_cols != cols:
        raise _refuse(name, fmt, f"its row length {cols} is not a multiple of {params['group_size']} (MLX has no padded groups)")
    planes = {k: v.detach().cpu().contiguous() for k, v in qt.planes.items()}
    data = planes["data"].numpy().astype(np.uint8, copy=False)
    out: dict[str, Any] = dict(params)
    if params["mode"] != "affine":
        out["scales"] = planes["scale"].numpy().astype(np.uint8, copy=False)
    else:
        bits = params["bits"]
        scale = planes["scale"]
        if scale.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise _refuse(name, fmt, f"its scale plane is {scale.dtype}")
        if "zero" in planes:  # affine: w = code * scale + zero, MLX's convention as it is
            bias = planes["zero"].to(scale.dtype)
        else:  # symmetric: w = (code - 2^(bits-1)) * scale
            if bits == 8:
                data = data ^ np.uint8(0x80)  # two's-complement q -> q + 128
            bias = scale * -float(1 << (bits - 1))  # power-of-two multiple: exact unless it overflows
            if not bool(torch.isfinite(bias[torch.isfinite(scale)]).all()):
                raise _refuse(name, fmt, f"-{1 << (bits - 1)} * scale overflows {scale.dtype} (a scale is too large for "
                              "the bias MLX needs); use scale_dtype='fp32' or an affine format such as int4-asym")
        if exact_scales:  # fp32 arrays: MLX's arithmetic (done in the scales' dtype) is then exact
            scale, bias = scale.to(torch.float32), bias.to(torch.float32)
        out["scales"] = _float_np(scale)
        out["biases"] = _float_np(bias)
    if data.shape[1] % 4:
        raise _refuse(name, fmt, f"its packed row of {data.shape[1]} bytes is not a whole number of uint32 words")
    out["weight"] = np.ascontiguousarray(data).view("<u4").astype(np.uint32, copy=False)
    return out


# ==============================================================================================
# model export
# ==============================================================================================
def export_mlx(model_or_pkg_path: Any, out_dir: str | os.PathLike, *, force: bool = False,
               exact_scales: bool = False) -> dict[str, Any]:
    """Write a quantized Hugging Face causal LM (or a lowbit package folder) as an mlx-lm folder.

    Writes, atomically (a temporary sibling folder renamed into place):
        model.safetensors   quantized layers as `<path>.weight` (uint32) / `.scales` / `.biases`,
                            float tensors as fp16 or fp32 (bf16 widened to fp32)
        config.json         the model's HF config plus mlx-lm's ``"quantization"`` (and the
                            ``"quantization_config"`` copy mlx-lm writes): the most common
                            {"group_size", "bits", "mode"} at top level, ``{path: {...}}`` for
                            layers that differ and ``{path: False}`` for Linear/Embedding layers
                            kept float
        tokenizer files     copied from the package, when it has them

    `exact_scales=True` writes affine scales and biases as fp32 (the same values, widened): MLX
    computes `scales * q + biases` in the scales' dtype, so only then does `mx.dequantize` of
    the file equal lowbit's dequantized planes bit for bit (at +1 bit/weight for groups of 32).
    With the default fp16 arrays it equals them up to fp16 rounding of that arithmetic.

    A tied output head is dropped when it equals the embedding; a tied head quantized
    differently is written as ``lm_head`` and ``tie_word_embeddings`` is set to false.

    Returns {"path", "tensors": {name: {"lowbit_format", "mlx", "shape", "exact"}},
    "quantization", "tokenizer_files", "notes"}.

    Raises:
        FileExistsError: `out_dir` exists and force is False.
        ValueError: a layer's format has no exact MLX layout (names the layer and alternatives),
            or the model has no Hugging Face config.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if os.path.lexists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} exists; pass force=True (CLI: --force) to replace it")

    pkg_dir: Path | None = None
    if isinstance(model_or_pkg_path, (str, os.PathLike)):
        from .. import package

        pkg_dir = Path(model_or_pkg_path)
        model = package.load(pkg_dir)
    else:
        model = model_or_pkg_path
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise ValueError(f"MLX export needs a Hugging Face model with a config; got {type(model).__name__}")
    config = cfg.to_dict()
    config.pop("quantization_config", None)
    notes: list[str] = []

    entries, float_layers = _collect(model)
    if config.get("tie_word_embeddings") and "lm_head.weight" in entries and "model.embed_tokens.weight" in entries:
        if _same(entries["lm_head.weight"], entries["model.embed_tokens.weight"]):
            del entries["lm_head.weight"]
            float_layers.pop("lm_head", None)
        else:
            config["tie_word_embeddings"] = False
            notes.append("tied lm_head differs from embed_tokens (quantized differently): written untied")

    # convert everything before touching the disk: a refusal leaves nothing behind
    arrays: dict[str, np.ndarray] = {}
    table: dict[str, dict[str, Any]] = {}
    layer_params: dict[str, dict[str, Any]] = {}
    for name, (kind, t) in entries.items():
        if kind == "q":
            path = name[: -len(".weight")]
            conv = qtensor_to_mlx(t, name=path, exact_scales=exact_scales)
            params = {k: conv[k] for k in ("group_size", "bits", "mode")}
            layer_params[path] = params
            arrays[f"{path}.weight"] = conv["weight"]
            arrays[f"{path}.scales"] = conv["scales"]
            if "biases" in conv:
                arrays[f"{path}.biases"] = conv["biases"]
            table[name] = {"lowbit_format": t.fmt.name, "mlx": params, "shape": list(t.shape), "exact": True}
        else:
            arrays[name] = np.ascontiguousarray(_float_np(t))
            table[name] = {"lowbit_format": "float", "mlx": str(arrays[name].dtype), "shape": list(t.shape), "exact": True}

    quant: dict[str, Any] | None = None
    if layer_params:
        counts = Counter(tuple(sorted(p.items())) for p in layer_params.values())
        default = dict(counts.most_common(1)[0][0])
        quant = {"group_size": default["group_size"], "bits": default["bits"], "mode": default["mode"]}
        for path, p in layer_params.items():
            if p != default:
                quant[path] = dict(p)
        for path in float_layers:
            if f"{path}.weight" in arrays:
                quant[path] = False
        config["quantization"] = quant
        config["quantization_config"] = quant

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    copied: list[str] = []
    try:
        tmp.mkdir()
        save_file(arrays, str(tmp / "model.safetensors"), metadata={"format": "mlx", "producer": "lowbit"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str), encoding="utf-8")
        if pkg_dir is not None:
            from ..package import TOKENIZER_FILES

            for f in (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "merges.txt",
                      "generation_config.json", "chat_template.jinja"):
                if (pkg_dir / f).is_file():
                    shutil.copyfile(pkg_dir / f, tmp / f)
                    copied.append(f)
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        if os.path.lexists(out_dir):  # force
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out_dir), "tensors": table, "quantization": quant, "tokenizer_files": copied, "notes": notes}
