"""Triton kernels (backend "triton") against their reference twin, on CPU through TRITON_INTERPRET=1.

Every path (GEMV, tensor-core tiles with and without split-K and operand swap, dequantize for
cuBLAS) is compared with dequantize-then-F.linear on random planes at odd shapes (M = 1, 3, 33; K
not a power of two; N not a multiple of the tile), the output poisoned with NaN before each run.
Shapes are small: the interpreter runs each program in Python.

Skipped on a CUDA machine: there the compiled kernels are checked at real and odd shapes by
`benchmarks/matmul.py --device cuda --check`, and forcing the interpreter here would leak into the
other test files of the same pytest run (the attention tests would run their kernels interpreted
on CUDA tensors; on the lent H200 a whole-suite run failed that way).
"""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CUDA machine: the compiled kernels are checked by benchmarks/matmul.py --check",
                allow_module_level=True)
# Triton compiles or interprets its own library functions (tl.sum, ...) according to this variable
# as it is when Triton is first imported; lowbit imports Triton lazily, so setting it here suffices.
os.environ.setdefault("TRITON_INTERPRET", "1")

import lowbit
from lowbit.kernels.registry import select

triton = pytest.importorskip("triton")
from lowbit.kernels import triton_linear as tlin  # noqa: E402

FORMATS = [
    "int8", "int4", "int4-asym", "int4-e8m0", "int2-e8m0", "int2", "mxfp4", "mxfp8-e4m3", "mxfp8-e5m2",
    "mxint8", "lut4", "lut8", "lut2",
]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _qweight(preset: str, n: int, k: int, seed: int, **kw) -> lowbit.QTensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, :3] *= 8  # a few large columns, so blocks get different scales
    return lowbit.quantize_tensor(w, preset, pad=True, **kw)


def _check(qt, x, cfg, bias=None, tol=1e-2):
    n, k = qt.shape
    planes = tlin.kernel_planes(qt)
    spec = tlin.spec_of(qt.fmt)
    out = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype)  # poisoned: unwritten elements show
    y = tlin.run(x, planes, spec, n, k, bias, cfg=cfg, out=out)
    ref = torch.nn.functional.linear(x.float(), qt.dequantize(torch.float32), None if bias is None else bias.float())
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert torch.isfinite(y).all(), f"unwritten or non-finite outputs for {qt.fmt.name} {cfg}"
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel <= tol, f"{qt.fmt.name} {cfg}: relative error {rel:.3e}"
    return rel


GEMV = {"path": "gemv", "BLOCK_N": 4, "NB_T": 2, "num_warps": 4, "fast": False}  # the plain-Triton GEMV
GEMV2 = {"path": "gemv2", "BLOCK_N": 4, "NWG": 2, "num_warps": 1}  # packed-pair GEMV (its fp32 twin here)
# its layouts: words per thread (WPT; blocks of 32 4-bit codes are 4 words, so WPT 8 puts two scale
# blocks in one group and takes the per-word scale branch)
GEMV2_VARIANTS = [GEMV2, dict(GEMV2, WPT=2), dict(GEMV2, WPT=1, NWG=4), dict(GEMV2, WPT=8, BLOCK_N=2),
                  dict(GEMV2, SPLIT_K=3), dict(GEMV2, WPT=2, NWG=4, SPLIT_K=2)]  # split K: last program reduces
DOT_SWAP_SPLIT = {"path": "dot", "BLOCK_N": 16, "BLOCK_M": 16, "NB_T": 2, "SPLIT_K": 3, "SWAP": True, "num_warps": 4}
DOT_PLAIN = {"path": "dot", "BLOCK_N": 16, "BLOCK_M": 16, "NB_T": 2, "SPLIT_K": 1, "SWAP": False, "num_warps": 4}
DEQUANT = {"path": "dequant", "BLOCK_N": 8, "NB_T": 2, "num_warps": 4}


@pytest.mark.parametrize("preset", FORMATS)
def test_every_path_matches_dequantize_then_matmul(preset):
    n, k = 21, 136  # K not a multiple of 32: the planes are padded; N not a multiple of any tile
    qt = _qweight(preset, n, k, seed=len(preset))
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(n, generator=g)
    for m, cfg in ((1, GEMV), (3, GEMV), (1, GEMV2), (3, GEMV2), (3, DOT_SWAP_SPLIT), (33, DOT_PLAIN), (5, DEQUANT)):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        _check(qt, x, cfg, bias=bias if m != 3 else None)


