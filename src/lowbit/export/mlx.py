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

`export_mlx` writes whole models for the model types in `MLX_MODEL_TYPES` (each checked to load in
mlx-lm and match lowbit's logits), with config.json carrying the RoPE keys mlx-lm reads
(`mlx_lm_config`: transformers 5 keeps them only under "rope_parameters", which mlx-lm ignores).
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
from .common import refusal, usual_permissions
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


# model_type -> the RoPE types whose mlx-lm implementation computes what transformers computes.
# Each entry was checked by loading a tiny exported model with mlx-lm 0.32 and comparing its logits
# with lowbit's (tests/test_export_mlx.py). llama / mistral / qwen2 / qwen3 build their RoPE with
# mlx_lm.models.rope_utils.initialize_rope; phi3 reads only "longrope"/"su"/"linear" scaling and
# wants a long_factor even for "linear", and its longrope always applies long_factor where
# transformers applies short_factor up to original_max_position_embeddings, so phi3 is default only;
# gemma / gemma2 read rope_theta alone.
_INITIALIZE_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
MLX_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "llama": _INITIALIZE_ROPE_TYPES,
    "mistral": _INITIALIZE_ROPE_TYPES,  # mlx-lm runs mistral with its llama module
    "qwen2": _INITIALIZE_ROPE_TYPES,
    "qwen3": _INITIALIZE_ROPE_TYPES,
    "phi3": ("default",),
    "gemma": ("default",),
    "gemma2": ("default",),
}
# mlx-lm's gemma / gemma2 always use the embedding as the output head (they have no lm_head)
_HEAD_IS_EMBEDDING = ("gemma", "gemma2")
# mlx-lm's modules for these attend over the whole context, where transformers applies the config's
# sliding_window always (mistral, gemma2) or when use_sliding_window is set (qwen2, qwen3)
_WINDOW_ALWAYS, _WINDOW_IF_ENABLED = ("mistral", "gemma2"), ("qwen2", "qwen3")
# why a model type people export is not in MLX_MODEL_TYPES (added to the refusal)
_UNSUPPORTED_WHY = {
    "gpt2": "mlx-lm's gpt2 module transposes the Conv1D weights it loads (which would scramble packed "
            "quantized rows) and expects tensor names without the 'transformer.' prefix",
    "gpt_neox": "mlx-lm's gpt_neox module reads rotary_emb_base / rotary_pct, renames every tensor and "
                "hard-codes a 4 x hidden MLP",
}


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
# config.json as mlx-lm reads it
# ==============================================================================================
def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings of an HF config dict: transformers 5 keeps them only under
    "rope_parameters"; transformers 4 had top-level "rope_theta" / "rope_scaling"."""
    params = config.get("rope_parameters")
    if params is None:
        params = {"rope_theta": config.get("rope_theta"), **(config.get("rope_scaling") or {})}
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", None) or "default")
    return params


def _check_rope(model_type: str, rope: dict[str, Any]) -> None:
    """Raise ValueError unless mlx-lm's `model_type` module computes this RoPE as transformers does."""
    rope_type = rope["rope_type"]
    allowed = MLX_MODEL_TYPES[model_type]
    if rope_type not in allowed:
        raise ValueError(
            f"MLX export: mlx-lm's {model_type!r} model does not compute rope_type {rope_type!r} as transformers "
            f"does (it handles {', '.join(allowed)} for {model_type}), so the exported model would run a different "
            "RoPE. mlx-lm has no equivalent: keep this model as a lowbit package (lowbit.load), or export it with "
            "--to coreml, whose wrapper takes the rotary tables from transformers (Llama-family models)")
    if rope_type == "yarn":
        # mlx-lm's YarnRoPE has no attention_factor / truncate, and applies mscale alone where
        # transformers ignores it unless mscale_all_dim is set too: only yarn without these was checked
        extra = sorted(k for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k) is not None)
        if rope.get("truncate") is False:
            extra.append("truncate")
        if extra:
            raise ValueError(
                f"MLX export: rope_type 'yarn' with {', '.join(extra)} set is computed differently by mlx-lm "
                "(its YarnRoPE supports factor, original_max_position_embeddings, beta_fast and beta_slow only); "
                "keep this model as a lowbit package, or export it with --to coreml")
    if rope.get("partial_rotary_factor", 1.0) != 1.0 and model_type != "phi3":
        raise ValueError(f"MLX export: mlx-lm's {model_type!r} model rotates the whole head, but this config has "
                         f"partial_rotary_factor={rope['partial_rotary_factor']}; keep this model as a lowbit "
                         "package, or export it with --to coreml")


