"""E-step of the latent class model over one block of rows, in plain numpy (no Spark).

A row's likelihood is Σ_j π_j · N(x_o | μ_j, Σ_j) · Π Bernoulli · Π categorical · Π Poisson over
its *observed* features only: a missing Bernoulli, categorical or count value drops its factor,
and the Gaussian block is the exact marginal over the observed coordinates. Rows are grouped by their
pattern of observed Gaussian coordinates, so each pattern costs one sub-covariance factorisation
per class and one matrix product, like complete data, when few patterns occur.

The Gaussian statistics are those of the exact EM with the missing coordinates as latent data:
each row contributes its conditional mean E[x | x_o, j] to the first moments and, on top of its
outer product, the conditional covariance of the missing coordinates to the second moments. They
are centred on each class's current mean (shifted coordinates: see `mixture`), so the M-step adds
the mean update without cancellation. A row with no Gaussian coordinate observed drops out of the
Gaussian statistics (its whole Gaussian factor is marginalised); a row with no feature observed at
all drops out of everything and is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .kernels import log_gaussian_density, normalize_log
from .mixture import ComponentStatistics, Mixture, packed_size, precision_cholesky

#: Probabilities enter logarithms clipped at the smallest normal double, so a probability of
#: exactly 0 (possible only with smoothing=0) gives a very unlikely row, never NaN.
TINY = np.finfo(np.float64).tiny


def log_probability(p: np.ndarray) -> np.ndarray:
    """log p, with p clipped at `TINY`."""
    return np.log(np.maximum(p, TINY))


@dataclass(frozen=True)
class MixedBlock:
    """One block of rows. Missing values: NaN in `gaussian`, NaN or -1 in `bernoulli`, -1 in
    `categorical`, NaN in `poisson`. Absent feature types are (n, 0) arrays."""

    gaussian: np.ndarray  # (n, d) float, shifted coordinates
    bernoulli: np.ndarray  # (n, m) float in {0, 1, -1, NaN}
    categorical: np.ndarray  # (n, c) integer level codes, -1 missing
    poisson: np.ndarray  # (n, q) float counts (whole numbers ≥ 0), NaN missing
    weights: np.ndarray | None = None  # (n,) row weights, None for 1

    @classmethod
    def of(cls, gaussian=None, bernoulli=None, categorical=None, poisson=None, weights=None) -> "MixedBlock":
        """A block from whichever arrays are given (at least one)."""
        n = len(next(a for a in (gaussian, bernoulli, categorical, poisson) if a is not None))
        empty = np.zeros((n, 0))
        return cls(
            np.asarray(empty if gaussian is None else gaussian, dtype=np.float64),
            np.asarray(empty if bernoulli is None else bernoulli, dtype=np.float64),
            np.asarray(empty if categorical is None else categorical, dtype=np.int64),
            np.asarray(empty if poisson is None else poisson, dtype=np.float64),
            None if weights is None else np.asarray(weights, dtype=np.float64),
        )

    @property
    def n(self) -> int:
        return self.gaussian.shape[0]

    @cached_property
    def bernoulli_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(observed, ones) as float64 (n, m) indicators, checked once per block (see
        `bernoulli_values`), shared by every model a pass evaluates."""
        observed, ones = bernoulli_values(self.bernoulli)
        return observed.astype(np.float64), ones.astype(np.float64)

    @cached_property
    def poisson_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(observed (n, q) float64 indicators, counts with missing as 0 (n, q), Σ log x! (n,))."""
        observed, counts = poisson_values(self.poisson)
        return observed.astype(np.float64), counts, _log_factorial(counts).sum(axis=1)  # log 0! = 0


@dataclass(frozen=True)
class _Pattern:
    """Rows sharing one set of observed Gaussian coordinates, and what the E-step needs of it."""

    rows: np.ndarray  # (n_p,) indices into the block
    observed: np.ndarray  # (|o|,) coordinate indices
    missing: np.ndarray  # (|m|,)
    regression: np.ndarray  # (k, |o|, |m|) Σ_oo⁻¹ Σ_om: E[x_m − μ_m | x_o] = (x_o − μ_o) · this
    conditional: np.ndarray  # (k, |m|, |m|) Σ_mm − Σ_mo Σ_oo⁻¹ Σ_om


def bernoulli_values(x: np.ndarray):
    """(observed, ones) boolean (n, m) masks; a value other than 0, 1, -1 or NaN is refused."""
    ones, zeros = x == 1, x == 0
    bad = ~(ones | zeros | (x == -1) | np.isnan(x))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"bernoulli column {col} holds {float(x[row, col])} ({int(bad[:, col].sum())} such values); "
            "expected 0, 1, or missing (NaN or -1)"
        )
    return ones | zeros, ones


def poisson_values(x: np.ndarray):
    """(observed mask, counts with missing as 0), both (n, q); a negative or fractional count is
    refused."""
    observed = ~np.isnan(x)
    counts = np.where(observed, x, 0.0)
    bad = (counts < 0) | (counts != np.floor(counts))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"poisson column {col} holds {float(x[row, col])} ({int(bad[:, col].sum())} such values); "
            "expected a whole number ≥ 0, or missing (NaN)"
        )
    return observed, counts


def _log_factorial(counts: np.ndarray) -> np.ndarray:
    """log(x!) elementwise, from lgamma over the distinct values."""
    distinct, inverse = np.unique(counts, return_inverse=True)
    return np.array([math.lgamma(v + 1.0) for v in distinct])[inverse].reshape(counts.shape)


def check_levels(codes: np.ndarray, levels: tuple[int, ...]) -> None:
    """Refuse level codes outside [-1, levels) with a message naming the column."""
    for col, count in enumerate(levels):
        bad = (codes[:, col] < -1) | (codes[:, col] >= count)
        if bad.any():
            raise ValueError(
                f"categorical column {col} holds level code {codes[bad, col][0]} ({int(bad.sum())} "
                f"such values); expected 0..{count - 1}, or -1 for missing"
            )


def _pattern_groups(observed: np.ndarray) -> list[np.ndarray]:
    """Row indices of each distinct row of the (n, d) boolean `observed`, in block order: rows
    packed into bytes and sorted (stable) by them, a few cheap integer keys whatever d is."""
    packed = np.packbits(observed, axis=1)
    order = np.lexsort(packed.T[::-1])
    ordered = packed[order]
    starts = np.flatnonzero((ordered[1:] != ordered[:-1]).any(axis=1)) + 1
    return np.split(order, starts) if len(order) else []


def _gaussian_terms(x: np.ndarray, gaussian: Mixture):
    """((n, k) log N(x_o | μ_jo, Σ_joo), 0 for rows with nothing observed; their patterns)."""
    n, k = x.shape[0], gaussian.k
    log_density = np.zeros((n, k))
    observed = ~np.isnan(x)
    patterns = []
    for rows in _pattern_groups(observed):
        o, m = np.flatnonzero(observed[rows[0]]), np.flatnonzero(~observed[rows[0]])
        if not o.size:
            continue
        if m.size:
            cov_oo = gaussian.covariances[:, o][:, :, o]
            sub = Mixture(gaussian.weights, gaussian.means[:, o], cov_oo, precision_cholesky(cov_oo))
        else:
            sub = gaussian
        log_density[rows] = log_gaussian_density(x[np.ix_(rows, o)], sub)
        cov_om = gaussian.covariances[:, o][:, :, m]
        p = sub.precisions_cholesky  # P Pᵀ = Σ_oo⁻¹
        regression = p @ (np.swapaxes(p, 1, 2) @ cov_om)
        conditional = gaussian.covariances[:, m][:, :, m] - np.swapaxes(cov_om, 1, 2) @ regression
        patterns.append(_Pattern(rows, o, m, regression, conditional))
    return log_density, patterns


def gaussian_posterior(x: np.ndarray, gaussian: Mixture) -> tuple[np.ndarray, np.ndarray]:
    """(log p(x_o) (n,), P(j | x_o) (n, k)) of the rows `x` (n, d), NaN marking missing
    coordinates, under the Gaussian mixture `gaussian` (same coordinates): the exact marginal over
    each row's observed coordinates, rows grouped by missingness pattern (the Gaussian block of
    `posterior`, for scoring a `GaussianMixtureModel`). Rows with nothing observed: NaN and 0."""
    terms, _ = _gaussian_terms(x, gaussian)
    seen = ~np.isnan(x).all(axis=1)
    log_density, resp = np.full(len(x), np.nan), np.zeros((len(x), gaussian.k))
    if seen.any():
        log_density[seen], resp[seen] = normalize_log(terms[seen] + np.log(gaussian.weights))
    return log_density, resp


def _bernoulli_terms(block: MixedBlock, probabilities: np.ndarray) -> np.ndarray:
    """(n, k) Σ over observed columns of log P(x | class)."""
    observed, ones = block.bernoulli_masks
    log_one, log_zero = log_probability(probabilities), log_probability(1.0 - probabilities)
    return ones @ log_one.T + (observed - ones) @ log_zero.T


def _categorical_terms(codes: np.ndarray, tables: tuple[np.ndarray, ...]) -> np.ndarray:
    """(n, k) Σ over observed columns of log P(level | class): a row gather from each column's
    (levels + 1, k) log table, whose last row (code -1: missing) is 0."""
    out = np.zeros((codes.shape[0], tables[0].shape[0]))
    for col, table in enumerate(tables):
        padded = np.vstack([log_probability(table).T, np.zeros(table.shape[0])])
        out += padded[codes[:, col]]
    return out


def _poisson_terms(block: MixedBlock, rates: np.ndarray) -> np.ndarray:
    """(n, k) Σ over observed columns of log Poisson(x | class rate)."""
    observed, counts, log_factorials = block.poisson_parts
    return counts @ log_probability(rates).T - observed @ rates.T - log_factorials[:, None]


@dataclass
class Posterior:
    """What the E-step knows of each row of a block under one model."""

    log_density: np.ndarray  # (n,) log p(observed part of the row); NaN where nothing is observed
    responsibilities: np.ndarray  # (n, k) P(class | observed part); 0 where nothing is observed
    patterns: list  # the Gaussian block's missingness patterns (for the statistics)


def posterior(model, block: MixedBlock) -> Posterior:
    """Log density and class responsibilities of every row of `block` under `model` (a
    `latent.LatentClassModel`): the E-step, and scoring."""
    check_levels(block.categorical, model.levels)
    joint = np.broadcast_to(np.log(model.weights), (block.n, model.k)).copy()
    seen = np.zeros(block.n, dtype=bool)
    patterns = []
    if model.d:
        terms, patterns = _gaussian_terms(block.gaussian, model.gaussian)
        joint += terms
        seen |= ~np.isnan(block.gaussian).all(axis=1)
    if model.m:
        joint += _bernoulli_terms(block, model.bernoulli)
        seen |= block.bernoulli_masks[0].any(axis=1)
    if model.levels:
        joint += _categorical_terms(block.categorical, model.categorical)
        seen |= (block.categorical >= 0).any(axis=1)
    if model.q:
        joint += _poisson_terms(block, model.poisson)
        seen |= block.poisson_parts[0].any(axis=1)
    log_density = np.full(block.n, np.nan)
    resp = np.zeros((block.n, model.k))
    if seen.any():
        log_density[seen], resp[seen] = normalize_log(joint[seen])
    return Posterior(log_density, resp, patterns)


def gaussian_moments(x: np.ndarray, gaussian: Mixture, patterns: list, weighted: np.ndarray):
    """(mass (k,), first (k, d), second (k, d(d+1)/2)): Σwγ, Σwγ(x̂ − μ_j) and
    Σwγ[(x̂ − μ_j)(x̂ − μ_j)ᵀ + Cov(x_m | x_o, j)] over rows with a Gaussian coordinate observed,
    where x̂ is the row with its missing coordinates replaced by E[x_m | x_o, j]. `weighted` is
    (n, k) row weight × responsibility. All classes of a pattern in a few batched products."""
    k, d = gaussian.k, gaussian.d
    mass, first, second = np.zeros(k), np.zeros((k, d)), np.zeros((k, d, d))
    for p in patterns:
        g = weighted[p.rows].T  # (k, n_p)
        dev = np.empty((k, len(p.rows), d))
        dev[:, :, p.observed] = x[np.ix_(p.rows, p.observed)] - gaussian.means[:, None, p.observed]
        dev[:, :, p.missing] = dev[:, :, p.observed] @ p.regression
        share = g.sum(axis=1)
        mass += share
        first += np.einsum("kn,knd->kd", g, dev)
        dev *= np.sqrt(g)[:, :, None]
        second += np.swapaxes(dev, 1, 2) @ dev
        second[np.ix_(np.arange(k), p.missing, p.missing)] += share[:, None, None] * p.conditional
    rows, cols = np.triu_indices(d)
    return mass, first, second[:, rows, cols]


def discrete_counts(block: MixedBlock, weighted: np.ndarray, levels: tuple[int, ...]) -> list[np.ndarray]:
    """[Bernoulli observed mass (k, m), Bernoulli ones (k, m), Poisson observed mass (k, q),
    Poisson count sums (k, q), then per categorical column its (k, levels) weighted counts]:
    sums of wγ (times the count, for Poisson) over the rows where each value is observed."""
    (observed, ones), (counted, counts, _) = block.bernoulli_masks, block.poisson_parts
    out = [weighted.T @ observed, weighted.T @ ones, weighted.T @ counted, weighted.T @ counts]
    k = weighted.shape[1]
    for col, count in enumerate(levels):
        codes = block.categorical[:, col]
        seen = codes >= 0
        cells = codes[seen, None] * k + np.arange(k)  # (level, class) cell of each (row, class)
        out.append(np.bincount(cells.ravel(), weighted[seen].ravel(), minlength=count * k).reshape(count, k).T)
    return out


def block_statistics(model, block: MixedBlock) -> np.ndarray:
    """The flat float64 E-step statistics of `block` under `model`, laid out as `Layout.unpack`
    reads them; partials of several blocks add up."""
    post = posterior(model, block)
    seen = ~np.isnan(post.log_density)
    w = np.ones(block.n) if block.weights is None else block.weights
    weighted = post.responsibilities * w[:, None]
    log_likelihood = float(w[seen] @ post.log_density[seen])
    hard = np.bincount(post.responsibilities[seen].argmax(axis=1), minlength=model.k)
    parts = [[log_likelihood, float((~seen).sum())], weighted.sum(axis=0), hard]
    if model.d:
        parts.extend(gaussian_moments(block.gaussian, model.gaussian, post.patterns, weighted))
    parts.extend(discrete_counts(block, weighted, model.levels))
    return np.concatenate([np.ravel(p) for p in parts]).astype(np.float64)


@dataclass
class LatentStatistics:
    """One E-step's reduced statistics (see `Layout.unpack`)."""

    log_likelihood: float  # Σ w·log p(observed part of the row)
    skipped_rows: int  # rows with no feature observed: not in any statistic
    resp: np.ndarray  # (k,) Σwγ (named as in `mixture.ComponentStatistics`, which `em` reads)
    hard_counts: np.ndarray  # (k,) rows whose most probable class is j (unweighted)
    gaussian: ComponentStatistics | None  # over rows with a Gaussian coordinate observed
    bernoulli_observed: np.ndarray  # (k, m) Σwγ where the column is observed
    bernoulli_ones: np.ndarray  # (k, m) Σwγ where it is 1
    poisson_observed: np.ndarray  # (k, q) Σwγ where the count is observed
    poisson_sums: np.ndarray  # (k, q) Σwγx
    categorical_counts: list[np.ndarray]  # per column (k, levels) Σwγ per level