def _check_fast_gemv(qt, cfgs, seed: int, m_dtypes) -> torch.Tensor:
    """`qt` through the packed-pair GEMV with each config, for each (M, activation dtype), with a
    bias; asserts `fast_gemv_ok` first. Returns the last activations."""
    n, k = qt.shape
    spec, planes = tlin.spec_of(qt.fmt), tlin.kernel_planes(qt)
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(n, generator=g)
    for m, dt in m_dtypes:
        x = torch.randn(m, k, generator=g).to(dt)
        assert tlin.fast_gemv_ok(spec, x, planes["data"], k, "lut" in planes)
        for cfg in cfgs:
            _check(qt, x, cfg, bias=bias)
    return x


@pytest.mark.parametrize("preset", ["int4", "int4-asym", "int4-e8m0", "int2-e8m0", "int2", "int8", "mxint8", "mxfp4"])
def test_fast_gemv_covers_integer_codes(preset):
    """The packed-pair GEMV takes every integer format (2-bit rows of whole words need K % 16 == 0),
    several iterations along K, scales per block, per 4-word group or per row, zero points, bias."""
    n, k = 19, 320
    qt = _qweight(preset, n, k, seed=len(preset) + 1)
    # each config once, half of them at M = 1 in bf16 and half at M = 2 in fp16 (each half has a split-K
    # config): the activation dtype and M act on the word decode and the x rows, not on the tiling,
    # and the interpreter's ~2 s per launch made the full cross product ~170 s of the suite
    _check_fast_gemv(qt, GEMV2_VARIANTS[0::2], seed=5, m_dtypes=((1, torch.bfloat16),))
    x = _check_fast_gemv(qt, GEMV2_VARIANTS[1::2], seed=6, m_dtypes=((2, torch.float16),))
    planes = tlin.kernel_planes(qt)
    assert not tlin.fast_gemv_ok(tlin.spec_of(lowbit.PRESETS["mxfp8-e4m3"]), x, planes["data"], k, False)


@pytest.mark.parametrize("preset", ["int4", "int4-asym", "int4-e8m0", "mxfp4", "int8", "mxint8", "mxfp8-e4m3",
                                    "mxfp8-e5m2", "int2-e8m0", "int2"])
def test_packed_nibble_tensor_core_path(preset):
    """`dot4` (triton_dot4.py, its fp32 twin here): several scale blocks per iteration, split K, M
    not a multiple of the tile, rows past N, K with a partial last block, zero points, bias, x split
    by code position in the kernel or by the host (XPERM); 4-bit integer and e2m1 nibbles, int8
    bytes with a scale per row (applied to the sums) or per block, fp8 bytes, 2-bit codes."""
    n, k = 37, 328
    qt = _qweight(preset, n, k, seed=len(preset) + 3)
    spec, planes = tlin.spec_of(qt.fmt), tlin.kernel_planes(qt)
    g = torch.Generator().manual_seed(11)
    bias = torch.randn(n, generator=g)
    for m, cfg in ((5, {"path": "dot4", "BLOCK_N": 16, "BLOCK_M": 16, "NB_T": 2, "SPLIT_K": 3, "STAGES": 2}),
                   (19, {"path": "dot4", "BLOCK_N": 32, "BLOCK_M": 16, "NB_T": 1, "SPLIT_K": 1, "STAGES": 3}),
                   (33, {"path": "dot4", "BLOCK_N": 16, "BLOCK_M": 32, "NB_T": 2, "SPLIT_K": 2, "XPERM": True})):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        assert tlin.dot4_ok(spec, x, False)
        _check(qt, x, cfg, bias=bias if m == 5 else None)
    assert not tlin.dot4_ok(tlin.spec_of(lowbit.PRESETS["lut4"]), x, False)
    assert tlin.dot4_ok(spec, x, False, planes["data"])
    assert not tlin.dot4_ok(spec, x, False, planes["data"][:, :-1])  # an odd number of bytes: no uint16 view


