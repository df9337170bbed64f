"""Fused `QuantLinear` on CUDA through Triton: decode the stored planes in registers, fp32 accumulation.

Registered in the kernel table as backend "triton", device "cuda", for the formats `spec_of`
accepts: `int8` (per channel), `int4` / `int4-asym` / `int2` (any block whose packed run is a
power of two of bytes: 32, 64, 128, ...; fp16 / bf16 / fp32 scales), `int4-e8m0`, `int2-e8m0`,
`mxfp4`, `mxfp8-e4m3`, `mxfp8-e5m2`, `mxint8`, and palettes `lut2` / `lut4` / `lut8` (fp16 or
int8 tables, per tensor or per channel group, optional per-channel scale). Other formats keep the
reference path. The kernels read the stored planes as they are (nothing added to the state dict or
the package format), except the Hopper int4 kernel (`gluon_w4.py`, path "gluon4": symmetric int4 at
M = 2..1024 on sm_90), which keeps a repacked copy of the codes made on its first call.

Path per call (`choose`): M <= 4 a GEMV (one program per output-row block, CUDA cores); up to a
few hundred rows a tensor-core tile kernel (`tl.dot`, split-K with an in-kernel reduction for
small M); large M dequantizes to the activation dtype once and calls cuBLAS. Where the Hopper
int4 kernel runs (`gluon4_config`) it takes M = 2..1024 instead, except where a measured
`gluon4|M|K|N` entry names another path (the GEMV keeps M = 1 and small weights). The choice and the
tile sizes come from a table measured on the GPU (`triton_table.json`, written by
`benchmarks/matmul.py --tune`), keyed by (bits or "*" for any format, M bucket, K, N; sizes in
bytes so one entry serves every format), with a heuristic for shapes it lacks. The op is a `torch.library` custom op (`lowbit::qlinear`) with a fake implementation, so
it traces under `torch.compile` and can be captured in CUDA graphs.

Example:
    >>> import torch, lowbit                                        # doctest: +SKIP
    >>> from lowbit.nn import QuantLinear                          # doctest: +SKIP
    >>> q = QuantLinear.from_float(torch.nn.Linear(4096, 4096), "int4-e8m0").cuda()  # doctest: +SKIP
    >>> y = q(torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16))  # the GEMV kernel  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats import Format, QTensor
from .gemv_ptx import word_asm
from .launch import LaunchPlan, cdiv, next_pow2
from .nibble_ptx import asm_bytes, asm_fp4, asm_fp8, asm_nibbles
from .reference import silu_mul_pairs
from .registry import register
from .triton_modes import interpreting, kernel_module

# Triton is optional and imported on first use: without it lowbit imports and the kernel table
# simply has no "triton" entries. (Importing it lazily also lets tests set TRITON_INTERPRET=1 before
# Triton reads it: its own library functions are compiled or interpreted by that setting.)
try:
    HAVE_TRITON = importlib.util.find_spec("triton") is not None
except (ImportError, ValueError):  # a broken or blocked installation counts as absent
    HAVE_TRITON = False


def _kern(module: str = "triton_kernels"):
    """A kernels module (`triton_kernels`, `triton_gemv`, `triton_dot4`) for the current mode (GPU
    or interpreter): `triton_modes.kernel_module`."""
    return kernel_module(module)


_TABLE_PATH = Path(__file__).with_name("triton_table.json")
_M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


_interpreting = interpreting  # TRITON_INTERPRET=1: kernels run in Triton's interpreter (triton_modes)


# ---------------------------------------------------------------------------------------------
# what the kernels need to know about a format
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """Kernel constants for one format (see triton_kernels.py for the meaning of CODE / SMODE)."""

    bits: int
    code: int
    smode: int
    has_zero: bool
    cmul: float
    bb: int  # bytes per scale block (per-row formats: bytes per chunk)

    def key(self) -> str:
        return f"{self.bits},{self.code},{self.smode},{int(self.has_zero)},{self.cmul!r},{self.bb}"

    @staticmethod
    def from_key(s: str) -> "Spec":
        b, c, sm, z, cm, bb = s.split(",")
        return Spec(int(b), int(c), int(sm), bool(int(z)), float(cm), int(bb))


_MX_CODE = {"fp4_e2m1": (3, 2.0**14), "fp8_e4m3": (4, 2.0**8), "fp8_e5m2": (5, 1.0), "int8": (1, 2.0**-6)}


def spec_of(fmt: Format) -> Spec | None:
    """Kernel constants for `fmt`, or None when no Triton kernel covers it."""
    bits = fmt.bits
    if bits not in (2, 4, 8):
        return None
    if fmt.family == "lut":
        return Spec(bits, 6, 0, False, 1.0, 32)
    if fmt.family == "int":
        if fmt.block_size is None:
            if fmt.zero != "none" or fmt.scale_dtype == "e8m0":
                return None
            return Spec(bits, 1 if bits == 8 else 0, 3, False, 1.0, 32)
        code = 2 if fmt.zero == "float" else (1 if bits == 8 else 0)
        smode = 2 if fmt.scale_dtype == "e8m0" else 1
        cmul = 1.0
    elif fmt.family == "mx" and fmt.element in _MX_CODE:
        code, cmul = _MX_CODE[fmt.element]
        smode = 2
    else:
        return None
    bb = fmt.block_size * bits // 8
    if bb < 4 or bb & (bb - 1):  # tl.arange needs a power of two
        return None
    return Spec(bits, code, smode, fmt.zero == "float", cmul, bb)


def supports(fmt: Format, shape: tuple[int, ...] | None, dtype: torch.dtype | None = None) -> bool:
    return HAVE_TRITON and spec_of(fmt) is not None and (shape is None or len(shape) == 2)


# ---------------------------------------------------------------------------------------------
# config choice: the measured table, else a heuristic
# ---------------------------------------------------------------------------------------------
_table: dict | None = None


def _load_table() -> dict:
    global _table
    if _table is None:
        try:
            _table = json.loads(_TABLE_PATH.read_text()).get("entries", {})
        except (OSError, ValueError):
            _table = {}
    return _table


def m_bucket(m: int) -> int:
    """Smallest bucket >= m (the last bucket takes everything above it)."""
    for b in _M_BUCKETS:
        if m <= b:
            return b
    return _M_BUCKETS[-1]


def table_key(bits: int | str, m: int, k: int, n: int) -> str:
    return f"{bits}|{m_bucket(m)}|{k}|{n}"


def decode_family(spec: Spec) -> str | None:
    """The table key of formats whose decode costs differ enough from the integer codes' to win
    with other configs: fp4 e2m1 codes ('fp4', PRMT table lookups), palettes ('lut', 16-entry PRMT
    lookups) and affine codes ('asym', the activation sums of the zero points); None for the rest.
    E.g. `decode_family(spec_of(fmt))`."""
    if spec.code == 3:
        return "fp4"
    if spec.code == 6:
        return "lut"
    if spec.has_zero:
        return "asym"
    return None


def heuristic(spec: Spec, m: int, k: int, n: int, allow_dot4: bool = True) -> dict:
    """Config used where the table has no entry (and the tuner's starting point): a GEMV up to
    M = 4 (M = 2 for the codes dot4 decodes: the GEMV's work grows with M, at M = 4 int4 ran at
    0.80-0.97x bf16 and int8 at 0.77x where dot4 ran 1.1-1.6x); `dot4` (`dot4_format_ok`: 2- and
    4-bit integers, e2m1, int8, fp8) at M = 3..16 and 65..128, and at 17..64 for weights of >= 16M
    elements; the tensor-core `dot` tiles for other formats up to M = 64; dequantize + cuBLAS
    above. dot4 tiles are those that won most often in the kernel table: 16-row x tiles split in
    the kernel up to M = 16, 32 / 64 rows split by the host above, K split until about two
    programs per SM. The bounds come from timing
    both sides on eight untuned shapes (H200, RESULTS.md 2026-11-25: above M = 64 `dot` ran 2.5-4x
    slower than dequantize + cuBLAS). E.g.
    `heuristic(spec_of(PRESETS["int4"]), 16, 4096, 1024)["path"] == "dot4"`."""
    sm = _sm_count()
    dot4 = allow_dot4 and dot4_format_ok(spec)
    if m <= 2 or (m <= 4 and not dot4):
        return {"path": "gemv", "BLOCK_N": 4, "NB_T": max(1, 1024 // spec.bb), "NW": 256, "num_warps": 4}
    if dot4 and (m <= 16 or 64 < m <= 128 or (m <= 64 and n * k >= 1 << 24)):
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        tiles = cdiv(n, 64) * cdiv(m, block_m)
        split = 1
        while tiles * split < 2 * sm and split < 4 and k // (split * 2) >= 1024:
            split *= 2
        return {"path": "dot4", "BLOCK_N": 64, "BLOCK_M": block_m, "NB_T": dot_blocks(128, spec), "num_warps": 4,
                "STAGES": 4 if block_m == 16 else 3, "SPLIT_K": split, "XPERM": block_m > 16}
    if m <= 64:
        block_m = max(16, next_pow2(m))
        tiles = cdiv(n, 64) * cdiv(m, block_m)
        split = 1
        while tiles * split < 2 * sm and split < 16 and k // (split * 2) >= 512:
            split *= 2
        return {"path": "dot", "BLOCK_N": 64, "BLOCK_M": block_m, "NB_T": dot_blocks(64, spec), "SPLIT_K": split,
                "SWAP": True, "num_warps": 4, "num_stages": 3}
    return {"path": "dequant", "BLOCK_N": 16, "NB_T": max(1, 128 // spec.bb), "num_warps": 4}


def _env_rows(name: str, default: int) -> int:
    """A row count from the environment variable `name` (default when unset), or a ValueError that
    names the variable."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a whole number of activation rows, e.g. {name}=9") from None


