"""GaussianMixture(handleInvalid='keep') on Spark: missing features marginalised in the fit (equal
to the in-memory fit of the same rows), the rows counted, the generating means recovered where
dropping the rows biases them, and transform scoring partially missing rows by their marginal
density; without missing values, 'keep' is 'error' bit for bit; both engines and checkpoints."""

import logging

import numpy as np
import pytest
from pyspark.ml.functions import vector_to_array
from pyspark.sql import functions as F
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from support import array_frame, assert_identical

from spark_gmm import GaussianMixture, GaussianMixtureModel, InvalidInputError, em, marginal
from spark_gmm.checkpoint import CheckpointMismatchError
from spark_gmm.local import local_reduce
from spark_gmm.mixture import Mixture

MEANS = np.array([[-4.0, 0.0, 1.0], [4.0, 2.0, -1.0]])
COVARIANCE = np.array([[1.0, 0.8, 0.3], [0.8, 1.0, 0.3], [0.3, 0.3, 1.0]])


def missing_at_random(rng, n):
    """(rows, labels): two correlated clusters; x1 is missing for 70% of the rows whose x0 is above
    their cluster's mean (so dropping those rows biases x1's mean down), x2 for 10% of all rows;
    the first 20 rows have nothing observed."""
    labels = rng.integers(0, 2, n)
    x = MEANS[labels] + rng.normal(size=(n, 3)) @ np.linalg.cholesky(COVARIANCE).T
    x[(x[:, 0] > MEANS[labels, 0]) & (rng.random(n) < 0.7), 1] = np.nan
    x[rng.random(n) < 0.1, 2] = np.nan
    x[:20] = np.nan
    return x, labels


def brute_force(row, weights, means, covariances):
    o = ~np.isnan(row)
    joint = np.log(weights) + np.array([
        multivariate_normal.logpdf(row[o], m[o], c[np.ix_(o, o)]) for m, c in zip(means, covariances)
    ])
    return logsumexp(joint), np.exp(joint - logsumexp(joint))


def by_first_feature(means):
    return means[np.argsort(means[:, 0])]


