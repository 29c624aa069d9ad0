"""The latent class model's numpy core (`latent`, `latent_estep`), fitted by the one EM loop
(`em.fit` with `latent.LatentFamily`), against independent references: StepMix (its own E- and
M-steps, run from the same start), brute-force marginal likelihoods and EM updates of a
full-covariance Gaussian mixture with missing coordinates, and generated classes."""

import warnings
from typing import Callable, NamedTuple

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, poisson
from sklearn.metrics import adjusted_rand_score
from stepmix.stepmix import StepMix

from spark_gmm import em
from spark_gmm.latent import (
    SMOOTHING,
    Columns,
    LatentClassModel,
    LatentFamily,
    MixedEStepPass,
    MixedStartPass,
    initial_model,
    initial_statistics,
    m_step,
)
from spark_gmm.latent_estep import Layout, MixedBlock, block_statistics, posterior
from spark_gmm.local import local_reduce
from spark_gmm.mixture import CONSTRAINTS

LEVELS = (3, 4, 5)
MAX_LEVELS = max(LEVELS)


# -- data and helpers ------------------------------------------------------------------------------


def generated(rng, n, k=3, d=2, m=6, levels=LEVELS, spread=3.0, sharp=0.8, q=2):
    """(labels, gaussian (n, d), bernoulli (n, m), codes (n, c), counts (n, q)) from a latent
    class model whose classes differ in every block: Gaussian means `spread` apart, Bernoulli
    probabilities near `sharp` or 1 − `sharp`, categorical tables peaked on a class-specific
    level, Poisson rates between 0.5 and 8."""
    labels = rng.choice(k, size=n, p=np.linspace(1, 2, k) / np.linspace(1, 2, k).sum())
    means = rng.normal(scale=spread, size=(k, d))
    gaussian = means[labels] + rng.normal(size=(n, d)) * rng.uniform(0.5, 1.5, size=(k, d))[labels]
    p = np.where(rng.random((k, m)) < 0.5, sharp, 1 - sharp)
    bernoulli = (rng.random((n, m)) < p[labels]).astype(float)
    codes = np.empty((n, len(levels)), dtype=np.int64)
    for c, count in enumerate(levels):
        tables = np.full((k, count), 0.3 / (count - 1))
        tables[np.arange(k), np.arange(k) % count] = 0.7
        codes[:, c] = [rng.choice(count, p=tables[j]) for j in labels]
    counts = rng.poisson(rng.uniform(0.5, 8.0, size=(k, q))[labels]).astype(float)
    return labels, gaussian, bernoulli, codes, counts


def with_missing(rng, a, share, missing):
    a = a.copy()
    a[rng.random(a.shape) < share] = missing
    return a


def random_start(rng, k, d=0, m=0, levels=(), diagonal=True, q=0):
    """A random model: weights, means, diagonal or full covariances, probabilities, tables, rates."""
    means = rng.normal(size=(k, d))
    if diagonal:
        covariances = rng.uniform(0.5, 2.0, size=(k, d))[:, :, None] * np.eye(d)
    else:
        a = rng.normal(scale=0.5, size=(k, d, d))
        covariances = a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(d)
    return LatentClassModel.create(
        rng.uniform(1, 2, size=k), means, covariances, "diag" if diagonal else "full",
        rng.uniform(0.2, 0.8, size=(k, m)), [rng.dirichlet(np.ones(n) * 3, size=k) for n in levels],
        rng.uniform(1.0, 5.0, size=(k, q)),
    )


def em_fit(rows, start=None, seeds=(0,), max_iter=100, tol=1e-8, reg_covar=1e-6, smoothing=SMOOTHING, reseed=False):
    """`em.fit` of the latent class family over `rows`: from `start`, or (k=3, full covariance)
    from each seed's random start, the seeds in shared passes; plain EM unless `reseed`."""
    levels = start.levels if start is not None else LEVELS[: rows.columns.c]
    family = LatentFamily(rows.columns, levels, smoothing)
    k, covariance_type = (start.k, start.covariance_type) if start is not None else (3, "full")
    candidates = [
        em.FitSettings(k=k, max_iter=max_iter, tol=tol, reg_covar=reg_covar, seed=seed, start=start,
                       covariance_type=covariance_type, reseed=reseed, family=family)
        for seed in seeds
    ]
    results = em.fit(rows.reduce, rows.columns.d, rows.observed, candidates)
    return results if start is None else results[0]


