"""Core ML export that carries lowbit's planes into iOS18 constexpr ops (no re-quantization).

Each quantized weight becomes Core ML's own compressed-weight ops (MIL opset iOS18):

    int family, symmetric      constexpr_blockwise_shift_scale(data=int4|int8, scale=fp32)
                               data = the signed integer q (int2 codes are widened to int4);
                               scale = lowbit's scale decoded to fp32 (fp16, bf16, fp32 and E8M0
                               scales are all exactly representable in fp32, 2^-127 included), one
                               per block of `block_size` input columns or (rows, 1) per channel.
    int family, affine         same op with data = uint4|uint8 codes and an offset:
                               w = code * scale + zero  ==  (code - offset) * scale.
                               Tried in order: an integer offset in the data's dtype (offset =
                               -zero / scale exactly), then an fp32 offset; each is accepted only if
                               the decompressed weight equals lowbit's bit for bit, else refused.
                               (lowbit's fp16 block-min zeros are rarely an integer multiple of the
                               scale, so `int4-asym` is usually refused.)
    lut family (lut1..lut8)    constexpr_lut_to_dense(indices=uint<bits> (rows, cols),
                               lut=(G, 1, 2^bits, 1)), G = rows / group_size (1 for group_size 0).
                               fp16 tables are stored as fp32 (same values) so the op yields fp32;
                               int8 tables stay int8 and a constexpr_blockwise_shift_scale on top
                               multiplies by lut_scale (per group of rows) times the per-row
                               `scale` when present, combined into one fp32 per-row scale
                               (fp16 * fp16 is exact in fp32, and int8 * (ls * s) rounds the same
                               real number once, as lowbit's (int8 * ls) * s does).
                               fp16 tables with per-channel scale: lut_to_dense -> shift_scale
                               (scale = fp32 per-row scale).

Refused (ValueError naming the layer, the format and the exact alternatives): the MX family,
the GGUF family, int blocks that do not divide the input dimension (lowbit pads, Core ML cannot),
non-2-D weights, affine formats whose zero cannot be written as an offset exactly.

Exactness. Every op built here is checked on the spot: coremltools' own numpy reference
(`constexpr_*.decompress`, the function its `materialized_val_inference` uses) applied to the
inputs must equal `qt.dequantize()` in fp32 (numeric equality, NaN-free). The model is
converted with compute_precision=FLOAT32 so that weights are fp32 and there is no fp16 rounding.

Model export (`export_coreml`; Hugging Face models go through `coreml_hf.export_coreml_hf`, which
traces a mask-free wrapper): a copy of the model with each `QuantLinear` / `QuantEmbedding` replaced
by an `nn.Linear` / `nn.Embedding` holding the dequantized fp32 weight (tied layers share one
Parameter) is traced and converted to a MIL program (convert_to="milinternal", iOS18, FLOAT32);
every const equal to one of those weights (matched by shape and exact value) is replaced by the
constexpr ops above, so a `gather` (embedding) or `linear` reads the decompressed table; the edited
program is then serialized as an ML program (empty pass pipeline, so nothing re-folds the weights).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..formats import QTensor
from ..formats.linear import codes_to_signed
from ..formats.packing import unpack
from ..formats.scales import decode_scale

EXACT_PRESETS: tuple[str, ...] = (
    "int8", "int4", "int4-e8m0", "int2-e8m0", "lut1", "lut2", "lut3", "lut4", "lut6", "lut8",
    "int8/int4 with any block_size dividing in_features", "lut* with group_size / per_channel_scale / lut_dtype='int8'",
)
_ALTERNATIVES = "int8, int4, int4-e8m0 (any block_size dividing in_features) or lut1..lut8 (any group_size, per_channel_scale, lut_dtype)"



class _DenseEmbedding(nn.Embedding):
    """The float stand-in traced for a `QuantEmbedding`: the gather, then the rows times `embed_scale`
    where the quantized layer has one (scaled word embeddings, e.g. Gemma's)."""

    embed_scale: float | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids)
        return rows if self.embed_scale is None else rows * self.embed_scale

