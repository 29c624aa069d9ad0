"""Initialisation and the EM loop, written once against an abstract `reduce(pass) -> array`.

`reduce` runs a pass (see `kernels`) over every block and returns the combined partials; the Spark
engines and the in-memory reference engine only differ in how they implement it.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import kernels
from .mixture import ComponentStatistics, Mixture, gaussians_from_moments, m_step

log = logging.getLogger("spark_gmm")

Reduce = Callable[[object], np.ndarray]

#: A relative drop of the mean log-likelihood larger than this ends the fit at the previous
#: parameters: EM cannot decrease it, so anything more than round-off is a numerical problem.
DECREASE_TOLERANCE = 1e-10


#: Greedy k-means++ and Lloyd restarts on the k-means|| candidates (cheap: they are in memory).
LOCAL_RESTARTS = 5


class ComponentWarning(UserWarning):
    """Something happened to a component during the fit (it emptied, or was repaired)."""


@dataclass(frozen=True)
class FitSettings:
    """Everything an engine needs to run a fit, picklable into a Spark closure."""

    k: int
    max_iter: int
    tol: float
    reg_covar: float
    seed: int
    init_mode: str = "k-means||"
    start: Mixture | None = None  # explicit start, in shifted coordinates
    covariance_type: str = "full"


@dataclass
class FitResult:
    mixture: Mixture  # shifted coordinates
    log_likelihood: float  # total weighted log-likelihood of `mixture`
    history: list[float]  # total log-likelihood of the parameters at each iteration
    iterations: int  # M-steps taken
    converged: bool
    cluster_sizes: list[int]  # rows whose most probable component is j, under `mixture`
    empty_components: list[int] = field(default_factory=list)
    iteration_seconds: list[float] = field(default_factory=list)  # wall time of each EM pass
    resumed_from: int = 0  # the iteration a resumed fit started from (0: a fresh fit)


def _local_kmeans_pp(points, weights, k, rng) -> np.ndarray:
    """Greedy weighted k-means++ on a small in-memory candidate set.

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


# Initialisation is written as generators of passes: each `yield pass_` hands a pass to the driver
# and receives its reduced partials. `run_passes` drives one generator, or several in lockstep (the
# candidates of a multi-fit), combining their pending passes into one pass over the data.


