"""GGUF export of the bundled SmolLM2: gguf-py reads it back, and every tensor decodes to lowbit's values."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import lowbit  # noqa: E402
from lowbit.export import export_gguf  # noqa: E402
from lowbit.export.gguf import gguf_tensor_name, llama_permute_index  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    try:
        src = lowbit.models.load_source("smollm2")
    except ModuleNotFoundError as e:
        pytest.skip(f"bundled model not installed: {e}")
    tmp = tmp_path_factory.mktemp("gguf")
    lowbit.quantize(src.model, "gguf-q4_0", progress=False)
    pkg = lowbit.save(src.model, tmp / "pkg", tokenizer=src.tokenizer)
    out = export_gguf(pkg, tmp / "smollm2-q4_0.gguf", tokenizer_pre="smollm")
    return src, out


@pytest.mark.slow
def test_smollm2_q4_0_exports_and_reads_back_exactly(exported):
    src, out = exported
    model, cfg = src.model, src.model.config
    reader = gguf.GGUFReader(out["path"])
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied head: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert tensors["blk.29.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    checked = 0
    for name, mod in model.named_modules():
        if not hasattr(mod, "qweight") or getattr(mod, "_lowbit_name", name) == "lm_head":
            continue
        gname = gguf_tensor_name(name + ".weight")
        t = tensors[gname]
        ours = mod.qweight.dequantize().numpy()
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        if gname.endswith("attn_q.weight"):
            ours = ours[llama_permute_index(ours.shape[0], n_head)]
        elif gname.endswith("attn_k.weight"):
            ours = ours[llama_permute_index(ours.shape[0], n_kv)]
        np.testing.assert_array_equal(theirs, ours, err_msg=gname)
        checked += 1
    assert checked == 1 + 7 * cfg.num_hidden_layers
    fields = reader.fields
    assert int(fields["llama.block_count"].parts[-1][0]) == cfg.num_hidden_layers
    assert len(fields["tokenizer.ggml.tokens"].data) >= len(src.tokenizer)


@pytest.mark.slow
def test_llama_cpp_greedy_generation_matches_lowbit(request):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding (llama-cpp-python) is not installed here")
    src, out = request.getfixturevalue("exported")
    prompt = "The capital of France is"
    ids = src.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ours = src.model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=src.tokenizer.eos_token_id)
    ours = ours[0, ids["input_ids"].shape[1]:].tolist()
    llm = llama_cpp.Llama(model_path=out["path"], n_ctx=256, verbose=False)
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    theirs = []
    for tok in llm.generate(tokens, temp=0.0, top_k=1):
        theirs.append(tok)
        if len(theirs) == len(ours):
            break
    # llama.cpp computes in its own kernels (q8 activations): the first tokens must agree
    assert theirs[:4] == ours[:4], (theirs, ours)
