"""Re-launching a compiled Triton kernel without Triton's per-call argument binding.

A Triton launch through `kernel[grid](...)` binds and specializes every argument in Python on every
call (about 25-30 us of host time for the GEMV's 40 arguments on an H200 host); a decoder's eager
step makes hundreds of such calls. A `LaunchPlan` keeps the `CompiledKernel` that a first, normal
launch returned together with its full argument list, and later launches only swap the arguments
that change between calls (the activations, the output) through the compiled kernel's own launcher.

Correctness rests on the caller's key: a plan may only be reused for calls whose every argument
would specialize the same way (Triton specializes integers equal to 1 or divisible by 16 and
pointers aligned to 16 bytes), so the key must hold every integer argument that can change and the
alignment of every swapped pointer (`triton_linear.run_fast_gemv`: M, dtype, x's row stride and
alignment, the bias; the output and workspace come from the caching allocator, 512-byte aligned).

`launch_remembered` is the same for call sites that build their full argument list anyway (the
attention decode and the KV-cache append): the caller names the positions that change between calls
and a key that holds everything else Triton would specialize on.

Example:
    >>> # compiled = kern[grid](*args, **consts)          # the normal launch, once
    >>> # plan = LaunchPlan.of(kern, compiled, grid, args, consts, {"x": 0, "y": 6})
    >>> # plan.launch(x=x2, y=y)                           # later calls with the same key
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


class LaunchPlan:
    """A compiled kernel, its grid and full argument list (signature order) with swappable slots."""

    __slots__ = ("compiled", "grid", "args", "slots", "consts", "_direct")

    def __init__(self, compiled, grid: tuple, args: list, slots: dict[str, int], consts: dict[str, Any]):
        self.compiled, self.grid, self.args, self.slots, self.consts = compiled, grid, args, slots, consts
        self._direct = direct_launcher(compiled, frozenset(slots.values())) if DIRECT_LAUNCH else None

    @property
    def split(self) -> int:
        return int(self.consts.get("SPLIT_K", 1))

    @staticmethod
    def of(jit_fn, compiled, grid: tuple, args: tuple, consts: dict[str, Any], slots: dict[str, int]) -> "LaunchPlan | None":
        """The plan of a launch `jit_fn[grid](*args, **consts)` that returned `compiled`; None where
        that is not a compiled kernel (Triton's interpreter) or the signature cannot be filled."""
        try:
            from triton.compiler import CompiledKernel
        except ImportError:  # pragma: no cover - Triton without the compiler package
            return None
        if not isinstance(compiled, CompiledKernel):
            return None
        names = list(jit_fn.arg_names)
        params = jit_fn.signature.parameters
        full = list(args)
        for name in names[len(args):]:
            if name in consts:
                full.append(consts[name])
            elif params[name].default is not inspect.Parameter.empty:
                full.append(params[name].default)
            else:
                return None
        if len(full) != len(names):
            return None
        for i in slots.values():
            full[i] = None  # filled on every launch; no tensor of the first call is kept alive
        return LaunchPlan(compiled, tuple(grid) + (1,) * (3 - len(grid)), full, dict(slots), dict(consts))

    def launch(self, **swap) -> None:
        """Launch with the slots named in `swap` set (every slot must be given)."""
        a = list(self.args)
        for name, i in self.slots.items():
            a[i] = swap[name]
        self._go(a)

    def relaunch(self, args: tuple) -> None:
        """Launch with every slot taken from `args`, a full positional argument list like the first
        launch's (only the slots are read)."""
        a = list(self.args)
        for i in self.slots.values():
            a[i] = args[i]
        self._go(a)

    def _go(self, a: list) -> None:
        if self._direct is not None:
            self._direct(self.grid, a)
        else:
            self.compiled[self.grid](*a)


# plans made while this is True launch through `direct_launcher`; False keeps Triton's own
# `CompiledKernel.__getitem__` path (a switch for a Triton whose launcher changed, or for A/B timing)
DIRECT_LAUNCH = True


def _tensordesc_parts(raw):
    """(the C entry point, {argument position: descriptor metadata}) of a Triton 3.6 launcher that
    `wrap_handle_tensordesc` wrapped (kernels with host TMA descriptors: it turns each descriptor into
    a CUtensorMap with `fill_tma_descriptor`, on every launch), or None for any other launcher."""
    code = getattr(raw, "__code__", None)
    if code is None or code.co_name != "inner" or not raw.__closure__:
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in raw.__closure__)))
    if not {"launcher", "tensordesc_indices", "tensordesc_meta"} <= cells.keys():
        return None
    positions = sorted(cells["tensordesc_indices"])
    return cells["launcher"], dict(zip(positions, cells["tensordesc_meta"]))


