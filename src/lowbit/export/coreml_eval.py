"""Evaluate an exported `.mlpackage` on Linux, in numpy, with coremltools' own op definitions.

The Core ML runtime only exists on Apple platforms, so `MLModel.predict` cannot check an export
here. But every MIL op in coremltools carries a numpy `value_inference` (what its constant folding
uses), and the iOS18 constexpr ops a `materialized_val_inference` (their decompression). Running
those in program order on concrete inputs evaluates the program that was written to disk — read
back from the package, weights decompressed from the stored codes — as a reference check of the
conversion: it is not the Apple runtime (kernels, fp16 paths and op fusions there can differ).

Ops without a usable numpy definition in coremltools 9 get one here (`_FALLBACK`); an op with
neither raises NotImplementedError naming it.
"""

from __future__ import annotations

import math
import os
import types as _types
from typing import Any

import numpy as np


def _axes(op: Any) -> tuple[int, ...] | None:
    return None if op.axes is None or op.axes.val is None else tuple(int(a) for a in np.atleast_1d(op.axes.val))


def _keep(op: Any) -> bool:
    return bool(op.keep_dims.val) if op.keep_dims is not None else False


def _layer_norm(op: Any) -> np.ndarray:
    x = op.x.val.astype(np.float32)
    ax = _axes(op) or (x.ndim - 1,)
    mean = x.mean(axis=ax, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=ax, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(op.epsilon.val))
    if op.gamma is not None:
        y = y * op.gamma.val
    if op.beta is not None:
        y = y + op.beta.val
    return y.astype(np.float32)


_erf = np.frompyfunc(math.erf, 1, 1)  # no scipy needed


def _gelu(op: Any) -> np.ndarray:
    x = op.x.val.astype(np.float64)
    mode = op.mode.val if op.mode is not None else "EXACT"
    if mode == "EXACT":
        y = 0.5 * x * (1 + _erf(x / np.sqrt(2)).astype(np.float64))
    else:  # TANH_APPROXIMATION
        y = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return y.astype(np.float32)


_FALLBACK = {
    "silu": lambda op: (op.x.val / (1 + np.exp(-op.x.val))).astype(np.float32),
    "reduce_mean": lambda op: np.mean(op.x.val, axis=_axes(op), keepdims=_keep(op)).astype(np.float32),
    "layer_norm": _layer_norm,
    "gelu": _gelu,
    "tanh": lambda op: np.tanh(op.x.val).astype(np.float32),
    "erf": lambda op: _erf(op.x.val.astype(np.float64)).astype(np.float32),
}


def _set(var: Any, value: Any) -> None:
    var._sym_val = _types.SimpleNamespace(val=value)  # what Var.val reads


def _as_declared(var: Any, value: Any) -> Any:
    """numpy promotes (int / int -> float64, fp32 op fp64 -> fp64); Core ML computes in the dtype the
    program declares, so each result is cast to its var's dtype."""
    from coremltools.converters.mil.mil import types

    try:
        dt = types.nptype_from_builtin(var.dtype)
    except Exception:  # pragma: no cover - list / state types
        return value
    if isinstance(value, np.ndarray) or np.isscalar(value):
        return np.asarray(value).astype(dt) if np.ndim(value) else dt(value)
    return value


def _concrete_types(op: Any) -> None:
    """Give a flexible-shape op concrete input and output types from the values computed so far:
    several value_inference functions read shapes from the (symbolic) types, not from the values."""
    from coremltools.converters.mil.mil import types

    for var in op.inputs.values():
        for v in var if isinstance(var, (list, tuple)) else (var,):
            val = v.val if v.op is None or v.op.op_type != "const" else None
            if isinstance(val, np.ndarray) and val.ndim and types.is_tensor(v.sym_type):
                v._sym_type = types.tensor(v.dtype, tuple(val.shape))
    out_types = op.type_inference()
    for out, t in zip(op.outputs, out_types if isinstance(out_types, tuple) else (out_types,)):
        out._sym_type = t


def evaluate_mlpackage(path: str | os.PathLike, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the `.mlpackage` at `path` on `inputs` (name -> array) in numpy; returns name -> output.

    Example:
        >>> out = evaluate_mlpackage("out/smollm2.mlpackage", {"input_ids": ids})   # doctest: +SKIP
        >>> out["logits"].shape                                                       # doctest: +SKIP
        (1, 128, 49152)
    """
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.models.utils import _convert_model_spec_to_pymil_prog

    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    ml = ct.models.MLModel(str(path), skip_model_load=True)
    prog = _convert_model_spec_to_pymil_prog(ml, ml.get_spec().specificationVersion, milproto_load)
    func = prog.functions["main"]
    flexible = any(is_symbolic(d) for var in func.inputs.values() for d in getattr(var, "shape", ()))
    for name, var in func.inputs.items():
        if name not in inputs:
            raise ValueError(f"missing input {name!r} (the package takes {list(func.inputs)})")
        _set(var, np.asarray(inputs[name]).astype(var.dtype.get_dtype() if hasattr(var.dtype, "get_dtype") else np.int32))
    for op in func.operations:
        if op.op_type == "const":
            continue
        if flexible:
            _concrete_types(op)
        try:
            if op.op_type in _FALLBACK:
                val = _FALLBACK[op.op_type](op)
            elif op.op_type.startswith("constexpr_"):
                val = op.materialized_val_inference()
            else:
                val = op.value_inference()
        except NotImplementedError as e:
            raise NotImplementedError(f"op {op.name} ({op.op_type}): no numpy evaluation ({e})") from e
        vals = val if isinstance(val, (tuple, list)) else (val,)
        for out, v in zip(op.outputs, vals):
            _set(out, _as_declared(out, v))
    return {v.name: np.asarray(v.val) for v in func.outputs}
