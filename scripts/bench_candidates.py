"""Time fitting k = 2..10 together (fitMultiple: shared EM passes) against one by one.

    env -u OPENBLAS_CORETYPE .venv/bin/python scripts/bench_candidates.py [--rows 500000] [--dims 8]
"""

import argparse
import os
import sys
import time

import numpy as np
import pyarrow as pa
from pyspark.ml.tuning import ParamGridBuilder
from pyspark.sql import SparkSession

from spark_gmm import GaussianMixture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dims", type=int, default=8)
    parser.add_argument("--true-k", type=int, default=6)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--spread", type=float, default=3.0, help="scale of the true centres")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors run this interpreter
    spark = SparkSession.builder.master(args.master).config("spark.ui.enabled", "false").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=args.spread, size=(args.true_k, args.dims))
    x = centers[rng.integers(args.true_k, size=args.rows)] + rng.normal(size=(args.rows, args.dims))
    offsets = pa.array(np.arange(0, x.size + 1, args.dims, dtype=np.int32))
    table = pa.table({"features": pa.ListArray.from_arrays(offsets, pa.array(x.ravel()))})
    df = spark.createDataFrame(table).repartition(4).cache()
    df.count()

    estimator = GaussianMixture(seed=1, maxIter=100, tol=args.tol)
    estimator.copy({estimator.k: 2, estimator.maxIter: 1}).fit(df)  # warm up workers and caches
    grid = ParamGridBuilder().addGrid(estimator.k, list(range(2, 11))).build()
    began = time.perf_counter()
    together = dict(estimator.fitMultiple(df, grid))
    shared = time.perf_counter() - began
    began = time.perf_counter()
    alone = [estimator.copy(param_map).fit(df) for param_map in grid]
    separate = time.perf_counter() - began
    same = all(np.array_equal(together[i].means, m.means) for i, m in enumerate(alone))
    passes = sum(m.summary.numIter + 1 for m in alone)
    print(f"{args.rows} rows × {args.dims} features, k = 2..10 ({len(grid)} candidates, {passes} EM passes one by one)")
    print(f"together (fitMultiple, shared passes): {shared:.1f} s")
    print(f"one by one:                            {separate:.1f} s   ({separate / shared:.2f}× the shared time)")
    print(f"identical models: {same}")
    for i, m in enumerate(alone):
        print(f"  k={m.getK():2d}: {m.summary.numIter:3d} iterations, BIC {m.bic(df):.6g}")


if __name__ == "__main__":
    main()
