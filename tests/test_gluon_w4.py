"""The Hopper int4 matmul (`kernels/gluon_w4.py`): its repacked word layout against the tensor
cores' A-fragment definition, its PTX decode through the emulator, the routing rule (CPU), and the
kernel itself against dequantize-then-matmul (sm_90 only: Gluon has no interpreter)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from ptx_emulator import halves_to_float, run_ptx

import lowbit
from lowbit.formats import PRESETS
from lowbit.kernels import triton_linear as tlin
from lowbit.kernels.nibble_ptx import asm_words

CUDA = torch.cuda.is_available()
HOPPER = CUDA and torch.cuda.get_device_capability()[0] == 9


def _fragment_words(codes: torch.Tensor, gs: int) -> torch.Tensor:
    """The words the kernel wants, from PTX's mma.m16n8k16 A fragment (one warp, 16 x 16 tile):
    lane = 4 g + t holds a0 = (row g, cols 2t, 2t+1), a1 = (row g+8, same cols), a2 = (row g,
    cols 2t+8, 2t+9), a3 = (row g+8, cols 2t+8, 2t+9); register ai's two elements are nibble i of
    the word's low and high half. Written with plain loops: an independent twin of `pack_words`."""
    n, k = codes.shape
    ks_n = gs // 16
    c = codes.tolist()
    out = np.zeros((k // gs, n // 16, 32, ks_n), dtype=np.int64)
    for gq in range(k // gs):
        for rb in range(n // 16):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for ks in range(ks_n):
                    word = 0
                    for i, (dr, dc) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
                        row, col = 16 * rb + g + dr, gs * gq + 16 * ks + 2 * t + dc
                        word |= c[row][col] << (4 * i)
                        word |= c[row][col + 1] << (16 + 4 * i)
                    out[gq, rb, lane, ks] = word
    out = np.where(out >= 2**31, out - 2**32, out)
    return torch.from_numpy(out.reshape(k // gs * n // 16, 32 * ks_n)).to(torch.int32)


@pytest.mark.parametrize("n,k,gs", [(16, 32, 32), (48, 256, 64), (32, 256, 128)])
def test_pack_words_puts_each_fragment_in_its_lane(n, k, gs):
    from lowbit.kernels.gluon_w4 import pack_words, unpack_words

    gen = torch.Generator().manual_seed(n + k + gs)
    data = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    scale = torch.rand(n, k // gs, generator=gen).half()
    words, scales = pack_words(data, scale, gs)
    codes = torch.stack((data & 15, data >> 4), -1).reshape(n, k)
    assert torch.equal(words, _fragment_words(codes, gs))
    assert torch.equal(scales, scale.t())
    assert torch.equal(unpack_words(words, n, k, gs), codes)
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_words(data[:8], scale[:8], gs)


def test_packed_planes_are_made_once_and_dropped_with_the_plane():
    """Another tensor object over the same storage (what torch.compile may pass) reuses the words."""
    import gc

    from lowbit.kernels import gluon_w4

    gluon_w4._PACKED.clear()
    data = torch.randint(0, 256, (32, 64), dtype=torch.uint8)
    scale = torch.rand(32, 4).half()
    first = gluon_w4.packed_planes(data, scale, 32)
    assert gluon_w4.packed_planes(data.view(32, 64), scale, 32) is first
    assert torch.equal(first[0], gluon_w4.pack_words(data, scale, 32)[0])
    assert gluon_w4.packed_planes(data, scale.clone(), 32) is not first  # other scales: packed again
    del data, first
    gc.collect()
    assert not gluon_w4._PACKED


@pytest.mark.parametrize("f16", [False, True])
def test_word_decode_ptx(f16):
    """asm_words: output 2 i + h is nibble i of half h, as c - 8, exactly."""
    dt = torch.float16 if f16 else torch.bfloat16
    text = asm_words(f16)
    rng = np.random.default_rng(int(f16))
    for _ in range(300):
        word = int(rng.integers(0, 2**32))
        out = run_ptx(text, {"$8": word}, dt)
        for i in range(4):
            for h in range(2):
                got = halves_to_float(out[f"${2 * i + h}"], dt)[0]
                assert got == ((word >> (16 * h + 4 * i)) & 15) - 8, (hex(word), i, h, got)


@pytest.mark.parametrize("f16", [False, True])
def test_word_decode_ptx_with_row_scales(f16):
    """asm_words(scaled=True): pair i times the scale of its row ($9 for positions 0, 2, $10 for 1, 3),
    rounded once to the 16-bit type: what dequantizing the weight to it gives."""
    dt = torch.float16 if f16 else torch.bfloat16
    text = asm_words(f16, scaled=True)
    rng = np.random.default_rng(7)
    for _ in range(300):
        word = int(rng.integers(0, 2**32))
        sg, sg8 = (float(torch.tensor(float(v)).to(dt)) for v in rng.uniform(-0.05, 0.05, 2))
        pair = {s: int(torch.tensor([s, s], dtype=dt).view(torch.int32)) & 0xFFFFFFFF for s in (sg, sg8)}
        out = run_ptx(text, {"$8": word, "$9": pair[sg], "$10": pair[sg8]}, dt)
        for i in range(4):
            scale = sg if i % 2 == 0 else sg8
            for h in range(2):
                got = halves_to_float(out[f"${2 * i + h}"], dt)[0]
                want = float(torch.tensor(((word >> (16 * h + 4 * i)) & 15) - 8.0) * torch.tensor(scale))
                want = float(torch.tensor(want).to(dt))
                assert got == want, (hex(word), i, h, got, want)


def test_fp16_fold_needs_normal_fp16_weights():
    """Folding scales into fp16 operands only where every scale is 0 or in [2^-14, 4096]; E8M0 bytes
    read as 2^(e - 127); the packed planes carry the answer for `run_planes`."""
    from lowbit.kernels.gluon_w4 import fp16_fold_ok, packed_planes

    assert fp16_fold_ok(torch.tensor([0.0, 2.0 ** -14, 4096.0], dtype=torch.float32))
    assert not fp16_fold_ok(torch.tensor([2.0 ** -15, 1.0]))
    assert not fp16_fold_ok(torch.tensor([1.0, 8192.0], dtype=torch.bfloat16))
    assert fp16_fold_ok(torch.tensor([-1e-3, 1e-3], dtype=torch.float16))  # magnitudes count
    assert fp16_fold_ok(torch.tensor([113, 139], dtype=torch.uint8))       # 2^-14 .. 2^12
    assert not fp16_fold_ok(torch.tensor([112, 127], dtype=torch.uint8))
    assert not fp16_fold_ok(torch.tensor([127, 140], dtype=torch.uint8))
    data = torch.randint(0, 256, (32, 64), dtype=torch.uint8)
    ok = packed_planes(data, torch.full((32, 4), 1e-3, dtype=torch.float16), 32)
    tiny = packed_planes(data.clone(), torch.full((32, 4), 1e-6, dtype=torch.float16), 32)
    assert ok[3] and not tiny[3] and ok[2] == {}  # the flag beside the (empty) launch plans


def test_gluon4_is_chosen_only_where_it_runs(monkeypatch):
    """Symmetric int4 codes with 32..128-value groups at M = 2..1024 on sm_90 (small weights from M = 5);
    nothing else."""
    monkeypatch.setattr(tlin, "_sm_count", lambda: 132)
    spec = tlin.spec_of(PRESETS["int4-e8m0"])
    cfg = tlin.gluon4_config(spec, 16, 8192, 8192, sm90=True)
    assert cfg == {"path": "gluon4", "num_wg": 2, "block_m": 16, "split_k": 2, "stages": 4}
    assert tlin.gluon4_config(spec, 64, 14336, 4096, sm90=True)["num_wg"] == 1  # few row blocks: one warpgroup
    assert tlin.gluon4_config(spec, 40, 4096, 14336, sm90=True)["split_k"] == 1  # 112 programs without a split
    # M > 64: scales folded into the operands; 128-row blocks where they fill the SMs (128 programs), else 64
    assert tlin.gluon4_config(spec, 256, 8192, 8192, sm90=True) == {
        "path": "gluon4", "num_wg": 2, "block_m": 128, "split_k": 1, "stages": 4, "fold": True}
    assert tlin.gluon4_config(spec, 128, 8192, 8192, sm90=True)["block_m"] == 64  # 64 programs of 128 rows
    small = tlin.gluon4_config(spec, 128, 4096, 4096, sm90=True)
    assert (small["block_m"], small["split_k"]) == (64, 2)  # 32 x 2 blocks: K split in two
    assert tlin.gluon4_config(spec, 1024, 4096, 4096, sm90=True)["block_m"] == 128
    # M = 2..8: 8-row blocks; one warpgroup for narrow outputs, six stages for an lm_head
    assert tlin.gluon4_config(spec, 2, 8192, 8192, sm90=True) == {
        "path": "gluon4", "num_wg": 2, "block_m": 8, "split_k": 2, "stages": 4}
    assert tlin.gluon4_config(spec, 8, 4096, 1024, sm90=True)["num_wg"] == 1
    assert tlin.gluon4_config(spec, 4, 4096, 128256, sm90=True)["stages"] == 6
    assert tlin.gluon4_config(spec, 9, 4096, 4096, sm90=True)["block_m"] == 16
    for m, k, n in ((1, 4096, 4096), (4, 4096, 1024), (1025, 4096, 4096), (16, 4160, 4096), (16, 4096, 4100), (16, 4096, 0)):
        assert tlin.gluon4_config(spec, m, k, n, sm90=True) is None, (m, k, n)
    assert tlin.gluon4_config(spec, 16, 4096, 4096, sm90=False) is None
    for name in ("int4-asym", "mxfp4", "int2-e8m0", "int8", "lut4"):
        s = tlin.spec_of(PRESETS[name])
        assert s is None or tlin.gluon4_config(s, 16, 4096, 4096, sm90=True) is None, name
    s256 = tlin.spec_of(PRESETS["int4"].replace(block_size=256))
    assert tlin.gluon4_config(s256, 16, 4096, 4096, sm90=True) is None
    monkeypatch.setattr(tlin, "GLUON_W4", False)
    assert tlin.gluon4_config(spec, 16, 4096, 4096, sm90=True) is None


def test_gluon4_min_rows_from_the_environment():
    """LOWBIT_GLUON4_MIN_M sets where the Hopper int4 kernel starts (the repacked copy with it); a value
    that is not a whole number fails at import with the variable's name."""
    import subprocess
    import sys

    code = "import lowbit.kernels.triton_linear as t; print(t.GLUON4_MIN_M)"
    env = {**os.environ, "LOWBIT_GLUON4_MIN_M": "9"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "9", out.stderr[-500:]
    env["LOWBIT_GLUON4_MIN_M"] = "nine"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "LOWBIT_GLUON4_MIN_M='nine'" in bad.stderr


@pytest.mark.skipif(not HOPPER, reason="the Gluon int4 kernel is compiled for sm_90 only (no interpreter for Gluon)")
@pytest.mark.parametrize("preset,gs", [("int4", 32), ("int4-e8m0", 32), ("int4", 64), ("int4-e8m0", 128)])
def test_gluon4_matches_dequantize_then_matmul(preset, gs):
    """Every config shape (warpgroups, split-K, stages, groups per stage; odd, even and single
    stage counts per program) at odd M, bf16 / fp16, with and without bias, the scales applied to the
    products or (bf16) folded into the operands, outputs NaN-poisoned, vs the fp32 product of the
    dequantized weight."""
    from lowbit.kernels.gluon_w4 import matmul_w4, pack_words

    gen = torch.Generator(device="cuda").manual_seed(gs)
    n, k = 384, 1024
    qt = lowbit.quantize_tensor(torch.randn(n, k, device="cuda", generator=gen) * 0.02,
                                PRESETS[preset].replace(block_size=gs))
    words, scales = pack_words(qt.planes["data"], qt.planes["scale"], gs)
    ref_w = qt.dequantize(torch.float32)
    cnt = torch.zeros(1024, dtype=torch.int32, device="cuda")
    for dt in (torch.bfloat16, torch.float16):
        for m, cfg in ((9, dict(num_wg=2, block_m=16, split_k=1, stages=4)),
                       (2, dict(num_wg=2, block_m=8, split_k=2, stages=4)),  # a few rows: 8-row blocks
                       (7, dict(num_wg=1, block_m=8, split_k=3, stages=6)),
                       (33, dict(num_wg=1, block_m=64, split_k=2, stages=6)),
                       (64, dict(num_wg=2, block_m=64, split_k=3, stages=3, ngs=max(1, 64 // gs))),
                       (20, dict(num_wg=2, block_m=32, split_k=4, stages=5)),
                       (12, dict(num_wg=1, block_m=16, split_k=8, stages=2)),  # one stage per split
                       (200, dict(num_wg=2, block_m=128, split_k=1, stages=4)),  # large M: 128-row blocks
                       (77, dict(num_wg=1, block_m=128, split_k=2, stages=3))):
            x = torch.randn(m, k, device="cuda", generator=gen).to(dt)
            bias = torch.randn(n, device="cuda", generator=gen).to(dt) if m in (33, 200) else None
            ref = x.float() @ ref_w.T + (0 if bias is None else bias.float())
            for fold in (False, True):  # scales applied to each group's product / folded into the operands
                out = torch.full((m, n), float("nan"), device="cuda", dtype=dt)
                matmul_w4(x, words, scales, n=n, k=k, gs=gs, bias=bias, counters=cnt, out=out, fold=fold, **cfg)
                assert not out.isnan().any(), (dt, m, cfg, fold)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (dt, m, cfg, fold, err)
    assert int(cnt.abs().sum()) == 0  # the last program of each tile resets its counter


@pytest.mark.skipif(not HOPPER, reason="the Gluon int4 kernel is compiled for sm_90 only (no interpreter for Gluon)")
def test_gluon4_remembered_launches_match_the_full_launch():
    """`plans`: the weight's descriptors made once, launches relaunched with new x / y / bias / M;
    exactly the full launch's output, for a sequence of calls that changes M, the bias, the dtype
    and the output buffer (new keys) and repeats them (the remembered plans)."""
    from lowbit.kernels.gluon_w4 import matmul_w4, pack_words

    gen = torch.Generator(device="cuda").manual_seed(3)
    n, k = 512, 2048
    qt = lowbit.quantize_tensor(torch.randn(n, k, device="cuda", generator=gen) * 0.02, PRESETS["int4-e8m0"])
    words, scales = pack_words(qt.planes["data"], qt.planes["scale"], 32)
    cnt = torch.zeros(1024, dtype=torch.int32, device="cuda")
    plans: dict = {}
    for m, dt, with_bias, split in [(16, torch.bfloat16, False, 2), (16, torch.bfloat16, False, 2), (40, torch.bfloat16, True, 2),
                                    (16, torch.float16, True, 1), (40, torch.bfloat16, True, 2), (16, torch.bfloat16, False, 2)]:
        x = torch.randn(m, k, device="cuda", generator=gen).to(dt)
        bias = torch.randn(n, device="cuda", generator=gen).to(dt) if with_bias else None
        kw = dict(n=n, k=k, gs=32, bias=bias, block_m=16 if m <= 16 else 64, split_k=split, counters=cnt)
        full = matmul_w4(x, words, scales, **kw)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dt)
        fast = matmul_w4(x, words, scales, out=out, plans=plans, **kw)
        assert fast is out and torch.equal(fast, full), (m, dt, with_bias)
    assert ("desc", 2) in plans and len(plans) == 1 + 3  # one descriptor pair, three launch keys
    assert int(cnt.abs().sum()) == 0


@pytest.mark.skipif(not HOPPER, reason="the Gluon int4 kernel is compiled for sm_90 only (no interpreter for Gluon)")
def test_gluon4_runs_inside_quant_linear_and_cuda_graphs():
    """The kernel table routes M = 16 to it; a graph captured before the planes were packed falls back."""
    from lowbit.kernels import gluon_w4
    from lowbit.nn import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 512, bias=True).cuda()
    q = QuantLinear.from_float(lin, "int4-e8m0").cuda()
    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    spec = tlin.spec_of(q.qweight.fmt)
    assert tlin.choose(spec, 16, 1024, 512)["path"] == "gluon4"
    ref = x.float() @ q.qweight.dequantize(torch.float32).T + lin.bias.float()
    gluon_w4._PACKED.clear()
    graph = torch.cuda.CUDAGraph()
    out = torch.empty(16, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        with torch.cuda.graph(graph):  # not packed yet: this capture takes the dot4 path
            out.copy_(q(x))
        graph.replay()
        torch.cuda.synchronize()
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
        assert not gluon_w4._PACKED
        y = q(x)  # eager: packs the planes, runs the kernel
        assert len(gluon_w4._PACKED) == 1
        assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
        graph2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph2):
            out.copy_(q(x))
        out.zero_()
        graph2.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, y)


@pytest.mark.skipif(not HOPPER, reason="the Gluon int4 kernel is compiled for sm_90 only (no interpreter for Gluon)")
def test_quant_linear_remembers_its_gluon4_calls():
    """Eager QuantLinear calls on the gluon4 path are remembered per (M, dtype, x layout, bias): a
    repeat is exactly the first call, in-place changes of the bias show, another M gets its own
    entry, and a bias of another dtype (converted per call) is not remembered."""
    from lowbit.kernels.gluon_w4 import RememberedCall
    from lowbit.nn import QuantLinear

    torch.manual_seed(1)
    lin = torch.nn.Linear(1024, 512, bias=True).cuda().to(torch.bfloat16)
    q = QuantLinear.from_float(lin, "int4-e8m0").cuda()
    spec = tlin.spec_of(q.qweight.fmt)
    with torch.no_grad():
        for m in (8, 16):
            assert tlin.choose(spec, m, 1024, 512)["path"] == "gluon4"
            x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
            first = q(x)
            plans = q.qweight.kernel_cache["triton"][-1]["plans"]
            assert sum(isinstance(p, RememberedCall) for p in plans.values()) == (1 if m == 8 else 2)
            again = q(x)
            assert torch.equal(first, again)
            ref = x.float() @ q.qweight.dequantize(torch.float32).T + q.bias.float()
            assert ((again.float() - ref).norm() / ref.norm()).item() < 1e-2
        q.bias.add_(1.0)  # in place: the remembered call reads the same tensor
        moved = q(x)
        assert torch.allclose(moved.float(), again.float() + 1.0, atol=0.1, rtol=0)
        n_before = len(plans)
        q.bias.data = q.bias.data.float()  # another dtype: converted per call, not remembered
        q(torch.randn(12, 1024, device="cuda", dtype=torch.bfloat16))
        assert len(plans) == n_before
        q.bias.data = q.bias.data.to(torch.bfloat16)
        for m in range(2, 80):  # prefill lengths vary: the remembered calls stay bounded
            q(torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16))
        assert 0 < sum(isinstance(p, RememberedCall) for p in plans.values()) and len(plans) <= 64


@pytest.mark.skipif(not HOPPER, reason="the Gluon int4 kernel is compiled for sm_90 only (no interpreter for Gluon)")
def test_gluon4_large_m_folds_and_fp16_falls_back_where_it_must():
    """M = 65..1024: the folded kernel for bf16 and fp16 activations; a weight whose scaled codes would
    not be normal fp16 numbers (a row of tiny weights) takes the other paths in fp16 and still runs
    the kernel in bf16; all match dequantize-then-matmul."""
    from lowbit.kernels import PLACEMENT, gluon_w4
    from lowbit.nn import QuantLinear

    torch.manual_seed(2)
    for tiny in (False, True):
        lin = torch.nn.Linear(1024, 512, bias=True).cuda()
        if tiny:
            with torch.no_grad():
                lin.weight[7] *= 1e-4  # scales below 2^-14
        q = QuantLinear.from_float(lin, "int4").cuda()
        q._lowbit_name = "big_m"
        spec = tlin.spec_of(q.qweight.fmt)
        assert tlin.choose(spec, 300, 1024, 512)["path"] == "gluon4"
        gluon_w4._PACKED.clear()
        for dt in (torch.float16, torch.bfloat16):
            x = torch.randn(300, 1024, device="cuda", dtype=dt)
            ref = x.float() @ q.qweight.dequantize(torch.float32).T + lin.bias.float()
            PLACEMENT.clear()
            calls = []
            real = gluon_w4.matmul_w4
            gluon_w4.matmul_w4 = lambda *a, **kw: calls.append(kw["fold"]) or real(*a, **kw)
            try:
                with torch.no_grad():
                    y = q(x)
            finally:
                gluon_w4.matmul_w4 = real
            assert y.dtype == dt and ((y.float() - ref).norm() / ref.norm()).item() < 1e-2, (tiny, dt)
            assert PLACEMENT["big_m"].get("triton"), PLACEMENT
            assert calls == ([] if tiny and dt == torch.float16 else [True]), (tiny, dt, calls)
            assert len(gluon_w4._PACKED) == 1  # packed by the first call, kept


@pytest.mark.skipif(not HOPPER, reason="the Gluon int4 kernel is compiled for sm_90 only (no interpreter for Gluon)")
def test_gluon4_under_torch_compile():
    """torch.compile keeps the custom op; its calls reuse the words packed by the eager call."""
    from lowbit.kernels import gluon_w4
    from lowbit.nn import QuantLinear

    torch.manual_seed(1)
    q = QuantLinear.from_float(torch.nn.Linear(2048, 1024, bias=False), "int4").cuda()
    x = torch.randn(24, 2048, device="cuda", dtype=torch.bfloat16)
    gluon_w4._PACKED.clear()
    with torch.no_grad():
        eager = q(x)
        assert len(gluon_w4._PACKED) == 1
        compiled = torch.compile(q, fullgraph=True)
        for _ in range(3):
            assert torch.equal(compiled(x), eager)
    assert len(gluon_w4._PACKED) == 1


def test_measured_gluon4_entries_serve_the_calls_it_can_run(monkeypatch):
    """'gluon4|M|K|N' entries (the fastest of any path, timed where the kernel runs) serve those calls;
    other formats keep the other keys; without an entry the kernel's own config."""
    monkeypatch.setattr(tlin, "_sm90", lambda: True)
    spec = tlin.spec_of(PRESETS["int4"])
    g4_entry = {"path": "gluon4", "num_wg": 1, "block_m": 16, "split_k": 4, "stages": 6, "us": 9.0}
    dot4_entry = {"path": "dot4", "BLOCK_N": 64, "BLOCK_M": 16, "KB_T": 128, "num_warps": 4, "STAGES": 4,
                  "SPLIT_K": 4, "XPERM": False, "us": 10.0}
    table = {"gluon4|16|4096|4096": g4_entry, "*|16|4096|4096": dot4_entry, "gluon4|64|4096|4096": dot4_entry}
    monkeypatch.setattr(tlin, "_load_table", lambda: table)
    tlin._CHOSEN.clear()
    assert tlin.choose(spec, 16, 4096, 4096) == {k: v for k, v in g4_entry.items() if k != "us"}
    assert tlin.choose(spec, 64, 4096, 4096)["path"] == "dot4"  # measured faster there: taken
    assert tlin.choose(spec, 32, 4096, 4096) == tlin.gluon4_config(spec, 32, 4096, 4096)  # no entry
    mx = tlin.spec_of(PRESETS["mxfp4"])
    assert tlin.choose(mx, 16, 4096, 4096)["path"] == "dot4"  # the '*' entry
    assert any(c["path"] == "gluon4" for c in tlin.candidates(spec, 16, 4096, 4096))
    assert not any(c["path"] == "gluon4" for c in tlin.candidates(mx, 16, 4096, 4096))
    monkeypatch.setattr(tlin, "_sm90", lambda: False)
    tlin._CHOSEN.clear()
    assert tlin.choose(spec, 16, 4096, 4096)["path"] == "dot4"  # not on this device: the '*' entry
    tlin._CHOSEN.clear()
