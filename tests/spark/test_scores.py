"""score, bic and aic against scikit-learn on the same parameters; sample against the parameters."""

import numpy as np
import pytest
from pyspark.ml.functions import vector_to_array
from pyspark.sql import functions as F
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from spark_gmm import GaussianMixture, GaussianMixtureModel, InvalidInputError

WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[0.0, 0.0, 1e4], [5.0, 1.0, 1e4], [1.0, 6.0, 1e4 + 3.0]])
COVARIANCES = np.array([
    [[1.0, 0.3, 0.0], [0.3, 2.0, 0.1], [0.0, 0.1, 0.5]],
    [[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]],
    [[2.0, -0.4, 0.2], [-0.4, 1.0, 0.0], [0.2, 0.0, 1.5]],
])


@pytest.fixture(scope="module")
def model():
    return GaussianMixtureModel.fromArrays(WEIGHTS, MEANS, COVARIANCES)


@pytest.fixture(scope="module")
def sklearn_model():
    sk = SkGaussianMixture(n_components=3, covariance_type="full")
    sk.weights_, sk.means_, sk.covariances_ = WEIGHTS, MEANS, COVARIANCES
    sk.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(COVARIANCES))
    return sk


@pytest.fixture(scope="module")
def points(rng_module):
    labels = rng_module.choice(3, size=900, p=WEIGHTS)
    return np.array([rng_module.multivariate_normal(MEANS[j], COVARIANCES[j]) for j in labels])


@pytest.fixture(scope="module")
def rng_module():
    return np.random.default_rng(77)


def frame(spark, x, **extra):
    rows = [(r.tolist(), *[float(v[i]) for v in extra.values()]) for i, r in enumerate(x)]
    schema = "features array<double>" + "".join(f", {name} double" for name in extra)
    return spark.createDataFrame(rows, schema).repartition(3)


def test_score_bic_aic_equal_sklearn(spark, model, sklearn_model, points):
    df = frame(spark, points)
    np.testing.assert_allclose(model.score(df), sklearn_model.score(points), rtol=1e-11)
    np.testing.assert_allclose(model.bic(df), sklearn_model.bic(points), rtol=1e-11)
    np.testing.assert_allclose(model.aic(df), sklearn_model.aic(points), rtol=1e-11)


def test_integer_weights_score_like_duplicated_rows(spark, model, points):
    counts = np.arange(len(points)) % 3 + 1
    weighted = model.copy().setWeightCol("w")
    repeated = frame(spark, np.repeat(points, counts, axis=0))
    np.testing.assert_allclose(
        weighted.score(frame(spark, points, w=counts.astype(float))), model.score(repeated), rtol=1e-11
    )
    np.testing.assert_allclose(
        weighted.bic(frame(spark, points, w=counts.astype(float))), model.bic(repeated), rtol=1e-11
    )


def test_unscorable_rows_are_refused_or_skipped(spark, model, points):
    bad = points.copy()
    bad[[3, 9], 1] = np.nan
    df = frame(spark, bad)
    with pytest.raises(InvalidInputError, match="^2 rows cannot be scored"):
        model.score(df)
    skipping = model.copy().setHandleInvalid("skip")
    np.testing.assert_allclose(
        skipping.score(df), model.score(frame(spark, np.delete(points, [3, 9], axis=0))), rtol=1e-11
    )