def em_steps(model, rows, steps, reg_covar, smoothing=0.0):
    """`steps` EM steps (`em.fit`, plain EM); returns the model and the mean log-likelihood
    before each step."""
    result = em_fit(rows, model, max_iter=steps, tol=0.0, reg_covar=reg_covar, smoothing=smoothing)
    assert result.iterations == steps
    return result.mixture, [ll / rows.observed for ll in result.history[:steps]]


def stepmix_for(model, measurement, gaussian_key="g", categorical_key="c"):
    """A StepMix estimator holding the parameters of `model` (diagonal Gaussian block)."""
    sm = StepMix(n_components=model.k, measurement=measurement, verbose=0, progress_bar=0, random_state=0)
    params = {}
    if model.d:
        params[gaussian_key] = {
            "means": model.gaussian.means.copy(),
            "covariances": np.diagonal(model.gaussian.covariances, axis1=1, axis2=2).copy(),
        }
    if model.m:
        params["b"] = {"pis": model.bernoulli.copy()}
    if model.levels:
        pis = np.zeros((model.k, len(model.levels) * MAX_LEVELS))
        for c, table in enumerate(model.categorical):
            pis[:, c * MAX_LEVELS : c * MAX_LEVELS + table.shape[1]] = table
        params[categorical_key] = {"pis": pis, "max_n_outcomes": MAX_LEVELS, "total_outcomes": sum(model.levels)}
    measurement_in = model.d + model.m + len(model.levels)
    if isinstance(measurement, str):
        (params,) = params.values()
    sm.set_parameters({"weights": model.weights.copy(), "measurement": params, "measurement_in": measurement_in})
    return sm


def stepmix_steps(sm, x, steps):
    """StepMix's own E- and M-steps; returns the mean log-likelihood before each step."""
    lls = []
    for _ in range(steps):
        ll, log_resp = sm._e_step(x)
        lls.append(ll)
        sm._m_step(x, np.exp(log_resp))
    return lls


def stepmix_parameters(sm, model):
    """(weights, means, diagonal variances, bernoulli, tables) of `sm`, in `model`'s shapes."""
    mm = sm._mm
    models = mm.models if hasattr(mm, "models") else {"only": mm}
    out = {"weights": sm.weights_}
    for emission in models.values():
        p = emission.parameters
        if "means" in p:
            out["means"], out["variances"] = p["means"], p["covariances"]
        elif p.get("max_n_outcomes"):
            out["tables"] = [p["pis"][:, c * MAX_LEVELS : c * MAX_LEVELS + n] for c, n in enumerate(model.levels)]
        else:
            out["bernoulli"] = p["pis"]
    return out


def assert_same_parameters(model, sm, atol=1e-6):
    theirs = stepmix_parameters(sm, model)
    np.testing.assert_allclose(model.weights, theirs["weights"], atol=atol)
    if model.d:
        np.testing.assert_allclose(model.gaussian.means, theirs["means"], atol=atol)
        ours = np.diagonal(model.gaussian.covariances, axis1=1, axis2=2)
        np.testing.assert_allclose(ours, theirs["variances"], atol=atol)
    if model.m:
        np.testing.assert_allclose(model.bernoulli, theirs["bernoulli"], atol=atol)
    for ours, table in zip(model.categorical, theirs.get("tables", [])):
        np.testing.assert_allclose(ours, table, atol=atol)


class Rows(NamedTuple):
    reduce: Callable  # the in-memory engine's reduce(pass)
    columns: Columns
    observed: float  # rows with something observed: what EM divides by


