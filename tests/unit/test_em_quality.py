"""What the default fit reaches, and how EM stops and recovers (numpy only, against scikit-learn).

Identical starts prove the arithmetic; these tests pin down the behaviour a user sees: the k-means
start over all rows, the stopping rule with a regulariser, the refusal of a real decrease, dead
components restarted, and EM under a covariance floor from a start singular but for regCovar."""

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from support import indicator_clusters

from spark_gmm import em, families, initialisation, kernels
from spark_gmm.local import local_reduce
from spark_gmm.mixture import Mixture, m_step, regularisation_allowance, resplit_pair


def standardised_clusters(seed, n=600, k=3):
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=2.5, size=(k, 2))
    x = means[rng.integers(0, k, n)] + rng.normal(size=(n, 2))
    return rng, (x - x.mean(0)) / x.std(0)


def fit(reduce, x, **settings):
    settings = {"k": 3, "max_iter": 100, "tol": 1e-3, "reg_covar": 1e-6, "seed": 0, **settings}
    return em.fit(reduce, x.shape[1], float(len(x)), [em.FitSettings(**settings)])[0]


def test_regularised_em_takes_scikit_learns_steps_through_likelihood_dips():
    """With regCovar=0.1 the plain log-likelihood may dip; EM goes on, as scikit-learn does, and
    ends after the same iterations at the same parameters (plain EM: restarts off, since where a
    restart finds a better optimum the answers rightly differ)."""
    dips = 0
    for seed in range(12):
        rng, x = standardised_clusters(seed)
        reduce = local_reduce(x, block_rows=100)
        w0, mu0, cov0 = np.full(3, 1 / 3), x[rng.choice(len(x), 3, replace=False)], np.array([0.5 * np.eye(2)] * 3)
        start = Mixture.from_covariances(w0, mu0 - reduce.shift, cov0, 0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a dip within the regularisation bound is no warning
            result = fit(reduce, x, reg_covar=0.1, start=start, reseed=False)
        sk = SkGaussianMixture(
            3, reg_covar=0.1, weights_init=w0, means_init=mu0, precisions_init=np.linalg.inv(cov0), tol=1e-3
        ).fit(x)
        dips += bool((np.diff(result.history) < 0).any())
        assert result.converged and result.stop_reason == "converged"
        assert result.iterations == sk.n_iter_
        final = result.mixture.shifted(reduce.shift)
        np.testing.assert_allclose(final.weights, sk.weights_, atol=1e-6)
        np.testing.assert_allclose(final.means, sk.means_, atol=1e-6)
        np.testing.assert_allclose(final.covariances, sk.covariances_, atol=1e-6)
    assert dips >= 3  # the case the old guard stopped on really occurs


def test_reported_likelihood_belongs_to_the_returned_model():
    _, x = standardised_clusters(1)
    reduce = local_reduce(x, block_rows=100)
    result = fit(reduce, x)
    estep = em.kernels.EStepPass([result.mixture])
    (stats,) = estep.split(reduce(estep))
    assert result.log_likelihood == stats.log_likelihood == result.history[-1]
    assert result.cluster_sizes == stats.hard_counts.astype(int).tolist()


def test_a_real_decrease_stops_unconverged_at_the_better_parameters():
    _, x = standardised_clusters(2)
    clean = local_reduce(x, block_rows=100)
    passes = []

    def reduce(pass_):  # the 6th E-step reports a log-likelihood far too low: a numerical fault
        out = clean(pass_)
        if isinstance(pass_, em.kernels.EStepPass):
            passes.append(out[0])
            if len(passes) == 6:
                out = out.copy()
                out[0] -= 50.0 * len(x)
        return out

    with pytest.warns(em.ComponentWarning, match="decreased by .* numerical problem"):
        result = fit(reduce, x, tol=0.0, max_iter=20)
    assert not result.converged and result.stop_reason == "decrease"
    assert result.iterations == 4 and len(result.history) == 5
    assert result.log_likelihood == result.history[-1]  # re-evaluated at the kept parameters


def far_start(reduce, x, k=4):
    """k−1 components on the data and one so far away that it captures nothing."""
    centres = KMeans(k - 1, n_init=1, random_state=0).fit(x).cluster_centers_
    means = np.vstack([centres, x.mean(0) + 1e3]) - reduce.shift
    return Mixture.from_covariances(np.full(k, 1 / k), means, np.array([np.eye(x.shape[1])] * k), 1e-6)


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical", "tied"])
def test_a_component_that_captures_nothing_is_restarted(covariance_type):
    rng = np.random.default_rng(3)
    truth = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0]])
    labels = rng.integers(0, 4, 2000)
    x = truth[labels] + rng.normal(size=(2000, 2))
    reduce = local_reduce(x, block_rows=256)
    result = fit(reduce, x, k=4, start=far_start(reduce, x), covariance_type=covariance_type)
    assert [j for _, j, _ in result.reseeded] == [3]
    assert result.empty_components == []
    assert min(result.cluster_sizes) > 300  # every component explains one of the four clusters
    found = result.mixture.shifted(reduce.shift).means
    assert max(np.linalg.norm(found - t, axis=1).min() for t in truth) < 0.3


