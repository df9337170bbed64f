"""CPU fast paths built on the int8 / int4 matmuls that ship inside PyTorch.

int8 per channel: `torch._weight_int8pack_mm(x, w_int8, scales)` computes x @ w^T * scales with an
int8 weight and per-output-channel scales, which is exactly the `int8` preset's meaning (w = q *
scale, q the two's-complement data plane, so the plane is passed as is: no repack, no copy). The
kernel is fast with bf16 activations; fp32 activations are rounded to bf16 for the product and the
result is returned in fp32 (relative error ~ 2^-9, the same as running the layer in bf16).

int4 in blocks of 32 / 64 / 128 / 256 (symmetric or affine; fp16, bf16, E8M0 or fp32 scales):
`torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)` (PyTorch's CPU "tinygemm")
computes w = (q - 8) * scale + zero in fp32 from its own nibble layout, with bf16 activations, scales
and output (its fp32 and fp16 variants are 15-70x slower on this machine). The weight is repacked
once per QTensor (`QTensor.kernel_cache`): the codes into that layout (q is the stored offset-binary
code), each scale split into bf16 parts whose sum is the scale exactly (one part for bf16 / E8M0
scales, two for fp16 and for fp32 scales, which keep 16 significant bits), one product per part, so
the weights are the stored ones; an affine format's zeros (plus 8 * scale: w = c * s + z = (c - 8) *
s + (z + 8 s)) go through one fp32 product with the activations' per-block sums. int8 codes in the
same blocks run as two int4 weights: c = 16 h + l with h = c >> 4 in [-8, 7] and l = c & 15, so
w = c s = (h + 8 - 8) (16 s) + (l - 8) s + 8 s: two terms and a zero of 8 s (the `int8` recipe's
layers, embeddings and tied lm_heads of the 4-bit recipes). Like the int8 path: activations rounded
to bf16, results to bf16 per part. The repacked copy costs as much memory as the data plane again
(4 bits per int4 weight, 8 per int8 weight) plus the bf16 scale parts.
"""

from __future__ import annotations

import torch

from ..formats import Format, QTensor
from .registry import register


def _int8_per_channel(fmt: Format, shape: tuple[int, ...] | None) -> bool:
    # PyTorch 2.13's CPU kernel crashes (SIGSEGV) for more than one row when K is not a multiple
    # of 16 (seen at K = 8, 72, 200); such layers take the reference path.
    k_ok = shape is None or (len(shape) == 2 and shape[1] % 16 == 0)
    return fmt.family == "int" and fmt.element == "int8" and fmt.block_size is None and fmt.zero == "none" and k_ok


INT4_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu takes


def _blocked_on_int4(fmt: Format, shape: tuple[int, ...] | None) -> bool:
    """int4 or int8 codes in blocks the CPU int4 kernel takes (int8 as two nibble halves)."""
    # the packing wants rows in multiples of 16; whole blocks per row (no padded columns)
    shape_ok = shape is None or (len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % (fmt.block_size or 1) == 0)
    element_ok = fmt.element == "int4" or (fmt.element == "int8" and fmt.zero == "none")
    return (fmt.family == "int" and element_ok and fmt.block_size in INT4_GROUPS
            and fmt.scale_dtype in ("fp16", "bf16", "e8m0", "fp32") and shape_ok and _HAVE_INT4_MM)


_HAVE_INT4_MM = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def _cpu_fast(fmt: Format, shape: tuple[int, ...] | None, dtype: torch.dtype | None = None) -> bool:
    # int8 in blocks keeps the exact reference for fp32 activations: next to its small quantization
    # error the bf16 rounding shows (SmolLM2, `int8` recipe: KL vs float 0.0016 -> 0.0023, top-1
    # 96.6 % -> 95.5 %); int4's own error hides it (KL 0.4511 -> 0.4513). With 16-bit activations the
    # reference computes in that dtype too, so the kernel loses nothing there.
    if fmt.element == "int8" and fmt.block_size is not None and dtype == torch.float32:
        return False
    return _int8_per_channel(fmt, shape) or _blocked_on_int4(fmt, shape)


