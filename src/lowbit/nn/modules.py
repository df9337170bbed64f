"""Modules holding `QTensor` weights. Forward goes through the kernel table (kernels/registry.py).

The planes are registered as buffers named `weight_<plane>` (so `.to(device)`, `state_dict` and
memory-mapped loading work as for any module); the `Format` and logical shape are plain attributes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import Format, QTensor
from ..kernels import dispatch
from ..kernels import cpu as _cpu  # noqa: F401  (registers the CPU fast paths)
from ..kernels import reference as _reference  # noqa: F401  (registers the reference backend)
from ..kernels import triton_linear as _triton  # noqa: F401  (registers the Triton kernels when Triton imports)


class _QuantWeight(nn.Module):
    """Shared plumbing: planes as buffers, `qweight` rebuilt on access (cheap: no copies)."""

    def _set_qweight(self, qweight: QTensor) -> None:
        self.fmt: Format = qweight.fmt
        self.weight_shape: tuple[int, ...] = qweight.shape
        self.plane_names: tuple[str, ...] = tuple(qweight.planes)
        for name, tensor in qweight.planes.items():
            self.register_buffer(f"weight_{name}", tensor)

    @property
    def qweight(self) -> QTensor:
        """The planes as a QTensor. The same object while the plane buffers are the same tensor
        objects (a new one after `.to()`, a reassignment or a load that replaces them), so that the
        kernels' per-weight caches (`QTensor.kernel_cache`) survive from call to call."""
        bufs = self._buffers
        planes = tuple(bufs[f"weight_{n}"] for n in self.plane_names)
        cached = self.__dict__.get("_qweight_cache")
        if cached is not None and all(a is b for a, b in zip(cached[0], planes)):  # plane_names never change
            return cached[1]
        qt = QTensor(dict(zip(self.plane_names, planes)), self.fmt, self.weight_shape)
        self.__dict__["_qweight_cache"] = (planes, qt)
        return qt

    def _apply(self, fn, *args, **kwargs):
        """`.to()` / `.cuda()` / `.half()`: the planes follow device moves but keep their dtypes (fp16 /
        fp32 scales, palettes: stored values that a cast to the model's dtype would round); the bias
        and other floating tensors are cast as usual."""
        self.__dict__.pop("_qweight_cache", None)  # the old planes are let go
        planes = {id(self._buffers[f"weight_{n}"]) for n in self.plane_names}

        def move_planes_only(t):
            if id(t) not in planes:
                return fn(t)
            target = fn(torch.empty(0, dtype=t.dtype, device=t.device))  # where fn sends t, without casting t
            return fn(t) if target.dtype == t.dtype else t.to(target.device)

        return super()._apply(move_planes_only, *args, **kwargs)

    @property
    def layer_name(self) -> str:
        return getattr(self, "_lowbit_name", type(self).__name__)


class QuantLinear(_QuantWeight):
    """`nn.Linear` with a quantized weight: y = x @ W^T + b, W = qweight.dequantize() (fused where a
    kernel exists).

    Example:
        >>> import torch, lowbit
        >>> from lowbit.nn import QuantLinear
        >>> lin = torch.nn.Linear(64, 32)
        >>> q = QuantLinear.from_float(lin, "int8")
        >>> q(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    def __init__(self, qweight: QTensor, bias: torch.Tensor | None = None):
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {qweight.shape}")
        self.out_features, self.in_features = qweight.shape
        self._set_qweight(qweight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_float(cls, linear: nn.Linear, fmt: str | Format, **kwargs) -> "QuantLinear":
        from ..formats import quantize_tensor

        return cls(quantize_tensor(linear.weight, fmt, **kwargs), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch("linear", x, self.qweight, self.bias, owner=self.layer_name)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, bias={self.bias is not None}"


class QuantEmbedding(_QuantWeight):
    """`nn.Embedding` with a quantized table; a lookup dequantizes only the rows it returns.

    `embed_scale`: the rows are multiplied by it (rounded to the output dtype first), as the scaled
    word embeddings of Gemma and others (`...ScaledWordEmbedding`) do; None for a plain lookup.

    Example:
        >>> import torch
        >>> from lowbit.formats import quantize_tensor
        >>> emb = QuantEmbedding(quantize_tensor(torch.randn(10, 32), "int8"), embed_scale=4.0)
        >>> emb(torch.tensor([1, 2])).shape
        torch.Size([2, 32])
    """

    def __init__(self, qweight: QTensor, padding_idx: int | None = None, dtype: torch.dtype = torch.float32,
                 embed_scale: float | None = None):
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"QuantEmbedding needs a 2-D table, got shape {qweight.shape}")
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.out_dtype = dtype
        self.embed_scale = embed_scale
        self._set_qweight(qweight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dispatch("embedding", ids, self.qweight, self.out_dtype, owner=self.layer_name)
        if self.embed_scale is None:
            return rows
        return rows * torch.tensor(self.embed_scale, dtype=rows.dtype, device=rows.device)

    def _apply(self, fn, *args, **kwargs):
        out = fn(torch.empty(0, dtype=self.out_dtype))  # `.to(torch.bfloat16)` / `.half()`: rows come out in it
        if out.is_floating_point():
            self.out_dtype = out.dtype
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f", embed_scale={self.embed_scale:g}"
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}{scale}"
