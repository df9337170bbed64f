"""Eager host-time savings of QuantLinear: the module keeps one QTensor while its planes stay the
same tensors (so the kernels' per-weight caches survive), and on CUDA the GEMV's launches are
remembered as `LaunchPlan`s (kernels/launch.py) whose results must equal a normal launch's exactly.
The CUDA test runs on the GPU machine; on CPU the caching rules are checked."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

import lowbit
from lowbit.nn import QuantLinear

CUDA = torch.cuda.is_available()
if not CUDA:  # before the first import of Triton: its kernels run in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _layer(fmt: str, n: int, k: int, gen, bias: bool = False) -> QuantLinear:
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    return QuantLinear.from_float(lin, fmt)


def test_module_keeps_its_qtensor_while_the_planes_stay(gen):
    q = _layer("int4", 48, 64, gen)
    qt = q.qweight
    assert q.qweight is qt  # same planes: same object, its kernel_cache survives
    qt.kernel_cache["probe"] = 1
    q.weight_scale = q.weight_scale.clone()  # a replaced plane: a new QTensor, an empty cache
    assert q.qweight is not qt and "probe" not in q.qweight.kernel_cache
    assert torch.equal(q.qweight.dequantize(), qt.dequantize())
    qt2 = q.qweight
    q.to("cpu")  # .to() / .cuda() / .half() go through _apply, which drops the cache
    assert q.qweight is not qt2
    dup = copy.deepcopy(q)  # copies carry planes, not caches
    assert dup.qweight.kernel_cache == {} and torch.equal(dup.qweight.dequantize(), q.qweight.dequantize())
    back = pickle.loads(pickle.dumps(q.qweight))
    assert back.kernel_cache == {} and torch.equal(back.dequantize(), q.qweight.dequantize())


def test_launch_plan_is_none_outside_compiled_kernels():
    pytest.importorskip("triton")
    from lowbit.kernels.launch import LaunchPlan

    assert LaunchPlan.of(None, None, (1,), (), {}, {}) is None  # the interpreter's launches return None


class _FakeCudaLauncher:
    """Stands for Triton 3.6's `CudaLauncher` (what `CompiledKernel.run` is)."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self):
        self.calls = []

    def launch(self, *a):
        self.calls.append(("direct", a))


class _FakeCompiled:
    function, packed_metadata = 4242, (4, 1, 0)

    def __init__(self):
        self.run = _FakeCudaLauncher()

    def _init_handles(self):
        pass

    def __getitem__(self, grid):
        return lambda *a: self.run.calls.append(("full", grid, a))


def test_direct_launcher_calls_the_c_entry_point_unless_a_hook_is_set(monkeypatch):
    """The argument order of Triton 3.6's C launcher, and the full path while a profiler's hook is set
    (on the GPU, `test_remembered_gemv_launches_equal_normal_launches` and the attention plan tests
    check that results through it equal normal launches exactly)."""
    pytest.importorskip("triton")
    from triton import knobs

    from lowbit.kernels.launch import direct_launcher

    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1000 + device, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    compiled = _FakeCompiled()
    go = direct_launcher(compiled)
    go((5, 2, 1), ["x", 7])
    assert compiled.run.calls[-1] == ("direct", (5, 2, 1, 1003, 4242, False, True, None, None, (4, 1, 0),
                                                 None, None, None, "x", 7))
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        go((5, 2, 1), ["x", 7])
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert compiled.run.calls[-1] == ("full", (5, 2, 1), ("x", 7))
    compiled.run.global_scratch_size = 64  # kernels that need scratch memory keep the full path
    assert direct_launcher(compiled) is None


def _wrapped_entry(calls):
    """A launcher shaped as Triton 3.6's `wrap_handle_tensordesc` makes it (the closure names are what
    `direct_launcher` reads): descriptors at argument positions 0 and 2, the C entry point recording."""
    def launcher(*a):
        calls.append(a)

    tensordesc_indices, tensordesc_meta = {0, 2}, ["meta-w", "meta-x"]

    def inner(*args):  # pragma: no cover - the direct path calls `launcher` itself
        return launcher, tensordesc_indices, tensordesc_meta

    return inner


