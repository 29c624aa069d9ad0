"""Mixture parameters and the M-step: driver-side numpy, no Spark.

Means live in *shifted* coordinates (data minus a fixed per-feature shift chosen from the data), so
that features far from the origin keep their precision; `MixtureModelParams.unshift` gives the user's
coordinates back.  Second moments arrive centred on each component's current mean, which is why the
M-step can add the mean update without cancellation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

#: A component whose responsibility mass is below this share of the total weight is "empty": its
#: mean and covariance cannot be estimated, so it keeps its previous ones (an M-step maximiser too).
EMPTY_SHARE = 1e-12
#: Floor on mixing weights, so that log-weights stay finite for an empty component.
WEIGHT_FLOOR = np.finfo(np.float64).eps


class SpectralRepairWarning(UserWarning):
    """A covariance was not numerically positive definite and had its spectrum clipped."""


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


def precision_cholesky(covariances: np.ndarray, reg_covar: float) -> np.ndarray:
    """Upper-triangular P_j with P_j P_jᵀ = Σ_j⁻¹, for each of the k×d×d covariances.

    A covariance that fails Cholesky (round-off on a collapsed component) has its eigenvalues clipped
    at `reg_covar` instead of producing NaN; a warning names it.
    """
    covariances = np.array(covariances, dtype=np.float64)
    try:
        lower = np.linalg.cholesky(covariances)
    except np.linalg.LinAlgError:
        lower = np.empty_like(covariances)
        for j, cov in enumerate(covariances):
            try:
                lower[j] = np.linalg.cholesky(cov)
            except np.linalg.LinAlgError:
                values, vectors = np.linalg.eigh((cov + cov.T) / 2)
                clipped = (vectors * np.maximum(values, max(reg_covar, 1e-300))) @ vectors.T
                warnings.warn(
                    f"component {j}: covariance not positive definite (smallest eigenvalue "
                    f"{values.min():.3g}); clipped its spectrum at regCovar={reg_covar:g}",
                    SpectralRepairWarning,
                    stacklevel=2,
                )
                covariances[j] = clipped
                lower[j] = np.linalg.cholesky(clipped + 1e-300 * np.eye(len(cov)))
    d = covariances.shape[-1]
    eye = np.broadcast_to(np.eye(d), covariances.shape)
    return np.swapaxes(np.linalg.solve(lower, eye), -1, -2)


def free_parameters(k: int, d: int, covariance_type: str = "full") -> int:
    """Free parameters of a k-component mixture (for BIC and AIC), counted as scikit-learn does."""
    covariance = {"full": k * packed_size(d), "diag": k * d, "spherical": k, "tied": packed_size(d)}
    return covariance[covariance_type] + k * d + k - 1


def thin_components(covariances: np.ndarray, reg_covar: float, varying: np.ndarray) -> list[tuple[int, float]]:
    """(j, variance) of the components whose own variance, in their thinnest direction over the
    `varying` features, is at most `reg_covar`: without the regulariser they would be singular (a
    component on fewer distinct points than features, or collinear features)."""
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
        weights = np.asarray(weights, dtype=np.float64)
        weights = weights / weights.sum()
        covariances = np.asarray(covariances, dtype=np.float64)
        return cls(
            weights=weights,
            means=np.asarray(means, dtype=np.float64),
            covariances=covariances,
            precisions_cholesky=precision_cholesky(covariances, reg_covar),
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


def gaussians_from_moments(
    stats: ComponentStatistics, centers: np.ndarray, reg_covar: float, covariance_type: str = "full"
):
    """(weights, means, covariances, empty mask) from moments centred on `centers`.

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
    """New mixture from the statistics gathered under `current`; returns (mixture, empty indices)."""
    weights, means, covariances, empty = gaussians_from_moments(
        stats, current.means, reg_covar, covariance_type
    )
    means[empty] = current.means[empty]
    if covariance_type != "tied":  # a tied covariance is estimated from the other components
        covariances[empty] = current.covariances[empty]
    return Mixture.from_covariances(weights, means, covariances, reg_covar), np.flatnonzero(empty)
