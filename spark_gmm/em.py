"""Initialisation and the EM loop, written once against an abstract `reduce(pass) -> array`.

`reduce` runs a pass (see `kernels`) over every block and returns the combined partials; the Spark
engines and the in-memory engine (`local`) only differ in how they implement it. `fit` is the one
entry point: one candidate or several sharing every pass, fresh or resumed from a checkpoint.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import kernels
from .exceptions import ComponentWarning
from .mixture import (
    ComponentStatistics,
    Mixture,
    gaussians_from_moments,
    m_step,
    regularisation_allowance,
    split_component,
)

log = logging.getLogger("spark_gmm")

Reduce = Callable[[object], np.ndarray]

#: Round-off budget of one iteration's change of the mean log-likelihood, relative to its size:
#: float64 sums of float64 densities, or float64 sums of float32 densities.
ROUNDOFF = {"float64": 1e-10, "float32": 1e-5}
#: Greedy k-means++ and Lloyd restarts on the k-means|| candidates (cheap: they are in memory).
LOCAL_RESTARTS = 5
#: Lloyd over all rows stops when the centres' squared move falls below this share of the mean
#: feature variance (scikit-learn's KMeans default) or after LLOYD_MAX_PASSES passes.
LLOYD_TOL = 1e-4
LLOYD_MAX_PASSES = 30
#: A component that explains less than this many (average-weight) rows is dead: empty, or
#: collapsed onto a single row. With `reseed`, it is restarted by splitting another component.
DEAD_ROWS = 2.0



@dataclass(frozen=True)
class FitSettings:
    """One candidate fit: everything the EM loop needs, picklable into a Spark closure."""

    k: int
    max_iter: int
    tol: float
    reg_covar: float
    seed: int
    init_mode: str = "k-means||"
    start: Mixture | None = None  # explicit start, in shifted coordinates
    covariance_type: str = "full"
    reseed: bool = True  # restart dead components (at most k times per fit)
    dtype: str = "float64"  # of the cached blocks: sets the round-off budget

    def describe(self) -> str:
        return f"k={self.k}, {self.covariance_type}"


@dataclass
class FitResult:
    mixture: Mixture  # shifted coordinates
    log_likelihood: float  # total weighted log-likelihood of `mixture`
    history: list[float]  # total log-likelihood of the parameters at each iteration
    iterations: int  # M-steps taken
    converged: bool  # |change of the mean log-likelihood| < tol between the last two iterations
    stop_reason: str  # "converged", "max-iter", or "decrease" (a numerical problem)
    cluster_sizes: list[int]  # rows whose most probable component is j, under `mixture`
    empty_components: list[int] = field(default_factory=list)  # empty in the returned mixture
    reseeded: list[tuple[int, int, int]] = field(default_factory=list)  # (iteration, component, donor)
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


def lloyd_steps(centers: np.ndarray, tol: float = LLOYD_TOL, max_passes: int = LLOYD_MAX_PASSES):
    """Lloyd's k-means over all rows from `centers`, one pass per step, until the centres move by
    less than `tol` × the data's mean feature variance (scikit-learn's rule; squared distance,
    summed over centres) or `max_passes` passes. A centre that loses all its rows stays put."""
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


@dataclass
class EMState:
    """EM after `iteration` M-steps: all a resumed fit needs to continue exactly like an unbroken one."""

    iteration: int
    mixture: Mixture  # the parameters the next pass evaluates
    previous: Mixture | None  # those before the last M-step (a failed step returns to them)
    history: list[float]
    seconds: list[float]
    empty: list[int]
    reseeded: list[tuple[int, int, int]] = field(default_factory=list)
    finishing: bool = False  # converged: the next pass evaluates the last M-step, then EM stops

    @classmethod
    def fresh(cls, start: Mixture) -> "EMState":
        return cls(0, start, None, [], [], [], [])

    def copy(self) -> "EMState":
        return EMState(
            self.iteration, self.mixture, self.previous, list(self.history), list(self.seconds),
            list(self.empty), list(self.reseeded), self.finishing,
        )


@dataclass
class _Candidate:
    """One candidate's EM: its settings, where it stands, and what it reports."""

    settings: FitSettings
    state: EMState
    label: str = ""  # prefixed to its messages when several candidates run together
    on_state: Callable[[EMState], None] | None = None
    done: bool = False
    stop_reason: str = "max-iter"
    stats: ComponentStatistics | None = None
    revert: bool = False  # the last pass failed the decrease test: evaluate `previous` and stop

    def observe(self, stats: ComponentStatistics, total_weight: float, seconds: float) -> None:
        """Take the pass's statistics of the current mixture: record them, then stop or step."""
        s, iteration, settings = self.state, self.state.iteration, self.settings
        if not np.isfinite(stats.log_likelihood):
            raise FloatingPointError(
                f"{self.label}log-likelihood became {stats.log_likelihood} at iteration {iteration}; "
                "check the input for extreme values or raise regCovar"
            )
        mean_ll = stats.log_likelihood / total_weight
        change = mean_ll - s.history[-1] / total_weight if s.history else None
        reseeded_here = bool(s.reseeded) and s.reseeded[-1][0] == iteration  # not an EM step
        if change is not None and not reseeded_here and change < -self._decrease_budget(mean_ll, total_weight):
            warnings.warn(
                f"{self.label}log-likelihood decreased by {-change:.3g} per row at iteration {iteration}, "
                "more than regularisation and round-off allow: a numerical problem (try dtype='float64' "
                "or a larger regCovar); stopping at the previous parameters, converged=False",
                ComponentWarning,
                stacklevel=4,
            )
            s.mixture, s.iteration = s.previous, iteration - 1
            self.revert, self.done, self.stop_reason = True, True, "decrease"
            return
        self.stats = stats
        s.history.append(stats.log_likelihood)
        s.seconds.append(seconds)
        _log_iteration(self.label, iteration, stats.log_likelihood, mean_ll, change, seconds)
        if s.finishing:  # the pass evaluated the M-step taken after convergence
            self.done, self.stop_reason = True, "converged"
        elif change is not None and not reseeded_here and abs(change) < settings.tol:
            # Like scikit-learn and MLlib, take the M-step of this pass's statistics; unlike them,
            # evaluate it, so the returned log-likelihood and sizes are those of the returned model.
            if iteration >= settings.max_iter:
                self.done, self.stop_reason = True, "converged"
            else:
                s.finishing = not self._step(stats, total_weight)
        elif iteration >= settings.max_iter:
            self.done, self.stop_reason = True, "max-iter"
        else:
            self._step(stats, total_weight)

    def _decrease_budget(self, mean_ll: float, total_weight: float) -> float:
        """How far the mean log-likelihood may fall in one step without a numerical problem: the
        regularisation's bound (see `mixture.regularisation_allowance`) plus round-off."""
        s = self.state
        allowance = regularisation_allowance(s.previous, s.mixture, self.settings.reg_covar)
        return allowance + ROUNDOFF[self.settings.dtype] * max(1.0, abs(mean_ll))

    def _step(self, stats: ComponentStatistics, total_weight: float) -> bool:
        """The M-step, then dead components restarted (or kept and reported); True if any was."""
        s, settings = self.state, self.settings
        s.previous = s.mixture
        s.mixture, newly_empty = m_step(stats, s.mixture, settings.reg_covar, settings.covariance_type)
        s.iteration += 1
        dead = _dead_components(stats, total_weight) if settings.reseed else []
        if len(dead):
            row_weight = total_weight / max(stats.hard_counts.sum(), 1.0)
            scatter = gaussians_from_moments(stats, s.previous.means, 0.0, "full")[2]
            spread = stats.resp * np.linalg.eigvalsh(scatter)[:, -1]  # mass × widest variance
            spread[dead] = -np.inf
        for j in dead:
            if len(s.reseeded) >= settings.k or not np.isfinite(spread.max()):
                break
            donor = int(np.argmax(spread))
            spread[donor] = -np.inf  # each donor splits once per step
            s.mixture = split_component(
                s.mixture, scatter[donor], donor, int(j), settings.covariance_type, settings.reg_covar
            )
            s.reseeded.append((s.iteration, int(j), donor))
            log.info(
                "%scomponent %d held %.3g rows at iteration %d; restarted by splitting component %d",
                self.label, j, stats.resp[j] / row_weight, s.iteration - 1, donor,
            )
        revived = {j for at, j, _ in s.reseeded if at == s.iteration}
        for j in sorted(set(newly_empty.tolist()) - set(s.empty) - revived):
            warnings.warn(
                f"{self.label}component {j} lost all its data at iteration {s.iteration}; it keeps its "
                "previous mean and covariance with a negligible weight (consider a smaller k)",
                ComponentWarning,
                stacklevel=4,
            )
        s.empty = sorted((set(s.empty) | set(newly_empty.tolist())) - revived)
        if self.on_state:
            self.on_state(s.copy())
        return bool(revived)

    def result(self, resumed_from: int) -> FitResult:
        s = self.state
        return FitResult(
            mixture=s.mixture,
            log_likelihood=self.stats.log_likelihood,
            history=s.history,
            iterations=s.iteration,
            converged=self.stop_reason == "converged",
            stop_reason=self.stop_reason,
            cluster_sizes=[int(c) for c in self.stats.hard_counts],
            empty_components=s.empty,
            reseeded=list(s.reseeded),
            iteration_seconds=s.seconds,
            resumed_from=resumed_from,
        )