def test_fast_gemv_asm_is_well_formed():
    """The generated PTX: one LOP3 per pair of codes and the right operand count (its arithmetic:
    tests/test_gemv_ptx.py; on the GPU, `benchmarks/matmul.py --check`)."""
    from lowbit.kernels import gemv_ptx

    a4, a2 = gemv_ptx._asm_word(4, False, 8), gemv_ptx._asm_word(2, True, 2)
    assert a4.count("lop3.b32") == 4 and a4.count("fma.rn.bf16x2") == 7 and "$5" in a4 and "$6" not in a4
    assert a2.count("lop3.b32") == 8 and "$9" in a2 and "$10" not in a2
    assert "0xc188c188" in a4  # -(16 + 8/8) as a bf16 pair: the symmetric offset
    lut = gemv_ptx.word_asm(4, False, True, False, lut=True)
    assert "$13" in lut and "$14" not in lut and lut.count("prmt.b32") == 14


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("scale_dtype", ["bf16", "fp16"])
def test_int4_block_sizes_and_scale_dtypes(block, scale_dtype):
    qt = _qweight("int4", 24, 256, seed=block, block_size=block, scale_dtype=scale_dtype)
    g = torch.Generator().manual_seed(block)
    for m, cfg in ((1, GEMV), (17, DOT_SWAP_SPLIT)):
        _check(qt, torch.randn(m, 256, generator=g).to(torch.float16), cfg)


def test_grouped_int8_palette_with_channel_scale():
    qt = _qweight("lut4", 32, 96, seed=3, group_size=8, lut_dtype="int8", per_channel_scale=True)
    assert set(qt.planes) == {"data", "lut", "lut_scale", "scale"}
    g = torch.Generator().manual_seed(3)
    for m, cfg in ((1, GEMV), (4, DOT_SWAP_SPLIT), (2, DEQUANT)):
        _check(qt, torch.randn(m, 96, generator=g).to(torch.bfloat16), cfg)


@pytest.mark.parametrize("preset", ["int8", "lut4"])
def test_rows_that_are_not_whole_words_take_the_byte_gemv(preset):
    qt = _qweight(preset, 9, 130, seed=2)  # 130 (int8) or 65 (lut4) bytes a row: not int32 words
    assert qt.data.shape[1] % 4
    g = torch.Generator().manual_seed(2)
    _check(qt, torch.randn(2, 130, generator=g).to(torch.bfloat16), GEMV)


def test_heuristic_configs_and_split_counters_reset():
    qt = _qweight("int4-e8m0", 40, 512, seed=11)
    spec = tlin.spec_of(qt.fmt)
    g = torch.Generator().manual_seed(11)
    for m in (1, 3, 9, 70, 300):
        cfg = tlin.heuristic(spec, m, 512, 40)
        x = torch.randn(m, 512, generator=g).to(torch.bfloat16)
        _check(qt, x, cfg)
    # the split-K arrival counters are left at zero for the next launch
    assert int(tlin._counters(torch.device("cpu")).abs().sum()) == 0


def test_heuristic_takes_dot4_for_4bit_codes_up_to_128_rows():
    """Untuned shapes: 4-bit integer codes take `dot4` at M = 3..16 and 65..128, and at M = 17..64
    for weights of >= 16M elements (16-row x tiles split in the kernel to M = 16, 32 / 64 rows
    split by the host above, K split while the grid has fewer than two programs per SM); other
    formats take `dot` up to M = 64 and dequantize + cuBLAS above; a dot4 config on a format dot4
    does not decode falls back to a non-dot4 heuristic."""
    spec = tlin.spec_of(lowbit.PRESETS["int4"])
    sm = tlin._sm_count()
    c16, c128 = (tlin.heuristic(spec, m, 4096, 1024) for m in (16, 128))
    c32 = tlin.heuristic(spec, 32, 4096, 8192)
    assert (c16["path"], c16["BLOCK_M"], c16["XPERM"]) == ("dot4", 16, False)
    assert c16["SPLIT_K"] == (4 if 16 * 4 < 2 * sm else 2)
    assert (c32["path"], c32["BLOCK_M"], c32["XPERM"], c128["BLOCK_M"]) == ("dot4", 32, True, 64)
    assert tlin.heuristic(spec, 32, 4096, 1024)["path"] == "dot"  # a small weight at M = 17..64
    assert tlin.heuristic(spec, 200, 4096, 1024)["path"] == "dequant"
    assert [tlin.heuristic(spec, m, 4096, 1024)["path"] for m in (1, 2, 3, 4)] == ["gemv", "gemv", "dot4", "dot4"]
    assert tlin.heuristic(tlin.spec_of(lowbit.PRESETS["int8"]), 4, 4096, 1024)["path"] == "dot4"
    assert tlin.heuristic(tlin.spec_of(lowbit.PRESETS["lut4"]), 4, 4096, 1024)["path"] == "gemv"
    assert tlin.heuristic(spec, 16, 4096, 1024, allow_dot4=False)["path"] == "dot"
    for other in ("mxfp4", "int8", "mxint8", "mxfp8-e4m3"):  # codes dot4 decodes besides 4-bit integers
        assert tlin.heuristic(tlin.spec_of(lowbit.PRESETS[other]), 16, 4096, 1024)["path"] == "dot4"
    for other in ("lut4", "lut8"):
        assert tlin.heuristic(tlin.spec_of(lowbit.PRESETS[other]), 16, 4096, 1024)["path"] == "dot"
        assert tlin.heuristic(tlin.spec_of(lowbit.PRESETS[other]), 65, 4096, 1024)["path"] == "dequant"
    qt = _qweight("lut4", 24, 256, seed=4)  # a dot4 config on palette codes: run falls back
    _check(qt, torch.randn(9, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16), c16)


