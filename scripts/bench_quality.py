"""Fit quality on a panel of data sets: does the default fit reach the best answer?

    env -u OPENBLAS_CORETYPE .venv/bin/python scripts/bench_quality.py          # full panel
    .venv/bin/python scripts/bench_quality.py --quick                           # smoke run
    .venv/bin/python scripts/bench_quality.py --datasets overlap,digits --seed 3 --json out.json

For every data set (k known) it fits spark-gmm's default, spark-gmm with nInit=5, scikit-learn's
default (a test-only oracle) and MLlib's default, all with the same seed, and, as a reference, runs
scikit-learn's EM from the true labels' moments (the optimum a perfect start reaches). Every model is
scored by ONE numpy evaluator from its weights, means and covariances: mean log-likelihood per row
on the data, ARI of its most probable components against the true labels, and the number of
degenerate components (most probable for fewer than d + 1 rows: a covariance those rows cannot
determine). Seconds time the fit only, on a cached DataFrame (or the numpy array).

A data set passes when spark-gmm default's LL/row ≥ scikit-learn's − 0.01 and its ARI ≥
scikit-learn's − 0.01 (with --repeat, for every seed). The output is markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.linalg import solve_triangular
from scipy.special import logsumexp

#: The data are drawn from this seed whatever --seed is, so seeds vary only the fits.
DATA_SEED = 0
#: Margin of the verdicts, in nats per row and in ARI.
MARGIN = 0.01
#: Eigenvalue floor used only to predict with a model whose covariance is not positive definite
#: (MLlib adds no regulariser); such a model's log-likelihood is reported as singular.
PREDICT_FLOOR = 1e-6
METHODS = ("spark-gmm default", "spark-gmm nInit=5", "scikit-learn default", "MLlib default")
REFERENCE = "reference: EM from true labels"


@dataclass
class Dataset:
    name: str
    description: str
    x: np.ndarray
    labels: np.ndarray
    k: int


# ---------------------------------------------------------------------------------- the panel


def _blobs(rng, centers, rows, weights=None, scales=None):
    """Rows from Gaussians at `centers` (unit covariance, or the matrices `scales` applied)."""
    k, d = centers.shape
    labels = rng.choice(k, size=rows, p=weights)
    z = rng.normal(size=(rows, d))
    if scales is not None:
        z = np.einsum("nij,nj->ni", scales[labels], z)
    return centers[labels] + z, labels


def _spread_centers(rng, k, d, distance):
    """k random centres whose expected pairwise distance is `distance` (well apart in any d)."""
    return rng.normal(size=(k, d)) * distance / np.sqrt(2 * d)


def _triangle(side):
    return side * np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])


def overlap(rng, rows, offset=0.0):
    x, y = _blobs(rng, _triangle(2.8), rows)
    return x + offset, y


def separated(rng, rows):
    return _blobs(rng, 8.0 * np.array([[0, 0], [1, 0], [2, 0], [0.5, 1], [1.5, 1]]), rows)


def unequal(rng, rows):
    """Three large clusters and a 1% one between them: k-means' start tends to split a large one."""
    centers = np.array([[0.0, 0.0], [7.0, 0.0], [0.0, 7.0], [3.5, 3.5]])
    return _blobs(rng, centers, rows, weights=[0.50, 0.30, 0.19, 0.01])


def elongated(rng, rows):
    """Four 10:1 clusters (sd 4 and 0.4) at different angles, two of them parallel and 3 apart."""
    angles = np.array([0.3, 0.3, 1.3, 1.9])
    rotations = np.stack([[[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]] for a in angles])
    scales = rotations @ np.diag([4.0, 0.4])
    return _blobs(rng, np.array([[0.0, 0.0], [0.0, 3.0], [6.0, -2.0], [6.0, 2.0]]), rows, scales=scales)


