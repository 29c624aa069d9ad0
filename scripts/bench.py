"""Seconds per EM iteration: spark_gmm against pyspark.ml's GaussianMixture on the same cached data.

Per-iteration time is measured as the difference between a fit of `--iters` iterations and a fit of
1 iteration, divided by `--iters - 1` (tol=0, same start), so start-up and initialisation cancel out.

    .venv/bin/python scripts/bench.py --rows 1000000 --dims 10 --k 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def make_data(spark, rows, dims, k, partitions, seed=0):
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 5, size=(k, dims)).tolist()
    df = spark.range(0, rows, numPartitions=partitions)
    comp = (F.col("id") % k).cast("int")
    cols = []
    for j in range(dims):
        center = F.element_at(F.array(*[F.lit(c[j]) for c in centers]), comp + 1)
        cols.append(center + F.randn(seed + j))
    return df.select(array_to_vector(F.array(*cols)).alias("features"))


def per_iteration(fit, iters):
    t0 = time.perf_counter()
    fit(1)
    t1 = time.perf_counter()
    fit(iters)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / (iters - 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, default=10)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--skip-mllib", action="store_true")
    args = parser.parse_args()

    from pyspark.ml.clustering import GaussianMixture as MLlibGaussianMixture
    from pyspark.sql import SparkSession

    from spark_gmm import GaussianMixture, GaussianMixtureModel

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.driver.memory", "8g")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    df = make_data(spark, args.rows, args.dims, args.k, args.partitions).cache()
    df.count()

    start = GaussianMixture(k=args.k, maxIter=0, tol=0.0, seed=1).fit(df)
    init = GaussianMixtureModel.fromArrays(start.weights, start.means, start.covariances)

    def ours(n):
        GaussianMixture(k=args.k, maxIter=n, tol=0.0).setInitialModel(init).fit(df)

    def mllib(n):
        MLlibGaussianMixture(k=args.k, maxIter=n, tol=0.0, seed=1).fit(df)

    results = {"spark_gmm": per_iteration(ours, args.iters)}
    if not args.skip_mllib:
        results["mllib"] = per_iteration(mllib, args.iters)
    print(f"rows={args.rows} dims={args.dims} k={args.k} partitions={args.partitions}")
    for name, seconds in results.items():
        print(f"{name:10s} {seconds:8.3f} s/iteration")
    if "mllib" in results:
        print(f"speed-up vs MLlib: {results['mllib'] / results['spark_gmm']:.2f}x")


if __name__ == "__main__":
    main()