def test_plain_em_keeps_the_empty_component_when_asked():
    rng = np.random.default_rng(3)
    x = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0]])[rng.integers(0, 4, 2000)]
    x = x + rng.normal(size=x.shape)
    reduce = local_reduce(x, block_rows=256)
    with pytest.warns(em.ComponentWarning, match="component 3 lost all its data") as caught:
        result = fit(reduce, x, k=4, start=far_start(reduce, x), reseed=False)
    assert caught[0].filename == __file__  # the line in this file that called into spark_gmm
    assert result.reseeded == [] and result.empty_components == [3]
    assert result.cluster_sizes[3] == 0 and result.mixture.weights[3] < 1e-12


def test_a_singleton_component_is_restarted():
    """A component started on an outlier row collapses onto it (the seed's singleton situation)."""
    rng = np.random.default_rng(4)
    x = np.vstack([rng.normal(size=(1500, 2)) + c for c in ([0, 0], [8, 0], [4, 7])] + [[[60.0, 60.0]]])
    reduce = local_reduce(x, block_rows=500)
    centres = np.array([[0.0, 0.0], [8.0, 0.0], [60.0, 60.0], [4.0, 7.0]])
    start = Mixture.from_covariances(np.full(4, 0.25), centres - reduce.shift, [np.eye(2)] * 4, 1e-6)
    plain = fit(reduce, x, k=4, start=start, reseed=False)
    assert sorted(plain.cluster_sizes)[0] == 1  # plain EM ends with a one-row component
    result = fit(reduce, x, k=4, start=start)
    assert result.reseeded and result.reseeded[0][1] == 2
    final = result.mixture.shifted(reduce.shift)
    assert min(result.cluster_sizes) >= 2  # no component is left on the single row
    for centre in ([0, 0], [8, 0], [4, 7]):  # each cluster has a component of its own
        assert np.linalg.norm(final.means - centre, axis=1).min() < 0.2


def test_full_data_lloyd_matches_scikit_learn_kmeans():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 3)) + rng.normal(scale=3, size=(5, 3))[rng.integers(0, 5, 3000)] + 1e6
    reduce = local_reduce(x, block_rows=333)
    seeds = x[rng.choice(len(x), 5, replace=False)]
    ours = initialisation.run_passes(reduce, [initialisation.lloyd_steps(seeds - reduce.shift, max_passes=300)])[0] + reduce.shift
    sk = KMeans(5, init=seeds, n_init=1, algorithm="lloyd", tol=1e-4, max_iter=300).fit(x)
    np.testing.assert_allclose(ours, sk.cluster_centers_, rtol=0, atol=1e-6)


