#!/usr/bin/env python3
"""Write a sample data set drawn from a known Gaussian mixture, and its true parameters.

    python scripts/make_data.py --out out/demo/data.parquet [--rows 200000] [--k 4] [--dims 5]
                                [--seed 7] [--separation 2] [--offset 0] [--files 4]

Writes a Parquet data set (a directory of --files part files, readable by Spark or any Parquet
reader) with columns `id` (long), `component` (int: the component that generated the row, for
checking a fit; not a feature) and `f0` … `f{d-1}` (double), and next to it `<name>.truth.json`:
k, dims, rows, seed, the true weights, means and covariances (row-major d×d), how many rows each
component generated, the Bayes error, and the feature column names. Reruns replace both. Needs numpy
and pyarrow only.

The mixture is meant to show EM at work: its clusters overlap, so a start from k-means is not yet
the maximum-likelihood fit and EM needs several iterations. The means are drawn at least
`--separation` apart (Euclidean) in a box around `--offset`; each covariance is a random rotation
of per-axis standard deviations drawn from [0.4, 2.0] (elongated shapes) times a per-component size
from [0.7, 1.4]; the weights are proportional to 1, 2, …, k in random order (unequal sizes). The
Bayes error is the share of rows that even the true mixture assigns to a component other than the
one that generated them: a measure of the overlap (2% with the defaults; 1–14% for other seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_int, default=200_000, help="rows to draw (default 200000)")
    parser.add_argument("--k", type=positive_int, default=4, help="mixture components (default 4)")
    parser.add_argument("--dims", type=positive_int, default=5, help="features f0..f{d-1} (default 5)")
    parser.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    parser.add_argument("--out", default="out/sample.parquet", help="output Parquet directory")
    parser.add_argument("--files", type=positive_int, default=4, help="Parquet part files (default 4)")
    parser.add_argument("--offset", type=float, default=0.0,
                        help="add this to every feature (e.g. 1e6 for data far from the origin)")
    parser.add_argument("--separation", type=float, default=2.0,
                        help="minimum distance between true means (default 2: overlapping clusters; "
                             "8 or more: well apart)")
    return parser.parse_args(argv)


def truth_path(out: str) -> str:
    stem = out.rstrip("/")
    if stem.endswith(".parquet"):
        stem = stem[: -len(".parquet")]
    return stem + ".truth.json"


#: Per-axis standard deviations of a component before its size factor: up to 5:1 elongation.
AXIS_STD = (0.4, 2.0)
#: Each component's overall size factor, so that components differ in spread as well as shape.
SIZE = (0.7, 1.4)


def random_mixture(rng: np.random.Generator, k: int, d: int, separation: float, offset: float):
    """Weights, means and covariances of a mixture whose means are `separation` apart."""
    weights = rng.permutation(np.arange(1.0, k + 1))
    weights /= weights.sum()
    # A box large enough to place k points `separation` apart; grow it if rejection stalls.
    half = separation * max(1.0, k ** (1.0 / d))
    means = np.empty((k, d))
    placed = 0
    attempts = 0
    while placed < k:
        candidate = rng.uniform(-half, half, d)
        if placed == 0 or np.min(np.linalg.norm(means[:placed] - candidate, axis=1)) >= separation:
            means[placed] = candidate
            placed += 1
        attempts += 1
        if attempts % 1000 == 0:
            half *= 1.5
    covariances = np.empty((k, d, d))
    for j in range(k):
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        scales = rng.uniform(*AXIS_STD, d) * rng.uniform(*SIZE)
        covariances[j] = (q * scales**2) @ q.T
        covariances[j] = (covariances[j] + covariances[j].T) / 2
    return weights, means + offset, covariances


def draw(rng, n, weights, means, covariances):
    """n rows of the mixture and the component that generated each."""
    k, d = means.shape
    labels = rng.choice(k, size=n, p=weights)
    x = np.empty((n, d))
    for j in range(k):
        rows = np.flatnonzero(labels == j)
        if len(rows):
            chol = np.linalg.cholesky(covariances[j])
            x[rows] = means[j] + rng.standard_normal((len(rows), d)) @ chol.T
    return x, labels


def most_likely_component(x, weights, means, covariances) -> np.ndarray:
    """For each row, the component with the highest posterior probability under the mixture."""
    scores = np.empty((len(x), len(weights)))
    for j in range(len(weights)):
        chol = np.linalg.cholesky(covariances[j])
        z = np.linalg.solve(chol, (x - means[j]).T)  # Mahalanobis: |L⁻¹(x - μ)|²
        scores[:, j] = np.log(weights[j]) - np.log(np.diag(chol)).sum() - 0.5 * (z * z).sum(axis=0)
    return scores.argmax(axis=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    k, d, n = args.k, args.dims, args.rows
    root = np.random.SeedSequence(args.seed)
    param_seed, *file_seeds = root.spawn(1 + args.files)
    weights, means, covariances = random_mixture(
        np.random.default_rng(param_seed), k, d, args.separation, args.offset
    )
    names = [f"f{i}" for i in range(d)]
    out = args.out.rstrip("/")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".make_data-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700
    counts = np.zeros(k, dtype=np.int64)
    misassigned = 0
    bounds = np.linspace(0, n, args.files + 1).astype(np.int64)
    try:
        for i in range(args.files):
            start, stop = int(bounds[i]), int(bounds[i + 1])
            x, labels = draw(np.random.default_rng(file_seeds[i]), stop - start, weights, means, covariances)
            counts += np.bincount(labels, minlength=k)
            misassigned += int((most_likely_component(x, weights, means, covariances) != labels).sum())
            columns = {"id": pa.array(np.arange(start, stop, dtype=np.int64)),
                       "component": pa.array(labels.astype(np.int32))}
            columns.update({name: pa.array(x[:, c]) for c, name in enumerate(names)})
            pq.write_table(pa.table(columns), os.path.join(staging, f"part-{i:05d}.parquet"))
        if os.path.isdir(out) and not os.path.islink(out):
            shutil.rmtree(out)
        elif os.path.lexists(out):
            os.remove(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    truth = {
        "data": os.path.abspath(out),
        "rows": n,
        "k": k,
        "dims": d,
        "seed": args.seed,
        "offset": args.offset,
        "features": names,
        "weights": weights.tolist(),
        "means": means.tolist(),
        "covariances": [c.ravel().tolist() for c in covariances],
        "counts": counts.tolist(),
        "bayesError": misassigned / n,
    }
    with open(truth_path(out), "w") as f:
        json.dump(truth, f, indent=2)
        f.write("\n")
    print(f"wrote {n} rows (k={k}, {d} features) to {out} and the true parameters to {truth_path(out)}")
    print(f"overlap: the true mixture itself assigns {misassigned / n:.1%} of the rows to a component "
          "other than the one that drew them (the Bayes error)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
