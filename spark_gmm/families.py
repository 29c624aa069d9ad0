"""Model families: what the one EM loop (`em.fit`) asks of a kind of model.

A family says how to evaluate and update its models; `em` owns everything else (the stop rule, the
decrease budget, when to restart a dead component or try challengers, shared passes, checkpoints,
logging). Settings that may differ between candidates fitted together (k, covariance type,
regCovar, seed) stay in `em.FitSettings` and are passed in; a family holds only what is fixed for
the data (how a cached row is laid out, smoothing), so it is small, frozen and picklable.

`GaussianFamily` (here) fits `mixture.Mixture`; `latent.LatentFamily` fits the latent class model
over mixed features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from . import kernels
from .initialisation import initial_mixture_steps
from .mixture import (
    DIAGONAL_TYPES,
    ComponentStatistics,
    Mixture,
    challengers,
    gaussians_from_moments,
    m_step,
    precision_cholesky,
    regularisation_allowance,
    rows_to_determine,
    split_component,
)

if TYPE_CHECKING:
    from .em import FitSettings

#: The covariance floor of the first phase of EM from a start that is singular but for regCovar,
#: as a share of each feature's variance (see `GaussianFamily.floor`).
FLOOR_SHARE = 0.03
#: Where EM converges, the lightest component is tried on splits of this many heaviest ones, and
#: this many closest pairs of components are tried re-split (see `mixture.challengers`).
DONORS, PAIRS = 3, 2


class ModelFamily(Protocol):
    """The interface; `stats` are what `estep_pass(...).split` returns for one model: they have
    `log_likelihood` (Σw·log p), `resp` ((k,) Σwγ, per component) and `hard_counts` ((k,) rows
    whose most probable component is j)."""

    def estep_pass(self, models: list, settings: list["FitSettings"]):
        """One pass (see `kernels`) evaluating every model (fitted with the `settings` beside it);
        its `split(flat)` gives their stats."""

    def m_step(self, stats, model, settings: "FitSettings") -> tuple[object, np.ndarray]:
        """(next model, indices of components too empty to estimate) from `model`'s stats."""

    def objective(self, stats, model) -> float:
        """What EM increases, total over the rows: `tol` and the decrease test read it."""

    def decrease_allowance(self, previous, current, stats, settings: "FitSettings") -> float:
        """How far the objective per unit of row weight may fall in the EM step `previous` →
        `current` (taken from `stats`, those of `previous`; None after a resume) in exact
        arithmetic: the regulariser's bound."""

    def start_steps(self, d: int, settings: "FitSettings"):
        """A generator of passes returning the start (see `initialisation.run_passes`)."""

    def start_name(self, settings: "FitSettings") -> str:
        """How `start_steps` starts, for the log."""

    def floor(self, start, settings: "FitSettings") -> np.ndarray | None:
        """A regulariser per feature (d,) for a first phase of EM from `start`, lifted once it
        converges; None for a single phase."""

    def restart(self, stats, previous, model, dead: np.ndarray, budget: int, settings: "FitSettings"):
        """(model, [(dead component, donor)]): up to `budget` of the `dead` components of `model`
        (just updated from `previous`'s `stats`) restarted on a split of a live one; none if the
        family offers no restart."""

    def challengers(self, model, settings: "FitSettings") -> list[tuple]:
        """[(model, (a, b), what)]: alternatives to a converged `model` changing components a and
        b, worth one pass to rank (see `mixture.challengers`); [] if the family offers none."""

    def underdetermined(self, stats, total_weight: float, settings: "FitSettings") -> bool:
        """Whether a component of the model behind `stats` holds too few rows to determine its
        parameters: a challenger that leaves one is a spurious optimum, not taken."""

    def to_arrays(self, model) -> dict[str, np.ndarray]:
        """`model` as named non-empty float64 arrays, exactly (what a checkpoint stores)."""

    def from_arrays(self, arrays: dict[str, np.ndarray], settings: "FitSettings"):
        """The model `to_arrays` gave `arrays` for, bit for bit (a checkpoint read back)."""


