"""spark_gmm.alignment without Spark: the assignment against scipy and brute force, the divergence
against its one-dimensional closed form and a numerical integral, matching with new ids, drift."""

import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from spark_gmm import alignment


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (4, 7), (6, 6), (8, 12)])
def test_assignment_is_optimal(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        cost = rng.normal(size=shape) * rng.choice([1.0, 1e3])
        chosen = alignment.min_cost_assignment(cost)
        assert len(set(chosen.tolist())) == shape[0]
        rows, columns = linear_sum_assignment(cost)
        assert cost[np.arange(shape[0]), chosen].sum() == pytest.approx(cost[rows, columns].sum(), rel=1e-12, abs=1e-9)


def test_assignment_against_brute_force_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(30):
        cost = rng.integers(0, 3, size=(4, 5)).astype(float)
        best = min(sum(cost[i, p[i]] for i in range(4)) for p in itertools.permutations(range(5), 4))
        chosen = alignment.min_cost_assignment(cost)
        assert cost[np.arange(4), chosen].sum() == best


def test_assignment_refuses_more_rows_than_columns_or_infinite_costs():
    with pytest.raises(ValueError, match="3×2"):
        alignment.min_cost_assignment(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="finite"):
        alignment.min_cost_assignment(np.array([[0.0, np.inf]]))


def test_bhattacharyya_matches_closed_form_and_integral_in_one_dimension():
    m1, s1, m2, s2 = 0.3, 0.7, 1.9, 1.6
    closed = (m1 - m2) ** 2 / (4 * (s1**2 + s2**2)) + 0.5 * np.log((s1**2 + s2**2) / (2 * s1 * s2))
    grid = np.linspace(-15, 15, 300001)
    p = np.exp(-((grid - m1) ** 2) / (2 * s1**2)) / (s1 * np.sqrt(2 * np.pi))
    q = np.exp(-((grid - m2) ** 2) / (2 * s2**2)) / (s2 * np.sqrt(2 * np.pi))
    integral = -np.log(np.trapezoid(np.sqrt(p * q), grid))
    found = alignment.bhattacharyya([[m1]], [[[s1**2]]], [[m2]], [[[s2**2]]])
    assert found.shape == (1, 1)
    assert found[0, 0] == pytest.approx(closed, rel=1e-12)
    assert found[0, 0] == pytest.approx(integral, rel=1e-8)


def test_bhattacharyya_is_symmetric_zero_on_the_diagonal_and_uses_the_full_covariance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4, 4))
    covariances = a @ np.swapaxes(a, 1, 2) + np.eye(4)
    means = rng.normal(size=(3, 4))
    d = alignment.bhattacharyya(means, covariances, means, covariances)
    np.testing.assert_allclose(d, d.T, rtol=1e-12)
    np.testing.assert_allclose(np.diag(d), 0, atol=1e-12)
    # An independent evaluation of the definition with determinants and inverses.
    s = (covariances[0] + covariances[1]) / 2
    delta = means[0] - means[1]
    reference = delta @ np.linalg.inv(s) @ delta / 8 + 0.5 * np.log(
        np.linalg.det(s) / np.sqrt(np.linalg.det(covariances[0]) * np.linalg.det(covariances[1]))
    )
    assert d[0, 1] == pytest.approx(reference, rel=1e-10)


def test_mahalanobis_against_inverse():
    cov = np.array([[2.0, 0.5], [0.5, 1.0]])
    points = np.array([[1.0, 2.0], [0.0, 0.0], [-1.0, 3.0]])
    mean = np.array([0.5, -0.5])
    reference = np.sqrt(np.einsum("ni,ij,nj->n", points - mean, np.linalg.inv(cov), points - mean))
    np.testing.assert_allclose(alignment.mahalanobis(points, mean, cov), reference, rtol=1e-12)


def unit_mixture(means):
    means = np.asarray(means, dtype=float)
    return means, np.broadcast_to(np.eye(means.shape[1]), (len(means),) + (means.shape[1],) * 2).copy()


