"""The numerical core (kernels, M-step, initialisation, EM loop) against independent references.

Pure numpy: the passes run through the in-memory engine (`spark_gmm.local`), which folds them over
numpy blocks as the Spark engines do (blocks in order, `x = raw - shift`). No Spark.
"""

import warnings

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from spark_gmm import em, initialisation, kernels
from spark_gmm.local import data_shift, local_reduce
from spark_gmm.mixture import (
    WEIGHT_FLOOR,
    ComponentStatistics,
    Mixture,
    SpectralRepairWarning,
    m_step,
    positive_definite,
    precision_cholesky,
)

REG = 1e-6

# -- references and data ---------------------------------------------------------------------------


def make_reduce(x, w=None, block=100, order=None, shift=None):
    """The in-memory engine (`spark_gmm.local`) over blocks of `block` rows, taken in `order`."""
    shift = data_shift(x) if shift is None else shift
    if order is not None:
        starts = list(range(0, len(x), block))
        rows = np.concatenate([np.arange(starts[i], min(starts[i] + block, len(x))) for i in order])
        x, w = x[rows], (None if w is None else w[rows])
    return local_reduce(x, w, block, shift)


def run_em(reduce, start, rows, max_iter, tol, reg_covar, **settings):
    """EM from `start` (plain EM unless `reseed=True` is given), through the one entry point."""
    settings.setdefault("reseed", False)
    fit = em.FitSettings(k=start.k, max_iter=max_iter, tol=tol, reg_covar=reg_covar, seed=0, start=start, **settings)
    return em.fit(reduce, start.d, float(rows), [fit])[0]


def random_spd(rng, d, scale=0.5, floor=0.3):
    a = rng.normal(scale=scale, size=(d, d))
    return a @ a.T + floor * np.eye(d)


def three_clusters(rng, n=1500, offset=0.0):
    """3 separated clusters in 4-D (a few sigma apart, so responsibilities are not all 0/1)."""
    means = np.array([[0.0, 0.0, 0.0, 0.0], [5.0, 0.0, -2.0, 1.0], [-2.0, 5.0, 2.0, -3.0]])
    covs = np.array([random_spd(rng, 4) for _ in range(3)])
    weights = np.array([0.5, 0.3, 0.2])
    labels = rng.choice(3, size=n, p=weights)
    x = np.empty((n, 4))
    for j in range(3):
        rows = labels == j
        x[rows] = rng.multivariate_normal(means[j], covs[j], size=rows.sum())
    return x + offset, labels, weights, means + offset, covs


def start_from(means, rng):
    """A deliberately imperfect common start: equal weights, perturbed means, isotropic covariances."""
    k, d = means.shape
    return np.full(k, 1.0 / k), means + rng.normal(scale=0.7, size=means.shape), np.array(
        [1.5 * np.eye(d)] * k
    )


def sklearn_from(weights, means, covs, max_iter):
    return SkGaussianMixture(
        n_components=len(weights),
        covariance_type="full",
        weights_init=weights,
        means_init=means,
        precisions_init=np.linalg.inv(covs),
        max_iter=max_iter,
        tol=0,
        reg_covar=REG,
        init_params="random_from_data",
        random_state=0,
    )


def sklearn_with_params(weights, means, covs):
    """An sklearn GaussianMixture holding given parameters (to use its score_samples)."""
    sk = SkGaussianMixture(n_components=len(weights), covariance_type="full")
    sk.weights_ = np.asarray(weights, dtype=np.float64)
    sk.means_ = np.asarray(means, dtype=np.float64)
    sk.covariances_ = np.asarray(covs, dtype=np.float64)
    # sklearn's convention: upper-triangular P with P Pᵀ = Σ⁻¹, P = (L⁻¹)ᵀ for Σ = L Lᵀ.
    sk.precisions_cholesky_ = np.array(
        [np.linalg.inv(np.linalg.cholesky(c)).T for c in sk.covariances_]
    )
    sk.converged_ = True
    sk.n_iter_ = 0
    sk.lower_bound_ = 0.0
    sk.n_features_in_ = sk.means_.shape[1]
    return sk


