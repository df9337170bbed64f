"""A gated MLP's gate and up projections as one matmul whose epilogue applies the activation.

Llama-family MLPs compute `down_proj(silu(gate_proj(x)) * up_proj(x))`. `fuse_gated_mlp` joins the
quantized gate and up weights row by row (gate row j, then up row j: `interleave_rows`) into one
`GatedQuantLinear` that returns `silu(gate) * up` directly: at batch 1 on CUDA the GEMV computes both
rows of a pair in the same program and writes only their product (kernels/triton_gemv.py, `GLU`),
so the separate SiLU * up kernel and its launch go away and half as many values are written.
Elsewhere it is the joined matmul followed by the product: on CPU (and under torch.compile, and
with `force_backend`) `kernels.reference.silu_mul_pairs`, which takes it as the unfused model does
(the same numbers, exactly), on CUDA above M = 1 one Triton launch (fp32). The MLP module is replaced by a `GatedMLP` (gate / up joined,
the same `down_proj`); `unfuse_gated_mlp` puts the original module back with its own layers.

Interleaving is exact (every format here quantizes each row on its own); the CUDA kernels' products
differ from the unfused model's only by rounding: they take silu(gate) * up from fp32 values, the
unfused model from outputs rounded to the activation dtype.

Which modules: a module whose class name ends in "MLP", with `gate_proj`, `up_proj` (QuantLinear,
one format, not palettes shared across rows) and `down_proj`, and a SiLU `act_fn` (transformers'
LlamaMLP, MistralMLP, Qwen2MLP, ...). Use `lowbit.nn.fuse_projections(model, gated_mlp=True)` to
do this and the q / k / v fusion together.

Example:
    >>> import torch, lowbit
    >>> from lowbit.nn import QuantLinear
    >>> from lowbit.nn.gated import fuse_gated_mlp, unfuse_gated_mlp
    >>> class MLP(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gate_proj, self.up_proj = (QuantLinear.from_float(torch.nn.Linear(64, 96), "int8") for _ in "gu")
    ...         self.down_proj = QuantLinear.from_float(torch.nn.Linear(96, 64), "int8")
    ...         self.act_fn = torch.nn.SiLU()
    ...     def forward(self, x):
    ...         return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    >>> block = torch.nn.Sequential(MLP())
    >>> x = torch.randn(2, 64)
    >>> before = block(x)
    >>> fuse_gated_mlp(block)
    ['0']
    >>> torch.allclose(block(x), before, atol=1e-4), type(block[0]).__name__
    (True, 'GatedMLP')
    >>> unfuse_gated_mlp(block), type(block[0]).__name__
    (['0'], 'MLP')
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import QTensor
from ..kernels import dispatch
from ..kernels.reference import silu_mul_pairs
from ..kernels import registry
from ..kernels.registry import forced_backend, select
from .modules import QuantLinear


def interleave_rows(gate: QTensor, up: QTensor) -> QTensor:
    """One QTensor whose rows are gate row 0, up row 0, gate row 1, up row 1, ... (same format and
    columns; every plane is per row).

    Example:
        >>> import torch, lowbit
        >>> g, u = (lowbit.quantize_tensor(torch.randn(8, 64), "int4") for _ in "gu")
        >>> j = interleave_rows(g, u)
        >>> j.shape, torch.equal(j.dequantize()[1::2], u.dequantize())
        ((16, 64), True)
    """
    if gate.fmt != up.fmt:
        raise ValueError(f"interleave_rows: formats differ ({gate.fmt.name} vs {up.fmt.name})")
    if len(gate.shape) != 2 or gate.shape != up.shape:
        raise ValueError(f"interleave_rows: gate {gate.shape} and up {up.shape} must be 2-D and alike")
    if gate.device != up.device:
        raise ValueError(f"interleave_rows: planes on {gate.device} and {up.device}")
    rows = gate.shape[0]
    planes = {}
    for name, g in gate.planes.items():
        u = up.planes[name]
        if g.shape[:1] != (rows,):
            raise ValueError(f"interleave_rows: {gate.fmt.name}'s {name!r} plane is not one entry per row "
                             f"({tuple(g.shape)} for {rows} rows)")
        planes[name] = torch.stack((g, u), 1).reshape(2 * rows, *g.shape[1:])
    return QTensor(planes, gate.fmt, (2 * rows, *gate.shape[1:]))


def split_pairs(joined: QTensor) -> tuple[QTensor, QTensor]:
    """The inverse of `interleave_rows`: (gate, up), each with its own contiguous planes."""
    rows = joined.shape[0] // 2
    halves = ({n: p[j::2].contiguous() for n, p in joined.planes.items()} for j in (0, 1))
    return tuple(QTensor(planes, joined.fmt, (rows, *joined.shape[1:])) for planes in halves)


class GatedQuantLinear(QuantLinear):
    """A QuantLinear over (gate, up) row pairs that returns silu(gate) * up: (..., K) -> (..., N / 2).
    The Triton kernel table's `glu_linear` entry where one runs (CUDA), else the layer's own linear
    kernel followed by `silu_mul_pairs`; `force_backend("linear", ...)` takes the second way."""

    def __init__(self, qweight: QTensor, bias: torch.Tensor | None = None):
        super().__init__(qweight, bias)
        if self.out_features % 2:
            raise ValueError(f"GatedQuantLinear needs (gate, up) row pairs, got {self.out_features} rows")
        self.out_features //= 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qw = self.qweight
        key = ("glu_fused", x.device.type, x.dtype, registry._generation)  # as `dispatch` keys its choice
        fused = qw.kernel_cache.get(key)
        if fused is None:
            try:
                fused = select(qw.fmt, "glu_linear", x.device.type, shape=qw.shape, dtype=x.dtype)[0] == "triton"
            except LookupError:
                fused = False
            qw.kernel_cache[key] = fused
        if fused and forced_backend("linear", self.layer_name) in (None, "triton"):
            return dispatch("glu_linear", x, qw, self.bias, owner=self.layer_name)
        return silu_mul_pairs(dispatch("linear", x, qw, self.bias, owner=self.layer_name))


class GatedMLP(nn.Module):
    """down_proj(silu(gate) * up) with gate and up in one `GatedQuantLinear` (`fuse_gated_mlp`); keeps
    the module it replaced (without its gate / up layers) to put back on `unfuse_gated_mlp`."""

    def __init__(self, gate_up: GatedQuantLinear, down_proj: nn.Module, original: nn.Module):
        super().__init__()
        self.gate_up = gate_up
        self.down_proj = down_proj
        self.__dict__["original"] = original  # not a submodule: its layers live here while fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up(x))


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _why_not(mod: nn.Module) -> str | None:
    """Why `mod` is not a gated MLP that can be fused (None: it is)."""
    if not type(mod).__name__.endswith("MLP"):
        return "not an MLP module"
    gate, up, down = (getattr(mod, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if not (type(gate) is QuantLinear and type(up) is QuantLinear and isinstance(down, nn.Module)):
        return "gate_proj / up_proj are not both QuantLinear (or no down_proj)"
    if not _is_silu(getattr(mod, "act_fn", None)):
        return "its act_fn is not SiLU"
    if gate.fmt != up.fmt or gate.weight_shape != up.weight_shape:
        return "gate and up differ in format or shape"
    if any(p.shape[:1] != (gate.out_features,) for p in gate.qweight.planes.values()):
        return f"{gate.fmt.name} has planes shared across rows"
    return None


def fuse_gated_mlp(model: nn.Module) -> list[str]:
    """Replace each gated MLP (module docstring) by a `GatedMLP`; returns the replaced modules' names.

    Example: see the module docstring (`lowbit.nn.gated`)."""
    done = []
    for pname, parent in list(model.named_modules()):
        for cname, mod in list(parent.named_children()):
            if _why_not(mod) is not None:
                continue
            name = f"{pname}.{cname}" if pname else cname
            gate, up = mod.gate_proj, mod.up_proj
            bias = None
            if gate.bias is not None or up.bias is not None:
                gb = gate.bias if gate.bias is not None else torch.zeros_like(up.bias)
                ub = up.bias if up.bias is not None else torch.zeros_like(gate.bias)
                bias = torch.stack((gb.detach(), ub.detach()), 1).reshape(-1)
            gate_up = GatedQuantLinear(interleave_rows(gate.qweight, up.qweight), bias)
            gate_up._lowbit_name = f"{name}.gate_proj+up_proj"
            down = mod.down_proj
            for n in ("gate_proj", "up_proj", "down_proj"):
                delattr(mod, n)  # the original keeps no weights while fused
            mod.__dict__["_lowbit_gated_names"] = (getattr(gate, "_lowbit_name", None), getattr(up, "_lowbit_name", None),
                                                   gate.bias is not None, up.bias is not None)
            setattr(parent, cname, GatedMLP(gate_up, down, mod))
            done.append(name)
    return done


def unfuse_gated_mlp(model: nn.Module) -> list[str]:
    """Undo `fuse_gated_mlp`: each `GatedMLP` becomes its original module again, with gate_proj and
    up_proj split back out of the joined planes (copies; the joined planes are let go); returns
    the names."""
    done = []
    for pname, parent in list(model.named_modules()):
        for cname, mod in list(parent.named_children()):
            if not isinstance(mod, GatedMLP):
                continue
            orig = mod.original
            gname, uname, gbias, ubias = orig.__dict__.pop("_lowbit_gated_names")
            g, u = split_pairs(mod.gate_up.qweight)
            b = mod.gate_up.bias
            orig.gate_proj = QuantLinear(g, b.detach()[0::2].clone() if gbias else None)
            orig.up_proj = QuantLinear(u, b.detach()[1::2].clone() if ubias else None)
            for layer, n in ((orig.gate_proj, gname), (orig.up_proj, uname)):
                if n is not None:
                    layer._lowbit_name = n
            orig.down_proj = mod.down_proj
            setattr(parent, cname, orig)
            done.append(f"{pname}.{cname}" if pname else cname)
    return done


def first_gated(model: nn.Module) -> str | None:
    """The name of the first `GatedMLP` in `model` (None when there is none)."""
    return next((n for n, m in model.named_modules() if isinstance(m, GatedMLP)), None)