def test_sample_follows_the_mixture_and_not_the_partitioning(spark, model):
    drawn = model.sample(30_000, seed=5, numPartitions=3)
    table = drawn.select(vector_to_array("features").alias("x"), "component").toPandas()
    x, labels = np.stack(table["x"].to_numpy()), table["component"].to_numpy()
    assert x.shape == (30_000, 3)
    np.testing.assert_allclose(np.bincount(labels, minlength=3) / len(labels), WEIGHTS, atol=0.01)
    for j in range(3):
        rows = x[labels == j]
        np.testing.assert_allclose(rows.mean(axis=0), MEANS[j], atol=0.06)
        np.testing.assert_allclose(np.cov(rows.T), COVARIANCES[j], atol=0.08)
    again = model.sample(30_000, seed=5, numPartitions=1).select(vector_to_array("features").alias("x"))
    assert sorted(map(tuple, np.stack(again.toPandas()["x"].to_numpy()))) == sorted(map(tuple, x))
    other = model.sample(100, seed=6).select(vector_to_array("features").alias("x")).toPandas()
    assert not np.array_equal(np.stack(other["x"].to_numpy()), x[:100])


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical", "tied"])
def test_covariance_types_fit_like_sklearn_and_score_like_it(spark, points, covariance_type):
    from spark_gmm import GaussianMixture

    df = frame(spark, points)
    model = GaussianMixture(k=3, seed=2, tol=1e-9, maxIter=200, covarianceType=covariance_type).fit(df)
    sk = SkGaussianMixture(n_components=3, covariance_type=covariance_type, tol=1e-9, max_iter=200,
                           means_init=model.means - [0, 0, 1e4], random_state=0).fit(points - [0, 0, 1e4])
    # Both reach the same optimum from the same means (sklearn on data moved to the origin, where its
    # E[x²] − μ² M-steps keep their digits).
    np.testing.assert_allclose(model.score(df), sk.score(points - [0, 0, 1e4]), rtol=1e-6)
    assert model.getCovarianceType() == covariance_type
    np.testing.assert_allclose(model.bic(df), sk.bic(points - [0, 0, 1e4]), rtol=1e-6)
    np.testing.assert_allclose(model.aic(df), sk.aic(points - [0, 0, 1e4]), rtol=1e-6)
    rebuilt = GaussianMixtureModel.fromArrays(model.weights, model.means, model.covariances, covariance_type)
    np.testing.assert_allclose(rebuilt.bic(df), model.bic(df), rtol=1e-12)
    if covariance_type != "full":
        with pytest.raises(ValueError, match=f"structure of covarianceType '{covariance_type}'"):
            GaussianMixtureModel.fromArrays(WEIGHTS, MEANS, COVARIANCES, covariance_type)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical", "tied"])
def test_scores_of_each_covariance_type_equal_sklearn_on_the_same_parameters(spark, points, covariance_type):
    # Near the origin: scikit-learn's diag/spherical densities expand (x − μ)², losing digits at 1e4.
    points, means = points - [0, 0, 1e4], MEANS - [0, 0, 1e4]
    k, d = means.shape
    variances = np.array([[1.0, 2.0, 0.5], [0.7, 0.4, 1.1], [2.0, 1.0, 1.5]])
    sk_covariances = {
        "diag": variances,
        "spherical": variances.mean(axis=1),
        "tied": COVARIANCES[0],
    }[covariance_type]
    full = {
        "diag": np.array([np.diag(v) for v in variances]),
        "spherical": np.array([v * np.eye(d) for v in variances.mean(axis=1)]),
        "tied": np.broadcast_to(COVARIANCES[0], (k, d, d)),
    }[covariance_type]
    sk = SkGaussianMixture(n_components=k, covariance_type=covariance_type)
    sk.weights_, sk.means_, sk.covariances_ = WEIGHTS, means, sk_covariances
    sk.precisions_cholesky_ = {
        "diag": 1 / np.sqrt(variances),
        "spherical": 1 / np.sqrt(variances.mean(axis=1)),
        "tied": np.linalg.cholesky(np.linalg.inv(COVARIANCES[0])),
    }[covariance_type]
    model = GaussianMixtureModel.fromArrays(WEIGHTS, means, full, covariance_type)
    df = frame(spark, points)
    np.testing.assert_allclose(model.score(df), sk.score(points), rtol=1e-11)
    np.testing.assert_allclose(model.bic(df), sk.bic(points), rtol=1e-11)
    np.testing.assert_allclose(model.aic(df), sk.aic(points), rtol=1e-11)


def test_an_infinite_weight_cannot_be_scored(spark, model, points):
    weights = np.ones(len(points))
    weights[5] = np.inf
    weighted = model.copy().setWeightCol("w")
    with pytest.raises(InvalidInputError, match="^1 rows cannot be scored .* a null, negative, NaN or infinite weight"):
        weighted.score(frame(spark, points, w=weights))


def test_fit_and_score_leave_out_the_same_rows_and_weights(spark, points):
    """One row rule: fitting and scoring skip the same rows (null, NaN, negative and infinite weights;
    zero and -0.0 weights are kept) and count them the same way."""
    from spark_gmm import GaussianMixture

    x = points[:60] - [0, 0, 1e4]
    edge = [None, float("nan"), -1.0, float("inf"), float("-inf"), 0.0, -0.0, 1e-300, 2.5]
    weights = [edge[i] if i < len(edge) else 1.0 + (i % 3) for i in range(len(x))]
    features = [row.tolist() for row in x]
    features[20] = [float("nan"), 0.0, 0.0]  # bad features and a bad weight: one row left out
    weights[20] = None
    df = spark.createDataFrame(list(zip(features, weights)), "features array<double>, w double").repartition(3)
    usable = np.array([w is not None and np.isfinite(w) and w >= 0 for w in weights])
    usable[20] = False
    left_out = int((~usable).sum())
    assert left_out == 6

    estimator = GaussianMixture(k=2, maxIter=5, seed=3, weightCol="w")
    with pytest.raises(InvalidInputError, match="5 rows with a null, negative, NaN or infinite weight in 'w'"):
        estimator.fit(df)
    model = estimator.setHandleInvalid("skip").fit(df)
    assert model.summary.invalidRowsSkipped == left_out
    kept_weights = np.array([w for w, ok in zip(weights, usable) if ok])
    assert model.summary.totalWeight == pytest.approx(kept_weights.sum(), rel=1e-15)

    with pytest.raises(InvalidInputError, match=f"^{left_out} rows cannot be scored"):
        model.copy().setHandleInvalid("error").score(df)
    _, _, log_density = model.scoreArray(x[usable])
    expected = (kept_weights * log_density).sum() / kept_weights.sum()
    np.testing.assert_allclose(model.score(df), expected, rtol=1e-11)


