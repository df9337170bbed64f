"""Remembered launches (`kernels.launch.launch_remembered`) of the attention decode and the KV-cache
append: a call that reuses a plan must give exactly what a normal launch gives, whatever changed
between the calls (q, its layout, the length, the valid ranges, the scale, the planes).

On the GPU the real plans run (compiled kernels). On CPU the kernels run in Triton's interpreter,
where launches return no compiled kernel; there a stand-in plan relaunches the Triton function with
the stored arguments and the slots swapped in, so a position that should be a slot, or a key that
misses what a slot specializes on, shows up as a wrong result here too.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before the kernels' modules are first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32

from lowbit.attention.reference import block_tokens, quantize_kv  # noqa: E402


class _InterpreterPlan:
    """What `LaunchPlan` does, for the interpreter: the first launch's arguments with the slots
    emptied; `relaunch` fills them from the new call and launches the Triton function again."""

    relaunches = 0

    def __init__(self, jit_fn, grid, args, consts, slots):
        self.jit_fn, self.grid, self.consts, self.slots = jit_fn, grid, dict(consts), list(slots.values())
        self.args = list(args)
        for i in self.slots:
            self.args[i] = None

    def relaunch(self, args):
        a = list(self.args)
        for i in self.slots:
            a[i] = args[i]
        _InterpreterPlan.relaunches += 1
        self.jit_fn[self.grid](*a, **self.consts)


@pytest.fixture
def counted_plans(monkeypatch):
    """Plans that count their relaunches: the interpreter stand-in on CPU, the real ones on CUDA."""
    from lowbit.kernels import launch

    _InterpreterPlan.relaunches = 0
    if CUDA:
        real = launch.LaunchPlan.relaunch

        def counting(self, args):
            _InterpreterPlan.relaunches += 1
            real(self, args)

        monkeypatch.setattr(launch.LaunchPlan, "relaunch", counting)
    else:
        monkeypatch.setattr(launch.LaunchPlan, "of",
                            staticmethod(lambda jit_fn, compiled, grid, args, consts, slots:
                                         _InterpreterPlan(jit_fn, grid, args, consts, slots)))
    return _InterpreterPlan


def _planes(gen, B, Hkv, cap, D, bits, group):
    k = torch.randn(B, Hkv, cap, D, generator=gen)
    v = torch.randn(B, Hkv, cap, D, generator=gen)
    (kd, ks), (vd, vs) = quantize_kv(k, bits, group), quantize_kv(v, bits, group)
    return [kd.to(DEV), ks.to(DEV), block_tokens(vd).to(DEV), vs.to(DEV)]


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, None)])
def test_remembered_decode_launches_equal_normal_launches(gen, counted_plans, bits, group):
    """Decode steps through one plans dict: lengths in every specialization class (1, multiples of
    16, others) and across split counts, q as a transposed view and contiguous, per-call valid
    ranges, another softmax scale, and a second set of planes sharing the dict."""
    from lowbit.attention.triton_decode import decode_attention_triton

    B, H, Hkv, cap, D = 2, 4, 2, 256, 64
    sets = [_planes(gen, B, Hkv, cap, D, bits, group) for _ in range(2)]
    plans: dict = {}
    steps = [(1, 0, None, None), (17, 0, None, None), (18, 0, None, None), (19, 1, None, None), (32, 0, None, None),
             (33, 0, None, None), (34, 0, None, 0.1), (130, 0, (0, 5), None), (131, 0, (3, 0), None),
             (132, 0, (1, 2), 0.2), (200, 1, None, None), (201, 1, None, None), (202, 0, None, None)]
    for step, (seq_len, which, starts, scale) in enumerate(steps):
        q = torch.randn(B, 1, H, D, generator=gen).to(DEV, DTYPE)
        q = q.transpose(1, 2) if step % 3 else q.transpose(1, 2).contiguous()  # HF's view, or a copy
        kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32, device=DEV)
        kw = dict(bits=bits, scale=scale, kv_start=kv_start)
        got = decode_attention_triton(q, *sets[which], seq_len, plans=plans, **kw)
        want = decode_attention_triton(q, *sets[which], seq_len, **kw)
        assert torch.equal(got, want), (bits, group, step, seq_len)
    assert counted_plans.relaunches >= 5, counted_plans.relaunches  # plans were reused, not just stored
    assert len(plans) < len(steps)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_remembered_append_launches_equal_normal_launches(gen, counted_plans, bits, group):
    """Token-by-token appends (and one of several tokens) through one plans dict write the planes a
    normal launch writes, bit for bit; keys and values as HF's transposed views and contiguous."""
    from lowbit.attention.triton_kv_write import quantize_append_triton

    B, Hkv, cap, D = 2, 3, 256, 64
    planes = _planes(gen, B, Hkv, cap, D, bits, group)
    same = [p.clone() for p in planes]
    plans: dict = {}
    for i, (start, n) in enumerate(((0, 1), (1, 1), (2, 1), (16, 1), (17, 1), (18, 3), (127, 1), (128, 1), (129, 1))):
        k = torch.randn(B, n, Hkv, D, generator=gen).to(DEV, DTYPE).transpose(1, 2)
        v = torch.randn(B, Hkv, n, D, generator=gen).to(DEV, DTYPE) * (1 + i)
        if i % 2:
            k = k.contiguous()
        quantize_append_triton(planes, start, k, v, bits=bits, group=group, plans=plans)
        quantize_append_triton(same, start, k, v, bits=bits, group=group)
        for a, b in zip(planes, same):
            assert torch.equal(a, b), (bits, group, start, n)
    assert counted_plans.relaunches >= 4, counted_plans.relaunches


