"""Core ML export of Hugging Face transformers (Llama family, BERT): the .mlpackage loads (spec only,
Linux), every constexpr op read back from it decompresses (coremltools' own reference) to lowbit's
dequantized planes exactly, the weight file matches the bits/weight, and the traced wrapper
reproduces the Hugging Face forward."""

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

try:
    import coremltools as ct
except Exception as e:  # pragma: no cover
    print(f"skipping Core ML HF export tests: coremltools unavailable ({e})")
    pytest.skip(f"coremltools unavailable ({e})", allow_module_level=True)

import lowbit
from lowbit import cli
from lowbit.export import export
from lowbit.export.coreml_eval import evaluate_mlpackage
from lowbit.nn.modules import QuantEmbedding, QuantLinear
from tiny_models import tiny_llama

# exports reproduce the stored weights in fp32: compared with the reference path, not the CPU bf16 kernels
pytestmark = pytest.mark.usefixtures("reference_linear")


def tiny_bert(pooler: bool = True) -> torch.nn.Module:
    """A 2-layer BertModel: hidden 64, 4 heads, vocab 300, 64 positions, seeded weights."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=300, max_position_embeddings=64)
    return transformers.BertModel(cfg, add_pooling_layer=pooler).eval()


def _key(a: np.ndarray) -> tuple:
    return a.shape, hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def _blob_bytes(val: np.ndarray) -> int:
    """Bytes of one const as the weight file stores it (sub-byte dtypes packed)."""
    from coremltools.converters.mil.mil import types

    bits = types.builtin_to_string(types.numpy_type_to_builtin_type(val.dtype))
    nbits = int("".join(c for c in bits if c.isdigit()) or 32) if bits not in ("bool",) else 8
    return (val.size * nbits + 7) // 8


def read_back(path: Path, model: torch.nn.Module) -> dict:
    """Load the package (no Core ML runtime on Linux: skip_model_load), convert its spec back to a MIL
    program, decompress every constexpr op that feeds a compute op, and match it to a lowbit layer."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.models.utils import _convert_model_spec_to_pymil_prog

    ml = ct.models.MLModel(str(path), skip_model_load=True)
    assert ml.get_spec().specificationVersion >= 9  # iOS18 / macOS15
    prog = _convert_model_spec_to_pymil_prog(ml, ml.get_spec().specificationVersion, milproto_load)
    ops = list(prog.functions["main"].operations)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    deq = {n: m.qweight.dequantize().numpy() for n, m in quant.items()}
    by_key: dict = {}
    for n, w in deq.items():
        by_key.setdefault(_key(w), []).append(n)
    roots = [op for op in ops if op.op_type.startswith("constexpr_")
             and any(not c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops)]
    matched, consumers = set(), Counter()
    for op in roots:
        val = op.materialized_val_inference()  # coremltools' decompression of the stored inputs
        names = by_key.get(_key(val))
        assert names, f"constexpr op {op.name} decompresses to no lowbit layer's dequantized weight"
        np.testing.assert_array_equal(val, deq[names[0]])
        matched.update(names)
        consumers.update(c.op_type for c in op.outputs[0].child_ops)
    assert matched == set(quant), sorted(set(quant) - matched)
    # no dense fp32 copy of a quantized weight left in the program
    consts = [op.outputs[0].val for op in ops if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)]
    assert not any(v.dtype == np.float32 and _key(v) in by_key for v in consts)
    wbin = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    blobs = [v for v in consts if v.size > 10]  # small consts are stored inline in the program
    return {"roots": roots, "consumers": consumers, "weight_bin": wbin.stat().st_size,
            "blob_bytes": sum(_blob_bytes(v) for v in blobs), "n_blobs": len(blobs)}


def _check_size(rb: dict, result: dict) -> None:
    # the weight file is every stored const (codes packed at 4/8 bits, fp32 scales, float tensors)
    # plus a 64-byte header and 64-byte alignment per blob
    assert rb["blob_bytes"] <= rb["weight_bin"] <= rb["blob_bytes"] + 128 * (rb["n_blobs"] + 1), rb
    assert result["size"]["weight_bin_bytes"] == rb["weight_bin"]


