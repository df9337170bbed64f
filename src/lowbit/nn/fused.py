"""Sibling projections fused into one matmul (q / k / v, gate / up), quantized or float.

In a decoder layer q_proj, k_proj and v_proj read the same activations, and so do gate_proj and
up_proj. Run one after the other they are three (two) kernel launches, each paying the fixed cost
of a launch and of filling the memory pipeline (about 2.4 us per launch on an H200, more than the
whole 4096 x 1024 k / v projection's read at batch 1: benchmarks/RESULTS.md). `fuse_projections`
joins their quantized weights along the output rows into one `QuantLinear` that runs once per
input; the members become `FusedSlice`s that hand out their columns of its output.

Joining rows is exact: every format here quantizes each row on its own (scales per row block,
per channel, or palettes per group of rows), so the joined planes are the members' planes one
after the other, and each output column equals the member's own (same codes, same kernel math).

How the members share one run without changing the model's code: the first member called with
an input runs the joined matmul and keeps its output; the others, called with the same tensor
object (unchanged: its version counter is checked; under `torch.inference_mode` tensors keep no
counter, so there the same object counts as the same input), take their columns from it; once
every member has had it, the kept output is let go. A member called with any other input runs
the joined matmul again (correct, only slower). Under `torch.compile` each member runs the joined
matmul and the compiler sees identical calls (no state is kept while tracing).

Fusion is a run-time transform: apply it after loading a model (packages keep the separate
layers); `state_dict` of a fused model holds the joined planes under the first member's parent.

Example:
    >>> import torch, lowbit
    >>> from lowbit.nn import QuantLinear, fuse_projections
    >>> attn = torch.nn.Module()
    >>> for name, n in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
    ...     setattr(attn, name, QuantLinear.from_float(torch.nn.Linear(64, n, bias=False), "int8"))
    >>> x = torch.randn(3, 64)
    >>> before = attn.k_proj(x)
    >>> fuse_projections(attn)
    ['q_proj+k_proj+v_proj']
    >>> torch.equal(attn.k_proj(x), before), attn.q_proj(x).shape
    (True, torch.Size([3, 64]))
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import QTensor
from .modules import QuantLinear

# sibling groups by transformers' module names: the Llama / Mistral / Qwen family, BERT-family self-attention
DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                               ("query", "key", "value"))


class _Shared:
    """The joined matmul's output for the last input, until every member has taken its columns:
    one tuple (input, its version, output, members still to serve), replaced whole, so that threads
    sharing a model never pair one call's input with another's output."""

    __slots__ = ("state",)

    def __init__(self):
        self.state = None


class FusedSlice(nn.Module):
    """One member of a fused group: columns [start, stop) of the joined `QuantLinear`'s output.

    The joined layer is registered once, on the parent module (`fuse_projections`); a slice keeps a
    plain reference to it, so the planes are stored and moved once."""

    def __init__(self, joined: QuantLinear, shared: _Shared, start: int, stop: int, members: int):
        super().__init__()
        self.__dict__["joined"] = joined  # not a submodule: registered on the parent
        self.__dict__["shared"] = shared
        self.start, self.stop, self.members = start, stop, members
        self.in_features, self.out_features = joined.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined, sh = self.joined, self.shared
        if torch.compiler.is_compiling():
            return joined(x)[..., self.start:self.stop]
        state = sh.state
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version counter
        if state is not None and state[0] is x and state[1] == version and state[3] > 0:
            out, left = state[2], state[3] - 1
        else:
            out, left = joined(x), self.members - 1
        # kept until every member has had it (then let go: no activations kept alive between calls)
        sh.state = (x, version, out, left) if left > 0 else None
        return out[..., self.start:self.stop]

    @property
    def fmt(self):
        return getattr(self.joined, "fmt", None)  # None for joined float layers

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, columns {self.start}:{self.stop} "
                f"of {self.joined.layer_name}")


def first_fused(model: nn.Module) -> str | None:
    """The name of the first fused member in `model` (None when nothing is fused): for the steps
    that want the separate layers (saving a package, quantizing) to refuse with a clear message."""
    from .gated import GatedMLP

    return next((n for n, m in model.named_modules() if isinstance(m, (FusedSlice, GatedMLP))), None)


def join_rows(parts: list[QTensor]) -> QTensor:
    """The QTensors' rows one after the other, as one QTensor (same format, same columns).

    Example:
        >>> import torch, lowbit
        >>> a, b = (lowbit.quantize_tensor(torch.randn(n, 64), "int4") for n in (32, 16))
        >>> j = join_rows([a, b])
        >>> j.shape, torch.equal(j.dequantize()[32:], b.dequantize())
        ((48, 64), True)
    """
    first = parts[0]
    for p in parts[1:]:
        if p.fmt != first.fmt:
            raise ValueError(f"join_rows: formats differ ({first.fmt.name} vs {p.fmt.name})")
        if len(p.shape) != 2 or p.shape[1:] != first.shape[1:]:
            raise ValueError(f"join_rows: column counts differ ({first.shape} vs {p.shape})")
        if p.device != first.device:
            raise ValueError(f"join_rows: planes on {first.device} and {p.device}")
    fmt = first.fmt
    if fmt.family == "lut":
        g = fmt.group_size
        if not g:  # one palette per tensor: the members' palettes differ
            raise ValueError(f"join_rows: {fmt.name} has one palette per tensor (group_size=0); rows cannot be joined")
        bad = [p.shape[0] for p in parts if p.shape[0] % g]
        if bad:
            raise ValueError(f"join_rows: {bad} rows do not fill whole palette groups of {g}")
    planes = {name: torch.cat([p.planes[name] for p in parts]) for name in first.planes}
    return QTensor(planes, fmt, (sum(p.shape[0] for p in parts), *first.shape[1:]))


def _joinable(mods: list[nn.Module]) -> str | None:
    """Why these modules cannot be fused (None: they can)."""
    if all(type(m) is nn.Linear for m in mods):  # float layers (e.g. the float model, for comparisons)
        if len({(m.weight.dtype, m.weight.device, m.in_features) for m in mods}) > 1:
            return "dtypes, devices or input sizes differ"
        return None
    if not all(type(m) is QuantLinear for m in mods):
        return "not all are QuantLinear (or all nn.Linear)"
    fmts = {m.fmt for m in mods}
    if len(fmts) > 1:
        return "formats differ: " + ", ".join(sorted(f.name for f in fmts))
    if len({m.in_features for m in mods}) > 1:
        return "input sizes differ"
    f = mods[0].fmt
    if f.family == "lut" and (not f.group_size or any(m.out_features % f.group_size for m in mods)):
        return "palettes are not per whole row groups"
    return None


def _join(mods: list[nn.Module]) -> nn.Module:
    """One layer computing all members' outputs, side by side along the last dimension."""
    biases = [m.bias for m in mods]
    bias = None
    if any(b is not None for b in biases):
        ref = next(b for b in biases if b is not None)
        bias = torch.cat([b.detach() if b is not None else ref.new_zeros(m.out_features) for b, m in zip(biases, mods)])
    if type(mods[0]) is nn.Linear:
        w = mods[0].weight
        joined = nn.Linear(w.shape[1], sum(m.out_features for m in mods), bias=bias is not None, device=w.device,
                           dtype=w.dtype)
        with torch.no_grad():
            joined.weight.copy_(torch.cat([m.weight for m in mods]))
            if bias is not None:
                joined.bias.copy_(bias)
        return joined.requires_grad_(False)
    return QuantLinear(join_rows([m.qweight for m in mods]), bias)


