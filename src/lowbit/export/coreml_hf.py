"""Core ML export of Hugging Face transformers: trace a thin, mask-free wrapper, not the HF forward.

Why a wrapper: transformers 5 builds attention masks with ops coremltools 9 cannot convert
(`torch.diff` in packed-sequence detection, `new_ones`, `int` on traced sizes), even with an explicit
attention_mask or torch.export. The wrapper calls the model's own submodules (embeddings, decoder /
encoder layers, norms, head) and feeds them what the HF forward would have built:

    decoder-only (Llama family: llama, mistral, qwen2, qwen3)
        inputs  input_ids (1, S) int32
        static  causal mask (1, 1, S, S): 0 on and below the diagonal, fp32 min above (what HF's
                eager mask holds), rotary cos/sin (1, S, head_dim) from the model's own rotary_emb
                at positions 0..S-1, both precomputed in torch for the longest S and sliced to the
                input's length (constants when S is fixed)
        output  logits (1, S, vocab)  (no KV cache: each call recomputes the S positions; pad on
                the right, causality makes the padded tail invisible to earlier positions)
    encoder (BERT family: bert)
        inputs  input_ids (1, S) int32, attention_mask (1, S) int32 (1 = token, 0 = padding)
        mask    (1 - attention_mask) * fp32 min, broadcast to (1, 1, 1, S)
        outputs last_hidden_state (1, S, hidden), pooler_output (1, hidden) when the model has a pooler

Attention runs HF's "eager" implementation (matmul + softmax), which coremltools converts; the
wrapper is checked against the unwrapped HF model (its own attention and mask code, same dense
weights) on random tokens before tracing, and the export is refused if they disagree.

Weights: the quantized layers (QuantLinear and QuantEmbedding: the gather reads a constexpr-
decompressed table) become constexpr ops built from lowbit's planes, see `coreml.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .coreml import _ct, check_target, convert_with_constexpr, dense_copy, layer_table, plan_coreml, save_atomic

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ENCODER_TYPES = ("bert",)
SUPPORTED = DECODER_TYPES + ENCODER_TYPES


class DecoderLogits(nn.Module):
    """input_ids (1, S) -> logits (1, S, vocab) for a Llama-family `*ForCausalLM`, static mask and rotary.

    Example:
        >>> import transformers
        >>> cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        >>> w = DecoderLogits(transformers.LlamaForCausalLM(cfg).eval(), max_len=8)
        >>> w(torch.zeros(1, 5, dtype=torch.long)).shape
        torch.Size([1, 5, 256])
    """

    def __init__(self, model: nn.Module, max_len: int):
        super().__init__()
        base = model.model
        self.embed_tokens, self.layers, self.norm = base.embed_tokens, base.layers, base.norm
        self.lm_head = model.lm_head
        hidden = model.config.hidden_size
        # tables one longer than needed: torch.export would otherwise specialize S == table length
        n = max_len + 1
        pos = torch.arange(n).unsqueeze(0)
        with torch.no_grad():
            cos, sin = base.rotary_emb(torch.zeros(1, n, hidden), position_ids=pos)
        self.register_buffer("cos", cos.float(), persistent=False)
        self.register_buffer("sin", sin.float(), persistent=False)
        # additive causal mask as HF's eager path builds it: 0 where a query may look, fp32 min elsewhere
        mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
        self.register_buffer("mask", mask[None, None], persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]  # a constant when exported with a fixed length, a slice bound when flexible
        cos, sin, mask = self.cos[:, :s], self.sin[:, :s], self.mask[:, :, :s, :s]
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
        return self.lm_head(self.norm(h))


class EncoderHidden(nn.Module):
    """(input_ids, attention_mask) (1, S) -> (last_hidden_state[, pooler_output]) for a BERT-family model.

    Example:
        >>> import transformers
        >>> cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                               intermediate_size=64, vocab_size=100)
        >>> w = EncoderHidden(transformers.BertModel(cfg).eval())
        >>> [t.shape for t in w(torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))]
        [torch.Size([1, 8, 32]), torch.Size([1, 32])]
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.embeddings, self.layers = model.embeddings, model.encoder.layer
        self.pooler = getattr(model, "pooler", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        # positions 0..S-1 computed from an input (not an arange constant), so coremltools cannot fold
        # the position-embedding gather into a plain const and lose the table to substitute
        ones = attention_mask * 0 + 1
        pos = torch.cumsum(ones, dim=1) - 1
        h = self.embeddings(input_ids=input_ids, token_type_ids=ones * 0, position_ids=pos)
        ext = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.layers:
            h = layer(h, ext)
        return h if self.pooler is None else (h, self.pooler(h))


def _hf_reference(model: nn.Module, kind: str, ids: torch.Tensor, mask: torch.Tensor | None):
    with torch.no_grad():
        if kind == "decoder":
            return (model(input_ids=ids, use_cache=False).logits,)
        out = model(input_ids=ids, attention_mask=mask)
        return (out.last_hidden_state,) + ((out.pooler_output,) if getattr(model, "pooler", None) is not None else ())


def _set_eager(model: nn.Module) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = "eager"


def wrap_hf(float_model: nn.Module, seq_len: int, seed: int = 0) -> tuple[nn.Module, tuple, list[str], list[str], dict]:
    """The traceable wrapper for a float HF model, its example inputs, input and output names, and
    how far it is from the HF forward on random tokens ({"max_abs_diff", "max_abs_ref"}).

    Sets the model to eager attention (after running the HF reference with its own attention).
    Raises ValueError for architectures without a wrapper, or when the wrapper disagrees with HF."""
    cfg = getattr(float_model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED:
        raise ValueError(f"Core ML export of Hugging Face model_type {mtype!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED)}); pass a plain nn.Module and example_inputs "
                         "to lowbit.export.export_coreml instead")
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_pos}; pass seq_len <= {max_pos}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    window = getattr(cfg, "sliding_window", None) if mtype in DECODER_TYPES else None
    if window and seq_len > window and getattr(cfg, "use_sliding_window", True) is not False:
        raise ValueError(f"seq_len {seq_len} exceeds the model's sliding_window {window} (Mistral-style local "
                         f"attention), which the Core ML wrapper's plain causal mask does not apply; pass seq_len <= {window}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=g)
    if mtype in DECODER_TYPES:
        if not hasattr(float_model, "lm_head") or not hasattr(getattr(float_model, "model", None), "rotary_emb"):
            raise ValueError(f"{type(float_model).__name__}: Core ML export needs the *ForCausalLM class "
                             "(model.model.rotary_emb and lm_head)")
        ref = _hf_reference(float_model, "decoder", ids, None)
        _set_eager(float_model)
        wrapper, example = DecoderLogits(float_model, seq_len).eval(), (ids,)
        in_names, out_names = ["input_ids"], ["logits"]
    else:
        if not (hasattr(float_model, "embeddings") and hasattr(float_model, "encoder")):
            raise ValueError(f"{type(float_model).__name__}: Core ML export supports the base BertModel only; "
                             "export its `.bert` submodule (task heads are not traced)")
        mask = torch.ones(1, seq_len, dtype=torch.long)
        mask[0, seq_len - max(1, seq_len // 4):] = 0  # padding on the right: the mask path is exercised
        ref = _hf_reference(float_model, "encoder", ids, mask)
        _set_eager(float_model)
        wrapper, example = EncoderHidden(float_model).eval(), (ids, mask)
        in_names = ["input_ids", "attention_mask"]
        out_names = ["last_hidden_state"] + (["pooler_output"] if wrapper.pooler is not None else [])
    with torch.no_grad():
        got = wrapper(*example)
    got = got if isinstance(got, tuple) else (got,)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, ref))
    scale = max(float(b.abs().max()) for b in ref)
    check = {"max_abs_diff": diff, "max_abs_ref": scale}
    if not diff <= 1e-4 * max(scale, 1.0):
        raise ValueError(f"the Core ML wrapper for {mtype} disagrees with the Hugging Face forward "
                         f"(max |diff| {diff:.3g} vs max |ref| {scale:.3g}); this architecture is not supported")
    return wrapper, example, in_names, out_names, check


def export_coreml_hf(
    model: nn.Module,
    out_path: str | os.PathLike,
    *,
    seq_len: int = 128,
    flexible: bool = False,
    force: bool = False,
    minimum_deployment_target: Any = None,
) -> dict[str, Any]:
    """Export a quantized Hugging Face model (Llama family or BERT) to an `.mlpackage` (iOS18 /
    macOS15), weights as constexpr ops built from lowbit's planes, sequence length fixed to `seq_len`
    (pad on the right), or any length 2..`seq_len` with `flexible=True` (a `ct.RangeDim` input, default
    `seq_len`). Compute is fp32 so that the weights stay exactly lowbit's values; the Neural Engine
    computes in fp16 only, so Core ML runs these models on CPU / GPU.

    Returns {"path", "tensors" (layer -> representation), "weights", "wrapper_check", "size"}.

    Example:
        >>> model = lowbit.load("out/smollm2-int4")                                     # doctest: +SKIP
        >>> export_coreml_hf(model, "out/smollm2-int4.mlpackage", seq_len=64)["size"]   # doctest: +SKIP
    """
    ct = _ct()
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise FileExistsError(f"{out_path} exists; pass force=True (--force) to overwrite it")
    target = check_target(minimum_deployment_target)
    plan = plan_coreml(model)  # refuse before any tracing
    float_model, dense = dense_copy(model, plan)
    wrapper, example, in_names, out_names, check = wrap_hf(float_model, seq_len)
    # torch.export, not jit.trace: it turns the size arithmetic of HF's attention code (rotate_half,
    # repeat_kv) into constants or symbolic shapes, which coremltools' TorchScript path mis-converts
    # (aten::Int of a 1-element array)
    dyn = None
    length: Any = seq_len
    if flexible:
        if seq_len < 3:
            raise ValueError(f"flexible export needs seq_len >= 3, got {seq_len}")
        dim = torch.export.Dim("seq", min=2, max=seq_len)
        dyn = tuple({1: dim} for _ in example)
        length = ct.RangeDim(2, seq_len, default=seq_len)
    with torch.no_grad():
        traced = torch.export.export(wrapper, example, dynamic_shapes=dyn).run_decompositions({})
    inputs = [ct.TensorType(name=n, shape=(1, length), dtype=np.int32) for n in in_names]
    outputs = [ct.TensorType(name=n) for n in out_names]
    # only the layers the wrapper reaches are traced (all of them for the supported families)
    mlmodel = convert_with_constexpr(traced, inputs, outputs, dense, plan.weights, target)
    save_atomic(mlmodel, out_path, force)
    size = package_size(out_path, plan)
    shape = f"2..{seq_len}" if flexible else str(seq_len)
    summary = [
        f"{type(model).__name__}: inputs {', '.join(f'{n} (1, {shape}) int32' for n in in_names)} -> "
        f"{', '.join(out_names)}; iOS18 / macOS15, fp32 compute",
        f"wrapper vs Hugging Face forward (dense weights, random tokens): max |diff| {check['max_abs_diff']:.3g} "
        f"(max |value| {check['max_abs_ref']:.3g})",
        f"{size['quantized_weights']:,} quantized weights: lowbit {size['lowbit_bits']:.3f} bits/weight, Core ML "
        f"{size['coreml_bits']:.3f} (fp32 scales) = {size['coreml_quantized_bytes'] / 2**20:.1f} MiB; "
        f"weight.bin {size['weight_bin_bytes'] / 2**20:.1f} MiB with the float tensors",
    ]
    return {"path": str(out_path), "tensors": layer_table(plan), "weights": plan.weights,
            "wrapper_check": check, "size": size, "summary": summary}


def package_size(path: str | os.PathLike, plan: Any) -> dict[str, float]:
    """Bytes of the package's weight file against the bits/weight lowbit reports for the same layers.

    lowbit_bits / coreml_bits are averaged over the quantized weights (tied layers counted once);
    Core ML stores scales as fp32 (exactness: fp16 x int products would round), so coreml_bits is a
    little above lowbit's for fp16-scaled formats."""
    from .common import same_entry

    wbin = Path(path) / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    seen, numel, lb, cb = [], 0, 0.0, 0.0
    for name, mod in plan.quant:
        qt = mod.qweight
        if any(same_entry(("q", q), ("q", qt)) for q in seen):
            continue
        seen.append(qt)
        w = plan.weights[name]
        numel += qt.numel
        lb += qt.nbytes * 8
        cb += w.storage_bits * qt.numel + 8 * w.extra_bytes
    return {"weight_bin_bytes": wbin.stat().st_size, "quantized_weights": numel,
            "lowbit_bits": lb / max(numel, 1), "coreml_bits": cb / max(numel, 1),
            "coreml_quantized_bytes": cb / 8}