@pytest.mark.parametrize("udf_kind", ["arrow", "pandas"])
def test_transform_and_score_equal_sklearn_through_either_udf(spark, model, sklearn_model, points, udf_kind, monkeypatch):
    """Spark ≥ 4.1 scores through an Arrow UDF; Spark 4.0, which has no `arrow_udf`, through a pandas
    UDF around the same function. Both give scikit-learn's scores, and nulls for unusable rows."""
    if udf_kind == "pandas":
        monkeypatch.delattr("pyspark.sql.functions.arrow_udf")
    bad = points[:60].copy()
    bad[[4, 7]] = np.inf  # nothing finite: unusable even with 'keep' (which marginalises what is not finite)
    keeping = model.copy().setHandleInvalid("keep").setLogLikelihoodCol("ll")
    out = keeping.transform(frame(spark, bad, i=np.arange(60))).orderBy("i").select(
        "prediction", F.when(F.col("probability").isNotNull(), vector_to_array("probability")).alias("p"), "ll"
    ).toPandas()
    good = np.delete(np.arange(60), [4, 7])
    assert out["prediction"].isna().to_numpy().nonzero()[0].tolist() == [4, 7]
    assert out["p"].isna().to_numpy().nonzero()[0].tolist() == [4, 7]
    assert out["ll"].isna().to_numpy().nonzero()[0].tolist() == [4, 7]
    np.testing.assert_array_equal(out["prediction"][good].astype(int), sklearn_model.predict(bad[good]))
    np.testing.assert_allclose(np.stack(out["p"][good]), sklearn_model.predict_proba(bad[good]), atol=1e-12)
    np.testing.assert_allclose(out["ll"][good], sklearn_model.score_samples(bad[good]), rtol=1e-11)
    np.testing.assert_allclose(model.score(frame(spark, points)), sklearn_model.score(points), rtol=1e-11)
    w = 1.0 + np.arange(len(points)) % 3
    expected = (w * sklearn_model.score_samples(points)).sum() / w.sum()
    np.testing.assert_allclose(model.copy().setWeightCol("w").score(frame(spark, points, w=w)), expected, rtol=1e-11)


def test_empty_output_columns_are_left_out_as_in_mllib(spark, model, sklearn_model, points):
    """MLlib's transform skips an output column whose name is empty; without probabilities the
    scores carry none. Unscorable rows are still refused by the first column added."""
    df = frame(spark, points[:80], i=np.arange(80))
    only_prediction = model.copy().setProbabilityCol("").transform(df)
    assert only_prediction.columns == ["features", "i", "prediction"]
    predicted = only_prediction.orderBy("i").toPandas()["prediction"].to_numpy()
    np.testing.assert_array_equal(predicted, sklearn_model.predict(points[:80]))
    only_probability = model.copy().setPredictionCol("").transform(df)
    assert only_probability.columns == ["features", "i", "probability"]
    probability = np.stack(only_probability.orderBy("i").select(vector_to_array("probability").alias("p")).toPandas()["p"])
    np.testing.assert_allclose(probability, sklearn_model.predict_proba(points[:80]), atol=1e-12)
    bad = points[:80].copy()
    bad[5, 0] = np.nan
    with pytest.raises(Exception, match="cannot be scored"):
        model.copy().setPredictionCol("").transform(frame(spark, bad)).collect()
    with pytest.warns(UserWarning, match="adds no column"):
        assert model.copy().setPredictionCol("").setProbabilityCol("").transform(df) is df
    fitted = GaussianMixture(k=3, seed=1, maxIter=3, probabilityCol="").fit(df)
    assert fitted.summary.cluster.count() == 80
    with pytest.raises(ValueError, match="probabilityCol is empty"):
        fitted.summary.probability