def log_likelihood_scipy(x, weights, means, covs):
    dens = np.column_stack(
        [np.log(w) + multivariate_normal(m, c).logpdf(x) for w, m, c in zip(weights, means, covs)]
    )
    return logsumexp(dens, axis=1)


# -- EM against scikit-learn -----------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.0, 1e7], ids=["centred", "offset1e7"])
@pytest.mark.parametrize("n_iter", [1, 8])
def test_run_em_matches_sklearn_from_identical_start(rng, offset, n_iter):
    x, _, _, true_means, _ = three_clusters(rng, offset=offset)
    w0, mu0, cov0 = start_from(true_means, rng)
    reduce = make_reduce(x)
    assert np.all(reduce.shift != 0)  # the shift is really exercised
    start = Mixture.from_covariances(w0, mu0 - reduce.shift, cov0, REG)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no decrease / empty-component warnings expected
        result = run_em(reduce, start, len(x), max_iter=n_iter, tol=0.0, reg_covar=REG)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = sklearn_from(w0, mu0, cov0, n_iter).fit(x)

    # Both counted the same number of M-steps.
    assert sk.n_iter_ == n_iter
    assert result.iterations == n_iter
    assert len(result.history) == n_iter + 1
    assert not result.converged

    ours = result.mixture.shifted(reduce.shift)
    np.testing.assert_allclose(ours.weights, sk.weights_, rtol=1e-6)
    # Means compared relative to the data offset (rtol on 1e7 would say nothing).
    np.testing.assert_allclose(ours.means - offset, sk.means_ - offset, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.covariances, sk.covariances_, rtol=1e-6, atol=1e-8)

    # The history holds the log-likelihood of the parameters before each M-step and of the result:
    # sklearn's lower bound is the mean log-likelihood of the parameters of its last E-step.
    np.testing.assert_allclose(result.history[-2] / len(x), sk.lower_bound_, rtol=1e-9)
    np.testing.assert_allclose(result.history[-1], sk.score(x) * len(x), rtol=1e-9)
    np.testing.assert_allclose(result.log_likelihood, result.history[-1], rtol=0)


def test_run_em_zero_iterations_returns_start(rng):
    x, _, _, true_means, _ = three_clusters(rng, n=600)
    w0, mu0, cov0 = start_from(true_means, rng)
    reduce = make_reduce(x)
    start = Mixture.from_covariances(w0, mu0 - reduce.shift, cov0, REG)
    result = run_em(reduce, start, len(x), max_iter=0, tol=0.0, reg_covar=REG)
    assert result.iterations == 0
    assert len(result.history) == 1
    np.testing.assert_array_equal(result.mixture.means, start.means)
    expected = log_likelihood_scipy(x, w0, mu0, cov0).sum()
    np.testing.assert_allclose(result.log_likelihood, expected, rtol=1e-10)


# -- densities and likelihood ----------------------------------------------------------------------