def direct_launcher(compiled, slots: frozenset = frozenset()):
    """A launch function `(grid, args) -> None` for a Triton `CompiledKernel` that calls its C
    launcher directly; None where this Triton's `CompiledKernel` is not the one this was written
    against (3.6: `CompiledKernel.run` is a `CudaLauncher` whose `launch(gx, gy, gz, stream,
    function, cooperative, pdl, global_scratch, profile_scratch, packed_metadata, launch_metadata,
    enter_hook, exit_hook, *args)` is the C entry point).

    `compiled[grid](*args)` makes two closures, looks up the current device and stream through
    Triton's driver proxy, builds a launch-metadata dict and has the launcher call two (empty) hook
    chains on every launch. Here the handles are looked up once and, while no launch hook is set
    (a profiler may add some: then the full path runs) and the kernel needs no scratch memory,
    metadata, hooks and scratch are None. Host TMA descriptors (Gluon kernels) are encoded into
    CUtensorMaps once per descriptor object at the positions not in `slots` (the weight's, pinned
    by the plan; the launcher copies the 128-byte map into the kernel's parameters at each launch,
    so one map serves every launch) and on every launch in `slots` (x's, new each call).

    Example:
        >>> # run = direct_launcher(compiled); run((blocks, 1, 1), full_args)
    """
    try:
        from triton import knobs

        compiled._init_handles()
        launcher, function, packed = compiled.run, compiled.function, compiled.packed_metadata
        if launcher.global_scratch_size or launcher.profile_scratch_size:
            return None
        raw, coop, pdl = launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl
        runtime = knobs.runtime
        runtime.launch_enter_hook.calls, runtime.launch_exit_hook.calls  # noqa: B018 - the 3.6 hook chains
        current_stream = torch._C._cuda_getCurrentRawStream
        current_device = torch.cuda.current_device
        parts = _tensordesc_parts(raw)
        if parts is not None:
            from triton.backends.nvidia.driver import make_tensordesc_arg
    except Exception:  # another Triton (or no CUDA build): the plan keeps the normal launch
        return None

    if parts is None:
        def launch(grid: tuple, args: list) -> None:
            if runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls:
                compiled[grid](*args)
                return
            raw(grid[0], grid[1], grid[2], current_stream(current_device()), function, coop, pdl, None, None, packed,
                None, None, None, *args)

        return launch

    entry, metas = parts
    encoded: dict[int, tuple] = {}  # position -> (descriptor, its expanded arguments)

    def launch_desc(grid: tuple, args: list) -> None:
        if runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls:
            compiled[grid](*args)
            return
        final = []
        for i, a in enumerate(args):
            meta = metas.get(i, _PLAIN)
            if meta is _PLAIN:
                final.append(a)
            elif i in slots:
                final.extend(make_tensordesc_arg(a, meta))
            else:
                hit = encoded.get(i)
                if hit is None or hit[0] is not a:
                    hit = encoded[i] = (a, make_tensordesc_arg(a, meta))
                final.extend(hit[1])
        entry(grid[0], grid[1], grid[2], current_stream(current_device()), function, coop, pdl, None, None, packed,
              None, None, None, *final)

    return launch_desc


_PLAIN = object()  # `direct_launcher`: an argument that is not a TMA descriptor


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's launch arithmetic (`triton.cdiv` is a constexpr function: ~3-7 us a
    call from Python, several per launch).

    Example:
        >>> cdiv(200, 64), cdiv(128, 64)
        (4, 2)
    """
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as `triton.next_power_of_2` without its call cost.

    Example:
        >>> next_pow2(1), next_pow2(9), next_pow2(16)
        (1, 16, 16)
    """
    return 1 << max(n - 1, 0).bit_length()


def int_class(v: int) -> tuple[bool, bool]:
    """How Triton specializes an integer argument (equal to 1, divisible by 16): a key part for
    integer slots. (Every int this module's callers swap is far inside int32.)"""
    return v == 1, v % 16 == 0


def spec_key(args: tuple) -> tuple:
    """How Triton specializes each argument: tensors by dtype and 16-byte alignment, integers by
    `int_class` and 32-bit range, anything else by type. A key for call sites whose every argument
    is a slot (nothing pinned by identity); ~0.2 us an argument (a plain loop: the generator form
    took twice as long, and a float-cache attention launch keys 24 arguments).

    Example:
        >>> spec_key((torch.zeros(4), 32, 7, 0.5))[1:]
        ((False, True, True), (False, False, True), <class 'float'>)
    """
    out = []
    for a in args:
        t = type(a)
        if t is int:
            out.append(int_class(a) + (-2 ** 31 <= a < 2 ** 31,))
        elif t is torch.Tensor or isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            out.append(t)
    return tuple(out)


def launch_remembered(plans: dict | None, key, jit_fn, grid: tuple, args: tuple, consts: dict,
                      slots: tuple[int, ...]) -> None:
    """`jit_fn[grid](*args, **consts)`, relaunched through the plan stored under `key` in `plans`
    when there is one (and stored there after a normal launch otherwise; `plans` or `key` None:
    always the normal launch, e.g. while torch.compile traces). `slots` are the positions of `args` that may differ between calls with one key;
    the key must pin every other argument (tensors by identity: the plan keeps them alive) and how
    Triton specializes the slots (dtype and 16-byte alignment of tensors, `int_class` of ints), the
    grid and the constexprs.

    Example:
        >>> # launch_remembered(layer_plans, (grid, id(planes), x.data_ptr() % 16 == 0, int_class(n)),
        >>> #                   _kernel, grid, (x, planes, n), {"BLOCK": 64}, slots=(0, 2))
    """
    remember = plans is not None and key is not None
    plan = plans.get(key) if remember else None
    if plan is not None:
        plan.relaunch(args)
        return
    compiled = jit_fn[grid](*args, **consts)
    if remember:
        plan = LaunchPlan.of(jit_fn, compiled, grid, args, consts, {str(i): i for i in slots})
        if plan is not None:
            plans[key] = plan
