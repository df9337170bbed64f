"""Packages: save / load round trips, ties, atomic writes, and broken files giving clear errors.

Tiny models built from configs with random weights; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit import package, safetensors_io
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.package import PackageError

transformers = pytest.importorskip("transformers")

FORMATS = ["int8", "int4", "mxfp4", "q4_0"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def quantize(model: nn.Module, fmt: str) -> nn.Module:
    """lowbit.quantize when present; else the same swap by hand (tied weights share one QTensor)."""
    if hasattr(lowbit, "quantize"):
        lowbit.quantize(model, {"global": fmt}, progress=False)
        return model
    done: dict[int, lowbit.QTensor] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            w = mod.weight
            qt = done.get(id(w)) or lowbit.quantize_tensor(w.detach(), fmt)
            done[id(w)] = qt
            if isinstance(mod, nn.Linear):
                new = QuantLinear(qt, mod.bias)
            else:
                new = QuantEmbedding(qt, padding_idx=mod.padding_idx, dtype=w.dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def tiny_llama(tied: bool = True) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=256, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(64, 64, padding_idx=0), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


def weight_keys(pkg: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(pkg / "weights.safetensors"), "pt") as f:
        return set(f.keys())


def rewrite_header(file: Path, edit) -> None:
    """Rewrite a safetensors file with `edit(header)` applied, keeping the data section as it was."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def edit_manifest(pkg: Path, edit) -> None:
    m = json.loads((pkg / "manifest.json").read_text())
    edit(m)
    (pkg / "manifest.json").write_text(json.dumps(m))


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


@pytest.fixture
def llama_pkg(tmp_path):
    model = quantize(tiny_llama(), "int4")
    return model, package.save(model, tmp_path / "pkg")


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_llama_round_trip_bit_identical_and_tied(tmp_path, fmt):
    model = quantize(tiny_llama(), fmt)
    assert model.lm_head.weight_data is model.model.embed_tokens.weight_data
    pkg = package.save(model, tmp_path / "pkg")
    loaded = package.load(pkg, verify=True)

    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert not loaded.training
    assert isinstance(loaded.lm_head, QuantLinear) and isinstance(loaded.model.embed_tokens, QuantEmbedding)
    # tied: the same plane tensors, and stored once
    for plane in loaded.lm_head.plane_names:
        assert getattr(loaded.lm_head, f"weight_{plane}") is getattr(loaded.model.embed_tokens, f"weight_{plane}")
    keys = weight_keys(pkg)
    assert "model.embed_tokens.weight_data" in keys
    assert not any(k.startswith("lm_head.") for k in keys)
    manifest = package.read_manifest(pkg)
    assert manifest["layers"]["lm_head"]["tied_to"] == "model.embed_tokens"
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["format"]["name"] == fmt
    if hasattr(lowbit, "quantize"):
        assert loaded._lowbit_info["recipe"] == model._lowbit_info["recipe"]
        assert loaded._lowbit_info["report"] == model._lowbit_info["report"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_bert_round_trip_bit_identical(tmp_path, fmt):
    model = quantize(tiny_bert(), fmt)
    pkg = package.save(model, tmp_path / "bert")
    loaded = package.load(pkg)
    ids = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask), loaded(ids, attention_mask=mask)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)
    assert json.loads((pkg / "config.json").read_text())["model_type"] == "bert"


def test_float_tied_weights_stay_one_parameter(tmp_path):
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    pkg = package.save(model, tmp_path / "pkg")
    assert "lm_head.weight" not in weight_keys(pkg)
    loaded = package.load(pkg)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_untied_llama_keeps_both(tmp_path):
    model = quantize(tiny_llama(tied=False), "int4")
    pkg = package.save(model, tmp_path / "pkg")
    loaded = package.load(pkg)
    assert loaded.lm_head.weight_data is not loaded.model.embed_tokens.weight_data
    assert {"lm_head.weight_data", "model.embed_tokens.weight_data"} <= weight_keys(pkg)
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_plain_module_needs_a_skeleton(tmp_path):
    model = quantize(mlp(), "int4")
    pkg = package.save(model, tmp_path / "mlp")
    with pytest.raises(PackageError, match="pass model="):
        package.load(pkg)
    with torch.device("meta"):  # a skeleton without data is enough
        skeleton = mlp()
    loaded = package.load(pkg, model=skeleton)
    ids = torch.tensor([[0, 3, 5, 63]])
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert loaded[0].padding_idx == 0
    # a skeleton of another architecture is refused with names
    with pytest.raises(PackageError, match=r"does not provide \(different architecture\?\): 4.weight, 4.bias"):
        package.load(pkg, model=nn.Sequential(nn.Embedding(64, 64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64),
                                              nn.Linear(64, 64)))