def test_table_prefers_the_decode_family_then_bits_then_any(monkeypatch):
    """`choose` takes an fp4 / affine entry for mxfp4 / int4-asym, the bits entry next, then '*';
    a dot4 bits entry is skipped by palette codes, which dot4 does not decode."""
    entries = {"*|1|64|32": {"path": "gemv2", "BLOCK_N": 4, "num_warps": 1, "NWG": 32, "WPT": 4},
               "fp4|1|64|32": {"path": "gemv2", "BLOCK_N": 16, "num_warps": 4, "NWG": 32, "WPT": 4},
               "asym|1|64|32": {"path": "gemv2", "BLOCK_N": 8, "num_warps": 2, "NWG": 64, "WPT": 4},
               "4|16|64|32": {"path": "dot4", "BLOCK_N": 64, "BLOCK_M": 16, "KB_T": 128, "num_warps": 4}}
    monkeypatch.setattr(tlin, "_table", entries)
    spec = {p: tlin.spec_of(_qweight(p, 32, 64, seed=1).fmt)
            for p in ("int4-e8m0", "mxfp4", "int4-asym", "lut4")}
    assert tlin.decode_family(spec["int4-e8m0"]) is None
    assert tlin.choose(spec["int4-e8m0"], 1, 64, 32)["BLOCK_N"] == 4
    assert tlin.choose(spec["mxfp4"], 1, 64, 32)["BLOCK_N"] == 16
    assert tlin.choose(spec["int4-asym"], 1, 64, 32)["BLOCK_N"] == 8
    assert tlin.choose(spec["int4-asym"], 16, 64, 32)["path"] == "dot4"  # no family entry at M = 16
    assert tlin.choose(spec["mxfp4"], 16, 64, 32)["path"] == "dot4"  # e2m1 nibbles: dot4 decodes them
    assert tlin.choose(spec["lut4"], 16, 64, 32)["path"] != "dot4"


def test_custom_op_has_a_fake_and_follows_x_shape():
    qt = _qweight("mxfp4", 16, 64, seed=5)
    p = tlin.kernel_planes(qt)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = torch.ops.lowbit.qlinear(x, p["data"], p["scale"], None, None, None, None, None,
                                 tlin.spec_of(qt.fmt).key(), 16, 64, 0)
    assert y.shape == (2, 3, 16)
    ref = torch.nn.functional.linear(x.float(), qt.dequantize())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    torch.library.opcheck(torch.ops.lowbit.qlinear,
                          (x, p["data"], p["scale"], None, None, None, None, None, tlin.spec_of(qt.fmt).key(), 16, 64, 0),
                          test_utils=("test_schema", "test_faketensor"))



def test_eager_calls_skip_the_custom_op_and_compiled_graphs_keep_it(monkeypatch):
    """The kernel-table entry runs the op's body directly in eager mode (the custom op's Python
    wrapper cost ~170 us a call on an H200 host, RESULTS.md) with the op's exact result, and goes
    through `lowbit::qlinear` under torch.compile (one graph, the op in it) and for inputs that
    need gradients."""
    qt = _qweight("int4-e8m0", 24, 64, seed=6)
    p = tlin.kernel_planes(qt)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    op = torch.ops.lowbit.qlinear(x, p["data"], p["scale"], None, None, None, None, None,
                                  tlin.spec_of(qt.fmt).key(), 24, 64, 0)
    calls = []
    real = tlin.qlinear

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(tlin, "qlinear", counting)
    eager = tlin.linear(x, qt)
    assert calls == [] and torch.equal(eager, op)
    tlin.linear(x.float().requires_grad_(), qt)
    assert calls == [1]
    monkeypatch.setattr(tlin, "qlinear", real)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda t: tlin.linear(t, qt), backend=backend, fullgraph=True)(x)
    assert len(graphs) == 1 and any("lowbit.qlinear" in t for t in graphs[0]), graphs
    assert torch.equal(compiled, op)