def test_kmeans_start_does_not_depend_on_blocking_or_row_order():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2400, 2)) + rng.normal(scale=2, size=(4, 2))[rng.integers(0, 4, 2400)]
    settings = em.FitSettings(k=4, max_iter=0, tol=0, reg_covar=1e-6, seed=11)
    reference = local_reduce(x, block_rows=100)
    start = initialisation.run_passes(reference, [initialisation.initial_mixture_steps(2, settings)])[0]
    for reduce in (local_reduce(x, block_rows=37), local_reduce(x[::-1], block_rows=1000, shift=reference.shift)):
        again = initialisation.run_passes(reduce, [initialisation.initial_mixture_steps(2, settings)])[0]
        np.testing.assert_allclose(again.means, start.means, rtol=0, atol=1e-12)
        np.testing.assert_allclose(again.covariances, start.covariances, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_default_start_reaches_scikit_learns_optimum_on_overlapping_clusters(seed):
    """Three unit clusters 2.8 apart, offset by 1e7: the default start (k-means over all rows)
    ends where scikit-learn's default does, not at the early stop the candidate-only start made."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [2.8, 0.0], [1.4, 2.42]])
    x = centres[rng.integers(0, 3, 20000)] + rng.normal(size=(20000, 2)) + 1e7
    ours = fit(local_reduce(x), x, seed=seed)
    sk = SkGaussianMixture(3, random_state=seed).fit(x - 1e7)
    assert ours.log_likelihood / len(x) >= sk.score(x - 1e7) - 1e-3


def test_where_em_converges_a_split_that_raises_the_likelihood_is_taken():
    """Four unit clusters and a thin far background (k=5): the k-means start spends three
    components on background rows and covers two clusters with each of the other two. Where EM
    converges, moving the lightest component onto a split of a heavy one raises the likelihood,
    so the default fit goes on to one component per cluster and one for the background."""
    rng = np.random.default_rng(11)
    centres = 8.0 * np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = np.vstack([centres[rng.integers(0, 4, 7980)] + rng.normal(size=(7980, 2)),
                   centres.mean(0) + 200.0 * rng.normal(size=(20, 2))])
    reduce = local_reduce(x, block_rows=1000)
    plain = fit(reduce, x, k=5, seed=1, reseed=False)
    result = fit(reduce, x, k=5, seed=1)
    assert result.reseeded and result.log_likelihood > plain.log_likelihood + 0.3 * len(x)
    found = result.mixture.shifted(reduce.shift).means
    assert max(np.linalg.norm(found - c, axis=1).min() for c in centres) < 0.2  # every cluster has its own
    assert sorted(result.cluster_sizes)[0] >= 15  # and the background one component


def elongated_clusters(n, seed=5):
    """Four 10:1 clusters in 2-D at different angles, two of them parallel and 3 apart."""
    rng = np.random.default_rng(seed)
    angles = np.array([0.3, 0.3, 1.3, 1.9])
    axes = np.stack([[[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]] for a in angles]) @ np.diag([4.0, 0.4])
    labels = rng.integers(0, 4, n)
    centres = np.array([[0.0, 0.0], [0.0, 3.0], [6.0, -2.0], [6.0, 2.0]])
    return centres[labels] + np.einsum("nij,nj->ni", axes[labels], rng.normal(size=(n, 2))), labels


def test_re_splitting_a_pair_keeps_its_mass_mean_and_covariance():
    """The halves of a re-split pair have, together, the pair's mass, mean and covariance (the
    union's moments), whatever the direction; the other components are untouched."""
    rng = np.random.default_rng(3)
    d = 4
    factors = rng.normal(size=(3, d, d))
    mixture = Mixture.from_covariances(
        [0.2, 0.5, 0.3], rng.normal(scale=3, size=(3, d)), factors @ np.swapaxes(factors, 1, 2) + np.eye(d)
    )

    def moments(m, pair):
        w = m.weights[pair]
        mean = w @ m.means[pair] / w.sum()
        gaps = m.means[pair] - mean
        cov = (np.tensordot(w, m.covariances[pair], axes=1) + np.einsum("a,ai,aj->ij", w, gaps, gaps)) / w.sum()
        return w.sum(), mean, cov

    for rank in range(d):
        after = resplit_pair(mixture, 0, 2, "full", 0.0, rank)
        for before_moment, after_moment in zip(moments(mixture, [0, 2]), moments(after, [0, 2])):
            np.testing.assert_allclose(after_moment, before_moment, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(after.means[1], mixture.means[1])
        np.testing.assert_array_equal(after.covariances[1], mixture.covariances[1])
        assert not np.allclose(after.means[0], mixture.means[0])


def test_where_em_converges_re_splitting_a_pair_reaches_the_elongated_clusters():
    """Four elongated clusters: the k-means start cuts two crossing ones across, and EM converges
    there (scikit-learn's default too). Re-splitting that pair across the other direction of their
    union raises the likelihood; the default fit goes on to the optimum EM reaches from the true
    classes, and recovers them."""
    from sklearn.metrics import adjusted_rand_score

    x, labels = elongated_clusters(8000)
    reduce = local_reduce(x, block_rows=1000)
    plain = fit(reduce, x, k=4, seed=1, tol=1e-4, reseed=False)
    result = fit(reduce, x, k=4, seed=1, tol=1e-4)
    sk = SkGaussianMixture(4, random_state=1).fit(x)
    truth = np.array([x[labels == j].mean(0) for j in range(4)])
    covs = np.array([np.cov(x[labels == j].T, bias=True) for j in range(4)])
    reference = SkGaussianMixture(4, weights_init=np.bincount(labels) / len(x), means_init=truth,
                                  precisions_init=np.linalg.inv(covs), tol=1e-6).fit(x)
    assert plain.log_likelihood / len(x) < reference.score(x) - 0.1  # the cut-across optimum
    assert sk.score(x) < reference.score(x) - 0.1
    assert result.reseeded and abs(result.log_likelihood / len(x) - reference.score(x)) < 1e-3
    found = result.mixture.shifted(reduce.shift)
    joint = kernels.weighted_log_joint(x - reduce.shift, result.mixture)
    assert adjusted_rand_score(labels, joint.argmax(1)) > adjusted_rand_score(labels, reference.predict(x)) - 0.01
    np.testing.assert_allclose(np.sort(found.weights), np.sort(reference.weights_), atol=1e-3)


@dataclass(frozen=True)
class _OntoFarRows(families.GaussianFamily):
    """The Gaussian family whose only challenger moves component 2 onto `target` (shifted)."""

    target: tuple = ()

    def challengers(self, model, settings):
        means, covariances = model.means.copy(), model.covariances.copy()
        means[2], covariances[2] = self.target, np.eye(model.d)
        moved = Mixture.from_covariances(model.weights, means, covariances, settings.reg_covar)
        return [(moved, (2, 2), "moving component 2 onto the far rows")]


def test_a_challenger_that_leaves_a_component_underdetermined_is_not_taken():
    """Three rows in 6-D cannot determine a full covariance: a component on them gains
    likelihood only as far as regCovar lets its covariance collapse (a spurious optimum, which on
    digits-like data trades the classes for tiny components), so where EM converges it is not
    taken; on twelve rows it is."""
    rng = np.random.default_rng(3)
    a, b, far = np.zeros(6), np.r_[10.0, np.zeros(5)], np.r_[10.0, 60.0, np.zeros(4)]
    half = np.r_[0.8, np.zeros(5)]
    for rows, taken in ((3, False), (12, True)):
        x = np.vstack([rng.normal(size=(600, 6)) + a, rng.normal(size=(600, 6)) + b,
                       far + 0.5 * rng.normal(size=(rows, 6))])
        reduce = local_reduce(x, block_rows=300)
        start = Mixture.from_covariances(
            np.array([0.5, 0.25, 0.25]), np.stack([b, a - half, a + half]) - reduce.shift, [np.eye(6)] * 3, 1e-6
        )
        family = _OntoFarRows(target=tuple(far - reduce.shift))
        result = fit(reduce, x, k=3, start=start, family=family)
        assert bool(result.reseeded) == taken
        assert (sorted(result.cluster_sizes)[0] == rows) == taken


def statistics(reduce, mixture):
    estep = kernels.EStepPass([mixture])
    return estep.split(reduce(estep))[0]


def test_em_under_a_regulariser_per_feature_falls_only_within_its_allowance():
    """Adding diag(ε) is the M-step of a penalised objective, so the likelihood may fall by at most
    `regularisation_allowance` with ε per feature; a number ε is the same as ε for every feature."""
    falls = 0
    for seed in range(8):
        rng, x = standardised_clusters(seed)
        reduce = local_reduce(x, block_rows=100)
        reg = np.array([0.5, 1e-4])
        current = Mixture.from_covariances(np.full(3, 1 / 3), x[rng.choice(len(x), 3)] - reduce.shift,
                                           [0.3 * np.eye(2)] * 3, reg)
        for _ in range(6):
            stats = statistics(reduce, current)
            following, _ = m_step(stats, current, reg)
            after = statistics(reduce, following)
            change = (after.log_likelihood - stats.log_likelihood) / len(x)
            allowance = regularisation_allowance(current, following, reg)
            assert change >= -allowance - 1e-12
            falls += change < 0
            assert regularisation_allowance(current, following, np.full(2, 0.5)) == pytest.approx(
                regularisation_allowance(current, following, 0.5), rel=1e-12)
            current = following
    assert falls >= 3  # the allowance is used, not idle


def test_a_start_singular_but_for_regcovar_is_fitted_under_a_floor_first():
    """The indicator column is constant within two k-means clusters: EM runs with every covariance
    floored at regCovar + 3 % of each feature's variance until it converges, then at regCovar, and
    ends where plain EM from the same start does here; a fit resumed in either phase ends the
    same; plain EM (reseed=False) has no floor."""
    x, _ = indicator_clusters()
    reduce = local_reduce(x, block_rows=100)
    states, settings = [], em.FitSettings(k=3, max_iter=100, tol=1e-3, reg_covar=1e-6, seed=0)
    (result,) = em.fit(reduce, 3, float(len(x)), [settings], on_state=states.append)
    plain = fit(reduce, x, reseed=False)
    assert 0 < result.floored_until < result.iterations and result.converged and plain.floored_until == 0
    floored = [s for s in states if s.floor is not None]
    assert floored and all(s.iteration <= result.floored_until for s in floored)
    np.testing.assert_allclose(floored[0].floor, 0.03 * x.var(axis=0), rtol=1e-9)
    for state in floored:  # every covariance holds the floor
        assert (np.diagonal(state.mixture.covariances, axis1=1, axis2=2) >= state.floor).all()
    assert max(result.history[1 : result.floored_until + 1]) < result.history[-1] - len(x)
    assert result.log_likelihood == pytest.approx(plain.log_likelihood, rel=1e-6)
    for state in (floored[0], states[result.floored_until]):
        (resumed,) = em.fit(reduce, 3, float(len(x)), [settings], resume=state)
        assert resumed.history == result.history and resumed.floored_until == result.floored_until
        np.testing.assert_array_equal(resumed.mixture.covariances, result.mixture.covariances)


def test_the_levels_of_a_one_hot_feature_call_for_no_floor():
    """The levels of a one-hot feature sum to 1 in every row, so every component is singular along
    that sum, as the data are: that is no reason to floor (a floor there led EM from clusters to
    components that split the levels instead); a level constant within a cluster is."""
    rng, blobs = standardised_clusters(7, n=900)
    levels = np.eye(4)[rng.integers(0, 4, len(blobs))]
    with_levels = np.column_stack([blobs, levels])
    assert fit(local_reduce(with_levels), with_levels).floored_until == 0
    with_indicator = np.column_stack([indicator_clusters()[0], levels[:300]])
    assert fit(local_reduce(with_indicator), with_indicator).floored_until > 0


def test_on_digits_em_under_a_floor_first_ends_nearer_the_classes_than_plain_em():
    """Digits (64 standardised pixels, many constant within a digit): plain EM from the k-means
    start climbs to components shaped by regCovar; EM under a floor first, from the same starts,
    ends nearer the ten digits on average (scikit-learn's default, slower to run here, is compared
    in scripts/bench_quality.py)."""
    digits = load_digits()
    x = (digits.data - digits.data.mean(0)) / np.where(digits.data.std(0) > 0, digits.data.std(0), 1.0)
    reduce = local_reduce(x)

    def ari(mixture):
        return adjusted_rand_score(digits.target, kernels.posterior(x - reduce.shift, mixture)[1].argmax(1))

    ours, plain = [], []
    for seed in range(4):
        floored = fit(reduce, x, k=10, seed=seed)
        ours.append(ari(floored.mixture))
        plain.append(ari(fit(reduce, x, k=10, seed=seed, reseed=False).mixture))
        assert floored.floored_until > 0
    assert np.mean(ours) > np.mean(plain) + 0.05