def mlx_lm_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """An HF config dict rewritten with the keys mlx-lm reads, and notes on what mlx-lm ignores.

    mlx-lm's ModelArgs read top-level ``rope_theta`` / ``rope_scaling`` (and phi3
    ``partial_rotary_factor``), and silently fall back to their own defaults (rope_theta 10000 for
    llama, 1e6 for qwen2) when those are missing, which is what transformers 5's ``to_dict()`` gives:
    the RoPE then lives only under ``rope_parameters``. Those are written from ``rope_parameters``
    (kept as well); ``rope_scaling`` is None for the default RoPE, else the scaling entries with both
    ``rope_type`` and ``type`` (phi3 reads ``type``).

    Raises ValueError, before anything is written, for a model type not in `MLX_MODEL_TYPES` or a
    RoPE that mlx-lm computes differently from transformers (see `_check_rope`).

    Example:
        >>> cfg = {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}
        >>> out, notes = mlx_lm_config(cfg)
        >>> out["rope_theta"], out["rope_scaling"]
        (100000.0, None)
    """
    model_type = config.get("model_type")
    if model_type not in MLX_MODEL_TYPES:
        why = _UNSUPPORTED_WHY.get(model_type)
        raise ValueError(
            f"MLX export supports the model types {', '.join(MLX_MODEL_TYPES)} (checked to load and run in mlx-lm), "
            f"not {model_type!r}" + (f": {why}" if why else "")
            + f". For a {model_type} model in MLX, convert the float checkpoint with mlx_lm.convert (MLX's own "
            "quantization: lowbit's planes are not carried over), or keep it as a lowbit package (lowbit.load)")
    out = dict(config)
    rope = _rope_parameters(config)
    if isinstance(rope.get("rope_theta"), dict) or rope.get("rope_theta") is None:
        raise ValueError(f"MLX export: cannot read rope_theta from this {model_type} config "
                         f"(rope_parameters={config.get('rope_parameters')!r}); mlx-lm needs one global RoPE")
    _check_rope(model_type, rope)
    out["rope_theta"] = float(rope["rope_theta"])
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    out["rope_scaling"] = None if rope["rope_type"] == "default" else {**scaling, "type": rope["rope_type"]}
    if "partial_rotary_factor" in rope:
        out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    notes = []
    window = config.get("sliding_window")
    if window and (model_type in _WINDOW_ALWAYS
                   or (model_type in _WINDOW_IF_ENABLED and config.get("use_sliding_window"))):
        notes.append(f"sliding_window={window} is not applied by mlx-lm's {model_type} model: "
                     f"its outputs match up to {window} tokens of context")
    return out, notes


