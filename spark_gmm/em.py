"""The EM loop, written once against an abstract `reduce(pass) -> array`.

`reduce` runs a pass (see `kernels`) over every block and returns the combined partials; the Spark
engines and the in-memory engine (`local`) only differ in how they implement it. `fit` is the one
entry point: one candidate or several sharing every pass, fresh or resumed from a checkpoint, for
any model family (`families`: Gaussian mixtures by default, `latent.LatentFamily` for mixed
features).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from . import kernels  # noqa: F401 — tests recognise the Gaussian E-step as em.kernels.EStepPass
from .exceptions import ComponentWarning, warn
from .families import GaussianFamily, ModelFamily
from .initialisation import run_passes
from .mixture import Mixture

log = logging.getLogger("spark_gmm")

Reduce = Callable[[object], np.ndarray]

#: Round-off budget of one iteration's change of the mean log-likelihood, relative to its size:
#: float64 sums of float64 densities, or float64 sums of float32 densities.
ROUNDOFF = {"float64": 1e-10, "float32": 1e-5}
#: A component that explains less than this many (average-weight) rows is dead: empty, or
#: collapsed onto a single row. With `reseed`, it is restarted by splitting another component.
DEAD_ROWS = 2.0
#: EM steps a challenger may take to overtake the converged mixture; after the first, only the
#: `KEPT` best go on.
CHALLENGE_STEPS, KEPT = 3, 2
#: Most iterations of EM under a covariance floor (`ModelFamily.floor`), whatever maxIter: a fit's
#: path does not depend on maxIter, which only says where it stops (see `checkpoint`).
FLOOR_ITERATIONS = 50


@dataclass(frozen=True)
class FitSettings:
    """One candidate fit: everything the EM loop needs, picklable into a Spark closure."""

    k: int
    max_iter: int
    tol: float
    reg_covar: float
    seed: int
    init_mode: str = "k-means||"  # Gaussian family only
    start: object | None = None  # explicit start: a model of `family` (shifted coordinates)
    covariance_type: str = "full"
    reseed: bool = True  # restart dead components (at most k times per fit), try challengers, floor a thin start
    dtype: str = "float64"  # of the cached blocks: sets the round-off budget
    family: ModelFamily = GaussianFamily()  # the kind of model; candidates fitted together share it

    def describe(self) -> str:
        return f"k={self.k}, {self.covariance_type}"


@dataclass
class FitResult:
    mixture: Mixture  # shifted coordinates; the family's model (e.g. a `LatentClassModel`)
    log_likelihood: float  # total weighted log-likelihood of `mixture`
    history: list[float]  # the family's objective (total log-likelihood) at each iteration
    iterations: int  # M-steps taken
    converged: bool  # |change of the mean objective| < tol between the last two iterations
    stop_reason: str  # "converged", "max-iter", or "decrease" (a numerical problem)
    cluster_sizes: list[int]  # rows whose most probable component is j, under `mixture`
    empty_components: list[int] = field(default_factory=list)  # empty in the returned mixture
    reseeded: list[tuple[int, int, int]] = field(default_factory=list)  # (iteration, component, donor)
    iteration_seconds: list[float] = field(default_factory=list)  # wall time of each EM pass
    resumed_from: int = 0  # the iteration a resumed fit started from (0: a fresh fit)
    floored_until: int = 0  # the iteration EM under a covariance floor ended at (0: none; see `EMState.floor`)


@dataclass
class EMState:
    """EM after `iteration` M-steps: all a resumed fit needs to continue exactly like an unbroken one."""

    iteration: int
    mixture: Mixture  # the parameters the next pass evaluates (a model of the fit's family)
    previous: Mixture | None  # those before the last M-step (a failed step returns to them)
    history: list[float]
    seconds: list[float]
    empty: list[int]
    reseeded: list[tuple[int, int, int]] = field(default_factory=list)
    finishing: bool = False  # converged: the next pass evaluates the last M-step, then EM stops
    # EM's first phase adds `floor` (d,) to regCovar (`ModelFamily.floor`) until it stops; then
    # `floor` is None and `floored_until` the iteration EM went on at regCovar from, without challengers
    floor: np.ndarray | None = None
    floored_until: int = 0

    @classmethod
    def fresh(cls, start: Mixture, floor: np.ndarray | None = None) -> "EMState":
        return cls(0, start, None, [], [], [], [], floor=floor)

    def copy(self) -> "EMState":
        return EMState(
            self.iteration, self.mixture, self.previous, list(self.history), list(self.seconds),
            list(self.empty), list(self.reseeded), self.finishing, self.floor, self.floored_until,
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
    stats: object | None = None  # the family's statistics of the last pass's kept model
    revert: bool = False  # the last pass failed the decrease test: evaluate `previous` and stop
    challengers: list = field(default_factory=list)  # (mixture, (a, b), what) beside the converged one
    refined: list = field(default_factory=list)  # the challengers EM steps further, to compare
    challenge_step: int = 0  # EM steps the refined challengers have taken

    def __post_init__(self):
        self.fit_settings = self.settings
        self.settings = self._phase_settings()

    def _phase_settings(self) -> FitSettings:
        """The settings of the phase EM is in: under a floor, regCovar + floor for FLOOR_ITERATIONS at most."""
        s, own = self.state, self.fit_settings
        if s.floor is None:
            return own
        return replace(own, reg_covar=own.reg_covar + s.floor, max_iter=min(own.max_iter, FLOOR_ITERATIONS))

    @property
    def family(self) -> ModelFamily:
        return self.settings.family

    def to_evaluate(self) -> list:
        """The models the next pass evaluates: the current one and, once EM has converged,
        the family's challengers while the budget of k restarts lasts; after that pass, the
        challengers EM steps further, alone."""
        s, settings = self.state, self.settings
        if self.refined:
            return [c[0] for c in self.refined]
        self.challengers = []
        if s.finishing and settings.reseed and not s.floored_until and len(s.reseeded) < settings.k:
            self.challengers = self.family.challengers(s.mixture, settings)
        return [s.mixture] + [c[0] for c in self.challengers]

    def _challenge(self, evaluated: list, total_weight: float):
        """Take the pass's statistics of the refined challengers: if the best that leaves no
        component underdetermined beats the converged mixture by more than `tol` per row (less is
        what the stop rule calls converged) it becomes the current one (its statistics are
        returned); else the `KEPT` best go one more EM step, up to `CHALLENGE_STEPS`, after which
        the fit has converged."""
        s, settings = self.state, self.settings
        refined, self.refined = self.refined, []
        value = [
            -np.inf if self.family.underdetermined(each, total_weight, settings) else self.family.objective(each, model)
            for each, (model, *_) in zip(evaluated, refined)
        ]
        order = sorted((i for i in range(len(refined)) if np.isfinite(value[i])), key=lambda i: -value[i])
        gain = value[order[0]] - s.history[-1] if order else 0.0
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

    def _stepped(self, stats, challenger: tuple) -> tuple:
        """`challenger` one EM step further, from its statistics."""
        model, changed, change = challenger
        return self.family.m_step(stats, model, self.settings)[0], changed, change

    def observe(self, evaluated: list, total_weight: float, seconds: float) -> None:
        """Take the pass's statistics of `to_evaluate()`'s models: record them, then stop or step;
        where EM under a floor stops, lift the floor (at maxIter the fit ends under it, unconverged)."""
        self._observe(evaluated, total_weight, seconds)
        s, own = self.state, self.fit_settings
        if self.done and s.floor is not None and s.iteration >= own.max_iter:
            self.stop_reason = "max-iter" if self.stop_reason == "converged" else self.stop_reason
        elif self.done and s.floor is not None and self.stop_reason != "decrease":
            log.info(
                "%sEM under the covariance floor stopped at iteration %d (%s); EM goes on at regCovar=%g",
                self.label, s.iteration, self.stop_reason, own.reg_covar,
            )
            s.floor, s.floored_until, s.finishing = None, s.iteration, False
            self.settings, self.done, self.stop_reason = self._phase_settings(), False, "max-iter"
            self._step(self.stats, total_weight)

    def _observe(self, evaluated: list, total_weight: float, seconds: float) -> None:
        s, iteration, settings = self.state, self.state.iteration, self.settings
        if not self.refined:
            stats = evaluated[0]
        elif (stats := self._challenge(evaluated, total_weight)) is None:
            return
        value = self.family.objective(stats, s.mixture)
        if not np.isfinite(value):
            raise FloatingPointError(
                f"{self.label}log-likelihood became {value} at iteration {iteration}; "
                "check the input for extreme values or raise regCovar"
            )
        mean_ll = value / total_weight
        change = mean_ll - s.history[-1] / total_weight if s.history else None
        reseeded_here = bool(s.reseeded) and s.reseeded[-1][0] == iteration  # not an EM step
        if change is not None and not reseeded_here and change < -self._decrease_budget(mean_ll):
            warn(
                f"{self.label}log-likelihood decreased by {-change:.3g} per row at iteration {iteration}, "
                "more than regularisation and round-off allow: a numerical problem (try dtype='float64' "
                "or a larger regCovar); stopping at the previous parameters, converged=False",
                ComponentWarning,
            )
            s.mixture, s.iteration = s.previous, iteration - 1
            self.revert, self.done, self.stop_reason = True, True, "decrease"
            return
        self.stats = stats
        s.history.append(value)
        s.seconds.append(seconds)
        _log_iteration(self.label, iteration, value, mean_ll, change, seconds)
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

    def _decrease_budget(self, mean_ll: float) -> float:
        """How far the mean objective may fall in one step without a numerical problem: the
        family's bound for its regulariser (e.g. `mixture.regularisation_allowance`) plus
        round-off. `self.stats` are still those of the pass that evaluated `previous`."""
        s = self.state
        allowance = self.family.decrease_allowance(s.previous, s.mixture, self.stats, self.settings)
        return allowance + ROUNDOFF[self.settings.dtype] * max(1.0, abs(mean_ll))

    def _step(self, stats, total_weight: float) -> bool:
        """The M-step, then dead components restarted (or kept and reported); True if any was."""
        s, settings = self.state, self.settings
        s.previous = s.mixture
        s.mixture, newly_empty = self.family.m_step(stats, s.mixture, settings)
        s.iteration += 1
        dead = _dead_components(stats, total_weight) if settings.reseed else []
        if len(dead):
            row_weight = total_weight / max(stats.hard_counts.sum(), 1.0)
            budget = settings.k - len(s.reseeded)
            s.mixture, restarted = self.family.restart(stats, s.previous, s.mixture, dead, budget, settings)
            for j, donor in restarted:
                s.reseeded.append((s.iteration, j, donor))
                log.info(
                    "%scomponent %d held %.3g rows at iteration %d; restarted by splitting component %d",
                    self.label, j, stats.resp[j] / row_weight, s.iteration - 1, donor,
                )
        revived = {j for at, j, _ in s.reseeded if at == s.iteration}
        for j in sorted(set(newly_empty.tolist()) - set(s.empty) - revived):
            warn(
                f"{self.label}component {j} lost all its data at iteration {s.iteration}; it keeps its "
                "previous parameters with a negligible weight (consider a smaller k)",
                ComponentWarning,
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
            floored_until=s.floored_until,
        )


def _floor(family: ModelFamily, start, settings: FitSettings) -> np.ndarray | None:
    """The floor of a first phase of EM (`ModelFamily.floor`) from a start the fit computed, unless plain EM."""
    floor = None if settings.start is not None or not settings.reseed else family.floor(start, settings)
    if floor is not None:
        log.info("the start has components singular but for regCovar: EM runs under a covariance floor first")
    return floor


def _dead_components(stats, total_weight: float) -> np.ndarray:
    """Indices (m,) of the components explaining fewer than DEAD_ROWS average rows of the pass
    behind `stats`."""
    rows = stats.hard_counts.sum()
    return np.flatnonzero(stats.resp < DEAD_ROWS * total_weight / max(rows, 1.0))


def _log_iteration(label, iteration, ll, mean_ll, change, seconds) -> None:
    log.info(
        "%siteration %d: log-likelihood %.10g (%.6g per row, change %s), %.3f s",
        label, iteration, ll, mean_ll, "—" if change is None else f"{change:+.3g}", seconds,
    )


def _run_em(
    reduce: Reduce, family: ModelFamily, candidates: list[_Candidate], total_weight: float, describe=None
) -> None:
    """EM for every candidate at once: one pass per iteration evaluates each candidate still
    running (those that stop drop out); each takes exactly the steps it would take alone.

    Each pass evaluates the current parameters (their log-likelihood and statistics), so a
    result's log-likelihood, history and cluster sizes belong exactly to its returned mixture.
    """

    def evaluate(group: list[_Candidate], label: str, models: list[list]) -> list[list]:
        if describe:
            describe(label)
        estep = family.estep_pass(
            [m for each in models for m in each], [c.settings for c, each in zip(group, models) for _ in each]
        )
        flat = iter(estep.split(reduce(estep)))
        return [[next(flat) for _ in each] for each in models]

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
    """Fit each candidate on the data behind `reduce` (d features, `total_weight` rows or weight,
    the rows EM divides by: for a family that skips rows with nothing observed, without them):
    their initialisations in lockstep, then EM, every pass shared. Each result equals the
    candidate's fit alone. With one candidate, `resume` continues a checkpointed state and
    `on_state` sees the state after every M-step. The candidates share one model family (it
    says how the cached rows are read)."""
    family = candidates[0].family
    if any(c.family != family for c in candidates):
        raise ValueError("candidates fitted together must share one model family (the data's layout)")
    if resume is not None:
        if len(candidates) != 1:
            raise ValueError("only a single fit resumes from a checkpoint")
        log.info("resuming from iteration %d", resume.iteration)
        states = [resume.copy()]
    else:
        what = family.start_name(candidates[0]) if len(candidates) == 1 else f"{len(candidates)} candidates"
        log.info("initialisation (%s)", what)
        starts = run_passes(reduce, [family.start_steps(d, c) for c in candidates], describe)
        states = [EMState.fresh(start, _floor(family, start, c)) for start, c in zip(starts, candidates)]
    runs = [
        _Candidate(
            c, state, label=f"candidate {i} ({c.describe()}): " if len(candidates) > 1 else "",
            on_state=on_state,
        )
        for i, (c, state) in enumerate(zip(candidates, states))
    ]
    _run_em(reduce, family, runs, total_weight, describe)
    return [run.result(resume.iteration if resume else 0) for run in runs]