def test_direct_launcher_encodes_pinned_descriptors_once(monkeypatch):
    """Host TMA descriptors (Gluon kernels): the pinned one (not a slot) becomes a CUtensorMap on the
    first launch only, again when another object takes its place; the slot's (x's) on every launch;
    the expanded arguments reach the C entry point in order."""
    pytest.importorskip("triton")
    import triton.backends.nvidia.driver as drv

    from lowbit.kernels.launch import direct_launcher

    encoded = []

    def fake_encode(desc, meta):
        encoded.append((desc, meta))
        return [f"map({desc})", 7, 1]

    monkeypatch.setattr(drv, "make_tensordesc_arg", fake_encode)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1000 + device, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    compiled = _FakeCompiled()
    entry_calls = []
    compiled.run.launch = _wrapped_entry(entry_calls)
    go = direct_launcher(compiled, frozenset({2}))
    w = "W"
    go((5, 1, 1), [w, 11, "X1"])
    go((5, 1, 1), [w, 11, "X2"])
    assert encoded == [("W", "meta-w"), ("X1", "meta-x"), ("X2", "meta-x")]
    assert entry_calls[-1] == (5, 1, 1, 1003, 4242, False, True, None, None, (4, 1, 0), None, None, None,
                               "map(W)", 7, 1, 11, "map(X2)", 7, 1)
    go((5, 1, 1), ["W2", 11, "X3"])  # a new object at the pinned position is encoded anew
    assert encoded[-2:] == [("W2", "meta-w"), ("X3", "meta-x")]


@pytest.mark.skipif(not CUDA, reason="launch plans exist only for compiled kernels (a CUDA GPU)")
@pytest.mark.parametrize("fmt", ["int4-e8m0", "int4", "int8", "int4-asym", "mxfp4", "lut4", "int2-e8m0"])
def test_remembered_gemv_launches_equal_normal_launches(fmt, gen):
    import lowbit.kernels.triton_linear as tlin

    n, k = 200, 512
    q = _layer(fmt, n, k, gen, bias=True).to("cuda")
    spec = tlin.spec_of(q.qweight.fmt)
    planes = tlin.kernel_planes(q.qweight)
    xs = torch.randn(4, 3, k + 8, generator=gen).to("cuda", torch.bfloat16)
    for m in (1, 2):
        for off in (0, 1, 8):  # x's start: 16-byte aligned, 2 bytes past, 16 bytes past
            for i in range(3):  # the first call launches normally, the next ones through the plan
                x = xs[i, :m, off: off + k]
                y = q(x)
                cfg = dict(tlin.choose(spec, m, k, n))
                ref = tlin.run(x, planes, spec, n, k, q.bias, cfg=cfg)  # an explicit config: no plan
                assert torch.equal(y, ref), (fmt, m, off, i)
    plans = q.qweight.kernel_cache["triton"][3]["plans"]
    paths = {tlin.choose(spec, m, k, n)["path"] for m in (1, 2)}
    if "gemv2" in paths or "gemv" in paths:
        assert plans, f"{fmt}: no launch remembered"
    assert lowbit.kernels.PLACEMENT[q.layer_name]["triton"] > 0


def test_dispatch_remembers_its_choice_but_obeys_force_and_new_registrations(gen):
    from lowbit.kernels import PLACEMENT, registry
    from lowbit.kernels.registry import force_backend

    q = _layer("int8", 32, 64, gen)
    q._lowbit_name = "probe.dispatch"
    x = torch.randn(2, 64, generator=gen)
    y0 = q(x)
    first = set(PLACEMENT["probe.dispatch"])
    assert len(first) == 1 and ("select", "linear", "cpu", x.dtype, registry._generation) in q.qweight.kernel_cache
    with force_backend("linear", "reference"):
        q(x)
    assert PLACEMENT["probe.dispatch"]["reference"] >= 1
    calls = []

    def fake(x, qweight, bias=None):
        calls.append(1)
        return torch.zeros(x.shape[0], 32)

    key = (q.qweight.fmt.family, "linear", "cpu", "triton")
    try:
        registry.register(*key)(fake)  # a new, preferred backend: the remembered choice is stale
        assert torch.equal(q(x), torch.zeros(2, 32)) and calls == [1]
    finally:
        registry.KERNELS.pop(key)
        registry._generation += 1
    assert torch.equal(q(x), y0)


