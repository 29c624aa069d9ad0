"""Stable component ids across refits, and how far each component moved: driver-side numpy, no Spark.

A refit numbers its components in whatever order EM found them. `align` renumbers them after the
previous model's: a minimum-cost assignment (the Hungarian method, written here: k is small and
the driver should not need scipy for one function) over the Bhattacharyya divergence between the
Gaussians. A pair whose divergence exceeds `max_divergence` is no match: that component gets a new
id, one never issued before (the previous model carries the next free id). `drift` gives the
per-component figures a scheduler can alert on.

The Bhattacharyya divergence D = ⅛ δᵀΣ⁻¹δ + ½ ln(det Σ / √(det Σ₁ det Σ₂)), Σ = (Σ₁ + Σ₂)/2, δ = μ₁ − μ₂,
is symmetric, finite for any two non-degenerate Gaussians (symmetric KL is not bounded by the
overlap and explodes on thin components), and exp(−D) is the overlap coefficient ∫√(p₁p₂) in (0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Default largest divergence of a match: overlap coefficient exp(−1) ≈ 0.37, e.g. two Gaussians of
#: the same shape whose means are 2√2 ≈ 2.8 standard deviations apart. Further apart, a component is
#: a different segment and gets a new id.
MAX_DIVERGENCE = 1.0
#: The drift figures `exceeded` compares with limits (docs/recurring.md defines each).
DRIFT_FIGURES = ("weightChange", "meanShift", "divergence", "labelChange")


def _log_det(covariances: np.ndarray) -> np.ndarray:
    """log det of each of `covariances` (..., d, d), positive definite: (...,)."""
    return 2.0 * np.log(np.diagonal(np.linalg.cholesky(covariances), axis1=-2, axis2=-1)).sum(axis=-1)


def bhattacharyya(means_a, covariances_a, means_b, covariances_b) -> np.ndarray:
    """(ka, kb) Bhattacharyya divergences between the components of means (ka, d), covariances
    (ka, d, d) and those of means (kb, d), covariances (kb, d, d)."""
    means_a, means_b = np.asarray(means_a, np.float64), np.asarray(means_b, np.float64)
    covariances_a, covariances_b = np.asarray(covariances_a, np.float64), np.asarray(covariances_b, np.float64)
    pooled = (covariances_a[:, None] + covariances_b[None, :]) / 2  # (ka, kb, d, d)
    lower = np.linalg.cholesky(pooled)
    delta = means_a[:, None] - means_b[None, :]
    whitened = np.linalg.solve(lower, delta[..., None])[..., 0]
    log_det_pooled = 2.0 * np.log(np.diagonal(lower, axis1=-2, axis2=-1)).sum(axis=-1)
    shape = log_det_pooled - (_log_det(covariances_a)[:, None] + _log_det(covariances_b)[None, :]) / 2
    return (whitened**2).sum(axis=-1) / 8 + shape / 2


def mahalanobis(points, mean, covariance) -> np.ndarray:
    """Distance (n,) of each row of `points` (n, d) from `mean` (d,) in units of `covariance` (d, d)."""
    lower = np.linalg.cholesky(np.asarray(covariance, np.float64))
    delta = np.atleast_2d(np.asarray(points, np.float64)) - mean
    return np.sqrt((np.linalg.solve(lower, delta.T) ** 2).sum(axis=0))


def min_cost_assignment(cost) -> np.ndarray:
    """The column (n,) of each row in a minimum-total-cost assignment of the n rows of the finite
    `cost` (n, m), n ≤ m, to distinct columns: shortest augmenting paths with row and column potentials
    (the Hungarian method), O(n²m)."""
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    if n > m or not np.isfinite(cost).all():
        raise ValueError(f"need a finite cost matrix with no more rows than columns, got {n}×{m}")
    row_potential, column_potential = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.intp)  # 1-based row holding each column; column 0 is the root
    for row in range(1, n + 1):
        owner[0], column = row, 0
        slack = np.full(m + 1, np.inf)
        came_from = np.zeros(m + 1, dtype=np.intp)
        visited = np.zeros(m + 1, dtype=bool)
        while owner[column]:
            visited[column] = True
            current = owner[column]
            reduced = cost[current - 1] - row_potential[current] - column_potential[1:]
            open_ = ~visited[1:]
            better = open_ & (reduced < slack[1:])
            slack[1:][better] = reduced[better]
            came_from[1:][better] = column
            column = int(np.argmin(np.where(open_, slack[1:], np.inf))) + 1
            step = slack[column]
            row_potential[owner[visited]] += step
            column_potential[visited] -= step
            slack[1:][open_] -= step
        while column:  # flip the augmenting path back to the root
            owner[column] = owner[came_from[column]]
            column = came_from[column]
    assigned = np.empty(n, dtype=np.intp)
    taken = np.flatnonzero(owner[1:])
    assigned[owner[1:][taken] - 1] = taken
    return assigned


def match(divergence, max_divergence: float) -> np.ndarray:
    """For each new component (row of `divergence` (k_new, k_prev)), the previous component it
    continues, or -1, as (k_new,): the assignment minimising Σ divergence of the matches + `max_divergence` per
    unmatched new component, so no match exceeds `max_divergence`."""
    divergence = np.asarray(divergence, dtype=np.float64)
    if not (np.isfinite(max_divergence) and max_divergence >= 0):
        raise ValueError(f"maxDivergence must be a finite number >= 0, got {max_divergence}")
    k_new, k_prev = divergence.shape
    # One "new id" column per new component, each costing max_divergence; a pair dearer than that is
    # capped at the same price, and dropped below (the capped objective has the same optimum).
    cost = np.hstack([np.minimum(divergence, max_divergence), np.full((k_new, k_new), float(max_divergence))])
    chosen = min_cost_assignment(cost)
    matched = chosen < k_prev
    matched[matched] &= divergence[matched.nonzero()[0], chosen[matched]] <= max_divergence
    return np.where(matched, chosen, -1)


@dataclass(frozen=True)
class Alignment:
    """`order`: new positions in their aligned order (aligned component i is new component order[i]);
    `ids`: the stable id of each aligned component, ascending; `previous`: the previous model's
    position each aligned component continues, or -1; `next_id`: the first id never issued."""

    order: np.ndarray
    ids: np.ndarray
    previous: np.ndarray
    next_id: int


def align(new_means, new_covariances, previous_means, previous_covariances, previous_ids, next_id: int,
          max_divergence: float = MAX_DIVERGENCE) -> Alignment:
    """Stable ids for the new components (means (k, d), covariances (k, d, d)) after the previous
    ones (means (p, d), covariances (p, d, d), `previous_ids` (p,)): a match keeps the previous
    component's id, the others get next_id, next_id + 1, ... (in their fitted order); components
    are ordered by id."""
    previous_ids = np.asarray(previous_ids, dtype=np.int64)
    next_id = max(int(next_id), int(previous_ids.max(initial=-1)) + 1)
    divergence = bhattacharyya(new_means, new_covariances, previous_means, previous_covariances)
    matches = match(divergence, max_divergence)
    ids = np.where(matches >= 0, previous_ids[np.maximum(matches, 0)], -1)
    unmatched = np.flatnonzero(matches < 0)
    ids[unmatched] = next_id + np.arange(len(unmatched))
    order = np.argsort(ids, kind="stable")
    return Alignment(order, ids[order], matches[order], next_id + len(unmatched))


def drift(weights, means, covariances, previous_weights, previous_means, previous_covariances,
          ids, previous_ids, previous) -> dict:
    """Per aligned component: its id, the previous id it continues (None if new), its weight, the
    weight change, the mean shift in the previous covariance's units (Mahalanobis) and the
    Bhattacharyya divergence; and the previous components no new one continues ("retired").

    The aligned components: weights (k,), means (k, d), covariances (k, d, d), `ids` (k,) and
    `previous` (k,), the previous position each continues or -1; the previous ones: weights (p,),
    means (p, d), covariances (p, d, d) and `previous_ids` (p,)."""
    divergence = bhattacharyya(means, covariances, previous_means, previous_covariances)
    components = []
    for j, p in enumerate(previous):
        figures = {"id": int(ids[j]), "previousId": None, "weight": float(weights[j]),
                   "weightChange": None, "meanShift": None, "divergence": None}
        if p >= 0:
            figures.update(
                previousId=int(previous_ids[p]),
                weightChange=float(weights[j] - previous_weights[p]),
                meanShift=float(mahalanobis(means[j], previous_means[p], previous_covariances[p])[0]),
                divergence=float(divergence[j, p]),
            )
        components.append(figures)
    continued = set(int(p) for p in previous if p >= 0)
    retired = [
        {"previousId": int(previous_ids[p]), "previousWeight": float(previous_weights[p])}
        for p in range(len(previous_ids)) if p not in continued
    ]
    return {"components": components, "retired": retired}


def add_label_changes(figures: dict, rows, changed) -> None:
    """Put into `figures` (from `drift`) the share of each component's rows whose id changed (rows
    the new model gives component j that the previous model gave another id), and overall."""
    rows, changed = np.asarray(rows, np.int64), np.asarray(changed, np.int64)
    for c, n, m in zip(figures["components"], rows, changed):
        c["labelChange"] = float(m / n) if n else None
    figures["rowsCompared"] = int(rows.sum())
    figures["labelChangeShare"] = float(changed.sum() / rows.sum()) if rows.sum() else None


def exceeded(figures: dict, limits: dict[str, float]) -> list[str]:
    """What in `figures` (from `drift`, with labelChange if measured) goes beyond `limits` (figure
    name → largest allowed value; weightChange compares its absolute value). With any limit set, a
    new or a retired component counts too: the segments themselves changed."""
    unknown = sorted(set(limits) - set(DRIFT_FIGURES))
    if unknown:
        raise ValueError(f"unknown drift figure '{unknown[0]}'; the figures are {', '.join(DRIFT_FIGURES)}")
    if not limits:
        return []
    alarms = []
    for c in figures["components"]:
        if c["previousId"] is None:
            alarms.append(f"component {c['id']} is new")
            continue
        for name, limit in limits.items():
            value = c.get(name)
            if value is not None and abs(value) > limit:
                alarms.append(f"component {c['id']}: {name} {abs(value):.4g} > {limit:g}")
    alarms += [f"component {r['previousId']} retired" for r in figures["retired"]]
    return alarms