def _ct():
    import coremltools as ct  # optional dependency: imported on use

    return ct


@dataclass
class CoreMLWeight:
    """Inputs of the constexpr op(s) that rebuild one weight in Core ML.

    op:          "constexpr_blockwise_shift_scale" or "constexpr_lut_to_dense"
    inputs:      numpy inputs of that op (data/scale/offset, or indices/lut); sub-byte arrays carry
                 coremltools' sub-byte numpy dtypes (np_int4_dtype, np_uint4_dtype, ...)
    post_scale:  fp32 (rows, 1) or (G, 1) scale of a constexpr_blockwise_shift_scale applied to
                 the LUT output, or None
    description: one line saying what was built
    storage_bits: bits per weight of the data/indices as Core ML stores them
    """

    op: str
    inputs: dict[str, np.ndarray]
    post_scale: np.ndarray | None = None
    description: str = ""
    storage_bits: int = 0
    extra_bytes: int = field(default=0)  # bytes of scales/offsets/LUTs as stored

    def decompress(self) -> np.ndarray:
        """The weight as coremltools' numpy reference decompresses it."""
        from coremltools.converters.mil.mil.ops.defs.iOS18 import compression as c

        if self.op == "constexpr_blockwise_shift_scale":
            return c.constexpr_blockwise_shift_scale.decompress(
                self.inputs["data"], self.inputs["scale"], self.inputs.get("offset"))
        w = c.constexpr_lut_to_dense.decompress(self.inputs["indices"], self.inputs["lut"], None)
        if self.post_scale is not None:
            w = c.constexpr_blockwise_shift_scale.decompress(w, self.post_scale, None)
        return w

    def build(self, mb: Any, name: str, before_op: Any = None) -> Any:
        """Add the op(s) to the MIL block being built; returns the output Var (fp32)."""
        kw = {} if before_op is None else {"before_op": before_op}
        if self.op == "constexpr_blockwise_shift_scale":
            args = {k: v for k, v in self.inputs.items() if v is not None}
            return mb.constexpr_blockwise_shift_scale(**args, name=name, **kw)
        out = mb.constexpr_lut_to_dense(
            indices=self.inputs["indices"], lut=self.inputs["lut"],
            name=name if self.post_scale is None else name + "_lut", **kw)
        if self.post_scale is not None:
            out = mb.constexpr_blockwise_shift_scale(data=out, scale=self.post_scale, name=name, **kw)
        return out


def _refuse(name: str, qt: QTensor, why: str) -> ValueError:
    return ValueError(
        f"layer {name!r}: format {qt.fmt.name or qt.fmt.family + '/' + qt.fmt.element} cannot be expressed exactly "
        f"in Core ML ({why}); exact alternatives: {_ALTERNATIVES}"
    )


def _sub_byte(arr: np.ndarray, kind: str) -> np.ndarray:
    from coremltools.converters.mil.mil import types

    return arr.astype(types.nptype_from_builtin(types.string_to_builtin(kind)))


def qtensor_to_coreml_op_inputs(qt: QTensor, name: str = "weight") -> CoreMLWeight:
    """Numpy inputs of the iOS18 constexpr op(s) that decompress to exactly `qt.dequantize()`.

    Raises ValueError (naming `name`, the format and exact alternatives) when no exact form exists.

    Example:
        >>> import torch, lowbit
        >>> w = qtensor_to_coreml_op_inputs(lowbit.quantize_tensor(torch.randn(8, 64), "int4"), "fc")
        >>> w.op, w.inputs["data"].shape, w.inputs["scale"].shape
        ('constexpr_blockwise_shift_scale', (8, 64), (8, 2))
    """
    fmt = qt.fmt
    if len(qt.shape) != 2:
        raise _refuse(name, qt, f"only 2-D weights are supported, got shape {qt.shape}")
    rows, cols = qt.shape
    planes = {k: v.detach().cpu() for k, v in qt.planes.items()}
    if fmt.family == "int":
        w = _int_inputs(qt, planes, name, rows, cols)
    elif fmt.family == "lut":
        w = _lut_inputs(qt, planes, rows, cols)
    else:
        raise _refuse(name, qt, f"Core ML has no {fmt.family} ({fmt.element}) element type")
    ref = qt.dequantize(torch.float32).cpu().numpy()
    got = w.decompress()
    if got.dtype != np.float32 or got.shape != ref.shape or not np.array_equal(got, ref):
        raise _refuse(name, qt, "the Core ML decompression would differ from lowbit's dequantized values")
    return w


