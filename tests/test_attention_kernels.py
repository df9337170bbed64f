"""lowbit's attention kernels against their reference twins (fp32 SDPA, dequantize-then-attend).

Without a GPU the Triton kernels run through TRITON_INTERPRET=1 on CPU at small odd shapes
(S = 1, 17, 130; D = 64, 80), so CI checks the kernels' indexing, masks and online softmax; on a
CUDA machine the same tests run the compiled kernels (bf16 / fp16).
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the first import of the kernels' modules
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
DEV = "cuda" if CUDA else "cpu"
DTYPES = (torch.bfloat16, torch.float16) if CUDA else (torch.float32,)
TOL = 2e-2 if CUDA else 1e-5

from lowbit.attention.reference import attention_reference, dequantize_kv, quantize_kv  # noqa: E402


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _qkv(gen, B, H, Hkv, Sq, Sk, D, dtype, q_view=True):
    q = torch.randn(B, Sq, H, D, generator=gen).to(DEV, dtype)
    q = q.transpose(1, 2) if q_view else q.transpose(1, 2).contiguous()  # HF passes (B,S,H,D) transposed views
    k = torch.randn(B, Hkv, Sk, D, generator=gen).to(DEV, dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=gen).to(DEV, dtype)
    return q, k, v


@pytest.mark.parametrize("S,D,causal,H,Hkv", [(1, 64, True, 4, 2), (17, 64, True, 4, 1), (17, 80, False, 2, 2),
                                              (130, 64, True, 4, 2), (130, 80, False, 4, 4)])
def test_prefill_matches_reference(gen, S, D, causal, H, Hkv):
    from lowbit.attention.triton_prefill import flash_attention_triton

    for dtype in DTYPES:
        q, k, v = _qkv(gen, 2, H, Hkv, S, S, D, dtype)
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEV)  # poisoned: every element must be written
        flash_attention_triton(q, k, v, causal=causal, scale=0.7 / D ** 0.5, out=out)
        ref = attention_reference(q.float(), k.float(), v.float(), causal=causal, scale=0.7 / D ** 0.5)
        assert not out.isnan().any()
        assert _rel(out, ref) < TOL


def test_prefill_padding_and_cache_offset(gen):
    """Left / right padding ranges per batch row, and queries that continue a cache (Sq < Sk)."""
    from lowbit.attention.triton_prefill import flash_attention_triton

    q, k, v = _qkv(gen, 3, 4, 2, 17, 130, 64, DTYPES[0])
    start = torch.tensor([0, 5, 70], dtype=torch.int32)
    end = torch.tensor([130, 128, 101], dtype=torch.int32)
    for causal in (True, False):
        out = flash_attention_triton(q, k, v, causal=causal, kv_start=start, kv_end=end)
        ref = attention_reference(q.float(), k.float(), v.float(), causal=causal, kv_start=start, kv_end=end)
        assert _rel(out, ref) < TOL


def test_prefill_rows_without_keys_are_zero(gen):
    """Left-padded query rows see no key: the kernel writes 0 there, as the reference does."""
    from lowbit.attention.triton_prefill import flash_attention_triton

    q, k, v = _qkv(gen, 2, 2, 2, 17, 17, 64, DTYPES[0])
    start = torch.tensor([0, 9], dtype=torch.int32)
    out = flash_attention_triton(q, k, v, causal=True, kv_start=start)
    assert out[1, :, :9].abs().max() == 0
    ref = attention_reference(q.float(), k.float(), v.float(), causal=True, kv_start=start)
    assert _rel(out, ref) < TOL


@pytest.mark.parametrize("bits,group,scale_dtype", [(8, None, "fp16"), (8, 32, "e8m0"), (4, 32, "fp16"), (4, None, "e8m0")])
@pytest.mark.parametrize("S,swap", [(1, False), (17, True), (130, False), (130, True)])
def test_decode_matches_dequantized_reference(gen, bits, group, scale_dtype, S, swap):
    from lowbit.attention.triton_decode import decode_attention_triton

    B, H, Hkv, D, cap = 2, 8, 2, 64, 131
    q, k, v = _qkv(gen, B, H, Hkv, 1, cap, D, DTYPES[0])
    (kd, ks), (vd, vs) = quantize_kv(k, bits, group, scale_dtype), quantize_kv(v, bits, group, scale_dtype)
    start = torch.tensor([0, min(3, S - 1)], dtype=torch.int32)
    out = decode_attention_triton(q, kd, ks, vd, vs, S, bits=bits, kv_start=start, splits=3 if S > 64 else None, swap=swap)
    kq, vq = dequantize_kv(kd, ks, bits, D)[:, :, :S], dequantize_kv(vd, vs, bits, D)[:, :, :S]
    ref = attention_reference(q.float(), kq, vq, kv_start=start)
    assert not out.isnan().any()
    # per-token scales run QK^T on the int8 tensor cores with q rounded to int8 per row: ~5e-3
    assert _rel(out, ref) < (1e-2 if group is None and not swap else TOL)
    if group is None and not swap:  # the same kernel with q kept in floating point is exact
        exact = decode_attention_triton(q, kd, ks, vd, vs, S, bits=bits, kv_start=start, int_mma=False)
        assert _rel(exact, ref) < TOL


_TM_SHAPES = [(1, 64, True, None), (17, 64, False, None), (130, 64, True, False), (130, 128, False, None),
              (130, 64, True, True)]


@pytest.mark.parametrize("bits,group,S,D,swap,int_mma",
                         [(b, g, *c) for b, g in ((8, None), (4, 32), (4, None)) for c in _TM_SHAPES
                          if not (c[3] and g is not None)]  # int_mma needs one scale per token
                         + [(4, None, 130, 64, False, True), (4, None, 17, 128, True, True)])
def test_decode_token_major_values(gen, bits, group, S, D, swap, int_mma):
    """The fast path (fp16 scales, value codes stored token-major): the magic-number fp16 decode of
    the codes with offsets taken off after the products (their plain-Triton twins under the
    interpreter), int4 codes on the int8 tensor cores, both product orientations, padding."""
    from lowbit.attention.triton_decode import decode_attention_triton, token_major

    B, H, Hkv, cap = 2, 8, 2, 131
    q, k, v = _qkv(gen, B, H, Hkv, 1, cap, D, DTYPES[0])
    (kd, ks), (vd, vs) = quantize_kv(k, bits, group), quantize_kv(v, bits, group)
    vt = token_major(vd)
    assert vt.stride(-2) == 1 and torch.equal(vt, vd)
    start = torch.tensor([0, min(3, S - 1)], dtype=torch.int32)
    out = decode_attention_triton(q, kd, ks, vt, vs, S, bits=bits, kv_start=start, splits=3 if S > 64 else None,
                                  swap=swap, int_mma=int_mma)
    ref = attention_reference(q.float(), dequantize_kv(kd, ks, bits, D)[:, :, :S], dequantize_kv(vd, vs, bits, D)[:, :, :S],
                              kv_start=start)
    assert not out.isnan().any()
    # keys on the int8 tensor cores (the default with one scale per token) round q to int8 per row
    # (~5e-3); everything else is exact up to the fp16 operands
    assert _rel(out, ref) < (1e-2 if (int_mma or (int_mma is None and group is None)) else TOL)


@pytest.mark.parametrize("bits,group,int_mma", [(8, None, None), (4, None, None), (4, None, True), (4, 32, None)])
@pytest.mark.parametrize("S,splits", [(130, 3), (130, 1), (1000, 9)])
def test_decode_fused_merge(gen, bits, group, int_mma, S, splits):
    """Stage 2 inside stage 1 (the last program of each (batch, kv head) merges the partials through
    an arrival counter) gives the two-kernel result; repeated calls reuse the reset counters."""
    from lowbit.attention.triton_decode import decode_attention_triton, token_major

    B, H, Hkv, D = 3, 8, 2, 64
    q, k, v = _qkv(gen, B, H, Hkv, 1, S, D, DTYPES[0])
    (kd, ks), (vd, vs) = quantize_kv(k, bits, group), quantize_kv(v, bits, group)
    vt = token_major(vd)
    start = torch.tensor([0, 3, 40], dtype=torch.int32)
    ref = attention_reference(q.float(), dequantize_kv(kd, ks, bits, D), dequantize_kv(vd, vs, bits, D), kv_start=start)
    two = decode_attention_triton(q, kd, ks, vt, vs, S, bits=bits, kv_start=start, splits=splits, int_mma=int_mma,
                                  fused=False)
    tol = 1e-2 if (int_mma or (int_mma is None and group is None)) else TOL
    assert _rel(two, ref) < tol
    for _ in range(3):
        one = decode_attention_triton(q, kd, ks, vt, vs, S, bits=bits, kv_start=start, splits=splits, int_mma=int_mma,
                                      fused=True)
        assert not one.isnan().any()
        assert _rel(one, two) < (1e-6 if not CUDA else 5e-3)


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 32)])
def test_decode_one_chunk_writes_the_output_directly(gen, bits, group):
    """One chunk per (batch, kv head), fused: the program writes the output rows itself (no
    partials, no merge); a sequence with no valid token (all left padding) gets zeros, as the
    two-kernel path gives it."""
    from lowbit.attention.triton_decode import decode_attention_triton, token_major

    B, H, Hkv, D, S = 3, 8, 2, 64, 75
    q, k, v = _qkv(gen, B, H, Hkv, 1, S, D, DTYPES[0])
    (kd, ks), (vd, vs) = quantize_kv(k, bits, group), quantize_kv(v, bits, group)
    vt = token_major(vd)
    start = torch.tensor([0, 30, S], dtype=torch.int32)
    two = decode_attention_triton(q, kd, ks, vt, vs, S, bits=bits, kv_start=start, splits=1, fused=False)
    one = decode_attention_triton(q, kd, ks, vt, vs, S, bits=bits, kv_start=start, splits=1, fused=True)
    assert not one.isnan().any() and one[2].abs().max() == 0
    assert _rel(one, two) < (1e-6 if not CUDA else 5e-3)
    ref = attention_reference(q[:2].float(), dequantize_kv(kd[:2], ks[:2], bits, D), dequantize_kv(vd[:2], vs[:2], bits, D),
                              kv_start=start[:2])
    assert _rel(one[:2], ref) < (1e-2 if group is None else TOL)  # one scale per token: q rounded to int8


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 32)])
def test_decode_ignores_tokens_past_the_length(gen, bits, group):
    """Planes with room for more tokens than `seq_len` (a cache's spare capacity): the fast path reads
    whole tiles up to the capacity, and what lies past the length (random codes, NaN / inf scales)
    must get no weight."""
    from lowbit.attention.triton_decode import decode_attention_triton, token_major

    B, H, Hkv, D, S, cap = 2, 8, 2, 64, 131, 192
    q, k, v = _qkv(gen, B, H, Hkv, 1, cap, D, DTYPES[0])
    (kd, ks), (vd, vs) = quantize_kv(k, bits, group), quantize_kv(v, bits, group)
    ks[:, :, S:] = float("nan")
    vs[:, :, S:] = float("inf")
    vt = token_major(vd)
    ref = attention_reference(q.float(), dequantize_kv(kd[:, :, :S], ks[:, :, :S], bits, D),
                              dequantize_kv(vd[:, :, :S], vs[:, :, :S], bits, D))
    for splits in (1, 3):
        out = decode_attention_triton(q, kd, ks, vt, vs, S, bits=bits, splits=splits, block_n=32)
        assert out.isfinite().all()
        assert _rel(out, ref) < (1e-2 if group is None else TOL)  # one scale per token: q rounded to int8


def test_decode_token_major_values_with_e8m0_scales(gen):
    """E8M0 scales run the generic kernel; token-major value codes are accepted there too."""
    from lowbit.attention.triton_decode import decode_attention_triton, token_major

    q, k, v = _qkv(gen, 2, 4, 2, 1, 17, 64, DTYPES[0])
    (kd, ks), (vd, vs) = quantize_kv(k, 8, None, "e8m0"), quantize_kv(v, 8, None, "e8m0")
    out = decode_attention_triton(q, kd, ks, token_major(vd), vs, 17, bits=8, int_mma=False)
    ref = attention_reference(q.float(), dequantize_kv(kd, ks, 8, 64), dequantize_kv(vd, vs, 8, 64))
    assert _rel(out, ref) < TOL


def test_int8_cache_close_to_float_cache(gen):
    """The int8 cache (one fp16 scale per token per head) stays within 2e-2 of the float cache."""
    from lowbit.attention.triton_decode import decode_attention_triton

    q, k, v = _qkv(gen, 1, 4, 2, 1, 130, 64, DTYPES[0])
    (kd, ks), (vd, vs) = quantize_kv(k, 8), quantize_kv(v, 8)
    out = decode_attention_triton(q, kd, ks, vd, vs, 130, bits=8)
    assert _rel(out, attention_reference(q.float(), k.float(), v.float())) < 2e-2


def test_quantize_kv_layout_golden():
    """Hand-computed planes: int4 packs element 2j low, 2j+1 high, as code + 8."""
    x = torch.tensor([[7.0, -7.0, 3.5, 0.0]])
    d, s = quantize_kv(x, bits=4)
    assert s.dtype == torch.float16 and float(s) == 1.0
    assert d.tolist() == [[(7 + 8) | ((-7 + 8) << 4), (4 + 8) | (8 << 4)]]  # 3.5 rounds half to even: 4
    d8, s8 = quantize_kv(torch.tensor([[2.0, -1.0]]), bits=8, scale_dtype="e8m0")
    assert int(s8) == 127 - 5  # 2/127 -> 2**-5.99 -> ceil -> 2**-5
    assert d8.tolist() == [[64, -32]]
    with pytest.raises(ValueError, match="bits"):
        quantize_kv(x, bits=3)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, None)])
@pytest.mark.parametrize("blocked", [True, False])
def test_quantize_append_kernel_equals_reference(gen, bits, group, blocked):
    """`quantize_append_triton` writes the same bits as `quantize_kv` + plane copies: scales, codes,
    rounding ties (half to even), an all-zero row, strided (transposed-view) inputs, token-major and
    tile-blocked values, appends of 1 and several tokens across a 128-token block boundary."""
    from lowbit.attention.reference import block_tokens, unblock_tokens
    from lowbit.attention.triton_kv_write import quantize_append_triton

    B, Hkv, D, cap = 2, 3, 64, 256
    w = D if bits == 8 else D // 2
    ng = D // (group or D)
    cdt = torch.int8 if bits == 8 else torch.uint8
    ref = [torch.zeros(B, Hkv, cap, w, dtype=cdt), torch.zeros(B, Hkv, cap, ng, dtype=torch.float16),
           torch.zeros(B, Hkv, cap, w, dtype=cdt), torch.zeros(B, Hkv, cap, ng, dtype=torch.float16)]
    planes = [p.to(DEV, copy=True) for p in ref]  # a copy on CPU too: the kernel must not write into ref
    if blocked:
        planes[2] = block_tokens(planes[2])
    for start, n in ((0, 1), (1, 5), (126, 3), (129, 1)):
        k = torch.randn(B, n, Hkv, D, generator=gen).to(torch.bfloat16).transpose(1, 2)  # HF's (B, S, H, D) view
        v = (torch.randn(B, Hkv, n, D, generator=gen) * 50).to(torch.bfloat16)
        k[0, 0, 0] = 0.0  # a row with no scale
        q = 7 if bits == 4 else 127  # a row whose every group has max |x| = QMAX: s = 1, ties at .5
        v[1, 1, 0] = torch.tensor([q, q / 2, 0.5, -2.5, 1.5, -q, -0.5, 2.0]).repeat(D // 8)
        quantize_append_triton(planes, start, k.to(DEV), v.to(DEV), bits=bits, group=group)
        for i, t in enumerate((*quantize_kv(k, bits, group), *quantize_kv(v, bits, group))):
            ref[i][:, :, start: start + n] = t
    got = [p.cpu() for p in (*planes[:2], unblock_tokens(planes[2]) if blocked else planes[2], planes[3])]
    for i in range(4):
        assert torch.equal(got[i], ref[i]), i


def test_write_block_tokens_inside_one_block_and_across_blocks(gen):
    """Appends inside one block (the strided-copy path) and across blocks (the indexed path) write
    exactly their tokens of the blocked plane and nothing else."""
    from lowbit.attention.reference import block_tokens, unblock_tokens, write_block_tokens

    plane = torch.randint(-128, 128, (2, 3, 512, 16), generator=gen, dtype=torch.int8)
    blocked = block_tokens(plane)
    for start, count in ((0, 1), (5, 3), (127, 1), (126, 4), (128, 128), (3, 300)):
        t = torch.randint(-128, 128, (2, 3, count, 16), generator=gen, dtype=torch.int8)
        write_block_tokens(blocked, start, t)
        plane[:, :, start: start + count] = t
        assert torch.equal(unblock_tokens(blocked), plane), (start, count)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, None)])
def test_decode_tile_blocked_values(gen, bits, group):
    """Value codes stored tile-blocked (`block_tokens`, as `LowbitKVCache` stores them) give the
    token-major result exactly, over a capacity of several blocks with a partial last block read."""
    from lowbit.attention.reference import block_tokens
    from lowbit.attention.triton_decode import decode_attention_triton, token_major

    B, H, Hkv, cap, D, S = 2, 8, 2, 256, 64, 200
    q, k, v = _qkv(gen, B, H, Hkv, 1, cap, D, DTYPES[0])
    (kd, ks), (vd, vs) = quantize_kv(k, bits, group), quantize_kv(v, bits, group)
    vb = block_tokens(vd)
    assert vb.shape == (B, Hkv, cap // 128, vd.shape[-1], 128)
    start = torch.tensor([0, 3], dtype=torch.int32)
    out = decode_attention_triton(q, kd, ks, vb, vs, S, bits=bits, kv_start=start, splits=3)
    same = decode_attention_triton(q, kd, ks, token_major(vd), vs, S, bits=bits, kv_start=start, splits=3)
    k_ref, v_ref = dequantize_kv(kd, ks, bits, D)[:, :, :S], dequantize_kv(vd, vs, bits, D)[:, :, :S]
    ref = attention_reference(q.float(), k_ref, v_ref, kv_start=start)
    assert torch.equal(out, same)
    assert _rel(out, ref) < (1e-2 if group is None else TOL)  # one scale per token: q rounded to int8


@pytest.mark.parametrize("bits,group,int_mma", [(8, None, True), (4, 32, False), (4, None, True), (4, None, False)])
def test_decode_q_prepared_in_the_first_trip(gen, bits, group, int_mma):
    """q read and prepared in the loop's first trip (`late_q`, after the first tiles' loads are issued)
    gives what q prepared before the loop gives, for every format, with several chunks (each program's
    first trip starts at its own chunk), a padded start and a length that ends inside a tile."""
    from lowbit.attention.reference import block_tokens
    from lowbit.attention.triton_decode import decode_attention_triton

    B, H, Hkv, cap, D, S = 2, 8, 2, 256, 64, 170
    q, k, v = _qkv(gen, B, H, Hkv, 1, cap, D, DTYPES[0])
    (kd, ks), (vd, vs) = quantize_kv(k, bits, group), quantize_kv(v, bits, group)
    vb = block_tokens(vd)
    start = torch.tensor([0, 5], dtype=torch.int32)
    late = decode_attention_triton(q, kd, ks, vb, vs, S, bits=bits, kv_start=start, splits=3, block_n=32,
                                   int_mma=int_mma, late_q=True)
    early = decode_attention_triton(q, kd, ks, vb, vs, S, bits=bits, kv_start=start, splits=3, block_n=32,
                                    int_mma=int_mma, late_q=False)
    ref = attention_reference(q.float(), dequantize_kv(kd, ks, bits, D)[:, :, :S],
                              dequantize_kv(vd, vs, bits, D)[:, :, :S], kv_start=start)
    assert torch.equal(late, early)
    assert _rel(late, ref) < (1e-2 if int_mma else TOL)


def test_decode_fast_config_small_batches_get_more_smaller_programs():
    """The fast path's defaults (`_fast_config`): the tuned configs at the benchmark's (8, 8192) and
    (32, 4096), 64-token tiles with more programs where the tuned ones would give two-tile programs
    and few warps in flight (B = 1 up to 8k tokens, measured faster on an H200), and arguments given win."""
    from lowbit.attention.triton_decode import _fast_config

    def cfg(bits, per_token, B, S, **kw):
        return _fast_config(bits, per_token, B * 8, S, 132, kw.get("bn"), kw.get("w"), kw.get("st"), kw.get("pps"))

    for B, S in ((8, 8192), (32, 4096), (1, 32768)):
        assert cfg(8, True, B, S) == (128, 2, 3, 2)
        assert cfg(4, True, B, S) == (128, 1, 3, 4)
        assert cfg(4, False, B, S) == (64, 1, 3, 8)
    for S in (1024, 4096, 8192):
        assert cfg(8, True, 1, S) == (64, 1, 3, 8)
        assert cfg(4, True, 1, S) == (64, 1, 3, 8)
        assert cfg(4, False, 1, S) == (64, 2, 3, 8)
    assert cfg(4, True, 2, 8192) == (64, 1, 3, 8) and cfg(8, True, 2, 8192) == (128, 2, 3, 2)
    assert cfg(8, True, 1, 1024, bn=32, w=4, st=2, pps=3) == (32, 4, 2, 3)
    assert cfg(8, True, 1, 1024, bn=128) == (128, 1, 3, 8)
    # more than 8 rows a program (a few tokens of each head): 4 warps for int8, with 64-token tiles
    # where 128-token ones would give fewer programs than SMs; int4 64 / 2
    assert _fast_config(8, True, 8, 1024, 132, None, None, None, None, 64) == (64, 4, 3, 8)
    assert _fast_config(8, True, 8, 8192, 132, None, None, None, None, 32) == (128, 4, 3, 8)
    assert _fast_config(8, True, 64, 8192, 132, None, None, None, None, 64) == (128, 4, 3, 2)
    assert _fast_config(4, True, 64, 8192, 132, None, None, None, None, 64) == (64, 2, 3, 4)


@pytest.mark.parametrize("Sq,S,D,H,Hkv,causal,swap,splits,fused", [
    (1, 1, 64, 4, 2, True, False, None, None), (1, 17, 64, 8, 2, False, True, None, None),
    (1, 130, 64, 4, 1, True, False, 3, False), (1, 130, 64, 4, 1, False, False, 3, True),
    (1, 130, 128, 8, 2, True, True, 2, None), (1, 130, 32, 3, 3, False, False, 5, True),
    (3, 17, 64, 4, 2, True, False, None, None), (5, 130, 64, 8, 2, True, False, 3, True),
    (5, 130, 64, 8, 2, True, True, 3, False), (2, 130, 32, 2, 1, False, False, 2, None),
    (17, 17, 64, 2, 2, True, False, None, None),
    # more rows than one program takes (a prompt continuing a cache): blocks of 64 rows
    (40, 130, 64, 4, 2, True, False, 3, None), (50, 60, 32, 4, 1, True, False, None, None),
    (33, 40, 64, 8, 4, False, False, 2, True)])
def test_float_decode_matches_reference(gen, Sq, S, D, H, Hkv, causal, swap, splits, fused):
    """Flash-decoding over a float cache (`decode_attention_float`): one or a few query tokens per
    sequence (a prompt as short as the cache too) against bf16 / fp16 keys and values, GQA groups,
    causal aligned to the end of the keys, chunks merged by a second kernel or by the last program of
    each (batch, kv head) (`fused`), per-sequence key ranges (left padding and a static cache's filled
    length; rows that see no key are 0), against the fp32 reference; repeated calls (the fused
    merge's counters must be back at zero, and the remembered launch must take the new tensors)."""
    from lowbit.attention.triton_decode import decode_attention_float

    for dtype in DTYPES:
        for _ in range(2):
            q, k, v = _qkv(gen, 2, H, Hkv, Sq, S, D, dtype)
            out = decode_attention_float(q, k, v, causal=causal, scale=0.8 / D ** 0.5, swap=swap, splits=splits,
                                         fused=fused)
            ref = attention_reference(q.float(), k.float(), v.float(), causal=causal, scale=0.8 / D ** 0.5)
            assert not out.isnan().any() and out.shape == q.shape
            assert _rel(out, ref) < TOL
        start = torch.tensor([0, min(4, S - 1)], dtype=torch.int32)
        end = torch.tensor([S, max(S - 7, start[1].item() + 1)], dtype=torch.int32)
        out = decode_attention_float(q, k, v, causal=causal, kv_start=start, kv_end=end, swap=swap, splits=splits,
                                     fused=fused)
        ref = attention_reference(q.float(), k.float(), v.float(), causal=causal, kv_start=start, kv_end=end)
        assert _rel(out, ref) < TOL


_FEW_FORMATS = [(8, None, "fp16", "blocked"), (4, 32, "fp16", "blocked"), (4, None, "fp16", "token"),
                (4, None, "e8m0", "plain"), (8, 32, "e8m0", "plain")]


# 20 tokens of 4 heads (80 rows, two blocks): the generic kernel's blocks once (its float twin has more cases)
@pytest.mark.parametrize("bits,group,scale_dtype,layout,Sq,S,causal", [
    f + c for f in _FEW_FORMATS for c in ((3, 17, True), (5, 130, True), (2, 130, False), (9, 130, True))]
    + [f + (20, 130, True) for f in _FEW_FORMATS[:4]])
def test_quantized_decode_with_a_few_query_tokens(gen, bits, group, scale_dtype, layout, Sq, S, causal, monkeypatch):
    """A few query tokens against the quantized planes (speculative decoding's drafts on a quantized
    cache): the (query head, token) rows, causal aligned to the end of the `S` valid keys, key
    ranges, one chunk (direct store), three (merged in the last program or by the merge kernel),
    against the reference on the dequantized planes. fp16 scales with tile-blocked or token-major
    values take the fast kernel (`_decode_split_vt`: 8 rows a program and more), the others the
    generic one; 80 rows (20 tokens of 4 heads) go in two blocks of 64 rows."""
    from lowbit.attention import triton_decode
    from lowbit.attention.reference import block_tokens
    from lowbit.attention.triton_decode import decode_attention_triton, token_major

    B, H, Hkv, D, cap = 2, 8, 2, 64, 256
    q, k, v = _qkv(gen, B, H, Hkv, Sq, cap, D, DTYPES[0])
    (kd, ks), (vd, vs) = quantize_kv(k, bits, group, scale_dtype), quantize_kv(v, bits, group, scale_dtype)
    start = torch.tensor([0, 2], dtype=torch.int32)
    end = torch.tensor([S, S - 1], dtype=torch.int32)
    kq, vq = dequantize_kv(kd, ks, bits, D)[:, :, :S], dequantize_kv(vd, vs, bits, D)[:, :, :S]
    vplane = {"blocked": block_tokens, "token": token_major, "plain": lambda t: t}[layout](vd)
    fast = []
    real = triton_decode.launch_remembered
    monkeypatch.setattr(triton_decode, "launch_remembered", lambda *a, **kw: fast.append(1) or real(*a, **kw))
    # three chunks merged in the last program and by the merge kernel (more than 64 rows: never in
    # the last program, so (3, None) already takes the merge kernel)
    variants = ((3, True), (3, False), (1, None)) if 4 * Sq <= 64 else ((3, None), (1, None))
    for ranges in ({}, {"kv_start": start, "kv_end": end}):
        ref = attention_reference(q.float(), kq, vq, causal=causal, **ranges)
        for splits, fused in variants:
            out = decode_attention_triton(q, kd, ks, vplane, vs, S, bits=bits, causal=causal, splits=splits,
                                          fused=fused, **ranges)
            assert not out.isnan().any() and out.shape == q.shape
            # one scale per token: q rounded to int8 per row for the int8 tensor cores (~5e-3)
            assert _rel(out, ref) < (1e-2 if group is None else TOL), (ranges, splits, fused)
    assert len(fast) == (2 * len(variants) if scale_dtype == "fp16" else 0)
    with pytest.raises(ValueError, match="rows of the split kernels"):
        decode_attention_triton(q.repeat(1, 1, 200 // Sq + 1, 1), kd, ks, vplane, vs, S, bits=bits)


def test_decode_merges_in_the_last_program_where_the_partial_rows_are_few(gen, monkeypatch):
    """The fast path's default merge: in the last program of each (batch, kv head) while splits x rows
    <= 64 (one token of 4 heads over 4 chunks), by the merge kernel beyond (8 tokens of 4 heads:
    one program merging 128 partial rows: up to 1.7x slower on an H200, RESULTS.md session 34)."""
    from lowbit.attention import triton_decode
    from lowbit.attention.reference import block_tokens
    from lowbit.attention.triton_decode import decode_attention_triton

    reduce_grids = []
    real = triton_decode._decode_reduce

    class Spy:
        def __getitem__(self, grid):
            reduce_grids.append(grid)
            return real[grid]

    monkeypatch.setattr(triton_decode, "_decode_reduce", Spy())
    B, H, Hkv, D, S = 1, 8, 2, 64, 256
    for Sq, merge_kernel in ((1, False), (8, True)):
        q, k, v = _qkv(gen, B, H, Hkv, Sq, S, D, DTYPES[0])
        (kd, ks), (vd, vs) = quantize_kv(k, 8), quantize_kv(v, 8)
        reduce_grids.clear()
        out = decode_attention_triton(q, kd, ks, block_tokens(vd), vs, S, bits=8, causal=True, splits=4)
        ref = attention_reference(q.float(), dequantize_kv(kd, ks, 8, D), dequantize_kv(vd, vs, 8, D), causal=True)
        assert _rel(out, ref) < 1e-2 and len(reduce_grids) == int(merge_kernel), (Sq, reduce_grids)


def test_float_decode_takes_values_with_other_strides(gen):
    """Keys and values need not share strides (e.g. a static cache's value view): values are copied
    to the keys' layout; the result is unchanged."""
    from lowbit.attention.triton_decode import decode_attention_float

    q, k, v = _qkv(gen, 1, 4, 2, 1, 70, 64, DTYPES[0])
    v_strided = v.transpose(1, 2).contiguous().transpose(1, 2)  # (B, S, Hkv, D) memory
    assert v_strided.stride() != k.stride()
    out = decode_attention_float(q, k, v_strided)
    assert _rel(out, attention_reference(q.float(), k.float(), v.float())) < TOL


def test_flash_attention_sends_a_few_query_tokens_to_the_float_decode(gen, monkeypatch):
    """`flash_attention` with one or a few query tokens (decoding on a float cache), or a short
    prompt continuing a long cache, runs the flash-decoding kernel where it applies (power-of-two
    head dims, Sq * H / Hkv <= `SPLIT_ROWS`, 64 rows a program, `split_kernel_wins`), the
    prefill kernel otherwise (D = 80; 40 tokens of a GQA group of 2 over 43 keys, or with the row
    limit at 64). The rule's thresholds: the H200 crossover of RESULTS.md, session 33."""
    from lowbit.attention import flash_attention
    from lowbit.attention import triton_decode
    from lowbit.kernels.registry import force_backend

    calls = []
    real = triton_decode.run_float_decode
    monkeypatch.setattr(triton_decode, "run_float_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with force_backend("attention", "triton"):
        for Sq, D, want in ((1, 64, 1), (1, 80, 0), (4, 64, 1), (40, 64, 0)):
            calls.clear()
            q, k, v = _qkv(gen, 2, 4, 2, Sq, 43, D, DTYPES[0])
            end = torch.tensor([43, 30], dtype=torch.int32)
            out = flash_attention(q, k, v, causal=True, kv_end=end)
            assert len(calls) == want
            assert _rel(out, attention_reference(q.float(), k.float(), v.float(), causal=True, kv_end=end)) < TOL
        # 80 rows over 43 keys stay on the prefill kernel (`split_kernel_wins`); where the rule lets
        # them (long caches, few rows) they take the split kernel in 64-row blocks, up to SPLIT_ROWS
        monkeypatch.setattr(triton_decode, "split_kernel_wins", lambda *a, **kw: True)
        for limit, want in ((512, 1), (64, 0)):
            monkeypatch.setattr(triton_decode, "SPLIT_ROWS", limit)
            calls.clear()
            q, k, v = _qkv(gen, 2, 4, 2, 40, 43, 64, DTYPES[0])
            out = flash_attention(q, k, v, causal=True)
            assert len(calls) == want
            assert _rel(out, attention_reference(q.float(), k.float(), v.float(), causal=True)) < TOL
        with pytest.raises(ValueError, match="power of two"):
            triton_decode.decode_attention_float(*_qkv(gen, 1, 2, 2, 1, 8, 80, DTYPES[0]))


def test_split_kernel_wins_where_the_prefill_kernel_underfills():
    from lowbit.attention.triton_decode import split_kernel_wins

    assert all(split_kernel_wins(b, 64, 128) for b in (1, 8, 64))  # one program's rows: always
    assert split_kernel_wins(1, 256, 4096) and not split_kernel_wins(1, 512, 4096)
    assert split_kernel_wins(1, 512, 16384) and not split_kernel_wins(1, 1024, 16384)
    assert split_kernel_wins(4, 128, 16384) and not split_kernel_wins(4, 128, 4096)
    assert split_kernel_wins(1, 128, 1024) and split_kernel_wins(1, 256, 2048) and not split_kernel_wins(4, 128, 2048)
    assert split_kernel_wins(1, 256, 512) and not split_kernel_wins(1, 128, 256)  # shorter: not measured
    # a quantized cache: each block of rows decodes the tiles again, so at most 4 blocks, at any batch
    assert split_kernel_wins(1, 256, 16384, quantized=True) and not split_kernel_wins(1, 512, 16384, quantized=True)
    assert split_kernel_wins(4, 256, 16384, quantized=True) and split_kernel_wins(4, 128, 2048, quantized=True)
    assert not split_kernel_wins(1, 128, 256, quantized=True)


HOPPER = CUDA and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not HOPPER, reason="the Gluon prefill kernel is compiled for sm_90 only (no interpreter for Gluon)")
@pytest.mark.parametrize("B,H,Hkv,Sq,Sk,D,causal", [(2, 4, 2, 130, 130, 128, False), (2, 4, 2, 130, 130, 128, True),
                                                    (1, 3, 1, 1000, 1000, 64, True), (2, 4, 4, 257, 300, 128, True),
                                                    (1, 2, 2, 64, 1, 128, False), (1, 2, 1, 17, 17, 64, False),
                                                    (1, 8, 2, 1, 515, 128, True)])
def test_gluon_prefill_matches_reference(gen, B, H, Hkv, Sq, Sk, D, causal):
    """Warp-specialized Hopper kernel vs the fp32 twin: tails of Sq / Sk, GQA, causal Sq < Sk, HF views."""
    from lowbit.attention.triton_prefill import flash_attention_triton

    for dtype in DTYPES:
        for q_view in (True, False):
            q, _, _ = _qkv(gen, B, H, Hkv, Sq, Sk, D, dtype, q_view=q_view)
            k = torch.randn(B, Sk, Hkv, D, generator=gen).to(DEV, dtype).transpose(1, 2)  # strided keys too
            v = torch.randn(B, Hkv, Sk, D, generator=gen).to(DEV, dtype)
            out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEV)
            flash_attention_triton(q, k, v, causal=causal, scale=0.7 / D ** 0.5, out=out, gluon=True)
            ref = attention_reference(q.float(), k.float(), v.float(), causal=causal, scale=0.7 / D ** 0.5)
            assert not out.isnan().any()
            assert _rel(out, ref) < 1e-2
    if (H - 1) % Hkv:  # query heads not a multiple of the kv heads: never the Gluon kernel
        from lowbit.attention import gluon_prefill

        assert not gluon_prefill.supports(q[:, : H - 1], k, v, causal=causal)


def test_gluon_prefill_is_chosen_only_where_it_runs(gen):
    """gluon=True insists (clear error where it cannot run); the default falls back to the Triton kernel."""
    from lowbit.attention import gluon_prefill
    from lowbit.attention.triton_prefill import flash_attention_triton

    q, k, v = _qkv(gen, 1, 2, 2, 17, 17, 80, DTYPES[0])  # head dim 80: Triton kernel only
    assert not gluon_prefill.supports(q, k, v, causal=True)
    with pytest.raises(ValueError, match="gluon=None"):
        flash_attention_triton(q, k, v, causal=True, gluon=True)
    ref = attention_reference(q.float(), k.float(), v.float(), causal=True)
    assert _rel(flash_attention_triton(q, k, v, causal=True), ref) < TOL
    q, k, v = _qkv(gen, 1, 2, 2, 17, 9, 64, DTYPES[0])
    assert not gluon_prefill.supports(q, k, v, causal=True)  # causal with more queries than keys
    with pytest.raises(ValueError, match="causal Sq <= Sk"):
        flash_attention_triton(q, k, v, causal=True, gluon=True)


@pytest.mark.skipif(not HOPPER, reason="the Gluon prefill kernel is compiled for sm_90 only (no interpreter for Gluon)")
@pytest.mark.parametrize("Sq,Sk,D,causal", [(300, 300, 128, True), (300, 300, 64, False), (17, 300, 128, True),
                                            (130, 130, 64, True)])
def test_gluon_prefill_padding_ranges(gen, Sq, Sk, D, causal):
    """Per-batch valid key ranges (left / right padding, a row whose keys start past 128), rows that see no
    key written as 0, against the fp32 twin and the Triton kernel."""
    from lowbit.attention.triton_prefill import flash_attention_triton

    starts = [0, 5, min(170, Sk - 3)]
    ends = [Sk, Sk - 43, min(201, Sk)]
    start = torch.tensor(starts, dtype=torch.int32, device=DEV)
    end = torch.tensor(ends, dtype=torch.int32, device=DEV)
    for dtype in DTYPES:
        q, k, v = _qkv(gen, 3, 4, 2, Sq, Sk, D, dtype)
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEV)
        flash_attention_triton(q, k, v, causal=causal, kv_start=start, kv_end=end, out=out, gluon=True)
        ref = attention_reference(q.float(), k.float(), v.float(), causal=causal, kv_start=start, kv_end=end)
        assert not out.isnan().any()
        assert _rel(out, ref) < 1e-2
        tri = flash_attention_triton(q, k, v, causal=causal, kv_start=start, kv_end=end, gluon=False)
        assert _rel(out, tri) < 1e-2
        if causal and Sq == Sk:  # left-padded query rows see no key: exactly 0
            assert out[2, :, : starts[2]].abs().max() == 0


def test_gluon_failure_falls_back_once_with_a_warning(monkeypatch):
    """A Gluon kernel that does not build on the installed Triton turns itself off (one warning) and the
    Triton kernel runs; gluon=True raises the error instead."""
    from lowbit.attention import triton_prefill as tp

    class Broken:
        calls = 0

        @staticmethod
        def flash_attention_gluon(*a, **kw):
            Broken.calls += 1
            raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(tp, "_GLUON_BROKEN", [])
    t = torch.zeros(1)
    with pytest.raises(RuntimeError, match="PassManager"):
        tp._run_gluon(Broken, t, t, t, insist=True)
    assert not tp._GLUON_BROKEN
    with pytest.warns(RuntimeWarning, match="the Triton kernel runs instead"):
        assert tp._run_gluon(Broken, t, t, t, insist=False) is None
    assert tp._run_gluon(Broken, t, t, t, insist=False) is None  # no second try, no second warning
    assert Broken.calls == 2