def _dead_components(stats: ComponentStatistics, total_weight: float) -> np.ndarray:
    """Components explaining fewer than DEAD_ROWS average rows of the pass behind `stats`."""
    rows = stats.hard_counts.sum()
    return np.flatnonzero(stats.resp < DEAD_ROWS * total_weight / max(rows, 1.0))


def _log_iteration(label, iteration, ll, mean_ll, change, seconds) -> None:
    log.info(
        "%siteration %d: log-likelihood %.10g (%.6g per row, change %s), %.3f s",
        label, iteration, ll, mean_ll, "—" if change is None else f"{change:+.3g}", seconds,
    )


def _run_em(reduce: Reduce, candidates: list[_Candidate], total_weight: float, describe=None) -> None:
    """EM for every candidate at once: one pass per iteration evaluates each candidate still
    running (those that stop drop out); each takes exactly the steps it would take alone.

    Each pass evaluates the current parameters (their log-likelihood and statistics), so a
    result's log-likelihood, history and cluster sizes belong exactly to its returned mixture.
    """

    def evaluate(group: list[_Candidate], label: str) -> list[ComponentStatistics]:
        if describe:
            describe(label)
        estep = kernels.EStepPass([c.state.mixture for c in group])
        return estep.split(reduce(estep))

    while active := [c for c in candidates if not c.done]:
        iteration = max(c.state.iteration for c in active)
        began = time.perf_counter()
        label = f"EM iteration {iteration}" + (f" ({len(active)} candidates)" if len(candidates) > 1 else "")
        for candidate, stats in zip(active, evaluate(active, label)):
            candidate.observe(stats, total_weight, time.perf_counter() - began)
        reverted = [c for c in active if c.revert]
        if reverted:  # rare: their statistics are those of the kept parameters
            for candidate, stats in zip(reverted, evaluate(reverted, "EM: parameters kept")):
                candidate.stats, candidate.revert = stats, False