def _int_inputs(qt: QTensor, planes: dict, name: str, rows: int, cols: int) -> CoreMLWeight:
    fmt = qt.fmt
    bits = fmt.bits
    b = fmt.block_size or cols
    if cols % b:
        raise _refuse(name, qt, f"block_size {b} does not divide in_features {cols} (lowbit pads, Core ML blocks cannot)")
    if bits > 8:
        raise _refuse(name, qt, f"{bits}-bit codes")
    codes = unpack(planes["data"], bits, qt.padded_cols)[:, :cols]
    scale = decode_scale(planes["scale"], fmt.scale_dtype).to(torch.float32).numpy()
    sbits = 4 if bits <= 4 else 8
    blk = "per channel" if fmt.block_size is None else f"block {b}"
    if fmt.zero != "float":
        q = codes_to_signed(codes, bits).to(torch.int16).numpy()
        data = _sub_byte(q.astype(np.int8), "int4") if sbits == 4 else q.astype(np.int8)
        return CoreMLWeight(
            "constexpr_blockwise_shift_scale", {"data": data, "scale": scale},
            description=f"{fmt.name}: int{sbits} data x fp32 scale ({blk})", storage_bits=sbits,
            extra_bytes=scale.size * 4)
    zero = planes["zero"].to(torch.float32).numpy()
    dkind = "uint4" if sbits == 4 else "uint8"
    data = _sub_byte(codes.numpy().astype(np.uint8), dkind) if sbits == 4 else codes.numpy().astype(np.uint8)
    ref = qt.dequantize(torch.float32).numpy()
    from coremltools.converters.mil.mil.ops.defs.iOS18 import compression as c

    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(scale != 0, -zero.astype(np.float64) / scale.astype(np.float64), 0.0)
    candidates = []
    if np.all(off == np.round(off)) and off.min() >= 0 and off.max() <= (1 << sbits) - 1:
        oi = off.astype(np.uint8)
        candidates.append((_sub_byte(oi, dkind) if sbits == 4 else oi, f"{dkind} offset"))
    candidates.append((off.astype(np.float32), "fp32 offset"))
    for offset, what in candidates:
        if np.array_equal(c.constexpr_blockwise_shift_scale.decompress(data, scale, offset), ref):
            return CoreMLWeight(
                "constexpr_blockwise_shift_scale", {"data": data, "scale": scale, "offset": offset},
                description=f"{fmt.name}: {dkind} data, fp32 scale, {what} ({blk})", storage_bits=sbits,
                extra_bytes=scale.size * 4 + offset.size * offset.itemsize)
    raise _refuse(name, qt, "the float zero point is not an exact offset (zero / scale) in Core ML's (data - offset) * scale")