def test_llama_int4_exports_exactly(tmp_path):
    m = tiny_llama(tie=True)
    lowbit.quantize(m, "int4", progress=False)  # int4 blocks of 32, embeddings (tied head) int8
    out = tmp_path / "llama.mlpackage"
    r = export(m, "coreml", out, seq_len=16)
    assert r["wrapper_check"]["max_abs_diff"] <= 1e-5 * r["wrapper_check"]["max_abs_ref"]
    rb = read_back(out, m)
    # the tied embedding / lm_head: one constexpr table read by the gather and by the head's linear
    assert rb["consumers"]["gather"] == 1 and rb["consumers"]["linear"] == 2 * 7 + 1
    assert len(rb["roots"]) == 2 * 7 + 1
    _check_size(rb, r)
    # the program read back from disk, evaluated in numpy (coremltools' op definitions), vs lowbit's own model
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    got = evaluate_mlpackage(out, {"input_ids": ids.numpy()})["logits"]
    with torch.no_grad():
        ref = m(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    t = r["tensors"]
    assert t["model.embed_tokens"]["target"] == "shift_scale int8 -> gather"
    assert t["lm_head"]["target"] == "shift_scale int8 -> linear (tied: model.embed_tokens's table)"
    assert t["model.layers.0.mlp.down_proj"]["target"] == "shift_scale int4 -> linear"
    # Core ML keeps scales in fp32 (an fp16 x int product would round): +0.5 bit per weight at block 32
    assert (t["model.layers.0.mlp.down_proj"]["lowbit_bits"], t["model.layers.0.mlp.down_proj"]["coreml_bits"]) == (4.5, 5.0)
    with pytest.raises(FileExistsError, match="--force"):
        export(m, "coreml", out, seq_len=16)
    assert ct.models.MLModel(str(out), skip_model_load=True).get_spec().description.input[0].type.multiArrayType.shape == [1, 16]


def test_bert_lut_and_padding_mask_export_exactly(tmp_path):
    m = tiny_bert()
    lowbit.quantize(m, "lut4", progress=False)  # 4-bit palettes per 16 rows, embeddings int8
    out = tmp_path / "bert.mlpackage"
    r = export(m, "coreml", out, seq_len=16)
    # the check runs a right-padded attention mask through both the wrapper and HF's own mask code
    assert r["wrapper_check"]["max_abs_diff"] <= 1e-5 * r["wrapper_check"]["max_abs_ref"]
    rb = read_back(out, m)
    assert rb["consumers"]["gather"] == 2  # word and position embeddings (token types stay float)
    assert rb["consumers"]["linear"] == 2 * 6 + 1
    assert r["tensors"]["encoder.layer.0.intermediate.dense"]["target"] == "lut_to_dense u4 -> linear"
    assert r["tensors"]["embeddings.token_type_embeddings"]["lowbit_format"] == "float"
    _check_size(rb, r)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[0, 10:] = 0
    got = evaluate_mlpackage(out, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask)
    for k in ("last_hidden_state", "pooler_output"):
        want = getattr(ref, k).numpy()
        np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=k)
    spec = ct.models.MLModel(str(out), skip_model_load=True).get_spec()
    assert [i.name for i in spec.description.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in spec.description.output] == ["last_hidden_state", "pooler_output"]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])  # mistral: same modules as llama
def test_other_llama_family_decoders(tmp_path, family):
    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    torch.manual_seed(0)
    m = cls[1](cls[0](hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=256)).eval()
    lowbit.quantize(m, "w4-mx", progress=False)  # int4 with E8M0 scales
    out = tmp_path / f"{family}.mlpackage"
    export(m, "coreml", out, seq_len=8)
    read_back(out, m)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    got = evaluate_mlpackage(out, {"input_ids": ids.numpy()})["logits"]
    with torch.no_grad():
        ref = m(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_flexible_length(tmp_path, kind):
    """--flexible: one package for every length 2..seq_len (ct.RangeDim), evaluated at three lengths."""
    m = tiny_llama() if kind == "llama" else tiny_bert()
    lowbit.quantize(m, "int4", progress=False)
    out = tmp_path / f"{kind}.mlpackage"
    export(m, "coreml", out, seq_len=24, flexible=True)
    read_back(out, m)
    shape = ct.models.MLModel(str(out), skip_model_load=True).get_spec().description.input[0].type.multiArrayType
    assert [(r.lowerBound, r.upperBound) for r in shape.shapeRange.sizeRanges] == [(1, 1), (2, 24)]
    g = torch.Generator().manual_seed(4)
    for s in (2, 7, 24):
        ids = torch.randint(0, m.config.vocab_size, (1, s), generator=g)
        with torch.no_grad():
            if kind == "llama":
                got = evaluate_mlpackage(out, {"input_ids": ids.numpy()})["logits"]
                ref = m(input_ids=ids).logits.numpy()
            else:
                mask = torch.ones(1, s, dtype=torch.long)
                mask[0, -1] = 0
                got = evaluate_mlpackage(out, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["last_hidden_state"]
                ref = m(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=f"length {s}")


def test_refuses_inexact_formats_and_unsupported_models(tmp_path):
    m = tiny_llama()
    lowbit.quantize(m, "mxfp4", progress=False)
    out = tmp_path / "x.mlpackage"
    with pytest.raises(ValueError, match=r"^14 layer\(s\) cannot be exported to Core ML exactly: layer 'model.layers.0.self_attn.q_proj'"
                                         r".*mxfp4.*alternatives: int8, int4.*also refused: 'model.layers.0.self_attn.k_proj'.*, 3 more$") as e:
        export(m, "coreml", out, seq_len=8)
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.iterdir())
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).eval()
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported \(supported: llama, mistral, qwen2, qwen3, bert\)"):
        export(gpt2, "coreml", out, seq_len=8)
    torch.manual_seed(0)
    cls = transformers.BertForSequenceClassification(tiny_bert().config).eval()
    with pytest.raises(ValueError, match=r"BertForSequenceClassification: .*base BertModel only.*`\.bert`"):
        export(cls, "coreml", out, seq_len=8)
    with pytest.raises(ValueError, match="seq_len 65 exceeds the model's max_position_embeddings 64"):
        export(tiny_bert(), "coreml", out, seq_len=65)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=100, sliding_window=16)).eval()
    with pytest.raises(ValueError, match="seq_len 24 exceeds the model's sliding_window 16.*pass seq_len <= 16"):
        export(mistral, "coreml", out, seq_len=24)  # before: "this architecture is not supported"
    with pytest.raises(ValueError, match="iOS18"):
        export(tiny_bert(), "coreml", out, seq_len=8, minimum_deployment_target=ct.target.iOS17)


