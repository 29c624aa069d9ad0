"""Seconds per EM iteration of the latent class core (numpy, one process, no Spark).

    OPENBLAS_NUM_THREADS=1 .venv/bin/python scripts/bench_mixed_core.py [--rows 1000000]

The issue-14 table (4 Gaussian columns with full covariance, 20 Bernoulli, 3 categorical of
5/12/20 levels, k=8) through the in-memory engine in blocks of 4096 rows — E-step pass and M-step,
complete and with 10% missing values in every column — beside the Gaussian E-step pass of the
same rows (the 4 Gaussian columns alone, and all 27 columns as Gaussians).
"""

import argparse
import time

import numpy as np

from spark_gmm import kernels
from spark_gmm.latent import Columns, LatentClassModel, MixedEStepPass, m_step
from spark_gmm.local import local_reduce
from spark_gmm.mixture import Mixture

K, D, M, LEVELS, BLOCK_ROWS = 8, 4, 20, (5, 12, 20), 4096


def random_covariances(rng, d):
    a = rng.normal(size=(K, d, d)) * 0.3
    return a @ np.swapaxes(a, 1, 2) + np.eye(d)


def best_of(runs, work) -> float:
    seconds = []
    for _ in range(runs):
        began = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - began)
    return min(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=2, help="the best of this many runs is shown")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.rows
    gaussian = rng.normal(size=(n, D))
    bernoulli = (rng.random((n, M)) < 0.3).astype(float)
    codes = np.column_stack([rng.integers(0, levels, n) for levels in LEVELS])
    model = LatentClassModel.create(
        np.ones(K), rng.normal(size=(K, D)), random_covariances(rng, D), "full",
        rng.uniform(0.2, 0.8, (K, M)), [rng.dirichlet(np.ones(levels), size=K) for levels in LEVELS],
    )
    columns = Columns(D, M, len(LEVELS), 0)

    def holes(x, missing):
        return np.where(rng.random(x.shape) < 0.1, missing, x)

    tables = {
        "mixed, complete": columns.pack(gaussian, bernoulli, codes),
        "mixed, 10% missing in every column": columns.pack(
            holes(gaussian, np.nan), holes(bernoulli, np.nan), holes(codes, -1)
        ),
    }
    for label, rows in tables.items():
        reduce = local_reduce(rows, None, BLOCK_ROWS, np.zeros(rows.shape[1]))

        def iteration():
            estep = MixedEStepPass([model], columns)
            m_step(estep.split(reduce(estep))[0], model, 1e-6)

        print(f"{label}: {best_of(args.runs, iteration):.2f} s per iteration")
    for x in (gaussian, np.hstack([gaussian, bernoulli, codes])):
        d = x.shape[1]
        mixture = Mixture.from_covariances(np.ones(K), rng.normal(size=(K, d)), random_covariances(rng, d))
        reduce = local_reduce(x, None, BLOCK_ROWS, np.zeros(d))
        seconds = best_of(args.runs, lambda: reduce(kernels.EStepPass([mixture])))
        print(f"Gaussian E-step pass, {d} columns: {seconds:.2f} s per iteration")


if __name__ == "__main__":
    main()
