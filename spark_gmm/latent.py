"""The latent class model over mixed features: parameters, passes, M-step, start.

k classes; given its class, a row's feature blocks are independent: one multivariate Gaussian
over the numeric columns (any covariance type of `mixture`, kept through precision Cholesky
factors in a `mixture.Mixture`), one Bernoulli per binary column, one categorical distribution
per categorical column, one Poisson per count column. Plain numpy, no Spark: a mixed row is
packed into one float64 row (`Columns`), and a block's E-step (`latent_estep`) returns ONE flat
float64 vector; the vectors of all blocks add up, so the engines that reduce Gaussian statistics
by summing run these passes unchanged.

Smoothing: the Bernoulli and categorical M-steps are the maximum a posteriori estimates under a
symmetric Beta/Dirichlet prior that adds `smoothing` pseudo-rows (in units of row weight) to
every outcome of every column in every class: p = (Σwγ·[x = level] + α) / (Σwγ·[x observed] + Lα)
with L = 2 for a Bernoulli; a Poisson rate gets α pseudo-rows of count 1 (a Gamma(1 + α, α)
prior): λ = (Σwγx + α) / (Σwγ·[x observed] + α). With α > 0 no probability is exactly 0 or 1 and
no rate is 0, even for a level a class never shows; EM then increases log-likelihood +
`log_prior` monotonically.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .kernels import SumPass, row_uniforms, shifted
from .latent_estep import (
    Layout, LatentStatistics, MixedBlock, block_statistics, check_levels, discrete_counts, log_probability,
)
from .mixture import (
    CONSTRAINTS,
    EMPTY_SHARE,
    WEIGHT_FLOOR,
    Mixture,
    m_step as gaussian_m_step,
    packed_size,
    precision_cholesky,
    regularisation_allowance,
)

#: Default `smoothing`: a hundredth of a row per outcome, negligible beside any class worth
#: keeping, yet enough to keep every log-probability finite.
SMOOTHING = 0.01


@dataclass(frozen=True)
class LatentClassModel:
    """Class weights and each class's per-block parameters."""

    weights: np.ndarray  # (k,)
    gaussian: Mixture | None  # (k, d) means in shifted coordinates; its weights (unused by the E-step)
    # are each class's share of the mass with a Gaussian value observed, after an M-step
    covariance_type: str
    bernoulli: np.ndarray  # (k, m) P(x = 1 | class)
    categorical: tuple[np.ndarray, ...]  # per categorical column, (k, levels) P(level | class)
    poisson: np.ndarray  # (k, q) rate of each count column per class

    @classmethod
    def create(cls, weights, means=None, covariances=None, covariance_type="full", bernoulli=None,
               categorical=(), poisson=None, reg_covar: float = 0.0) -> "LatentClassModel":
        """A validated model. `covariances` are full (k, d, d) matrices for every covariance type
        (as in `mixture`), repaired or refused by `mixture.positive_definite`."""
        weights = np.asarray(weights, dtype=np.float64)
        k = len(weights)
        if covariance_type not in CONSTRAINTS:
            raise ValueError(f"covariance type {covariance_type!r}: expected one of {tuple(CONSTRAINTS)}")
        gaussian = None
        if means is not None and np.shape(means)[1]:
            gaussian = Mixture.from_covariances(weights, means, covariances, reg_covar)
        bernoulli = np.zeros((k, 0)) if bernoulli is None else np.asarray(bernoulli, dtype=np.float64)
        tables = tuple(np.asarray(t, dtype=np.float64) for t in categorical)
        for name, p in [("bernoulli", bernoulli)] + [(f"categorical column {c}", t) for c, t in enumerate(tables)]:
            if p.shape[0] != k or not ((p >= 0) & (p <= 1)).all():
                raise ValueError(f"{name}: expected {k} rows of probabilities in [0, 1], got shape {p.shape}")
        for c, t in enumerate(tables):
            if not np.allclose(t.sum(axis=1), 1.0):
                raise ValueError(f"categorical column {c}: each class's probabilities must sum to 1")
        rates = np.zeros((k, 0)) if poisson is None else np.asarray(poisson, dtype=np.float64)
        if rates.shape[0] != k or not (rates >= 0).all():
            raise ValueError(f"poisson: expected {k} rows of rates ≥ 0, got shape {rates.shape}")
        return cls(weights / weights.sum(), gaussian, covariance_type, bernoulli, tables, rates)

    @property
    def k(self) -> int:
        return len(self.weights)

    @property
    def d(self) -> int:
        return 0 if self.gaussian is None else self.gaussian.d

    @property
    def m(self) -> int:
        return self.bernoulli.shape[1]

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(t.shape[1] for t in self.categorical)

    @property
    def q(self) -> int:
        """Number of count (Poisson) columns."""
        return self.poisson.shape[1]

    def free_parameters(self) -> int:
        """Free parameters (for BIC and AIC): weights, Gaussian block (counted as scikit-learn
        does), one per Bernoulli or count column and class, levels − 1 per categorical column and
        class."""
        k, d = self.k, self.d
        covariance = {"full": k * packed_size(d), "diag": k * d, "spherical": k, "tied": packed_size(d)}
        gaussian = covariance[self.covariance_type] + k * d if d else 0
        return k - 1 + gaussian + k * (self.m + self.q) + k * sum(n - 1 for n in self.levels)