def engine(gaussian=None, bernoulli=None, codes=None, counts=None, size=97, shifted=False) -> Rows:
    """The in-memory engine over the packed rows, in blocks of `size`; the Gaussian columns
    shifted by their midpoints if `shifted`, else left as they are."""
    block = MixedBlock.of(gaussian, bernoulli, codes, counts)
    widths = [a.shape[1] for a in (block.gaussian, block.bernoulli, block.categorical, block.poisson)]
    columns = Columns(*widths)
    rows = columns.pack(gaussian, bernoulli, codes, counts)
    shift = columns.shift(rows) if shifted else np.zeros(rows.shape[1])
    observed = float((~np.isnan(rows)).any(axis=1).sum())
    return Rows(local_reduce(rows, None, size, shift), columns, observed)


# -- equal to StepMix from an identical start ------------------------------------------------------


def test_bernoulli_em_equals_stepmix(rng):
    _, _, bernoulli, _, _ = generated(rng, 800, m=8)
    start = random_start(rng, 3, m=8)
    ours, our_lls = em_steps(start, engine(bernoulli=bernoulli), 40, reg_covar=0.0)
    sm = stepmix_for(start, "bernoulli")
    their_lls = stepmix_steps(sm, bernoulli, 40)
    np.testing.assert_allclose(our_lls, their_lls, rtol=0, atol=1e-6)
    assert our_lls[-1] - our_lls[0] > 0.01  # EM moved: the comparison is not of a fixed point
    assert_same_parameters(ours, sm)


def test_categorical_em_equals_stepmix(rng):
    _, _, _, codes, _ = generated(rng, 800)
    start = random_start(rng, 3, levels=LEVELS)
    ours, our_lls = em_steps(start, engine(codes=codes), 40, reg_covar=0.0)
    sm = stepmix_for(start, "categorical")
    their_lls = stepmix_steps(sm, codes.astype(float), 40)
    np.testing.assert_allclose(our_lls, their_lls, rtol=0, atol=1e-6)
    assert our_lls[-1] - our_lls[0] > 0.01
    assert_same_parameters(ours, sm)


def test_mixed_em_equals_stepmix(rng):
    _, gaussian, bernoulli, codes, _ = generated(rng, 800, d=3)
    start = random_start(rng, 3, d=3, m=6, levels=LEVELS)
    ours, our_lls = em_steps(start, engine(gaussian, bernoulli, codes), 40, reg_covar=1e-6)
    descriptor = {
        "g": {"model": "gaussian_diag", "n_columns": 3},
        "b": {"model": "bernoulli", "n_columns": 6},
        "c": {"model": "categorical", "n_columns": len(LEVELS)},
    }
    sm = stepmix_for(start, descriptor)
    their_lls = stepmix_steps(sm, np.hstack([gaussian, bernoulli, codes]), 40)
    np.testing.assert_allclose(our_lls, their_lls, rtol=0, atol=1e-6)
    assert our_lls[-1] - our_lls[0] > 0.1
    assert_same_parameters(ours, sm)


def test_missing_discrete_em_equals_stepmix_nan_models(rng):
    """Bernoulli and categorical factors of missing values are skipped: the same update as
    StepMix's `*_nan` models, step by step; NaN and -1 both mean missing."""
    _, _, bernoulli, codes, _ = generated(rng, 800)
    bernoulli = with_missing(rng, bernoulli, 0.2, np.nan)
    codes_missing = with_missing(rng, codes, 0.2, -1)
    ours_input = np.where(rng.random(bernoulli.shape) < 0.5, np.nan_to_num(bernoulli, nan=-1), bernoulli)
    start = random_start(rng, 3, m=6, levels=LEVELS)
    ours, our_lls = em_steps(start, engine(bernoulli=ours_input, codes=codes_missing), 40, reg_covar=0.0)
    descriptor = {
        "b": {"model": "bernoulli_nan", "n_columns": 6},
        "c": {"model": "categorical_nan", "n_columns": len(LEVELS)},
    }
    sm = stepmix_for(start, descriptor)
    their_codes = np.where(codes_missing < 0, np.nan, codes_missing)
    their_lls = stepmix_steps(sm, np.hstack([bernoulli, their_codes]), 40)
    np.testing.assert_allclose(our_lls, their_lls, rtol=0, atol=1e-6)
    assert_same_parameters(ours, sm)