@dataclass(frozen=True)
class GaussianFamily:
    """Gaussian mixtures (`mixture.Mixture`, shifted coordinates) over every column of the cached
    blocks; the objective is the log-likelihood."""

    def estep_pass(self, models: list[Mixture], settings: list["FitSettings"]) -> kernels.EStepPass:
        return kernels.EStepPass(models, [s.covariance_type in DIAGONAL_TYPES for s in settings])

    def m_step(self, stats: ComponentStatistics, model: Mixture, settings: "FitSettings"):
        return m_step(stats, model, settings.reg_covar, settings.covariance_type)

    def objective(self, stats: ComponentStatistics, model: Mixture) -> float:
        return stats.log_likelihood

    def decrease_allowance(self, previous, current: Mixture, stats, settings: "FitSettings") -> float:
        return regularisation_allowance(previous, current, settings.reg_covar)

    def start_steps(self, d: int, settings: "FitSettings"):
        return initial_mixture_steps(d, settings)

    def start_name(self, settings: "FitSettings") -> str:
        return "initial model" if settings.start is not None else f"{settings.init_mode}, k={settings.k}"

    def floor(self, start: Mixture, settings: "FitSettings") -> np.ndarray | None:
        """`FLOOR_SHARE` of each feature's variance when a component of `start` is singular but
        for regCovar in more directions than the data as a whole (features constant within a
        k-means cluster: pixels, counts, indicators; not the levels of a one-hot feature, which
        sum to 1 in every row). The likelihood is unbounded there but for regCovar, and EM climbs
        from such a start into shapes that regCovar sets instead of clusters (a spurious
        maximiser); EM under the floor first finds the clusters, and EM at regCovar then refines
        them."""
        own = start.covariances - settings.reg_covar * np.eye(start.d)
        gaps = start.means - start.weights @ start.means
        total = np.tensordot(start.weights, own, axes=1) + np.einsum("j,ja,jb->ab", start.weights, gaps, gaps)
        thin = (np.linalg.eigvalsh(own) <= settings.reg_covar).sum(axis=1)
        if not (thin > (np.linalg.eigvalsh(total) <= settings.reg_covar).sum()).any():
            return None
        variance = np.diagonal(total)
        if settings.covariance_type == "spherical":  # the floor must keep it spherical
            return np.full(start.d, FLOOR_SHARE * variance.mean())
        return FLOOR_SHARE * variance

    def restart(self, stats: ComponentStatistics, previous: Mixture, model: Mixture, dead: np.ndarray,
                budget: int, settings: "FitSettings"):
        """Each dead component, in order, becomes one half of the live component with the largest
        mass × widest variance (`mixture.split_component`), each donor splitting once. Diagonal
        types gather no cross moments: their donors split along their widest feature."""
        own = "diag" if settings.covariance_type in DIAGONAL_TYPES else "full"
        scatter = gaussians_from_moments(stats, previous.means, 0.0, own)[2]
        spread = stats.resp * np.linalg.eigvalsh(scatter)[:, -1]  # mass × widest variance
        spread[dead] = -np.inf
        restarted = []
        for j in dead:
            if len(restarted) >= budget or not np.isfinite(spread.max()):
                break
            donor = int(np.argmax(spread))
            spread[donor] = -np.inf
            model = split_component(model, scatter[donor], donor, int(j), settings.covariance_type, settings.reg_covar)
            restarted.append((int(j), donor))
        return model, restarted

    def challengers(self, model: Mixture, settings: "FitSettings") -> list[tuple]:
        """Only with a regulariser: without one a split may leave a singular covariance, which
        `mixture.positive_definite` refuses, failing a fit that had converged."""
        if not np.min(settings.reg_covar) > 0:
            return []
        return challengers(model, settings.covariance_type, settings.reg_covar, DONORS, PAIRS)

    def underdetermined(self, stats: ComponentStatistics, total_weight: float, settings: "FitSettings") -> bool:
        """A full covariance needs d + 1 rows to be non-singular without `regCovar`; fewer, and
        the likelihood grows only because the regulariser bounds a collapsed covariance."""
        row_weight = total_weight / max(stats.hard_counts.sum(), 1.0)
        needed = rows_to_determine(stats.first.shape[1], settings.covariance_type)
        return bool((stats.resp < needed * row_weight).any())

    def to_arrays(self, model: Mixture) -> dict[str, np.ndarray]:
        return {"weights": model.weights, "means": model.means, "covariances": model.covariances}

    def from_arrays(self, arrays: dict[str, np.ndarray], settings: "FitSettings") -> Mixture:
        """The precision factors recomputed as every step computes them from the covariances."""
        covariances = arrays["covariances"]
        return Mixture(arrays["weights"], arrays["means"], covariances, precision_cholesky(covariances))