def model_arrays(model: LatentClassModel) -> dict[str, np.ndarray]:
    """The model's non-empty arrays by name (saves and checkpoints): weights, means, covariances
    and gaussianWeights (with a Gaussian block), bernoulli, poisson, categorical0, categorical1, ..."""
    arrays = {"weights": model.weights, "bernoulli": model.bernoulli, "poisson": model.poisson,
              **{f"categorical{i}": t for i, t in enumerate(model.categorical)}}
    if model.d:
        g = model.gaussian
        arrays.update(means=g.means, covariances=g.covariances, gaussianWeights=g.weights)
    return {name: a for name, a in arrays.items() if a.size}


def model_of_arrays(arrays: dict[str, np.ndarray], covariance_type: str) -> LatentClassModel:
    """The model `model_arrays` gave `arrays` for, bit for bit (no validation, no normalisation:
    `LatentClassModel.create` is for models from elsewhere)."""
    weights = arrays["weights"]
    k = len(weights)
    gaussian = None
    if "means" in arrays:
        covariances = arrays["covariances"]
        gaussian = Mixture(arrays["gaussianWeights"], arrays["means"], covariances, precision_cholesky(covariances))
    tables = []
    while f"categorical{len(tables)}" in arrays:
        tables.append(arrays[f"categorical{len(tables)}"])
    empty = np.zeros((k, 0))
    return LatentClassModel(weights, gaussian, covariance_type, arrays.get("bernoulli", empty), tuple(tables),
                            arrays.get("poisson", empty))


# -- rows in cached blocks, and the E-step pass ---------------------------------------------------


@dataclass(frozen=True)
class Columns:
    """How a mixed row sits in one float64 row of a cached block: d Gaussian, m Bernoulli,
    c categorical (level codes), q count columns, in that order, every missing value NaN. One
    float64 matrix per block is what the engines cache and hand to a pass as (raw, x = raw −
    shift, w); level codes are exact in float64 up to 2⁵³."""

    d: int
    m: int
    c: int
    q: int

    def pack(self, gaussian=None, bernoulli=None, categorical=None, poisson=None) -> np.ndarray:
        """(n, d + m + c + q) float64 rows from the typed arrays of `MixedBlock.of` (-1 → NaN)."""
        b = MixedBlock.of(gaussian, bernoulli, categorical, poisson)
        widths = tuple(a.shape[1] for a in (b.gaussian, b.bernoulli, b.categorical, b.poisson))
        if widths != (self.d, self.m, self.c, self.q):
            raise ValueError(f"arrays of widths {widths} do not fit {self}")
        codes = np.where(b.categorical < 0, np.nan, b.categorical.astype(np.float64))
        return np.hstack([b.gaussian, np.where(b.bernoulli == -1, np.nan, b.bernoulli), codes, b.poisson])

    def shift(self, rows: np.ndarray) -> np.ndarray:
        """Per column of `rows`: the midpoint of each Gaussian column's observed values (0 if it
        has none), 0 for the others, whose values are used unshifted."""
        shift = np.zeros(rows.shape[1])
        gaussian = rows[:, : self.d]
        seen = ~np.isnan(gaussian).all(axis=0)
        shift[: self.d][seen] = np.nanmin(gaussian[:, seen], axis=0) / 2 + np.nanmax(gaussian[:, seen], axis=0) / 2
        return shift

    def block(self, raw: np.ndarray, x: np.ndarray, w: np.ndarray | None) -> MixedBlock:
        """The `MixedBlock` of a cached block: Gaussian columns shifted (`x`), the rest as stored."""
        d, m, c = self.d, self.m, self.c
        codes = raw[:, d + m : d + m + c]
        return MixedBlock(
            x[:, :d], raw[:, d : d + m], np.where(np.isnan(codes), -1, codes).astype(np.int64), raw[:, d + m + c :], w
        )