def test_missing_diag_gaussian_fit_equals_stepmix_nan_model(rng):
    """Same likelihood at every parameter value, and the same maximum: StepMix's diagonal
    `gaussian_diag_nan` drops missing coordinates from the update, the exact EM imputes them
    (another EM for the same likelihood), so the two agree where both have converged. They start
    from the generating classes' hard assignment, in the basin of one maximum."""
    labels, gaussian, bernoulli, _, _ = generated(rng, 600, d=3, spread=4.0)
    gaussian = with_missing(rng, gaussian, 0.25, np.nan)
    gaussian[:5] = np.nan  # rows whose whole Gaussian block is missing
    bernoulli = with_missing(rng, bernoulli, 0.15, np.nan)
    truth = initial_statistics(MixedBlock.of(gaussian, bernoulli), np.eye(3)[labels], ())
    start = initial_model(truth, Layout(3, 3, 6, ()), "diag", 0.0, smoothing=1.0)
    rows = engine(gaussian, bernoulli)
    descriptor = {"g": {"model": "gaussian_diag_nan", "n_columns": 3}, "b": {"model": "bernoulli_nan", "n_columns": 6}}
    sm = stepmix_for(start, descriptor)
    x = np.hstack([gaussian, bernoulli])
    assert sm._e_step(x)[0] == pytest.approx(em_steps(start, rows, 1, reg_covar=0.0)[1][0], abs=1e-10)
    ours = em_fit(rows, start, max_iter=300, tol=1e-15, reg_covar=0.0, smoothing=0.0)
    their_lls = stepmix_steps(sm, x, 300)
    assert ours.converged and ours.iterations < 300
    assert ours.history[-1] / rows.observed == pytest.approx(their_lls[-1], abs=1e-9)
    assert_same_parameters(ours.mixture, sm)


# -- full covariance with missing coordinates: brute-force references ------------------------------


def full_covariance_case(rng, n=300, d=4, k=2, share=0.3, covariance_type="full"):
    """A start of `covariance_type` (its covariances obey the type) and data with missing values."""
    full = random_start(rng, k, d=d, diagonal=False).gaussian
    covariances = CONSTRAINTS[covariance_type](full.covariances, np.ones(k))
    start = LatentClassModel.create(full.weights, full.means, covariances, covariance_type)
    x = rng.normal(size=(n, d)) * 2 + rng.choice([-2.0, 2.0], size=(n, 1))
    x = with_missing(rng, x, share, np.nan)
    x[:3] = np.nan
    return start, x


def mixed_case(rng, n=300, share=0.3):
    """A random full-covariance model with every block, and data with `share` missing values."""
    start = random_start(rng, 3, d=4, m=3, levels=(3, 4), diagonal=False, q=2)
    _, gaussian, bernoulli, codes, counts = generated(rng, n, d=4, m=3, levels=(3, 4))
    gaussian[:3], bernoulli[:3], codes[:3], counts[:3] = np.nan, -1, -1, np.nan  # nothing observed
    missing = [with_missing(rng, a, share, v) for a, v in [(gaussian, np.nan), (bernoulli, np.nan), (codes, -1), (counts, np.nan)]]
    return start, MixedBlock.of(*missing)


def test_row_likelihood_is_the_exact_marginal_over_observed_values(rng):
    """Brute force, row by row: the Gaussian marginal over the observed coordinates (scipy), times
    the observed Bernoulli, categorical and Poisson factors, summed over classes."""
    start, block = mixed_case(rng)
    post = posterior(start, block)
    g = start.gaussian
    assert np.isnan(post.log_density[:3]).all() and not post.responsibilities[:3].any()
    for i in range(3, block.n):
        o = ~np.isnan(block.gaussian[i])
        joint = np.log(start.weights).copy()
        for j in range(start.k):
            if o.any():
                joint[j] += multivariate_normal.logpdf(block.gaussian[i, o], g.means[j, o], g.covariances[j][np.ix_(o, o)])
            for c, value in enumerate(block.bernoulli[i]):
                if value in (0, 1):
                    joint[j] += np.log(start.bernoulli[j, c] if value else 1 - start.bernoulli[j, c])
            for c, level in enumerate(block.categorical[i]):
                joint[j] += np.log(start.categorical[c][j, level]) if level >= 0 else 0.0
            for c, count in enumerate(block.poisson[i]):
                joint[j] += 0.0 if np.isnan(count) else poisson.logpmf(count, start.poisson[j, c])
        assert post.log_density[i] == pytest.approx(logsumexp(joint), abs=1e-10)
        np.testing.assert_allclose(post.responsibilities[i], np.exp(joint - logsumexp(joint)), atol=1e-12)


