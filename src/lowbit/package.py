"""Packages: a quantized model saved as a folder, and loaded back memory-mapped.

A package is a folder (DESIGN.md section 5)::

    manifest.json         schema version, lowbit version, source, recipe, report, architecture,
                          per-layer format / shape / plane keys, float tensors, tensor aliases,
                          sha256 of the weights file
    weights.safetensors   every state_dict tensor exactly once (tied / shared tensors deduplicated)
    config.json           the Hugging Face config, when the model has one
    tokenizer files       when a tokenizer was given; plus copies of the source's config files

Never pickle: the manifest is JSON, the weights are safetensors, and the only code a package can
name is a class exported by ``transformers`` itself.

Example:
    >>> import torch, tempfile, os, lowbit
    >>> from lowbit import package
    >>> from lowbit.nn import QuantLinear
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
    >>> model[0] = QuantLinear.from_float(model[0], "int4")
    >>> out = package.save(model, os.path.join(tempfile.mkdtemp(), "pkg"))
    >>> skeleton = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
    >>> again = package.load(out, model=skeleton)
    >>> x = torch.randn(2, 64)
    >>> torch.equal(again(x), model(x))
    True
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from . import safetensors_io
from .safetensors_io import PackageError

__all__ = ["save", "load", "inspect", "load_tokenizer", "read_manifest", "PackageError", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
REQUIRED_KEYS = ("schema_version", "lowbit_version", "architecture", "layers", "float_tensors", "aliases",
                 "tensors_sha256")
LAYER_TYPES = ("QuantLinear", "QuantEmbedding")
# output dtypes a QuantEmbedding may be asked for (an allow-list: never getattr(torch, <anything>))
EMBED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model")


# ==============================================================================================
# save
# ==============================================================================================
def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    force: bool = False,
    tokenizer: Any = None,
    config_files: Iterable[str | os.PathLike] = (),
    source_root: str | os.PathLike | None = None,
) -> Path:
    """Save a (quantized) model as a package folder at `path`, atomically; returns the path.

    Everything is written into a temporary sibling folder (``.<name>.tmp-<pid>``), fsynced, then
    renamed to `path`. On any error the temporary folder is removed and no package is left.

    Args:
        model: any `nn.Module`; `QuantLinear` / `QuantEmbedding` layers are recorded with their
            format, every other state_dict entry is stored as plain tensors. Shared storages
            (tied embeddings, whether quantized or float) are stored once and re-tied on load.
        path: the package folder to create.
        force: replace an existing package at `path` (the old one is renamed away, the new one
            renamed in, then the old one is deleted); anything else at `path` (a model folder, a
            file) is never replaced. Without it an existing `path` raises `FileExistsError`.
        tokenizer: saved with ``tokenizer.save_pretrained`` into the package.
        config_files: files copied into the package as they are (e.g. the source's
            ``generation_config.json``); under `source_root`, they keep their relative path
            (sentence-transformers' ``1_Pooling/config.json`` must not land on ``config.json``). ``config.json`` is written from ``model.config`` when the
            model has a Hugging Face config, replacing a copied one.

    Example:
        >>> import torch, tempfile, os
        >>> from lowbit import package
        >>> p = package.save(torch.nn.Linear(4, 2), os.path.join(tempfile.mkdtemp(), "pkg"))
        >>> sorted(f.name for f in p.iterdir())
        ['manifest.json', 'weights.safetensors']
    """
    path = Path(path)
    if os.path.lexists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass force=True (CLI: --force) to replace it")
    if os.path.lexists(path) and not (path.is_dir() and not path.is_symlink() and (path / MANIFEST).is_file()):
        # force replaces an earlier package only: never a model folder (the source itself, say) or a file
        raise FileExistsError(f"{path} exists and is not a lowbit package (no {MANIFEST}); force=True (CLI: --force) "
                              "only replaces a package: choose another output path, or remove it yourself")
    config_files = [Path(c) for c in config_files]
    for c in config_files:
        if c.name in (MANIFEST, WEIGHTS):
            raise ValueError(f"config file {c} would overwrite the package's own {c.name}")
        if not c.is_file():
            raise FileNotFoundError(f"config file {c} does not exist or is not a file")

    # Plan (and validate) everything before creating any file.
    tensors, manifest = _plan(model)
    _dumps(manifest)  # fails now, not half-way, when the recipe / report holds something unserialisable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):  # left by a killed run of a process that had our pid
        _remove(tmp)
    try:
        tmp.mkdir()
        for c in config_files:
            rel = c.resolve().relative_to(Path(source_root).resolve()) if source_root else Path(c.name)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(c, tmp / rel)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_json_file"):
            config.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        manifest["tensors_sha256"] = safetensors_io.write(
            tmp / WEIGHTS, tensors, {"format": "pt", "producer": "lowbit"}, fsync=False)
        (tmp / MANIFEST).write_text(_dumps(manifest), encoding="utf-8")
        # fsync every file (tokenizer and config were written by other code) and the folder itself,
        # so that after the rename a crash cannot leave a package with missing contents.
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                _fsync_file(f)
        _fsync_dir(tmp)
        _install(tmp, path, force)
    except BaseException:
        _remove(tmp)
        raise
    return path


def _install(tmp: Path, path: Path, force: bool) -> None:
    """Rename `tmp` to `path`; with `force`, move an existing `path` away first and delete it after."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        return
    if not force:  # appeared while we were writing
        raise FileExistsError(f"{path} already exists; pass force=True (CLI: --force) to replace it")
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if os.path.lexists(old):
        _remove(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the old package back
        raise
    _fsync_dir(path.parent)
    _remove(old)


def _plan(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to write (deduplicated) and the manifest (without the sha256)."""
    from . import __version__
    from .nn import QuantEmbedding, QuantLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"save needs an nn.Module, got {type(model).__name__}")
    from .nn.fused import first_fused

    fused = first_fused(model)
    if fused:  # the joined planes would be stored under a name the architecture does not have
        raise ValueError(f"layer {fused!r} is fused with its siblings (lowbit.nn.fuse_projections); packages keep "
                         "the separate layers: call lowbit.nn.unfuse_projections(model) before saving and fuse again "
                         "after loading")
    state = model.state_dict()
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state_dict entry {key!r} is a {type(t).__name__} (extra state), which packages cannot store")
        if t.device.type == "meta":
            raise ValueError(f"state_dict entry {key!r} is on the meta device (no data); load or materialize it first")
        if t.dtype not in safetensors_io.DTYPE_NAMES:
            raise ValueError(f"state_dict entry {key!r} has dtype {t.dtype}, which packages cannot store "
                             f"(allowed: {', '.join(str(d).replace('torch.', '') for d in safetensors_io.DTYPE_NAMES)})")

    # Deduplicate: entries that are the very same view of the same storage (tied weights, shared
    # modules) are stored once; the others are recorded as aliases. Partial overlaps (different
    # views of one storage) are stored separately, as copies.
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        if t.numel():  # empty tensors may all report data_ptr 0: never alias them
            sig = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
            if sig in seen:
                aliases[key] = seen[sig]
                continue
            seen[sig] = key
        stored[key] = t

    def resolve(key: str, layer: str) -> str:
        if key not in state:
            raise ValueError(f"layer {layer!r}: {key!r} is not in the model's state_dict (non-persistent buffer?)")
        return aliases.get(key, key)

    layers: dict[str, dict[str, Any]] = {}
    plane_owner: dict[str, str] = {}
    layer_keys: set[str] = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, (QuantLinear, QuantEmbedding)):
            continue
        prefix = f"{name}." if name else ""
        planes = {p: resolve(f"{prefix}weight_{p}", name) for p in mod.plane_names}
        is_emb = isinstance(mod, QuantEmbedding)
        bias = None if is_emb or mod.bias is None else resolve(f"{prefix}bias", name)
        tied_to = plane_owner.get(planes["data"])
        for k in planes.values():
            plane_owner.setdefault(k, name)
        layer_keys.update(planes.values())
        if bias is not None:
            layer_keys.add(bias)
        layers[name] = {
            "type": "QuantEmbedding" if is_emb else "QuantLinear",
            "format": mod.fmt.to_dict(),
            "shape": list(mod.weight_shape),
            "planes": planes,
            "bias": bias,
            "padding_idx": mod.padding_idx if is_emb else None,
            "dtype": str(mod.out_dtype).replace("torch.", "") if is_emb else None,
            "tied_to": tied_to,
        }
        if is_emb and mod.embed_scale is not None:  # scaled word embeddings (Gemma): the rows times this
            layers[name]["embed_scale"] = mod.embed_scale

    info = getattr(model, "_lowbit_info", None) or {}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "lowbit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": info.get("source"),
        "recipe": info.get("recipe"),
        "report": info.get("report"),
        "architecture": _architecture(model),
        "layers": layers,
        "float_tensors": [k for k in stored if k not in layer_keys],
        "aliases": aliases,
        "tensors_sha256": None,
    }
    return stored, manifest


def _architecture(model: nn.Module) -> dict[str, str]:
    cls = type(model)
    # Only a class that `transformers` itself exports can be rebuilt from the manifest (load looks
    # it up there and nowhere else); custom / remote-code classes need a skeleton, like any module.
    tf = sys.modules.get("transformers")  # if the model is a transformers model, it is imported
    if tf is not None and isinstance(model, tf.PreTrainedModel) and getattr(tf, cls.__name__, None) is cls:
        return {"kind": "hf", "class": cls.__name__}
    return {"kind": "module", "class": cls.__name__, "module": cls.__module__}


# ==============================================================================================
# load
# ==============================================================================================
def load(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    verify: bool = False,
    fuse: bool = False,
) -> nn.Module:
    """Load a package: build the model without weights, then assign memory-mapped tensors.

    Nothing is read from the weights file until a tensor is used (the file is mapped private
    copy-on-write), so load time and resident memory follow what is used, not the file size.
    Tied weights come back tied (the same plane tensors / the same `Parameter`).

    Args:
        path: the package folder.
        model: a float skeleton of the same architecture. Required for packages of plain modules
            (architecture kind "module"); for Hugging Face packages it is optional (the class named
            in the manifest is built from ``config.json`` with its parameters on the meta device).
        device: where to put the model; anything but "cpu" copies the tensors there.
        verify: check the weights file's sha256 against the manifest (reads the whole file).
        fuse: join sibling projections (q / k / v, gate / up) into one matmul each after moving
            (`lowbit.nn.fuse_projections`: fewer kernel launches, faster GPU decoding; the joined
            planes are copies, so the file's pages of those layers are no longer used).

    Raises:
        PackageError: a missing / malformed / inconsistent manifest or weights file; the message
            names the file, layer, plane or tensor.

    Example:
        >>> import torch, tempfile, os
        >>> from lowbit import package
        >>> p = package.save(torch.nn.Linear(4, 2), os.path.join(tempfile.mkdtemp(), "pkg"))
        >>> package.load(p, model=torch.nn.Linear(4, 2)).weight.shape
        torch.Size([2, 4])
    """
    from .formats import Format, QTensor
    from .nn import QuantEmbedding, QuantLinear

    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"load: device={device!r} is not a device ({e})") from None
    if target.type == "cuda" and not torch.cuda.is_available():  # checked before reading anything
        raise ValueError(f"load: device={device!r}, but this torch has no CUDA device "
                         f"(torch {torch.__version__}); load on 'cpu'")
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / WEIGHTS
    header = safetensors_io.read_header(weights)
    _check_keys(manifest, header[0], weights)
    if verify:
        got = safetensors_io.sha256_file(weights)
        if got != manifest["tensors_sha256"]:
            raise PackageError(f"{weights}: sha256 {got} does not match the manifest's {manifest['tensors_sha256']} "
                               "(the file was modified or damaged)")
    tensors = safetensors_io.open_mmap(weights, header)

    arch = manifest["architecture"]
    if model is None:
        if arch["kind"] == "hf":
            model = _hf_skeleton(path, arch["class"])
        else:
            raise PackageError(
                f"{path}: this package holds a plain {arch.get('module', '?')}.{arch['class']} module, which "
                "cannot be rebuilt from the manifest; pass model=<a float instance of the same architecture> "
                "(its weights may be on the meta device)")
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model= must be an nn.Module skeleton, got {type(model).__name__}")

    # 1. quantized layers, planes straight from the mapping (tied layers get the same tensors)
    for name, spec in manifest["layers"].items():
        where = f"{path}: layer {name!r}"
        try:
            fmt = Format.from_dict(spec["format"])
        except (TypeError, ValueError) as e:
            raise PackageError(f"{where}: bad format: {e}") from None
        planes = {p: tensors[k] for p, k in spec["planes"].items()}
        try:
            qt = QTensor(planes, fmt, spec["shape"])
        except (TypeError, ValueError) as e:
            raise PackageError(f"{where}: {e}") from None
        _check_plane_dtypes(qt, where)
        try:
            if spec["type"] == "QuantLinear":
                bias = None if spec["bias"] is None else tensors[spec["bias"]]
                if bias is not None and (tuple(bias.shape) != (qt.shape[0],) or not bias.is_floating_point()):
                    raise PackageError(f"{where}: bias is {str(bias.dtype).replace('torch.', '')} "
                                       f"{tuple(bias.shape)}, the layer needs a float ({qt.shape[0]},)")
                new = QuantLinear(qt, bias)
            else:
                new = QuantEmbedding(qt, padding_idx=spec["padding_idx"], dtype=EMBED_DTYPES[spec["dtype"]],
                                     embed_scale=spec.get("embed_scale"))
        except ValueError as e:
            raise PackageError(f"{where}: {e}") from None
        new._lowbit_name = name
        model = _swap(model, name, new, where)

    # 2. float tensors and aliases (one Parameter per stored tensor, so float ties survive too)
    layer_names = set(manifest["layers"])
    aliases = manifest["aliases"]
    params: dict[str, nn.Parameter] = {}
    assigned: set[str] = set()
    for key in [*manifest["float_tensors"], *aliases]:
        owner, _, attr = key.rpartition(".")
        if owner in layer_names:  # a plane or bias of a quantized layer: done above
            continue
        src = aliases.get(key, key)
        t = tensors[src]
        try:
            mod = model.get_submodule(owner)
        except AttributeError:
            raise PackageError(f"{path}: tensor {key!r}: the model has no module {owner!r} "
                               "(is it the same architecture?)") from None
        if attr in mod._parameters:
            old = mod._parameters[attr]
            _check_shape(old, t, key, path)
            if src not in params:
                grad = bool(old is not None and old.requires_grad and t.is_floating_point())
                params[src] = nn.Parameter(t, requires_grad=grad)
            mod._parameters[attr] = params[src]
        elif attr in mod._buffers:
            _check_shape(mod._buffers[attr], t, key, path)
            mod._buffers[attr] = t
            mod.__dict__.pop("_qweight_cache", None)  # QuantLinear's QTensor of the old planes
        else:
            raise PackageError(f"{path}: tensor {key!r}: {type(mod).__name__} {owner!r} has no parameter or buffer "
                               f"{attr!r} (is it the same architecture?)")
        assigned.add(key)

    # 3. nothing may be left without data
    on_meta = [n for n, t in _named_tensors(model) if t.device.type == "meta"]
    if on_meta:
        raise PackageError(f"{path}: {len(on_meta)} tensor(s) of the model are not in the package and have no data: "
                           + ", ".join(on_meta[:20]) + (" ..." if len(on_meta) > 20 else ""))
    missing = [n for n, p in model.named_parameters(remove_duplicate=False)
               if n not in assigned and n.rpartition(".")[0] not in layer_names]
    if missing:
        raise PackageError(f"{path}: the model has parameter(s) the package does not provide (different "
                           f"architecture?): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))

    model.eval()
    model._lowbit_info = {"source": manifest.get("source"), "recipe": manifest.get("recipe"),
                          "report": manifest.get("report"), "package": str(path)}
    if torch.device(device) != torch.device("cpu"):
        _move(model, torch.device(device))
    if fuse:
        from .nn import fuse_projections

        fuse_projections(model)
    return model


def _check_shape(old: torch.Tensor | None, new: torch.Tensor, key: str, path: Path) -> None:
    """The stored tensor must have the model's shape, and be floating point where the model's is
    (an integer tensor in a float slot would load and compute garbage)."""
    if old is not None and tuple(old.shape) != tuple(new.shape):
        raise PackageError(f"{path}: tensor {key!r} has shape {tuple(new.shape)} in the package but "
                           f"{tuple(old.shape)} in the model (is it the same architecture / config?)")
    if old is not None and old.is_floating_point() != new.is_floating_point():
        raise PackageError(f"{path}: tensor {key!r} is {str(new.dtype).replace('torch.', '')} in the package but "
                           f"{str(old.dtype).replace('torch.', '')} in the model (a damaged or edited file?)")


def _check_plane_dtypes(qt: Any, where: str) -> None:
    """Plane dtypes follow from the format (the data plane is bytes; scales follow scale_dtype)."""
    fmt = qt.fmt
    want = {"data": torch.uint8}
    if fmt.family != "lut":  # palette side planes have their own rules in the palette family
        sd = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "e8m0": torch.uint8}[fmt.scale_dtype]
        want["scale"] = sd
        if fmt.zero == "float":
            want["zero"] = sd
    for plane, dtype in want.items():
        p = qt.planes.get(plane)
        if p is not None and p.dtype != dtype:
            raise PackageError(f"{where}: plane {plane!r} is {str(p.dtype).replace('torch.', '')}, but format "
                               f"{fmt.name!r} needs {str(dtype).replace('torch.', '')}")


def _swap(model: nn.Module, name: str, new: nn.Module, where: str) -> nn.Module:
    if not name:
        return new  # the whole model is one quantized layer
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise PackageError(f"{where}: the model has no module {parent_name!r} (is it the same architecture?)") from None
    if child not in parent._modules:
        raise PackageError(f"{where}: {type(parent).__name__} {parent_name or '<root>'!r} has no submodule "
                           f"{child!r} (is it the same architecture?)")
    setattr(parent, child, new)
    return model


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _move(model: nn.Module, device: torch.device) -> None:
    """`model.to(device)` that keeps ties: `Module.to` copies a buffer once per module holding it,
    which would untie (and duplicate) tied planes; here each tensor is moved once."""
    memo: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for k, b in mod._buffers.items():
            if b is not None:
                if id(b) not in memo:
                    memo[id(b)] = b.to(device)
                mod._buffers[k] = memo[id(b)]
        for k, p in mod._parameters.items():
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
                mod._parameters[k] = memo[id(p)]


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device and buffers on the CPU.

    Unlike ``with torch.device("meta")``, buffers the model computes in ``__init__`` and never saves
    (rotary ``inv_freq``, ``position_ids``: non-persistent) keep their real values. Parameters
    are allocated empty (untouched pages, no memory) and moved to meta at once, so random
    initialisation afterwards runs on meta and costs nothing. Patches ``nn.Module`` for the
    duration: not thread-safe.
    """
    orig = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        orig(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            kwargs = dict(p.__dict__)
            kwargs["requires_grad"] = p.requires_grad
            self._parameters[name] = type(p)(p.to("meta"), **kwargs)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def _hf_skeleton(path: Path, class_name: str) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise PackageError(f"{path}: this is a Hugging Face package ({class_name}); install transformers "
                           "(pip install 'lowbit[hf]') or pass model=") from None
    cls = getattr(transformers, class_name, None)
    # Only classes transformers itself exports: a manifest can never name arbitrary code.
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise PackageError(f"{path}: the manifest names architecture {class_name!r}, which is not a model class "
                           f"of the installed transformers {transformers.__version__}; upgrade transformers or "
                           "pass model=")
    if not (path / "config.json").is_file():
        raise PackageError(f"{path}: Hugging Face package without config.json; cannot build {class_name}")
    try:
        # never the package's own code: a config.json with an `auto_map` would otherwise make
        # transformers ask on stdin whether to run a Python file shipped in the folder
        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as e:  # transformers raises many kinds; all mean "bad config"
        raise PackageError(f"{path}/config.json: cannot be read as a transformers config: {e}") from None
    try:
        with _params_on_meta():
            return cls(config)
    except Exception as e:
        raise PackageError(f"{path}: cannot build {class_name} from config.json: {e}") from None


# ==============================================================================================
# manifest
# ==============================================================================================
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a package's manifest.json (structure only; see `load` for the rest).

    Example:
        >>> import torch, tempfile, os
        >>> from lowbit import package
        >>> p = package.save(torch.nn.Linear(4, 2), os.path.join(tempfile.mkdtemp(), "pkg"))
        >>> package.read_manifest(p)["float_tensors"]
        ['weight', 'bias']
    """
    path = Path(path)
    f = path / MANIFEST
    if not path.is_dir():
        raise PackageError(f"{path}: not a package folder (missing or not a directory)")
    try:
        text = f.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PackageError(f"{path}: no {MANIFEST}; this is not a lowbit package") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PackageError(f"{f}: cannot read: {e}") from None
    try:
        m = json.loads(text, object_hook=_restore_floats)
    except json.JSONDecodeError as e:
        raise PackageError(f"{f}: not valid JSON ({e})") from None
    except RecursionError:
        raise PackageError(f"{f}: JSON nested too deeply") from None
    if not isinstance(m, dict):
        raise PackageError(f"{f}: must be a JSON object, got {type(m).__name__}")
    sv = m.get("schema_version")
    if sv != SCHEMA_VERSION:
        if sv is None:
            raise PackageError(f"{f}: no schema_version; this is not a lowbit package manifest")
        newer = isinstance(sv, int) and sv > SCHEMA_VERSION
        raise PackageError(f"{f}: unknown schema version {sv!r}; this lowbit reads {SCHEMA_VERSION}"
                           + (" — upgrade lowbit" if newer else ""))
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise PackageError(f"{f}: missing key(s) {missing}")

    def bad(what: str) -> PackageError:
        return PackageError(f"{f}: {what}")

    arch = m["architecture"]
    if not (isinstance(arch, dict) and arch.get("kind") in ("hf", "module") and isinstance(arch.get("class"), str)):
        raise bad(f"architecture must be {{'kind': 'hf'|'module', 'class': str}}, got {arch!r}")
    if not (isinstance(m["float_tensors"], list) and all(isinstance(k, str) for k in m["float_tensors"])):
        raise bad("float_tensors must be a list of tensor names")
    if not (isinstance(m["aliases"], dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in m["aliases"].items())):
        raise bad("aliases must map tensor names to tensor names")
    if not isinstance(m["tensors_sha256"], str):
        raise bad("tensors_sha256 must be a string")
    if not isinstance(m["layers"], dict):
        raise bad("layers must be an object")
    for name, spec in m["layers"].items():
        where = f"layer {name!r}"
        if not isinstance(spec, dict):
            raise bad(f"{where}: must be an object")
        lack = [k for k in ("type", "format", "shape", "planes", "bias") if k not in spec]
        if lack:
            raise bad(f"{where}: missing {lack}")
        if spec["type"] not in LAYER_TYPES:
            raise bad(f"{where}: type {spec['type']!r} is not one of {list(LAYER_TYPES)}")
        if not (isinstance(spec["shape"], list) and len(spec["shape"]) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec["shape"])):
            raise bad(f"{where}: shape must be [rows, cols] (non-negative ints), got {spec['shape']!r}")
        if not (isinstance(spec["planes"], dict) and spec["planes"]
                and all(isinstance(k, str) and isinstance(v, str) for k, v in spec["planes"].items())):
            raise bad(f"{where}: planes must map plane names to tensor names")
        if spec["bias"] is not None and not isinstance(spec["bias"], str):
            raise bad(f"{where}: bias must be a tensor name or null")
        if spec["type"] == "QuantEmbedding":
            if spec.get("dtype") not in EMBED_DTYPES:
                raise bad(f"{where}: dtype {spec.get('dtype')!r} is not one of {list(EMBED_DTYPES)}")
            pi = spec.get("padding_idx")
            if pi is not None and (not isinstance(pi, int) or isinstance(pi, bool)):
                raise bad(f"{where}: padding_idx must be an int or null")
            es = spec.get("embed_scale")
            if es is not None and (isinstance(es, bool) or not isinstance(es, (int, float)) or not math.isfinite(es)):
                raise bad(f"{where}: embed_scale must be a finite number or absent")
    return m


def _check_keys(m: dict[str, Any], header: dict[str, Any], weights: Path) -> None:
    """Every tensor the manifest names must be in the weights file."""
    def need(key: str, what: str) -> None:
        if key not in header or key == "__metadata__":
            raise PackageError(f"{weights.parent}: {what} names tensor {key!r}, which is not in {WEIGHTS}")

    for name, spec in m["layers"].items():
        for plane, key in spec["planes"].items():
            need(key, f"layer {name!r} plane {plane!r}")
        if spec["bias"] is not None:
            need(spec["bias"], f"layer {name!r} bias")
    for key in m["float_tensors"]:
        need(key, f"float tensor {key!r}")
    for key, src in m["aliases"].items():
        need(src, f"alias {key!r}")


def _dumps(manifest: dict[str, Any]) -> str:
    # Strict JSON (no bare Infinity/NaN, which other JSON readers refuse): non-finite floats, e.g.
    # the SQNR of an exactly representable layer, are written as {"__float__": "inf"} and turned
    # back into floats by read_manifest.
    return json.dumps(_encode_floats(manifest), indent=1, allow_nan=False, default=_json_default) + "\n"


def _encode_floats(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return {"__float__": repr(x)}  # 'inf', '-inf', 'nan'
    if isinstance(x, dict):
        return {k: _encode_floats(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode_floats(v) for v in x]
    return x


def _restore_floats(d: dict[str, Any]) -> Any:
    if len(d) == 1 and "__float__" in d and d["__float__"] in ("inf", "-inf", "nan"):
        return float(d["__float__"])
    return d


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, (os.PathLike, torch.device)):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "item") and callable(o.item):  # numpy / torch scalars
        v = o.item()
        return _encode_floats(v) if isinstance(v, float) else v
    if hasattr(o, "to_dict") and callable(o.to_dict):
        return _encode_floats(o.to_dict())
    raise TypeError(f"cannot store a {type(o).__name__} in the package manifest")


# ==============================================================================================
# inspect, tokenizer
# ==============================================================================================
def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """Describe a package from its manifest and the safetensors header only (no weights read).

    Returns ``{"path", "manifest", "layers": {name: {type, format, shape, tied_to, bytes,
    planes: {plane: {key, dtype, shape, bytes}}}}, "float_tensors": {key: {dtype, shape, bytes}},
    "files": {relative path: bytes}, "total_bytes"}``. A tied layer's ``bytes`` is 0 (its planes
    are counted with the layer it is tied to).

    Example:
        >>> import torch, tempfile, os
        >>> from lowbit import package
        >>> p = package.save(torch.nn.Linear(4, 2), os.path.join(tempfile.mkdtemp(), "pkg"))
        >>> package.inspect(p)["float_tensors"]["weight"]
        {'dtype': 'F32', 'shape': [2, 4], 'bytes': 32}
    """
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / WEIGHTS
    header, _ = safetensors_io.read_header(weights)
    _check_keys(manifest, header, weights)

    def entry(key: str) -> dict[str, Any]:
        h = header[key]
        b, e = h["data_offsets"]
        return {"dtype": h["dtype"], "shape": h["shape"], "bytes": e - b}

    layers = {}
    for name, spec in manifest["layers"].items():
        planes = {p: {"key": k, **entry(k)} for p, k in spec["planes"].items()}
        own = sum(v["bytes"] for v in planes.values()) + (entry(spec["bias"])["bytes"] if spec["bias"] else 0)
        fmt = spec["format"]
        layers[name] = {"type": spec["type"], "format": fmt.get("name") if isinstance(fmt, dict) else fmt,
                        "shape": spec["shape"], "tied_to": spec.get("tied_to"),
                        "bytes": 0 if spec.get("tied_to") else own, "planes": planes}
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    return {
        "path": str(path),
        "manifest": manifest,
        "layers": layers,
        "float_tensors": {k: entry(k) for k in manifest["float_tensors"]},
        "files": files,
        "total_bytes": sum(files.values()),
    }


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The package's tokenizer (``AutoTokenizer.from_pretrained``), or None when it has none."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)


# ==============================================================================================
# files
# ==============================================================================================
def _fsync_file(f: Path) -> None:
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # some platforms / filesystems cannot open folders: best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
