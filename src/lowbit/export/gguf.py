"""GGUF export that carries lowbit's planes across byte for byte (no re-quantization).

`qtensor_to_gguf_bytes` rearranges a `QTensor`'s planes into llama.cpp's block structs
(ggml-common.h; gguf-py's `gguf.quants` has the same layouts):

    Q8_0   fp16 d, 32 x int8 q                              w = q * d
    Q4_0   fp16 d, 16 bytes: byte j = q[j] | q[j+16] << 4    w = (q - 8) * d
    Q4_1   fp16 d, fp16 m, 16 bytes (same nibble order)      w = q * d + m
    MXFP4  E8M0 byte e, 16 bytes (same nibble order)         w = e2m1(q) * 2^(e - 127)

lowbit packs nibbles per row (two consecutive codes per byte, low nibble first); GGUF pairs code
j with code j + 16 inside each block of 32. Only bytes move; scales, zeros and codes are the
planes' own bits. Formats that map exactly (`EXACT_PRESETS`):

    q8_0, q4_0, q4_1, gguf-mxfp4      llama.cpp's own block types (bytes identical to
                                      `gguf.quants.quantize`)
    int8 with block_size=32, fp16 scale, symmetric  -> Q8_0   (int8 * fp16 d: same decode)
    int4  (block 32, fp16 scale, symmetric)         -> Q4_0   (code offset 8: same decode)
    int4-asym (block 32, fp16 scale, float zero)    -> Q4_1   (q * d + m: same decode)
    mxfp4 (block 32, E8M0 + E2M1)                   -> MXFP4  (same decode)

Everything else (other block sizes, bf16/fp32/E8M0 scales on int formats, 2/3/6/8-bit minifloats,
palettes) has no exact GGUF block type and is refused with a `ValueError`.

`export_gguf` writes a llama.cpp-loadable GGUF file (arch "llama") from a quantized
Llama-family model or a saved lowbit package. RoPE scaling goes across as llama.cpp's own converter
writes it: llama3 (Llama 3.1 / 3.2) as the `rope_freqs.weight` divisor tensor, linear and YaRN as
`llama.rope.scaling.*` keys; other rope types (dynamic, longrope, ...) are refused.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..formats import Format, QTensor
from .common import collect, refusal, usual_permissions
from .common import same_entry as _same
from ..formats.packing import unpack

QK = 32  # llama.cpp's block size for Q8_0 / Q4_0 / Q4_1 / MXFP4

# lowbit presets (and the one spelled-out variant) that export without re-rounding
EXACT_PRESETS: tuple[str, ...] = (
    "q8_0", "q4_0", "q4_1", "gguf-mxfp4", "int4", "int4-asym", "mxfp4",
    "int8 with block_size=32, scale_dtype='fp16'",
)


def _gguf():
    import gguf  # optional dependency: imported on use

    return gguf


def gguf_type_of(fmt: Format) -> str | None:
    """Name of the GGUF block type `fmt` re-expresses exactly ("Q8_0", "Q4_0", "Q4_1", "MXFP4"), or None."""
    if fmt.family == "gguf":
        return {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "mxfp4": "MXFP4"}[fmt.element]
    if fmt.block_size != QK:
        return None
    if fmt.family == "int" and fmt.scale_dtype == "fp16":
        if fmt.element == "int8" and fmt.zero == "none":
            return "Q8_0"
        if fmt.element == "int4":
            return "Q4_1" if fmt.zero == "float" else "Q4_0"
    if fmt.family == "mx" and fmt.element == "fp4_e2m1":
        return "MXFP4"
    return None


def _refuse(name: str, fmt: Format, why: str) -> ValueError:
    return refusal("GGUF", name, fmt, why, EXACT_PRESETS)


def qtensor_to_gguf_bytes(qt: QTensor, name: str = "tensor") -> tuple[np.ndarray, Any]:
    """llama.cpp block bytes of `qt`: (uint8 array (rows, nblocks * type_size), GGMLQuantizationType).

    Raises ValueError (naming `name`, the format and the exact alternatives) when `qt`'s format has
    no exact GGUF block type, or when its row length is not a multiple of 32.

    Example:
        >>> import torch, lowbit, gguf
        >>> qt = lowbit.quantize_tensor(torch.randn(4, 64), "q4_0")
        >>> raw, t = qtensor_to_gguf_bytes(qt)
        >>> raw.shape, t.name
        ((4, 36), 'Q4_0')
    """
    gguf = _gguf()
    fmt = qt.fmt
    tname = gguf_type_of(fmt)
    if tname is None:
        why = "it has no GGUF block type with the same decode"
        if fmt.family == "int" and fmt.block_size == QK and fmt.element in ("int8", "int4") and fmt.scale_dtype != "fp16":
            why = f"GGUF's {'Q8_0' if fmt.element == 'int8' else 'Q4_0/Q4_1'} scale is fp16, not {fmt.scale_dtype}"
        elif fmt.family in ("int", "mx") and fmt.block_size != QK and fmt.element in ("int8", "int4", "fp4_e2m1"):
            why = f"GGUF blocks hold {QK} values, not {fmt.block_size}"
        raise _refuse(name, fmt, why)
    if len(qt.shape) != 2:
        raise ValueError(f"layer {name!r}: GGUF export takes 2-D quantized weights, got shape {qt.shape}")
    rows, cols = qt.shape
    if cols % QK or qt.padded_cols != cols:
        raise _refuse(name, fmt, f"its row length {cols} is not a multiple of {QK} (GGUF has no padded blocks)")
    qtype = getattr(gguf.GGMLQuantizationType, tname)
    nb = cols // QK
    planes = {k: v.detach().cpu().contiguous() for k, v in qt.planes.items()}

    def fp16_bytes(p: torch.Tensor, what: str) -> torch.Tensor:
        if p.dtype != torch.float16:
            raise _refuse(name, fmt, f"its {what} plane is {p.dtype}, not float16")
        return p.reshape(rows, nb).view(torch.uint8).reshape(rows, nb, 2)

    if tname == "Q8_0":
        codes = planes["data"].reshape(rows, nb, QK)  # int8 two's-complement bytes already
        parts = [fp16_bytes(planes["scale"], "scale"), codes]
    else:
        codes = unpack(planes["data"], 4, cols).reshape(rows, nb, QK)
        qs = codes[..., : QK // 2] | (codes[..., QK // 2:] << 4)
        if tname == "Q4_0":
            parts = [fp16_bytes(planes["scale"], "scale"), qs]
        elif tname == "Q4_1":
            parts = [fp16_bytes(planes["scale"], "scale"), fp16_bytes(planes["zero"], "zero"), qs]
        else:  # MXFP4: the scale plane is the E8M0 byte
            parts = [planes["scale"].to(torch.uint8).reshape(rows, nb, 1), qs]
    raw = torch.cat(parts, dim=-1).reshape(rows, -1).numpy().astype(np.uint8, copy=False)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert block == QK and raw.shape[1] == nb * type_size
    return raw, qtype


# ==============================================================================================
# model export
# ==============================================================================================
_LAYER_MAP = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_TOP_MAP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a Hugging Face Llama tensor name, or None when it has none."""
    module, _, kind = hf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if module in _TOP_MAP:
        return f"{_TOP_MAP[module]}.{kind}"
    m = _BLOCK_RE.match(module)
    if m and m.group(2) in _LAYER_MAP:
        return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{kind}"
    return None