def test_smoothed_discrete_m_step(rng):
    """With smoothing α: p = (Σγ·[x=1] + α) / (Σγ·[observed] + 2α), per level likewise with L·α,
    Poisson λ = (Σγx + α) / (Σγ·[observed] + α), from the E-step's responsibilities."""
    start, block = mixed_case(rng)
    alpha = 0.5
    model = m_step(Layout.of(start).unpack(block_statistics(start, block)), start, 0.1, smoothing=alpha)[0]
    resp = posterior(start, block).responsibilities
    for j in range(start.k):
        r = resp[:, j]
        for c in range(start.m):
            x = block.bernoulli[:, c]
            expected = (r @ (x == 1) + alpha) / (r @ ((x == 0) | (x == 1)) + 2 * alpha)
            assert model.bernoulli[j, c] == pytest.approx(expected, rel=1e-12)
        for c, table in enumerate(model.categorical):
            x = block.categorical[:, c]
            counts = np.array([r @ (x == level) for level in range(table.shape[1])])
            np.testing.assert_allclose(table[j], (counts + alpha) / (counts.sum() + table.shape[1] * alpha), rtol=1e-12)
        for c in range(start.q):
            x = block.poisson[:, c]
            seen = ~np.isnan(x)
            assert model.poisson[j, c] == pytest.approx((r[seen] @ x[seen] + alpha) / (r[seen].sum() + alpha), rel=1e-12)
    assert 0 < model.bernoulli.min() and model.bernoulli.max() < 1


#: Each covariance type's M-step from the full scatter matrices S_j and masses N_j, written out.
CONSTRAINED = {
    "full": lambda s, n: s,
    "diag": lambda s, n: s * np.eye(s.shape[-1]),
    "spherical": lambda s, n: np.trace(s, axis1=1, axis2=2)[:, None, None] / s.shape[-1] * np.eye(s.shape[-1]),
    "tied": lambda s, n: np.broadcast_to((n[:, None, None] * s).sum(axis=0) / n.sum(), s.shape),
}


@pytest.mark.parametrize("covariance_type", list(CONSTRAINED))
def test_em_step_with_missing_coordinates_is_the_exact_conditional_expectation_update(rng, covariance_type):
    """Brute force, row by row: each row completed by E[x_m | x_o, j], the conditional covariance
    Cov(x_m | x_o, j) added to the scatter, then the covariance type's constraint."""
    start, x = full_covariance_case(rng, covariance_type=covariance_type)
    reg = 1e-3
    stats = Layout.of(start).unpack(block_statistics(start, MixedBlock.of(x)))
    assert stats.skipped_rows == np.isnan(x).all(axis=1).sum() >= 3
    model = m_step(stats, start, reg, smoothing=0.0)[0]
    resp = posterior(start, MixedBlock.of(x)).responsibilities
    g, scatter, masses = start.gaussian, [], resp.sum(axis=0)
    for j in range(start.k):
        filled, extra = [], np.zeros((x.shape[1], x.shape[1]))
        for i, row in enumerate(x):
            o, m = ~np.isnan(row), np.isnan(row)
            if not o.any():
                filled.append(np.zeros(x.shape[1]))
                continue
            s = g.covariances[j]
            gain = s[np.ix_(m, o)] @ np.linalg.inv(s[np.ix_(o, o)])
            row = row.copy()
            row[m] = g.means[j, m] + gain @ (row[o] - g.means[j, o])
            filled.append(row)
            extra[np.ix_(m, m)] += resp[i, j] * (s[np.ix_(m, m)] - gain @ s[np.ix_(o, m)])
        filled = np.array(filled)
        mean = resp[:, j] @ filled / masses[j]
        dev = filled - mean
        scatter.append(((dev.T * resp[:, j]) @ dev + extra) / masses[j])
        np.testing.assert_allclose(model.gaussian.means[j], mean, atol=1e-10)
    expected = CONSTRAINED[covariance_type](np.array(scatter), masses) + reg * np.eye(x.shape[1])
    np.testing.assert_allclose(model.gaussian.covariances, expected, atol=1e-10)
    np.testing.assert_allclose(model.weights, masses / masses.sum(), atol=1e-12)


