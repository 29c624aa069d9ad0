"""GaussianMixture with missing values marginalised (handleInvalid='keep'), without Spark: the
marginal density of a row's observed coordinates against scipy, the scoring of Arrow rows with
missing values, one EM step against a brute-force numpy EM with conditional expectations, and the
fit's objective and start (`marginal.fit` over the in-memory engine)."""

import numpy as np
import pyarrow as pa
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from spark_gmm import em, marginal
from spark_gmm.latent_estep import gaussian_posterior
from spark_gmm.local import local_reduce
from spark_gmm.mixture import Mixture
from spark_gmm.scoring import scores_arrow


def full_mixture(rng, k=3, d=4):
    a = rng.normal(scale=0.5, size=(k, d, d))
    covariances = a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(d)
    return Mixture.from_covariances(rng.uniform(1, 2, k) / 4.5, rng.normal(scale=3, size=(k, d)), covariances, 0.0)


def drawn(rng, mixture, n):
    labels = rng.choice(mixture.k, size=n, p=mixture.weights / mixture.weights.sum())
    factors = np.linalg.cholesky(mixture.covariances)
    return mixture.means[labels] + np.einsum("nij,nj->ni", factors[labels], rng.normal(size=(n, mixture.d)))


def holed(rng, x, share):
    x = x.copy()
    x[rng.random(x.shape) < share] = np.nan
    return x


def brute_force(x_row, mixture):
    """(log p(x_o), P(j | x_o)) of one row from scipy's density of the observed sub-vector."""
    o = ~np.isnan(x_row)
    joint = np.log(mixture.weights) + np.array([
        multivariate_normal.logpdf(x_row[o], mixture.means[j, o], mixture.covariances[j][np.ix_(o, o)])
        for j in range(mixture.k)
    ])
    return logsumexp(joint), np.exp(joint - logsumexp(joint))


def test_the_marginal_density_of_the_observed_coordinates_is_scipys(rng):
    mixture = full_mixture(rng)
    x = holed(rng, drawn(rng, mixture, 200), 0.3)
    x[:2] = np.nan  # nothing observed
    log_density, resp = gaussian_posterior(x, mixture)
    empty = np.isnan(x).all(axis=1)
    assert np.isnan(log_density[empty]).all() and not resp[empty].any()
    assert len({tuple(row) for row in np.isnan(x)}) > 8  # many patterns, each grouped
    for i in np.flatnonzero(~empty):
        expected, probabilities = brute_force(x[i], mixture)
        assert log_density[i] == pytest.approx(expected, abs=1e-10)
        np.testing.assert_allclose(resp[i], probabilities, atol=1e-12)


def test_scoring_marginalises_null_nan_and_infinite_values_only_when_asked(rng):
    """`scores_arrow` of Arrow rows with a null element, NaN, ±inf, a null row, a row of nothing
    finite and a row of the wrong length; the centre shifts the model as `GaussianMixtureModel` does."""
    mixture = full_mixture(rng, k=2, d=3)
    center = np.array([100.0, -50.0, 3.0])
    rows = [[1.0, 2.0, 0.5], [1.0, None, 0.5], [np.nan, 2.0, 0.5], [np.inf, 2.0, -np.inf], None,
            [np.nan, np.inf, None], [1.0, 2.0]]
    column = pa.array([None if r is None else [None if v is None else v + c for v, c in zip(r, center)]
                       for r in rows], type=pa.list_(pa.float64()))
    out = scores_arrow(column, mixture, center, marginalise=True).to_pylist()
    assert [r["prediction"] is None for r in out] == [False, False, False, False, True, True, True]
    for i in range(4):
        values = np.array([np.nan if v is None or not np.isfinite(v) else v for v in rows[i]])
        expected, probabilities = brute_force(values, mixture)
        assert out[i]["logLikelihood"] == pytest.approx(expected, abs=1e-9)
        np.testing.assert_allclose(out[i]["probability"], probabilities, atol=1e-10)
        assert out[i]["prediction"] == probabilities.argmax()
    plain = scores_arrow(column, mixture, center).to_pylist()
    assert [r["prediction"] is None for r in plain] == [False] + [True] * 6
    assert plain[0] == out[0]


