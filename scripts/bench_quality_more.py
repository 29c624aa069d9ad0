"""Fit quality beyond the panel: many components, heavy tails, rounded, skewed, mixed-scale and one-hot features.

    .venv/bin/python scripts/bench_quality_more.py            # seeds 0-2, about 30 s

The default EM loop (k-means start over all rows, restarts, challengers) runs in memory
(`spark_gmm.local`: the same passes as the Spark engines, folded over numpy blocks) against
scikit-learn's default `GaussianMixture` on the same array, each with the same seed. Both models are
scored by bench_quality's evaluator: mean log-likelihood per row and ARI against the generating
classes. Prints markdown.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from bench_quality import log_joint
from scipy.special import logsumexp
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from spark_gmm import em
from spark_gmm.local import local_reduce

DATA_SEED = 0


def mixture_rows(rng, rows, k, d, spread, tails=None):
    """Rows of k Gaussians (random means of scale `spread`, random full covariances), or of
    Student-t components with `tails` degrees of freedom; and their classes."""
    means = rng.normal(scale=spread, size=(k, d))
    shapes = rng.normal(size=(k, d, d)) / np.sqrt(d)
    labels = rng.integers(0, k, rows)
    z = rng.normal(size=(rows, d))
    if tails:
        z /= np.sqrt(rng.chisquare(tails, size=(rows, 1)) / tails)
    return means[labels] + np.einsum("nij,nj->ni", shapes[labels], z), labels


def data_sets():
    rng = np.random.default_rng(DATA_SEED)
    rounded = mixture_rows(rng, 10_000, 4, 3, 3)
    skewed = mixture_rows(rng, 10_000, 3, 3, 2)
    scaled = mixture_rows(rng, 10_000, 4, 5, 3)
    sets = {
        "k=30 in 2-D, 20,000 rows": (*mixture_rows(rng, 20_000, 30, 2, 6), 30),
        "k=50 in 5-D, 20,000 rows": (*mixture_rows(rng, 20_000, 50, 5, 4), 50),
        "Student-t (3 dof), k=5 in 4-D": (*mixture_rows(rng, 10_000, 5, 4, 3, tails=3), 5),
        "rounded to halves, k=4 in 3-D": (np.round(rounded[0] * 2) / 2, rounded[1], 4),
        "log-normal, k=3 in 3-D": (np.exp(skewed[0] / 2), skewed[1], 3),
        "scales 1e-3 … 1e5, k=4 in 5-D": (scaled[0] * [1e-3, 1, 1e3, 1e5, 10], scaled[1], 4),
    }
    # drawn last, so the sets above stay as they were: clusters beside a one-hot feature unrelated
    # to them, whose levels are constant within any component that splits on them
    for name, (x, labels) in {
        "k=3 in 2-D": mixture_rows(rng, 6_000, 3, 2, 3),
        "3 unit blobs 3 apart": unit_blobs(rng, 3_000, [[0, 0], [3, 0], [0, 3]]),
    }.items():
        unrelated = np.eye(4)[rng.integers(0, 4, len(x))]
        sets[f"{name} + an unrelated one-hot feature (4 levels)"] = (np.column_stack([x, unrelated]), labels, 3)
    return sets


def unit_blobs(rng, rows, centres):
    labels = rng.integers(0, len(centres), rows)
    return np.asarray(centres, dtype=float)[labels] + rng.normal(size=(rows, len(centres[0]))), labels


def score(x, labels, weights, means, covariances):
    joint, _ = log_joint(x, weights, means, covariances)
    return logsumexp(joint, axis=1).mean(), adjusted_rand_score(labels, joint.argmax(axis=1))


def ours(x, k, seed):
    reduce = local_reduce(x)
    settings = em.FitSettings(k=k, max_iter=100, tol=1e-3, reg_covar=1e-6, seed=seed)
    result = em.fit(reduce, x.shape[1], float(len(x)), [settings])[0]
    mixture = result.mixture.shifted(reduce.shift)
    return (mixture.weights, mixture.means, mixture.covariances), result.iterations


def sklearn(x, k, seed):
    model = GaussianMixture(k, random_state=seed).fit(x)
    return (model.weights_, model.means_, model.covariances_), model.n_iter_


def main():
    warnings.simplefilter("ignore")
    print("| data | seed | spark-gmm LL/row / ARI (iterations, s) | scikit-learn LL/row / ARI (iterations, s) |")
    print("|---|---|---|---|")
    for name, (x, labels, k) in data_sets().items():
        for seed in range(3):
            cells = []
            for fit in (ours, sklearn):
                start = time.perf_counter()
                parameters, iterations = fit(x, k, seed)
                seconds = time.perf_counter() - start
                ll, ari = score(x, labels, *parameters)
                cells.append(f"{ll:.4f} / {ari:.3f} ({iterations}, {seconds:.1f})")
            print(f"| {name} | {seed} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
