"""Mixture parameters and the M-step: driver-side numpy, no Spark.

Means live in *shifted* coordinates (data minus a fixed per-feature shift chosen from the data), so
that features far from the origin keep their precision; `Mixture.shifted` gives the user's
coordinates back.  Second moments arrive centred on each component's current mean, which is why the
M-step can add the mean update without cancellation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .exceptions import SpectralRepairWarning, warn

#: A component whose responsibility mass is below this share of the total weight is "empty": its
#: mean and covariance cannot be estimated, so it keeps its previous ones (an M-step maximiser too).
EMPTY_SHARE = 1e-12
#: Floor on mixing weights, so that log-weights stay finite for an empty component.
WEIGHT_FLOOR = np.finfo(np.float64).eps



def packed_size(d: int) -> int:
    """Length of the upper triangle (diagonal included) of a d×d matrix."""
    return d * (d + 1) // 2


def unpack_symmetric(packed: np.ndarray, d: int) -> np.ndarray:
    """(..., d(d+1)/2) upper-triangle rows → (..., d, d) symmetric matrices."""
    rows, cols = np.triu_indices(d)
    out = np.zeros(packed.shape[:-1] + (d, d))
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out


def positive_definite(covariances: np.ndarray, reg_covar) -> np.ndarray:
    """The `covariances` (k, d, d), each one that fails Cholesky repaired: its spectrum clipped at
    `reg_covar` (its smallest entry, if per feature: round-off on a collapsed component), with a
    warning naming it. Without a regulariser there is nothing to clip to: the fit is refused, as
    scikit-learn does."""
    covariances = np.array(covariances, dtype=np.float64)
    reg_covar = float(np.min(reg_covar))
    for j, cov in enumerate(covariances):
        try:
            np.linalg.cholesky(cov)
            continue
        except np.linalg.LinAlgError:
            values, vectors = np.linalg.eigh((cov + cov.T) / 2)
        if not reg_covar > 0:
            raise FloatingPointError(
                f"component {j} has an ill-defined covariance (smallest eigenvalue {values.min():.3g}): "
                "it collapsed onto fewer distinct points than features; set regCovar > 0 (e.g. 1e-6) "
                "or lower k"
            )
        covariances[j] = (vectors * np.maximum(values, reg_covar)) @ vectors.T
        covariances[j] = (covariances[j] + covariances[j].T) / 2
        warn(
            f"component {j}: covariance not positive definite (smallest eigenvalue "
            f"{values.min():.3g}); clipped its spectrum at regCovar={reg_covar:g}",
            SpectralRepairWarning,
        )
    return covariances


def precision_cholesky(covariances: np.ndarray) -> np.ndarray:
    """Upper-triangular P_j (k, d, d) with P_j P_jᵀ = Σ_j⁻¹, for each of the positive definite
    `covariances` (k, d, d) (see `positive_definite`)."""
    lower = np.linalg.cholesky(covariances)
    eye = np.broadcast_to(np.eye(covariances.shape[-1]), covariances.shape)
    return np.swapaxes(np.linalg.solve(lower, eye), -1, -2)


def regularisation_allowance(previous: "Mixture | None", current: "Mixture", reg_covar) -> float:
    """How much the mean log-likelihood may fall in the EM step `previous` → `current` because of
    the regulariser `reg_covar` = ε (a number, or one per feature: E = diag(ε)).

    Adding E to a covariance is the exact M-step of Q(θ) − pen(θ) with pen = Σ_j N_j ½ tr(E Σ_j⁻¹)
    (for every covariance type), so L(current) − L(previous) ≥ pen(current) − pen(previous), where
    N_j are the responsibilities behind the step (`current.weights` per row). Exact arithmetic
    never falls further; more than this (plus round-off) is a numerical problem.
    """
    if previous is None or not np.min(reg_covar) > 0:
        return 0.0
    reg = np.broadcast_to(reg_covar, current.d)
    before = (previous.precisions_cholesky**2).sum(axis=2) @ reg  # tr(E Σ⁻¹): (Σ⁻¹)_ii = Σ_c P_ic²
    after = (current.precisions_cholesky**2).sum(axis=2) @ reg
    return max(0.0, 0.5 * float(current.weights @ (before - after)))


def split_component(
    mixture: "Mixture",
    scatter: np.ndarray,
    donor: int,
    target: int,
    covariance_type: str,
    reg_covar: float,
    rank: int = 0,
) -> "Mixture":
    """`mixture` with component `target` restarted as one half of `donor`, split across the
    `rank`-th widest direction (0: the widest) of the donor's scatter (d, d): the halves of a
    Gaussian cut through its mean sit ±σ·√(2/π) from it and keep (1 − 2/π)σ² of that variance, so
    the pair keeps the donor's mean and covariance. Restricted covariance types keep the donor's
    covariance for both."""
    values, vectors = np.linalg.eigh(scatter)
    variance, direction = max(values[-1 - rank], 0.0), vectors[:, -1 - rank]
    offset = np.sqrt(2.0 * variance / np.pi) * direction
    weights, means = mixture.weights.copy(), mixture.means.copy()
    covariances = mixture.covariances.copy()
    weights[donor] = weights[target] = (weights[donor] + weights[target]) / 2
    means[target], means[donor] = means[donor] - offset, means[donor] + offset
    if covariance_type == "full":
        covariances[donor] -= (2.0 / np.pi) * variance * np.outer(direction, direction)
    covariances[target] = covariances[donor]
    return Mixture.from_covariances(weights, means, covariances, reg_covar)


def resplit_pair(
    mixture: "Mixture", first: int, second: int, covariance_type: str, reg_covar: float, rank: int
) -> "Mixture":
    """`mixture` with components `first` and `second` replaced by the halves of their union (the
    one Gaussian with both components' mass, mean and covariance), split across the union's
    `rank`-th widest direction. Two components sharing two clusters may have cut them the wrong
    way (k-means cuts elongated clusters across); a split along another direction hands EM the
    other cut."""
    pair = [first, second]
    mass = mixture.weights[pair]
    union_mean = mass @ mixture.means[pair] / mass.sum()
    gaps = mixture.means[pair] - union_mean
    own = mixture.covariances[pair] - reg_covar * np.eye(mixture.d)
    scatter = (np.tensordot(mass, own, axes=1) + np.einsum("a,ai,aj->ij", mass, gaps, gaps)) / mass.sum()
    weights, means = mixture.weights.copy(), mixture.means.copy()
    covariances = mixture.covariances.copy()
    weights[second], weights[first] = mass.sum(), 0.0  # the split shares it out again
    means[second] = union_mean
    if covariance_type != "tied":  # a tied covariance stays the shared one
        covariances[second] = CONSTRAINTS[covariance_type](scatter[None], mass.sum()[None])[0]
        covariances[second] += reg_covar * np.eye(mixture.d)
    union = Mixture(weights, means, covariances, mixture.precisions_cholesky)  # split only reads these
    return split_component(union, scatter, second, first, covariance_type, reg_covar, rank)


def free_parameters(k: int, d: int, covariance_type: str = "full") -> int:
    """Free parameters of a k-component mixture (for BIC and AIC), counted as scikit-learn does."""
    covariance = {"full": k * packed_size(d), "diag": k * d, "spherical": k, "tied": packed_size(d)}
    return covariance[covariance_type] + k * d + k - 1


def challengers(mixture: "Mixture", covariance_type: str, reg_covar: float, donors: int, pairs: int) -> list[tuple]:
    """[(mixture, (a, b), what)]: alternatives to a converged `mixture` that one pass can rank, each
    with the two components it changes and a phrase for the log. They escape two local optima:
    - a component spent on a few far rows while another covers two clusters: the lightest
      component moved onto a split of each of the `donors` heaviest (`split_component`);
    - two components sharing two clusters cut the wrong way (k-means cuts elongated clusters
      across): each of the `pairs` closest pairs (symmetrised Mahalanobis distance of their means)
      re-split across the second-widest direction of its union (`resplit_pair`; d ≥ 2).
    None for k < 2."""
    k, d = mixture.k, mixture.d
    if k < 2:
        return []
    lightest = int(np.argmin(mixture.weights))
    own = mixture.covariances - reg_covar * np.eye(d)  # the scatter behind each covariance
    heaviest = [int(j) for j in np.argsort(-mixture.weights, kind="stable") if j != lightest][:donors]
    found = [
        (
            split_component(mixture, own[donor], donor, lightest, covariance_type, reg_covar),
            (lightest, donor),
            f"moving component {lightest} onto a split of component {donor}",
        )
        for donor in heaviest
    ]
    if d < 2:
        return found
    gaps = mixture.means[:, None, :] - mixture.means[None, :, :]  # (k, k, d): μ_k − μ_j
    whitened = np.einsum("kab,kja->kjb", mixture.precisions_cholesky, gaps)  # P_kᵀ(μ_k − μ_j)
    distance = (whitened**2).sum(axis=-1)
    distance = distance + distance.T
    first, second = np.triu_indices(k, 1)
    for pair in np.argsort(distance[first, second], kind="stable")[:pairs]:
        a, b = int(first[pair]), int(second[pair])
        found.append((
            resplit_pair(mixture, a, b, covariance_type, reg_covar, rank=1),
            (a, b),
            f"re-splitting components {a} and {b} across the second direction of their union",
        ))
    return found


def rows_to_determine(d: int, covariance_type: str) -> int:
    """Rows a component needs for its own covariance to be non-singular without a regulariser:
    d + 1 for a full covariance, 2 for diag and spherical, 1 for tied (shared by all)."""
    return {"full": d + 1, "diag": 2, "spherical": 2, "tied": 1}[covariance_type]


def information_criterion(criterion: str, log_likelihood: float, parameters: int, n: float) -> float:
    """BIC or AIC (lower is better) of a total log-likelihood over n rows (or total weight), as
    scikit-learn defines them."""
    penalty = parameters * np.log(n) if criterion == "bic" else 2.0 * parameters
    return -2.0 * log_likelihood + float(penalty)


def thin_components(covariances: np.ndarray, reg_covar: float, varying: np.ndarray) -> list[tuple[int, float]]:
    """(j, variance) of the components of `covariances` (k, d, d) whose own variance, in their
    thinnest direction over the `varying` (d,) boolean features, is at most `reg_covar`: without
    the regulariser they would be singular (a component on fewer distinct points than features,
    or collinear features)."""
    sub = covariances[:, varying][:, :, varying]
    if not sub.shape[-1] or reg_covar <= 0:
        return []
    smallest = np.linalg.eigvalsh(sub)[:, 0] - reg_covar
    return [(int(j), float(smallest[j])) for j in np.flatnonzero(smallest <= reg_covar)]


@dataclass(frozen=True)
class Mixture:
    """One Gaussian mixture in shifted coordinates, with what the E-step needs precomputed."""

    weights: np.ndarray  # (k,)
    means: np.ndarray  # (k, d), shifted coordinates
    covariances: np.ndarray  # (k, d, d)
    precisions_cholesky: np.ndarray  # (k, d, d), upper triangular

    @classmethod
    def from_covariances(cls, weights, means, covariances, reg_covar: float = 0.0) -> "Mixture":
        """Normalised weights, and covariances repaired (or refused) by `positive_definite`: the
        matrices the densities use are the ones kept, returned, saved and sampled from."""
        weights = np.asarray(weights, dtype=np.float64)
        covariances = positive_definite(covariances, reg_covar)
        return cls(
            weights=weights / weights.sum(),
            means=np.asarray(means, dtype=np.float64),
            covariances=covariances,
            precisions_cholesky=precision_cholesky(covariances),
        )

    @property
    def k(self) -> int:
        return self.means.shape[0]

    @property
    def d(self) -> int:
        return self.means.shape[1]

    def shifted(self, offset: np.ndarray) -> "Mixture":
        """The same mixture with its means moved by `offset` (to or from shifted coordinates)."""
        return Mixture(self.weights, self.means + offset, self.covariances, self.precisions_cholesky)


@dataclass
class ComponentStatistics:
    """Reduced E-step statistics of one mixture, second moments centred on its current means."""

    log_likelihood: float  # Σ w·log p(x)
    resp: np.ndarray  # (k,)  Σ w·γ
    hard_counts: np.ndarray  # (k,)  rows whose most probable component is j (unweighted)
    first: np.ndarray  # (k, d)  Σ w·γ·(x − μ)
    second: np.ndarray  # (k, d(d+1)/2)  Σ w·γ·(x − μ)(x − μ)ᵀ, packed upper triangle

    @staticmethod
    def size(k: int, d: int) -> int:
        return 1 + 2 * k + k * d + k * packed_size(d)

    @classmethod
    def unpack(cls, flat: np.ndarray, k: int, d: int) -> "ComponentStatistics":
        """The statistics of k components over d features in the flat partial (size(k, d),)."""
        if flat.shape != (cls.size(k, d),):
            raise ValueError(f"statistics of length {flat.shape} do not fit k={k}, d={d}")
        cut = np.cumsum([1, k, k, k * d])
        ll, resp, hard, first, second = np.split(flat, cut)
        return cls(
            float(ll[0]), resp, hard, first.reshape(k, d), second.reshape(k, packed_size(d))
        )


# Each covariance type constrains the components' full empirical covariances (k×d×d, centred on
# their new means, before regularisation; `mass` is each component's Σγ). All types keep full k×d×d
# matrices, so densities and statistics are computed one way; the types differ only here.


def _full_covariances(raw: np.ndarray, mass: np.ndarray) -> np.ndarray:
    return raw


def _diag_covariances(raw: np.ndarray, mass: np.ndarray) -> np.ndarray:
    return raw * np.eye(raw.shape[-1])


def _spherical_covariances(raw: np.ndarray, mass: np.ndarray) -> np.ndarray:
    variance = np.trace(raw, axis1=1, axis2=2) / raw.shape[-1]
    return variance[:, None, None] * np.eye(raw.shape[-1])


def _tied_covariances(raw: np.ndarray, mass: np.ndarray) -> np.ndarray:
    shared = np.tensordot(mass, raw, axes=1) / mass.sum()
    return np.broadcast_to(shared, raw.shape).copy()


CONSTRAINTS = {
    "full": _full_covariances,
    "diag": _diag_covariances,
    "spherical": _spherical_covariances,
    "tied": _tied_covariances,
}
COVARIANCE_TYPES = tuple(CONSTRAINTS)
#: Types whose M-step reads only the diagonal of the second moments: their E-step gathers d sums
#: per component instead of d(d+1)/2, and leaves the rest of the packed triangle at zero.
DIAGONAL_TYPES = ("diag", "spherical")


def gaussians_from_moments(
    stats: ComponentStatistics, centers: np.ndarray, reg_covar: float, covariance_type: str = "full"
):
    """(weights (k,), means (k, d), covariances (k, d, d), empty (k,) bool) from moments centred on
    `centers` (k, d).

    Components whose mass is below `EMPTY_SHARE` of the total are flagged; their rows of the
    returned means (and, except for tied covariances, covariances) are not meaningful and must be
    replaced by the caller.
    """
    total = stats.resp.sum()
    empty = stats.resp <= EMPTY_SHARE * total
    mass = np.where(empty, 1.0, stats.resp)
    shift = stats.first / mass[:, None]
    raw = unpack_symmetric(stats.second, centers.shape[1]) / mass[:, None, None]
    raw -= shift[:, :, None] * shift[:, None, :]
    covariances = CONSTRAINTS[covariance_type](raw, np.where(empty, 0.0, stats.resp))
    covariances += reg_covar * np.eye(centers.shape[1])
    weights = np.maximum(stats.resp / total, WEIGHT_FLOOR)
    return weights, centers + shift, covariances, empty


def m_step(stats: ComponentStatistics, current: Mixture, reg_covar: float, covariance_type: str = "full"):
    """New mixture from the statistics gathered under `current`; returns (mixture, indices of the
    empty components (e,))."""
    weights, means, covariances, empty = gaussians_from_moments(
        stats, current.means, reg_covar, covariance_type
    )
    means[empty] = current.means[empty]
    if covariance_type != "tied":  # a tied covariance is estimated from the other components
        covariances[empty] = current.covariances[empty]
    return Mixture.from_covariances(weights, means, covariances, reg_covar), np.flatnonzero(empty)
