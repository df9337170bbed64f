import hashlib
import os

import pytest
import torch

from lowbit.models import BUNDLED, LoadedSource, bundled_models, load_source

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hf_folder_roundtrip(tmp_path):
    model = _tiny_llama()
    model.save_pretrained(tmp_path, safe_serialization=True)
    src = load_source(tmp_path)
    assert isinstance(src, LoadedSource)
    assert src.kind == "causal_lm" and src.name == tmp_path.name and src.tokenizer is None
    assert not src.model.training
    weights = tmp_path / "model.safetensors"
    assert src.source_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert {os.path.basename(f) for f in src.config_files} == {"config.json", "generation_config.json"}
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, src.model(ids).logits)


def test_a_causal_lm_not_named_for_causal_lm_keeps_its_head(tmp_path):
    """GPT-2's folder names `GPT2LMHeadModel`: a causal LM (transformers' causal-LM mapping), loaded
    with its head; before, it came back as the headless GPT2Model, "embedding", with no note. A
    task class that is not a causal LM still loads as the base model, with the note."""
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64)).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    src = load_source(tmp_path / "gpt2")
    ids = torch.randint(0, 128, (1, 9))
    assert src.kind == "causal_lm" and type(src.model).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        assert torch.equal(src.model(ids).logits, gpt2(ids).logits)
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                  vocab_size=128, max_position_embeddings=64)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "mlm")
    src = load_source(tmp_path / "mlm")
    assert src.kind == "embedding" and type(src.model).__name__ == "BertModel"
    assert any("BertForMaskedLM" in n and "task-head weights were left out" in n for n in src.notes)


def test_pickled_only_folder_refused(tmp_path):
    _tiny_llama().config.save_pretrained(tmp_path)
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="(?s)pickle.*safetensors"):
        load_source(tmp_path)
    with pytest.raises(ValueError, match="pickle"):
        load_source(tmp_path / "pytorch_model.bin")


def test_missing_path_and_unknown_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_source(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        load_source("./does/not/exist.gguf")
    for bad in ("not-a-model", 42, None):
        with pytest.raises(ValueError, match="smollm2.*minilm"):
            load_source(bad)


def test_module_passthrough():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    src = load_source(lin)
    assert src.model is lin and not lin.training
    assert (src.kind, src.name, src.source_path, src.source_sha256, src.config_files) == \
        ("module", "Sequential", None, None, [])
    assert load_source(_tiny_llama()).kind == "causal_lm"


def test_bundled_listing():
    rows = bundled_models()
    assert [r["name"] for r in rows] == list(BUNDLED) == ["smollm2", "minilm"]
    assert all(isinstance(r["installed"], bool) and r["package"] for r in rows)


@pytest.mark.slow
def test_smollm2():
    src = load_source("smollm2")  # ~20 s: transformers parses and dequantizes the GGUF
    assert src.kind == "causal_lm" and src.config_files == [] and src.source_path.endswith(".gguf")
    assert any("Q4_1" in n and "optimistic" in n for n in src.notes)
    assert any("tied" in n for n in src.notes)
    assert getattr(src.model.config, "quantization_config", None) is None  # config saves as plain dense
    tok = src.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = src.model(**ids).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    assert "Paris" in tok.decode(logits[0, -1].argmax())


@pytest.mark.slow
def test_minilm():
    src = load_source("minilm")
    assert src.kind == "embedding" and src.name == "minilm"
    names = {os.path.relpath(f, src.source_path) for f in src.config_files}
    assert {"config.json", "vocab.txt", "modules.json", os.path.join("1_Pooling", "config.json")} <= names
    batch = src.tokenizer(["A man is playing a guitar.", "Someone is playing the guitar.",
                           "The stock market fell sharply today."], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = src.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (3, 384)
    para, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert para > 0.7 and para > unrelated + 0.3