def test_table_registration_and_unsupported_formats():
    for preset in ("int4", "int4-e8m0", "mxfp4", "int8", "lut4"):
        assert tlin.supports(lowbit.PRESETS[preset], (64, 64)), preset
        assert select(lowbit.PRESETS[preset], "linear", "cuda", shape=(64, 64))[0] == "triton"
    for preset in ("mxfp6-e3m2", "q4_0", "lut3", "lut6"):
        assert tlin.spec_of(lowbit.PRESETS[preset]) is None
        assert select(lowbit.PRESETS[preset], "linear", "cuda", shape=(64, 64))[0] == "reference"
    # never chosen on CPU tensors: the interpreter is for tests only
    assert select(lowbit.PRESETS["int4"], "linear", "cpu", shape=(64, 64))[0] != "triton"
    assert tlin.m_bucket(1) == 1 and tlin.m_bucket(17) == 32 and tlin.m_bucket(10**6) == 2048


def test_without_triton_the_table_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(tlin, "HAVE_TRITON", False)
    assert not tlin.supports(lowbit.PRESETS["int4"], (64, 64))
    assert select(lowbit.PRESETS["int4"], "linear", "cuda", shape=(64, 64))[0] == "reference"


_GEMV_MOD = None


def _pairs_probe_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, out_ptr, xs_ptr, K, BITS: tl.constexpr, F16: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
        word = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
        q = _GEMV_MOD._load_x(x_ptr, word, K, BITS, True)
        x0, x1, x2, x3, x4, x5, x6, x7, xs = _GEMV_MOD._x_operands(q, BITS, F16, True, True)
        n = R * C
        tl.store(out_ptr + word, x0)
        tl.store(out_ptr + n + word, x1)
        tl.store(out_ptr + 2 * n + word, x2)
        tl.store(out_ptr + 3 * n + word, x3)
        tl.store(out_ptr + 4 * n + word, x4)
        tl.store(out_ptr + 5 * n + word, x5)
        tl.store(out_ptr + 6 * n + word, x6)
        tl.store(out_ptr + 7 * n + word, x7)
        tl.store(xs_ptr + word, xs)

    return probe