def test_log_gaussian_density_matches_scipy(rng):
    d, k = 4, 3
    means = rng.normal(scale=3, size=(k, d))
    covs = np.array([random_spd(rng, d) for _ in range(k)])
    mixture = Mixture.from_covariances(np.ones(k), means, covs)
    x = rng.normal(scale=3, size=(300, d))
    ours = kernels.log_gaussian_density(x, mixture)
    assert ours.shape == (300, k)
    for j in range(k):
        np.testing.assert_allclose(
            ours[:, j], multivariate_normal(means[j], covs[j]).logpdf(x), rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("weighted", [False, True])
def test_estep_log_likelihood_matches_sklearn_score_samples(rng, weighted):
    x, _, weights, means, covs = three_clusters(rng, n=1000, offset=250.0)
    w = rng.integers(0, 4, size=len(x)).astype(np.float64) if weighted else None
    reduce = make_reduce(x, w=w, block=64)
    mixture = Mixture.from_covariances(weights, means - reduce.shift, covs)
    estep = kernels.EStepPass([mixture])
    (stats,) = estep.split(reduce(estep))

    per_row = sklearn_with_params(weights, means, covs).score_samples(x)
    expected = per_row.sum() if w is None else w @ per_row
    np.testing.assert_allclose(stats.log_likelihood, expected, rtol=1e-10)
    np.testing.assert_allclose(per_row, log_likelihood_scipy(x, weights, means, covs), rtol=1e-10)
    # Responsibilities of each row sum to one, so their totals sum to the total weight.
    total = len(x) if w is None else w.sum()
    np.testing.assert_allclose(stats.resp.sum(), total, rtol=1e-12)
    assert stats.hard_counts.sum() == len(x)


def test_history_never_decreases(rng):
    # Overlapping clusters and a poor start: a long climb, never at a fixed point.
    means = np.array([[0.0, 0.0], [1.5, 0.5], [0.5, 2.0]])
    labels = rng.choice(3, size=1200)
    x = means[labels] + rng.normal(size=(1200, 2)) @ np.array([[1.0, 0.3], [0.0, 0.8]])
    reduce = make_reduce(x, block=100)
    start = Mixture.from_covariances(
        np.ones(3), rng.normal(scale=0.1, size=(3, 2)) + x.mean(0) - reduce.shift, [np.eye(2)] * 3
    )
    max_iter = 60
    with warnings.catch_warnings():
        warnings.simplefilter("error", em.ComponentWarning)
        result = run_em(reduce, start, len(x), max_iter=max_iter, tol=0.0, reg_covar=REG)
    history = np.array(result.history)
    assert len(history) == max_iter + 1  # not cut short
    steps = np.diff(history)
    assert np.all(steps >= -1e-12 * np.abs(history[:-1])), steps.min()
    assert history[-1] > history[0]
    # The last entry is the log-likelihood of the returned parameters.
    final = result.mixture.shifted(reduce.shift)
    np.testing.assert_allclose(
        history[-1],
        log_likelihood_scipy(x, final.weights, final.means, final.covariances).sum(),
        rtol=1e-10,
    )


# -- M-step edge cases -----------------------------------------------------------------------------


def test_m_step_empty_component_is_finite_and_reported(rng):
    x, _, weights, means, covs = three_clusters(rng, n=800)
    reduce = make_reduce(x)
    far = np.vstack([means, np.full((1, 4), 1e3)])  # component 3 is hopelessly far from the data
    far_covs = np.concatenate([covs, np.eye(4)[None]])
    current = Mixture.from_covariances(np.full(4, 0.25), far - reduce.shift, far_covs, REG)
    estep = kernels.EStepPass([current])
    (stats,) = estep.split(reduce(estep))
    assert stats.resp[3] == 0.0

    new, empty = m_step(stats, current, REG)
    assert empty.tolist() == [3]
    for array in (new.weights, new.means, new.covariances, new.precisions_cholesky):
        assert np.all(np.isfinite(array))
    assert np.all(np.isfinite(np.log(new.weights)))
    assert 0 < new.weights[3] <= 2 * WEIGHT_FLOOR
    np.testing.assert_allclose(new.weights.sum(), 1.0)
    # The empty component keeps its parameters.
    np.testing.assert_array_equal(new.means[3], current.means[3])
    np.testing.assert_array_equal(new.covariances[3], current.covariances[3])
    # The others got a normal update.
    for j in range(3):
        assert np.linalg.norm(new.means[j] + reduce.shift - means[j]) < 0.3
    # And the new mixture can be evaluated.
    (again,) = estep.split(reduce(kernels.EStepPass([new])))
    assert np.isfinite(again.log_likelihood)


def test_m_step_all_zero_statistics_for_a_component():
    d, k = 2, 2
    current = Mixture.from_covariances([0.5, 0.5], [[0.0, 0.0], [5.0, 5.0]], [np.eye(2)] * 2)
    flat = np.zeros(ComponentStatistics.size(k, d))
    stats = ComponentStatistics.unpack(flat, k, d)
    stats.log_likelihood = -10.0
    stats.resp[:] = [10.0, 0.0]
    stats.first[0] = [1.0, -1.0]
    stats.second[0] = [20.0, 0.0, 20.0]  # centred second moment: 2·I per row
    new, empty = m_step(stats, current, REG)
    assert empty.tolist() == [1]
    assert np.all(np.isfinite(new.covariances)) and np.all(np.isfinite(new.precisions_cholesky))
    np.testing.assert_allclose(new.means[0], [0.1, -0.1])
    np.testing.assert_allclose(
        new.covariances[0], 2 * np.eye(2) - np.outer([0.1, -0.1], [0.1, -0.1]) + REG * np.eye(2)
    )


def test_run_em_warns_about_an_emptied_component(rng):
    x, _, _, means, covs = three_clusters(rng, n=600)
    reduce = make_reduce(x)
    start = Mixture.from_covariances(
        np.full(4, 0.25),
        np.vstack([means, np.full((1, 4), 1e3)]) - reduce.shift,
        np.concatenate([covs, np.eye(4)[None]]),
        REG,
    )
    with pytest.warns(em.ComponentWarning, match="component 3 lost all its data"):
        result = run_em(reduce, start, len(x), max_iter=5, tol=0.0, reg_covar=REG)
    assert result.empty_components == [3]
    assert np.all(np.isfinite(result.mixture.covariances))
    assert np.isfinite(result.log_likelihood)


# -- precision Cholesky ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [np.array([[1.0, 2.0], [2.0, 1.0]]), np.zeros((2, 2)), np.array([[1.0, 1.0], [1.0, 1.0 - 1e-12]])],
    ids=["indefinite", "zero", "rounding"],
)
def test_non_pd_covariance_is_repaired_and_the_repair_is_what_the_mixture_keeps(bad):
    good = np.array([[2.0, 0.5], [0.5, 1.0]])
    with pytest.warns(SpectralRepairWarning, match="component 1"):
        mixture = Mixture.from_covariances([0.5, 0.5], np.zeros((2, 2)), np.stack([good, bad]), 1e-6)
    repaired, p = mixture.covariances, mixture.precisions_cholesky
    assert np.all(np.isfinite(p))
    np.testing.assert_array_equal(np.tril(p[1], -1), 0.0)
    assert np.all(np.diagonal(p[1]) > 0)
    # The healthy component is untouched; the repaired one is symmetric, positive definite, and is
    # exactly the matrix the densities use: P Pᵀ = Σ⁻¹ for the covariance the mixture returns.
    np.testing.assert_array_equal(repaired[0], good)
    np.testing.assert_array_equal(repaired[1], repaired[1].T)
    assert np.linalg.eigvalsh(repaired[1]).min() >= 1e-6 * (1 - 1e-9)
    for j in range(2):
        np.testing.assert_allclose(p[j] @ p[j].T @ repaired[j], np.eye(2), atol=1e-6)
    np.linalg.cholesky(repaired[1])  # sampling from it works