def reference_em_step(x, mixture, reg_covar):
    """One EM step of a full-covariance Gaussian mixture over rows with NaN, written row by row
    with explicit inverses: each row's missing coordinates completed by their conditional mean per
    component, whose conditional covariance joins the second moment."""
    n, d = x.shape
    k = mixture.k
    gamma = np.array([brute_force(row, mixture)[1] for row in x])  # (n, k)
    filled = np.zeros((k, n, d))
    extra = np.zeros((k, n, d, d))
    for i, row in enumerate(x):
        o, m = ~np.isnan(row), np.isnan(row)
        for j in range(k):
            mu, cov = mixture.means[j], mixture.covariances[j]
            gain = cov[np.ix_(m, o)] @ np.linalg.inv(cov[np.ix_(o, o)])
            filled[j, i, o] = row[o]
            filled[j, i, m] = mu[m] + gain @ (row[o] - mu[o])
            extra[j, i][np.ix_(m, m)] = cov[np.ix_(m, m)] - gain @ cov[np.ix_(o, m)]
    mass = gamma.sum(axis=0)
    means = np.einsum("nj,jnd->jd", gamma, filled) / mass[:, None]
    covariances = np.empty((k, d, d))
    for j in range(k):
        dev = filled[j] - means[j]
        covariances[j] = (np.einsum("n,nd,ne->de", gamma[:, j], dev, dev)
                          + np.einsum("n,nde->de", gamma[:, j], extra[j])) / mass[j] + reg_covar * np.eye(d)
    return mass / n, means, covariances


def settings(k, **changes):
    return em.FitSettings(**{"k": k, "max_iter": 100, "tol": 0.0, "reg_covar": 1e-6, "seed": 3, **changes})


def test_one_em_step_is_the_brute_force_conditional_expectation_step(rng):
    mixture = full_mixture(rng)
    x = holed(rng, drawn(rng, mixture, 150), 0.25)
    x = x[~np.isnan(x).all(axis=1)]
    reduce = local_reduce(x, shift=np.zeros(4), block_rows=40)
    (fit,) = marginal.fit(reduce, 4, len(x), [settings(3, max_iter=1, start=mixture, reg_covar=0.01)], 0)
    assert fit.iterations == 1 and isinstance(fit.mixture, Mixture)
    weights, means, covariances = reference_em_step(x, mixture, 0.01)
    np.testing.assert_allclose(fit.mixture.weights, weights, rtol=1e-10)
    np.testing.assert_allclose(fit.mixture.means, means, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fit.mixture.covariances, covariances, rtol=1e-9, atol=1e-10)


def nan_shift(x):
    return np.nanmin(x, axis=0) / 2 + np.nanmax(x, axis=0) / 2


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_the_objective_never_decreases_and_the_start_is_the_gaussian_one_over_complete_rows(rng, covariance_type):
    mixture = full_mixture(rng)
    x = holed(rng, drawn(rng, mixture, 600), 0.15)
    x = x[~np.isnan(x).all(axis=1)]
    complete = ~np.isnan(x).any(axis=1)
    shift = nan_shift(x)
    reduce = local_reduce(x, shift=shift, block_rows=97)
    common = dict(reg_covar=0.0, covariance_type=covariance_type)
    (fit,) = marginal.fit(reduce, 4, len(x), [settings(3, max_iter=60, **common)], int(complete.sum()))
    history = np.array(fit.history)
    assert (np.diff(history) >= -1e-10 * np.abs(history[1:])).all(), np.diff(history).min()
    assert history[-1] - history[0] > 1.0 and np.isfinite(fit.mixture.covariances).all()
    # Its start: the Gaussian default start (k-means||, Lloyd, hard assignment) on the complete rows.
    (start,) = marginal.fit(reduce, 4, len(x), [settings(3, max_iter=0, **common)], int(complete.sum()))
    (alone,) = em.fit(local_reduce(x[complete], shift=shift, block_rows=97), 4, int(complete.sum()),
                      [settings(3, max_iter=0, **common)])
    np.testing.assert_allclose(start.mixture.means, alone.mixture.means, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(start.mixture.covariances, alone.mixture.covariances, rtol=1e-9, atol=1e-12)
    assert start.log_likelihood != alone.log_likelihood  # evaluated on all rows, not the complete ones


def test_with_fewer_complete_rows_than_k_em_starts_from_random_responsibilities(rng):
    mixture = full_mixture(rng, k=2, d=3)
    x = drawn(rng, mixture, 300)
    x[np.arange(300), rng.integers(0, 3, 300)] = np.nan  # every row misses one coordinate
    reduce = local_reduce(x, shift=nan_shift(x), block_rows=64)
    (fit,) = marginal.fit(reduce, 3, 300, [settings(2, max_iter=30)], 0)
    assert np.isfinite(fit.mixture.means).all() and fit.history[-1] > fit.history[0]
