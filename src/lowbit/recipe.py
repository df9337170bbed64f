"""`Recipe`: which format each layer gets, as data (TOML or a dict), validated before any work.

Precedence for a layer: per-name entry (exact name, then the longest matching glob) > edge blocks
(the first / last `edge_blocks` transformer blocks) > per-type entry (`Linear`, `Embedding`,
`Conv1D`, ...) > `global`. A config of `"none"` (TOML) or `None` (Python) keeps the layer in float.

TOML example (`lowbit quantize smollm2 -r my.toml -o out/`):

    name = "my-recipe"
    weight_threshold = 2048          # tensors with fewer elements stay float
    divisibility = "pad"             # input dim not divisible by the block: error | pad | skip
    nan_policy = "error"             # NaN/Inf in a weight: error | keep (that layer stays float)

    [global]
    format = "int4"
    block_size = 64                  # any Format field overrides the preset

    [types.Embedding]
    format = "int8"

    [names."model.layers.0.*"]
    format = "int8"

    [names."?lm_head"]               # a leading '?' makes a pattern optional
    format = "none"                  # (no error when the model has no such layer)

    [algorithm]
    name = "gptq"                    # rtn | clip | gptq | awq | awq+gptq | kmeans (palettes)
    damp = 0.01                      # options: damp, act_order, clip, block, samples, seq_len
    [algorithm.names]
    "model.layers.0.*" = "rtn"       # per-layer algorithm (exact name or glob)

    [validate]
    max_delta_ppl = 1.0              # percent of the float model's perplexity

    attention = "lowbit"             # fused attention kernels (GPU; the reference on CPU)
    kv_cache = "int8"                # generation's KV cache: "int8" | "int4" (default: float)
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .formats import Format
from .formats.presets import resolve

MODULE_TYPES = ("Linear", "Embedding", "Conv1D", "Conv1d", "Conv2d")
TOP_KEYS = {"name", "description", "global", "types", "names", "weight_threshold", "divisibility",
            "nan_policy", "edge_blocks", "edge_format", "algorithm", "validate", "attention", "kv_cache"}
ALGORITHMS = ("rtn", "clip", "gptq", "awq", "awq+gptq", "kmeans")  # lowbit.algorithms.layer
ALGORITHM_KEYS = {"name": str, "names": dict, "damp": float, "act_order": bool, "clip": bool, "block": int,
                  "samples": int, "seq_len": int, "awq_tokens": int}
VALIDATE_KEYS = {"max_delta_ppl", "max_kl_mean", "max_kl_p99", "min_top1_agreement", "min_cosine_mean",
                 "min_cosine_p1", "min_sqnr_db", "max_mae"}
_FORMAT_FIELDS = {f.name for f in dataclasses.fields(Format)} - {"name"}


class RecipeError(ValueError):
    """A recipe key, value or name pattern is wrong; the message names it and the fix."""


def _layer_config(value: Any, where: str) -> Format | None:
    """A layer config from "none"/None, a preset name, or a table {format = ..., <Format fields>}."""
    if value is None or value == "none" or value is False:
        return None
    if isinstance(value, str):
        value = {"format": value}
    if isinstance(value, Format):
        return value
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a preset name, 'none' or a table, got {type(value).__name__}")
    unknown = set(value) - _FORMAT_FIELDS - {"format"}
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: 'format' and Format fields {sorted(_FORMAT_FIELDS)}")
    overrides = {k: v for k, v in value.items() if k != "format"}
    base = value.get("format")
    if base in (None, "none"):
        if overrides:
            raise RecipeError(f"{where}: format = 'none' (keep float) takes no other keys")
        return None
    try:
        fmt = resolve(base, **overrides) if isinstance(base, str) else Format.from_dict({**base, **overrides})
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: {e}") from None
    return fmt


@dataclass(frozen=True)
class Recipe:
    """Per-layer formats and policies. Build with `Recipe.load(x)` from a built-in name, a TOML
    path, a dict or a Recipe.

    Example:
        >>> from lowbit.recipe import Recipe
        >>> r = Recipe.load({"global": "int4", "types": {"Embedding": "int8"}, "names": {"lm_head": "none"}})
        >>> r.config_for("model.layers.3.mlp.up_proj", "Linear").name, r.config_for("lm_head", "Linear")
        ('int4', None)
    """

    name: str = "custom"
    description: str = ""
    global_: Format | None = None
    types: dict[str, Format | None] = field(default_factory=dict)
    names: dict[str, Format | None] = field(default_factory=dict)
    weight_threshold: int = 0
    divisibility: str = "error"
    nan_policy: str = "error"
    edge_blocks: int = 0
    edge_format: Format | None = None
    algorithm: dict[str, Any] = field(default_factory=lambda: {"name": "rtn"})
    validate: dict[str, float] = field(default_factory=dict)
    attention: str | None = None      # "lowbit": lowbit's attention kernels (lowbit.attention)
    kv_cache: str | None = None       # "int8" | "int4": quantized KV cache for generation
    source: dict[str, Any] = field(default_factory=dict)  # the dict it was built from (manifest)

    # -- building -------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: "str | Path | dict | Recipe") -> "Recipe":
        """A Recipe from a built-in name, a `.toml` path, a dict, or a Recipe (returned as is)."""
        if isinstance(spec, Recipe):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if isinstance(spec, (str, Path)):
            from .recipes import BUILTIN

            if isinstance(spec, str) and spec in BUILTIN:
                return cls.from_dict(BUILTIN[spec])
            path = Path(spec)
            if path.suffix == ".toml" or path.exists():
                if not path.is_file():
                    raise RecipeError(f"recipe file {str(path)!r} does not exist")
                try:
                    data = tomllib.loads(path.read_text())
                except tomllib.TOMLDecodeError as e:
                    raise RecipeError(f"{path}: not valid TOML: {e}") from None
                data.setdefault("name", re.sub(r"[^A-Za-z0-9._+-]", "-", path.stem).lstrip("._+-") or "recipe")
                return cls.from_dict(data)
            close = difflib.get_close_matches(str(spec), list(BUILTIN), n=3)
            raise RecipeError(
                f"unknown recipe {spec!r}: not a built-in ({', '.join(BUILTIN)}) nor a .toml file"
                + (f"; did you mean {', '.join(close)}?" if close else "")
            )
        raise RecipeError(f"a recipe is a name, a .toml path, a dict or a Recipe; got {type(spec).__name__}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        unknown = set(d) - TOP_KEYS
        if unknown:
            raise RecipeError(f"recipe: unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
        types = d.get("types", {})
        if not isinstance(types, dict):
            raise RecipeError("recipe: 'types' must be a table of module type -> config")
        for t in types:
            if t not in MODULE_TYPES:
                close = difflib.get_close_matches(t, MODULE_TYPES, n=2)
                raise RecipeError(f"recipe: types.{t}: unknown module type; known: {list(MODULE_TYPES)}"
                                  + (f" (did you mean {close[0]}?)" if close else ""))
        names = d.get("names", {})
        if not isinstance(names, dict):
            raise RecipeError("recipe: 'names' must be a table of layer name or glob -> config")
        divisibility = d.get("divisibility", "error")
        if divisibility not in ("error", "pad", "skip"):
            raise RecipeError(f"recipe: divisibility={divisibility!r}; expected 'error', 'pad' or 'skip'")
        nan_policy = d.get("nan_policy", "error")
        if nan_policy not in ("error", "keep"):
            raise RecipeError(f"recipe: nan_policy={nan_policy!r}; expected 'error' or 'keep'")
        threshold = d.get("weight_threshold", 0)
        if not isinstance(threshold, int) or threshold < 0:
            raise RecipeError(f"recipe: weight_threshold must be an int >= 0, got {threshold!r}")
        edge_blocks = d.get("edge_blocks", 0)
        if not isinstance(edge_blocks, int) or edge_blocks < 0:
            raise RecipeError(f"recipe: edge_blocks must be an int >= 0, got {edge_blocks!r}")
        name = d.get("name", "custom")
        # `lowbit run` saves each recipe's package under its name: a plain folder name, never a path
        if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", name)):
            raise RecipeError(f"recipe: name={name!r}: a recipe name is a plain folder name (letters, digits, "
                              "'.', '_', '+', '-'; no path separators), since `lowbit run` saves its package under it")
        algorithm = _check_algorithm(d.get("algorithm", {"name": "rtn"}))
        validate = dict(d.get("validate", {}))
        bad = set(validate) - VALIDATE_KEYS
        if bad:
            raise RecipeError(f"recipe: validate: unknown threshold(s) {sorted(bad)}; known: {sorted(VALIDATE_KEYS)}")
        for key, limit in validate.items():  # a quoted number would fail only after the whole run
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit != limit:
                raise RecipeError(f"recipe: validate.{key} = {limit!r}: a threshold is a number (unquoted in TOML)")
        attention = d.get("attention")
        if attention not in (None, "none", "lowbit"):
            raise RecipeError(f"recipe: attention={attention!r}; expected 'lowbit' or 'none'")
        kv_cache = d.get("kv_cache")
        if kv_cache not in (None, "none"):
            from .attention.reference import KV_FORMATS

            if kv_cache not in KV_FORMATS:
                raise RecipeError(f"recipe: kv_cache={kv_cache!r}; expected one of {sorted(KV_FORMATS)} or 'none'")
        return cls(
            name=name,
            description=d.get("description", ""),
            global_=_layer_config(d.get("global"), "recipe: global"),
            types={t: _layer_config(v, f"recipe: types.{t}") for t, v in types.items()},
            names={n: _layer_config(v, f"recipe: names.{n!r}") for n, v in names.items()},
            weight_threshold=threshold,
            divisibility=divisibility,
            nan_policy=nan_policy,
            edge_blocks=edge_blocks,
            edge_format=_layer_config(d.get("edge_format"), "recipe: edge_format"),
            algorithm=algorithm,
            validate=validate,
            attention=None if attention == "none" else attention,
            kv_cache=None if kv_cache == "none" else kv_cache,
            source=dict(d),
        )

    def to_dict(self) -> dict[str, Any]:
        """The dict this recipe was built from (what a package manifest stores)."""
        return dict(self.source) if self.source else {"name": self.name}

    # -- resolving against a model --------------------------------------------------------
    def check_names(self, layer_names: Iterable[str]) -> None:
        """Every name pattern ([names] and [algorithm.names]) must match at least one layer; the
        error lists the closest names."""
        layer_names = list(layer_names)
        patterns = [("names", p) for p in self.names] + [("algorithm.names", p) for p in self.algorithm.get("names", {})]
        for table, pattern in patterns:
            if pattern.startswith("?"):  # optional pattern: fine when the model lacks the layer
                continue
            if not any(name_matches(pattern, n) for n in layer_names):
                close = difflib.get_close_matches(pattern, layer_names, n=4, cutoff=0.3)
                raise RecipeError(
                    f"recipe: {table}.{pattern!r} matches no quantizable layer"
                    + (f"; closest layer names: {', '.join(close)}" if close else "")
                    + " (patterns are exact names or globs such as 'model.layers.*.mlp.*')"
                )

    def algorithm_for(self, name: str) -> str:
        """The algorithm for layer `name`: [algorithm.names] (exact, then longest glob) > algorithm.name."""
        per = self.algorithm.get("names", {})
        if name in per:
            return per[name]
        globs = [p for p in per if name_matches(p, name)]
        return per[max(globs, key=len)] if globs else self.algorithm.get("name", "rtn")

    @property
    def needs_calibration(self) -> bool:
        """True when some layer's algorithm uses calibration data."""
        from .algorithms.layer import NEEDS_DATA

        used = {self.algorithm.get("name", "rtn"), *self.algorithm.get("names", {}).values()}
        return bool(used & NEEDS_DATA)

    def config_for(self, name: str, module_type: str, edge: bool = False) -> Format | None:
        """The format for layer `name` of type `module_type` (None = keep float)."""
        for exact in (name, "?" + name):
            if exact in self.names:
                return self.names[exact]
        globs = [p for p in self.names if name_matches(p, name)]
        if globs:
            return self.names[max(globs, key=len)]
        if edge:  # only asked when edge_blocks > 0 and the layer sits in a first / last block
            return self.edge_format
        if module_type in self.types:
            return self.types[module_type]
        return self.global_


