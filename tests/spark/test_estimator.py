"""The Spark estimator and model through the public API, against scikit-learn, scipy and known truth."""

import re
import warnings

import numpy as np
import pyarrow as pa
import pytest
from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.ml.functions import array_to_vector
from pyspark.ml.linalg import DenseMatrix, DenseVector, Vectors, VectorUDT
from pyspark.ml.stat import MultivariateGaussian
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, StructField, StructType
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from spark_gmm import GaussianMixture, GaussianMixtureModel, InvalidInputError

# -- helpers ---------------------------------------------------------------------------------------


def frame(spark, x, **extra):
    """DataFrame with `id`, `arr` (array<double>), `features` (vector), x0..x{d-1} and `extra` columns."""
    n, d = x.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    table = pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "arr": pa.ListArray.from_arrays(offsets, pa.array(x.ravel())),
            **{name: pa.array(values) for name, values in extra.items()},
        }
    )
    df = spark.createDataFrame(table)
    return df.select(
        "*",
        array_to_vector("arr").alias("features"),
        *[F.col("arr")[i].alias(f"x{i}") for i in range(d)],
    )


def sample(rng, n, weights, means, covs):
    labels = rng.choice(len(weights), size=n, p=weights)
    x = np.empty((n, means.shape[1]))
    for j in range(len(weights)):
        rows = labels == j
        x[rows] = rng.multivariate_normal(means[j], covs[j], size=rows.sum())
    return x, labels


def matching(means_a, means_b):
    """perm with means_b[perm[j]] ≈ means_a[j]; asserts it is a permutation."""
    dist = np.linalg.norm(means_a[:, None, :] - means_b[None, :, :], axis=2)
    perm = dist.argmin(axis=1)
    assert sorted(perm.tolist()) == list(range(len(means_a))), dist
    return perm


def assert_same_model(a, b, rtol, atol=1e-10, permute=False):
    perm = matching(a.means, b.means) if permute else np.arange(len(a.weights))
    np.testing.assert_allclose(np.array(a.weights), np.array(b.weights)[perm], rtol=rtol, atol=atol)
    np.testing.assert_allclose(a.means, b.means[perm], rtol=rtol, atol=atol)
    np.testing.assert_allclose(a.covariances, b.covariances[perm], rtol=rtol, atol=atol)


def assert_history_non_decreasing(history):
    history = np.asarray(history)
    steps = np.diff(history)
    assert np.all(steps >= -1e-12 * np.abs(history[:-1])), (steps.min(), history)


def mixture_log_density(x, weights, means, covs):
    return logsumexp(
        np.column_stack(
            [np.log(w) + multivariate_normal(m, c).logpdf(x) for w, m, c in zip(weights, means, covs)]
        ),
        axis=1,
    )


def collect_sorted(df, *columns):
    return df.orderBy("id").select(*columns).collect()


# -- shared data and fits --------------------------------------------------------------------------

TRUE_WEIGHTS = np.array([0.5, 0.3, 0.2])
TRUE_MEANS = np.array([[0.0, 0.0, 0.0], [6.0, 1.0, -2.0], [-3.0, 6.0, 2.0]])
TRUE_COVS = np.array(
    [
        [[1.0, 0.3, 0.0], [0.3, 0.8, 0.1], [0.0, 0.1, 0.5]],
        [[0.6, -0.2, 0.1], [-0.2, 1.2, 0.0], [0.1, 0.0, 0.9]],
        [[1.5, 0.0, 0.4], [0.0, 0.4, 0.0], [0.4, 0.0, 0.7]],
    ]
)


@pytest.fixture(scope="module")
def truth_data(spark):
    x, labels = sample(np.random.default_rng(2024), 20000, TRUE_WEIGHTS, TRUE_MEANS, TRUE_COVS)
    df = frame(spark, x, label=labels.astype(np.int64)).cache()
    df.count()
    yield x, labels, df
    df.unpersist()


@pytest.fixture(scope="module")
def fitted(truth_data):
    """Default settings (k-means|| init, default tol) on 20k rows from known parameters."""
    _, _, df = truth_data
    return GaussianMixture(k=3, seed=11).fit(df)


@pytest.fixture(scope="module")
def score_data(spark):
    x, labels = sample(np.random.default_rng(77), 400, TRUE_WEIGHTS, TRUE_MEANS, TRUE_COVS)
    return x, frame(spark, x)


def four_d_clusters(rng, n):
    means = np.array([[0.0, 0.0, 0.0, 0.0], [5.0, 0.0, -2.0, 1.0], [-2.0, 5.0, 2.0, -3.0]])
    covs = []
    for _ in range(3):
        a = rng.normal(scale=0.5, size=(4, 4))
        covs.append(a @ a.T + 0.3 * np.eye(4))
    return sample(rng, n, np.array([0.5, 0.3, 0.2]), means, np.array(covs)) + (means,)


@pytest.fixture(scope="module")
def four_d(spark):
    x, labels, means = four_d_clusters(np.random.default_rng(99), 3000)
    df = frame(spark, x, g=(np.arange(len(x)) % 3).astype(np.int64)).cache()
    df.count()
    yield x, labels, means, df
    df.unpersist()


# -- against scikit-learn --------------------------------------------------------------------------