def fit(
    reduce: Reduce,
    d: int,
    total_weight: float,
    candidates: list[FitSettings],
    resume: EMState | None = None,
    on_state: Callable[[EMState], None] | None = None,
    describe: Callable[[str], None] | None = None,
) -> list[FitResult]:
    """Fit each candidate on the data behind `reduce` (d features, `total_weight` rows or weight):
    their initialisations in lockstep, then EM, every pass shared. Each result equals the
    candidate's fit alone. With one candidate, `resume` continues a checkpointed state and
    `on_state` sees the state after every M-step."""
    if resume is not None:
        if len(candidates) != 1:
            raise ValueError("only a single fit resumes from a checkpoint")
        log.info("resuming from iteration %d", resume.iteration)
        states = [resume.copy()]
    else:
        log.info("initialisation (%s)", _plural(candidates))
        starts = run_passes(reduce, [initial_mixture_steps(d, c) for c in candidates], describe)
        states = [EMState.fresh(start) for start in starts]
    runs = [
        _Candidate(
            c, state, label=f"candidate {i} ({c.describe()}): " if len(candidates) > 1 else "",
            on_state=on_state,
        )
        for i, (c, state) in enumerate(zip(candidates, states))
    ]
    _run_em(reduce, runs, total_weight, describe)
    return [run.result(resume.iteration if resume else 0) for run in runs]


def _plural(candidates: list[FitSettings]) -> str:
    if len(candidates) == 1:
        c = candidates[0]
        return "initial model" if c.start is not None else f"{c.init_mode}, k={c.k}"
    return f"{len(candidates)} candidates"
