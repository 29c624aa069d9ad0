"""Recurring fits on Spark: alignment of a day-2 refit to day 1 (stable ids), new ids that are never
reused, the mapping through save and load, drift and label changes against numpy references."""

import numpy as np
import pandas as pd
import pytest

from spark_gmm import GaussianMixture, GaussianMixtureModel

FEATURES = ["x0", "x1", "x2"]
MEANS = np.array([[0.0, 0.0, 0.0], [8.0, 0.0, 2.0], [0.0, 9.0, -3.0], [7.0, 7.0, 7.0]])
SCALES = np.array([1.0, 0.6, 1.4, 0.8])
FAR = np.array([-12.0, 20.0, 15.0])


def day_sample(spark, seed: int, order, rows_per_component: int = 5000, extra=None):
    """Rows of the mixture, components generated in `order`, then shuffled; `extra` adds a component."""
    rng = np.random.default_rng(seed)
    centres = [(MEANS[j], SCALES[j]) for j in order] + ([(extra, 1.0)] if extra is not None else [])
    parts = []
    for mean, scale in centres:
        a = rng.normal(size=(3, 3)) * 0.3
        parts.append(rng.normal(size=(rows_per_component, 3)) @ (np.eye(3) + a) * scale + mean)
    x = np.vstack(parts)[rng.permutation(sum(len(p) for p in parts))]
    return spark.createDataFrame(pd.DataFrame(x, columns=FEATURES))


def fit(df, k, seed):
    return GaussianMixture(k=k, inputCols=FEATURES, seed=seed, tol=1e-6).fit(df)


@pytest.fixture(scope="module")
def days(spark):
    day1 = day_sample(spark, 1, [0, 1, 2, 3])
    day2 = day_sample(spark, 2, [2, 0, 3, 1])
    return day1, day2, fit(day1, 4, seed=1), fit(day2, 4, seed=7)


def test_day_two_components_continue_day_one_after_alignment(days):
    _, day2, model1, model2 = days
    aligned = model2.alignTo(model1)
    assert aligned.componentIds == [0, 1, 2, 3]
    sd = np.sqrt(np.diagonal(model1.covariances, axis1=1, axis2=2))
    assert (np.abs(aligned.means - model1.means) / sd).max() < 0.1
    # The same whatever order the refit found its components in.
    reversed_model = GaussianMixtureModel.fromArrays(model2.weights[::-1], model2.means[::-1],
                                                     model2.covariances[::-1]).setInputCols(FEATURES)
    again = reversed_model.alignTo(model1)
    np.testing.assert_array_equal(again.means, aligned.means)
    assert [c["previousId"] for c in again.alignment["components"]] == [0, 1, 2, 3]
    # Predictions follow the ids: scored by both, day-2 rows keep their day-1 component.
    both = aligned.transform(model1.copy().setPredictionCol("before").setProbabilityCol("p1").transform(day2))
    agree = both.where("prediction = before").count() / day2.count()
    assert agree > 0.99


def test_aligned_summary_is_renumbered(days):
    _, _, model1, model2 = days
    aligned = model2.alignTo(model1)
    order = [int(np.argmin(np.abs(model2.means - m).sum(axis=1))) for m in aligned.means]
    assert aligned.summary.clusterSizes == [model2.summary.clusterSizes[j] for j in order]
    assert aligned.summary.alignment is aligned.alignment
    assert aligned.summary.logLikelihood == model2.summary.logLikelihood
    assert aligned.uid == model2.uid and aligned.getInputCols() == FEATURES


def test_a_component_new_on_day_two_gets_a_new_id_never_reused(spark, days, tmp_path):
    _, _, model1, _ = days
    day2 = day_sample(spark, 3, [3, 2, 1, 0], rows_per_component=4000, extra=FAR)
    aligned = fit(day2, 5, seed=3).alignTo(model1)
    assert aligned.componentIds == [0, 1, 2, 3, 4]
    assert np.abs(aligned.means[4] - FAR).max() < 0.2
    assert aligned.alignment["components"][4]["previousId"] is None
    assert aligned.alignment["nextComponentId"] == 5
    aligned.save(str(tmp_path / "day2"))
    loaded = GaussianMixtureModel.load(str(tmp_path / "day2"))
    assert loaded.componentIds == [0, 1, 2, 3, 4] and loaded.alignment == aligned.alignment
    # Day 3: components 3 and 4 are gone, one appears elsewhere: it gets 5, not a retired id.
    means = np.vstack([loaded.means[:3], [[30.0, -30.0, 0.0]]])
    day3 = GaussianMixtureModel.fromArrays([0.3, 0.3, 0.3, 0.1], means, loaded.covariances[[0, 1, 2, 0]])
    aligned3 = day3.alignTo(loaded)
    assert aligned3.componentIds == [0, 1, 2, 5]
    assert aligned3.alignment["nextComponentId"] == 6
    assert [r["previousId"] for r in aligned3.alignment["retired"]] == [3, 4]


def test_drift_and_label_changes_match_numpy_reference(spark, days):
    day1, _, model1, model2 = days
    sample = day1.limit(3000)
    aligned = model2.alignTo(model1, dataset=sample)
    figures = aligned.alignment
    x = sample.toPandas()[FEATURES].to_numpy()
    before = np.array([model1.predict(row) for row in x])
    after = np.array([aligned.predict(row) for row in x])
    for j, c in enumerate(figures["components"]):
        delta = aligned.means[j] - model1.means[j]
        cov1, cov2 = model1.covariances[j], aligned.covariances[j]
        assert c["previousId"] == j
        assert c["weightChange"] == pytest.approx(aligned.weights[j] - model1.weights[j], abs=1e-15)
        assert c["meanShift"] == pytest.approx(np.sqrt(delta @ np.linalg.inv(cov1) @ delta), rel=1e-9)
        pooled = (cov1 + cov2) / 2
        divergence = delta @ np.linalg.inv(pooled) @ delta / 8 + 0.5 * np.log(
            np.linalg.det(pooled) / np.sqrt(np.linalg.det(cov1) * np.linalg.det(cov2)))
        assert c["divergence"] == pytest.approx(divergence, rel=1e-9)
        mine = after == j
        assert c["labelChange"] == pytest.approx((before[mine] != j).mean(), abs=1e-12)
    assert figures["rowsCompared"] == 3000
    assert figures["labelChangeShare"] == pytest.approx((before != after).mean(), abs=1e-12)


def test_label_changes_compare_ids_not_positions(spark, days):
    day1, _, model1, _ = days
    sample = day1.limit(2000)
    # The same mixture, but "previous" issued ids 0, 1, 2, 7 (its fourth component is id 7).
    previous = model1.alignTo(model1)
    previous._alignment = dict(previous.alignment, componentIds=[0, 1, 2, 7], nextComponentId=8)
    same = model1.alignTo(previous, dataset=sample).alignment
    assert same["labelChangeShare"] == 0.0 and same["componentIds"] == [0, 1, 2, 7]


def test_align_refuses_other_models():
    model = GaussianMixtureModel.fromArrays([1.0], [[0.0, 0.0]], [np.eye(2)])
    with pytest.raises(TypeError, match="GaussianMixtureModel"):
        model.alignTo("yesterday")
    with pytest.raises(ValueError, match="3 features, this one 2"):
        model.alignTo(GaussianMixtureModel.fromArrays([1.0], [[0.0, 0.0, 0.0]], [np.eye(3)]))