def _lut_inputs(qt: QTensor, planes: dict, rows: int, cols: int) -> CoreMLWeight:
    fmt = qt.fmt
    bits = fmt.bits
    lut = planes["lut"]
    g_count, k = lut.shape
    codes = unpack(planes["data"], bits, cols).numpy().astype(np.uint8)
    indices = codes if bits == 8 else _sub_byte(codes, f"uint{bits}")
    post = None
    if fmt.lut_dtype == "int8":
        lut_np = lut.view(torch.int8).numpy().reshape(g_count, 1, k, 1) if lut.dtype == torch.uint8 else \
            lut.to(torch.int8).numpy().reshape(g_count, 1, k, 1)
        ls = planes["lut_scale"].to(torch.float32).numpy()  # (G, 1)
        if "scale" in planes:
            per_row = np.repeat(ls, rows // g_count, axis=0)
            post = (per_row * planes["scale"].to(torch.float32).numpy()).astype(np.float32)  # exact: 11 x 11 bits
        else:
            post = ls.astype(np.float32)
        table = "int8 LUT, fp32 scale (lut_scale" + (" x per-channel scale)" if "scale" in planes else ")")
    else:
        lut_np = lut.to(torch.float32).numpy().reshape(g_count, 1, k, 1)
        if "scale" in planes:
            post = planes["scale"].to(torch.float32).numpy()
        table = "fp16 LUT stored as fp32" + (", fp32 per-channel scale" if post is not None else "")
    groups = "one LUT" if g_count == 1 else f"{g_count} LUTs of {rows // g_count} rows"
    return CoreMLWeight(
        "constexpr_lut_to_dense", {"indices": indices, "lut": lut_np}, post_scale=post,
        description=f"{fmt.name}: uint{bits} indices, {table}, {groups}", storage_bits=bits,
        extra_bytes=lut_np.size * lut_np.itemsize + (0 if post is None else post.size * 4))


# ---------------------------------------------------------------------------------------------
# whole-model export
# ---------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What the exporter found in a model before converting anything."""

    quant: list[tuple[str, nn.Module]]          # QuantLinear / QuantEmbedding modules, by name
    weights: dict[str, CoreMLWeight]            # name -> constexpr op inputs (exact)
    float_layers: dict[str, str]                # name -> type of nn.Linear / nn.Embedding kept float


def plan_coreml(model: nn.Module) -> _Plan:
    """Check every quantized layer of `model` has an exact Core ML form; one ValueError lists all that do not.

    Example:
        >>> import torch, lowbit
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 32)); _ = lowbit.quantize(m, "int4", progress=False)
        >>> plan_coreml(m).weights["0"].op
        'constexpr_blockwise_shift_scale'
    """
    from ..nn.modules import QuantEmbedding, QuantLinear, _QuantWeight

    quant, weights, float_layers, errors = [], {}, {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            quant.append((name, mod))
            try:
                weights[name] = qtensor_to_coreml_op_inputs(mod.qweight, name)
            except ValueError as e:
                errors.append((name, str(e)))
        elif isinstance(mod, _QuantWeight):
            errors.append((name, f"layer {name!r}: {type(mod).__name__} is not supported by the Core ML exporter "
                                 "(QuantLinear and QuantEmbedding are); keep this layer float"))
        elif isinstance(mod, (nn.Linear, nn.Embedding)) and name:
            float_layers[name] = type(mod).__name__
    if errors:  # one line: the first refusal in full, then the names of the others
        others = [repr(n) for n, _ in errors[1:11]] + ([f"{len(errors) - 11} more"] if len(errors) > 11 else [])
        also = f"; also refused: {', '.join(others)}" if others else ""
        raise ValueError(f"{len(errors)} layer(s) cannot be exported to Core ML exactly: {errors[0][1]}{also}")
    return _Plan(quant, weights, float_layers)


def dense_copy(model: nn.Module, plan: _Plan) -> tuple[nn.Module, dict[str, np.ndarray]]:
    """A deep copy of `model` with every quantized module replaced by its float twin holding the
    dequantized fp32 weight (what gets traced), and name -> that weight. Tied layers (same planes,
    e.g. a Llama lm_head tied to the embedding) share one Parameter, so the trace holds one const."""
    from ..nn.modules import QuantEmbedding
    from .common import same_entry

    float_model = copy.deepcopy(model).eval().cpu()
    dense: dict[str, np.ndarray] = {}
    shared: list[tuple[QTensor, nn.Parameter]] = []
    for name, mod in plan.quant:
        qt = mod.qweight
        param = next((p for q, p in shared if same_entry(("q", q), ("q", qt))), None)
        if param is None:
            param = nn.Parameter(qt.dequantize(torch.float32).cpu(), requires_grad=False)
            shared.append((qt, param))
        if isinstance(mod, QuantEmbedding):
            new = _DenseEmbedding(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx)
            new.embed_scale = mod.embed_scale
        else:
            new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            if mod.bias is not None:
                new.bias = nn.Parameter(mod.bias.detach().float().cpu(), requires_grad=False)
        new.weight = param
        _set_module(float_model, name, new)
        dense[name] = param.detach().numpy()
    # Core ML computes in fp32 here (compute_precision=FLOAT32): trace fp32 float tensors too, after the
    # quantized modules are gone (their planes keep their own dtypes in the original model)
    return float_model.float(), dense


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _iter_ops(block):
    for op in list(block.operations):
        yield op
        for b in op.blocks:
            yield from _iter_ops(b)


def _key(arr: np.ndarray) -> tuple:
    import hashlib

    return arr.shape, hashlib.blake2b(np.ascontiguousarray(arr).view(np.uint8), digest_size=16).hexdigest()


def convert_with_constexpr(
    traced: Any, inputs: list, outputs: list | None, dense: dict[str, np.ndarray],
    weights: dict[str, CoreMLWeight], target: Any,
) -> Any:
    """Convert a traced float module (weights = `dense`) to an ML program in which each weight const
    is replaced by the constexpr op(s) of `weights[name]`. Nothing is re-quantized: the consts are
    found by exact value and swapped for ops built from lowbit's planes.

    Why an empty pass pipeline for the final step: the default one would fold constexpr ops back into
    dense consts. compute_precision=FLOAT32 keeps every weight and activation in fp32 (no fp16 rounding)."""
    ct = _ct()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.scope import ScopeInfo

    prog = ct.convert(
        traced, inputs=inputs, outputs=outputs, convert_to="milinternal",
        minimum_deployment_target=target, compute_precision=ct.precision.FLOAT32,
    )
    by_key: dict[tuple, list[str]] = {}
    for name, w in dense.items():
        by_key.setdefault(_key(w), []).append(name)
    shapes = {k[0] for k in by_key}
    found: set[str] = set()
    for func in prog.functions.values():
        for op in _iter_ops(func):
            if op.op_type != "const":
                continue
            val = op.outputs[0].val
            if not isinstance(val, np.ndarray) or val.dtype != np.float32 or val.shape not in shapes:
                continue
            names = by_key.get(_key(val))
            if not names:
                continue
            scopes = [ScopeInfo(source=k, data=list(v)) for k, v in op.scopes.items() if v]
            with op.enclosing_block, mb.scope(*scopes):
                new_var = weights[names[0]].build(mb, name=op.name + "_lowbit", before_op=op)
            op.enclosing_block.replace_uses_of_var_after_op(
                anchor_op=op, old_var=op.outputs[0], new_var=new_var, no_check_var_types=True)
            op.enclosing_block.remove_ops([op])
            found.update(names)
    missing = sorted(set(dense) - found)
    if missing:
        raise RuntimeError(
            f"could not find the converted weight const of layers {missing[:5]} in the Core ML program "
            "(the layer is unused by the traced forward, or coremltools folded it into another constant)")
    return ct.convert(
        prog, convert_to="mlprogram", minimum_deployment_target=target,
        compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True,
    )


def layer_table(plan: _Plan) -> dict[str, dict[str, Any]]:
    """layer -> {lowbit_format, target, exact, lowbit_bits, coreml_bits} for the export table: what each
    quantized layer became, and its bits/weight in lowbit vs as Core ML stores it (codes + fp32
    scales / offsets / LUTs), plus the layers kept float (fp32 consts)."""
    from .common import same_entry

    rows: dict[str, dict[str, Any]] = {}
    owners: list[tuple[str, QTensor]] = []
    for name, mod in plan.quant:
        qt, w = mod.qweight, plan.weights[name]
        owner = next((n for n, q in owners if same_entry(("q", q), ("q", qt))), None)
        owners.append((name, qt))
        if w.op == "constexpr_blockwise_shift_scale":
            ops = f"shift_scale {'uint' if 'offset' in w.inputs else 'int'}{w.storage_bits}"
        else:
            ops = f"lut_to_dense u{w.storage_bits}" + (" + shift_scale" if w.post_scale is not None else "")
        kind = "gather" if type(mod).__name__ == "QuantEmbedding" else "linear"
        rows[name] = {
            "lowbit_format": qt.fmt.name or f"{qt.fmt.family}/{qt.fmt.element}", "target": f"{ops} -> {kind}" + (f" (tied: {owner}'s table)" if owner else ""),
            "detail": w.description, "exact": True,
            "lowbit_bits": round(qt.bits_per_weight, 3), "coreml_bits": round(coreml_bits_per_weight(w, qt.numel), 3),
        }
    for name, typ in plan.float_layers.items():
        rows[name] = {"lowbit_format": "float", "target": "const fp32 (kept float)", "exact": True}
    return rows


def coreml_bits_per_weight(w: CoreMLWeight, numel: int) -> float:
    """Bits per weight as the .mlpackage stores `w`: codes at `storage_bits` plus scales/offsets/LUTs."""
    return (numel * w.storage_bits + 8 * w.extra_bytes) / max(numel, 1)


def check_target(target: Any) -> Any:
    ct = _ct()
    target = target or ct.target.iOS18
    if target < ct.target.iOS18:
        raise ValueError("constexpr_blockwise_shift_scale / iOS18 constexpr_lut_to_dense need "
                         "minimum_deployment_target >= iOS18 (macOS15)")
    return target


def export_coreml(
    model: nn.Module,
    out_path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    force: bool = False,
    minimum_deployment_target: Any = None,
) -> dict[str, Any]:
    """Write `model` (with lowbit `QuantLinear` / `QuantEmbedding` layers) as an `.mlpackage` whose
    weights are the lowbit planes re-expressed as iOS18 constexpr ops (no re-quantization).

    For Hugging Face transformers use `lowbit.export.coreml_hf.export_coreml_hf` (or
    `lowbit export PKG --to coreml`), which traces a mask-free wrapper. Returns
    {"path", "tensors": layer_table rows, "weights": name -> CoreMLWeight}. Raises ValueError for
    formats without an exact Core ML form (before converting anything), FileExistsError when
    `out_path` exists and not `force`.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 32)); _ = lowbit.quantize(m, "int4", progress=False)  # doctest: +SKIP
        >>> export_coreml(m, "out/mlp.mlpackage", torch.randn(1, 64))["tensors"]["0"]["target"]  # doctest: +SKIP
        'constexpr_blockwise_shift_scale -> linear'
    """
    ct = _ct()
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise FileExistsError(f"{out_path} exists; pass force=True (--force) to overwrite it")
    target = check_target(minimum_deployment_target)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    plan = plan_coreml(model)  # refuse early
    float_model, dense = dense_copy(model, plan)
    with torch.no_grad():
        traced = torch.jit.trace(float_model, example_inputs)
    inputs = [ct.TensorType(name=f"input_{i}", shape=tuple(x.shape),
                            dtype=np.int32 if not x.is_floating_point() else np.float32)
              for i, x in enumerate(example_inputs)]
    mlmodel = convert_with_constexpr(traced, inputs, None, dense, plan.weights, target)
    save_atomic(mlmodel, out_path, force)
    return {"path": str(out_path), "tensors": layer_table(plan), "weights": plan.weights}


def save_atomic(mlmodel: Any, out_path: Path, force: bool) -> None:
    """Save into a temporary sibling folder, then rename: an interrupted export leaves the old
    package (or none), never a half-written one."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".lowbit-coreml-", dir=out_path.parent))
    try:
        tmp = tmp_dir / out_path.name
        mlmodel.save(str(tmp))
        if out_path.exists():
            if not force:
                raise FileExistsError(f"{out_path} exists; pass force=True (--force) to overwrite it")
            os.replace(out_path, tmp_dir / (out_path.name + ".old"))
        os.replace(tmp, out_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