def test_matches_sklearn_from_identical_start(four_d):
    x, _, means, df = four_d
    rng = np.random.default_rng(5)
    w0 = np.full(3, 1 / 3)
    mu0 = means + rng.normal(scale=0.7, size=means.shape)
    cov0 = np.array([1.5 * np.eye(4)] * 3)
    n_iter = 8

    start = GaussianMixtureModel.fromArrays(w0, mu0, cov0)
    model = GaussianMixture(k=3, maxIter=n_iter, tol=0.0).setInitialModel(start).fit(df)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = SkGaussianMixture(
            n_components=3, covariance_type="full", weights_init=w0, means_init=mu0,
            precisions_init=np.linalg.inv(cov0), max_iter=n_iter, tol=0, reg_covar=1e-6,
            init_params="random_from_data", random_state=0,
        ).fit(x)

    np.testing.assert_allclose(model.weights, sk.weights_, rtol=1e-6)
    np.testing.assert_allclose(model.means, sk.means_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.covariances, sk.covariances_, rtol=1e-6, atol=1e-8)

    summary = model.summary
    assert summary.numIter == n_iter
    assert len(summary.logLikelihoodHistory) == n_iter + 1
    assert summary.converged is False
    np.testing.assert_allclose(summary.logLikelihoodHistory[-2] / len(x), sk.lower_bound_, rtol=1e-9)
    np.testing.assert_allclose(summary.logLikelihood, sk.score(x) * len(x), rtol=1e-9)
    assert_history_non_decreasing(summary.logLikelihoodHistory)


# -- recovering known parameters -------------------------------------------------------------------


def assert_recovers_truth(model):
    perm = matching(TRUE_MEANS, model.means)
    np.testing.assert_allclose(np.array(model.weights)[perm], TRUE_WEIGHTS, atol=0.02)
    np.testing.assert_allclose(model.means[perm], TRUE_MEANS, atol=0.1)
    np.testing.assert_allclose(model.covariances[perm], TRUE_COVS, atol=0.15)


def test_recovers_known_parameters_kmeans_parallel(fitted):
    assert_recovers_truth(fitted)


def test_recovers_known_parameters_random_init(truth_data):
    _, _, df = truth_data
    model = GaussianMixture(k=3, initMode="random", seed=5).fit(df)
    assert model.getInitMode() == "random"
    assert_recovers_truth(model)
    assert_history_non_decreasing(model.summary.logLikelihoodHistory)


# -- summary ---------------------------------------------------------------------------------------


def test_summary_fields(fitted, truth_data):
    x, _, df = truth_data
    assert fitted.hasSummary
    s = fitted.summary
    assert s.k == 3
    assert len(s.clusterSizes) == 3 and sum(s.clusterSizes) == 20000
    assert all(isinstance(c, int) for c in s.clusterSizes)
    assert s.converged is True
    assert 1 <= s.numIter < 100
    assert len(s.logLikelihoodHistory) == s.numIter + 1
    assert s.logLikelihood == s.logLikelihoodHistory[-1]
    assert_history_non_decreasing(s.logLikelihoodHistory)
    # logLikelihood is the total log-likelihood of the returned parameters.
    expected = mixture_log_density(x, fitted.weights, fitted.means, fitted.covariances).sum()
    np.testing.assert_allclose(s.logLikelihood, expected, rtol=1e-9)
    assert s.stopReason == "converged" and s.reseeded == [] and s.emptyComponents == []
    assert s.featuresCol == "features"
    assert s.predictionCol == "prediction" and s.probabilityCol == "probability"

    predictions = s.predictions
    assert set(df.columns) | {"prediction", "probability"} == set(predictions.columns)
    assert predictions.count() == 20000
    # clusterSizes are the sizes of the predicted clusters.
    counts = {r["prediction"]: r["count"] for r in predictions.groupBy("prediction").count().collect()}
    assert [counts.get(j, 0) for j in range(3)] == s.clusterSizes
    assert s.cluster.columns == ["prediction"]
    assert s.probability.columns == ["probability"]


@pytest.mark.parametrize("reseed", [True, False])
def test_a_start_whose_component_captures_nothing(spark, reseed):
    """Restarted by default, so the model has k components that each hold data; plain EM on request."""
    rng = np.random.default_rng(8)
    truth = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    x = truth[rng.integers(0, 3, 3000)] + rng.normal(size=(3000, 2))
    start = GaussianMixtureModel.fromArrays(
        [0.5, 0.49, 0.01], [[0.0, 0.0], [3.0, 3.0], [500.0, 500.0]], [np.eye(2)] * 3
    )
    estimator = GaussianMixture(seed=1, reseedComponents=reseed).setInitialModel(start)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = estimator.fit(frame(spark, x))
    s = model.summary
    if reseed:
        assert [j for _, j, _ in s.reseeded] == [2] and s.emptyComponents == []
        assert min(s.clusterSizes) > 800 and min(model.weights) > 0.25
        assert max(np.linalg.norm(model.means - t, axis=1).min() for t in truth) < 0.2
    else:
        assert s.reseeded == [] and s.emptyComponents == [2] and s.clusterSizes[2] == 0
        assert any("component 2 lost all its data" in str(w.message) for w in caught)