def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    """The dotted name of `module` inside `model`, or None."""
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _drop_tied_head(model: torch.nn.Module, entries: dict[str, tuple[str, Any]],
                    float_layers: dict[str, str], config: dict[str, Any], notes: list[str]) -> None:
    """Drop the output head when it is tied to the input embedding and holds the same values.

    The names come from the model's own get_input_embeddings / get_output_embeddings (not a fixed
    "model.embed_tokens"), so any architecture's tied head is recognised. A head tied in the
    config but quantized differently from the embedding is kept and the config untied.
    """
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = _module_name(model, get_in() if get_in else None)
    head = _module_name(model, get_out() if get_out else None)
    if head is None or f"{head}.weight" not in entries:
        config["tie_word_embeddings"] = True  # no separate head: mlx-lm must read the embedding
        return
    if not config.get("tie_word_embeddings") or emb is None or f"{emb}.weight" not in entries:
        if config.get("model_type") in _HEAD_IS_EMBEDDING:
            raise ValueError(f"MLX export: this {config['model_type']} model has an untied output head {head!r}, "
                             f"but mlx-lm's {config['model_type']} model always reads the embedding as its head; "
                             "keep it as a lowbit package, or convert the float checkpoint with mlx_lm.convert")
        config["tie_word_embeddings"] = False  # explicit: mlx-lm's llama defaults to tied
        return
    if _same(entries[f"{head}.weight"], entries[f"{emb}.weight"]):
        del entries[f"{head}.weight"]
        float_layers.pop(head, None)
        return
    if config.get("model_type") in _HEAD_IS_EMBEDDING:
        raise ValueError(f"MLX export: {head} is tied to {emb} but quantized differently, and mlx-lm's "
                         f"{config['model_type']} model has no separate output head; quantize both with the same "
                         "format (lowbit quantizes a tied pair once when both are in the recipe)")
    config["tie_word_embeddings"] = False
    notes.append(f"tied {head} differs from {emb} (quantized differently): written untied")


# ==============================================================================================
# model export
# ==============================================================================================
def export_mlx(model_or_pkg_path: Any, out_dir: str | os.PathLike, *, force: bool = False,
               exact_scales: bool = False) -> dict[str, Any]:
    """Write a quantized Hugging Face causal LM (or a lowbit package folder) as an mlx-lm folder.

    Writes, atomically (a temporary sibling folder renamed into place):
        model.safetensors   quantized layers as `<path>.weight` (uint32) / `.scales` / `.biases`,
                            float tensors as fp16 or fp32 (bf16 widened to fp32)
        config.json         the model's HF config with the RoPE keys mlx-lm reads (`mlx_lm_config`:
                            top-level rope_theta / rope_scaling), plus mlx-lm's ``"quantization"`` (and the
                            ``"quantization_config"`` copy mlx-lm writes): the most common
                            {"group_size", "bits", "mode"} at top level, ``{path: {...}}`` for
                            layers that differ and ``{path: False}`` for Linear/Embedding layers
                            kept float
        tokenizer files     copied from the package, when it has them

    `exact_scales=True` writes affine scales and biases as fp32 (the same values, widened): MLX
    computes `scales * q + biases` in the scales' dtype, so only then does `mx.dequantize` of
    the file equal lowbit's dequantized planes bit for bit (at +1 bit/weight for groups of 32).
    With the default fp16 arrays it equals them up to fp16 rounding of that arithmetic.

    Model types: those in `MLX_MODEL_TYPES` (llama, mistral, qwen2, qwen3, phi3, gemma, gemma2), each checked to
    load in mlx-lm and match lowbit's logits; others are refused before anything is written.

    A tied output head (the model's get_output_embeddings) is dropped when it equals the input
    embedding; a tied head quantized differently is written and ``tie_word_embeddings`` set to false.

    Returns {"path", "tensors": {name: {"lowbit_format", "mlx", "shape", "exact"}},
    "quantization", "tokenizer_files", "notes"}.

    Raises:
        FileExistsError: `out_dir` exists and force is False.
        ValueError: a layer's format has no exact MLX layout (names the layer and alternatives),
            the model has no Hugging Face config, its model type is not in `MLX_MODEL_TYPES`, or
            its RoPE is one mlx-lm computes differently (names the rope type).

    Example:
        >>> import tempfile, lowbit, transformers
        >>> m = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
        ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=128, rope_theta=1e5))
        >>> _ = lowbit.quantize(m, "int4", progress=False)
        >>> out = Path(tempfile.mkdtemp()) / "mlx"
        >>> info = export_mlx(m, out)
        >>> cfg = json.loads((out / "config.json").read_text())
        >>> cfg["rope_theta"], cfg["quantization"]["bits"]
        (100000.0, 4)
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
    config, notes = mlx_lm_config(cfg.to_dict())  # refuses an unsupported model / RoPE up front
    config.pop("quantization_config", None)

    entries, float_layers = _collect(model)
    _drop_tied_head(model, entries, float_layers, config, notes)

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
        usual_permissions(tmp)
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