def missing_everywhere(rng, share):
    """A random full-covariance start and data with `share` missing values in every block."""
    _, gaussian, bernoulli, codes, counts = generated(rng, 500, d=3, spread=1.5)
    gaussian = with_missing(rng, gaussian, share, np.nan)
    bernoulli = with_missing(rng, bernoulli, share, np.nan)
    codes = with_missing(rng, codes, share, -1)
    counts = with_missing(rng, counts, share, np.nan)
    start = random_start(rng, 3, d=3, m=6, levels=LEVELS, diagonal=False, q=2)
    return start, engine(gaussian, bernoulli, codes, counts)


def fit_without_warnings(rows, start, reg_covar) -> np.ndarray:
    """The objective's history over 150 steps of plain EM (smoothing 0.5), failing on any
    `ComponentWarning`: the loop's decrease test found no fall beyond its allowance."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", em.ComponentWarning)
        fit = em_fit(rows, start, max_iter=150, tol=0, reg_covar=reg_covar, smoothing=0.5)
    assert fit.stop_reason == "max-iter" and fit.iterations == 150
    assert fit.history[-1] - fit.history[0] > 1.0
    return np.array(fit.history)


@pytest.mark.parametrize("share", [0.1, 0.3])
def test_em_objective_never_decreases_with_missing_values(rng, share):
    start, rows = missing_everywhere(rng, share)
    history = fit_without_warnings(rows, start, reg_covar=0.0)
    steps = np.diff(history)
    assert (steps >= -1e-10 * np.abs(history[1:])).all(), steps.min()


def test_a_regularised_fit_falls_only_within_the_gaussian_blocks_allowance():
    """regCovar is a penalty the objective does not count, so the objective may fall, by at most
    `LatentFamily.decrease_allowance` (the bound with the Gaussian block's own masses); here it
    really falls, and the loop's decrease test lets it (with no allowance, or one computed from
    the class weights, it stops this fit as a numerical problem)."""
    start, rows = missing_everywhere(np.random.default_rng(12346), 0.3)
    history = fit_without_warnings(rows, start, reg_covar=0.5)
    assert np.diff(history).min() < -1e-4


# -- start, blocks, recovery -----------------------------------------------------------------------


def random_starts(rows, seeds, covariance_type="full"):
    reduce, columns, _ = rows
    pass_ = MixedStartPass(3, seeds, LEVELS, columns)
    layout = Layout(3, columns.d, columns.m, LEVELS, columns.q)
    return [initial_model(flat, layout, covariance_type, 1e-6) for flat in pass_.split(reduce(pass_))]


def test_start_and_statistics_do_not_depend_on_blocks_or_row_order(rng):
    _, gaussian, bernoulli, codes, counts = generated(rng, 400, d=2)
    gaussian = with_missing(rng, gaussian, 0.1, np.nan)
    order = rng.permutation(400)
    columns = (gaussian, bernoulli, codes, counts)
    one, other = engine(*columns, size=50), engine(*(column[order] for column in columns), size=133)
    (a, a2), (b, _) = random_starts(one, [7, 8]), random_starts(other, [7, 8])
    np.testing.assert_allclose(a.gaussian.means, b.gaussian.means, rtol=1e-12)
    np.testing.assert_allclose(a.bernoulli, b.bernoulli, rtol=1e-12)
    np.testing.assert_allclose(a.poisson, b.poisson, rtol=1e-12)
    assert not np.allclose(a.bernoulli, a2.bernoulli)  # another seed, another start
    estep = MixedEStepPass([a], one[1])
    np.testing.assert_allclose(one[0](estep), other[0](estep), rtol=1e-10)


def test_gaussian_statistics_are_taken_around_a_shift(rng):
    """Shifting the Gaussian columns (as the engines do) moves the fitted means by the shift and
    changes nothing else, even for data far from the origin."""
    _, gaussian, bernoulli, codes, counts = generated(rng, 400, d=2)
    gaussian = with_missing(rng, gaussian + 1e6, 0.2, np.nan)
    plain, shifted = engine(gaussian, bernoulli, codes, counts), engine(gaussian, bernoulli, codes, counts, shifted=True)
    shift = shifted[1].shift(shifted[1].pack(gaussian, bernoulli, codes, counts))[:2]
    assert np.abs(shift).min() > 1e5
    start = random_starts(plain, [0])[0]
    moved = LatentClassModel.create(start.weights, start.gaussian.means - shift, start.gaussian.covariances, "full",
                                    start.bernoulli, start.categorical, start.poisson)
    a = em_fit(plain, start, max_iter=20, tol=0).mixture
    b = em_fit(shifted, moved, max_iter=20, tol=0).mixture
    np.testing.assert_allclose(b.gaussian.means + shift, a.gaussian.means, rtol=1e-12)
    np.testing.assert_allclose(b.gaussian.covariances, a.gaussian.covariances, rtol=1e-8)
    np.testing.assert_allclose(b.bernoulli, a.bernoulli, rtol=1e-8)


def test_row_weights_count_like_copies_of_rows(rng):
    _, gaussian, bernoulli, codes, counts = generated(rng, 150, d=2)
    gaussian = with_missing(rng, gaussian, 0.2, np.nan)
    start = random_start(rng, 3, d=2, m=6, levels=LEVELS, diagonal=False, q=2)
    columns = (gaussian, bernoulli, codes, counts)
    copies = rng.integers(0, 4, size=150)
    weighted = block_statistics(start, MixedBlock.of(*columns, weights=copies.astype(float)))
    repeated = block_statistics(start, MixedBlock.of(*(np.repeat(a, copies, axis=0) for a in columns)))
    hard = slice(2 + start.k, 2 + 2 * start.k)  # hard counts count rows, whatever their weight
    weighted[hard] = repeated[hard] = 0.0
    np.testing.assert_allclose(weighted, repeated, rtol=1e-10, atol=1e-9)


def test_rows_with_nothing_observed_are_counted_and_skipped(rng):
    _, gaussian, bernoulli, codes, counts = generated(rng, 200, d=2)
    start = random_start(rng, 3, d=2, m=6, levels=LEVELS, diagonal=False, q=2)
    columns = (gaussian, bernoulli, codes, counts)
    empty_rows = (np.full((4, 2), np.nan), np.full((4, 6), -1.0), np.full((4, 3), -1), np.full((4, 2), np.nan))
    plain = block_statistics(start, MixedBlock.of(*columns))
    padded = block_statistics(start, MixedBlock.of(*(np.vstack([a, e]) for a, e in zip(columns, empty_rows))))
    assert Layout.of(start).unpack(padded).skipped_rows == 4
    padded[1] = 0.0
    np.testing.assert_allclose(padded, plain, rtol=1e-12)


@pytest.mark.parametrize("share", [0.0, 0.15])
def test_latent_classes_are_recovered(rng, share):
    labels, gaussian, bernoulli, codes, counts = generated(rng, 1500, d=2, spread=4.0, sharp=0.85)
    gaussian = with_missing(rng, gaussian, share, np.nan)
    bernoulli = with_missing(rng, bernoulli, share, np.nan)
    codes = with_missing(rng, codes, share, -1)
    counts = with_missing(rng, counts, share, np.nan)
    rows = engine(gaussian, bernoulli, codes, counts, size=256)
    fits = em_fit(rows, seeds=(0, 1, 2), max_iter=300, reseed=True)
    best = max(fits, key=lambda fit: fit.history[-1])
    assert best.converged
    predicted = posterior(best.mixture, MixedBlock.of(gaussian, bernoulli, codes, counts)).responsibilities.argmax(axis=1)
    assert adjusted_rand_score(labels, predicted) >= 0.9


def test_em_fit_starts_from_each_seed_and_shares_passes_as_fits_alone(rng):
    """Candidates fitted together take exactly their steps alone; each starts where the start
    pass puts its seed."""
    _, gaussian, bernoulli, codes, counts = generated(rng, 300, d=2)
    rows = engine(with_missing(rng, gaussian, 0.1, np.nan), bernoulli, codes, counts)
    together = em_fit(rows, seeds=(4, 5), max_iter=15)
    for seed, fit in zip((4, 5), together):
        (alone,) = em_fit(rows, seeds=(seed,), max_iter=15)
        assert fit.history == alone.history and fit.iterations == alone.iterations
        np.testing.assert_array_equal(fit.mixture.bernoulli, alone.mixture.bernoulli)
        (start,) = random_starts(rows, [seed])
        (evaluated,) = em_fit(rows, seeds=(seed,), max_iter=0)
        np.testing.assert_array_equal(evaluated.mixture.gaussian.means, start.gaussian.means)
        np.testing.assert_array_equal(evaluated.mixture.categorical[2], start.categorical[2])
    assert together[0].history[0] != together[1].history[0]


def test_a_latent_fit_resumed_from_its_arrays_equals_the_unbroken_fit(rng):
    """What a checkpoint does without Spark: the state after iteration 4 through the family's
    `to_arrays`/`from_arrays` (a copy of every array), then EM on from it."""
    _, gaussian, bernoulli, codes, counts = generated(rng, 300, d=2)
    rows = engine(with_missing(rng, gaussian, 0.1, np.nan), bernoulli, codes, counts)
    family = LatentFamily(rows.columns, LEVELS)
    settings = em.FitSettings(k=3, max_iter=8, tol=0, reg_covar=1e-6, seed=2, family=family)
    states = []
    (unbroken,) = em.fit(rows.reduce, rows.columns.d, rows.observed, [settings], on_state=states.append)
    state = states[3]
    assert state.iteration == 4

    def through_arrays(model):
        return family.from_arrays({name: a.copy() for name, a in family.to_arrays(model).items()}, settings)

    state.mixture, state.previous = through_arrays(state.mixture), through_arrays(state.previous)
    (resumed,) = em.fit(rows.reduce, rows.columns.d, rows.observed, [settings], resume=state)
    assert resumed.resumed_from == 4
    assert resumed.history == unbroken.history and resumed.iterations == unbroken.iterations == 8
    for field in ("weights", "bernoulli", "poisson"):
        np.testing.assert_array_equal(getattr(resumed.mixture, field), getattr(unbroken.mixture, field))
    for ours, theirs in zip(resumed.mixture.categorical, unbroken.mixture.categorical):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(resumed.mixture.gaussian.covariances, unbroken.mixture.gaussian.covariances)


def test_em_fit_refuses_mixed_families(rng):
    _, _, bernoulli, codes, _ = generated(rng, 100)
    rows = engine(bernoulli=bernoulli, codes=codes)
    latent = em.FitSettings(k=2, max_iter=5, tol=0, reg_covar=0, seed=0, family=LatentFamily(rows.columns, LEVELS))
    gaussian = em.FitSettings(k=2, max_iter=5, tol=0, reg_covar=0, seed=0)
    with pytest.raises(ValueError, match="^candidates fitted together must share one model family"):
        em.fit(rows.reduce, 0, rows.observed, [latent, gaussian])


def test_bad_values_are_refused_with_the_column_named(rng):
    start = random_start(rng, 2, m=2, levels=(3,))
    with pytest.raises(ValueError, match=r"^bernoulli column 1 holds 2\.0 \(1 such values\)"):
        block_statistics(start, MixedBlock.of(bernoulli=[[0, 1], [1, 2]], categorical=[[0], [1]]))
    with pytest.raises(ValueError, match=r"^categorical column 0 holds level code 3"):
        block_statistics(start, MixedBlock.of(bernoulli=[[0, 1], [1, 0]], categorical=[[0], [3]]))
    counting = random_start(rng, 2, q=2)
    with pytest.raises(ValueError, match=r"^poisson column 0 holds 1\.5 \(1 such values\)"):
        block_statistics(counting, MixedBlock.of(poisson=[[1.5, 2.0], [0.0, np.nan]]))
    with pytest.raises(ValueError, match=r"^poisson column 1 holds -1\.0"):
        block_statistics(counting, MixedBlock.of(poisson=[[1.0, -1.0], [0.0, np.nan]]))