def kmeans_parallel_steps(d: int, k: int, seed: int, rounds: int = 2, oversampling: float | None = None):
    """k-means|| (Bahmani et al.): a few sampling passes, then k-means++ and Lloyd on the candidates.

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
    """k distinct rows chosen uniformly at random (independently of partitioning)."""
    pick = kernels.SmallestUniformPass(d, k, seed, stream=0)
    rows = pick.rows((yield pick))[:, 1:]
    if len(rows) < k:
        raise ValueError(f"k={k} but the data has only {len(rows)} distinct points; lower k")
    return rows


def mixture_from_centers_steps(centers: np.ndarray, reg_covar: float, covariance_type: str = "full"):
    """Weights and covariances of the hard assignment of the data to `centers` (one pass)."""
    k, d = centers.shape
    stats = ComponentStatistics.unpack((yield kernels.HardAssignmentPass(centers)), k, d)
    weights, means, covariances, lonely = gaussians_from_moments(stats, centers, reg_covar, covariance_type)
    if lonely.any():  # a centre nobody is closest to: give it the pooled covariance
        filled = ~lonely
        covariances[lonely] = np.average(covariances[filled], axis=0, weights=stats.resp[filled])
        means[lonely] = centers[lonely]
    return Mixture.from_covariances(weights, means, covariances, reg_covar)


def initial_mixture_steps(d: int, settings: "FitSettings"):
    """The start of EM: `settings.start`, or `initMode` on the data, then one assignment pass."""
    if settings.start is not None:
        return settings.start
    if settings.init_mode == "random":
        centers = yield from random_center_steps(d, settings.k, settings.seed)
    else:
        centers = yield from kmeans_parallel_steps(d, settings.k, settings.seed)
    return (yield from mixture_from_centers_steps(centers, settings.reg_covar, settings.covariance_type))


def run_passes(reduce: Reduce, generators: list) -> list:
    """Drive pass generators to their return values: one pass over the data per round, shared by
    every generator with a pass pending (each gets exactly the result it would get alone)."""
    results, pending = [None] * len(generators), {}

    def advance(i, value):
        try:
            pending[i] = generators[i].send(value)
        except StopIteration as done:
            results[i] = done.value
            pending.pop(i, None)

    for i in range(len(generators)):
        advance(i, None)
    while pending:
        order = sorted(pending)
        if len(order) == 1:
            outputs = [reduce(pending[order[0]])]
        else:
            joint = kernels.ConcatPass([pending[i] for i in order])
            outputs = joint.split(reduce(joint))
        for i, output in zip(order, outputs):
            advance(i, output)
    return results


@dataclass
class EMState:
    """EM after `iteration` M-steps: all a resumed fit needs to continue exactly like an unbroken one."""

    iteration: int
    mixture: Mixture  # the parameters the next pass evaluates
    previous: Mixture | None  # those before the last M-step (the decrease guard returns to them)
    history: list[float]
    seconds: list[float]
    empty: list[int]

    @classmethod
    def fresh(cls, start: Mixture) -> "EMState":
        return cls(0, start, None, [], [], [])


@dataclass
class EMRun:
    """One candidate's EM: its settings, where it stands, and what it reports."""

    state: EMState
    max_iter: int
    tol: float
    reg_covar: float
    covariance_type: str = "full"
    label: str = ""  # prefixed to its messages when several candidates run together
    on_state: Callable[[EMState], None] | None = None
    done: bool = False
    converged: bool = False
    stats: ComponentStatistics | None = None
    revert: bool = False  # the last pass lowered the log-likelihood: evaluate `previous` and stop

    def observe(self, stats: ComponentStatistics, total_weight: float, seconds: float, on_iteration) -> None:
        """Take the pass's statistics of the current mixture: stop, or make the M-step."""
        s, iteration = self.state, self.state.iteration
        mean_ll = stats.log_likelihood / total_weight
        if not np.isfinite(stats.log_likelihood):
            raise FloatingPointError(
                f"{self.label}log-likelihood became {stats.log_likelihood} at iteration {iteration}; "
                "check the input for extreme values or raise regCovar"
            )
        change = mean_ll - s.history[-1] / total_weight if s.history else None
        if change is not None and change < -DECREASE_TOLERANCE * max(1.0, abs(mean_ll - change)):
            warnings.warn(
                f"{self.label}log-likelihood decreased by {-change:.3g} per row at iteration {iteration} "
                "(round-off or regularisation); keeping the previous parameters",
                ComponentWarning,
                stacklevel=3,
            )
            s.mixture, s.iteration = s.previous, iteration - 1
            self.revert = self.done = self.converged = True
            return
        self.stats = stats
        s.history.append(stats.log_likelihood)
        s.seconds.append(seconds)
        if on_iteration:
            on_iteration(self.label, iteration, stats.log_likelihood, change, seconds)
        if change is not None and abs(change) < self.tol:
            self.done = self.converged = True
            return
        if iteration >= self.max_iter:
            self.done = True
            return
        s.previous = s.mixture
        s.mixture, newly_empty = m_step(stats, s.mixture, self.reg_covar, self.covariance_type)
        s.iteration += 1
        for j in set(newly_empty.tolist()) - set(s.empty):
            warnings.warn(
                f"{self.label}component {j} lost all its data at iteration {s.iteration}; it keeps its "
                "previous mean and covariance with a negligible weight (consider a smaller k)",
                ComponentWarning,
                stacklevel=3,
            )
        s.empty = sorted(set(s.empty) | set(newly_empty.tolist()))
        if self.on_state:
            self.on_state(EMState(s.iteration, s.mixture, s.previous, list(s.history), list(s.seconds), s.empty))

    def result(self, resumed_from: int) -> FitResult:
        s = self.state
        return FitResult(
            mixture=s.mixture,
            log_likelihood=self.stats.log_likelihood,
            history=s.history,
            iterations=s.iteration,
            converged=self.converged,
            cluster_sizes=[int(c) for c in self.stats.hard_counts],
            empty_components=s.empty,
            iteration_seconds=s.seconds,
            resumed_from=resumed_from,
        )