def fuse_projections(model: nn.Module, groups: tuple[tuple[str, ...], ...] = DEFAULT_GROUPS,
                     gated_mlp: bool = False, skipped: dict[str, str] | None = None) -> list[str]:
    """Fuse each group of sibling layers (children of one module with these names, e.g. q_proj /
    k_proj / v_proj) into one joined matmul; returns the fused groups' names. The members must be
    all `QuantLinear`s of one format, or all float `nn.Linear`s of one dtype (the float model, for
    a like-for-like comparison; fused for inference: the joined weight does not require grad), with
    one input size; any other group is left as it is.
    `gated_mlp`: first replace quantized gated MLPs (Llama family) by `lowbit.nn.gated.GatedMLP`, whose
    joined gate / up matmul applies silu(gate) * up in its epilogue (one launch fewer per layer at
    batch 1 on CUDA); their names end in "gate_proj+up_proj" like the plain fusion's.
    `skipped` (a dict): filled with the groups whose members are all there but were left as they
    are, name -> why (e.g. "formats differ: int4, int8" in a mixed-precision model).

    Example: see the module docstring (`lowbit.nn.fused`)."""
    done = []
    if gated_mlp:
        from .gated import fuse_gated_mlp

        done += [f"{n}.gate_proj+up_proj" for n in fuse_gated_mlp(model)]
    for pname, parent in list(model.named_modules()):
        for names in groups:
            mods = [getattr(parent, n, None) for n in names]
            if any(m is None for m in mods):
                continue
            label = "+".join(names)
            why = _joinable(mods)
            if why is not None:
                if skipped is not None and not any(isinstance(m, FusedSlice) for m in mods):
                    skipped[f"{pname}.{label}" if pname else label] = why
                continue
            joined = _join(mods)
            joined._lowbit_name = f"{pname}.{label}" if pname else label
            parent.add_module(label.replace("+", "_"), joined)
            shared, start = _Shared(), 0
            for n, m in zip(names, mods):
                sl = FusedSlice(joined, shared, start, start + m.out_features, len(names))
                sl._lowbit_name = getattr(m, "_lowbit_name", n)
                setattr(parent, n, sl)
                start += m.out_features
            done.append(joined._lowbit_name)
    return done