@pytest.mark.skipif(CUDA, reason="CPU-side keying with a stand-in plan; on the GPU real plans are checked by "
                                  "test_remembered_gemv_launches_equal_normal_launches")
def test_run_relaunches_a_remembered_plan_only_for_its_key(gen):
    """`triton_linear.run`'s side of the plans, without a GPU: a plan stored under the key of one
    call (M, dtype, x's row stride and 16-byte alignment, bias, kernel table) is relaunched for
    calls with that key, with fresh y (and split-K workspace); not for another alignment, another
    M, an explicit config or a given output."""
    pytest.importorskip("triton")
    import lowbit.kernels.triton_linear as tlin

    q = _layer("int4", 24, 64, gen)
    spec = tlin.spec_of(q.qweight.fmt)
    planes = {**tlin.kernel_planes(q.qweight), "plans": {}}
    launched = []

    class FakePlan:
        split = 2

        def launch(self, **swap):
            launched.append(swap)
            swap["y"].fill_(7.0)

    xs = torch.randn(3, 80, generator=gen)
    x = xs[:1, :64]
    key = (1, x.dtype, x.stride(0), x.data_ptr() % 16, None, id(tlin._load_table()), False)  # last: glu
    planes["plans"][key] = FakePlan()
    y = tlin.run(x, planes, spec, 24, 64, None)
    assert len(launched) == 1 and launched[0]["x"] is x and launched[0]["y"] is y and torch.all(y == 7)
    assert launched[0]["ws"].shape == (2, 1, 24) and launched[0]["ws"].dtype == torch.float32
    others = [(xs[:1, 1:65], {}), (xs[:2, :64], {}), (x, {"cfg": dict(tlin.choose(spec, 1, 64, 24))}),
              (x, {"out": torch.empty(1, 24)})]
    for other, kw in others:  # these take the normal path (the interpreter's kernels here)
        out = tlin.run(other, planes, spec, 24, 64, None, **kw)
        ref = torch.nn.functional.linear(other.float(), q.qweight.dequantize())
        assert len(launched) == 1 and ((out - ref).norm() / ref.norm()) < 1e-2
    # the gated MLP's form of the same call (rows as (gate, up) pairs) has a key of its own
    from lowbit.kernels.reference import silu_mul_pairs

    out = tlin.run(x, planes, spec, 24, 64, None, glu=True)
    ref = silu_mul_pairs(torch.nn.functional.linear(x.float(), q.qweight.dequantize()))
    assert len(launched) == 1 and out.shape == (1, 12) and ((out - ref).norm() / ref.norm()) < 1e-2


def test_spec_key_states_how_triton_specializes_each_argument(gen):
    """Against a plain restatement of the rule, on a random mix of tensors (aligned or not), ints around
    1 / multiples of 16 / the int32 range, floats, bools and None."""
    from lowbit.kernels.launch import spec_key

    base = torch.randn(64, generator=gen)
    pool = [base, base[1:], base[4:], base.to(torch.bfloat16)[3:], torch.zeros(3, dtype=torch.int32),
            1, 0, 16, 17, 48, -16, 2 ** 31 - 16, 2 ** 31, -2 ** 31, -2 ** 31 - 1, 0.5, True, None]
    for _ in range(50):
        idx = torch.randint(len(pool), (12,), generator=gen).tolist()
        args = tuple(pool[i] for i in idx)
        want = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else
                     (a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31) if type(a) is int else type(a) for a in args)
        assert spec_key(args) == want