def test_align_recovers_a_permutation_and_orders_by_id():
    previous_means, covariances = unit_mixture([[0, 0], [10, 0], [0, 10], [10, 10]])
    permutation = np.array([2, 0, 3, 1])
    found = alignment.align(previous_means[permutation] + 0.01, covariances, previous_means, covariances,
                            [0, 1, 2, 3], 4)
    assert found.ids.tolist() == [0, 1, 2, 3]
    assert (previous_means[permutation][found.order] == previous_means).all()
    assert found.previous.tolist() == [0, 1, 2, 3] and found.next_id == 4


def test_align_gives_unmatched_components_new_ids_never_reused():
    previous_means, covariances = unit_mixture([[0, 0], [10, 0], [0, 10]])
    # Previous model was aligned before: ids 0, 2, 5 and ids up to 6 were issued.
    new_means, new_covariances = unit_mixture([[50, 50], [10.1, 0], [0, 0.1], [-50, 0]])
    found = alignment.align(new_means, new_covariances, previous_means, covariances, [0, 2, 5], 7)
    assert found.ids.tolist() == [0, 2, 7, 8]  # continued 0 and 2; 5 retired; two new ones from 7
    assert found.order.tolist() == [2, 1, 0, 3]
    assert found.previous.tolist() == [0, 1, -1, -1]
    assert found.next_id == 9


def test_match_prefers_more_good_matches_over_one_cheaper_pair():
    # Row 0 is closest to column 0 but row 1 can only match column 0: the optimum gives both a match.
    divergence = np.array([[0.1, 0.3], [0.2, 5.0]])
    assert alignment.match(divergence, 1.0).tolist() == [1, 0]
    assert alignment.match(divergence, 0.25).tolist() == [0, -1]
    with pytest.raises(ValueError, match="maxDivergence"):
        alignment.match(divergence, np.inf)


def test_drift_figures_against_direct_formulas():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(3, 3, 3))
    covariances = a @ np.swapaxes(a, 1, 2) + np.eye(3)
    means = rng.normal(size=(3, 3)) * 5
    weights = np.array([0.5, 0.3, 0.2])
    new_means = means[[0, 1]] + np.array([0.2, -0.1, 0.05])
    new_covariances = covariances[[0, 1]] * 1.1
    figures = alignment.drift(np.array([0.6, 0.4]), new_means, new_covariances, weights, means, covariances,
                              ids=[3, 4], previous_ids=[3, 4, 9], previous=np.array([0, 1]))
    for j in range(2):
        c = figures["components"][j]
        delta = new_means[j] - means[j]
        assert c["id"] == c["previousId"] == [3, 4][j]
        assert c["weightChange"] == pytest.approx([0.1, 0.1][j])
        assert c["meanShift"] == pytest.approx(np.sqrt(delta @ np.linalg.inv(covariances[j]) @ delta), rel=1e-10)
        s = (new_covariances[j] + covariances[j]) / 2
        reference = delta @ np.linalg.inv(s) @ delta / 8 + 0.5 * np.log(
            np.linalg.det(s) / np.sqrt(np.linalg.det(new_covariances[j]) * np.linalg.det(covariances[j]))
        )
        assert c["divergence"] == pytest.approx(reference, rel=1e-10)
    assert figures["retired"] == [{"previousId": 9, "previousWeight": 0.2}]
    assert alignment.exceeded(figures, {}) == []
    alarms = alignment.exceeded(figures, {"weightChange": 0.05})
    assert alarms[:2] == ["component 3: weightChange 0.1 > 0.05", "component 4: weightChange 0.1 > 0.05"]
    assert alarms[2] == "component 9 retired"
    with pytest.raises(ValueError, match="unknown drift figure 'shift'"):
        alignment.exceeded(figures, {"shift": 1.0})


def test_label_change_shares():
    figures = {"components": [{"id": 0}, {"id": 1}]}
    alignment.add_label_changes(figures, [10, 0], [3, 0])
    assert [c["labelChange"] for c in figures["components"]] == [0.3, None]
    assert figures["labelChangeShare"] == 0.3 and figures["rowsCompared"] == 10