def test_shared_float_module_and_buffers(tmp_path):
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model.register_buffer("steps", torch.arange(5))
    pkg = package.save(model, tmp_path / "p")
    assert weight_keys(pkg) == {"0.weight", "0.bias", "steps"}
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    skeleton.register_buffer("steps", torch.zeros(5, dtype=torch.int64, device="meta"))
    loaded = package.load(pkg, model=skeleton)
    assert loaded[0].weight is loaded[2].weight
    assert loaded.steps.tolist() == [0, 1, 2, 3, 4]
    x = torch.randn(3, 8)
    assert torch.equal(model(x), loaded(x))


def test_loaded_planes_are_memory_mapped(llama_pkg):
    _, pkg = llama_pkg
    loaded = package.load(pkg)
    tensors = [b for _, b in loaded.named_buffers() if b.dtype == torch.uint8]
    tensors += [p for p in loaded.parameters()]
    ptrs = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(ptrs) == 1, "every tensor should be a view of the one mapping"
    storage = tensors[0].untyped_storage()
    assert storage.nbytes() == (pkg / "weights.safetensors").stat().st_size
    # private copy-on-write: writing to a loaded tensor never changes the file
    before = (pkg / "weights.safetensors").read_bytes()
    loaded.model.norm.weight.data.fill_(123.0)
    assert (pkg / "weights.safetensors").read_bytes() == before


def test_open_mmap_is_lazy(tmp_path):
    psutil = pytest.importorskip("psutil")
    f = tmp_path / "big.safetensors"
    safetensors_io.write(f, {f"t{i}": torch.full((4 * 1024 * 1024,), float(i)) for i in range(8)})  # 128 MiB
    proc = psutil.Process()
    before = proc.memory_info().rss
    tensors = safetensors_io.open_mmap(f)
    grown = proc.memory_info().rss - before
    assert grown < 8 * 2**20, f"open_mmap made RSS grow by {grown / 2**20:.1f} MiB for a 128 MiB file"
    assert tensors["t5"][-1].item() == 5.0


def test_move_keeps_ties(llama_pkg):
    _, pkg = llama_pkg
    loaded = package.load(pkg)
    package._move(loaded, torch.device("meta"))  # what load(device=...) does; meta stands in for a GPU
    assert loaded.lm_head.weight_data is loaded.model.embed_tokens.weight_data
    assert loaded.lm_head.weight_data.device.type == "meta"


def test_tokenizer_and_config_files(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}
    tok_obj = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok_obj.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok_obj, unk_token="[UNK]", pad_token="[PAD]")
    extra = tmp_path / "generation_config.json"
    extra.write_text('{"max_new_tokens": 3}')
    model = quantize(tiny_llama(), "int8")
    pkg = package.save(model, tmp_path / "pkg", tokenizer=tok, config_files=[extra])
    assert (pkg / "generation_config.json").read_text() == '{"max_new_tokens": 3}'
    again = package.load_tokenizer(pkg)
    assert again("hello world")["input_ids"] == tok("hello world")["input_ids"] == [2, 3]
    plain = package.save(mlp(), tmp_path / "plain")
    assert package.load_tokenizer(plain) is None


def test_inspect_reads_header_only(llama_pkg, monkeypatch):
    model, pkg = llama_pkg
    monkeypatch.setattr(safetensors_io, "open_mmap", lambda *a, **k: pytest.fail("inspect must not map weights"))
    info = package.inspect(pkg)
    lay = info["layers"]["model.layers.0.self_attn.q_proj"]
    assert lay["format"] == "int4" and lay["planes"]["data"]["dtype"] == "U8"
    assert lay["planes"]["data"]["shape"] == [64, 32] and lay["bytes"] == 64 * 32 + 64 * 2 * 2
    assert info["layers"]["lm_head"]["bytes"] == 0  # tied: counted with the embedding
    assert set(info["files"]) >= {"manifest.json", "weights.safetensors", "config.json"}
    assert info["files"]["weights.safetensors"] == (pkg / "weights.safetensors").stat().st_size