def test_probabilities_as_arrays_hold_the_vectors_values(spark, model, sklearn_model, points, tmp_path):
    """probabilityFormat='array' gives array<double> (what SQL and table formats read), with the
    values of the vector column; it is kept by save and load, and a bad value is refused."""
    bad = points[:50].copy()
    bad[3, 1] = np.nan
    df = frame(spark, bad, i=np.arange(50))
    arrays = model.copy().setProbabilityFormat("array").setHandleInvalid("keep")
    out = arrays.transform(df)
    assert out.schema["probability"].dataType.simpleString() == "array<double>"
    pdf = out.orderBy("i").toPandas()
    np.testing.assert_allclose(np.stack(pdf["probability"].drop(index=3)),
                               sklearn_model.predict_proba(np.delete(bad, 3, axis=0)), atol=1e-12)
    vectors = model.copy().setHandleInvalid("keep").transform(df).orderBy("i")
    expected = vectors.select(vector_to_array("probability").alias("p")).toPandas()["p"]
    assert all(np.array_equal(a, b) for a, b in zip(pdf["probability"], expected))  # the row with a NaN too
    arrays.save(str(tmp_path / "model"))
    assert GaussianMixtureModel.load(str(tmp_path / "model")).getProbabilityFormat() == "array"
    with pytest.raises(ValueError, match="probabilityFormat must be one of 'vector', 'array', got 'list'"):
        model.copy().setProbabilityFormat("list").transform(df)


def streamed(df, path):
    """`df` written to Parquet at `path` and read back as a stream."""
    df.write.parquet(str(path))
    return df.sparkSession.readStream.schema(df.schema).parquet(str(path))


def scored_stream(out, name):
    """The rows of a streaming `transform`, run to the end of its input (a memory sink)."""
    query = out.writeStream.format("memory").queryName(name).start()
    try:
        query.processAllAvailable()
    finally:
        query.stop()
    return out.sparkSession.table(name)


def test_a_stream_is_scored_like_a_table_and_refused_where_it_must_be_read_whole(spark, model, sklearn_model,
                                                                                  points, tmp_path):
    """transform scores a stream (as MLlib's does); fit, score, bic and aic, which must read the
    whole input, refuse one in words."""
    stream = streamed(frame(spark, points[:60], i=np.arange(60)), tmp_path / "in")
    out = scored_stream(model.transform(stream), "gmm_scored_stream").orderBy("i").toPandas()
    np.testing.assert_array_equal(out["prediction"], sklearn_model.predict(points[:60]))
    np.testing.assert_allclose(np.stack(out["probability"].map(lambda v: v.toArray())),
                               sklearn_model.predict_proba(points[:60]), atol=1e-12)
    with pytest.raises(InvalidInputError, match=r"^score \(and bic, aic\) reads the whole input: it needs a batch"):
        model.bic(stream)
    with pytest.raises(InvalidInputError, match=r"^GaussianMixture.fit reads the whole input: .*streaming"):
        GaussianMixture(k=3).fit(stream)


def test_vectors_read_from_parquet_are_scored_like_vectors_in_memory(spark, model, sklearn_model, points, tmp_path):
    """Spark 4.3 hands a Parquet scan's columnar batches straight to a Python UDF
    (spark.sql.execution.arrow.pythonUDF.columnarInput.enabled, on by default) and that path fails on
    a vector column ([UNSUPPORTED_DATATYPE] ... UDT), the features or any other column. transform,
    score and a mixed model's transform read such input row by row and give the same scores."""
    from pyspark.ml.functions import array_to_vector

    from spark_gmm import MixedMixture

    frame(spark, points[:200], i=np.arange(200)).select(
        "i", array_to_vector("features").alias("features"), (F.col("i") % 2 == 0).alias("flag"),
        F.col("features")[0].alias("x"),
    ).write.parquet(str(tmp_path / "vectors"))
    stored = spark.read.parquet(str(tmp_path / "vectors"))
    out = model.transform(stored).orderBy("i").select("prediction", vector_to_array("probability").alias("p")).toPandas()
    expected = points[:200]
    np.testing.assert_array_equal(out["prediction"], sklearn_model.predict(expected))
    np.testing.assert_allclose(np.stack(out["p"]), sklearn_model.predict_proba(expected), atol=1e-12)
    np.testing.assert_allclose(model.score(stored), sklearn_model.score(expected), rtol=1e-11)
    mixed = MixedMixture(k=2, seed=1, gaussianCols=["x"], bernoulliCols=["flag"], maxIter=3).fit(stored)
    in_memory = spark.createDataFrame(stored.toPandas()[["i", "x", "flag"]])
    assert mixed.transform(stored).orderBy("i").select("prediction").collect() == \
        mixed.transform(in_memory).orderBy("i").select("prediction").collect()
    assert mixed.score(stored) == pytest.approx(mixed.score(in_memory), rel=1e-12)
