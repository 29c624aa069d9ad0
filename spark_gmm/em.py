"""The EM loop, written once against an abstract `reduce(pass) -> array`.

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
from .initialisation import initial_mixture_steps, run_passes
from .mixture import (
    ComponentStatistics,
    Mixture,
    gaussians_from_moments,
    challengers,
    m_step,
    regularisation_allowance,
    split_component,
)

log = logging.getLogger("spark_gmm")

Reduce = Callable[[object], np.ndarray]

#: Round-off budget of one iteration's change of the mean log-likelihood, relative to its size:
#: float64 sums of float64 densities, or float64 sums of float32 densities.
ROUNDOFF = {"float64": 1e-10, "float32": 1e-5}
#: A component that explains less than this many (average-weight) rows is dead: empty, or
#: collapsed onto a single row. With `reseed`, it is restarted by splitting another component.
DEAD_ROWS = 2.0
#: Where EM converges, the lightest component is tried on splits of this many heaviest ones, and
#: this many closest pairs of components are tried re-split (see `mixture.challengers`).
DONORS, PAIRS = 3, 2
#: EM steps a challenger may take to overtake the converged mixture; after the first, only the
#: `KEPT` best go on.
CHALLENGE_STEPS, KEPT = 3, 2



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
    challengers: list = field(default_factory=list)  # (mixture, (a, b), what) beside the converged one
    refined: list = field(default_factory=list)  # the challengers EM steps further, to compare
    challenge_step: int = 0  # EM steps the refined challengers have taken

    def to_evaluate(self) -> list[Mixture]:
        """The mixtures the next pass evaluates: the current one and, once EM has converged,
        challengers (see `mixture.challengers`) while the budget of k restarts lasts; after that
        pass, the challengers EM steps further, alone."""
        s, settings = self.state, self.settings
        if self.refined:
            return [c[0] for c in self.refined]
        self.challengers = []
        if s.finishing and settings.reseed and settings.reg_covar > 0 and len(s.reseeded) < settings.k:
            self.challengers = challengers(s.mixture, settings.covariance_type, settings.reg_covar, DONORS, PAIRS)
        return [s.mixture] + [c[0] for c in self.challengers]

    def _challenge(self, evaluated: list[ComponentStatistics], total_weight: float) -> ComponentStatistics | None:
        """Take the pass's statistics of the refined challengers: if the best beats the converged
        mixture by more than `tol` per row (less is what the stop rule calls converged) it becomes
        the current one (its statistics are returned); else the `KEPT` best go one more EM step, up
        to `CHALLENGE_STEPS`, after which the fit has converged."""
        s, settings = self.state, self.settings
        refined, self.refined = self.refined, []
        order = sorted(
            (i for i in range(len(refined)) if np.isfinite(evaluated[i].log_likelihood)),
            key=lambda i: -evaluated[i].log_likelihood,
        )
        gain = evaluated[order[0]].log_likelihood - s.history[-1] if order else 0.0
        if gain > max(settings.tol * total_weight, ROUNDOFF[settings.dtype] * abs(s.history[-1])):
            mixture, (a, b), change = refined[order[0]]
            log.info(
                "%sconverged at iteration %d; %s gains %.3g per row after %d EM step(s): EM goes on",
                self.label, s.iteration, change, gain / total_weight, self.challenge_step,
            )
            s.mixture, s.finishing = mixture, False
            s.reseeded.append((s.iteration, a, b))
            s.empty = [j for j in s.empty if j not in (a, b)]
            return evaluated[order[0]]
        if self.challenge_step >= CHALLENGE_STEPS or not order:
            self.done, self.stop_reason = True, "converged"
            return None
        self.challenge_step += 1
        self.refined = [self._stepped(evaluated[i], refined[i]) for i in order[:KEPT]]
        return None

    def _stepped(self, stats: ComponentStatistics, challenger: tuple) -> tuple:
        """`challenger` one EM step further, from its statistics."""
        mixture, changed, change = challenger
        return m_step(stats, mixture, self.settings.reg_covar, self.settings.covariance_type)[0], changed, change

    def observe(self, evaluated: list[ComponentStatistics], total_weight: float, seconds: float) -> None:
        """Take the pass's statistics of `to_evaluate()`'s mixtures: record them, then stop or step."""
        s, iteration, settings = self.state, self.state.iteration, self.settings
        if not self.refined:
            stats = evaluated[0]
        elif (stats := self._challenge(evaluated, total_weight)) is None:
            return
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
        if s.finishing and self.challengers:  # one EM step for each; the next pass compares them
            self.refined = [
                self._stepped(each, challenger)
                for each, challenger in zip(evaluated[1:], self.challengers)
                if np.isfinite(each.log_likelihood)
            ]
            self.challengers, self.challenge_step = [], 1
            if not self.refined:
                self.done, self.stop_reason = True, "converged"
        elif s.finishing:  # the pass evaluated the M-step taken after convergence
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
    """Indices (m,) of the components explaining fewer than DEAD_ROWS average rows of the pass
    behind `stats`."""
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

    def evaluate(group: list[_Candidate], label: str, mixtures: list[list[Mixture]]) -> list[list[ComponentStatistics]]:
        if describe:
            describe(label)
        estep = kernels.EStepPass([m for each in mixtures for m in each])
        flat = iter(estep.split(reduce(estep)))
        return [[next(flat) for _ in each] for each in mixtures]

    while active := [c for c in candidates if not c.done]:
        iteration = max(c.state.iteration for c in active)
        began = time.perf_counter()
        label = f"EM iteration {iteration}" + (f" ({len(active)} candidates)" if len(candidates) > 1 else "")
        for candidate, stats in zip(active, evaluate(active, label, [c.to_evaluate() for c in active])):
            candidate.observe(stats, total_weight, time.perf_counter() - began)
        reverted = [c for c in active if c.revert]
        if reverted:  # rare: their statistics are those of the kept parameters
            kept = evaluate(reverted, "EM: parameters kept", [[c.state.mixture] for c in reverted])
            for candidate, (stats,) in zip(reverted, kept):
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