def unfuse_projections(model: nn.Module) -> list[str]:
    """Undo `fuse_projections`: each `FusedSlice` becomes a layer of its own again (its rows of the
    joined planes, as views: no copy), and the joined layers are removed (gated MLPs: the original
    module comes back, `lowbit.nn.gated.unfuse_gated_mlp`); returns their names.

    Example:
        >>> import torch
        >>> from lowbit.nn import QuantLinear, fuse_projections, unfuse_projections
        >>> mlp = torch.nn.Module()
        >>> mlp.gate_proj, mlp.up_proj = (QuantLinear.from_float(torch.nn.Linear(32, 64), "int4") for _ in range(2))
        >>> fuse_projections(mlp), unfuse_projections(mlp), type(mlp.up_proj).__name__
        (['gate_proj+up_proj'], ['gate_proj+up_proj'], 'QuantLinear')
    """
    from .gated import unfuse_gated_mlp

    done = [f"{n}.gate_proj+up_proj" for n in unfuse_gated_mlp(model)]
    for _, parent in list(model.named_modules()):
        joined_seen = {}
        for cname, child in list(parent.named_children()):
            if not isinstance(child, FusedSlice):
                continue
            joined, a, b = child.joined, child.start, child.stop
            bias = None if joined.bias is None else joined.bias.detach()[a:b]
            if isinstance(joined, QuantLinear):
                member = QuantLinear(joined.qweight[a:b], bias)
            else:
                member = nn.Linear(joined.in_features, b - a, bias=bias is not None, device=joined.weight.device,
                                   dtype=joined.weight.dtype)
                member.weight = nn.Parameter(joined.weight.detach()[a:b], requires_grad=False)
                if bias is not None:
                    member.bias = nn.Parameter(bias, requires_grad=False)
            if hasattr(child, "_lowbit_name"):
                member._lowbit_name = child._lowbit_name
            setattr(parent, cname, member)
            joined_seen[id(joined)] = joined
        for jname, mod in list(parent.named_children()):
            if id(mod) in joined_seen:
                delattr(parent, jname)
                done.append(getattr(mod, "_lowbit_name", jname))
    return done