@dataclass(frozen=True)
class Layout:
    """Shape of the flat statistics vector of a model with k classes, d Gaussian coordinates,
    m Bernoulli columns, the given categorical level counts and q count columns:
    [log-likelihood, skipped rows, mass (k), hard counts (k),
     if d: Gaussian mass (k), first moments (k·d), packed second moments (k·d(d+1)/2),
     Bernoulli observed mass (k·m), Bernoulli ones (k·m), Poisson observed mass (k·q),
     Poisson sums (k·q), each categorical table (k·levels)]."""

    k: int
    d: int
    m: int
    levels: tuple[int, ...]
    q: int = 0

    @classmethod
    def of(cls, model) -> "Layout":
        return cls(model.k, model.d, model.m, model.levels, model.q)

    def discrete_sizes(self) -> list[int]:
        k = self.k
        return [k * self.m, k * self.m, k * self.q, k * self.q] + [k * n for n in self.levels]

    def _sizes(self) -> list[int]:
        k, d = self.k, self.d
        gaussian = [k, k * d, k * packed_size(d)] if d else []
        return [1, 1, k, k] + gaussian + self.discrete_sizes()

    @property
    def size(self) -> int:
        return sum(self._sizes())

    def discrete(self, parts: list[np.ndarray]) -> tuple:
        """(Bernoulli observed, ones, Poisson observed, sums, [categorical tables]), each (k, ·)."""
        observed, ones, counted, sums, *tables = (p.reshape(self.k, -1) for p in parts)
        return observed, ones, counted, sums, tables

    def unpack(self, flat: np.ndarray) -> LatentStatistics:
        if flat.shape != (self.size,):
            raise ValueError(f"statistics of length {flat.shape} do not fit {self}")
        ll, skipped, mass, hard, *rest = np.split(flat, np.cumsum(self._sizes())[:-1])
        gaussian = None
        if self.d:
            g_mass, first, second, *rest = rest
            gaussian = ComponentStatistics(
                float(ll[0]), g_mass, hard, first.reshape(self.k, self.d), second.reshape(self.k, -1)
            )
        return LatentStatistics(float(ll[0]), int(skipped[0]), mass, hard, gaussian, *self.discrete(rest))
