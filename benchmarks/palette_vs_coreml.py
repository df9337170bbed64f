"""lowbit `lut4` (k-means, one LUT per tensor) against coremltools 9 palettization, same matrix.

    python benchmarks/palette_vs_coreml.py            # 4096 x 4096
    python benchmarks/palette_vs_coreml.py --quick    # 1024 x 1024

The matrix: fp32 Gaussian (std 0.02, torch seed 0) with 0.1% of the entries replaced by +-0.5
outliers, as a user's fp32 model would hand it over.

coremltools is driven through its public API: a one-layer MIL program (``linear`` whose weight is
the matrix) converted with ``compute_precision=FLOAT32`` so the const stays fp32, then
``coremltools.optimize.coreml.palettize_weights`` with
``OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_tensor")``; its weight is read back
with ``decompress_weights``. Timed: the ``palettize_weights`` call only (not the conversion).
For fp32 weights coremltools 9 clusters with scikit-learn ``KMeans(init="k-means++", n_init=1,
tol=1e-2)`` (``_get_kmeans_lookup_table_and_weight``; its kmeans1d route is only taken for fp16
weights and needs the optional kmeans1d package). A second coremltools row times that internal
function alone on the same matrix, so the comparison does not hinge on MIL overhead.

Columns: weight MSE against the fp32 matrix; seconds: lowbit the fastest of --repeat runs after a
warm-up (the median is printed beside it; on a shared machine other jobs stall torch's thread
pool now and then), coremltools the fastest of --ct-repeat runs (default one; they take ~10 s);
and each row's time over lowbit's. Acceptance: lowbit's MSE <= coremltools' and lowbit >= 10x
faster. The load average is printed so a busy machine shows.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

import lowbit


def make_matrix(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=g) * 0.02
    outlier = torch.rand(n, n, generator=g) < 0.001
    sign = torch.where(torch.rand(n, n, generator=g) < 0.5, -0.5, 0.5)
    return torch.where(outlier, sign, w).contiguous()


def run_lowbit(w: torch.Tensor, repeat: int) -> tuple[float, float, float]:
    lowbit.quantize_tensor(w, "lut4")  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        qt = lowbit.quantize_tensor(w, "lut4")
        times.append(time.perf_counter() - t0)
    mse = float(((qt.dequantize().double() - w.double()) ** 2).mean())
    return mse, min(times), statistics.median(times)


def best_of(fn, repeat: int) -> tuple[float, float, float]:
    runs = [fn() for _ in range(max(1, repeat))]
    times = [sec for _, sec in runs]
    return runs[0][0], min(times), statistics.median(times)


def _quiet_coremltools():
    warnings.filterwarnings("ignore")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")
    devnull = open(os.devnull, "w")
    old = sys.stderr
    sys.stderr = devnull  # coremltools prints import-time warnings and progress bars here
    try:
        import coremltools as ct
        import coremltools.optimize as cto
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.frontend.milproto import load as milproto
        from coremltools.converters.mil.mil import types
        from coremltools.models.neural_network import quantization_utils
    finally:
        sys.stderr = old
    return ct, cto, mb, milproto, types, quantization_utils


def run_coremltools_public(w_np: np.ndarray) -> tuple[float, float]:
    ct, cto, mb, milproto, types, _ = _quiet_coremltools()
    n_out, n_in = w_np.shape

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, n_in), dtype=types.fp32)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=w_np, name="y")

    old = sys.stderr
    sys.stderr = open(os.devnull, "w")
    try:
        model = ct.convert(prog, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                           minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
        config = cto.coreml.OptimizationConfig(
            global_config=cto.coreml.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_tensor"))
        t0 = time.perf_counter()
        palettized = cto.coreml.palettize_weights(model, config)
        seconds = time.perf_counter() - t0
        dense = cto.coreml.decompress_weights(palettized)
        spec = dense.get_spec()
        program = milproto.load(spec, specification_version=spec.specificationVersion, file_weights_dir=dense.weights_dir)
    finally:
        sys.stderr = old
    got = None
    for op in program.functions["main"].operations:
        if op.op_type == "const" and tuple(op.outputs[0].shape) == w_np.shape:
            got = np.asarray(op.outputs[0].val)
    if got is None:
        raise RuntimeError("could not find the palettized weight in the coremltools model")
    if len(np.unique(got)) > 16:
        raise RuntimeError("coremltools' weight has more than 16 distinct values: not palettized?")
    return float(((got.astype(np.float64) - w_np.astype(np.float64)) ** 2).mean()), seconds


def run_coremltools_internal(w_np: np.ndarray) -> tuple[float, float]:
    *_, quantization_utils = _quiet_coremltools()
    t0 = time.perf_counter()
    lut, idx = quantization_utils._get_kmeans_lookup_table_and_weight(4, w_np)
    seconds = time.perf_counter() - t0
    got = lut.reshape(-1).astype(w_np.dtype)[np.asarray(idx).reshape(-1)].reshape(w_np.shape)
    return float(((got.astype(np.float64) - w_np.astype(np.float64)) ** 2).mean()), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1024 x 1024 instead of 4096 x 4096")
    ap.add_argument("--size", type=int, default=None, help="matrix side (overrides --quick)")
    ap.add_argument("--skip-internal", action="store_true", help="do not time coremltools' internal k-means alone")
    ap.add_argument("--repeat", type=int, default=5, help="lowbit runs after the warm-up (default 5)")
    ap.add_argument("--ct-repeat", type=int, default=1, help="coremltools runs per row (default 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads for lowbit (default: torch's)")
    args = ap.parse_args()
    n = args.size or (1024 if args.quick else 4096)

    if args.threads:
        torch.set_num_threads(args.threads)
    w = make_matrix(n)
    w_np = w.numpy().astype(np.float32)
    print(f"matrix {n}x{n} fp32: N(0, 0.02^2) + {int((w.abs() == 0.5).sum())} outliers at +-0.5; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")

    rows = [("lowbit lut4 (kmeans, per tensor)", *run_lowbit(w, args.repeat))]
    rows.append(("coremltools palettize_weights", *best_of(lambda: run_coremltools_public(w_np), args.ct_repeat)))
    if not args.skip_internal:
        rows.append(("coremltools k-means only (internal)",
                     *best_of(lambda: run_coremltools_internal(w_np), args.ct_repeat)))

    base_mse, base_s = rows[0][1], rows[0][2]
    print(f"{'method':<38} {'weight MSE':>12} {'seconds':>9} {'(median)':>9} {'x lowbit time':>14}")
    for name, mse, sec, med in rows:
        print(f"{name:<38} {mse:>12.5e} {sec:>9.3f} {med:>9.3f} {sec / base_s:>14.1f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    ok_mse = all(base_mse <= mse for _, mse, _, _ in rows[1:])
    ok_speed = all(sec >= 10 * base_s for _, _, sec, _ in rows[1:])
    print(f"lowbit MSE <= coremltools: {'yes' if ok_mse else 'NO'}; "
          f"lowbit >= 10x faster: {'yes' if ok_speed else 'NO'}")


if __name__ == "__main__":
    main()