def run_em_together(
    reduce: Reduce,
    runs: list[EMRun],
    total_weight: float,
    on_iteration=None,
    describe: Callable[[str], None] | None = None,
) -> list[FitResult]:
    """EM for several candidates at once: one pass per iteration evaluates every candidate still
    running (those that converge drop out). Each candidate takes exactly the steps it would take
    alone, so its result is the same as `run_em`'s.

    Each pass evaluates the current parameters (their log-likelihood and sufficient statistics), so
    the returned log-likelihood, history and cluster sizes belong exactly to the returned mixture.
    """
    resumed = [run.state.iteration for run in runs]
    for run in runs:  # the caller's state objects are not modified
        s = run.state
        run.state = EMState(s.iteration, s.mixture, s.previous, list(s.history), list(s.seconds), list(s.empty))

    def evaluate(group: list[EMRun], label: str) -> list[ComponentStatistics]:
        if describe:
            describe(label)
        estep = kernels.EStepPass([run.state.mixture for run in group])
        return estep.split(reduce(estep))

    while active := [run for run in runs if not run.done]:
        iteration = max(run.state.iteration for run in active)
        began = time.perf_counter()
        label = f"EM iteration {iteration}" + (f" ({len(active)} candidates)" if len(runs) > 1 else "")
        for run, stats in zip(active, evaluate(active, label)):
            run.observe(stats, total_weight, time.perf_counter() - began, on_iteration)
        reverted = [run for run in active if run.revert]
        if reverted:  # rare: their statistics are those of the kept parameters
            for run, stats in zip(reverted, evaluate(reverted, "EM: parameters kept")):
                run.stats, run.revert = stats, False
    return [run.result(start) for run, start in zip(runs, resumed)]


def run_em(
    reduce: Reduce,
    state: EMState,
    total_weight: float,
    max_iter: int,
    tol: float,
    reg_covar: float,
    on_iteration=None,
    on_state: Callable[[EMState], None] | None = None,
    describe: Callable[[str], None] | None = None,
    covariance_type: str = "full",
) -> FitResult:
    """EM from `state` until the mean log-likelihood changes by less than `tol` or `max_iter` M-steps.
    `on_iteration(label, iteration, ll, change, seconds)` sees each pass, `on_state` the state after
    every M-step (to checkpoint it), `describe` names each pass."""
    run = EMRun(state, max_iter, tol, reg_covar, covariance_type, on_state=on_state)
    return run_em_together(reduce, [run], total_weight, on_iteration, describe)[0]


def initial_mixture(reduce: Reduce, d: int, settings: FitSettings, describe=None) -> Mixture:
    """The start of EM for one fit (see `initial_mixture_steps`)."""
    if describe and settings.start is None:
        describe(f"initialisation ({settings.init_mode}, k={settings.k})")
    return run_passes(reduce, [initial_mixture_steps(d, settings)])[0]


def _reporter(total_weight: float):
    def report(label, iteration, ll, change, seconds):
        log.info(
            "%siteration %d: log-likelihood %.10g (%.6g per row, change %s), %.3f s",
            label, iteration, ll, ll / total_weight, "—" if change is None else f"{change:+.3g}", seconds,
        )

    return report


def fit_mixture(
    reduce: Reduce,
    d: int,
    total_weight: float,
    settings: FitSettings,
    resume: EMState | None = None,
    on_state: Callable[[EMState], None] | None = None,
    describe: Callable[[str], None] | None = None,
) -> FitResult:
    """Initialise (unless `resume` is given), then run EM: the whole fit, engine-agnostic."""
    if resume is not None:
        log.info("resuming from iteration %d", resume.iteration)
    state = resume or EMState.fresh(initial_mixture(reduce, d, settings, describe))
    return run_em(
        reduce, state, total_weight, settings.max_iter, settings.tol, settings.reg_covar,
        _reporter(total_weight), on_state, describe, settings.covariance_type,
    )


def fit_together(
    reduce: Reduce, d: int, total_weight: float, candidates: list[FitSettings], describe=None
) -> list[FitResult]:
    """Several candidate fits on the same data, every pass shared: the initialisations run in
    lockstep, then EM for all of them. Results equal one-by-one `fit_mixture`s."""
    if describe:
        describe(f"initialisation ({len(candidates)} candidates)")
    starts = run_passes(reduce, [initial_mixture_steps(d, c) for c in candidates])
    runs = [
        EMRun(
            EMState.fresh(start), c.max_iter, c.tol, c.reg_covar, c.covariance_type,
            label=f"candidate {i} (k={c.k}, {c.covariance_type}): ",
        )
        for i, (c, start) in enumerate(zip(candidates, starts))
    ]
    return run_em_together(reduce, runs, total_weight, _reporter(total_weight), describe)