class MixedEStepPass(SumPass):
    """E-step statistics of several candidate models in one pass (concatenated, in order): the
    `kernels` pass protocol, so any engine's `reduce` runs it."""

    label = "E-step"

    def __init__(self, models: list, columns: Columns):
        self.models, self.columns = models, columns
        self.layouts = [Layout.of(model) for model in models]
        self.partial_bytes = 8 * sum(layout.size for layout in self.layouts)

    def map_block(self, raw, shift, w):
        block = self.columns.block(raw, shifted(raw, shift), w)
        return np.concatenate([block_statistics(model, block) for model in self.models])

    def split(self, flat: np.ndarray) -> list:
        """The `latent.LatentStatistics` of each model."""
        cuts = np.cumsum([layout.size for layout in self.layouts])[:-1]
        return [layout.unpack(part) for layout, part in zip(self.layouts, np.split(flat, cuts))]


# -- M-step ---------------------------------------------------------------------------------------


def smoothed(counts: np.ndarray, observed: np.ndarray, outcomes: int, smoothing: float, previous: np.ndarray):
    """(counts + α) / (observed + outcomes·α), keeping `previous` where nothing was observed."""
    denominator = observed + outcomes * smoothing
    defined = denominator > 0
    safe = np.where(defined, denominator, 1.0)
    return np.where(defined, (counts + smoothing) / safe, previous)


def m_step(stats: LatentStatistics, current: LatentClassModel, reg_covar: float, smoothing: float = SMOOTHING):
    """New model from the statistics gathered under `current`; returns (model, empty classes).

    A class with less than `mixture.EMPTY_SHARE` of the total mass keeps its parameters (with a
    floored weight); the Gaussian block is `mixture.m_step` on its own statistics.
    """
    total = stats.resp.sum()
    if not total > 0:
        raise ValueError("no row has an observed feature: nothing to fit")
    empty = stats.resp <= EMPTY_SHARE * total
    weights = np.maximum(stats.resp / total, WEIGHT_FLOOR)
    weights /= weights.sum()
    gaussian = current.gaussian
    if gaussian is not None and stats.gaussian.resp.sum() > 0:
        gaussian = gaussian_m_step(stats.gaussian, gaussian, reg_covar, current.covariance_type)[0]
    if gaussian is not None:  # the regulariser's N_j (`LatentFamily.decrease_allowance`)
        gaussian = replace(gaussian, weights=stats.gaussian.resp / total)
    keep = empty[:, None]
    bernoulli = smoothed(stats.bernoulli_ones, stats.bernoulli_observed, 2, smoothing, current.bernoulli)
    bernoulli = np.where(keep, current.bernoulli, bernoulli)
    tables = tuple(
        np.where(keep, old, smoothed(counts, counts.sum(axis=1, keepdims=True), old.shape[1], smoothing, old))
        for counts, old in zip(stats.categorical_counts, current.categorical)
    )
    rates = smoothed(stats.poisson_sums, stats.poisson_observed, 1, smoothing, current.poisson)
    rates = np.where(keep, current.poisson, rates)
    model = LatentClassModel(weights, gaussian, current.covariance_type, bernoulli, tables, rates)
    return model, np.flatnonzero(empty)


