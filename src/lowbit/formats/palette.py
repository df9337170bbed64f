"""Palettized formats (`lut1` .. `lut8`): each weight is a `bits`-bit code into a lookup table.

Planes for a (rows, cols) weight, K = 2^bits entries per table, G = n_luts:
    data       uint8 (rows, packed_len(cols, bits))   codes, packed per row (packing.py)
    lut        (G, K) float16, or int8 when lut_dtype == "int8"
    lut_scale  (G, 1) float16                          int8 LUTs only: entry value = int8 * lut_scale
    scale      (G*group_size, 1) = (rows, 1) float16   per_channel_scale only

`group_size` counts OUTPUT CHANNELS (rows) per LUT, as coremltools' ``group_size`` does: rows
[i*group_size, (i+1)*group_size) share LUT i, so G = rows / group_size (group_size = 0: one LUT,
G = 1). A row count not divisible by group_size is refused (ValueError).

Decoding (the definition of the planes; `decode` below):
    value(r, c) = lut_value[r // group_size, code(r, c)] * scale[r]      (scale term if present)
    lut_value   = lut (fp16)  or  lut.int8 * lut_scale (fp32 math)

Encoding:
    1. per_channel_scale: s_r = fp16(max |w_r|); the row is palettized as w_r / s_r (all-zero rows
       get s_r = 0 and decode to exact zeros). The clustering weights each element by s_r^2 so
       it minimises the error of w itself, not of the normalised values.
    2. Per LUT group, the table is
         kmeans   weighted 1-D k-means: minimises sum(importance * (x - table[code])^2);
         uniform  K evenly spaced values from the group's min to its max;
         unique   the group's sorted distinct values (ValueError if there are more than K).
       k-means works on the group's values sorted once (on CPU, for >= 2^18 values when the
       histogram is no larger than the data, instead on a histogram of fp32 bins that keep sign,
       exponent and 11 mantissa bits (9 when there would be more than n/8 bins), each bin a
       point at its mean; lossless for bf16 data), with float64 prefix sums of weight, weight*x and
       weight*x^2: the sums over any run of sorted values cost O(1), and cluster boundaries come
       from `searchsorted` on the midpoints between centroids, O(K log n) per Lloyd iteration.
       It is deterministic and uses no random generator:
         a. two initialisations, batched: greedy splitting (split segments at their means,
            those that lower the error most first, a quarter of them per round; isolates
            outliers) and the optimal K-partition, by dynamic programming, of the values cut
            into <= 1024 chunks (weight-quantile and equal-width cuts; the exact optimum when a
            group has no more points than that);
         b. Lloyd from both until no boundary moves, no table's error drops by more than 1e-7
            of itself, or `kmeans_iters` iterations; each iteration also tries 2x .. 64x longer
            steps along the Lloyd update and keeps the best (1-D Lloyd crawls); per group the
            better result is kept;
         c. refinement: a chain DP lets every boundary move anywhere between its two centroids
            (up to 65 candidates each) and picks the best combination exactly, then up to 16
            Lloyd iterations; repeated while the error drops by more than 1e-6 (<= 8 rounds).
       Empty clusters are re-seeded by splitting the cluster with the largest error. A group
       with at most K distinct values gets exactly those values. `seed` is accepted for format
       compatibility; results do not depend on it. All of this is batched over LUT groups
       (tensors of shape (G, ...), on w's device); only very large tensors on the sort route
       are processed in batches of groups of <= 2^24 values, to bound memory. On CPU the
       iterative part (many small ops), and all of it for tensors of <= 2^22 values, runs on one
       intra-op thread (`_single_thread`: parallel regions stall when the cores are busy).
    3. The table is rounded to its storage dtype (fp16; or int8 with lut_scale = fp16(amax/127)),
       de-duplicated and padded with its largest entry, sorted ascending. Codes are assigned
       AFTER rounding, to the nearest stored entry (ties to the lower code), so a code never
       points at a padding duplicate.

Round trips. With an fp16 table and no per-channel scale, a group holding at most K distinct
fp16-representable values is reproduced exactly (kmeans and unique), hence
dequantize(quantize(dequantize(q))) == dequantize(q) for kmeans / unique, and the planes are equal
too when every table entry is used by some code. int8 tables reproduce values of the form
int8 * lut_scale; uniform tables and per-channel scales do not promise re-quantization exactness.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import scales
from .format import Format
from .._threads import single_thread
from .packing import pack, unpack

_HIST_SHIFT = 12  # histogram bin = fp32 order-preserving key >> 12 (sign, exponent, 11 mantissa bits)
_HIST_SHIFT_MAX = 14  # ... coarsened up to >> 14 (9 mantissa bits) while the bins outnumber n / 8
_HIST_MIN = 1 << 18  # the histogram route is used from this many elements (CPU only)
_SORT_CHUNK = 1 << 24  # elements per batch of groups on the sort route (bounds memory)
_DP_CELLS = 1 << 22  # dynamic-programming initialisation: G * m^2 cost-matrix cells at most
_DP_WORK = 1 << 28  # ... and K * G * m^2 additions at most
_SPLIT_FRACTION = 0.25  # greedy init: split this fraction of the segments per round
_STEPS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # Lloyd step lengths tried each iteration
_LLOYD_TOL = 1e-7  # Lloyd stops when no table's error drops by more than this fraction
_REFINE_ROUNDS = 8  # boundary-window DP rounds after Lloyd
_POLISH_ITERS = 16  # Lloyd iterations after each refinement round
_REFINE_CELLS = 1 << 22  # ... with G * K * (W+1)^2 transition cells at most
_REFINE_TOL = 1e-6  # ... until no table's error drops by more than this fraction
_SMALL_OPS = 1 << 20  # ops on at most this many elements run on one CPU thread (_single_thread)
_SMALL_TENSOR = 1 << 22  # ... and so does all of encode() for tensors up to this many elements
_F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# public handler interface
# ---------------------------------------------------------------------------------------------
def encode(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None, **_: object) -> dict[str, torch.Tensor]:
    """Planes for finite fp32 `w` (rows, cols); see the module docstring."""
    rows, cols = w.shape
    g = fmt.group_size or rows
    if rows % g:
        raise ValueError(
            f"palette {fmt.name}: weight shape ({rows}, {cols}) has {rows} output channels, not divisible "
            f"by group_size {fmt.group_size} (channels per LUT); choose a group_size dividing {rows} or 0"
        )
    with _single_thread(w.device, w.numel() <= _SMALL_TENSOR):
        return _encode(w, fmt, importance, rows // g, g)


def _encode(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None, n_luts: int, g: int) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    bits = fmt.bits
    k = 1 << bits
    w = w.to(torch.float32).contiguous()
    planes: dict[str, torch.Tensor] = {}

    weights = None
    if importance is not None:
        if tuple(importance.shape) != (rows, cols):
            raise ValueError(f"importance has shape {tuple(importance.shape)}, expected {(rows, cols)}")
        weights = importance.to(device=w.device, dtype=torch.float32)
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("importance weights must be finite and >= 0")

    x = w
    if fmt.per_channel_scale:
        s16 = scales.encode_float(w.abs().amax(1, keepdim=True), "fp16", what="per-channel scale")
        s = s16.float()
        pos = s > 0
        x = torch.where(pos, w / torch.where(pos, s, torch.ones_like(s)), torch.zeros_like(w))
        planes["scale"] = s16
        if fmt.lut_mode == "kmeans":  # minimise the error of w = x * s, not of x
            weights = (s * s).expand(rows, cols) if weights is None else weights * (s * s)

    xg = x.reshape(n_luts, g * cols)
    wg = None if weights is None else weights.reshape(n_luts, g * cols).contiguous()
    centroids, bins = _fit(xg, wg, fmt, k)  # (G, K) float64, ascending
    lut, lut_scale, values, count = _store(centroids, fmt)
    planes["lut"] = lut
    if lut_scale is not None:
        planes["lut_scale"] = lut_scale
    codes = _assign(xg, values, count, bins)
    planes["data"] = _pack(codes.reshape(rows, cols), bits)
    return planes


def decode(planes: dict[str, torch.Tensor], fmt: Format, rows: int, cols: int) -> torch.Tensor:
    """fp32 (rows, cols): lut[row // group_size, code] (* lut_scale) (* scale[row])."""
    lut = planes["lut"]
    n_luts = lut.shape[0]
    values = lut.to(torch.float32)
    if "lut_scale" in planes:
        values = values * planes["lut_scale"].to(torch.float32)
    codes = _unpack(planes["data"], fmt.bits, cols).to(torch.int64)
    w = values.gather(1, codes.reshape(n_luts, -1)).reshape(rows, cols)
    if "scale" in planes:
        w = w * planes["scale"].to(torch.float32)
    return w


# ---------------------------------------------------------------------------------------------
# table fitting
# ---------------------------------------------------------------------------------------------
def _fit(x: torch.Tensor, wt: torch.Tensor | None, fmt: Format, k: int) -> tuple[torch.Tensor, _Bins | None]:
    """(G, K) float64 ascending table per group of x (G, n), and the histogram bins if built."""
    if fmt.lut_mode == "uniform":
        lo = x.amin(1, keepdim=True).to(_F64)
        hi = x.amax(1, keepdim=True).to(_F64)
        t = torch.arange(k, device=x.device, dtype=_F64) / max(k - 1, 1)
        return lo + (hi - lo) * t, None
    if fmt.lut_mode == "kmeans" and x.device.type == "cpu" and x.numel() >= _HIST_MIN:
        fitted = _fit_histogram(x, wt, k, fmt.kmeans_iters)
        if fitted is not None:
            return fitted
    n_groups, n = x.shape
    per = max(1, _SORT_CHUNK // n)
    outs = [
        _fit_sorted(x[i:i + per], None if wt is None else wt[i:i + per], fmt, k, i)
        for i in range(0, n_groups, per)  # one batch unless the tensor is very large
    ]
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), None


def _fit_sorted(x: torch.Tensor, wt: torch.Tensor | None, fmt: Format, k: int, first_group: int) -> torch.Tensor:
    """Exact route: sort each group once; distinct values; prefix sums; Lloyd."""
    n_groups, n = x.shape
    xs, perm = torch.sort(x, dim=1)
    is_new = torch.ones_like(xs, dtype=torch.bool)
    is_new[:, 1:] = xs[:, 1:] != xs[:, :-1]
    count = is_new.sum(1)
    if fmt.lut_mode == "unique" and bool((count > k).any()):
        i = int(torch.argmax(count))
        raise ValueError(
            f"palette {fmt.name} (unique): LUT group {first_group + i} has {int(count[i])} distinct values, "
            f"more than the {k} entries a {fmt.bits}-bit table holds; use lut_mode='kmeans' or more bits"
        )
    # sorted distinct values, padded with the largest (only meaningful where count <= K)
    rank = (torch.cumsum(is_new, 1) - 1).clamp(max=k - 1)
    uniq = xs.new_zeros(n_groups, k).scatter_(1, rank, xs)
    uniq = torch.where(torch.arange(k, device=x.device) >= count.unsqueeze(1), xs[:, -1:], uniq).to(_F64)
    if fmt.lut_mode == "unique" or bool((count <= k).all()):
        return uniq
    ws = None if wt is None else _usable_weights(wt.gather(1, perm))
    pref = _Prefix.from_points(xs, ws)
    c = _kmeans(xs, pref, k, fmt.kmeans_iters)
    return torch.where((count <= k).unsqueeze(1), uniq, c)


class _Bins(NamedTuple):
    """Histogram bins of a group tensor: flat bin index per value (with group offsets)."""

    index: torch.Tensor  # int32 (G * n,): group * nb + bin - rmin
    rmin: int  # bin id (order-preserving key of the fp32 bits >> shift) of column 0
    nb: int  # bins per group
    shift: int = _HIST_SHIFT


def _fit_histogram(x: torch.Tensor, wt: torch.Tensor | None, k: int, iters: int) -> tuple[torch.Tensor, _Bins] | None:
    """Large tensors on CPU: k-means on a histogram of fp32 bins, then Lloyd on the bins.

    A bin holds the 2^12 consecutive fp32 bit patterns sharing sign, exponent and the top 11
    mantissa bits (relative width <= 2^-11; coarsened to 9 bits while there are more than n/8
    bins, which costs nothing measurable), far finer than any table; bf16 data puts every
    distinct value in its own bin. Bins are numbered by the order-preserving integer key of the
    fp32 bits, so bin order is value order. Each bin is a point at its (weighted) mean.
    Returns None (use the sort route) when the histogram would be larger than the data, or a
    group has at most K non-empty bins (the exact distinct-value rule then applies).
    """
    n_groups = x.shape[0]
    bits = x.contiguous().view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving: key(a) < key(b) iff a < b
    raw = key >> _HIST_SHIFT
    rmin, rmax = (int(v) for v in torch.aminmax(raw))
    shift = _HIST_SHIFT
    while shift < _HIST_SHIFT_MAX and 8 * n_groups * (rmax - rmin + 1) > x.numel():
        shift, rmin, rmax = shift + 1, rmin >> 1, rmax >> 1  # Python >> floors, like torch's on int32
    if shift != _HIST_SHIFT:
        raw = key >> shift
    nb = rmax - rmin + 1
    if n_groups * nb > x.numel():
        return None
    idx = raw - rmin if rmin else raw
    if n_groups > 1:
        idx = idx + torch.arange(n_groups, dtype=torch.int32).unsqueeze(1) * nb
    idx = idx.reshape(-1)
    size = n_groups * nb
    cnt = torch.bincount(idx, minlength=size).reshape(n_groups, nb)
    x64 = x.reshape(-1).to(_F64)
    sx = torch.bincount(idx, weights=x64, minlength=size).reshape(n_groups, nb)
    if wt is None:
        bw, bs = cnt.to(_F64), sx
    else:
        w64 = _usable_weights(wt).reshape(-1).to(_F64)
        bw = torch.bincount(idx, weights=w64, minlength=size).reshape(n_groups, nb)
        bs = torch.bincount(idx, weights=w64 * x64, minlength=size).reshape(n_groups, nb)
    with _single_thread(x.device, size <= _SMALL_OPS):  # the rest works on the (G, nb) histogram
        if bool(((cnt > 0).sum(1) <= k).any()):
            return None
        one = torch.ones_like(bw)
        pts = torch.where(bw > 0, bs / torch.where(bw > 0, bw, one), sx / cnt.clamp(min=1))
        # empty bins weigh nothing; placing them at the running maximum keeps the points sorted
        pts = torch.where(cnt > 0, pts, pts[cnt > 0].min())
        pts = torch.cummax(pts, 1).values.contiguous()
        sq = torch.where(bw > 0, bs * bs / torch.where(bw > 0, bw, one), torch.zeros_like(bw))
        pref = _Prefix(torch.cumsum(bw, 1), torch.cumsum(bs, 1), torch.cumsum(sq, 1))
        return _kmeans(pts, pref, k, iters), _Bins(idx, rmin, nb, shift)


def _usable_weights(w: torch.Tensor) -> torch.Tensor:
    """Groups whose weights are all zero are clustered unweighted."""
    dead = w.sum(1, keepdim=True) <= 0
    return torch.where(dead, torch.ones_like(w), w) if bool(dead.any()) else w


class _Prefix:
    """Prefix sums (with a leading zero) of weight, weight*x and weight*x^2 along each group."""

    def __init__(self, cw: torch.Tensor | None, cs: torch.Tensor, cq: torch.Tensor):
        z = cs.new_zeros(cs.shape[0], 1)
        self.w = None if cw is None else torch.cat([z, cw], 1)
        self.s = torch.cat([z, cs], 1)
        self.q = torch.cat([z, cq], 1)

    @classmethod
    def from_points(cls, xs: torch.Tensor, ws: torch.Tensor | None) -> "_Prefix":
        x64 = xs.to(_F64)
        if ws is None:
            return cls(None, torch.cumsum(x64, 1), torch.cumsum(x64 * x64, 1))
        w64 = ws.to(_F64)
        wx = w64 * x64
        return cls(torch.cumsum(w64, 1), torch.cumsum(wx, 1), torch.cumsum(wx * x64, 1))

    @property
    def total_w(self) -> torch.Tensor:
        return self.s.new_full((self.s.shape[0], 1), self.s.shape[1] - 1.0) if self.w is None else self.w[:, -1:]

    def sums(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight, weight*x, weight*x^2) sums of points [a, b) per group; a, b (G, ...) int64."""
        shape = a.shape
        a2, b2 = a.reshape(shape[0], -1), b.reshape(shape[0], -1)
        if self.w is None:
            w = (b2 - a2).to(_F64)
        else:
            w = self.w.gather(1, b2) - self.w.gather(1, a2)
        s = self.s.gather(1, b2) - self.s.gather(1, a2)
        q = self.q.gather(1, b2) - self.q.gather(1, a2)
        return w.reshape(shape), s.reshape(shape), q.reshape(shape)


def _sse(w: torch.Tensor, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Weighted squared error of points around their mean, from their sums."""
    pos = w > 0
    return torch.where(pos, (q - s * s / torch.where(pos, w, torch.ones_like(w))).clamp(min=0), torch.zeros_like(w))


def _split_init(pts: torch.Tensor, pref: _Prefix, k: int) -> torch.Tensor:
    """Greedy divisive init: split segments at their means, the largest error reductions first.

    Each round splits a quarter of the segments (at least one; about 5 log2(K) rounds), those
    whose split at the mean lowers the squared error most; segments of equal values never split.
    """
    n_groups, p = pts.shape
    dev = pts.device
    bounds = torch.full((n_groups, k + 1), p, dtype=torch.int64, device=dev)
    bounds[:, 0] = 0
    segments = 1
    while segments < k:
        a, b = bounds[:, :-1], bounds[:, 1:]
        w, s, q = pref.sums(a, b)
        mean = s / torch.where(w > 0, w, torch.ones_like(w))
        cut = torch.searchsorted(pts, mean.to(pts.dtype), right=True)
        cut = torch.maximum(torch.minimum(cut, b), a)
        wl, sl, ql = pref.sums(a, cut)
        wr, sr, qr = pref.sums(cut, b)
        gain = _sse(w, s, q) - _sse(wl, sl, ql) - _sse(wr, sr, qr)
        gain = torch.where((wl > 0) & (wr > 0), gain, torch.full_like(gain, -1.0))
        n_new = min(max(1, int(segments * _SPLIT_FRACTION)), k - segments)
        best, j = gain.topk(n_new, 1)  # ties: topk order is deterministic for equal inputs
        new = torch.where(best >= 0, cut.gather(1, j), torch.full_like(j, p))
        bounds = torch.sort(torch.cat([bounds[:, : k + 1 - n_new], new], 1), 1).values
        segments += n_new
    a, b = bounds[:, :-1], bounds[:, 1:]
    w, s, _ = pref.sums(a, b)
    last = pts[:, -1:].to(_F64).expand_as(w)
    return torch.where(w > 0, s / torch.where(w > 0, w, torch.ones_like(w)), last)


def _dp_init(pts: torch.Tensor, pref: _Prefix, k: int) -> torch.Tensor | None:
    """Optimal K-clustering of a summary of the points, by dynamic programming.

    The sorted points are cut into m contiguous chunks, m = clamp(16 K, 256, 1024): every point
    its own chunk when there are at most m points (then the partition is the exact optimum, up
    to the fp32 cost matrix); otherwise the union of m/2 weight-quantile cuts and m/2
    equal-width cuts, so both dense regions and isolated outliers are resolved.
    D_t[i] = min_j D_{t-1}[j] + SSE(chunks j..i-1) over an (m+1)^2 cost matrix. m is also
    limited by G*m^2 <= 2^22 (memory) and K*G*m^2 <= 2^28 (time); returns None when that leaves
    fewer than 2K chunks (the split initialisation is then used alone).
    """
    n_groups, p = pts.shape
    dev = pts.device
    m = min(max(256, 16 * k), 1024, int((_DP_CELLS / n_groups) ** 0.5), int((_DP_WORK / (n_groups * k)) ** 0.5))
    if p <= m:
        cuts = torch.arange(p + 1, device=dev).expand(n_groups, p + 1)
    elif m >= 2 * k:
        half = m // 2
        frac = torch.arange(1, half, device=dev, dtype=_F64) / half
        cw = pref.w[:, 1:] if pref.w is not None else torch.arange(1, p + 1, device=dev, dtype=_F64).expand(n_groups, p)
        by_weight = torch.searchsorted(cw.contiguous(), frac * pref.total_w, right=True)
        lo, hi = pts[:, :1].to(_F64), pts[:, -1:].to(_F64)
        by_value = torch.searchsorted(pts, (lo + (hi - lo) * frac).to(pts.dtype), right=True)
        ends = torch.zeros(n_groups, 1, dtype=torch.int64, device=dev)
        cuts = torch.sort(torch.cat([ends, by_weight, by_value, ends + p], 1), 1).values
    else:
        return None
    m1 = cuts.shape[1]
    starts = cuts.unsqueeze(1).expand(n_groups, m1, m1)  # [g, i, j] -> cut j
    stops = cuts.unsqueeze(2).expand(n_groups, m1, m1)  # [g, i, j] -> cut i
    cost = _sse(*pref.sums(starts, stops)).to(torch.float32)  # [g, i, j]: one cluster, chunks j .. i-1
    later = torch.ones(m1, m1, dtype=torch.bool, device=dev).triu(1)  # j > i: impossible
    cost = cost.masked_fill_(later, float("inf"))
    best = cost[:, :, 0].clone()  # best[g, i]: one cluster over chunks 0 .. i-1
    choice = []
    total = torch.empty_like(cost)
    for _ in range(k - 1):
        best, arg = torch.add(cost, best.unsqueeze(1), out=total).min(2)
        choice.append(arg)
    i = torch.full((n_groups, 1), m1 - 1, dtype=torch.int64, device=dev)
    ends = [i]
    for arg in reversed(choice):
        i = arg.gather(1, i)
        ends.append(i)
    ends.append(torch.zeros_like(i))
    pos = cuts.gather(1, torch.cat(ends[::-1], 1))
    w, s, _ = pref.sums(pos[:, :-1], pos[:, 1:])
    last = pts[:, -1:].to(_F64).expand_as(w)
    return torch.where(w > 0, s / torch.where(w > 0, w, torch.ones_like(w)), last)


_single_thread = single_thread  # shared with the algorithms (lowbit/_threads.py)


def _kmeans(pts: torch.Tensor, pref: _Prefix, k: int, iters: int) -> torch.Tensor:
    """Weighted 1-D Lloyd on sorted points, batched over groups and initialisations.

    pts (G, P) ascending; cluster j of a table holds the points between the midpoints around
    centroid j, found with searchsorted; its sums come from the prefix sums. Returns (G, K)
    float64 ascending: per group, the result of the better of the two initialisations.
    """
    with _single_thread(pts.device, pts.shape[0] * k * 32 <= _SMALL_OPS):
        return _kmeans_impl(pts, pref, k, iters)


def _kmeans_impl(pts: torch.Tensor, pref: _Prefix, k: int, iters: int) -> torch.Tensor:
    n_groups = pts.shape[0]
    inits = [_split_init(pts, pref, k), _dp_init(pts, pref, k)]
    c = torch.sort(torch.stack([c for c in inits if c is not None], 1), -1).values  # (G, R, K)
    c = _lloyd(pts, pref, c, iters)
    best = torch.argmin(_error(pts, pref, c), 1)
    c = c[torch.arange(n_groups, device=pts.device), best].unsqueeze(1)  # (G, 1, K)
    err = _error(pts, pref, c)
    for _ in range(_REFINE_ROUNDS):
        new = _refine(pts, pref, c)
        if new is None:
            break
        new = _lloyd(pts, pref, new, min(iters, _POLISH_ITERS))
        new_err = _error(pts, pref, new)
        better = new_err < err
        c = torch.where(better.unsqueeze(-1), new, c)
        gain = (err - new_err) / err.clamp(min=torch.finfo(_F64).tiny)
        err = torch.minimum(new_err, err)
        if not bool((gain > _REFINE_TOL).any()):
            break
    return c.squeeze(1)


def _clusters(pts: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[start, stop) point ranges of the clusters of sorted centroids c (G, ..., K) (nearest)."""
    mid = ((c[..., :-1] + c[..., 1:]) * 0.5).to(pts.dtype)
    cut = torch.searchsorted(pts, mid.reshape(pts.shape[0], -1), right=True).reshape(mid.shape)
    zero = torch.zeros_like(cut[..., :1])
    return torch.cat([zero, cut], -1), torch.cat([cut, zero + pts.shape[1]], -1)


def _error(pts: torch.Tensor, pref: _Prefix, c: torch.Tensor) -> torch.Tensor:
    """Weighted squared error of the points to their nearest centroid in c (G, ..., K)."""
    w, s, q = pref.sums(*_clusters(pts, c))
    return (q - 2 * c * s + c * c * w).sum(-1)


def _lloyd(pts: torch.Tensor, pref: _Prefix, c: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd iterations on sorted centroids c (G, R, K) until no cluster boundary moves or no
    table's error drops by more than _LLOYD_TOL (relative) in an iteration."""
    steps = torch.tensor(_STEPS, dtype=_F64, device=pts.device).view(1, 1, -1, 1)
    k = c.shape[-1]
    prev = None
    for _ in range(iters):
        a, b = _clusters(pts, c)
        if prev is not None and torch.equal(a, prev):
            break
        prev = a
        w, s, q = pref.sums(a, b)
        pos = w > 0
        new = torch.where(pos, s / torch.where(pos, w, torch.ones_like(w)), c)
        empty = ~pos
        if bool(empty.any()):
            reseeded, moved = _reseed(new, empty, a, b, w, s, q, pts, pref)
            if moved:
                c = torch.sort(reseeded, -1).values
                prev = None  # a re-seed changes the centroids without changing the previous cut
                continue
        # the Lloyd step (length 1) or a longer step along it: 1-D Lloyd crawls along slow
        # directions, so c + t * (new - c) is tried for t in _STEPS and the best kept
        old_err = (q - 2 * c * s + c * c * w).sum(-1)  # (G, R), before this step
        cand = torch.sort(c.unsqueeze(2) + steps * (new - c).unsqueeze(2), -1).values  # (G, R, T, K)
        err, pick = _error(pts, pref, cand).min(-1)  # first minimum: the plain step on ties
        c = cand.gather(2, pick[..., None, None].expand(-1, -1, 1, k)).squeeze(2)
        if not bool(((old_err - err) > _LLOYD_TOL * old_err.abs()).any()):
            break  # no table improved by more than _LLOYD_TOL of its error
    return c


def _refine(pts: torch.Tensor, pref: _Prefix, c: torch.Tensor) -> torch.Tensor | None:
    """Best partition when each boundary may move anywhere between its two centroids.

    Boundary j (between centroids j and j+1) gets W+1 candidate positions: W evenly spaced
    values from c_j to c_{j+1} plus its current position. A chain DP over the boundaries picks
    the candidates minimising the total squared error around the cluster means, exactly, so
    the result is never worse than the current partition; it moves many boundaries at once
    where Lloyd would crawl. Returns the new centroids (G, 1, K), or None when memory
    (G * K * (W+1)^2 <= 2^22) leaves W < 8.
    """
    n_groups, _, k = c.shape
    width = min(64, int((_REFINE_CELLS / (n_groups * k)) ** 0.5) - 1)
    if width < 8:
        return None
    c = c[:, 0]
    t = torch.arange(width, device=pts.device, dtype=_F64) / (width - 1)
    values = c[:, :-1, None] + (c[:, 1:] - c[:, :-1])[:, :, None] * t  # (G, K-1, W)
    grid = torch.searchsorted(pts, values.to(pts.dtype).reshape(n_groups, -1), right=True).reshape(values.shape)
    now = _clusters(pts, c)[1][:, :-1, None]  # current boundary positions
    cand = torch.sort(torch.cat([grid, now], -1), -1).values  # (G, K-1, W+1)
    n = cand.shape[-1]
    start = cand[:, :-1, :, None].expand(-1, -1, n, n)  # boundary j-1 at u'
    stop = cand[:, 1:, None, :].expand(-1, -1, n, n)  # boundary j at u
    inner = _sse(*pref.sums(start, stop)).masked_fill_(start > stop, float("inf"))  # (G, K-2, n, n)
    zero = torch.zeros_like(cand[:, 0])
    best = _sse(*pref.sums(zero, cand[:, 0]))  # first cluster: [0, boundary 0)
    choice = []
    for j in range(k - 2):
        best, arg = (best.unsqueeze(2) + inner[:, j]).min(1)
        choice.append(arg)
    best = best + _sse(*pref.sums(cand[:, -1], zero + pts.shape[1]))  # last cluster
    u = best.argmin(1, keepdim=True)
    picks = [u]
    for arg in reversed(choice):
        u = arg.gather(1, u)
        picks.append(u)
    bounds = cand.gather(2, torch.cat(picks[::-1], 1).unsqueeze(-1)).squeeze(-1)  # (G, K-1)
    a = torch.cat([zero[:, :1], bounds], 1)
    b = torch.cat([bounds, zero[:, :1] + pts.shape[1]], 1)
    w, s, _ = pref.sums(a, b)
    new = torch.where(w > 0, s / torch.where(w > 0, w, torch.ones_like(w)), c)
    return torch.sort(new, -1).values.unsqueeze(1)


def _reseed(c, empty, a, b, w, s, q, pts, pref) -> tuple[torch.Tensor, bool]:
    """Move one empty centroid per table to the upper half of the worst cluster (split at its mean).

    Returns the centroids and whether any moved (nothing can move when every non-empty cluster
    holds a single value, e.g. a group with fewer distinct values than entries).
    """
    n_groups, n_init, k = c.shape
    sse = torch.where(empty, torch.full_like(w, -1.0), _sse(w, s, q))
    j = sse.argmax(-1, keepdim=True)  # worst cluster
    e = empty.to(torch.int8).argmax(-1, keepdim=True)  # first empty cluster
    aj, bj, cj = a.gather(-1, j), b.gather(-1, j), c.gather(-1, j)
    cut = torch.searchsorted(pts, cj.reshape(n_groups, -1).to(pts.dtype), right=True).reshape(aj.shape)
    cut = torch.maximum(torch.minimum(cut, bj), aj)
    wl, sl, _ = pref.sums(aj, cut)
    wr, sr, _ = pref.sums(cut, bj)
    ok = empty.any(-1, keepdim=True) & (wl > 0) & (wr > 0)
    one = torch.ones_like(wl)
    lower = torch.where(ok, sl / torch.where(ok, wl, one), cj)
    upper = torch.where(ok, sr / torch.where(ok, wr, one), c.gather(-1, e))
    c = c.scatter(-1, j, lower)
    return c.scatter(-1, e, upper), bool(ok.any())


# ---------------------------------------------------------------------------------------------
# storage and assignment
# ---------------------------------------------------------------------------------------------
def _store(c: torch.Tensor, fmt: Format):
    """Round the (G, K) ascending table to its dtype; dedupe; pad with the largest entry.

    Returns (lut plane, lut_scale plane or None, fp32 values as decoded, distinct count (G,)).
    """
    if fmt.lut_dtype == "int8":
        amax = c.abs().amax(1, keepdim=True)
        ls = scales.encode_float((amax / 127).to(torch.float32), "fp16", what="LUT scale")
        ls = torch.where(ls > 0, ls, torch.ones_like(ls))  # all-zero tables (or underflow): entries 0
        stored = torch.round(c / ls.to(_F64)).clamp(-127, 127).to(torch.int8)
        values = stored.to(torch.float32) * ls.to(torch.float32)
    else:
        ls = None
        stored = scales.encode_float(c.to(torch.float32), "fp16", what="LUT entry")
        values = stored.to(torch.float32)
    n_groups, k = values.shape
    is_new = torch.ones_like(values, dtype=torch.bool)
    is_new[:, 1:] = values[:, 1:] != values[:, :-1]
    count = is_new.sum(1)
    rank = torch.cumsum(is_new, 1) - 1
    pad = torch.arange(k, device=c.device) >= count.unsqueeze(1)
    canon_stored = torch.empty_like(stored).scatter_(1, rank, stored)
    canon_stored = torch.where(pad, stored[:, -1:], canon_stored)
    canon_values = torch.where(pad, values[:, -1:], torch.empty_like(values).scatter_(1, rank, values))
    return canon_stored.contiguous(), ls, canon_values, count


def _assign(x: torch.Tensor, values: torch.Tensor, count: torch.Tensor, bins: _Bins | None = None) -> torch.Tensor:
    """Code of the nearest entry of each group's ascending table (ties to the lower code).

    code = number of midpoints between consecutive entries that lie below x. With histogram bins
    at hand this is a table lookup per bin, plus one comparison for the (at most K-1) bins a
    midpoint falls into; otherwise one comparison per midpoint (K <= 16) or a searchsorted.
    """
    n_groups, k = values.shape
    mid = (values[:, :-1].to(_F64) + values[:, 1:].to(_F64)) * 0.5
    beyond = torch.arange(k - 1, device=x.device) >= (count - 1).unsqueeze(1)
    mid = torch.where(beyond, torch.full_like(mid, float("inf")), mid).to(torch.float32).contiguous()
    if bins is not None:
        codes = _assign_by_bins(x, mid, bins)
        if codes is not None:
            return codes
    if k > 16:
        return torch.searchsorted(mid, x.contiguous(), out_int32=True).to(torch.uint8)
    if n_groups == 1:
        cuts = [m for m in mid[0].tolist() if m != float("inf")]
        if not cuts:
            return torch.zeros_like(x, dtype=torch.uint8)
        codes = (x > cuts[0]).view(torch.uint8)
        for m in cuts[1:]:
            codes.add_((x > m).view(torch.uint8))
        return codes
    codes = (x > mid[:, :1]).view(torch.uint8)
    for j in range(1, k - 1):
        codes.add_((x > mid[:, j:j + 1]).view(torch.uint8))
    return codes


def _assign_by_bins(x: torch.Tensor, mid: torch.Tensor, bins: _Bins) -> torch.Tensor | None:
    """code = below[bin] + (x > inside[bin]); None if some bin holds two or more midpoints."""
    n_groups = mid.shape[0]
    with _single_thread(x.device, n_groups * bins.nb <= _SMALL_OPS):  # per-bin tables (G, nb)
        first = ((torch.arange(bins.nb, dtype=torch.int64) + bins.rmin) << bins.shift).to(torch.int32)
        keys = torch.stack([first, first | ((1 << bins.shift) - 1)])  # a bin's lowest and highest key
        ends = (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)
        ends = torch.nan_to_num(ends)  # bit patterns past the largest float: no value falls there
        lo = ends[0].expand(n_groups, -1).contiguous()
        hi = ends[1].expand(n_groups, -1).contiguous()
        below = torch.searchsorted(mid, lo)  # midpoints < the bin's smallest value
        upto = torch.searchsorted(mid, hi, right=True)  # midpoints <= its largest
        if bool((upto - below > 1).any()):
            return None
        inside = torch.where(upto > below, mid.gather(1, below.clamp(max=mid.shape[1] - 1)),
                             torch.full_like(lo, float("inf")))
        below = below.to(torch.uint8).reshape(-1)
        inside = inside.reshape(-1)
    codes = torch.index_select(below, 0, bins.index)
    codes.add_((x.reshape(-1) > torch.index_select(inside, 0, bins.index)).view(torch.uint8))
    return codes.reshape(x.shape)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """packing.pack, with byte-aligned fast paths giving the same bytes."""
    rows, cols = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits in (1, 2, 4) and cols % (8 // bits) == 0:
        per = 8 // bits
        c = codes.to(torch.uint8).reshape(rows, cols // per, per)
        out = c[..., 0].clone()
        for i in range(1, per):
            out |= c[..., i] << (i * bits)
        return out
    return pack(codes, bits)


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """packing.unpack, with byte-aligned fast paths."""
    if bits in (1, 2, 4) and n % (8 // bits) == 0 and packed.shape[-1] * (8 // bits) == n:
        per = 8 // bits
        mask = (1 << bits) - 1
        p = packed.to(torch.uint8)
        out = torch.stack([(p >> (i * bits)) & mask for i in range(per)], -1)
        return out.reshape(*packed.shape[:-1], n)
    return unpack(packed, bits, n)
