"""Seconds per EM iteration of `MixedMixture` on Spark local[2], beside `GaussianMixture`.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_mixed.py [--rows 1000000] [--iterations 5]

The issue-14 table — 4 Gaussian columns (full covariance), 20 Bernoulli (0/1), 3 categorical
strings of 5/12/20 levels, k=8 — generated once into Parquet, then fitted complete and with 10%
of every feature column null (handleInvalid='keep'), and `GaussianMixture` (inputCols: the same 4
Gaussian columns of the same rows), each on the driver engine and on 'auto' (the resident engine
here). Each fit runs `--iterations` EM iterations; the figure is the
median of `summary.iterationSeconds` (one E-step pass over the cached blocks + the M-step), and
the fit's wall time (survey, packing, start, iterations) is printed beside it.
"""

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

from pyspark.sql import SparkSession, functions as F

from spark_gmm import GaussianMixture, MixedMixture

K, D, M, LEVELS = 8, 4, 20, (5, 12, 20)
GAUSSIAN = [f"g{i}" for i in range(D)]
BERNOULLI = [f"b{i}" for i in range(M)]
CATEGORICAL = [f"c{i}" for i in range(len(LEVELS))]


def generate(spark, rows: int, missing: float, path: str) -> None:
    """Rows of a latent class model with K classes, written to Parquet (class-dependent Gaussian
    means, Bernoulli probabilities and a favourite level per categorical column)."""
    df = spark.range(rows, numPartitions=8).withColumn("cls", F.floor(F.rand(1) * K))
    columns = {}
    for i, name in enumerate(GAUSSIAN):
        columns[name] = F.randn(2 + i) + F.col("cls") * (1.5 if i % 2 else -1.0)
    for i, name in enumerate(BERNOULLI):
        p = (F.col("cls") * (i + 3) % K + 0.5) / K
        columns[name] = (F.rand(100 + i) < p).cast("int")
    for i, (name, count) in enumerate(zip(CATEGORICAL, LEVELS)):
        favourite = (F.col("cls") * (i + 1)) % count
        level = F.when(F.rand(300 + i) < 0.6, favourite).otherwise(F.floor(F.rand(200 + i) * count))
        columns[name] = F.concat(F.lit("L"), F.lpad(level.cast("int").cast("string"), 2, "0"))
    columns = [(F.when(F.rand(400 + j) >= missing, c) if missing else c).alias(name)
               for j, (name, c) in enumerate(columns.items())]
    df.select(*columns).write.mode("overwrite").parquet(path)


def per_iteration(summary) -> float:
    return statistics.median(summary.iterationSeconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors run this interpreter
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.driver.memory", "6g")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    print(f"uptime: {os.popen('uptime').read().strip()}")
    root = tempfile.mkdtemp(prefix="bench-mixed-")
    results = []
    for missing in (0.0, 0.1):
        path = f"{root}/missing{missing}"
        generate(spark, args.rows, missing, path)
        df = spark.read.parquet(path)
        for engine in ("driver", "auto"):
            mixed = MixedMixture(k=K, gaussianCols=GAUSSIAN, bernoulliCols=BERNOULLI, categoricalCols=CATEGORICAL,
                                 maxIter=args.iterations, tol=0.0, handleInvalid="keep" if missing else "error",
                                 engine=engine)
            began = time.perf_counter()
            model = mixed.fit(df)
            results.append((f"MixedMixture, {missing:.0%} missing, engine={engine}", per_iteration(model.summary),
                            time.perf_counter() - began))
        for engine in () if missing else ("driver", "auto"):
            gmm = GaussianMixture(k=K, inputCols=GAUSSIAN, maxIter=args.iterations, tol=0.0, engine=engine)
            began = time.perf_counter()
            model = gmm.fit(df)
            results.append((f"GaussianMixture, 4 Gaussian columns, engine={engine}", per_iteration(model.summary),
                            time.perf_counter() - began))
    print(f"{args.rows} rows, k={K}, {args.iterations} iterations per fit, local[2]")
    for name, seconds, wall in results:
        print(f"{name:55s} {seconds:7.2f} s per iteration   (fit {wall:6.1f} s)")
    print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