# the Hopper int4 kernel (gluon_w4.py): on by default where it runs; LOWBIT_GLUON_W4=0 turns it off
GLUON_W4 = os.environ.get("LOWBIT_GLUON_W4", "1") != "0"
_SM90: dict[int, bool] = {}


def _sm90() -> bool:
    if not torch.cuda.is_available():
        return False
    dev = torch.cuda.current_device()
    if dev not in _SM90:
        _SM90[dev] = torch.cuda.get_device_capability(dev)[0] == 9
    return _SM90[dev]


# above this many activation rows dequantize + cuBLAS. H200, x bf16 (RESULTS.md, session 28): at M = 2048
# the Hopper int4 kernel's best config ran 0.75-0.96x against 0.81-0.91x for dequantize + cuBLAS, at
# M = 1024 0.82-0.96x against 0.81-0.84x, at M = 512 0.80-1.00x against 0.62-0.69x
GLUON4_MAX_M = 1024
# from this many rows the Hopper int4 kernel (8-row activation blocks up to M = 8). H200, x bf16
# (RESULTS.md, session 29): at M = 2..8 it took 15-17 us at 8192^2 / 4096x14336 / 14336x4096 against
# 20-22 us for the GEMV / dot4 entries, 8.2 vs 10.1 us at 4096^2 (M >= 3); the GEMV keeps M = 1 and
# small weights at M <= 4 (4096x1024: 4.1-5.3 us against 6.4). LOWBIT_GLUON4_MIN_M=9 in the environment
# (or setting this before the first call) keeps the repacked copy of the codes for M >= 9, as before
GLUON4_MIN_M = _env_rows("LOWBIT_GLUON4_MIN_M", 2)