def test_manifest_is_strict_json_with_non_finite_floats(tmp_path):
    model = mlp()
    model._lowbit_info = {"report": {"sqnr_db": float("inf"), "worst": float("-inf")}, "source": {"name": "x"}}
    pkg = package.save(model, tmp_path / "p")
    text = (pkg / "manifest.json").read_text()
    assert "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert package.read_manifest(pkg)["report"]["sqnr_db"] == float("inf")
    with torch.device("meta"):
        skeleton = mlp()
    assert package.load(pkg, model=skeleton)._lowbit_info["source"] == {"name": "x"}


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------
def test_overwrite_needs_force(tmp_path):
    pkg = package.save(quantize(mlp(), "int4"), tmp_path / "pkg")
    with pytest.raises(FileExistsError, match="force=True"):
        package.save(quantize(mlp(), "int8"), pkg)
    assert package.read_manifest(pkg)["layers"]["1"]["format"]["name"] == "int4"
    package.save(quantize(mlp(), "int8"), pkg, force=True)
    assert package.read_manifest(pkg)["layers"]["1"]["format"]["name"] == "int8"
    assert siblings(pkg) == []
    # force replaces a package only: a model folder (e.g. the source itself) or a file is left alone
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "file").write_text("x")
    for target in (folder, tmp_path / "file"):
        with pytest.raises(FileExistsError, match="is not a lowbit package .* only replaces a package"):
            package.save(quantize(mlp(), "int8"), target, force=True)
    assert (folder / "model.safetensors").read_bytes() == b"weights" and (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_no_package(tmp_path, monkeypatch, existing):
    path = tmp_path / "pkg"
    if existing:
        package.save(quantize(mlp(), "int4"), path)
        old = (path / "manifest.json").read_bytes()
    real_write = safetensors_io.write

    def boom(n):
        raise OSError(28, "No space left on device (injected)")

    def failing_write(p, tensors, metadata=None, **kw):
        kw["on_chunk"] = boom  # raise after the first chunk of tensor data is on disk
        return real_write(p, tensors, metadata, **kw)

    monkeypatch.setattr(safetensors_io, "write", failing_write)
    with pytest.raises(OSError, match="injected"):
        package.save(quantize(mlp(), "int8"), path, force=True)
    assert siblings(path) == []
    if existing:  # the old package is untouched
        assert (path / "manifest.json").read_bytes() == old
    else:
        assert not path.exists()


def test_refuses_meta_tensors_before_writing(tmp_path):
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(ValueError, match="meta device"):
        package.save(model, tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# broken packages
# ---------------------------------------------------------------------------------------------
def test_truncated_weights(llama_pkg):
    _, pkg = llama_pkg
    f = pkg / "weights.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    with pytest.raises(PackageError, match=r"weights\.safetensors.*tensor '.*'.*truncated"):
        package.load(pkg)
    with open(f, "r+b") as fh:
        fh.truncate(5)
    with pytest.raises(PackageError, match="too short"):
        package.load(pkg)


def test_header_offsets_beyond_file(llama_pkg):
    _, pkg = llama_pkg

    def edit(h):
        e = h["model.norm.weight"]
        e["data_offsets"] = [d + 10**9 for d in e["data_offsets"]]

    rewrite_header(pkg / "weights.safetensors", edit)
    with pytest.raises(PackageError, match=r"'model.norm.weight'.*past the end"):
        package.load(pkg)


def test_header_dtype_changed(llama_pkg):
    _, pkg = llama_pkg
    f = pkg / "weights.safetensors"
    key = "model.layers.0.mlp.up_proj.weight_scale"
    rewrite_header(f, lambda h: h[key].update(dtype="F32"))  # F16 -> F32: sizes no longer match
    with pytest.raises(PackageError, match=rf"'{key}'.*needs \d+ bytes"):
        package.load(pkg)
    rewrite_header(f, lambda h: h[key].update(dtype="I16"))  # same size, wrong kind for the format
    with pytest.raises(PackageError, match=r"layer 'model.layers.0.mlp.up_proj'.*plane 'scale' is int16"):
        package.load(pkg)
    rewrite_header(f, lambda h: h[key].update(dtype="F8_E4M3"))
    with pytest.raises(PackageError, match="not supported"):
        package.load(pkg)


def test_a_quantized_layers_bias_of_the_wrong_length_is_refused(tmp_path):
    """Layer 3's bias pointed at layer 1's (128 values for 64 outputs): refused at load, naming the
    layer (it loaded, then failed at the first forward with a bare RuntimeError)."""
    pkg = package.save(quantize(mlp(), "int8"), tmp_path / "pkg")
    edit_manifest(pkg, lambda m: m["layers"]["3"].update(bias=m["layers"]["1"]["bias"]))
    with pytest.raises(PackageError, match=r"layer '3': bias is float32 \(128,\), the layer needs a float \(64,\)"):
        package.load(pkg, model=mlp())


def test_a_float_tensor_stored_as_integers_is_refused(llama_pkg):
    """A norm weight whose header says I32 (same size as F32): refused by name (it loaded, and the
    logits came out off by 6e8)."""
    _, pkg = llama_pkg
    key = "model.layers.0.input_layernorm.weight"
    rewrite_header(pkg / "weights.safetensors", lambda h: h[key].update(dtype="I32"))
    with pytest.raises(PackageError, match=rf"tensor '{key}' is int32 in the package but float32 in the model"):
        package.load(pkg)


@pytest.mark.parametrize("case", ["overlap", "header_len", "not_json", "shape", "metadata", "duplicate", "deep"])
def test_hostile_headers(tmp_path, case):
    f = tmp_path / "w.safetensors"
    safetensors_io.write(f, {"a": torch.ones(4), "b": torch.zeros(4)}, {"format": "pt"})
    if case == "overlap":
        rewrite_header(f, lambda h: h["b"].update(data_offsets=[8, 24]))
        msg = "overlaps"
    elif case == "header_len":
        raw = f.read_bytes()
        f.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
        msg = "header length"
    elif case == "not_json":
        raw = f.read_bytes()
        f.write_bytes(raw[:8] + b"\xff" * 10 + raw[18:])
        msg = "not valid UTF-8 JSON"
    elif case == "shape":
        rewrite_header(f, lambda h: h["a"].update(shape=[-4]))
        msg = "shape must be a list of non-negative ints"
    elif case == "metadata":
        rewrite_header(f, lambda h: h.update(__metadata__={"format": 1}))
        msg = "__metadata__"
    elif case == "duplicate":
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        text = raw[8: 8 + n].decode().rstrip()
        entry = json.dumps({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]})
        new = (text[:-1] + f',"a":{entry}}}').encode()
        f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
        msg = "names 'a' twice"
    else:
        new = b"[" * 100000 + b"]" * 100000
        f.write_bytes(struct.pack("<Q", len(new)) + new)
        msg = "nested too deeply"
    with pytest.raises(PackageError, match=msg) as e:
        safetensors_io.read_header(f)
    assert str(f) in str(e.value)


def test_manifest_names_missing_plane(llama_pkg):
    _, pkg = llama_pkg
    layer = "model.layers.1.self_attn.o_proj"
    edit_manifest(pkg, lambda m: m["layers"][layer]["planes"].update(scale="no.such.tensor"))
    with pytest.raises(PackageError, match=rf"layer '{layer}' plane 'scale'.*'no.such.tensor'"):
        package.load(pkg)
    edit_manifest(pkg, lambda m: m["layers"][layer]["planes"].pop("scale"))
    with pytest.raises(PackageError, match=rf"layer '{layer}'.*missing \['scale'\]"):
        package.load(pkg)


def test_manifest_wrong_shape(llama_pkg):
    _, pkg = llama_pkg
    layer = "model.layers.0.mlp.gate_proj"
    edit_manifest(pkg, lambda m: m["layers"][layer].update(shape=[128, 128]))
    with pytest.raises(PackageError, match=rf"layer '{layer}'.*plane 'data' has shape"):
        package.load(pkg)


def test_unknown_schema_version(llama_pkg):
    _, pkg = llama_pkg
    edit_manifest(pkg, lambda m: m.update(schema_version=2))
    with pytest.raises(PackageError, match="unknown schema version 2; this lowbit reads 1 — upgrade lowbit"):
        package.load(pkg)


def test_manifest_not_json(llama_pkg, tmp_path):
    _, pkg = llama_pkg
    (pkg / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="manifest.json: not valid JSON"):
        package.load(pkg)
    (pkg / "manifest.json").write_text("[1, 2]")
    with pytest.raises(PackageError, match="must be a JSON object"):
        package.load(pkg)
    with pytest.raises(PackageError, match="not a lowbit package"):
        package.load(tmp_path)
    with pytest.raises(PackageError, match="not a package folder"):
        package.load(tmp_path / "nowhere")


def test_manifest_missing_keys_and_bad_values(llama_pkg):
    _, pkg = llama_pkg
    edit_manifest(pkg, lambda m: m.pop("layers"))
    with pytest.raises(PackageError, match=r"missing key\(s\) \['layers'\]"):
        package.load(pkg)
    edit_manifest(pkg, lambda m: m.update(layers={"lm_head": {"type": "QuantLinear", "format": {}, "shape": [],
                                                              "planes": {"data": "x"}, "bias": None}}))
    with pytest.raises(PackageError, match=r"layer 'lm_head': shape must be \[rows, cols\]"):
        package.load(pkg)
    edit_manifest(pkg, lambda m: m["layers"]["lm_head"].update(type="os.system", shape=[1, 1]))
    with pytest.raises(PackageError, match="type 'os.system' is not one of"):
        package.load(pkg)


def test_manifest_embedding_scale_must_be_a_number(llama_pkg):
    _, pkg = llama_pkg
    emb = "model.embed_tokens"
    for bad in ("8.0", float("inf"), True):
        edit_manifest(pkg, lambda m: m["layers"][emb].update(embed_scale=bad))
        with pytest.raises(PackageError, match=f"layer '{emb}': embed_scale must be a finite number"):
            package.load(pkg)


def test_code_shipped_in_a_package_never_runs(llama_pkg, tmp_path, monkeypatch):
    """A config.json with an `auto_map` pointing at a Python file in the package: load refuses it as
    a bad config without running the file or asking on stdin (transformers' prompt "Do you wish to
    run the custom code?" came up before, and answering y ran it)."""
    _, pkg = llama_pkg
    marker = tmp_path / "ran"
    cfg = json.loads((pkg / "config.json").read_text())
    cfg.update(auto_map={"AutoConfig": "evil.EvilConfig"}, model_type="evil-llama")
    (pkg / "config.json").write_text(json.dumps(cfg))
    (pkg / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
                                 "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    pass\n")
    monkeypatch.setattr("builtins.input", lambda *a: "y")  # a user who answers yes, were they asked
    with pytest.raises(PackageError, match="config.json: cannot be read as a transformers config"):
        package.load(pkg)
    assert not marker.exists()


def test_architecture_class_must_come_from_transformers(llama_pkg):
    _, pkg = llama_pkg
    edit_manifest(pkg, lambda m: m["architecture"].update({"class": "AutoTokenizer"}))
    with pytest.raises(PackageError, match="'AutoTokenizer', which is not a model class"):
        package.load(pkg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a torch without CUDA")
def test_load_on_cuda_without_cuda_is_refused_up_front(llama_pkg):
    _, pkg = llama_pkg
    with pytest.raises(ValueError, match="device='cuda', but this torch has no CUDA device .* load on 'cpu'"):
        package.load(pkg, device="cuda")
    with pytest.raises(ValueError, match="device='gpu0' is not a device"):
        package.load(pkg, device="gpu0")


def test_verify_sha256(llama_pkg):
    _, pkg = llama_pkg
    f = pkg / "weights.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    package.load(pkg)  # not checked by default (hashing reads the whole file)
    with pytest.raises(PackageError, match="sha256"):
        package.load(pkg, verify=True)


# ---------------------------------------------------------------------------------------------
# safetensors_io
# ---------------------------------------------------------------------------------------------
def test_safetensors_io_round_trip_with_official_reader(tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16_t": torch.randn(4, 6, generator=g).half().t(),  # non-contiguous
        "u8": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g),
        "i64": torch.arange(3),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    f = tmp_path / "t.safetensors"
    sha = safetensors_io.write(f, tensors, {"k": "v"})
    assert sha == safetensors_io.sha256_file(f)
    header, start = safetensors_io.read_header(f)
    assert start % 8 == 0 and header["__metadata__"] == {"k": "v"}
    mapped = safetensors_io.open_mmap(f)
    with safe_open(str(f), "pt") as sf:
        assert sf.metadata() == {"k": "v"}
        for k, t in tensors.items():
            assert torch.equal(sf.get_tensor(k), t), k
            assert mapped[k].dtype == t.dtype and torch.equal(mapped[k], t), k


def test_open_mmap_copies_misaligned_tensors(tmp_path):
    # a header whose length is not a multiple of 8, as other writers may produce
    f = tmp_path / "odd.safetensors"
    data = torch.arange(4, dtype=torch.float32)
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * ((3 - 8 - len(header)) % 8)  # the data section starts at offset 3 mod 8
    assert (8 + len(header)) % 8 == 3
    f.write_bytes(struct.pack("<Q", len(header)) + header + data.numpy().tobytes())
    x = safetensors_io.open_mmap(f)["x"]
    assert torch.equal(x, data)
    assert x.untyped_storage().nbytes() == 16  # a copy, not a view of the mapping


def test_write_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        safetensors_io.write(tmp_path / "x", {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="metadata"):
        safetensors_io.write(tmp_path / "x", {"a": torch.zeros(2)}, {"a": 1})
    assert issubclass(PackageError, ValueError)


def test_top_level_lowbit_save_load(tmp_path):
    model = quantize(tiny_llama(), "q4_0")
    pkg = lowbit.save(model, tmp_path / "pkg")
    assert isinstance(lowbit.load(pkg), transformers.LlamaForCausalLM)
    assert os.path.isdir(pkg)
