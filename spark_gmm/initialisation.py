"""Where EM starts: k-means|| seeds, Lloyd's k-means over all rows, random rows, or a given
mixture — written as generators of passes, so candidates fitted together share every pass.

Each `yield pass_` hands a pass to `run_passes` and receives its reduced partials; `run_passes`
drives one generator, or several in lockstep, combining their pending passes into one pass over
the data. Every random choice is a function of the row values and the seed, so the start does not
depend on how the data is partitioned. No Spark here.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import kernels
from .mixture import ComponentStatistics, Mixture, gaussians_from_moments

if TYPE_CHECKING:
    from .em import FitSettings

log = logging.getLogger("spark_gmm")

Reduce = Callable[[object], np.ndarray]

#: Greedy k-means++ and Lloyd restarts on the k-means|| candidates (cheap: they are in memory).
LOCAL_RESTARTS = 5
#: Lloyd over all rows stops when the centres' squared move falls below this share of the mean
#: feature variance (scikit-learn's KMeans default) or after LLOYD_MAX_PASSES passes.
LLOYD_TOL = 1e-4
LLOYD_MAX_PASSES = 30


def _local_kmeans_pp(points, weights, k, rng) -> np.ndarray:
    """k centres (k, d) by greedy weighted k-means++ on a small in-memory candidate set: `points`
    (m, d) with `weights` (m,).

    Each new centre is the best of 2 + ln k D²-weighted draws (the one that lowers the potential
    most), which avoids the two-centres-in-one-cluster starts that plain k-means++ often makes.
    """
    trials = 2 + int(np.log(k))
    centers = [points[rng.choice(len(points), p=weights / weights.sum())]]
    dist = ((points - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        mass = weights * dist
        if mass.sum() <= 0:
            raise ValueError(f"k={k} but the data has fewer than {k} distinct points")
        draws = rng.choice(len(points), size=trials, p=mass / mass.sum())
        options = [np.minimum(dist, ((points - points[i]) ** 2).sum(axis=1)) for i in draws]
        best = int(np.argmin([weights @ option for option in options]))
        centers.append(points[draws[best]])
        dist = options[best]
    return np.array(centers)


def _local_lloyd(points, weights, centers, iterations=30) -> np.ndarray:
    """Lloyd's k-means on in-memory `points` (m, d) with `weights` (m,) from `centers` (k, d),
    until no centre moves or for `iterations` steps: the centres (k, d)."""
    for _ in range(iterations):
        index, _ = kernels.nearest(points, centers)
        mass = np.bincount(index, weights=weights, minlength=len(centers))
        sums = np.zeros_like(centers)
        np.add.at(sums, index, points * weights[:, None])
        moved = np.where(mass[:, None] > 0, sums / np.maximum(mass, 1e-300)[:, None], centers)
        if np.allclose(moved, centers, rtol=0, atol=0):
            break
        centers = moved
    return centers


def kmeans_parallel_steps(d: int, k: int, seed: int, rounds: int = 2, oversampling: float | None = None):
    """k-means|| (Bahmani et al.): a few sampling passes, then k-means++ and Lloyd on the candidates;
    returns k centres (k, d) in shifted coordinates.

    Every random choice is a function of the row values and the seed, so the centres do not depend
    on how the data is partitioned.
    """
    oversampling = oversampling or 2.0 * k
    first = kernels.SmallestUniformPass(d, 1, seed, stream=0)
    candidates = first.rows((yield first))[:, 1:]
    stream = 1
    while True:
        for _ in range(rounds):
            cost = float((yield kernels.CostPass(candidates))[0])
            if cost <= 0:
                break
            sample = kernels.SamplePass(candidates, cost, oversampling, seed, stream)
            stream += 1
            new = sample.rows((yield sample))[:, 1:]
            candidates = np.unique(np.vstack([candidates, new]), axis=0)
        if len(candidates) >= k or cost <= 0 or stream > 20 * rounds:
            break
    if len(candidates) < k:
        raise ValueError(
            f"k={k} but the data has only {len(candidates)} distinct points; lower k"
        )
    mass = yield kernels.ClosestWeightPass(candidates)
    keep = mass > 0
    candidates, mass = candidates[keep], mass[keep]
    if len(candidates) < k:
        raise ValueError(f"k={k} but the data has only {len(candidates)} distinct points; lower k")
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(LOCAL_RESTARTS):
        centers = _local_lloyd(candidates, mass, _local_kmeans_pp(candidates, mass, k, rng))
        cost = mass @ kernels.nearest(candidates, centers)[1]
        if cost < best_cost:
            best, best_cost = centers, cost
    return best


def random_center_steps(d: int, k: int, seed: int):
    """k distinct rows (k, d) chosen uniformly at random (independently of partitioning)."""
    pick = kernels.SmallestUniformPass(d, k, seed, stream=0)
    rows = pick.rows((yield pick))[:, 1:]
    if len(rows) < k:
        raise ValueError(f"k={k} but the data has only {len(rows)} distinct points; lower k")
    return rows


def lloyd_steps(centers: np.ndarray, tol: float = LLOYD_TOL, max_passes: int = LLOYD_MAX_PASSES):
    """Lloyd's k-means over all rows from `centers` (k, d) to new centres (k, d), one pass per
    step, until the centres move by less than `tol` × the data's mean feature variance
    (scikit-learn's rule; squared distance, summed over centres) or `max_passes` passes. A centre that loses all its rows stays put."""
    threshold = None
    for _ in range(max_passes):
        step = kernels.LloydPass(centers)
        _, mass, sums, variance = step.split((yield step))
        if threshold is None:
            threshold = tol * float(np.mean(variance))
        moved = np.where(mass[:, None] > 0, sums / np.maximum(mass, 1e-300)[:, None], centers)
        shift = float(((moved - centers) ** 2).sum())
        centers = moved
        if shift <= threshold:
            break
    return centers


def mixture_from_centers_steps(centers: np.ndarray, reg_covar: float, covariance_type: str = "full"):
    """The `Mixture` of the hard assignment of the data to `centers` (k, d): weights and
    covariances from one pass, the centres as means."""
    k, d = centers.shape
    stats = ComponentStatistics.unpack((yield kernels.HardAssignmentPass(centers)), k, d)
    weights, means, covariances, unclaimed = gaussians_from_moments(stats, centers, reg_covar, covariance_type)
    if unclaimed.any():  # a centre nobody is closest to: give it the pooled covariance
        filled = ~unclaimed
        covariances[unclaimed] = np.average(covariances[filled], axis=0, weights=stats.resp[filled])
        means[unclaimed] = centers[unclaimed]
    return Mixture.from_covariances(weights, means, covariances, reg_covar)


def initial_mixture_steps(d: int, settings: "FitSettings"):
    """The start of EM: `settings.start`, or `initMode` on the data, then one assignment pass.

    'k-means||' seeds with k-means|| and runs Lloyd over all rows (scikit-learn's k-means start);
    'k-means++' uses the seeds alone (scikit-learn's 'k-means++'); 'random' picks k distinct rows.
    """
    if settings.start is not None:
        return settings.start
    if settings.init_mode == "random":
        centers = yield from random_center_steps(d, settings.k, settings.seed)
    else:
        centers = yield from kmeans_parallel_steps(d, settings.k, settings.seed)
        if settings.init_mode == "k-means||":
            centers = yield from lloyd_steps(centers)
    return (yield from mixture_from_centers_steps(centers, settings.reg_covar, settings.covariance_type))


def run_passes(reduce: Reduce, generators: list, describe: Callable[[str], None] | None = None) -> list:
    """Drive pass generators to their return values: one pass over the data per round, shared by
    every generator with a pass pending (each gets exactly the result it would get alone). Each
    round is logged and names its Spark job through `describe`."""
    results, pending = [None] * len(generators), {}

    def advance(i, value):
        try:
            pending[i] = generators[i].send(value)
        except StopIteration as done:
            results[i] = done.value
            pending.pop(i, None)

    for i in range(len(generators)):
        advance(i, None)
    rounds = 0
    while pending:
        order = sorted(pending)
        rounds += 1
        what = ", ".join(sorted({pending[i].label for i in order}))
        if describe:
            describe(f"initialisation pass {rounds} ({what})")
        began = time.perf_counter()
        if len(order) == 1:
            outputs = [reduce(pending[order[0]])]
        else:
            joint = kernels.ConcatPass([pending[i] for i in order])
            outputs = joint.split(reduce(joint))
        log.info("initialisation pass %d (%s): %.2f s", rounds, what, time.perf_counter() - began)
        for i, output in zip(order, outputs):
            advance(i, output)
    return results
