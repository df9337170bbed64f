"""Warp-specialized FlashAttention forward for Hopper (sm_90), written in Gluon.

Why a second prefill kernel: the Triton kernel (`triton_prefill.py`) runs every warp through the
same loop, so each 64-row program waits at three CTA-wide barriers per key tile and drains its
tensor-core work before the softmax (RESULTS.md, session 22: 0.80-0.91x SDPA's CUDNN backend).
Here one CTA owns 2 x 64 query rows of one (batch, head) and splits its warps by job, as
FlashAttention-3 does:

- a loader warp streams K / V tiles into a ring of shared-memory stages with TMA; `k_ready` /
  `v_ready` mbarriers say a stage is full, `k_free` / `v_free` (two arrivals: one per consumer)
  say it may be refilled;
- two consumer warpgroups (64 query rows each, the same K / V tiles) run QK^T and PV on the
  tensor cores (wgmma) with P kept in registers, and overlap inside the warpgroup: tile j's
  QK^T and tile j-1's PV are in flight while tile j's softmax runs.

No CTA-wide barrier is left in the loop; the two consumers and the loader only meet at mbarriers.

Scope (the caller falls back to the Triton kernel elsewhere): CUDA capability 9.x, head dim 64 or
128, bf16 / fp16, causal only with Sq <= Sk (causal aligned to the end of the keys, as in
`triton_prefill`), per-batch valid key ranges (padding) as in `triton_prefill`. Tails of Sq / Sk
are handled by TMA's bounds (zero-filled loads, clipped stores) and a key mask on the edge tiles.

Example (GPU):
    >>> o = flash_attention_gluon(q, k, v, causal=True)                   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..kernels.launch import cdiv

# TMA copies: `async_copy_global_to_shared` / `async_copy_shared_to_global` in Triton 3.6, renamed
# `async_load` / `async_store` (same positional arguments) by 3.9
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global

BLOCK_M = 64     # query rows per consumer warpgroup (wgmma's M is 64 per warpgroup)
BLOCK_N = 128    # keys per tile
STAGES = 2       # K / V ring depth
HEAD_DIMS = (64, 128)
# finite "minus infinity" for masked scores: never NaN (inf - inf). Once a row has a real key they get
# p = 0; a row's tiles before its first real key give it p = 1 garbage, which that key's tile wipes
# (alpha = exp2(-1e30 - m) = 0); rows that never see a key are written as 0
_NEG = gl.constexpr(-1.0e30)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free,
            b, h, hk, m0, first, n_tiles, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [b, h, m0, 0], q_bar, q_smem.index(0))
    _tma_load(q_desc, [b, h, m0 + BLOCK_M, 0], q_bar, q_smem.index(1))
    for j in range(n_tiles):
        s = j % STAGES
        free_phase = ((j // STAGES) & 1) ^ 1  # a fresh barrier counts as freed once
        mbarrier.wait(k_free.index(s), free_phase)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        _tma_load(k_desc, [b, hk, (first + j) * BLOCK_N, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_free.index(s), free_phase)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        _tma_load(v_desc, [b, hk, (first + j) * BLOCK_N, 0], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _masked(s, t0, rows, kv_lo, kv_hi, mask_hi, off_causal, s_layout: gl.constexpr, BLOCK_N: gl.constexpr,
            CAUSAL: gl.constexpr):
    """Scores of the tile of keys t0.. with keys outside [kv_lo, kv_hi) (and above the causal
    diagonal) set to _NEG; tiles wholly inside [kv_lo, mask_hi) pass untouched."""
    if (t0 < kv_lo) | (t0 + BLOCK_N > mask_hi):
        cols = gl.expand_dims(t0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0)
        valid = (cols >= kv_lo) & (cols < kv_hi)
        if CAUSAL:
            valid = valid & (cols <= gl.expand_dims(rows, 1) + off_causal)
        s = gl.where(valid, s, _NEG)
    return s


@gluon.jit
def _consumer(o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free,
              b, h, m0, first, n_tiles, kv_lo, kv_hi, off_causal, qk_scale,
              WHICH: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
              STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    dtype: gl.constexpr = o_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    r0 = m0 + WHICH * BLOCK_M
    rows = r0 + gl.arange(0, BLOCK_M, layout=row_s)
    mask_hi = kv_hi  # tiles past it need the mask (the sequence's end, the causal diagonal)
    if CAUSAL:
        mask_hi = gl.minimum(mask_hi, r0 + off_causal + 1)
    q = q_smem.index(WHICH).reshape([BLOCK_M, HEAD_D])
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, o_layout)
    mbarrier.wait(q_bar, 0)

    # tile 0: QK^T, softmax (no PV in flight yet)
    mbarrier.wait(k_ready.index(0), 0)
    s_tok = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), zero_s,
                          use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    mbarrier.arrive(k_free.index(0))
    s = _masked(s, first * BLOCK_N, rows, kv_lo, kv_hi, mask_hi, off_causal, s_layout, BLOCK_N, CAUSAL)
    m_i = gl.max(s, 1)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_i * qk_scale, 1))
    l_i = gl.sum(p, 1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)

    for j in range(1, n_tiles):
        st = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(st), (j // STAGES) & 1)
        s_tok = warpgroup_mma(q, k_smem.index(st).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), zero_s,
                              use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p_op, v_smem.index(prev).reshape([BLOCK_N, HEAD_D]), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s_tok, ))  # groups retire in order: QK^T of tile j is done
        mbarrier.arrive(k_free.index(st))
        s = _masked(s, (first + j) * BLOCK_N, rows, kv_lo, kv_hi, mask_hi, off_causal, s_layout, BLOCK_N, CAUSAL)
        m_new = gl.maximum(m_i, gl.max(s, 1))
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new * qk_scale, 1))
        alpha = gl.exp2((m_i - m_new) * qk_scale)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        mbarrier.arrive(v_free.index(prev))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    acc_tok = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, HEAD_D]), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
    mbarrier.arrive(v_free.index(last))

    out = acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
    # rows that see no key at all (left-padded queries) are written as 0, as the reference does
    rows_o = r0 + gl.arange(0, BLOCK_M, layout=row_o)
    row_ok = (rows_o >= 0) & (kv_lo < kv_hi)
    if CAUSAL:
        row_ok = row_ok & (rows_o + off_causal >= kv_lo)
    out = gl.where(gl.expand_dims(row_ok, 1), out, 0.0)
    # the query tile is no longer read: it becomes the output's staging buffer for the TMA store
    q.store(out.to(dtype))
    fence_async_shared()
    _tma_store(o_desc, [b, h, r0, 0], q_smem.index(WHICH))
    tma.store_wait(0)


@gluon.jit
def _fa3_fwd(q_desc, k_desc, v_desc, o_desc, KV_START, KV_END, H, GROUP, SK, off_causal, qk_scale,
             HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
             CAUSAL: gl.constexpr, HAS_RANGES: gl.constexpr):
    pid_m = gl.program_id(0)
    if CAUSAL:  # the longest rows first: fewer idle SMs at the end of the launch
        pid_m = gl.num_programs(0) - 1 - pid_m
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    m0 = pid_m * (2 * BLOCK_M)
    kv_lo = 0
    kv_hi = SK
    if HAS_RANGES:  # this batch row's valid keys (padding)
        kv_lo = gl.load(KV_START + b)
        kv_hi = gl.load(KV_END + b)
    first = kv_lo // BLOCK_N  # the first key tile
    n_keys = kv_hi
    if CAUSAL:
        n_keys = gl.minimum(n_keys, m0 + 2 * BLOCK_M + off_causal)
    # at least one tile: the consumers' pipeline starts with one (rows without keys become 0)
    n_tiles = gl.maximum(gl.cdiv(n_keys, BLOCK_N) - first, 1)

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, BLOCK_M, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_free.index(i), count=2)  # one arrival per consumer warpgroup
        mbarrier.init(v_free.index(i), count=2)

    gl.warp_specialize([
        (_consumer, (o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free,
                     b, h, m0, first, n_tiles, kv_lo, kv_hi, off_causal, qk_scale, 0, BLOCK_M, BLOCK_N, HEAD_D, STAGES, CAUSAL)),
        (_consumer, (o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free,
                     b, h, m0, first, n_tiles, kv_lo, kv_hi, off_causal, qk_scale, 1, BLOCK_M, BLOCK_N, HEAD_D, STAGES, CAUSAL)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_free, v_free,
                   b, h, hk, m0, first, n_tiles, BLOCK_M, BLOCK_N, STAGES)),
    ], [4, 1], [232, 40])


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
             out: torch.Tensor | None = None) -> bool:
    """Whether `flash_attention_gluon` runs this call (else the Triton kernel does).

    Example (CPU tensors are never supported):
        >>> t = torch.randn(1, 2, 8, 64)
        >>> supports(t, t, t, causal=False)
        False
    """
    if not (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.shape[-1] not in HEAD_DIMS or (causal and q.shape[2] > k.shape[2]):
        return False
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1] or q.shape[1] % k.shape[1]:
        return False  # the Triton path names what is wrong
    if q.numel() == 0 or k.numel() == 0:  # TMA descriptors need non-empty tensors
        return False
    es = q.element_size()
    tensors = (q, k, v) if out is None else (q, k, v, out)
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


@functools.cache
def _smem_layout(rows: int, d: int, bf16: bool):
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, d], gl.bfloat16 if bf16 else gl.float16)


def _desc(t: torch.Tensor, rows: int) -> TensorDescriptor:
    block = [1, 1, rows, t.shape[-1]]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block,
                            _smem_layout(rows, t.shape[-1], t.dtype == torch.bfloat16))


def flash_attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                          scale: float | None = None, kv_start: torch.Tensor | None = None,
                          kv_end: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """FlashAttention forward on Hopper: q (B, H, Sq, D), k / v (B, Hkv, Sk, D), any 16-byte strides.

    `kv_start` / `kv_end`: (B,) int32 CUDA tensors, each batch row's valid key range (rows that see
    no key are 0). Returns (B, H, Sq, D) in q's dtype (or writes `out`). Check `supports(...)` first.
    """
    B, H, SQ, D = q.shape
    Hkv, SK = k.shape[1], k.shape[2]
    o = out if out is not None else torch.empty(B, H, SQ, D, dtype=q.dtype, device=q.device)
    qk_scale = (scale if scale is not None else D ** -0.5) * math.log2(math.e)
    grid = (cdiv(SQ, 2 * BLOCK_M), B * H)
    has_ranges = kv_start is not None
    _fa3_fwd[grid](_desc(q, BLOCK_M), _desc(k, BLOCK_N), _desc(v, BLOCK_N), _desc(o, BLOCK_M),
                   kv_start if has_ranges else o, kv_end if has_ranges else o, H, H // Hkv, SK, SK - SQ, qk_scale,
                   HEAD_D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES, CAUSAL=causal, HAS_RANGES=has_ranges,
                   num_warps=4)
    return o