def test_cli_prints_table_and_refuses_overwrite(tmp_path, capsys):
    m = tiny_llama()
    lowbit.quantize(m, "int4", progress=False)
    pkg = lowbit.save(m, tmp_path / "pkg")
    out = tmp_path / "m.mlpackage"
    assert cli.main(["export", str(pkg), "--to", "coreml", "-o", str(out), "--seq-len", "8"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.up_proj" in text and "shift_scale int4" in text and "max |diff|" in text
    assert cli.main(["export", str(pkg), "--to", "coreml", "-o", str(out), "--seq-len", "8"]) == 1
    assert "exists" in capsys.readouterr().err


def _bundled(name: str):
    try:
        return lowbit.models.load_source(name)
    except ModuleNotFoundError as e:
        pytest.skip(f"bundled model not installed: {e}")


@pytest.mark.slow
def test_smollm2_int4_exports_exactly(tmp_path):
    """The bundled SmolLM2 (real config, 49152 x 576 tied embedding) cut to 2 of its 30 blocks to keep
    the test short; the full model exports the same way (see README, Deploy)."""
    src = _bundled("smollm2")
    model = src.model
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    lowbit.quantize(model, "int4", progress=False)
    out = tmp_path / "smollm2.mlpackage"
    r = export(model, "coreml", out, seq_len=32)
    assert r["wrapper_check"]["max_abs_diff"] <= 1e-5 * r["wrapper_check"]["max_abs_ref"]
    rb = read_back(out, model)
    assert rb["consumers"]["gather"] == 1 and rb["consumers"]["linear"] == 2 * 7 + 1  # tied head shares the table
    _check_size(rb, r)
    # int4 / int8 blocks of 32 with fp16 scales in lowbit; the same codes with fp32 scales in Core ML
    assert r["size"]["coreml_bits"] - r["size"]["lowbit_bits"] == pytest.approx(0.5)
    ids = src.tokenizer("Core ML runs this on an iPhone. " * 6, return_tensors="pt").input_ids[:, :32]
    got = evaluate_mlpackage(out, {"input_ids": ids.numpy()})["logits"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_minilm_int8_exports_exactly(tmp_path):
    src = _bundled("minilm")
    model = src.model
    lowbit.quantize(model, "int8", progress=False)
    out = tmp_path / "minilm.mlpackage"
    r = export(model, "coreml", out, seq_len=32)
    assert r["wrapper_check"]["max_abs_diff"] <= 1e-5 * r["wrapper_check"]["max_abs_ref"]
    rb = read_back(out, model)
    assert rb["consumers"]["gather"] == 2 and rb["consumers"]["linear"] == 6 * 6 + 1
    _check_size(rb, r)
    # int8 in blocks of 32 with fp16 scales: 8.5 bits in lowbit, 9.0 in Core ML (fp32 scales)
    assert (r["size"]["lowbit_bits"], r["size"]["coreml_bits"]) == (8.5, 9.0)
    enc = src.tokenizer("A sentence for the on-device embedding model.", return_tensors="pt",
                        padding="max_length", max_length=32)
    got = evaluate_mlpackage(out, {"input_ids": enc.input_ids.numpy(), "attention_mask": enc.attention_mask.numpy()})
    with torch.no_grad():
        ref = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state.numpy()
    np.testing.assert_allclose(got["last_hidden_state"], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