def _check_algorithm(a: Any) -> dict[str, Any]:
    if isinstance(a, str):
        a = {"name": a}
    if not isinstance(a, dict):
        raise RecipeError(f"recipe: algorithm must be a name or a table, got {type(a).__name__}")
    a = dict(a)
    unknown = set(a) - set(ALGORITHM_KEYS)
    if unknown:
        raise RecipeError(f"recipe: algorithm: unknown key(s) {sorted(unknown)}; allowed: {sorted(ALGORITHM_KEYS)}")
    for k, v in a.items():
        want = ALGORITHM_KEYS[k]
        ok = isinstance(v, want) or (want is float and isinstance(v, int) and not isinstance(v, bool))
        if not ok or (want is int and isinstance(v, bool)):
            raise RecipeError(f"recipe: algorithm.{k}={v!r}: expected {want.__name__}")
    for where, alg in [("algorithm.name", a.get("name", "rtn"))] + [(f"algorithm.names.{k!r}", v) for k, v in a.get("names", {}).items()]:
        if alg not in ALGORITHMS:
            close = difflib.get_close_matches(str(alg), ALGORITHMS, n=1)
            raise RecipeError(f"recipe: {where}={alg!r}; available: {list(ALGORITHMS)}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
    return a


def name_matches(pattern: str, name: str) -> bool:
    """Whether a recipe name pattern (an exact name or a glob, "?" prefix = optional) matches `name`."""
    pattern = pattern.removeprefix("?")
    return pattern == name or fnmatch.fnmatchcase(name, pattern)