def gluon4_config(spec: Spec, m: int, k: int, n: int, sm90: bool | None = None) -> dict | None:
    """The config of the Hopper int4 kernel (`gluon_w4.matmul_w4`) for this call, or None where it
    does not run: symmetric 4-bit integer codes with fp16 / bf16 / fp32 / E8M0 scales per 32, 64 or
    128 values, GLUON4_MIN_M <= M <= GLUON4_MAX_M (below, the GEMV; above, dequantize + cuBLAS; also
    the GEMV at M <= 4 for weights under 8M values), K a multiple of 128, N of 64, an sm_90 GPU.
    Split-K brings the programs near one per SM.

    M <= 8: 8-row activation blocks, two warpgroups where N >= 4096, six stages for wide outputs
    (an lm_head: 107 vs 115 us at 4096x128256, session 29). M <= 64: the best of a sweep on an H200
    (RESULTS.md, session 26): two consumer warpgroups (128 weight rows per program) at M <= 32 and
    where N >= 8192, else one. M > 64: the scales folded
    into the 16-bit operands (`fold`; fp16 activations only where the scaled weights are normal fp16
    numbers, `gluon_w4.fp16_fold_ok`, else the other paths), 128 activation rows per program where
    that still gives about one program per SM, else 64 (session 28 sweep: M = 256 at 8192^2 0.59x
    bf16 through dequantize + cuBLAS, 0.97x with 128 rows).

    Example:
        >>> from lowbit.formats import PRESETS
        >>> gluon4_config(spec_of(PRESETS["int4-e8m0"]), 16, 8192, 8192, sm90=True)
        {'path': 'gluon4', 'num_wg': 2, 'block_m': 16, 'split_k': 2, 'stages': 4}
        >>> gluon4_config(spec_of(PRESETS["int4-e8m0"]), 256, 8192, 8192, sm90=True)["block_m"]
        128
        >>> gluon4_config(spec_of(PRESETS["int8"]), 16, 8192, 8192, sm90=True) is None
        True
    """
    if not (GLUON_W4 and GLUON4_MIN_M <= m <= GLUON4_MAX_M and k > 0 and n > 0 and k % 128 == 0 and n % 64 == 0):
        return None
    if m <= 4 and n * k < 8 << 20:  # small weights at a few rows: the GEMV's programs fill the GPU better
        return None
    if not (spec.bits == 4 and spec.code == 0 and not spec.has_zero and spec.smode in (1, 2) and spec.cmul == 1.0
            and spec.bb in (16, 32, 64)):
        return None
    if not (sm90 if sm90 is not None else _sm90()):
        return None
    sm = _sm_count()
    if m <= 8:
        block_m = 8
        num_wg = 2 if n >= 4096 and n % 128 == 0 else 1
        stages = 6 if n >= 32768 else 4
        extra = {}
    elif m <= 64:
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        num_wg = 2 if (block_m <= 32 or n >= 8192) and n % 128 == 0 else 1
        stages = 4 if block_m <= 32 else (5 if num_wg == 2 else 6)
        extra = {}
    else:
        num_wg = 2 if n % 128 == 0 else 1
        block_m = 128 if (n // (64 * num_wg)) * cdiv(m, 128) >= 0.75 * sm else 64
        stages = 4 if block_m == 128 else 5
        extra = {"fold": True}
    split = max(1, min(4, round(sm / ((n // (64 * num_wg)) * cdiv(m, block_m)))))
    while split > 1 and k // 128 < split:
        split -= 1
    return {"path": "gluon4", "num_wg": num_wg, "block_m": block_m, "split_k": split, "stages": stages, **extra}


_CHOSEN: dict = {}


def choose(spec: Spec, m: int, k: int, n: int) -> dict:
    """The measured config for this format's decode family (`decode_family`), else its bits, else
    any format's at (M bucket, K, N), else the heuristic. A `dot4` entry is skipped by formats that
    path does not decode (palettes), which then take the next entry. Remembered per (table, spec,
    M, K, N): the returned dict is shared, callers must not change it."""
    table = _load_table()
    key = (id(table), spec, m, k, n)
    cfg = _CHOSEN.get(key)
    if cfg is None:
        if len(_CHOSEN) > 4096:  # prefill lengths vary: keep the memo bounded
            _CHOSEN.clear()
        cfg = _CHOSEN[key] = _choose(table, spec, m, k, n)
    return cfg


def _choose(table: dict, spec: Spec, m: int, k: int, n: int) -> dict:
    """Where the Hopper int4 kernel runs (`gluon4_config`): the fastest config measured for such
    calls (key 'gluon4|M|K|N', any path), else the kernel's own config (it beat every older entry
    where both were timed). Elsewhere: the first entry of the decode family, the bits, or any format
    whose path decodes this format, else the heuristic."""
    g4 = gluon4_config(spec, m, k, n)
    if g4 is not None:
        cfg = table.get(table_key("gluon4", m, k, n))
        return _fit(dict(cfg), spec, m) if cfg else g4
    family = decode_family(spec)
    keys = ([table_key(family, m, k, n)] if family else []) + [table_key(spec.bits, m, k, n), table_key("*", m, k, n)]
    for key in keys:
        cfg = table.get(key)
        if cfg and cfg["path"] != "gluon4" and (cfg["path"] != "dot4" or dot4_format_ok(spec)):
            return _fit(dict(cfg), spec, m)
    return heuristic(spec, m, k, n)


def dot_blocks(kb_t: int, spec: Spec) -> int:
    """Scale blocks per iteration of the `dot` / `dot4` tiles for `kb_t` bytes of a 4-bit row:
    formats under 4 bits get as many codes per iteration as 4-bit ones, not as many bytes (the
    decoded tile grows with the codes: in `dot`'s shared memory int2 at 128 x 128 tiles asked for
    256 KiB on an H200; in `dot4`'s registers it would spill).
    E.g. `dot_blocks(64, spec_of(PRESETS["int2-e8m0"])) == 4`."""
    return max(1, kb_t * min(spec.bits, 4) // (4 * spec.bb))


def _fit(cfg: dict, spec: Spec, m: int) -> dict:
    """A table config (sizes in bytes per row per iteration, `KB_T`) made concrete for `spec`."""
    if "KB_T" in cfg:
        kbt = cfg.pop("KB_T")
        cfg["NB_T"] = dot_blocks(kbt, spec) if cfg["path"] in ("dot", "dot4") else max(1, kbt // spec.bb)
        if cfg["path"] == "gemv":
            cfg["NW"] = max(4, kbt // 4)
    cfg.pop("us", None)
    return cfg


def candidates(spec: Spec, m: int, k: int, n: int) -> list[dict]:
    """Configs the tuner times for one (M, K, N) (`KB_T`: bytes of one weight row per iteration)."""
    out: list[dict] = []
    if m <= 4:
        # (BLOCK_N, warps, NWG, WPT, SPLIT_K). Programs of one or two warps over few rows win (H200,
        # benchmarks/gemv_probe.py): many warps per SM; 4 words (16 bytes) per thread and row for
        # every code width since each thread holds whole groups of every row (RESULTS.md,
        # 2026-11-25); the one-word int8 configs with K split 2-8 ways won before that and stay
        for bn, nw, nwg, wpt, sk in ((4, 1, 32, 4, 1), (4, 2, 64, 4, 1), (4, 4, 128, 4, 1), (4, 1, 64, 4, 1),
                                     (8, 1, 32, 4, 1), (2, 1, 32, 4, 1), (2, 2, 64, 4, 1), (4, 1, 32, 4, 2),
                                     (4, 2, 64, 4, 2), (16, 4, 32, 4, 1), (8, 1, 32, 2, 2),
                                     (8, 1, 32, 1, 4), (8, 1, 32, 1, 2), (16, 1, 32, 1, 4), (16, 2, 64, 1, 4)):
            out.append({"path": "gemv2", "BLOCK_N": bn, "NWG": nwg, "num_warps": nw, "WPT": wpt, "SPLIT_K": sk})
        for bn, kbt, nw in ((4, 512, 4), (4, 1024, 4), (4, 2048, 4), (8, 512, 4), (8, 1024, 4), (2, 2048, 4),
                            (2, 1024, 4), (4, 2048, 8), (8, 2048, 8), (16, 512, 4)):
            out.append({"path": "gemv", "BLOCK_N": bn, "KB_T": kbt, "num_warps": nw})
    sm = _sm_count()
    g4 = gluon4_config(spec, m, k, n)
    if g4 is not None:  # the Hopper int4 kernel: warpgroups, split-K, stages (M > 64: row blocks) around its own config
        tiles = ((128, 4), (128, 3), (64, 5)) if m > 64 else ((g4["block_m"], 4), (g4["block_m"], 6))
        for nwg in (1, 2) if n % 128 == 0 else (1, ):
            for split in sorted({1, 2, g4["split_k"]} if m > 64 or m <= 8 else {1, 2, 4, g4["split_k"]}):
                for bm, stages in tiles:
                    out.append(dict(g4, num_wg=nwg, split_k=split, block_m=bm, stages=stages))
    if 1 < m <= 256 and dot4_format_ok(spec):  # the packed-code tensor-core path
        # (BLOCK_N, BLOCK_M, KB_T, warps, STAGES, SPLIT_K, XPERM), from the H200 sweeps of
        # benchmarks/gemv_probe.py --m 16 64 256 (RESULTS.md): split K 2-4 and 256-512 codes per
        # iteration at M = 16; x split by the host (XPERM) from M = 32; split 4 at M = 64 (won on
        # 14336x4096 and 4096^2)
        for bn, bm, kbt, nw, st, sk, xp in ((64, 16, 128, 4, 4, 4, False), (64, 16, 128, 4, 3, 2, False),
                                            (64, 16, 256, 4, 3, 2, False), (128, 16, 128, 8, 4, 4, False),
                                            (64, 16, 128, 4, 4, 2, False), (64, 32, 128, 4, 3, 2, True),
                                            (64, 64, 128, 4, 3, 2, True), (128, 64, 128, 8, 3, 2, True),
                                            (64, 64, 128, 4, 3, 4, True), (64, 32, 128, 4, 3, 4, True),
                                            (64, 64, 128, 4, 3, 1, True), (64, 128, 64, 4, 3, 1, True),
                                            (64, 128, 128, 4, 3, 1, True), (128, 128, 128, 8, 3, 1, True)):
            if dot4_tile_suits(bm, m):
                out.append({"path": "dot4", "BLOCK_N": bn, "BLOCK_M": bm, "KB_T": kbt, "num_warps": nw,
                            "STAGES": st, "SPLIT_K": sk, "XPERM": xp})
    for bn, bm, swap, kbt, nw, st in ((64, 16, True, 64, 4, 3), (128, 16, True, 64, 4, 3), (64, 32, True, 64, 4, 3),
                                       (128, 16, True, 64, 8, 3), (64, 16, True, 64, 4, 4), (64, 16, True, 128, 8, 3),
                                       (128, 16, False, 64, 4, 3), (64, 16, False, 64, 4, 3),
                                       (64, 64, True, 64, 4, 3), (128, 64, True, 64, 8, 3),
                                       (128, 128, False, 64, 8, 3), (128, 128, False, 32, 4, 4),
                                       (128, 256, False, 64, 8, 3), (128, 64, False, 64, 4, 3)):
        if (m <= 4 and bm > 16) or bm > 2 * max(16, m) or (m > 64 and swap) or (m >= 512 and bm < 128):
            continue
        tiles = cdiv(n, bn) * cdiv(m, bm)
        split = 1
        while tiles * split < 2 * sm and split < 16 and k // (split * 2) >= 512:
            split *= 2
        for sp in sorted({split, max(1, split // 2), min(16, split * 2)}):
            out.append({"path": "dot", "BLOCK_N": bn, "BLOCK_M": bm, "KB_T": kbt, "SPLIT_K": sp, "SWAP": swap,
                        "num_warps": nw, "num_stages": st})
    if m >= 128:
        for bn, kbt in ((16, 128), (8, 256), (32, 64)):
            out.append({"path": "dequant", "BLOCK_N": bn, "KB_T": kbt, "num_warps": 4})
    return out


_SM_COUNT: dict[int, int] = {}


def _sm_count() -> int:
    if not torch.cuda.is_available():
        return 132
    dev = torch.cuda.current_device()
    if dev not in _SM_COUNT:
        _SM_COUNT[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SM_COUNT[dev]


# split-K arrival counters, one zeroed int32 buffer per device (reset to 0 by the kernel itself)
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_N_COUNTERS = 1 << 16


def _counters(device: torch.device) -> torch.Tensor:
    buf = _COUNTERS.get(device)
    if buf is None:
        buf = _COUNTERS[device] = torch.zeros(_N_COUNTERS, dtype=torch.int32, device=device)
    return buf


# ---------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------
def _dot_dtype(x_dtype: torch.dtype):
    import triton

    if _interpreting() or x_dtype == torch.float32:
        return triton.language.float32  # the interpreter's bf16 dot is wrong; fp32 operands are exact there
    return triton.language.float16 if x_dtype == torch.float16 else triton.language.bfloat16


def run(x2: torch.Tensor, planes: dict[str, torch.Tensor | None], spec: Spec, n: int, k: int,
        bias: torch.Tensor | None, cfg: dict | None = None, out: torch.Tensor | None = None,
        glu: bool = False) -> torch.Tensor:
    """y (M, N) = x2 (M, K) @ W^T (+ bias) for the planes of one weight; `cfg` overrides the table.
    `glu`: W's rows are (gate, up) pairs and y (M, N / 2) = silu(gate) * up (`lowbit.nn.gated`), in
    the M = 1 GEMV's epilogue where that path runs, else after the matmul (`silu_mul_pairs`)."""
    import triton

    m = x2.shape[0]
    n_out = n // 2 if glu else n
    plans = planes.get("plans") if not cfg and out is None else None
    plan_key = None
    if plans is not None:  # a launch remembered for this weight (see run_fast_gemv)
        plan_key = (m, x2.dtype, x2.stride(0), x2.data_ptr() % 16, None if bias is None else bias.data_ptr(),
                    id(_load_table()), glu)
        plan = plans.get(plan_key)
        if plan is not None:
            y = torch.empty(m, n_out, device=x2.device, dtype=x2.dtype)
            if plan.split > 1:
                plan.launch(x=x2, y=y, ws=torch.empty(plan.split, m, n, device=x2.device, dtype=torch.float32))
            else:
                plan.launch(x=x2, y=y)
            return y
    w = planes["data"]
    kb = w.shape[1]
    given = cfg
    cfg = _fit(dict(cfg), spec, m) if cfg else choose(spec, m, k, n)
    if glu:
        fcfg = _fast_gemv_cfg(cfg, spec, x2, w, m, k, n, planes.get("lut") is not None)
        if fcfg is not None and fcfg["BLOCK_N"] % 2 == 0 and n % 2 == 0 and m > 0:
            y = out if out is not None else torch.empty(m, n_out, device=x2.device, dtype=x2.dtype)
            return run_fast_gemv(x2, planes, spec, n, k, bias, y, fcfg, plan_key=plan_key, glu=True)
        return silu_mul_pairs_triton(run(x2, planes, spec, n, k, bias, given), out)
    y = out if out is not None else torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    if m == 0 or n == 0:
        return y
    if w.stride(1) != 1:
        w = w.contiguous()
    s = planes.get("scale")
    z = planes.get("zero")
    lut = planes.get("lut")
    rs = planes.get("row_scale")
    ls = planes.get("lut_scale")
    if s is not None and s.stride(-1) != 1:
        s = s.contiguous()
    if z is not None:
        z = z.contiguous() if z.stride(-1) != 1 else z
        assert s is not None and z.stride(0) == s.stride(0), "zero and scale planes must share a layout"
    dummy = w
    stride_sn = s.stride(0) if s is not None else 0
    lut_div = planes.get("lut_div", None) or max(n, 1)
    common = dict(BITS=spec.bits, CODE=spec.code, SMODE=spec.smode, HAS_ZERO=spec.has_zero,
                  HAS_RS=rs is not None, HAS_LS=ls is not None, CMUL=spec.cmul, BB=spec.bb)
    ptrs = (s if s is not None else dummy, z if z is not None else dummy, lut if lut is not None else dummy,
            rs if rs is not None else dummy, ls if ls is not None else dummy)
    path = cfg["path"]
    fcfg = _fast_gemv_cfg(cfg, spec, x2, w, m, k, n, lut is not None)
    if fcfg is not None:
        return run_fast_gemv(x2, planes, spec, n, k, bias, y, fcfg, plan_key=plan_key)
    if path == "gluon4":
        from .gluon_w4 import run_planes

        if run_planes(x2, planes, spec.bb * 2, n, k, bias, y, cfg, _counters(x2.device), plans, plan_key):
            return y
        cfg = heuristic(spec, m, k, n)  # this call does not suit it (see gluon_w4.run_planes)
        path = cfg["path"]
    if path == "dot4" and dot4_ok(spec, x2, lut is not None, w):
        return run_dot4(x2, planes, spec, n, k, bias, y, cfg)
    if path in ("gemv2", "dot4"):  # a table entry for a fast path, on a format it does not cover
        cfg = heuristic(spec, m if path == "dot4" else 1, k, n, allow_dot4=False)
        path = cfg["path"]
    if path == "gemv" and kb % 4 == 0 and w.stride(0) % 4 == 0 and w.data_ptr() % 4 == 0:
        # the word GEMV: data plane viewed as int32, one word (32 / bits codes) per thread and row
        w32 = w.view(torch.int32) if w.is_contiguous() else w.contiguous().view(torch.int32)
        nw = cfg.get("NW") or max(4, next_pow2(cfg["NB_T"] * spec.bb // 4))
        grid = (m * cdiv(n, cfg["BLOCK_N"]),)
        _kern()._gemv_w_kernel[grid](x2, w32, *ptrs, bias if bias is not None else dummy, y,
                                     m, n, k, kb // 4, x2.stride(0), w32.stride(0), stride_sn, y.stride(0), lut_div,
                                     BITS=spec.bits, CODE=spec.code, SMODE=spec.smode, HAS_ZERO=spec.has_zero,
                                     HAS_RS=rs is not None, HAS_LS=ls is not None, HAS_BIAS=bias is not None,
                                     CMUL=spec.cmul, WB=max(1, spec.bb // 4), NW=nw, BLOCK_N=cfg["BLOCK_N"],
                                     num_warps=cfg["num_warps"])
    elif path == "gemv":
        grid = (m * cdiv(n, cfg["BLOCK_N"]),)
        _kern()._gemv_kernel[grid](x2, w, *ptrs, bias if bias is not None else dummy, y,
                              m, n, k, kb, x2.stride(0), w.stride(0), stride_sn, y.stride(0), lut_div,
                              HAS_BIAS=bias is not None, NB_T=cfg["NB_T"], BLOCK_N=cfg["BLOCK_N"],
                              num_warps=cfg["num_warps"], **common)
    elif path == "dot":
        nblk = cdiv(kb, spec.bb)
        split = cfg["SPLIT_K"]
        nb_t = cfg["NB_T"]
        bps = cdiv(cdiv(nblk, split), nb_t) * nb_t
        split = cdiv(nblk, bps)  # no empty splits
        grid = (cdiv(n, cfg["BLOCK_N"]), cdiv(m, cfg["BLOCK_M"]), split)
        if split > 1 and grid[0] * grid[1] > _N_COUNTERS:
            split, bps = 1, nblk
            grid = grid[:2] + (1,)
        ws = torch.empty(split, m, n, device=x2.device, dtype=torch.float32) if split > 1 else y
        cnt = _counters(x2.device) if split > 1 else dummy
        try:
            _kern()._dot_kernel[grid](x2, w, *ptrs, bias if bias is not None else dummy, y, ws, cnt,
                                 m, n, k, kb, x2.stride(0), w.stride(0), stride_sn, y.stride(0), lut_div, bps,
                                 HAS_BIAS=bias is not None, NB_T=nb_t, BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"],
                                 SPLIT_K=split, SWAP=bool(cfg["SWAP"]), DOT_DTYPE=_dot_dtype(x2.dtype),
                                 num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3), **common)
        except triton.runtime.errors.OutOfResources as e:  # a table entry too large for this format here
            _warn_once(("dot", spec, cfg["BLOCK_N"], cfg["BLOCK_M"], nb_t),
                       f"lowbit: the dot tiles {cfg} do not fit this GPU for format {spec.key()} ({e}); using "
                       "dequantize + cuBLAS instead (re-measure the kernel table: benchmarks/matmul.py --tune)")
            return run(x2, planes, spec, n, k, bias, cfg=heuristic(spec, 1 << 20, k, n), out=out)
    elif path == "dequant":
        wd = dequantize(planes, spec, n, k, x2.dtype, cfg)
        y2 = torch.nn.functional.linear(x2, wd, None if bias is None else bias.to(x2.dtype))
        if out is not None:
            out.copy_(y2)
            return out
        return y2
    else:
        raise ValueError(f"unknown triton path {path!r} in config {cfg}")
    return y


_WARNED: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=3)


def fast_gemv_ok(spec: Spec, x2: torch.Tensor, w: torch.Tensor, k: int, has_lut: bool) -> bool:
    """Whether `triton_gemv._gemv_fast_kernel` covers this call: integer codes, fp4 e2m1 or 4-bit
    palettes (not 2 / 8-bit palettes or 8-bit minifloats), whole int32 words per row with K a
    multiple of the codes per word, and 16-bit activations for 4 / 2-bit codes (their products
    are formed in that dtype)."""
    if spec.code == 6:
        if spec.bits != 4 or not has_lut:
            return False
    elif has_lut or spec.code not in (0, 1, 2, 3) or spec.bits not in (2, 4, 8) or (spec.code == 1) != (spec.bits == 8):
        return False
    if spec.code == 3 and spec.bits != 4:
        return False
    if spec.bits < 8 and x2.dtype not in (torch.float16, torch.bfloat16) and not _interpreting():
        return False
    if spec.smode in (1, 2) and (spec.bb * 8 // spec.bits) % (32 // spec.bits):
        return False  # a scale block must be whole words
    return (k % (32 // spec.bits) == 0 and w.shape[1] % 4 == 0 and w.stride(0) % 4 == 0 and w.data_ptr() % 4 == 0
            and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0)


def fast_gemv_config(m: int, k: int, n: int, bits: int = 4) -> dict:
    """Untuned shapes: the configs that won most often on the H200 (benchmarks/gemv_probe.py):
    programs of 4 rows, 16 bytes per thread and row; one warp for 4 / 2-bit codes, two for int8."""
    if bits == 8:
        return {"path": "gemv2", "BLOCK_N": 4, "NWG": 64, "WPT": 4, "num_warps": 2}
    return {"path": "gemv2", "BLOCK_N": 4, "NWG": 32, "WPT": 4, "num_warps": 1}


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fast_gemv_cfg(cfg: dict, spec: Spec, x2, w, m: int, k: int, n: int, has_lut: bool) -> dict | None:
    """The packed-pair GEMV's config where `cfg` picks a GEMV path and the fast one takes this call
    (`fast_gemv_ok`), else None."""
    path = cfg["path"]
    if path not in ("gemv", "gemv2") or not cfg.get("fast", True) or not fast_gemv_ok(spec, x2, w, k, has_lut):
        return None
    return cfg if path == "gemv2" else fast_gemv_config(m, k, n, spec.bits)


def silu_mul_pairs_triton(y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.silu_mul_pairs` of a contiguous (M, 2N) y in one Triton launch, into `out` or a new (M, N)."""
    m, n2 = y.shape
    out = out if out is not None else torch.empty(m, n2 // 2, device=y.device, dtype=y.dtype)
    total = m * (n2 // 2)
    if total:
        _kern()._silu_mul_pairs_kernel[(cdiv(total, 1024),)](y, out, total, BLOCK=1024, num_warps=4)
    return out


def run_fast_gemv(x2, planes, spec: Spec, n: int, k: int, bias, y, cfg: dict, plan_key=None,
                  glu: bool = False) -> torch.Tensor:
    """y = x2 @ W^T by the packed-pair GEMV (see triton_gemv.py); `fast_gemv_ok` must hold. `glu`:
    y (M, N / 2) = silu(gate) * up of the (gate, up) row pairs (`run`; BLOCK_N even).

    With `plan_key` (from `run`: M, dtype, x's row stride and alignment, bias, kernel table, GLU) the
    launch is remembered in `planes["plans"]` (a dict `linear` keeps per weight) as a `LaunchPlan`
    (kernels/launch.py); `run` then relaunches it for calls with the same key, swapping in x, y
    (allocated there: 512-byte aligned, row stride N) and the split-K workspace, without this
    function's or Triton's per-call work: a QuantLinear call's host time ~100 -> 36-57 us on H200 hosts
    (RESULTS.md, session 23). Planes that needed a contiguous copy are not remembered (the copy
    would go stale if the plane changed in place)."""
    m = x2.shape[0]
    plans = planes.get("plans") if plan_key is not None and cfg.get("PROBE", 0) == 0 else None
    w = planes["data"]
    w32 = w.view(torch.int32) if w.is_contiguous() else w.contiguous().view(torch.int32)
    s, z, rs = planes.get("scale"), planes.get("zero"), planes.get("row_scale")
    lut, ls = planes.get("lut"), planes.get("lut_scale")
    if lut is not None:  # (G, 16) entries, (G, 1) scales: read at g * 16 and g
        lut = lut.contiguous()
        ls = ls.contiguous() if ls is not None else None
    if s is not None and s.stride(-1) != 1:
        s = s.contiguous()
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    wb = max(1, spec.bb // 4) if spec.smode in (1, 2) else 1
    # the decode's constant: 4 / 2-bit integers come out as (c - off) / 8, fp4 and palettes as their value (fp4's
    # `cmul` belongs to the fp16 bit-placement decode of triton_kernels.py, not to this one)
    smul = 1.0 if spec.code in (3, 6) else spec.cmul * (8.0 if spec.bits < 8 else 1.0)
    nw = cfg.get("num_warps", 4)
    wpt = cfg.get("WPT", 4)
    nwg = cfg.get("NWG", 32 * nw)
    bn = cfg["BLOCK_N"]
    lut_div = planes.get("lut_div", None) or max(n, 1)
    if lut is not None and lut.shape[0] > 1:  # a program's rows share one palette
        while lut_div % bn:
            bn //= 2
    kw = w32.shape[1]
    words = nwg * wpt
    split = cfg.get("SPLIT_K", 1)
    wps = triton_cdiv(triton_cdiv(kw, split), words) * words
    split = triton_cdiv(kw, wps)  # no empty splits
    rblocks = m * triton_cdiv(n, bn)
    if split > 1 and (rblocks > _N_COUNTERS or (words % wb and wb % words)):
        split, wps = 1, kw  # a split must start on a scale block; counters are per row block
    dummy = w32
    ws = torch.empty(split, m, n, device=x2.device, dtype=torch.float32) if split > 1 else dummy
    cnt = _counters(x2.device) if split > 1 else dummy
    gemv = _kern("triton_gemv")
    args = (x2, w32, s if s is not None else dummy, z if z is not None else dummy, rs if rs is not None else dummy,
            bias if bias is not None else dummy, y, ws, cnt, lut if lut is not None else dummy,
            ls if ls is not None else dummy, m, n, k, kw, x2.stride(0), w32.stride(0),
            s.stride(0) if s is not None else 0, y.stride(0), wps, lut_div)
    consts = dict(BITS=spec.bits, SIGNED=spec.code == 0, SMODE=spec.smode, HAS_ZERO=spec.has_zero, HAS_RS=rs is not None,
                  HAS_BIAS=bias is not None, SMUL=smul, F16=x2.dtype == torch.float16, WB=wb, NWG=nwg, BLOCK_N=bn,
                  ASM=not _interpreting(), WPT=wpt, SPLIT_K=split, FP4=spec.code == 3,
                  WORD_ASM=word_asm(spec.bits, spec.code == 3, x2.dtype == torch.float16, spec.code == 0, spec.code == 6),
                  PROBE=cfg.get("PROBE", 0), LUT=spec.code == 6, HAS_LS=ls is not None, GLU=glu)
    compiled = gemv._gemv_fast_kernel[(rblocks, split)](*args, **consts, num_warps=nw, num_stages=cfg.get("num_stages", 1))
    as_stored = (s is planes.get("scale") and z is planes.get("zero") and lut is planes.get("lut")
                 and ls is planes.get("lut_scale"))  # no contiguous copies made above
    if plans is not None and w.is_contiguous() and as_stored and y.stride(0) == y.shape[1] and y.data_ptr() % 16 == 0:
        plan = LaunchPlan.of(gemv._gemv_fast_kernel, compiled, (rblocks, split), args, consts,
                             {"x": 0, "y": 6, "ws": 7} if split > 1 else {"x": 0, "y": 6})
        if plan is not None:
            plans[plan_key] = plan
    return y


def dot4_tile_suits(block_m: int, m: int) -> bool:
    """Whether a dot4 tile of BLOCK_M activation rows is worth timing at M (the tuner's and
    `benchmarks/gemv_probe.py`'s filter): no more than twice the rows, >= 32 from M = 64, >= 128 at 256."""
    return block_m <= max(16, 2 * m) and (m < 64 or block_m >= 32) and (m < 256 or block_m >= 128)


def dot4_format_ok(spec: Spec) -> bool:
    """Whether `triton_dot4._dot4_kernel` decodes this format: 4-bit integer codes (symmetric or
    affine) or e2m1 (mxfp4) with a scale per block, int8 codes with a scale per block or per row,
    fp8 codes (mxfp8) with a scale per block, 2-bit integer codes with a scale per block."""
    if spec.bb % 2:
        return False
    if spec.bits == 2:
        return spec.code in (0, 2) and spec.smode in (1, 2)
    if spec.bits == 4:
        return (spec.code in (0, 2) and spec.smode in (1, 2)) or (spec.code == 3 and spec.smode == 2)
    int8 = spec.code == 1 and spec.smode in (1, 2, 3)
    return spec.bits == 8 and (int8 or (spec.code in (4, 5) and spec.smode == 2))


def dot4_ok(spec: Spec, x2: torch.Tensor, has_lut: bool, w: torch.Tensor | None = None) -> bool:
    """Whether `triton_dot4._dot4_kernel` covers this call: a format of `dot4_format_ok`, 16-bit
    activations (the codes are decoded into the activation dtype), and (given `w`) a data plane
    that can be read as uint16 (an even number of bytes per row, 2-byte aligned)."""
    ok = (not has_lut and dot4_format_ok(spec)
          and (x2.dtype in (torch.float16, torch.bfloat16) or _interpreting()))
    if ok and w is not None:
        ok = w.shape[1] % 2 == 0 and (w.stride(0) % 2 == 0 or w.shape[0] == 1) and w.data_ptr() % 2 == 0
    return ok


def run_dot4(x2, planes, spec: Spec, n: int, k: int, bias, y, cfg: dict) -> torch.Tensor:
    """y = x2 @ W^T by the packed-code tensor-core kernel (see triton_dot4.py); `dot4_ok` must hold."""
    m = x2.shape[0]
    w = planes["data"]
    if w.stride(1) != 1:
        w = w.contiguous()
    w16 = w.view(torch.int16)  # uint16 elements: codes 4u..4u+3, or 2u, 2u+1 for int8 (see triton_dot4.py)
    s, z = planes["scale"], planes.get("zero")
    if s.stride(-1) != 1:
        s = s.contiguous()
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    ku = w16.shape[1]
    ub = spec.bb // 2  # uint16 elements per scale block
    nb_t = max(cfg.get("NB_T", 1), cdiv(16, ub))  # >= 16 elements per product (the MMA's K)
    bku = nb_t * ub
    iters = cdiv(ku, bku)
    split = cfg.get("SPLIT_K", 1)
    ips = cdiv(iters, split)
    split = cdiv(iters, ips)  # no empty splits
    grid = (cdiv(n, cfg["BLOCK_N"]), cdiv(m, cfg["BLOCK_M"]), split)
    if split > 1 and grid[0] * grid[1] > _N_COUNTERS:
        ips, grid = iters, grid[:2] + (1,)
        split = 1
    ws = torch.empty(split, m, n, device=x2.device, dtype=torch.float32) if split > 1 else y
    cnt = _counters(x2.device) if split > 1 else w
    xperm = bool(cfg.get("XPERM"))
    npos = 16 // spec.bits  # codes per uint16 element
    if xperm:  # x split by code position: x_perm[i, m, u] = x[m, npos u + i] (see triton_dot4.py)
        xp = torch.nn.functional.pad(x2, (0, npos * ku - k)) if npos * ku > k else x2
        x2 = xp.reshape(m, ku, npos).permute(2, 0, 1).contiguous()
    dot4 = _kern("triton_dot4")
    f16 = x2.dtype == torch.float16
    if spec.code == 1:
        decode = asm_bytes(f16, scaled=spec.smode != 3)
    elif spec.code == 3:
        decode = asm_fp4(f16)
    elif spec.code in (4, 5):
        decode = asm_fp8(f16, spec.code == 5)
    else:
        decode = asm_nibbles(f16, spec.code == 0, not f16 and spec.code == 0 and spec.smode == 2 and spec.cmul == 1.0,
                             bits=spec.bits)
    dot4._dot4_kernel[grid](
        x2, w16, s, z if z is not None else s, bias if bias is not None else w, y, ws, cnt,
        m, n, k, ku, x2.stride(1) if xperm else x2.stride(0), w16.stride(0), s.stride(0), y.stride(0), ips,
        CODE=spec.code, SMODE=spec.smode, HAS_ZERO=spec.has_zero, HAS_BIAS=bias is not None,
        SMUL=1.0 if spec.code in (3, 4, 5) else spec.cmul,  # fp codes: the PTX applies the constant factor
        UB=ub, NB_T=nb_t, BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"],
        SPLIT_K=split, STAGES=cfg.get("STAGES", 3), ASM=not _interpreting(), DOT_DTYPE=_dot_dtype(x2.dtype),
        XPERM=xperm, NIB_ASM=decode, BITS=spec.bits,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    return y


def dequantize(planes: dict, spec: Spec, n: int, k: int, dtype: torch.dtype, cfg: dict | None = None) -> torch.Tensor:
    """Dense (N, K) weight in `dtype`, decoded by the Triton kernel (one pass over the planes)."""
    cfg = cfg or {"BLOCK_N": 16, "NB_T": max(1, 128 // spec.bb), "num_warps": 4}
    w = planes["data"]
    if w.stride(1) != 1:
        w = w.contiguous()
    kb = w.shape[1]
    s, z, lut, rs, ls = (planes.get(p) for p in ("scale", "zero", "lut", "row_scale", "lut_scale"))
    if s is not None and s.stride(-1) != 1:
        s = s.contiguous()
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    out = torch.empty(n, k, device=w.device, dtype=dtype)
    nb_t = cfg["NB_T"]
    grid = (cdiv(n, cfg["BLOCK_N"]), cdiv(cdiv(kb, spec.bb), nb_t))
    _kern()._dequant_kernel[grid](w, s if s is not None else w, z if z is not None else w, lut if lut is not None else w,
                             rs if rs is not None else w, ls if ls is not None else w, out,
                             n, k, kb, w.stride(0), s.stride(0) if s is not None else 0, out.stride(0),
                             planes.get("lut_div", None) or max(n, 1),
                             BITS=spec.bits, CODE=spec.code, SMODE=spec.smode, HAS_ZERO=spec.has_zero,
                             HAS_RS=rs is not None, HAS_LS=ls is not None, CMUL=spec.cmul, BB=spec.bb,
                             NB_T=nb_t, BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return out


def kernel_planes(qweight: QTensor) -> dict:
    """The planes as the kernels take them: palettes' per-channel `scale` is passed as row_scale."""
    p = qweight.planes
    if qweight.fmt.family == "lut":
        return {"data": p["data"], "lut": p["lut"], "lut_scale": p.get("lut_scale"),
                "row_scale": p.get("scale"), "lut_div": qweight.fmt.group_size or None}
    return {"data": p["data"], "scale": p.get("scale"), "zero": p.get("zero")}


# ---------------------------------------------------------------------------------------------
# the custom op (torch.compile / CUDA graphs) and the kernel-table entry
# ---------------------------------------------------------------------------------------------
def _qlinear_eager(x: torch.Tensor, planes: dict, spec: Spec, n: int, k: int, bias: torch.Tensor | None,
                   glu: bool = False) -> torch.Tensor:
    """The op's body: y (..., N) = x (..., K) @ W^T (+ bias), W given by its planes (`glu`: (..., N / 2),
    see `run`)."""
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return run(x2, planes, spec, n, k, bias, glu=glu).reshape(*x.shape[:-1], n // 2 if glu else n)


if HAVE_TRITON:

    @torch.library.custom_op("lowbit::qlinear", mutates_args=())
    def qlinear(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
                lut: torch.Tensor | None, lut_scale: torch.Tensor | None, row_scale: torch.Tensor | None,
                bias: torch.Tensor | None, spec: str, n: int, k: int, lut_div: int) -> torch.Tensor:
        """y = x @ W^T (+ bias), W given by its planes; x is (..., K), y is (..., N) in x's dtype."""
        planes = {"data": data, "scale": scale, "zero": zero, "lut": lut, "lut_scale": lut_scale,
                  "row_scale": row_scale, "lut_div": lut_div or None}
        return _qlinear_eager(x, planes, Spec.from_key(spec), n, k, bias)

    @qlinear.register_fake
    def _(x, data, scale, zero, lut, lut_scale, row_scale, bias, spec, n, k, lut_div):
        return x.new_empty(*x.shape[:-1], n)

    @register("*", "linear", "cuda", "triton", supports=supports)
    def linear(x: torch.Tensor, qweight: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel-table entry: the fused Triton kernel for `qweight` (a format `spec_of` accepts).

        Under torch.compile (and for inputs that need gradients) it goes through the custom op
        `lowbit::qlinear`; in eager mode it calls the op's body directly: the custom op's Python
        wrapper costs about 170 us of host time per call (H200 host, RESULTS.md 2026-11-25, session
        23), five times an `F.linear`, which made eager generation of small models 3x slower."""
        spec, n, k, p = _prepared(qweight)
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            x = x.float()
        if not torch.compiler.is_compiling() and not (x.requires_grad and torch.is_grad_enabled()):
            return _qlinear_eager(x, p, spec, n, k, bias)
        return qlinear(x, p["data"], p.get("scale"), p.get("zero"), p.get("lut"), p.get("lut_scale"),
                       p.get("row_scale"), None if bias is None else bias, spec.key(), n, k, p.get("lut_div") or 0)

    @register("*", "glu_linear", "cuda", "triton", supports=supports)
    def glu_linear(x: torch.Tensor, qweight: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """silu(gate) * up for a weight whose rows are (gate, up) pairs (`lowbit.nn.gated`): at M = 1
        in the GEMV's epilogue (one launch, half the output written), otherwise the matmul and then
        `silu_mul_pairs`. Under torch.compile: the `lowbit::qlinear` op, then the pairs in torch (the
        compiler fuses them into one element-wise kernel)."""
        spec, n, k, p = _prepared(qweight)
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            x = x.float()
        if not torch.compiler.is_compiling() and not (x.requires_grad and torch.is_grad_enabled()):
            return _qlinear_eager(x, p, spec, n, k, bias, glu=True)
        return silu_mul_pairs(linear(x, qweight, bias))

    def _prepared(qweight: QTensor) -> tuple:
        """(spec, N, K, kernel planes) of `qweight`, made once per weight (QuantLinear keeps its QTensor
        while the planes stay the same) and kept in its kernel_cache."""
        prep = qweight.kernel_cache.get("triton")
        if prep is None:
            spec = spec_of(qweight.fmt)
            if spec is None:
                raise LookupError(f"no Triton kernel for format {qweight.fmt.name!r}")
            prep = qweight.kernel_cache["triton"] = (spec, *qweight.shape, {**kernel_planes(qweight), "plans": {}})
        return prep