def llama_permute_index(rows: int, n_head: int) -> np.ndarray:
    """Row order of llama.cpp's q/k permutation (convert_hf_to_gguf `LlamaModel.permute`):
    ``permuted = w[idx]``. Whole rows move, so quantized blocks stay intact."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


# -- RoPE ----------------------------------------------------------------------------------------
# llama.cpp's llama arch reproduces these Hugging Face rope types; anything else is refused, because
# a file without the scaling would load fine and silently run plain RoPE.
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")
_YARN_BETA_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0}  # llama.cpp's (and transformers') defaults


def _rope_settings(cfg: Any) -> dict[str, Any]:
    """The model's RoPE settings as one dict with "rope_type" and "rope_theta" (None when unset).

    transformers 5 keeps everything, theta included, in `config.rope_parameters` (and no longer has a
    `config.rope_theta` attribute); older configs have `rope_theta` plus an optional `rope_scaling`
    dict whose type key was once spelled "type".
    """
    params: dict[str, Any] = {}
    for attr in ("rope_scaling", "rope_parameters"):  # later wins: rope_parameters is what v5 computes with
        value = getattr(cfg, attr, None)
        if isinstance(value, dict):
            params.update(value)
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(cfg, "rope_theta", None)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def llama3_rope_freqs(head_dim: int, theta: float, *, factor: float, low_freq_factor: float,
                      high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for Llama 3.1-style RoPE: one divisor per frequency (F32).

    llama.cpp divides each plain-RoPE frequency theta^(-2i/head_dim) by entry i. The Llama 3.1 rule:
    wavelengths shorter than original_max_position_embeddings / high_freq_factor keep their
    frequency (1), longer than original_max_position_embeddings / low_freq_factor are divided by
    `factor`, and those in between blend smoothly between the two.

    Example (Llama 3.1's settings, head_dim 16):
        >>> f = llama3_rope_freqs(16, 500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        ...                       original_max_position_embeddings=8192)
        >>> [round(float(x), 3) for x in f]
        [1.0, 1.0, 1.0, 1.0, 2.695, 8.0, 8.0, 8.0]
    """
    inv_freq = float(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    ctx = float(original_max_position_embeddings)
    smooth = (ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = 1.0 / ((1.0 - smooth) / factor + smooth)
    divisor = np.where(wavelen < ctx / high_freq_factor, 1.0,
                       np.where(wavelen > ctx / low_freq_factor, float(factor), blended))
    return divisor.astype(np.float32)


def _rope_refusal(rope_type: str, why: str) -> ValueError:
    return ValueError(
        f"GGUF export: the model's RoPE (rope_type {rope_type!r} in config.rope_parameters / rope_scaling) "
        f"{why}; llama.cpp would run it as plain RoPE and give different results. Exported rope types: "
        f"{', '.join(ROPE_TYPES)} (yarn with its default attention factor and beta_fast=32, beta_slow=1). "
        f"Fix: export a model whose config uses one of these, or convert the float checkpoint with a tool "
        f"that supports this rope type."
    )


def _require(rp: dict[str, Any], *fields: str) -> list[Any]:
    missing = [f for f in fields if rp.get(f) is None]
    if missing:
        raise _rope_refusal(rp["rope_type"], f"has no {', '.join(missing)} (add it to the config)")
    return [rp[f] for f in fields]


def _yarn_keys(rp: dict[str, Any], max_positions: int) -> dict[str, Any]:
    """rope.scaling.* values for a YaRN config that llama.cpp's llama arch reproduces exactly.

    llama.cpp reads only the type, factor and original context for this arch; it uses beta_fast 32,
    beta_slow 1, floor/ceil-truncated correction dims and the attention factor 1 + 0.1 ln(factor).
    Other values would be silently ignored, so they are refused.
    """
    (orig,) = _require(rp, "original_max_position_embeddings")
    factor = float(rp["factor"]) if rp.get("factor") is not None else max_positions / orig  # transformers' fallback
    if factor < 1:
        raise _rope_refusal("yarn", f"has factor {factor:g} < 1 (transformers then skips the attention factor, "
                                    "llama.cpp does not)")
    for name, default in _YARN_BETA_DEFAULTS.items():
        if rp.get(name) and float(rp[name]) != default:
            raise _rope_refusal("yarn", f"sets {name}={rp[name]} (llama.cpp's llama arch always uses {default:g})")
    if rp.get("truncate", True) is False:
        raise _rope_refusal("yarn", "sets truncate=False (llama.cpp always truncates the correction range)")
    # transformers' attention factor (cos/sin scale) against the one llama.cpp derives from the factor
    attn = rp.get("attention_factor")
    if attn is None and rp.get("mscale") and rp.get("mscale_all_dim"):
        def mscale(m: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * np.log(factor) + 1.0
        attn = mscale(rp["mscale"]) / mscale(rp["mscale_all_dim"])
    llama_cpp_attn = 1.0 + 0.1 * np.log(factor)
    if attn is not None and not np.isclose(attn, llama_cpp_attn, rtol=1e-6):
        raise _rope_refusal("yarn", f"has attention factor {attn:g} (llama.cpp's llama arch applies "
                                    f"1 + 0.1 ln(factor) = {llama_cpp_attn:g})")
    return {"type": "yarn", "factor": factor, "original_context_length": int(orig)}


def _rope_plan(cfg: Any, head_dim: int) -> tuple[float | None, dict[str, Any], np.ndarray | None]:
    """(freq_base, rope.scaling.* values, rope_freqs tensor or None) for the model's RoPE.

    Raises the rope refusal (before any file is written) for rope types llama.cpp cannot reproduce.
    """
    rp = _rope_settings(cfg)
    rope_type = rp["rope_type"]
    theta = None if rp["rope_theta"] is None else float(rp["rope_theta"])
    if rope_type not in ROPE_TYPES:
        raise _rope_refusal(rope_type, "has no llama.cpp equivalent for arch 'llama'")
    if rope_type == "default":
        return theta, {}, None
    if rope_type == "linear":
        (factor,) = _require(rp, "factor")
        return theta, {"type": "linear", "factor": float(factor)}, None
    if rope_type == "yarn":
        return theta, _yarn_keys(rp, int(cfg.max_position_embeddings)), None
    # llama3: no keys, a per-frequency divisor tensor (what llama.cpp's own converter writes)
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    values = dict(zip(fields, _require(rp, *fields)))
    if theta is None:
        raise _rope_refusal(rope_type, "has no rope_theta (add it to the config)")
    return theta, {}, llama3_rope_freqs(head_dim, theta, **values)


def _collect(model: torch.nn.Module) -> dict[str, tuple[str, Any]]:
    """HF tensor name -> ("q", QTensor) or ("f", float tensor)."""
    return collect(model)[0]


def export_gguf(
    model_or_pkg_path: Any,
    out_path: str | os.PathLike,
    *,
    force: bool = False,
    tokenizer: Any = None,
    tokenizer_pre: str = "default",
) -> dict[str, Any]:
    """Write a quantized Llama-family model (or a lowbit package folder) as a GGUF file.

    Quantized layers go across without re-quantization (see `qtensor_to_gguf_bytes`); float
    tensors (norms, layers kept float) are written as F32. q/k rows are permuted as llama.cpp's
    converter does (whole rows of block bytes). The tied output head is omitted when it equals the
    embedding. RoPE scaling is carried over (see `ROPE_TYPES`): llama3 as the `rope_freqs.weight`
    tensor (`llama3_rope_freqs`), linear and YaRN as `llama.rope.scaling.*` keys. The file is written
    to a temporary file and moved into place.

    Args:
        model_or_pkg_path: a `LlamaForCausalLM` (quantized by `lowbit.quantize`, or float), or the
            path of a package written by `lowbit.save`.
        out_path: the .gguf file to write.
        force: replace an existing file.
        tokenizer: a Hugging Face tokenizer to embed; defaults to the package's tokenizer.
        tokenizer_pre: llama.cpp pre-tokenizer name (`tokenizer.ggml.pre`), e.g. "smollm".

    Returns:
        {"path", "tensors": {gguf name: {"source", "lowbit_format", "gguf_type", "shape", "exact"}},
         "metadata": [keys written], "tokenizer": what was written (or why not)}.

    Raises:
        FileExistsError: `out_path` exists and force is False.
        ValueError: not a Llama model, a layer's format has no exact GGUF type (the message
            names the layer and the formats that export exactly), or the config's RoPE has no
            llama.cpp equivalent (e.g. rope_type "dynamic" or "longrope"; the message names it).
    """
    gguf = _gguf()
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise FileExistsError(f"{out_path} exists; pass force=True (CLI: --force) to replace it")

    if isinstance(model_or_pkg_path, (str, os.PathLike)):
        from .. import package

        pkg = Path(model_or_pkg_path)
        model = package.load(pkg)
        if tokenizer is None:
            tokenizer = package.load_tokenizer(pkg)
    else:
        model = model_or_pkg_path
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        raise ValueError(
            f"GGUF export supports Llama-family models (config.model_type 'llama', e.g. SmolLM2); "
            f"got {type(model).__name__} with model_type {getattr(cfg, 'model_type', None)!r}"
        )

    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_head
    # an unsupported rope type is refused here, before anything is written
    rope_theta, rope_scaling, rope_freqs = _rope_plan(cfg, head_dim)

    entries = _collect(model)
    unknown = [k for k in entries if gguf_tensor_name(k) is None]
    if unknown:
        raise ValueError(f"tensors with no llama.cpp name (not a plain Llama model?): {unknown[:8]}")
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if tied and "lm_head.weight" in entries and "model.embed_tokens.weight" in entries:
        if _same(entries["lm_head.weight"], entries["model.embed_tokens.weight"]):
            del entries["lm_head.weight"]  # llama.cpp falls back to token_embd when output is absent
    # an untied head (or a tied one quantized differently from the embedding) is written as output.weight

    # convert every tensor first: a refusal leaves no file behind
    tensors: list[tuple[str, np.ndarray, Any, Any]] = []  # gguf name, array, raw_dtype, raw_shape
    table: dict[str, dict[str, Any]] = {}
    qcount: Counter = Counter()
    for hf_name, (kind, t) in entries.items():
        gname = gguf_tensor_name(hf_name)
        perm = None
        if ".self_attn.q_proj." in hf_name:
            perm = n_head
        elif ".self_attn.k_proj." in hf_name:
            perm = n_kv
        if kind == "q":
            raw, qtype = qtensor_to_gguf_bytes(t, name=hf_name)
            if perm is not None:
                raw = raw[llama_permute_index(raw.shape[0], perm)]
            raw = np.ascontiguousarray(raw)
            tensors.append((gname, raw, qtype, None))
            qcount[qtype.name] += 1
            table[gname] = {"source": hf_name, "lowbit_format": t.fmt.name, "gguf_type": qtype.name,
                            "shape": list(t.shape), "exact": True}
        else:
            arr = t.detach().to(torch.float32).cpu().numpy()
            if perm is not None:
                arr = arr[llama_permute_index(arr.shape[0], perm)]
            arr = np.ascontiguousarray(arr)
            tensors.append((gname, arr, None, None))
            table[gname] = {"source": hf_name, "lowbit_format": "float", "gguf_type": "F32",
                            "shape": list(arr.shape), "exact": True}
    if rope_freqs is not None:  # llama3 RoPE: llama.cpp divides each frequency by its entry
        tensors.append(("rope_freqs.weight", rope_freqs, None, None))
        table["rope_freqs.weight"] = {"source": "config.rope_parameters (llama3)", "lowbit_format": "float",
                                      "gguf_type": "F32", "shape": list(rope_freqs.shape), "exact": True}

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp_name, "llama")
        meta = _write_metadata(w, cfg, n_head, n_kv, head_dim, qcount, getattr(model, "name_or_path", None),
                               rope_theta, rope_scaling)
        tok_info = _write_tokenizer(w, tokenizer, cfg, tokenizer_pre) if tokenizer is not None else {
            "written": False, "reason": "no tokenizer given and none in the package"}
        for gname, arr, raw_dtype, raw_shape in tensors:
            w.add_tensor(gname, arr, raw_shape=raw_shape, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp_name, "rb+") as f:
            os.fsync(f.fileno())
        usual_permissions(tmp_name)  # mkstemp's 0600 would stay with the file
        os.replace(tmp_name, out_path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return {"path": str(out_path), "tensors": table, "metadata": meta, "tokenizer": tok_info}


def _write_metadata(w: Any, cfg: Any, n_head: int, n_kv: int, head_dim: int, qcount: Counter,
                    name: str | None, theta: float | None, scaling: dict[str, Any]) -> list[str]:
    gguf = _gguf()
    keys = []

    def put(key: str, fn, value) -> None:
        if value is not None:
            fn(value)
            keys.append(key)

    put("general.name", w.add_name, str(getattr(cfg, "_name_or_path", None) or name or "lowbit-model").rstrip("/").split("/")[-1] or "lowbit-model")
    put("llama.context_length", w.add_context_length, int(cfg.max_position_embeddings))
    put("llama.embedding_length", w.add_embedding_length, int(cfg.hidden_size))
    put("llama.block_count", w.add_block_count, int(cfg.num_hidden_layers))
    put("llama.feed_forward_length", w.add_feed_forward_length, int(cfg.intermediate_size))
    put("llama.attention.head_count", w.add_head_count, int(n_head))
    put("llama.attention.head_count_kv", w.add_head_count_kv, int(n_kv))
    put("llama.rope.freq_base", w.add_rope_freq_base, theta)
    put("llama.attention.layer_norm_rms_epsilon", w.add_layer_norm_rms_eps, float(cfg.rms_norm_eps))
    put("llama.vocab_size", w.add_vocab_size, int(cfg.vocab_size))
    put("llama.rope.dimension_count", w.add_rope_dimension_count, int(head_dim))
    if scaling:
        put("llama.rope.scaling.type", w.add_rope_scaling_type, gguf.RopeScalingType(scaling["type"]))
        put("llama.rope.scaling.factor", w.add_rope_scaling_factor, scaling["factor"])
        put("llama.rope.scaling.original_context_length", w.add_rope_scaling_orig_ctx_len,
            scaling.get("original_context_length"))
    if head_dim != cfg.hidden_size // n_head:
        put("llama.attention.key_length", w.add_key_length, int(head_dim))
        put("llama.attention.value_length", w.add_value_length, int(head_dim))
    # file type: the most common quantized type (ALL_F32 when nothing is quantized)
    ftypes = {"Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "MXFP4": "MOSTLY_MXFP4_MOE"}
    ft = ftypes.get(qcount.most_common(1)[0][0]) if qcount else "ALL_F32"
    if ft is not None and hasattr(gguf.LlamaFileType, ft):
        put("general.file_type", w.add_file_type, int(getattr(gguf.LlamaFileType, ft)))
    put("general.quantization_version", w.add_quantization_version, gguf.GGML_QUANT_VERSION)
    return keys


def _write_tokenizer(w: Any, tok: Any, cfg: Any, pre: str) -> dict[str, Any]:
    """BPE (GPT-2 style, e.g. SmolLM2) tokenizer metadata, as convert_hf_to_gguf's `_set_vocab_gpt2`."""
    gguf = _gguf()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return {"written": False, "reason": "only fast (tokenizer.json) tokenizers are exported"}
    model_json = json.loads(backend.to_str()).get("model", {})
    if model_json.get("type") != "BPE":
        return {"written": False, "reason": f"tokenizer model {model_json.get('type')!r} is not BPE; only BPE is exported"}
    vocab = tok.get_vocab()
    n_vocab = max(int(cfg.vocab_size), max(vocab.values()) + 1)
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = getattr(tok, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(n_vocab):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            at = decoder.get(i)
            special = bool(getattr(at, "special", True)) if at is not None else True
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    merges = model_json.get("merges", [])
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    written = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
               "tokenizer.ggml.token_type"] + (["tokenizer.ggml.merges"] if merges else [])
    for attr, fn, key in (("bos_token_id", w.add_bos_token_id, "bos_token_id"),
                          ("eos_token_id", w.add_eos_token_id, "eos_token_id"),
                          ("unk_token_id", w.add_unk_token_id, "unknown_token_id"),
                          ("pad_token_id", w.add_pad_token_id, "padding_token_id")):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            fn(v)
            written.append(f"tokenizer.ggml.{key}")
    add_bos = getattr(tok, "add_bos_token", None)
    if isinstance(add_bos, bool):
        w.add_add_bos_token(add_bos)
        written.append("tokenizer.ggml.add_bos_token")
    tmpl = getattr(tok, "chat_template", None)
    if isinstance(tmpl, str) and tmpl:
        w.add_chat_template(tmpl)
        written.append("tokenizer.chat_template")
    return {"written": True, "model": "gpt2", "pre": pre, "n_tokens": len(tokens), "n_merges": len(merges),
            "keys": written}