@pytest.mark.parametrize("bits", [4, 2, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_gemv_activation_pairs(bits, dtype):
    """`_load_x` + `_x_operands` with ASM=True (plain loads and splits, so the interpreter runs
    them): word w's pair i holds activations (i, i + P) of the word as two 16-bit floats (P = 4 for
    4-bit codes, 8 for 2-bit), low half first, and the word's activation sum; int8 words get their
    four activations as fp32 bits. The GPU asm consumes exactly this."""
    global _GEMV_MOD
    _GEMV_MOD = tlin._kern("triton_gemv")  # the interpreter's copy of the module
    probe = _pairs_probe_kernel()
    cpw, r, c = 32 // bits, 2, 4
    words = r * c
    k = words * cpw - cpw  # the last word past K (rows are whole words): its activations read as 0
    x = torch.randn(k, generator=torch.Generator().manual_seed(bits)).to(dtype)
    out = torch.zeros(8, words, dtype=torch.int32)
    xs = torch.zeros(words)
    probe[(1,)](x, out, xs, k, BITS=bits, F16=dtype == torch.float16, R=r, C=c)
    xp = torch.cat([x, torch.zeros(words * cpw - k, dtype=dtype)]).view(torch.int16).to(torch.int32) & 0xFFFF
    half = cpw // 2
    if bits == 8:
        xf = torch.cat([x, torch.zeros(words * cpw - k, dtype=dtype)]).float().view(torch.int32)
        for w in range(words):
            for i in range(4):
                assert out[i, w].item() == xf[w * 4 + i].item(), (w, i)
        return
    for w in range(words):
        for i in range(8 if bits == 2 else 4):
            lo, hi = xp[w * cpw + i], xp[w * cpw + i + half]
            assert out[i, w].item() & 0xFFFFFFFF == (lo | (hi << 16)).item() & 0xFFFFFFFF, (w, i)
        want = torch.cat([x, torch.zeros(words * cpw - k, dtype=dtype)])[w * cpw:(w + 1) * cpw].float().sum()
        assert abs(xs[w].item() - want.item()) < 1e-4


@pytest.mark.parametrize("kw", [{}, {"group_size": 8, "lut_dtype": "int8", "per_channel_scale": True},
                                {"group_size": 4}])
def test_fast_gemv_takes_4bit_palettes(kw):
    """4-bit palettes run the packed-pair GEMV (its fp32 twin here): one palette per tensor, per
    group of 8 rows with an int8 table, its scale and a per-channel scale (BLOCK_N 16 is cut to 8
    so a program's rows share one palette), per group of 4 rows; bf16 and fp16, bias, split K."""
    n, k = 32, 320
    qt = _qweight("lut4", n, k, seed=9, **kw)
    x = _check_fast_gemv(qt, (GEMV2, dict(GEMV2, BLOCK_N=16), dict(GEMV2, SPLIT_K=3)), seed=13,
                         m_dtypes=((1, torch.bfloat16), (3, torch.float16)))
    for other in ("lut2", "lut8"):
        q2 = _qweight(other, n, k, seed=1)
        assert not tlin.fast_gemv_ok(tlin.spec_of(q2.fmt), x, tlin.kernel_planes(q2)["data"], k, True)


def _lut_tables_probe():
    import triton
    import triton.language as tl

    @triton.jit
    def probe(lut_ptr, ls_ptr, out_ptr, f_ptr, G: tl.constexpr, HAS_LS: tl.constexpr, F16: tl.constexpr):
        t0, t1, t2, t3, t4, t5, t6, t7, f = _GEMV_MOD._lut_tables(lut_ptr, ls_ptr, G, HAS_LS, F16)
        tl.store(out_ptr + 0, t0)
        tl.store(out_ptr + 1, t1)
        tl.store(out_ptr + 2, t2)
        tl.store(out_ptr + 3, t3)
        tl.store(out_ptr + 4, t4)
        tl.store(out_ptr + 5, t5)
        tl.store(out_ptr + 6, t6)
        tl.store(out_ptr + 7, t7)
        tl.store(f_ptr, f)

    return probe


@pytest.mark.parametrize("int8_table", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lut_tables_scale_the_palette_into_one_to_two(int8_table, dtype):
    """`_lut_tables` (ASM-side, plain Triton so the interpreter runs it): palette g's entries times
    its scale, divided by a power of two f so the largest magnitude lies in [1, 2), rounded to the
    activation dtype, as eight byte tables (low bytes of entries 0-3, 4-7, 8-11, 12-15, then high
    bytes); the GPU asm looks its entries up there (tests/test_gemv_ptx.py)."""
    global _GEMV_MOD
    _GEMV_MOD = tlin._kern("triton_gemv")
    gen = torch.Generator().manual_seed(int(int8_table) + 2 * (dtype == torch.float16))
    if int8_table:
        lut = torch.randint(-127, 128, (3, 16), generator=gen, dtype=torch.int8)
        ls = torch.tensor([[0.01], [3e-4], [2.5]], dtype=torch.float16)
        vals = lut.float() * ls.float()
    else:
        lut = (torch.randn(3, 16, generator=gen) * torch.tensor([[1e-3], [40.0], [1.0]])).half()
        ls = lut
        vals = lut.float()
    out = torch.zeros(8, dtype=torch.int32)
    f = torch.zeros(1)
    for g in range(3):
        _lut_tables_probe()[(1,)](lut, ls, out, f, G=g, HAS_LS=int8_table, F16=dtype == torch.float16)
        v = vals[g]
        e = int(torch.floor(torch.log2(v.abs().max())).item())
        assert f.item() == 2.0 ** e
        h = (v * 2.0 ** -e).to(dtype).view(torch.int16).int() & 0xFFFF
        lo, hi = (h & 0xFF).tolist(), (h >> 8).tolist()
        want = [sum(t[4 * i + j] << (8 * j) for j in range(4)) for t in (lo, hi) for i in range(4)]
        assert [w & 0xFFFFFFFF for w in out.tolist()] == want, g


def test_dot_tiles_count_codes_and_fall_back_when_they_do_not_fit(monkeypatch):
    """`dot` / `dot4` table entries give sub-4-bit formats as many codes per iteration as 4-bit ones (not as
    many bytes: int2 at 128 x 128 tiles asked an H200 for 256 KiB of shared memory), and a tile the
    GPU refuses (OutOfResources) falls back to dequantize + cuBLAS with a warning, same result."""
    specs = {p: tlin.spec_of(lowbit.PRESETS[p]) for p in ("int2-e8m0", "int4-e8m0", "mxfp4", "int8")}
    assert [tlin.dot_blocks(64, specs[p]) for p in specs] == [4, 4, 4, 2]
    assert tlin._fit({"path": "dot", "KB_T": 64}, specs["int2-e8m0"], 128)["NB_T"] == 4
    assert tlin._fit({"path": "dequant", "KB_T": 64}, specs["int2-e8m0"], 128)["NB_T"] == 8
    # dot4 too (its decoded tiles live in registers: int2 at int4's bytes per iteration would spill)
    assert [tlin._fit({"path": "dot4", "KB_T": 128}, specs[p], 16)["NB_T"] for p in specs] == [8, 8, 8, 4]

    class Refuses:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise triton.runtime.errors.OutOfResources(262144, 232448, "shared memory")
            return launch

    monkeypatch.setattr(tlin._kern(), "_dot_kernel", Refuses())
    qt = _qweight("int2-e8m0", 24, 256, seed=6)
    with pytest.warns(RuntimeWarning, match="dequantize"):
        _check(qt, torch.randn(70, 256, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16), DOT_PLAIN)


GLU_PRESETS = ["int4-e8m0", "int4", "int4-asym", "int8", "mxfp4", "int2-e8m0"]


@pytest.mark.parametrize("preset", GLU_PRESETS)
def test_fast_gemv_glu_epilogue_matches_silu_of_the_reference(preset):
    """`run(..., glu=True)`: rows are (gate, up) pairs and the GEMV's epilogue writes silu(gate) * up
    (lowbit.nn.gated); against silu_mul_pairs of dequantize-then-matmul, output poisoned, with a
    bias. Half the fast-GEMV layouts at M = 1 and a split-K one at M = 3 per format (alternating, so
    that the formats together cover every layout; the interpreter costs ~1 s a launch); a tile path
    (the first format) takes the unfused way."""
    from lowbit.kernels.reference import silu_mul_pairs
    from lowbit.nn.gated import interleave_rows

    n, k = 22, 144  # 11 pairs: the last row block is partly empty for BLOCK_N 4; 2-bit rows need K % 16 == 0
    qt = interleave_rows(_qweight(preset, n // 2, k, seed=1), _qweight(preset, n // 2, k, seed=2))
    planes, spec = tlin.kernel_planes(qt), tlin.spec_of(qt.fmt)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(n, generator=g)
    i = GLU_PRESETS.index(preset)
    splits = [c for c in GEMV2_VARIANTS if c.get("SPLIT_K", 1) > 1]
    half = torch.bfloat16 if i % 2 == 0 else torch.float16  # the 16-bit word decode: one layout per format
    cases = ((1, torch.float32, GEMV2_VARIANTS[i % 2::2]), (1, half, [GEMV2_VARIANTS[i % len(GEMV2_VARIANTS)]]),
             (3, torch.float32, [splits[i % len(splits)]] + ([DOT_PLAIN] if i == 0 else [])))
    for m, dt, cfgs in cases:
        x = torch.randn(m, k, generator=g).to(dt)
        ref = silu_mul_pairs(torch.nn.functional.linear(x.float(), qt.dequantize(torch.float32), bias))
        for cfg in cfgs:
            assert cfg["path"] != "gemv2" or tlin.fast_gemv_ok(spec, x, planes["data"], k, False)
            out = torch.full((m, n // 2), float("nan"), dtype=dt)
            y = tlin.run(x, planes, spec, n, k, bias, cfg=cfg, out=out, glu=True)
            assert y.shape == (m, n // 2) and torch.isfinite(y).all(), f"{preset} {cfg}: unwritten outputs"
            rel = ((y.float() - ref).norm() / ref.norm()).item()
            assert rel <= (1e-5 if dt == torch.float32 else 1e-2), f"{preset} M={m} {dt} {cfg}: relative error {rel:.3e}"