def test_cache_layer_gives_new_plans_when_its_planes_are_replaced():
    """A layer's plans belong to its current planes list: growth, reordering or a reset start a new
    dict (the old plans, and the planes they keep alive, are dropped)."""
    pytest.importorskip("transformers")
    from lowbit.attention.kv_cache import LowbitKVLayer

    layer = LowbitKVLayer(8)
    layer.planes = [torch.zeros(1, 1, 4, 8)]
    plans = layer.launch_plans()
    plans["k"] = 1
    assert layer.launch_plans() is plans
    layer.planes = [p.clone() for p in layer.planes]
    assert layer.launch_plans() == {} and layer.launch_plans() is not plans


def test_remembered_prefill_launches_equal_normal_launches(gen, counted_plans, monkeypatch):
    """`flash_attention_triton` remembers its launches in a module-level dict with every argument a
    slot (key: how Triton specializes each): decode steps over a float cache that grows (fresh
    tensors, and views into one buffer), prompts of a few lengths, causal or not, with ranges."""
    from lowbit.attention import triton_prefill as tp

    B, H, Hkv, D = 2, 4, 2, 64
    remembered: dict = {}
    buf_k = torch.randn(B, Hkv, 64, D, generator=gen).to(DEV, DTYPE)
    buf_v = torch.randn(B, Hkv, 64, D, generator=gen).to(DEV, DTYPE)
    steps = [(1, 17, False, None), (1, 18, False, None), (1, 19, True, None), (1, 32, False, None),
             (1, 33, False, (0, 3)), (1, 34, False, (2, 0)), (17, 17, True, None), (17, 20, True, None),
             (1, 35, False, None), (1, 36, False, None)]
    for i, (sq, sk, view, starts) in enumerate(steps):
        q = torch.randn(B, sq, H, D, generator=gen).to(DEV, DTYPE).transpose(1, 2)
        if view:  # a static-cache-like view: strides of the whole buffer
            k, v = buf_k[:, :, :sk], buf_v[:, :, :sk]
        else:
            k = torch.randn(B, Hkv, sk, D, generator=gen).to(DEV, DTYPE)
            v = torch.randn(B, Hkv, sk, D, generator=gen).to(DEV, DTYPE)
        kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32, device=DEV)
        kw = dict(causal=sq > 1, scale=0.1 if i % 2 else None, kv_start=kv_start)
        monkeypatch.setattr(tp, "_PLANS", remembered)
        got = tp.flash_attention_triton(q, k, v, **kw)
        monkeypatch.setattr(tp, "_PLANS", {})  # a normal launch
        want = tp.flash_attention_triton(q, k, v, **kw)
        assert torch.equal(got, want), (i, sq, sk, view)
    assert counted_plans.relaunches >= 4, counted_plans.relaunches