def test_non_pd_covariance_without_regulariser_is_refused():
    collapsed = np.stack([np.eye(2), np.zeros((2, 2))])
    with pytest.raises(FloatingPointError, match="component 1 has an ill-defined covariance.*regCovar"):
        Mixture.from_covariances([0.5, 0.5], np.zeros((2, 2)), collapsed, 0.0)


def test_precision_cholesky_of_pd_does_not_warn(rng):
    covs = np.array([random_spd(rng, 3) for _ in range(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = precision_cholesky(positive_definite(covs, 1e-6))
    for c, f in zip(covs, p):
        np.testing.assert_allclose(f @ f.T, np.linalg.inv(c), rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(np.tril(f, -1), 0.0)


# -- row uniforms ----------------------------------------------------------------------------------


def test_row_uniforms_independent_of_order_and_blocking(rng):
    x = rng.normal(size=(1000, 3))
    x[::7, 1] = 0.0
    u = kernels.row_uniforms(x, seed=11, stream=2)
    assert u.shape == (1000,)
    assert np.all((u >= 0) & (u < 1))
    assert len(np.unique(u)) == 1000
    assert abs(u.mean() - 0.5) < 0.05
    perm = rng.permutation(1000)
    np.testing.assert_array_equal(kernels.row_uniforms(x[perm], 11, 2), u[perm])
    blocked = np.concatenate([kernels.row_uniforms(x[s : s + 37], 11, 2) for s in range(0, 1000, 37)])
    np.testing.assert_array_equal(blocked, u)
    # Not fooled by memory layout.
    np.testing.assert_array_equal(kernels.row_uniforms(np.asfortranarray(x), 11, 2), u)


def test_row_uniforms_fold_negative_zero(rng):
    x = rng.normal(size=(200, 2))
    x[::3, 0] = 0.0
    x[1::4, 1] = 0.0
    negative = x.copy()
    negative[negative == 0.0] = -0.0
    assert np.signbit(negative).sum() > np.signbit(x).sum()
    np.testing.assert_array_equal(kernels.row_uniforms(negative, 5, 0), kernels.row_uniforms(x, 5, 0))


def test_row_uniforms_differ_between_seeds_and_streams(rng):
    x = rng.normal(size=(500, 4))
    base = kernels.row_uniforms(x, 1, 0)
    assert np.mean(kernels.row_uniforms(x, 2, 0) != base) > 0.99
    assert np.mean(kernels.row_uniforms(x, 1, 1) != base) > 0.99
    # Same row values → same uniform.
    twice = np.vstack([x, x])
    u = kernels.row_uniforms(twice, 1, 0)
    np.testing.assert_array_equal(u[:500], u[500:])


# -- initialisation --------------------------------------------------------------------------------


def blobs(rng, per=400):
    centers = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]]) + 100.0
    x = np.vstack([c + rng.normal(size=(per, 2)) for c in centers])
    return x[rng.permutation(len(x))], centers


def test_kmeans_parallel_finds_each_blob(rng):
    x, true_centers = blobs(rng)
    reduce = make_reduce(x, block=100)
    found = initialisation.run_passes(reduce, [initialisation.kmeans_parallel_steps(d=2, k=4, seed=3)])[0] + reduce.shift
    assert found.shape == (4, 2)
    dist = np.linalg.norm(true_centers[:, None, :] - found[None, :, :], axis=2)
    nearest = dist.argmin(axis=1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3]  # one centre per blob
    # k-means|| centres are (weighted means of) sampled rows, tails included: inside the blob
    # (σ = 1, blobs 20 apart), not necessarily at its mean...
    assert np.all(dist.min(axis=1) < 3.0)
    # ...which the hard-assignment start then moves to the blob means.
    start = initialisation.run_passes(reduce, [initialisation.mixture_from_centers_steps(found - reduce.shift, REG)])[0].shifted(reduce.shift)
    dist = np.linalg.norm(true_centers[:, None, :] - start.means[None, :, :], axis=2)
    assert np.all(dist.min(axis=1) < 0.2)
    np.testing.assert_allclose(start.weights, 0.25, atol=0.01)
    for cov in start.covariances:
        np.testing.assert_allclose(cov, np.eye(2), atol=0.25)


@pytest.mark.parametrize("seed", [0, 3])
def test_kmeans_parallel_is_partition_independent(rng, seed):
    x, _ = blobs(rng, per=300)
    shift = data_shift(x)
    reference = initialisation.run_passes(make_reduce(x, block=100), [initialisation.kmeans_parallel_steps(d=2, k=4, seed=seed)])[0]
    n_blocks = len(range(0, len(x), 37))
    variants = {
        "block37": make_reduce(x, block=37),
        "one_block": make_reduce(x, block=len(x)),
        "reversed_blocks": make_reduce(x, block=37, order=list(reversed(range(n_blocks)))),
        "shuffled_blocks": make_reduce(x, block=37, order=rng.permutation(n_blocks).tolist()),
        "shuffled_rows": make_reduce(x[rng.permutation(len(x))], block=64, shift=shift),
    }
    for name, reduce in variants.items():
        np.testing.assert_allclose(
            initialisation.run_passes(reduce, [initialisation.kmeans_parallel_steps(d=2, k=4, seed=seed)])[0], reference, rtol=1e-12,
            atol=1e-12, err_msg=name,
        )


def test_random_centers_are_distinct_rows_and_partition_independent(rng):
    x, _ = blobs(rng, per=100)
    reduce = make_reduce(x, block=50)
    centers = initialisation.run_passes(reduce, [initialisation.random_center_steps(d=2, k=5, seed=9)])[0] + reduce.shift
    assert len(np.unique(centers, axis=0)) == 5
    for c in centers:
        assert np.any(np.all(np.isclose(x, c, rtol=0, atol=1e-9), axis=1))
    again = initialisation.run_passes(make_reduce(x[::-1], block=33), [initialisation.random_center_steps(d=2, k=5, seed=9)])[0] + reduce.shift
    np.testing.assert_array_equal(np.sort(again, axis=0), np.sort(centers, axis=0))
    other = initialisation.run_passes(reduce, [initialisation.random_center_steps(d=2, k=5, seed=10)])[0] + reduce.shift
    assert not np.array_equal(np.sort(other, axis=0), np.sort(centers, axis=0))


def test_kmeans_parallel_refuses_too_few_distinct_points():
    x = np.repeat(np.array([[0.0, 1.0], [2.0, 3.0]]), 50, axis=0)
    with pytest.raises(ValueError, match="distinct points"):
        initialisation.run_passes(make_reduce(x), [initialisation.kmeans_parallel_steps(d=2, k=3, seed=0)])[0]


def test_float32_blocks_keep_moments_of_components_far_from_the_shift():
    """A tight component 300σ from the shift: float32 blocks must not cancel its second moments."""
    rng = np.random.default_rng(3)
    means = np.array([[300.0, 0.0], [-300.0, 0.0]])
    x = np.vstack([rng.normal(m, 1.0, size=(2000, 2)) for m in means])
    mixture = Mixture.from_covariances([0.5, 0.5], means, np.stack([np.eye(2)] * 2))
    estep = kernels.EStepPass([mixture])
    (wide,) = estep.split(estep.map_block(x, None, None))
    narrow_x = x.astype(np.float32)
    (narrow,) = estep.split(estep.map_block(narrow_x, None, None))
    per_row = lambda stats: stats.second / stats.resp[:, None]  # noqa: E731 - centred σ² entries
    np.testing.assert_allclose(per_row(narrow), per_row(wide), atol=2e-6)


def _full_from_sklearn(sk, k, d):
    """sklearn's covariances_ of any covariance type as k×d×d matrices."""
    c = sk.covariances_
    return {
        "full": lambda: c,
        "diag": lambda: np.array([np.diag(v) for v in c]),
        "spherical": lambda: np.array([v * np.eye(d) for v in c]),
        "tied": lambda: np.broadcast_to(c, (k, d, d)),
    }[sk.covariance_type]()


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical", "tied"])
def test_covariance_types_match_sklearn_from_identical_start(rng, covariance_type):
    # At the origin: sklearn's diag/spherical/tied M-steps use E[x²] − μ², which loses digits far away.
    x, _, _, true_means, _ = three_clusters(rng)
    w0, mu0, cov0 = start_from(true_means, rng)  # isotropic: a valid start of every type
    k, d = mu0.shape
    reduce = make_reduce(x)
    start = Mixture.from_covariances(w0, mu0 - reduce.shift, cov0, REG)
    result = run_em(reduce, start, len(x), max_iter=8, tol=0.0,
                       reg_covar=REG, covariance_type=covariance_type)
    precisions = {
        "full": np.linalg.inv(cov0),
        "diag": np.full((k, d), 1 / 1.5),
        "spherical": np.full(k, 1 / 1.5),
        "tied": np.linalg.inv(cov0[0]),
    }[covariance_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = SkGaussianMixture(
            n_components=k, covariance_type=covariance_type, weights_init=w0, means_init=mu0,
            precisions_init=precisions, max_iter=8, tol=0, reg_covar=REG, random_state=0,
        ).fit(x)
    ours = result.mixture.shifted(reduce.shift)
    np.testing.assert_allclose(ours.weights, sk.weights_, rtol=1e-6)
    np.testing.assert_allclose(ours.means, sk.means_, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(ours.covariances, _full_from_sklearn(sk, k, d), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(result.history[-1], sk.score(x) * len(x), rtol=1e-9)
    if covariance_type != "full":  # the constraint really holds
        off_diagonal = ours.covariances * (1 - np.eye(d))
        if covariance_type in ("diag", "spherical"):
            assert not off_diagonal.any()
        if covariance_type == "tied":
            assert (ours.covariances == ours.covariances[0]).all()