def test_history_non_decreasing_long_climb(spark):
    rng = np.random.default_rng(3)
    means = np.array([[0.0, 0.0], [1.5, 0.5], [0.5, 2.0]])
    x, _ = sample(rng, 3000, np.array([0.4, 0.3, 0.3]), means, np.array([np.eye(2)] * 3))
    df = frame(spark, x)
    model = GaussianMixture(k=3, tol=0.0, maxIter=25, seed=1).fit(df)
    history = model.summary.logLikelihoodHistory
    assert len(history) == 26  # no early stop (the fit stops early if the likelihood decreases)
    assert history[-1] > history[0]
    assert_history_non_decreasing(history)


# -- input formats ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def format_models(four_d):
    _, _, _, df = four_d
    est = dict(k=3, tol=1e-10, maxIter=100, seed=3)
    return {
        "vector": GaussianMixture(featuresCol="features", **est).fit(df),
        "array_double": GaussianMixture(featuresCol="arr", **est).fit(df),
        "array_float": GaussianMixture(featuresCol="arrf", **est).fit(
            df.withColumn("arrf", F.col("arr").cast("array<float>"))
        ),
        "input_cols": GaussianMixture(inputCols=["x0", "x1", "x2", "x3"], **est).fit(df),
    }


@pytest.mark.parametrize("kind", ["array_double", "input_cols"])
def test_input_formats_give_the_same_model(format_models, kind):
    assert_same_model(format_models[kind], format_models["vector"], rtol=1e-9)


def test_float_array_gives_nearly_the_same_model(format_models):
    assert_same_model(format_models["array_float"], format_models["vector"], rtol=1e-4, atol=1e-4,
                      permute=True)


def test_integer_weights_equal_duplicated_rows(spark):
    rng = np.random.default_rng(8)
    means = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    x, _ = sample(rng, 2000, np.array([0.5, 0.3, 0.2]), means, np.array([np.eye(2)] * 3))
    counts = rng.integers(0, 4, size=len(x)).astype(np.int32)  # zero weights included
    df = frame(spark, x, c=counts)
    duplicated = df.withColumn("copy", F.explode(F.array_repeat(F.lit(1), F.col("c"))))
    assert duplicated.count() == counts.sum()

    # From the same start, every EM step is the same up to round-off.
    start = GaussianMixtureModel.fromArrays(
        [0.2, 0.3, 0.5], means + np.array([[0.5, -0.5], [-1.0, 0.3], [0.4, 0.8]]), [np.eye(2) * 2] * 3
    )
    est = dict(k=3, tol=0.0, maxIter=10)
    weighted = GaussianMixture(weightCol="c", **est).setInitialModel(start).fit(df)
    repeated = GaussianMixture(**est).setInitialModel(start).fit(duplicated)
    assert_same_model(weighted, repeated, rtol=1e-9)
    np.testing.assert_allclose(
        weighted.summary.logLikelihoodHistory, repeated.summary.logLikelihoodHistory, rtol=1e-12
    )

    # With the default (weighted k-means||) initialisation both reach the same optimum.
    est = dict(k=3, tol=1e-10, maxIter=200, seed=4)
    weighted = GaussianMixture(weightCol="c", **est).fit(df)
    repeated = GaussianMixture(**est).fit(duplicated)
    assert_same_model(weighted, repeated, rtol=1e-4, atol=1e-4, permute=True)
    np.testing.assert_allclose(
        weighted.summary.logLikelihood, repeated.summary.logLikelihood, rtol=1e-9
    )


# -- determinism and partitioning ------------------------------------------------------------------


PARTITION_FIT = dict(k=3, tol=0.0, maxIter=4, seed=7)


@pytest.fixture(scope="module")
def two_partition_model(four_d):
    _, _, _, df = four_d
    assert df.rdd.getNumPartitions() == 2
    return GaussianMixture(**PARTITION_FIT).fit(df)


def test_same_seed_gives_identical_model(four_d, two_partition_model):
    _, _, _, df = four_d
    again = GaussianMixture(**PARTITION_FIT).fit(df)
    np.testing.assert_array_equal(again.weights, two_partition_model.weights)
    np.testing.assert_array_equal(again.means, two_partition_model.means)
    np.testing.assert_array_equal(again.covariances, two_partition_model.covariances)
    assert again.summary.logLikelihoodHistory == two_partition_model.summary.logLikelihoodHistory


@pytest.mark.parametrize("layout", ["one", "empty_partitions"])
def test_partitioning_does_not_change_the_model(four_d, two_partition_model, layout):
    """The whole fit, k-means|| initialisation included, on other partitionings of the same rows."""
    _, _, _, df = four_d
    if layout == "one":
        data = df.coalesce(1)
        assert data.rdd.getNumPartitions() == 1
    else:
        data = df.repartition(8, "g")  # g takes 3 values: at most 3 of the 8 partitions hold rows
        assert data.rdd.getNumPartitions() == 8
        assert data.select(F.spark_partition_id()).distinct().count() <= 3
    model = GaussianMixture(**PARTITION_FIT).fit(data)
    assert_same_model(model, two_partition_model, rtol=1e-8)
    assert model.summary.clusterSizes == two_partition_model.summary.clusterSizes