def log_prior(model: LatentClassModel, smoothing: float) -> float:
    """log of the Beta/Dirichlet/Gamma prior density behind `smoothing` (up to a constant):
    α Σ log p over every outcome of every column and class, and α Σ (log λ − λ) over the rates.
    log-likelihood + this never decreases in exact-arithmetic EM without regCovar."""
    if smoothing == 0:
        return 0.0
    terms = [log_probability(model.bernoulli).sum() + log_probability(1.0 - model.bernoulli).sum()]
    terms += [log_probability(t).sum() for t in model.categorical]
    terms += [(log_probability(model.poisson) - model.poisson).sum()]
    return smoothing * float(sum(terms))


# -- start: random responsibilities from each row's content, then one statistics pass -----------


def random_responsibilities(raw: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(n, k) responsibilities uniform on the simplex (normalised exponentials of k hashed
    uniforms per row) for the (n, width) packed rows `raw` (see `Columns`). They are a pure
    function of (seed, row values), so the start depends neither on partitioning nor on row
    order; copies of a row start alike, which EM never separates anyway."""
    canonical = np.where(np.isnan(raw), np.nan, raw)  # one NaN bit pattern
    draws = np.column_stack([-np.log1p(-row_uniforms(canonical, seed, stream)) for stream in range(k)])
    return draws / draws.sum(axis=1, keepdims=True)


def initial_statistics(block: MixedBlock, resp: np.ndarray, levels: tuple[int, ...]) -> np.ndarray:
    """Flat statistics for the start from given (n, k) responsibilities (random ones, or a hard
    assignment): [mass (k), per class and Gaussian coordinate observed mass, Σwγx, Σwγx² (3·k·d),
    then the discrete counts as in `Layout`]. Gaussian moments are over observed values only
    (available cases): there is no model yet to impute the missing ones from."""
    check_levels(block.categorical, levels)
    w = np.ones(block.n) if block.weights is None else block.weights
    weighted = resp * w[:, None]
    x = block.gaussian
    seen = ~np.isnan(x)
    filled = np.where(seen, x, 0.0)
    gaussian = [weighted.T @ seen, weighted.T @ filled, weighted.T @ filled**2]
    parts = [weighted.sum(axis=0)] + gaussian + discrete_counts(block, weighted, levels)
    return np.concatenate([np.ravel(p) for p in parts]).astype(np.float64)


def initial_model(flat: np.ndarray, layout: Layout, covariance_type: str, reg_covar: float,
                  smoothing: float = SMOOTHING) -> LatentClassModel:
    """The starting model from summed `initial_statistics`: Gaussian blocks start with diagonal
    covariances (per coordinate over its observed values), constrained to `covariance_type`."""
    k, d = layout.k, layout.d
    sizes = [k, k * d, k * d, k * d] + layout.discrete_sizes()
    mass, observed, sums, squares, *rest = np.split(flat, np.cumsum(sizes)[:-1])
    observed, sums, squares = (a.reshape(k, d) for a in (observed, sums, squares))
    bernoulli_observed, ones, counted, count_sums, counts = layout.discrete(rest)
    if (observed <= 0).any():
        j, f = np.argwhere(observed <= 0)[0]
        raise ValueError(f"Gaussian coordinate {f} has no observed value in start class {j}")
    means = sums / observed
    variances = np.maximum(squares / observed - means**2, 0.0)
    covariances = variances[:, :, None] * np.eye(d)
    covariances = CONSTRAINTS[covariance_type](covariances, mass) + reg_covar * np.eye(d)
    bernoulli = smoothed(ones, bernoulli_observed, 2, smoothing, np.full((k, layout.m), 0.5))
    tables = [smoothed(c, c.sum(axis=1, keepdims=True), c.shape[1], smoothing, np.full(c.shape, 1 / c.shape[1]))
              for c in counts]
    rates = smoothed(count_sums, counted, 1, smoothing, np.ones((k, layout.q)))
    return LatentClassModel.create(
        mass, means, covariances, covariance_type, bernoulli, tables, rates, reg_covar=reg_covar
    )


class MixedStartPass(SumPass):
    """`initial_statistics` of hashed random responsibilities, for several seeds in one pass."""

    label = "random start"

    def __init__(self, k: int, seeds: list[int], levels: tuple[int, ...], columns: Columns):
        self.k, self.seeds, self.levels, self.columns = k, seeds, levels, columns
        layout = Layout(k, columns.d, columns.m, levels, columns.q)
        self.partial_bytes = 8 * len(seeds) * (k + 3 * k * columns.d + sum(layout.discrete_sizes()))

    def map_block(self, raw, shift, w):
        block = self.columns.block(raw, shifted(raw, shift), w)
        return np.concatenate([
            initial_statistics(block, random_responsibilities(raw, self.k, seed), self.levels)
            for seed in self.seeds
        ])

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        return np.split(flat, len(self.seeds))


# -- the model family `em.fit` runs (see `families.ModelFamily`) --------------------------------


@dataclass(frozen=True)
class LatentFamily:
    """Latent class models over rows packed by `columns`, its categorical columns having `levels`
    levels. EM increases log-likelihood + `log_prior`. Starts are random responsibilities
    (`MixedStartPass`; `initMode` is not read). Not offered yet: restarts of dead classes and
    challengers (a class split must perturb the discrete tables too, not only the means)."""

    columns: Columns
    levels: tuple[int, ...] = ()
    smoothing: float = SMOOTHING

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(int(n) for n in self.levels))  # hashable, comparable
        if len(self.levels) != self.columns.c:
            raise ValueError(f"{len(self.levels)} level counts for {self.columns.c} categorical columns")

    def estep_pass(self, models: list[LatentClassModel], settings: list) -> MixedEStepPass:
        return MixedEStepPass(models, self.columns)  # each model knows its covariance type

    def m_step(self, stats: LatentStatistics, model: LatentClassModel, settings):
        return m_step(stats, model, settings.reg_covar, self.smoothing)

    def objective(self, stats: LatentStatistics, model: LatentClassModel) -> float:
        return stats.log_likelihood + log_prior(model, self.smoothing)

    def decrease_allowance(self, previous, current: LatentClassModel, stats, settings) -> float:
        """`mixture.regularisation_allowance` of the Gaussian block, whose weights are its own masses
        (the N_j of the M-step's penalty); without `stats`, so a resumed fit tests the same bound."""
        if current.gaussian is None:
            return 0.0
        return regularisation_allowance(previous.gaussian, current.gaussian, settings.reg_covar)

    def start_steps(self, d: int, settings):
        """`settings.start`, or the start of hashed random responsibilities for `settings.seed`."""
        if settings.start is not None:
            return settings.start
        start = MixedStartPass(settings.k, [settings.seed], self.levels, self.columns)
        (flat,) = start.split((yield start))
        layout = Layout(settings.k, self.columns.d, self.columns.m, self.levels, self.columns.q)
        return initial_model(flat, layout, settings.covariance_type, settings.reg_covar, self.smoothing)

    def start_name(self, settings) -> str:
        return "initial model" if settings.start is not None else f"random responsibilities, k={settings.k}"

    def floor(self, start: LatentClassModel, settings) -> None:
        return None

    def restart(self, stats, previous, model: LatentClassModel, dead, budget: int, settings):
        return model, []

    def challengers(self, model: LatentClassModel, settings) -> list:
        return []

    def underdetermined(self, stats, total_weight: float, settings) -> bool:
        return False

    def to_arrays(self, model: LatentClassModel) -> dict[str, np.ndarray]:
        return model_arrays(model)

    def from_arrays(self, arrays: dict[str, np.ndarray], settings) -> LatentClassModel:
        return model_of_arrays(arrays, settings.covariance_type)