# torch._weight_int8pack_mm (CPU, torch 2.13) crashes the process (SIGSEGV) on a weight that is not
# 16-byte aligned or activations that are not 32-byte aligned (its vector loads assume alignment);
# memory-mapped package planes and sliced activations are 8-byte aligned. 64 covers both.
_ALIGN = 64


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a fresh (allocator-aligned) copy of it where its data is not _ALIGN-byte aligned."""
    return t if t.data_ptr() % _ALIGN == 0 else t.clone(memory_format=torch.contiguous_format)


@register("int", "linear", "cpu", "cpu_fast", supports=_cpu_fast)
def int_linear(x: torch.Tensor, qweight: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """int8 per channel, int4 / int8 in blocks through PyTorch's CPU kernels (module docstring)."""
    if torch.compiler.is_compiling():
        # inductor (torch 2.13) fails to lower _weight_int8pack_mm fed by a fused cast; under
        # torch.compile the reference path is traced instead (same numbers as the eager reference)
        from .reference import linear

        return linear(x, qweight, bias)
    if qweight.fmt.block_size is not None:
        return _int4_linear(x, qweight, bias)
    out_dtype = x.dtype
    x2 = _aligned(x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous())
    w = qweight.data.view(torch.int8)
    if w.data_ptr() % _ALIGN:  # e.g. planes memory-mapped from a package (8-byte aligned): one aligned copy
        w = qweight.kernel_cache.get("cpu_int8_aligned")
        if w is None:
            w = qweight.kernel_cache["cpu_int8_aligned"] = _aligned(qweight.data.view(torch.int8))
    s = qweight.scale.reshape(-1).to(torch.bfloat16)
    y = torch._weight_int8pack_mm(x2, w, s).to(out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _bf16_parts(s: torch.Tensor) -> list[torch.Tensor] | None:
    """fp32 scales (N, K / g) as at most two bf16 parts that add up to them exactly, each laid out as
    the int4 kernel's (K / g, N, 2) scales-and-zeros (zeros 0); None where two do not suffice."""
    parts, rest = [], s
    for _ in range(2):
        part = rest.to(torch.bfloat16)
        parts.append(torch.stack([part.t(), torch.zeros_like(part.t())], -1).contiguous())
        rest = rest - part.float()
        if not rest.any():
            return parts
    return None


def _int4_prepared(qweight: QTensor) -> tuple | None:
    """([(packed int4 codes, bf16 scale parts), ...], fp32 (N, K / g) zeros or None), made once per
    QTensor, such that w = sum over terms of (code - 8) * scale, plus the zero of the block:
    int4: one term, zeros z + 8 s when affine; int8 c = 16 h + l (h = c >> 4 in [-8, 7], l in [0, 15]):
    terms (h + 8, 16 s) and (l, s), zeros 8 s. None (remembered) where a scale does not split into
    two bf16 parts exactly (hand-made fp32 planes with more than 16 significant bits, NaN scales)."""
    prep = qweight.kernel_cache.get("cpu_int4")
    if prep is None:
        from ..formats.packing import unpack
        from ..formats.scales import decode_float, decode_scale

        fmt = qweight.fmt
        n, k = qweight.shape
        s = decode_scale(qweight.scale, fmt.scale_dtype)  # (N, K / g) fp32
        if fmt.element == "int4":
            terms = [(unpack(qweight.data, 4, k).to(torch.int32), s)]
            zeros = decode_float(qweight.zero) + 8.0 * s if fmt.zero == "float" else None
        else:
            c = qweight.data[:, :k].view(torch.int8).to(torch.int32)
            terms = [((c >> 4) + 8, 16.0 * s), (c & 15, s)]
            zeros = 8.0 * s
        packed = []
        for codes, scale in terms:
            parts = _bf16_parts(scale)
            if parts is None:
                packed = None
                break
            packed.append((torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1), parts))
        prep = qweight.kernel_cache["cpu_int4"] = (packed, zeros) if packed else False
    return prep or None


def _int4_linear(x: torch.Tensor, qweight: QTensor, bias: torch.Tensor | None) -> torch.Tensor:
    prep = _int4_prepared(qweight)
    if prep is None:  # scales the bf16 kernel cannot reproduce: the reference's numbers
        from .reference import linear

        return linear(x, qweight, bias)
    terms, zeros = prep
    n, k = qweight.shape
    g = qweight.fmt.block_size
    x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()
    y = torch.zeros(x2.shape[0], n)
    for packed, parts in terms:
        for sz in parts:
            y += torch._weight_int4pack_mm_for_cpu(x2, packed, g, sz).float()
    if zeros is not None:  # sum_k x_k z_(n, k // g) = (per-block sums of x) @ zeros^T
        y += x2.float().reshape(-1, k // g, g).sum(-1) @ zeros.t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
