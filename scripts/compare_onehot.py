"""Why MixedMixture exists: the latent class model against one-hot encoding into a Gaussian mixture.

    env -u OPENBLAS_CORETYPE .venv/bin/python scripts/compare_onehot.py [--rows 20000] [--seed 1]

A table of `--rows` rows drawn from k=4 latent classes: 2 numeric columns (class means one standard
deviation apart), 8 flags and 3 categorical columns of 6, 10 and 15 levels, each with its own
distribution per class. It is fitted, all with k=4 and the same seed, by:
- `MixedMixture` over the typed columns (Gaussian, Bernoulli, categorical);
- `GaussianMixture` (spark-gmm) over the numbers, the flags as 0/1 and the categories one-hot
  encoded (`OneHotEncoder(dropLast=False)` + `VectorAssembler`): what users do today;
- MLlib's `GaussianMixture` over the same vector;
- scikit-learn's `GaussianMixture` over the same matrix (a test-only oracle, one machine).
It prints, as markdown: the ARI of each fit's classes against the true ones, the number of free
parameters, the fit's seconds (on a cached DataFrame; local[2]) and what went wrong, if anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd

K = 4
LEVELS = (6, 10, 15)
FLAGS = 8


def draw(rows: int, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """(true classes, a frame with columns x0, x1, flag0.., cat0..) drawn from K latent classes."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(K, size=rows, p=[0.4, 0.3, 0.2, 0.1])
    frame = {}
    means = rng.normal(scale=1.0, size=(K, 2))
    for j in range(2):
        frame[f"x{j}"] = means[labels, j] + rng.normal(size=rows)
    probabilities = rng.beta(0.6, 0.6, size=(K, FLAGS))
    for j in range(FLAGS):
        frame[f"flag{j}"] = (rng.random(rows) < probabilities[labels, j]).astype(int)
    for j, levels in enumerate(LEVELS):
        table = rng.dirichlet(np.full(levels, 0.5), size=K)
        cumulative = table.cumsum(axis=1)[labels]
        codes = (rng.random(rows)[:, None] > cumulative).sum(axis=1).clip(max=levels - 1)
        frame[f"cat{j}"] = np.char.add(f"c{j}_", codes.astype(str))
    return labels, pd.DataFrame(frame)


def gaussian_parameters(d: int) -> int:
    return (K - 1) + K * d + K * d * (d + 1) // 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    from pyspark.ml import Pipeline
    from pyspark.ml.clustering import GaussianMixture as MLlibGaussianMixture
    from pyspark.ml.feature import OneHotEncoder, StringIndexer, VectorAssembler
    from pyspark.sql import SparkSession
    from sklearn.metrics import adjusted_rand_score
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    from spark_gmm import GaussianMixture, MixedMixture

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").config("spark.sql.shuffle.partitions", "4")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    labels, frame = draw(args.rows)
    numbers, flags = ["x0", "x1"], [f"flag{j}" for j in range(FLAGS)]
    categories = [f"cat{j}" for j in range(len(LEVELS))]
    df = spark.createDataFrame(frame.assign(id=np.arange(args.rows))).repartition(2).cache()
    encode = Pipeline(stages=[
        StringIndexer(inputCols=categories, outputCols=[f"{c}_index" for c in categories], stringOrderType="alphabetAsc"),
        OneHotEncoder(inputCols=[f"{c}_index" for c in categories], outputCols=[f"{c}_hot" for c in categories],
                      dropLast=False),
        VectorAssembler(inputCols=numbers + flags + [f"{c}_hot" for c in categories], outputCol="features"),
    ])
    onehot = encode.fit(df).transform(df).select("id", "features").cache()
    d = 2 + FLAGS + sum(LEVELS)
    matrix = np.column_stack([frame[numbers + flags].to_numpy(float)]
                             + [pd.get_dummies(frame[c]).to_numpy(float) for c in categories])
    assert matrix.shape[1] == d
    df.count(), onehot.count()

    def timed(fit):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            began = time.perf_counter()
            try:
                result = fit()
            except Exception as error:  # noqa: BLE001 - reported as the method's outcome
                return None, time.perf_counter() - began, f"failed: {str(error).splitlines()[0][:120]}"
            seconds = time.perf_counter() - began
        notes = "; ".join(sorted({w.category.__name__ for w in caught}))
        return result, seconds, notes

    def predicted(model, data):
        rows = model.transform(data).select("id", "prediction").toPandas().sort_values("id")
        return rows["prediction"].to_numpy()

    results = []
    mixed, seconds, notes = timed(lambda: MixedMixture(
        k=K, seed=args.seed, gaussianCols=numbers, bernoulliCols=flags, categoricalCols=categories).fit(df))
    results.append(("spark-gmm MixedMixture (typed columns)", len(frame.columns),
                    mixed.numParameters if mixed else "", mixed and predicted(mixed, df), seconds, notes))
    ours, seconds, notes = timed(lambda: GaussianMixture(k=K, seed=args.seed).fit(onehot))
    results.append(("spark-gmm GaussianMixture (one-hot)", d, gaussian_parameters(d),
                    ours and predicted(ours, onehot), seconds, notes))
    mllib, seconds, notes = timed(lambda: MLlibGaussianMixture(k=K, seed=args.seed).fit(onehot))
    results.append(("MLlib GaussianMixture (one-hot)", d, gaussian_parameters(d),
                    mllib and predicted(mllib, onehot), seconds, notes))
    sk, seconds, notes = timed(lambda: SkGaussianMixture(K, random_state=args.seed).fit(matrix))
    results.append(("scikit-learn GaussianMixture (one-hot)", d, gaussian_parameters(d),
                    sk and sk.predict(matrix), seconds, notes))

    print(f"{args.rows:,} rows from {K} latent classes: 2 numeric columns, {FLAGS} flags, "
          f"{len(LEVELS)} categorical columns of {'/'.join(map(str, LEVELS))} levels; k={K}, seed {args.seed}, local[2]\n")
    print("| method | features | parameters | ARI | seconds | notes |")
    print("|---|---|---|---|---|---|")
    for name, features, parameters, prediction, seconds, notes in results:
        ari = "" if prediction is None else f"{adjusted_rand_score(labels, prediction):.3f}"
        print(f"| {name} | {features} | {parameters} | {ari} | {seconds:.1f} | {notes} |")
    spark.stop()


if __name__ == "__main__":
    main()