def test_fifty_partitions_give_the_same_model(four_d):
    """EM passes over 50 partitions (from a given start: a pass costs ~0.1 s per partition locally)."""
    _, _, means, df = four_d
    start = GaussianMixtureModel.fromArrays([0.3, 0.3, 0.4], means + 0.5, [np.eye(4)] * 3)
    est = dict(k=3, tol=0.0, maxIter=2)
    two = GaussianMixture(**est).setInitialModel(start).fit(df)
    data = df.repartition(50)
    assert data.rdd.getNumPartitions() == 50
    fifty = GaussianMixture(**est).setInitialModel(start).fit(data)
    assert_same_model(fifty, two, rtol=1e-8)
    assert fifty.summary.clusterSizes == two.summary.clusterSizes


# -- hard cases ------------------------------------------------------------------------------------


def test_100_dimensional_clusters(spark):
    rng = np.random.default_rng(100)
    centers = rng.normal(scale=2.0, size=(4, 100))
    labels = rng.integers(0, 4, size=2000)
    x = centers[labels] + rng.normal(size=(2000, 100))
    df = frame(spark, x)
    model = GaussianMixture(k=4, seed=1, featuresCol="arr").fit(df)
    assert model.means.shape == (4, 100)
    predicted = np.array([r["prediction"] for r in collect_sorted(model.transform(df), "prediction")])
    assert adjusted_rand_score(labels, predicted) >= 0.99


