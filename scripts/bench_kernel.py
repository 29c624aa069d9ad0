"""The E-step kernel alone on one core: the compiled, fused kernel (`spark_gmm.fused`) against the
numpy kernels (`EStepPass.reference_statistics`), the flop floor and the memory-bandwidth floor,
over the same blocks as the engines cut (`block_rows_for`), measured side by side.

    .venv/bin/python scripts/bench_kernel.py                       # 1M rows, the grid below
    .venv/bin/python scripts/bench_kernel.py --rows 200000 --case 16x8

Flop floor: the arithmetic any formulation needs, 2·k·d(d+1) flops a row (the triangular
Mahalanobis product and the packed second moments, a multiply and an add each), at the measured
one-core dgemm rate. Memory floor: the block's bytes read once, at the measured one-core read rate
(the faster of a large sum and a large copy). `exp s`: the k exponentials a row needs alone, in the
kernel's own vectorised exp (`fused.exp_nonpositive`, tile by tile), against the memory floor: at
small d that per-row work, not reading the rows, bounds the kernel. Also prints the compile cost of a
fresh process, with an empty numba cache and with a warm one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

CASES = [(2, 5), (10, 5), (16, 8), (50, 8)]


def one_core_rates():
    """(dgemm GFLOP/s, read GB/s) of this process on one thread."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        a = np.random.default_rng(0).normal(size=(1024, 1024))
        a @ a
        gemm = min(_timed(lambda: a @ a) for _ in range(5))
        big = np.ones(50_000_000)
        out = np.empty_like(big)
        summed = min(_timed(big.sum) for _ in range(5))
        copied = min(_timed(lambda: np.copyto(out, big)) for _ in range(5))
    return 2 * 1024**3 / gemm / 1e9, max(big.nbytes / summed, 2 * big.nbytes / copied) / 1e9


def _timed(f) -> float:
    began = time.perf_counter()
    f()
    return time.perf_counter() - began


def exp_seconds(rows, k, repeats):
    """Seconds of the kernel's exp over rows × k values in tiles of `fused.TILE_ROWS` (the values
    are refilled before each tile, as the kernel writes them; the refill alone is subtracted)."""
    from numba import njit

    from spark_gmm import fused

    tile = fused.TILE_ROWS

    @njit
    def exps(values, source, scale, apply):
        for i in range(values.shape[0]):
            values[i] = source[i]
            if apply:
                fused.exp_nonpositive(values[i], tile, scale, scale.view(np.int64))

    source = -np.random.default_rng(0).uniform(0, 30, (max(rows * k // tile, 1), tile))
    values, scale = np.empty_like(source), np.empty(tile)
    exps(values, source, scale, True)
    both = min(_timed(lambda: exps(values, source, scale, True)) for _ in range(repeats))
    refill = min(_timed(lambda: exps(values, source, scale, False)) for _ in range(repeats))
    return max(both - refill, 0.0)


def blocks_of(rows, d, k, dtype, rng):
    from spark_gmm.blocks import block_rows_for
    from spark_gmm.mixture import Mixture

    a = rng.normal(size=(k, d, d))
    mixture = Mixture.from_covariances(
        rng.uniform(0.5, 1.0, k), rng.normal(0, 2, (k, d)), a @ np.swapaxes(a, 1, 2) / d + np.eye(d)
    )
    step = block_rows_for(d)
    x = (mixture.means[rng.integers(0, k, rows)] + rng.normal(size=(rows, d))).astype(dtype)
    return mixture, [x[s : s + step] for s in range(0, rows, step)]


def compile_seconds() -> tuple[float, float]:
    """(first E-step and scoring call in a fresh process with an empty cache, the same again)."""
    code = (
        "import time, numpy as np\n"
        "began = time.perf_counter()\n"
        "from spark_gmm import fused\n"
        "from spark_gmm.mixture import Mixture\n"
        "m = Mixture.from_covariances(np.ones(2), np.zeros((2, 3)), np.tile(np.eye(3), (2, 1, 1)))\n"
        "for dtype in (np.float64, np.float32):\n"
        "    x = np.zeros((10, 3), dtype)\n"
        "    fused.statistics(x, None, None, m); fused.statistics(x, np.zeros(3), np.ones(10), m)\n"
        "fused.posterior(np.zeros((10, 3)), m)\n"
        "print(time.perf_counter() - began)\n"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        run = lambda: float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)  # noqa: E731
        return run(), run()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--case", action="append", help="DIMSxK, repeatable")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cases = [tuple(int(v) for v in c.split("x")) for c in args.case] if args.case else CASES

    from threadpoolctl import threadpool_limits

    from spark_gmm import fused
    from spark_gmm.kernels import EStepPass

    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} on {os.cpu_count()} cores")
    cold, warm = compile_seconds()
    print(f"compile on first use: {cold:.2f} s with an empty numba cache, {warm:.2f} s from the cache")
    gemm, bandwidth = one_core_rates()
    print(f"one core: dgemm {gemm:.1f} GFLOP/s, read {bandwidth:.1f} GB/s; {args.rows} rows, best of {args.repeats}")
    print(
        f"{'d':>3} {'k':>3} {'dtype':>7} | {'numpy s':>8} {'fused s':>8} {'speed-up':>8} | "
        f"{'flop fl':>8} {'mem fl':>8} | {'fused/flop':>10} {'fused/mem':>9} {'numpy/flop':>10} | "
        f"{'exp s':>7} {'exp/mem':>7}"
    )
    rng = np.random.default_rng(0)
    for d, k in cases:
        with threadpool_limits(1):
            exp_s = exp_seconds(args.rows, k, args.repeats)
        for dtype in (np.float64, np.float32):
            mixture, blocks = blocks_of(args.rows, d, k, dtype, rng)
            estep = EStepPass([mixture])
            with threadpool_limits(1):
                shift = np.zeros(d)  # the engines hand the kernel raw rows and the data shift
                fused.statistics(blocks[0][:10], shift, None, mixture)
                numpy_s, fused_s = np.inf, np.inf
                for _ in range(args.repeats):  # side by side, so that load hits both alike
                    numpy_s = min(numpy_s, _timed(lambda: [estep.reference_statistics(b, None) for b in blocks]))
                    fused_s = min(fused_s, _timed(lambda: [fused.statistics(b, shift, None, mixture) for b in blocks]))
            flop_floor = 2 * k * d * (d + 1) * args.rows / (gemm * 1e9)
            memory_floor = args.rows * d * np.dtype(dtype).itemsize / (bandwidth * 1e9)
            print(
                f"{d:>3} {k:>3} {np.dtype(dtype).name:>7} | {numpy_s:8.3f} {fused_s:8.3f} {numpy_s / fused_s:8.2f} | "
                f"{flop_floor:8.4f} {memory_floor:8.4f} | {fused_s / flop_floor:10.1f} {fused_s / memory_floor:9.1f} "
                f"{numpy_s / flop_floor:10.1f} | {exp_s:7.4f} {exp_s / memory_floor:7.1f}",
                flush=True,
            )
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