def test_keep_marginalises_missing_values_in_fit_and_transform(spark):
    rng = np.random.default_rng(14)
    x, _ = missing_at_random(rng, 2000)
    null_rows = spark.createDataFrame([(None,)] * 5, "features array<double>")
    df = array_frame(spark, x).union(null_rows).cache()
    start = (np.array([0.4, 0.6]), MEANS + 0.7, np.stack([np.eye(3)] * 2))  # EM passes only: a small test
    settings = dict(maxIter=10, tol=0.0)
    initial = GaussianMixtureModel.fromArrays(*start)
    model = GaussianMixture(handleInvalid="keep", logLikelihoodCol="ll", **settings).setInitialModel(initial).fit(df)
    s = model.summary
    observed = ~np.isnan(x).all(axis=1)
    partial = observed & np.isnan(x).any(axis=1)
    assert (s.rowsWithMissingValues, s.rowsAllMissing, s.invalidRowsSkipped) == (partial.sum(), 25, 25)
    assert sum(s.clusterSizes) == observed.sum() == s.totalWeight
    assert s.numIter == 10 and (np.diff(s.logLikelihoodHistory) > -1e-9 * abs(s.logLikelihood)).all()

    # The in-memory fit of the same rows (shift: the midpoint of each feature's observed values).
    rows = x[observed]
    shift = np.nanmin(rows, axis=0) / 2 + np.nanmax(rows, axis=0) / 2
    shifted = Mixture.from_covariances(start[0], start[1] - shift, start[2], 1e-6)
    (alone,) = marginal.fit(local_reduce(rows, shift=shift), 3, len(rows),
                            [em.FitSettings(k=2, max_iter=10, tol=0.0, reg_covar=1e-6, seed=0, start=shifted)], 0)
    np.testing.assert_allclose(model.weights, alone.mixture.weights, rtol=1e-6)
    np.testing.assert_allclose(model.means, alone.mixture.means + shift, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(model.covariances, alone.mixture.covariances, rtol=1e-6, atol=1e-9)
    assert s.logLikelihood == pytest.approx(alone.log_likelihood, rel=1e-9)

    # Dropping the incomplete rows biases x1's means; marginalising them does not.
    dropped = GaussianMixture(handleInvalid="skip", **settings).setInitialModel(initial).fit(df)
    assert dropped.summary.invalidRowsSkipped == 25 + partial.sum()
    kept_error = np.abs(by_first_feature(model.means) - MEANS).max()
    dropped_error = np.abs(by_first_feature(dropped.means) - MEANS).max()
    assert kept_error < min(0.15, dropped_error / 3), (kept_error, dropped_error)

    # transform: partially missing rows scored by the marginal density of their observed part.
    p = F.when(F.col("probability").isNotNull(), vector_to_array("probability")).alias("p")
    out = model.transform(df).select("features", "prediction", p, "ll")
    unscored = checked = 0
    for r in out.collect():
        row = np.array(r["features"] or [np.nan] * 3, dtype=float)
        if np.isnan(row).all():
            assert r["prediction"] is None and r["p"] is None and r["ll"] is None
            unscored += 1
            continue
        expected, probabilities = brute_force(row, model.weights, model.means, model.covariances)
        assert r["ll"] == pytest.approx(expected, abs=1e-9)
        np.testing.assert_allclose(r["p"], probabilities, atol=1e-10)
        assert r["prediction"] == probabilities.argmax()
        checked += int(np.isnan(row).any())
    assert unscored == 25 and checked == partial.sum()
    assert model.score(df) == pytest.approx(s.logLikelihood / observed.sum(), rel=1e-9)


def test_keep_fits_the_same_model_on_both_engines(spark, caplog):
    """The marginal EM's passes, the start over the complete rows included, run on the resident
    engine as on the driver engine, bit for bit, nInit restarts too."""
    rng = np.random.default_rng(21)
    x, _ = missing_at_random(rng, 1500)
    df = array_frame(spark, x, partitions=3).cache()
    settings = dict(k=2, seed=4, maxIter=8, nInit=2, handleInvalid="keep")
    caplog.set_level(logging.INFO, logger="spark_gmm")
    resident = GaussianMixture(engine="barrier", **settings).fit(df)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine: resident")]
    assert resident.summary.rowsWithMissingValues > 0
    assert_identical(resident, GaussianMixture(engine="driver", **settings).fit(df))


def test_keep_without_missing_values_is_error_bit_for_bit(spark):
    rng = np.random.default_rng(3)
    x = MEANS[rng.integers(0, 2, 1500)] + rng.normal(size=(1500, 3))
    df = array_frame(spark, x)
    settings = dict(k=2, seed=2, maxIter=10)
    kept = GaussianMixture(handleInvalid="keep", **settings).fit(df)
    assert_identical(kept, GaussianMixture(**settings).fit(df))
    assert (kept.summary.rowsWithMissingValues, kept.summary.rowsAllMissing) == (0, 0)


def test_input_columns_with_nulls_are_marginalised_as_nan_in_a_vector(spark):
    """With inputCols a null or NaN column value is a missing feature; ±inf is one too."""
    rng = np.random.default_rng(8)
    x, _ = missing_at_random(rng, 600)
    x[25, 0] = np.inf
    values = [[None if (np.isnan(v) and (i + j) % 2) else float(v) for j, v in enumerate(row)]
              for i, row in enumerate(x)]
    columns = spark.createDataFrame(values, "a double, b double, c double").repartition(2)
    settings = dict(k=2, seed=5, maxIter=5, tol=0.0, initMode="random", handleInvalid="keep")
    by_columns = GaussianMixture(inputCols=["a", "b", "c"], **settings).fit(columns)
    x[25, 0] = np.nan
    by_vector = GaussianMixture(**settings).fit(array_frame(spark, x))
    np.testing.assert_allclose(by_columns.means, by_vector.means, rtol=1e-9)
    np.testing.assert_allclose(by_columns.covariances, by_vector.covariances, rtol=1e-9, atol=1e-12)
    assert by_columns.summary.rowsWithMissingValues == by_vector.summary.rowsWithMissingValues
    scored = by_columns.transform(columns).where(F.col("prediction").isNull()).count()
    assert scored == 20


def test_keep_refuses_a_feature_never_observed(spark):
    x = np.random.default_rng(1).normal(size=(100, 2))
    x[:, 1] = np.nan
    with pytest.raises(InvalidInputError, match="^feature 1 of 'features' has no finite value"):
        GaussianMixture(k=2, handleInvalid="keep").fit(array_frame(spark, x))


def test_a_fit_with_missing_values_resumes_from_its_checkpoint(spark, tmp_path):
    """The marginal EM's states (a latent class model) checkpoint like a Gaussian fit's: stopped
    and resumed, it ends with the unbroken fit, and refuses another fit's directory."""
    x, _ = missing_at_random(np.random.default_rng(9), 1200)
    df = array_frame(spark, x, partitions=3).cache()
    settings = dict(k=2, seed=3, tol=0.0, handleInvalid="keep", checkpointInterval=1)
    directory = str(tmp_path / "ckpt")
    stopped = GaussianMixture(maxIter=3, checkpointDir=directory, **settings).fit(df)
    assert stopped.summary.resumedFromIteration == 0 and stopped.summary.rowsWithMissingValues > 0
    resumed = GaussianMixture(maxIter=6, checkpointDir=directory, **settings).fit(df)
    assert resumed.summary.resumedFromIteration == 3
    assert_identical(resumed, GaussianMixture(maxIter=6, **settings).fit(df))
    with pytest.raises(CheckpointMismatchError, match=r"differs in: seed\)"):
        GaussianMixture(maxIter=6, checkpointDir=directory, **{**settings, "seed": 4}).fit(df)