def test_large_offset_gives_the_same_fit(spark):
    rng = np.random.default_rng(21)
    x, _ = sample(rng, 3000, TRUE_WEIGHTS, TRUE_MEANS, TRUE_COVS)
    offset = 1e7
    centred_df, offset_df = frame(spark, x), frame(spark, x + offset)
    est = dict(k=3, tol=1e-12, maxIter=200, seed=6)
    centred = GaussianMixture(**est).fit(centred_df)
    shifted = GaussianMixture(**est).fit(offset_df)

    perm = matching(centred.means, shifted.means - offset)
    np.testing.assert_allclose(np.array(shifted.weights)[perm], centred.weights, rtol=1e-6)
    np.testing.assert_allclose(shifted.means[perm] - offset, centred.means, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(shifted.covariances[perm], centred.covariances, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(
        shifted.summary.logLikelihood, centred.summary.logLikelihood, rtol=1e-7
    )
    p_centred = np.array([r[0] for r in collect_sorted(centred.transform(centred_df), "prediction")])
    p_shifted = np.array([r[0] for r in collect_sorted(shifted.transform(offset_df), "prediction")])
    np.testing.assert_array_equal(perm[p_centred], p_shifted)


# -- transform and prediction ----------------------------------------------------------------------


def test_transform_output(fitted, score_data):
    x, df = score_data
    out = fitted.transform(df, {fitted.logLikelihoodCol: "logLik"})
    assert out.columns == df.columns + ["prediction", "probability", "logLik"]
    fields = {f.name: f.dataType for f in out.schema.fields}
    assert isinstance(fields["prediction"], IntegerType)
    assert isinstance(fields["probability"], VectorUDT)
    assert isinstance(fields["logLik"], DoubleType)

    rows = collect_sorted(out, *df.columns, "prediction", "probability", "logLik")
    assert len(rows) == len(x)
    # Input columns are unchanged.
    np.testing.assert_array_equal(np.array([r["features"].toArray() for r in rows]), x)
    np.testing.assert_array_equal(np.array([r["x1"] for r in rows]), x[:, 1])
    probability = np.array([r["probability"].toArray() for r in rows])
    np.testing.assert_allclose(probability.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert np.all(probability >= 0)
    np.testing.assert_array_equal(np.array([r["prediction"] for r in rows]), probability.argmax(axis=1))
    expected = mixture_log_density(x, fitted.weights, fitted.means, fitted.covariances)
    np.testing.assert_allclose(np.array([r["logLik"] for r in rows]), expected, rtol=1e-9)


def test_transform_far_from_origin_keeps_precision(spark):
    """Scoring data at 1e7 (as fitting does) loses no precision: log densities match scipy."""
    offset = 1e7
    means = np.array([[0.0, 0.0, 0.0], [0.5, 0.2, -0.3]]) + offset
    covs = np.array([np.eye(3) * 0.01, np.diag([0.02, 0.01, 0.03])])
    model = GaussianMixtureModel.fromArrays([0.6, 0.4], means, covs)
    rng = np.random.default_rng(4)
    x = means[rng.integers(0, 2, size=300)] + rng.normal(scale=0.1, size=(300, 3))
    out = model.transform(frame(spark, x), {model.logLikelihoodCol: "ll"})
    got = np.array([r["ll"] for r in collect_sorted(out, "ll")])
    expected = mixture_log_density(x, [0.6, 0.4], means, covs)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-9)
    for i in range(0, 300, 30):
        single = model.predictProbability(x[i]).toArray()
        joint = np.array([np.log(w) + multivariate_normal(m, c).logpdf(x[i])
                          for w, m, c in zip([0.6, 0.4], means, covs)])
        np.testing.assert_allclose(single, np.exp(joint - logsumexp(joint)), rtol=1e-9, atol=1e-12)


def test_transform_without_loglikelihood_col(fitted, score_data):
    _, df = score_data
    assert fitted.transform(df).columns == df.columns + ["prediction", "probability"]


def unusable_rows(spark, column):
    """Rows 1 (null), 2 (NaN) and 4 (three features) cannot be scored by a 2-feature model."""
    if column == "vector":
        rows = [(0, Vectors.dense([0.1, 0.2])), (1, None), (2, Vectors.dense([np.nan, 1.0])),
                (3, Vectors.dense([5.0, 4.0])), (4, Vectors.dense([1.0, 2.0, 3.0]))]
        schema = StructType([StructField("id", IntegerType()), StructField("features", VectorUDT())])
    else:
        rows = [(0, [0.1, 0.2]), (1, None), (2, [np.nan, 1.0]), (3, [5.0, 4.0]), (4, [1.0, 2.0, 3.0])]
        schema = "id int, features array<double>"
    return spark.createDataFrame(rows, schema)


@pytest.mark.parametrize("column", ["vector", "array"])
def test_transform_follows_handle_invalid_for_unusable_rows(spark, column):
    """As MLlib, a row that cannot be scored fails the query by default; 'skip' drops it; 'keep'
    scores a row with a finite feature on its finite features (row 2: x₁ = 1 is nearer component
    0) and gives nulls to the others."""
    model = GaussianMixtureModel.fromArrays([0.5, 0.5], [[0.0, 0.0], [5.0, 5.0]], [np.eye(2)] * 2)
    df = unusable_rows(spark, column)
    if column == "vector":  # one failing query is enough: its task is retried (local[2,4]) before it fails
        with pytest.raises(Exception, match=r"cannot be scored \(null, NaN or infinite features, or other than 2"):
            model.transform(df).collect()
    kept = model.copy({model.handleInvalid: "keep"}).transform(df).orderBy("id").collect()
    assert [r["prediction"] for r in kept] == [0, None, 0, 1, None]
    assert all(kept[i]["probability"] is None for i in (1, 4))
    skipped = model.copy({model.handleInvalid: "skip"}).transform(df).orderBy("id").collect()
    assert [(r["id"], r["prediction"]) for r in skipped] == [(0, 0), (3, 1)]


def test_transform_refuses_a_feature_count_mismatch_at_once(spark):
    model = GaussianMixtureModel.fromArrays([0.5, 0.5], np.zeros((2, 3)) + [[0], [5]], [np.eye(3)] * 2)
    df = spark.createDataFrame([(1.0, 2.0)], "a double, b double")
    with pytest.raises(InvalidInputError, match="the model has 3 features but 'a, b' has 2"):
        model.setInputCols(["a", "b"]).transform(df)  # no Spark job needed to know
    with pytest.raises(InvalidInputError, match="the model has 3 features but 'a, b' has 2"):
        model.score(df)


def test_model_shares_its_estimators_uid(truth_data):
    """pyspark.ml's models carry their estimator's uid, so the estimator's Params address them."""
    estimator = GaussianMixture(k=3, seed=7, maxIter=2)
    model = estimator.fit(truth_data[2])
    assert model.uid == estimator.uid
    assert model.getOrDefault(estimator.maxIter) == 2 and model.getOrDefault(estimator.k) == 3


def test_initial_model_and_k_must_agree(truth_data):
    _, _, df = truth_data
    start = GaussianMixtureModel.fromArrays([0.5, 0.3, 0.2], np.eye(3)[:, :2] * 4, [np.eye(2)] * 3)
    with pytest.raises(InvalidInputError, match="k=9 but the initial model has 3 components"):
        GaussianMixture().setInitialModel(start).setK(9).fit(df)


@pytest.mark.parametrize(
    "covariance, problem",
    [(np.array([[1.0, 2.0], [2.0, 1.0]]), "not positive definite"),
     (np.zeros((2, 2)), "not positive definite"),
     (np.array([[1.0, 0.5], [0.4, 1.0]]), "not symmetric")],
)
def test_from_arrays_refuses_invalid_covariances(covariance, problem):
    with pytest.raises(ValueError, match=f"^component 1: covariance is {problem}"):
        GaussianMixtureModel.fromArrays([0.5, 0.5], np.zeros((2, 2)), [np.eye(2), covariance])


def test_transform_vector_and_input_cols_agree(fitted, score_data):
    _, df = score_data
    with_vector = fitted.transform(df, {fitted.logLikelihoodCol: "ll"})
    with_columns = fitted.transform(
        df, {fitted.inputCols: ["x0", "x1", "x2"], fitted.logLikelihoodCol: "ll"}
    )
    assert_df_equality(
        with_vector.select("id", "prediction"), with_columns.select("id", "prediction"),
        ignore_row_order=True,
    )
    assert_approx_df_equality(
        with_vector.select("id", "ll"), with_columns.select("id", "ll"), precision=1e-9,
        ignore_row_order=True,
    )


def test_predict_and_predict_probability_agree_with_transform(fitted, score_data):
    _, df = score_data
    rows = fitted.transform(df).limit(40).collect()
    for row in rows:
        assert fitted.predict(row["features"]) == row["prediction"]
        assert isinstance(fitted.predict(row["features"]), int)
        p = fitted.predictProbability(row["features"])
        assert isinstance(p, DenseVector)
        np.testing.assert_allclose(p.toArray(), row["probability"].toArray(), rtol=1e-12, atol=1e-15)
        # Plain sequences work too.
        assert fitted.predict(row["features"].toArray().tolist()) == row["prediction"]
    with pytest.raises(ValueError, match="3 features"):
        fitted.predict(Vectors.dense([1.0, 2.0]))


def test_model_setters_like_pyspark(fitted, score_data):
    """pyspark.ml.clustering.GaussianMixtureModel has setFeaturesCol/setPredictionCol/setProbabilityCol."""
    _, df = score_data
    model = fitted.copy()
    model.setPredictionCol("cluster").setProbabilityCol("posterior").setFeaturesCol("arr")
    out = model.transform(df)
    assert out.columns[-2:] == ["cluster", "posterior"]
    assert fitted.getPredictionCol() == "prediction"


# -- model accessors -------------------------------------------------------------------------------


def test_gaussians_and_arrays(spark):
    w = [0.2, 0.3, 0.5]
    mu = np.array([[0.0, 1.0], [2.0, 3.0], [-1.0, 4.0]])
    cov = np.array([[[1.0, 0.2], [0.2, 2.0]], [[0.5, 0.0], [0.0, 0.5]], [[3.0, -1.0], [-1.0, 1.0]]])
    model = GaussianMixtureModel.fromArrays(w, mu, cov)
    assert model.getK() == 3 and model.numFeatures == 2
    np.testing.assert_allclose(model.weights, w)
    assert isinstance(model.means, np.ndarray) and model.means.shape == (3, 2)
    assert isinstance(model.covariances, np.ndarray) and model.covariances.shape == (3, 2, 2)
    np.testing.assert_array_equal(model.means, mu)
    np.testing.assert_array_equal(model.covariances, cov)

    gaussians = model.gaussians
    assert len(gaussians) == 3
    for g, m, c in zip(gaussians, mu, cov):
        assert isinstance(g, MultivariateGaussian)
        assert isinstance(g.mean, DenseVector) and isinstance(g.cov, DenseMatrix)
        np.testing.assert_array_equal(g.mean.toArray(), m)
        np.testing.assert_array_equal(g.cov.toArray(), c)

    gdf = model.gaussiansDF
    assert gdf.columns == ["mean", "cov"]
    rows = gdf.collect()
    assert len(rows) == 3
    for row, m, c in zip(rows, mu, cov):
        np.testing.assert_array_equal(row["mean"].toArray(), m)
        np.testing.assert_array_equal(row["cov"].toArray(), c)


def test_fitted_model_parameters_are_consistent(fitted):
    assert fitted.getK() == 3 and fitted.numFeatures == 3
    np.testing.assert_allclose(sum(fitted.weights), 1.0)
    for c in fitted.covariances:
        np.testing.assert_allclose(c, c.T, rtol=1e-12)
        assert np.all(np.linalg.eigvalsh(c) > 0)


# -- invalid input ---------------------------------------------------------------------------------

VECTOR_SCHEMA = StructType([StructField("features", VectorUDT(), True)])


def small_clean(rng, n=40):
    return np.vstack([rng.normal(size=(n // 2, 2)), rng.normal(size=(n // 2, 2)) + 6.0])


def test_missing_columns(spark, rng):
    df = frame(spark, small_clean(rng))
    with pytest.raises(ValueError, match="features column 'nope' not found"):
        GaussianMixture(featuresCol="nope").fit(df)
    with pytest.raises(ValueError, match="input column 'x7' not found"):
        GaussianMixture(inputCols=["x0", "x7"]).fit(df)
    with pytest.raises(ValueError, match="weight column 'wt' not found"):
        GaussianMixture(weightCol="wt").fit(df)


def test_string_column(spark, rng):
    df = frame(spark, small_clean(rng)).withColumn("s", F.lit("a"))
    with pytest.raises(ValueError, match="features column 's' has type string"):
        GaussianMixture(featuresCol="s").fit(df)
    with pytest.raises(ValueError, match="input column 's' has type string"):
        GaussianMixture(inputCols=["x0", "s"]).fit(df)


def test_empty_dataframe(spark, rng):
    df = frame(spark, small_clean(rng))
    with pytest.raises(ValueError, match="empty"):
        GaussianMixture().fit(df.where(F.lit(False)))
    with pytest.raises(ValueError, match="empty"):
        GaussianMixture().fit(spark.createDataFrame([], VECTOR_SCHEMA))


def test_k_larger_than_rows(spark, rng):
    df = frame(spark, small_clean(rng)[:5])
    with pytest.raises(ValueError, match=r"k=10 is larger than the number of rows \(5\)"):
        GaussianMixture(k=10).fit(df)


def test_nan_rows_are_counted(spark, rng):
    x = small_clean(rng)
    x[[1, 7], 0] = np.nan
    x[12, 1] = np.inf
    with pytest.raises(ValueError, match="3 rows with NaN or infinite features in 'features'"):
        GaussianMixture().fit(frame(spark, x))


def test_null_vectors_are_counted(spark, rng):
    rows = [(Vectors.dense(r),) for r in small_clean(rng)] + [(None,), (None,)]
    df = spark.createDataFrame(rows, VECTOR_SCHEMA)
    with pytest.raises(ValueError, match="2 rows with null features in 'features'"):
        GaussianMixture().fit(df)


def test_null_arrays_are_counted(spark, rng):
    rows = [(r.tolist(),) for r in small_clean(rng)] + [(None,), (None,), ([1.0, None],)]
    df = spark.createDataFrame(rows, "features array<double>")
    with pytest.raises(ValueError, match="3 rows with null features in 'features'"):
        GaussianMixture().fit(df)


def test_negative_weights_are_counted(spark, rng):
    x = small_clean(rng)
    w = np.ones(len(x))
    w[[3, 30]] = -1.0
    with pytest.raises(ValueError, match="2 rows with a null, negative, NaN or infinite weight in 'w'"):
        GaussianMixture(weightCol="w").fit(frame(spark, x, w=w))


def test_vectors_of_different_lengths(spark):
    mixed = spark.createDataFrame(
        [(Vectors.dense([1.0, 2.0]),), (Vectors.dense([1.0, 2.0, 3.0]),), (Vectors.dense([0.0, 1.0]),)],
        VECTOR_SCHEMA,
    ).coalesce(1)
    with pytest.raises(ValueError, match="different lengths"):
        GaussianMixture().fit(mixed)
    # Each partition consistent, partitions disagree.
    two = spark.createDataFrame([(Vectors.dense([1.0, 2.0]),)] * 3, VECTOR_SCHEMA).coalesce(1).union(
        spark.createDataFrame([(Vectors.dense([1.0, 2.0, 3.0]),)] * 3, VECTOR_SCHEMA).coalesce(1)
    )
    with pytest.raises(ValueError, match=r"different lengths \(2 and 3\)"):
        GaussianMixture().fit(two)


@pytest.mark.parametrize("column", ["vector", "array"])
def test_handle_invalid_skip(spark, column):
    rng = np.random.default_rng(31)
    clean = small_clean(rng, n=200)
    if column == "vector":
        schema = StructType(
            [StructField("features", VectorUDT(), True), StructField("w", DoubleType(), True)]
        )
        make = Vectors.dense
    else:
        schema = "features array<double>, w double"
        make = list
    rows = [(make(r.tolist()), 1.0) for r in clean]
    bad = [
        (make([np.nan, 1.0]), 1.0),
        (make([1.0, np.nan]), 1.0),
        (make([np.inf, 0.0]), 1.0),
        (None, 1.0),
        (None, 1.0),
        (make([0.5, 0.5]), -1.0),
        (make([0.5, 0.6]), -2.0),
        (make([0.5, 0.7]), None),
        (make([0.5, 0.8]), float("nan")),
    ]
    mixed = rows[:50] + bad[:5] + rows[50:150] + bad[5:] + rows[150:]
    df = spark.createDataFrame(mixed, schema)
    est = dict(k=2, tol=0.0, maxIter=5, seed=3, weightCol="w")
    with pytest.raises(ValueError, match="set handleInvalid='skip'"):
        GaussianMixture(**est).fit(df)
    skipped = GaussianMixture(handleInvalid="skip", **est).fit(df)
    assert skipped.summary.invalidRowsSkipped == len(bad)
    assert sum(skipped.summary.clusterSizes) == len(clean)
    reference = GaussianMixture(**est).fit(spark.createDataFrame(rows, schema))
    assert reference.summary.invalidRowsSkipped == 0
    assert_same_model(skipped, reference, rtol=1e-9)


def test_bad_params_are_refused(spark, rng):
    df = frame(spark, small_clean(rng))
    with pytest.raises(ValueError, match="initMode"):
        GaussianMixture(initMode="kmeans").fit(df)
    with pytest.raises(ValueError, match="handleInvalid must be one of 'error', 'skip', 'keep', got 'drop'"):
        GaussianMixture(handleInvalid="drop").fit(df)
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        GaussianMixture(k=0).fit(df)
    with pytest.raises(ValueError, match="initial model has 3 features"):
        start = GaussianMixtureModel.fromArrays([1.0], np.zeros((1, 3)), np.eye(3)[None])
        GaussianMixture().setInitialModel(start).fit(df)


def test_skip_when_a_whole_arrow_batch_is_invalid(spark):
    """An Arrow batch of only null rows followed by valid ones packs into well-formed blocks."""
    rows = [(None,)] * 50 + [([float(i % 7), float(i % 3)],) for i in range(100)]
    df = spark.createDataFrame(rows, "features array<double>").coalesce(1)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "25")
    try:
        model = GaussianMixture(k=2, seed=1, handleInvalid="skip").fit(df)
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assert model.summary.invalidRowsSkipped == 50
    assert sum(model.summary.clusterSizes) == 100
    assert np.isfinite(model.means).all()


def test_every_phase_of_a_fit_is_logged(spark, caplog):
    """A user at a terminal sees validation, packing, each initialisation pass and each iteration."""
    rng = np.random.default_rng(9)
    x = np.array([[0.0, 0.0], [5.0, 5.0]])[rng.integers(0, 2, 2000)] + rng.normal(size=(2000, 2))
    with caplog.at_level("INFO", logger="spark_gmm"):
        GaussianMixture(k=2, seed=1).fit(frame(spark, x))
    lines = [r.getMessage() for r in caplog.records if r.name == "spark_gmm"]
    order = [
        "reading and validating the input",
        "input: 2000 rows × 2 features",
        "initialisation (k-means||, k=2)",
        "initialisation pass 1 (random rows)",
        "Lloyd's k-means step",
        "assignment to the k-means centres",
        "iteration 0:",
        "fit done",
    ]
    positions = [next(i for i, line in enumerate(lines) if text in line) for text in order]
    assert positions == sorted(positions), lines


def test_a_missing_module_on_the_executors_is_one_clear_line():
    from spark_gmm import ExecutorEnvironmentError
    from spark_gmm.inputs import executor_errors_explained

    def failing():
        raise RuntimeError("Traceback ...\n  File worker.py\nModuleNotFoundError: No module named 'pandas'\n")

    with pytest.raises(ExecutorEnvironmentError, match=r"^the executors' Python cannot import 'pandas'"):
        executor_errors_explained(failing)
    with pytest.raises(RuntimeError, match="something else"):
        executor_errors_explained(lambda: (_ for _ in ()).throw(RuntimeError("something else")))


@pytest.fixture
def unchecked_executors(monkeypatch):
    """Executors this session has not yet checked (the check runs once per session)."""
    from spark_gmm import inputs

    monkeypatch.setattr(inputs, "_PYTHON_CHECKED", type(inputs._PYTHON_CHECKED)())
    return inputs


@pytest.mark.parametrize("estimator", ["GaussianMixture", "MixedMixture"])
def test_executors_missing_a_module_are_refused_before_any_pass(spark, unchecked_executors, monkeypatch, caplog,
                                                                estimator):
    import spark_gmm
    from spark_gmm import ExecutorEnvironmentError

    monkeypatch.setattr(unchecked_executors, "EXECUTOR_MODULES", ("numpy", "spark_gmm_absent_module"))
    df = spark.createDataFrame([(float(i), float(i % 3)) for i in range(20)], "a double, b double")
    fit = (GaussianMixture(k=2, inputCols=["a", "b"]) if estimator == "GaussianMixture" else
           spark_gmm.MixedMixture(k=2, gaussianCols=["a", "b"]))
    with caplog.at_level("INFO", logger="spark_gmm"), pytest.raises(ExecutorEnvironmentError) as refused:
        fit.fit(df)
    first_line = str(refused.value).splitlines()[0]
    assert first_line.startswith("the executors' Python (") and "cannot import 'spark_gmm_absent_module'" in first_line
    assert not [r for r in caplog.records if "input" in r.getMessage()]  # no pass over the input began


def test_executors_that_differ_are_each_checked(spark, unchecked_executors, monkeypatch):
    """Executors of one interpreter path where only some lack pandas (nodes set up unevenly)."""
    import json

    from spark_gmm import ExecutorEnvironmentError, __version__

    def uneven(modules):
        def probe(row_id) -> str:
            return json.dumps(["/opt/py/bin/python3", "pandas", None] if row_id % 2 else
                              ["/opt/py/bin/python3", None, __version__])

        return probe

    monkeypatch.setattr(unchecked_executors, "_import_probe", uneven)
    with pytest.raises(ExecutorEnvironmentError, match=r"^the executors' Python \(/opt/py/bin/python3\) cannot "
                                                       r"import 'pandas'"):
        unchecked_executors.require_executor_python(spark)
    assert spark not in unchecked_executors._PYTHON_CHECKED


def test_executors_with_another_spark_gmm_are_refused(spark, unchecked_executors, monkeypatch):
    import spark_gmm
    from spark_gmm import ExecutorEnvironmentError

    executors_version = spark_gmm.__version__
    monkeypatch.setattr(spark_gmm, "__version__", "9.9.9")
    df = spark.createDataFrame([(float(i),) for i in range(20)], "a double")
    with pytest.raises(ExecutorEnvironmentError, match=rf"^the executors' Python \(.+\) has spark_gmm "
                                                       rf"{executors_version}, this driver 9\.9\.9"):
        GaussianMixture(k=2, inputCols=["a"]).fit(df)


def test_executors_that_pass_the_check_are_not_checked_again(spark, unchecked_executors):
    df = spark.createDataFrame([(float(i % 5),) for i in range(20)], "a double")
    GaussianMixture(k=2, inputCols=["a"], maxIter=2).fit(df)
    assert spark in unchecked_executors._PYTHON_CHECKED
    jobs = spark.sparkContext.statusTracker().getJobIdsForGroup
    before = set(jobs(None))
    unchecked_executors.require_executor_python(spark)
    assert set(jobs(None)) == before


@pytest.mark.parametrize("text, message", [
    ("[PYTHON_VERSION_MISMATCH] Python in worker has different version: 3.10 than that in driver: 3.11, PySpark "
     "cannot run with different minor versions.", "^the executors run Python 3.10, this driver 3.11: "),
    ('java.io.IOException: Cannot run program "/opt/py/bin/python3": error=2, No such file or directory',
     "^the executors cannot start Python '/opt/py/bin/python3': "),
])
def test_executors_whose_python_does_not_start_are_one_clear_line(text, message):
    from spark_gmm.exceptions import executor_environment_error

    assert re.match(message, str(executor_environment_error(RuntimeError(text))))
    assert executor_environment_error(RuntimeError("Task 0 in stage 1.0 failed: something else")) is None