def singleton(rng, rows):
    """Four unit blobs 8 apart plus 0.2% background rows from a Gaussian of sd 200 (its own class).

    The true model (4 blobs + a broad background component) is the best one, but every D²-weighted
    seeding (k-means++, k-means||) is drawn to the far, isolated background rows: a centre there
    owns one or a few rows, so EM starts with singleton components and two blobs under one
    component, and stays there (scikit-learn's default does on most seeds).
    """
    background = max(4, rows // 500)
    centers = 8.0 * np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x, y = _blobs(rng, centers, rows - background)
    far = centers.mean(axis=0) + 200.0 * rng.normal(size=(background, 2))
    return np.vstack([x, far]), np.concatenate([y, np.full(background, 4)])


def _sklearn_set(loader):
    from sklearn.preprocessing import StandardScaler

    data = loader()
    return StandardScaler().fit_transform(data.data), data.target


def panel(quick: bool) -> dict[str, callable]:
    """Short name → builder of a Dataset (built lazily so --datasets skips the others)."""
    from sklearn import datasets as skd

    scale = 5 if quick else 1
    big, small = 20_000 // scale, 5_000 // scale

    def synthetic(text, k, make, rows):
        return lambda name: Dataset(name, text, *make(np.random.default_rng(DATA_SEED), rows), k)

    def bundled(text, loader):
        def build(name):
            x, y = _sklearn_set(loader)
            return Dataset(name, text, x, y, len(np.unique(y)))
        return build

    def spread(d):
        return lambda rng, n: _blobs(rng, _spread_centers(rng, 5, d, 8.0), n)

    builders = {
        "overlap": synthetic("3 unit blobs in 2-D, centres 2.8 apart", 3, overlap, big),
        "overlap-offset": synthetic("the same, every feature + 1e7", 3,
                                    lambda rng, n: overlap(rng, n, offset=1e7), big),
        "separated": synthetic("5 unit blobs in 2-D, centres ≥ 8 apart", 5, separated, big),
        "blobs30": synthetic("5 unit blobs in 30-D, centres ~8 apart", 5, spread(30), small),
        "blobs100": synthetic("5 unit blobs in 100-D, centres ~8 apart", 5, spread(100), small),
        "unequal": synthetic("4 unit blobs in 2-D, weights 50/30/19/1%", 4, unequal, big),
        "elongated": synthetic("4 rotated 10:1 clusters in 2-D", 4, elongated, big),
        "singleton": synthetic("4 unit blobs + 0.2% far background (sd 200)", 5, singleton, big),
        "iris": bundled("iris, standardised", skd.load_iris),
        "wine": bundled("wine, standardised", skd.load_wine),
        "breast-cancer": bundled("breast cancer, standardised", skd.load_breast_cancer),
        "digits": bundled("digits (8×8), standardised", skd.load_digits),
    }
    return {name: (lambda build=build, name=name: build(name)) for name, build in builders.items()}


# ---------------------------------------------------------------------------- the evaluator


def log_joint(x, weights, means, covariances):
    """(n, k) log(wⱼ N(x | μⱼ, Σⱼ)) by Cholesky, and whether every Σⱼ was positive definite
    (a Σⱼ that is not is floored at PREDICT_FLOOR, for predictions only)."""
    n, d = x.shape
    out = np.empty((n, len(weights)))
    definite = True
    for j, (w, mu, cov) in enumerate(zip(weights, means, covariances)):
        try:
            lower = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            definite = False
            values, vectors = np.linalg.eigh((cov + cov.T) / 2)
            lower = np.linalg.cholesky((vectors * np.maximum(values, PREDICT_FLOOR)) @ vectors.T)
        z = solve_triangular(lower, (x - mu).T, lower=True)
        log_det = 2 * np.log(np.abs(np.diag(lower))).sum()
        out[:, j] = np.log(w) - 0.5 * (d * np.log(2 * np.pi) + log_det + (z * z).sum(axis=0))
    return out, definite


def evaluate(data: Dataset, weights, means, covariances) -> dict:
    """Mean log-likelihood per row, ARI against the true labels and degenerate components."""
    from sklearn.metrics import adjusted_rand_score

    weights, means, covariances = (np.asarray(a, dtype=np.float64) for a in (weights, means, covariances))
    if not (np.isfinite(weights).all() and np.isfinite(means).all() and np.isfinite(covariances).all()):
        return {"ll": None, "ari": None, "degenerate": None, "note": "non-finite parameters"}
    joint, definite = log_joint(data.x, weights, means, covariances)
    predicted = joint.argmax(axis=1)
    sizes = np.bincount(predicted, minlength=len(weights))
    return {
        "ll": float(logsumexp(joint, axis=1).mean()) if definite else None,
        "ari": float(adjusted_rand_score(data.labels, predicted)),
        "degenerate": int((sizes < data.x.shape[1] + 1).sum()),
        "note": "" if definite else "singular covariance",
    }


# ------------------------------------------------------------------------------ the methods


def label_moments(data: Dataset, reg_covar=1e-6):
    """Weights, means and covariances (+ reg_covar) of the true classes."""
    classes = np.unique(data.labels)
    parts = [data.x[data.labels == c] for c in classes]
    weights = np.array([len(p) for p in parts]) / len(data.x)
    means = np.array([p.mean(axis=0) for p in parts])
    eye = np.eye(data.x.shape[1])
    covariances = np.array([np.atleast_2d(np.cov(p.T, bias=True)) + reg_covar * eye for p in parts])
    return weights, means, covariances


def fit_sklearn(data, seed, start=None):
    from sklearn.mixture import GaussianMixture

    if start is None:
        estimator = GaussianMixture(n_components=data.k, random_state=seed)
    else:
        weights, means, covariances = start
        estimator = GaussianMixture(n_components=data.k, random_state=seed, weights_init=weights,
                                    means_init=means, precisions_init=np.linalg.inv(covariances))
    began = time.perf_counter()
    model = estimator.fit(data.x)
    seconds = time.perf_counter() - began
    params = (model.weights_, model.means_, model.covariances_)
    return params, model.n_iter_, bool(model.converged_), seconds, ""


def fit_spark_gmm(df, data, seed, n_init):
    from spark_gmm import GaussianMixture

    extra = {"nInit": n_init} if n_init > 1 else {}  # the default fit sets nothing but k and seed
    estimator = GaussianMixture(k=data.k, seed=seed, **extra)
    began = time.perf_counter()
    model = estimator.fit(df)
    seconds = time.perf_counter() - began
    s = model.summary
    note = f"empty {s.emptyComponents}" if s.emptyComponents else ""
    return (model.weights, model.means, model.covariances), s.numIter, s.converged, seconds, note


def fit_mllib(df, data, seed):
    from pyspark.ml.clustering import GaussianMixture

    began = time.perf_counter()
    model = GaussianMixture(k=data.k, seed=seed).fit(df)
    seconds = time.perf_counter() - began
    rows = model.gaussiansDF.collect()
    params = (model.weights, [r["mean"].toArray() for r in rows], [r["cov"].toArray() for r in rows])
    return params, model.summary.numIter, None, seconds, ""


def run(method, fit) -> dict:
    """One fit, scored; a failure becomes a row that says so (first line of the error)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            params, iterations, converged, seconds, note = fit()
        except Exception as error:  # noqa: BLE001 — a failing method is a result, not a crash
            first = (str(error).strip().splitlines() or [""])[0][:120]
            return {"method": method, "error": f"{type(error).__name__}: {first}"}
    kinds = sorted({w.category.__name__ for w in caught})
    return {"method": method, "iterations": iterations, "converged": converged, "seconds": seconds,
            "note": "; ".join(filter(None, [note] + kinds)), "params": params}


def fit_all(spark, data: Dataset, seeds) -> list[dict]:
    """Every method for every seed on one cached DataFrame, scored alike; then the reference."""
    df = to_dataframe(spark, data.x).cache()
    df.count()
    results = []
    try:
        for seed in seeds:
            fits = {
                METHODS[0]: lambda: fit_spark_gmm(df, data, seed, 1),
                METHODS[1]: lambda: fit_spark_gmm(df, data, seed, 5),
                METHODS[2]: lambda: fit_sklearn(data, seed),
                METHODS[3]: lambda: fit_mllib(df, data, seed),
            }
            results += [dict(run(method, fit), seed=seed) for method, fit in fits.items()]
    finally:
        df.unpersist()
    reference = run(REFERENCE, lambda: fit_sklearn(data, seeds[0], label_moments(data)))
    results.append(dict(reference, seed=None))
    for r in results:
        if "params" in r:
            scored = evaluate(data, *r.pop("params"))
            r["note"] = "; ".join(filter(None, [r["note"], scored.pop("note")]))
            r.update(scored)
    return results


def to_dataframe(spark, x):
    """A `features` vector column holding the rows of x, in order."""
    import pyarrow as pa
    from pyspark.ml.functions import array_to_vector

    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
    table = pa.table({"features": pa.ListArray.from_arrays(offsets, pa.array(x.ravel()))})
    return spark.createDataFrame(table).select(array_to_vector("features").alias("features"))


# ---------------------------------------------------------------------------------- reporting


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def _cell(values, spec, worst=min):
    """One seed: the value; several: mean [worst]."""
    present = [v for v in values if v is not None]
    if not present:
        return "singular" if values else "—"
    if len(values) == 1:
        return _fmt(present[0], spec)
    return f"{format(np.mean(present), '.1f' if spec == 'd' else spec)} [{format(worst(present), spec)}]"


def _diff(a: dict, b: dict, key: str):
    """a[key] − b[key], or None when either is missing (a failed fit, a singular model)."""
    return None if a.get(key) is None or b.get(key) is None else a[key] - b[key]


def verdict(results: list[dict]) -> dict:
    """Pass (every seed): default ≥ scikit-learn − MARGIN in LL/row and in ARI. MLlib better (any
    seed): its LL/row or ARI above the default's + MARGIN. Gaps are the worst seed's."""
    by = {(r["method"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results if r["seed"] is not None})
    ll_gaps, ari_gaps, mllib_better = [], [], False
    for seed in seeds:
        ours, sk, ml = (by[m, seed] for m in (METHODS[0], METHODS[2], METHODS[3]))
        ll_gaps.append(_diff(ours, sk, "ll"))
        ari_gaps.append(_diff(ours, sk, "ari"))
        ahead = (_diff(ml, ours, "ll"), _diff(ml, ours, "ari"))
        mllib_better |= any(g is not None and g > MARGIN for g in ahead)
    known = None not in ll_gaps + ari_gaps
    ours_ll = [by[METHODS[0], s].get("ll") for s in seeds]
    reference = by.get((REFERENCE, None), {})
    return {"pass": known and min(ll_gaps) >= -MARGIN and min(ari_gaps) >= -MARGIN,
            "mllib_better": mllib_better,
            "ll_gap": min(ll_gaps) if known else None, "ari_gap": min(ari_gaps) if known else None,
            "to_reference": None if None in ours_ll else _diff({"ll": min(ours_ll)}, reference, "ll")}


def markdown(rows: list[tuple[Dataset, list[dict], dict]]) -> str:
    lines = ["| data | method | LL/row | ARI | iterations | seconds | degenerate | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for data, results, _ in rows:
        label = f"**{data.name}**: {data.description} ({len(data.x)}×{data.x.shape[1]}, k={data.k})"
        for method in METHODS + (REFERENCE,):
            failed = [r for r in results if r["method"] == method and "error" in r]
            group = [r for r in results if r["method"] == method and "error" not in r]
            if not group:
                lines.append(f"| {label} | {method} | failed | | | | | {failed[0]['error']} |")
            else:
                iters = [r["iterations"] for r in group]
                unconverged = sum(r["converged"] is False for r in group)
                notes = "; ".join(sorted({r["note"] for r in group if r["note"]})
                                  + [f"seed {r['seed']} failed: {r['error']}" for r in failed])
                lines.append(
                    f"| {label} | {method} | {_cell([r['ll'] for r in group], '.4f')} "
                    f"| {_cell([r['ari'] for r in group], '.3f')} "
                    f"| {'/'.join(map(str, iters))}{' (not converged)' * bool(unconverged)} "
                    f"| {_cell([r['seconds'] for r in group], '.1f', max)} "
                    f"| {_cell([r['degenerate'] for r in group], 'd', max)} | {notes} |")
            label = ""
    lines += ["", "| data | default − sklearn LL/row | default − sklearn ARI | pass | MLlib better "
                  "| default − reference LL/row |", "|---|---|---|---|---|---|"]
    for data, _, v in rows:
        lines.append(f"| {data.name} | {_fmt(v['ll_gap'], '+.4f')} | {_fmt(v['ari_gap'], '+.3f')} "
                     f"| {'yes' if v['pass'] else '**no**'} | {'**yes**' if v['mllib_better'] else 'no'} "
                     f"| {_fmt(v['to_reference'], '+.4f')} |")
    passed = [data.name for data, _, v in rows if v["pass"]]
    better = [data.name for data, _, v in rows if v["mllib_better"]]
    lines += ["", f"**{len(passed)} of {len(rows)} data sets pass** (spark-gmm default's LL/row ≥ "
                  f"scikit-learn's − {MARGIN} and ARI ≥ scikit-learn's − {MARGIN}); failing: "
                  f"{', '.join(sorted(set(d.name for d, _, _ in rows) - set(passed))) or 'none'}; "
                  f"MLlib better on: {', '.join(better) or 'none'}."]
    return "\n".join(lines)


def environment(args, seeds) -> str:
    import pyspark
    import sklearn

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (f"spark-gmm at {commit}, pyspark {pyspark.__version__}, scikit-learn {sklearn.__version__}, "
            f"local[2]; seeds {seeds}{', --quick' if args.quick else ''}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def warm_up(spark):
    """Start the Python workers and the JVM code paths of both Spark libraries, outside every timing."""
    from pyspark.ml.clustering import GaussianMixture as MLlibGaussianMixture

    from spark_gmm import GaussianMixture

    df = to_dataframe(spark, np.random.default_rng(DATA_SEED).normal(size=(500, 2))).cache()
    GaussianMixture(k=2, maxIter=2).fit(df)
    MLlibGaussianMixture(k=2, maxIter=2).fit(df)
    df.unpersist()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", help="comma-separated short names (default: the whole panel)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every fit (default 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="seeds seed..seed+N-1; cells show mean [worst]; a pass needs every seed")
    parser.add_argument("--quick", action="store_true", help="a fifth of the synthetic rows (smoke run)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    builders = panel(args.quick)
    names = args.datasets.split(",") if args.datasets else list(builders)
    unknown = [n for n in names if n not in builders]
    if unknown:
        parser.error(f"unknown data set(s) {unknown}; choose from {list(builders)}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    seeds = list(range(args.seed, args.seed + args.repeat))

    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors run this interpreter
    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").config("spark.driver.memory", "4g")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    warm_up(spark)

    began = time.perf_counter()
    rows = []
    for name in names:
        data = builders[name]()
        results = fit_all(spark, data, seeds)
        rows.append((data, results, verdict(results)))
        print(f"{name}: done ({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
    print(f"Fit quality, {environment(args, seeds)}; whole run {time.perf_counter() - began:.0f} s.\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([{"data": d.name, "description": d.description, "rows": len(d.x), "dims": d.x.shape[1],
                        "k": d.k, "results": r, "verdict": v} for d, r, v in rows], out, indent=1)
    spark.stop()


if __name__ == "__main__":
    main()
