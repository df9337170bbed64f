"""Fused FlashAttention-2 forward in Triton: QK^T, online softmax and PV in registers.

One program computes BLOCK_M query rows of one (batch, head); the keys / values of its kv head
(GQA: head // (H / Hkv)) stream through shared memory in BLOCK_N tiles. The key loop is split in
three: an edge tile at the start of the valid key range (left padding), the tiles that need no
mask (no bounds or causal test: the fast path), and the trailing tiles (causal diagonal, the end
of the valid range, the sequence end). Causal masking is aligned to the end of the keys (query i
of Sq sees key j of Sk when j <= i + Sk - Sq), as a KV cache needs.

On a GPU, Q/K/V/O go through tensor descriptors (TMA on Hopper) built from the tensors' real
strides, so HF's (B, S, H, D) -> (B, H, S, D) transposed views are read without a copy; under
TRITON_INTERPRET=1 plain masked pointer loads run instead (and fp32 dot operands, because the
interpreter's bf16 dot is wrong).

Example (GPU):
    >>> from lowbit.attention import flash_attention                      # doctest: +SKIP
    >>> o = flash_attention(q, k, v, causal=True)                        # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
from ..kernels.launch import cdiv, launch_remembered, next_pow2, spec_key  # noqa: E402
from .triton_prefill_dims import HEAD_DIMS  # noqa: E402


@triton.jit
def _tile(acc, l_i, m_i, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_kn, stride_vn, b, hk,
          lo, hi, offs_m, kv_start, kv_end, off_causal,
          BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr, MASKED: tl.constexpr,
          CAUSAL: tl.constexpr, USE_DESC: tl.constexpr, DOT_DTYPE: tl.constexpr, WS: tl.constexpr = False):
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        offs_n = start_n + offs_n0
        if USE_DESC:
            k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, D_PAD)
        else:
            kmask = (offs_n[:, None] < kv_end) & (offs_d[None, :] < HEAD_D)
            k = tl.load(k_ptrs + start_n * stride_kn, mask=kmask, other=0.0)
        qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)))  # q is pre-scaled by softmax scale * log2(e)
        if MASKED:
            valid = (offs_n[None, :] >= kv_start) & (offs_n[None, :] < kv_end)
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + off_causal)
            qk = tl.where(valid, qk, -1.0e30)
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_DESC:
            v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, D_PAD)
        else:
            vmask = (offs_n[:, None] < kv_end) & (offs_d[None, :] < HEAD_D)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=vmask, other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _fa_fwd(Q, K, V, O, KV_START, KV_END,
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
            B, H, GROUP, SQ, SK, qk_scale,
            HEAD_D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_RANGES: tl.constexpr, USE_DESC: tl.constexpr, DOT_DTYPE: tl.constexpr,
            WS: tl.constexpr, HOST_DESC: tl.constexpr = False):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the longest rows first: fewer idle SMs at the end of the launch
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    if HAS_RANGES:
        kv_start = tl.load(KV_START + b)
        kv_end = tl.load(KV_END + b)
    else:
        kv_start = 0
        kv_end = SK
    off_causal = SK - SQ

    if HOST_DESC:  # descriptors built once on the host: no per-program descriptor setup
        q_desc = Q
        k_desc = K
        v_desc = V
        q = q_desc.load([b, h, m0, 0]).reshape(BLOCK_M, D_PAD)
        k_ptrs = K
        v_ptrs = V
    elif USE_DESC:
        q_desc = tl.make_tensor_descriptor(Q, shape=[B, H, SQ, HEAD_D],
                                           strides=[stride_qb, stride_qh, stride_qm, 1],
                                           block_shape=[1, 1, BLOCK_M, D_PAD])
        k_desc = tl.make_tensor_descriptor(K, shape=[B, H // GROUP, SK, HEAD_D],
                                           strides=[stride_kb, stride_kh, stride_kn, 1],
                                           block_shape=[1, 1, BLOCK_N, D_PAD])
        v_desc = tl.make_tensor_descriptor(V, shape=[B, H // GROUP, SK, HEAD_D],
                                           strides=[stride_vb, stride_vh, stride_vn, 1],
                                           block_shape=[1, 1, BLOCK_N, D_PAD])
        q = q_desc.load([b, h, m0, 0]).reshape(BLOCK_M, D_PAD)
        k_ptrs = K
        v_ptrs = V
    else:
        q_desc = Q
        k_desc = K
        v_desc = V
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < SQ) & (offs_d[None, :] < HEAD_D), other=0.0)
        offs_n = tl.arange(0, BLOCK_N)
        k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    q = (q.to(tl.float32) * qk_scale).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # key range this query block can see
    hi = kv_end
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M + off_causal)
    lo = (kv_start // BLOCK_N) * BLOCK_N
    # unmasked middle: whole tiles inside [kv_start, kv_end) and below the causal diagonal
    mid_lo = tl.cdiv(kv_start, BLOCK_N) * BLOCK_N
    mid_hi = kv_end
    if CAUSAL:
        mid_hi = tl.minimum(mid_hi, m0 + off_causal + 1)
    mid_hi = tl.maximum((mid_hi // BLOCK_N) * BLOCK_N, mid_lo)
    mid_lo = tl.minimum(mid_lo, tl.maximum(hi, lo))
    mid_hi = tl.minimum(mid_hi, tl.maximum(hi, lo))
    # start edge [lo, mid_lo), unmasked middle [mid_lo, mid_hi), tail [mid_hi, hi)
    acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_kn, stride_vn, b, hk,
                          lo, mid_lo, offs_m, kv_start, kv_end, off_causal,
                          BLOCK_N, HEAD_D, D_PAD, True, CAUSAL, USE_DESC, DOT_DTYPE)
    acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_kn, stride_vn, b, hk,
                          mid_lo, mid_hi, offs_m, kv_start, kv_end, off_causal,
                          BLOCK_N, HEAD_D, D_PAD, False, CAUSAL, USE_DESC, DOT_DTYPE, WS)
    acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_kn, stride_vn, b, hk,
                          mid_hi, hi, offs_m, kv_start, kv_end, off_causal,
                          BLOCK_N, HEAD_D, D_PAD, True, CAUSAL, USE_DESC, DOT_DTYPE)

    # rows that see no key at all (left-padded queries) are written as 0
    first_visible = kv_start
    row_ok = kv_start < kv_end
    if CAUSAL:
        row_ok = row_ok & (offs_m + off_causal >= first_visible)
    else:
        row_ok = row_ok & (offs_m >= 0)
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    if HOST_DESC:
        O.store([b, h, m0, 0], out.to(O.dtype).reshape(1, 1, BLOCK_M, D_PAD))
    elif USE_DESC:
        o_desc = tl.make_tensor_descriptor(O, shape=[B, H, SQ, HEAD_D],
                                           strides=[stride_ob, stride_oh, stride_om, 1],
                                           block_shape=[1, 1, BLOCK_M, D_PAD])
        o_desc.store([b, h, m0, 0], out.to(O.dtype.element_ty).reshape(1, 1, BLOCK_M, D_PAD))
    else:
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < SQ) & (offs_d[None, :] < HEAD_D))


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, warp_specialize]) per head dim, from the sweep of
# `benchmarks/attention.py --tune` on an H200 (D = 128); the others are scaled to fit shared memory
CONFIGS = {64: (64, 64, 4, 3), 80: (64, 64, 4, 3), 96: (64, 64, 4, 3), 128: (64, 64, 4, 3), 256: (64, 32, 4, 2)}
# Calls whose GPU work is small are bound by their launch's host time (two H200 hosts, RESULTS.md session
# 25): ~40 us for a remembered in-kernel-descriptor launch (`launch_remembered`), ~70-150 us with host-side
# TMA descriptors, ~70-190 us for the Gluon kernel, while SDPA enqueues in 15-30 us. So the faster kernels
# (host descriptors: S = 1k benchmark 445 vs 385 TFLOP/s; Gluon: 1.2-1.4x the Triton kernel at 32k
# tokens) are picked only from this much work (4 * B * H * Sq * Sk * D flops, half when causal):
# ~200 us of tensor-core time at ~500 TFLOP/s.
BIG_CALL_FLOPS = 1e11


def prefill_flops(B: int, H: int, SQ: int, SK: int, D: int, causal: bool) -> float:
    """Forward flops of one attention call (QK^T and PV), half when causal (the benchmark's count)."""
    return 4.0 * B * H * SQ * SK * D / (2 if causal else 1)


_allocator_set = False


def _set_allocator() -> None:
    """Tensor descriptors built on the device need a scratch allocator (once per process)."""
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _allocator_set = True


def flash_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                           scale: float | None = None, kv_start: torch.Tensor | None = None,
                           kv_end: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None,
                           out: torch.Tensor | None = None, host_desc: bool | None = None,
                           gluon: bool | None = None) -> torch.Tensor:
    """FlashAttention forward: q (B, H, Sq, D), k/v (B, Hkv, Sk, D), any strides with the last one 1.

    Returns (B, H, Sq, D) contiguous in q's dtype (or writes `out`, which may be a strided view).
    `host_desc`: TMA descriptors built on the host (faster kernel on large problems, ~35-110 us more
    host time per call on an H200 host) or in the kernel; None picks host descriptors from
    `BIG_CALL_FLOPS` up, so small calls stay cheap to launch.
    `gluon`: run the warp-specialized Hopper kernel (`gluon_prefill`) instead; None picks it for
    calls it supports from `BIG_CALL_FLOPS` up when no `config` is given, True insists
    (ValueError where it cannot run), False never.
    """
    B, H, SQ, D = q.shape
    Hkv, SK = k.shape[1], k.shape[2]
    has_ranges = kv_start is not None or kv_end is not None
    if has_ranges:
        dev = q.device
        kv_start = (kv_start if kv_start is not None else torch.zeros(B, dtype=torch.int32, device=dev)).to(dev, torch.int32)
        kv_end = (kv_end if kv_end is not None else torch.full((B,), SK, dtype=torch.int32, device=dev)).to(dev, torch.int32)
    big = prefill_flops(B, H, SQ, SK, D, causal) >= BIG_CALL_FLOPS
    if gluon or (gluon is None and config is None and not _INTERPRET and big):
        gp = _gluon_prefill()
        if gp is not None and gp.supports(q, k, v, causal=causal, out=out):
            o = _run_gluon(gp, q, k, v, causal=causal, scale=scale, kv_start=kv_start, kv_end=kv_end, out=out,
                           insist=bool(gluon))
            if o is not None:
                return o
        elif gluon:
            raise ValueError("flash_attention: the Gluon kernel needs an sm_90 GPU, Triton with Gluon, bf16 / fp16, "
                             f"head dim in {getattr(gp, 'HEAD_DIMS', (64, 128))}, causal Sq <= Sk and "
                             "16-byte strides; pass gluon=None to fall back to the Triton kernel")
    if D not in HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim {D} not supported (supported: {HEAD_DIMS}); use the reference")
    if H % Hkv:
        raise ValueError(f"flash_attention: {H} query heads are not a multiple of {Hkv} kv heads")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"flash_attention: {name} must have unit stride along the head dim")
    o = out if out is not None else torch.empty(B, H, SQ, D, dtype=q.dtype, device=q.device)
    bm, bn, warps, stages, *ws = config or CONFIGS[D]
    ws = bool(ws and ws[0]) and not _INTERPRET
    d_pad = next_pow2(D)
    use_desc = not _INTERPRET and q.is_cuda
    if use_desc:
        _set_allocator()
        es = q.element_size()
        for t in (q, k, v, o):  # TMA: 16-byte aligned strides and base
            if any((s * es) % 16 for s in t.stride()[:-1]) or t.data_ptr() % 16:
                use_desc = False
    if _INTERPRET:
        dot_dtype = tl.float32
    else:
        dot_dtype = tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16
    if not has_ranges:
        kv_start = kv_end = q  # unused
    grid = (cdiv(SQ, bm), B * H)
    if host_desc is None:
        host_desc = big
    host_desc = use_desc and host_desc
    if host_desc:  # TMA descriptors made here (from the real strides), passed as kernel arguments
        from triton.tools.tensor_descriptor import TensorDescriptor

        def desc(t, rows):
            return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, d_pad])

        qa, ka, va, oa = desc(q, bm), desc(k, bn), desc(v, bn), desc(o, bm)
    else:
        qa, ka, va, oa = q, k, v, o
    args = (qa, ka, va, oa, kv_start, kv_end,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            B, H, H // Hkv, SQ, SK, (scale if scale is not None else D ** -0.5) * math.log2(math.e))
    consts = dict(HEAD_D=D, D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, HAS_RANGES=has_ranges,
                  USE_DESC=use_desc, DOT_DTYPE=dot_dtype, WS=ws, HOST_DESC=host_desc, num_warps=warps,
                  num_stages=stages)
    key = None
    if not host_desc and not torch.compiler.is_compiling():  # every argument a slot: nothing kept alive
        key = (q.device, grid, tuple(consts.values()), spec_key(args))
        if len(_PLANS) > 256:  # many prompt lengths seen: start over rather than grow without bound
            _PLANS.clear()
    launch_remembered(_PLANS, key, _fa_fwd, grid, args, consts, slots=tuple(range(len(args))))
    return o


_GLUON_BROKEN: list = []  # the error that turned the Gluon kernel off in this process, if any


@functools.cache
def _gluon_prefill():
    """The Gluon kernel's module, or None where this Triton has no (compatible) Gluon."""
    try:
        from . import gluon_prefill
    except (ImportError, AttributeError):
        return None
    return gluon_prefill


def _run_gluon(gp, q, k, v, *, insist: bool, **kw) -> torch.Tensor | None:
    """The Gluon kernel's output, or None (once it failed to build on this Triton: Gluon's API moves
    between releases, and the kernel was checked on Triton 3.6) so that the caller runs the Triton
    kernel; with `insist` the error is raised."""
    if _GLUON_BROKEN and not insist:
        return None
    try:
        return gp.flash_attention_gluon(q, k, v, **kw)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # a compile error (CompilationError, an MLIR pass failure) on another Triton
        if insist:
            raise
        _GLUON_BROKEN.append(err)
        warnings.warn(f"lowbit: the Gluon prefill kernel failed on Triton {triton.__version__} "
                      f"({type(err).__name__}: {str(err)[:200]}); the Triton kernel runs instead", RuntimeWarning,
                      stacklevel=3)
        return None


# remembered launches (`kernels.launch`) of the calls without host-side descriptors: a decode step
# on a float cache is one such launch per layer, ~50 us of Triton's argument binding each
_PLANS: dict = {}
