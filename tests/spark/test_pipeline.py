"""spark_gmm as a pyspark.ml Pipeline stage, with param grids and CrossValidator."""

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.evaluation import ClusteringEvaluator
from pyspark.ml.feature import StandardScaler, VectorAssembler
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder

from spark_gmm import GaussianMixture, GaussianMixtureModel


@pytest.fixture(scope="module")
def data(spark):
    rng = np.random.default_rng(3)
    x = np.vstack([rng.normal([0.0, 0.0], 1.0, size=(300, 2)), rng.normal([9.0, 3.0], 1.0, size=(300, 2))])
    return spark.createDataFrame([(i, float(a), float(b)) for i, (a, b) in enumerate(x)], "id long, a double, b double")


def stages():
    return [
        VectorAssembler(inputCols=["a", "b"], outputCol="raw"),
        StandardScaler(inputCol="raw", outputCol="features"),
        GaussianMixture(k=2, seed=1, probabilityCol="p"),
    ]


def test_pipeline_model_round_trip(data, tmp_path):
    pipeline = Pipeline(stages=stages())
    fitted = pipeline.fit(data)
    assert isinstance(fitted.stages[-1], GaussianMixtureModel)
    fitted.write().overwrite().save(str(tmp_path / "pipeline_model"))
    loaded = PipelineModel.load(str(tmp_path / "pipeline_model"))
    assert isinstance(loaded.stages[-1], GaussianMixtureModel)
    expected = fitted.transform(data).select("id", "prediction").orderBy("id").collect()
    assert loaded.transform(data).select("id", "prediction").orderBy("id").collect() == expected
    assert len({row.prediction for row in expected}) == 2

    pipeline.save(str(tmp_path / "pipeline"))
    again = Pipeline.load(str(tmp_path / "pipeline")).fit(data)
    np.testing.assert_array_equal(again.stages[-1].means, fitted.stages[-1].means)


def test_param_grid_fits_every_candidate(data):
    assembled = Pipeline(stages=stages()[:2]).fit(data).transform(data)
    estimator = GaussianMixture(seed=1, maxIter=20)
    grid = ParamGridBuilder().addGrid(estimator.k, [1, 2, 3]).build()
    models = dict(estimator.fitMultiple(assembled, grid))
    assert sorted(m.getK() for m in models.values()) == [1, 2, 3]
    best = CrossValidator(
        estimator=estimator, estimatorParamMaps=ParamGridBuilder().addGrid(estimator.k, [2, 3]).build(),
        evaluator=ClusteringEvaluator(), numFolds=2, seed=7,
    ).fit(assembled)
    assert best.bestModel.getK() == 2  # two blobs: the silhouette is best at k=2


def test_a_fitted_mllib_model_converts(spark, data):
    from pyspark.ml.clustering import GaussianMixture as MLlibGaussianMixture

    assembled = VectorAssembler(inputCols=["a", "b"], outputCol="features").transform(data)
    mllib = MLlibGaussianMixture(k=2, seed=3, maxIter=30).fit(assembled)
    converted = GaussianMixtureModel.fromMLlib(mllib)
    np.testing.assert_allclose(converted.weights, mllib.weights, rtol=1e-12)
    for j, gaussian in enumerate(mllib.gaussians):
        np.testing.assert_allclose(converted.means[j], gaussian.mean.toArray(), rtol=1e-12)
        np.testing.assert_allclose(converted.covariances[j], gaussian.cov.toArray(), rtol=1e-12)
    ours = converted.transform(assembled).select("id", "prediction").orderBy("id").collect()
    theirs = mllib.transform(assembled).select("id", "prediction").orderBy("id").collect()
    assert ours == theirs
    # ... and as the start of a spark_gmm fit
    refit = GaussianMixture(maxIter=5).setInitialModel(converted).fit(assembled)
    start = refit.summary.logLikelihoodHistory[0]
    np.testing.assert_allclose(start, mllib.summary.logLikelihood, rtol=1e-9)  # MLlib's own figure
    assert refit.summary.logLikelihood >= start - 1e-9 * abs(start)  # EM from there: no worse


def test_candidates_fitted_together_equal_one_by_one(spark):
    rng = np.random.default_rng(12)
    x = np.vstack([rng.normal(c, 1.0, size=(200, 3)) for c in ([0, 0, 0], [6, 0, 2], [0, 7, -3])]) + 1e3
    df = spark.createDataFrame([(r.tolist(),) for r in x], ["features"]).repartition(3)
    estimator = GaussianMixture(seed=4, tol=1e-6, maxIter=25)
    grid = (ParamGridBuilder().addGrid(estimator.k, [2, 3])
            .addGrid(estimator.covarianceType, ["full", "diag"]).build())
    together = dict(estimator.fitMultiple(df, grid))
    assert sorted(together) == list(range(len(grid)))
    iterations = set()
    for i, param_map in enumerate(grid):
        alone = estimator.copy(param_map).fit(df)
        np.testing.assert_array_equal(together[i].means, alone.means)
        np.testing.assert_array_equal(together[i].covariances, alone.covariances)
        np.testing.assert_array_equal(together[i].weights, alone.weights)
        assert together[i].summary.logLikelihoodHistory == alone.summary.logLikelihoodHistory
        assert together[i].getK() == param_map[estimator.k]
        assert together[i].getCovarianceType() == param_map[estimator.covarianceType]
        iterations.add(alone.summary.numIter)
    assert len(iterations) > 1  # candidates converged at different iterations and dropped out


def test_n_init_keeps_the_best_restart(spark):
    rng = np.random.default_rng(5)
    x = np.vstack([rng.normal(c, 0.6, size=(80, 2)) for c in ([0, 0], [4, 0], [0, 4], [4, 4], [9, 9])])
    df = spark.createDataFrame([(r.tolist(),) for r in x], ["features"]).coalesce(2)
    base = dict(k=5, initMode="random", maxIter=30, tol=1e-6)
    singles = [GaussianMixture(seed=10 + i, **base).fit(df) for i in range(3)]
    best = GaussianMixture(seed=10, nInit=3, **base).fit(df)
    lls = [m.summary.logLikelihood for m in singles]
    assert best.summary.logLikelihood == max(lls)
    np.testing.assert_array_equal(best.means, singles[int(np.argmax(lls))].means)
    assert len(set(np.round(lls, 6))) > 1  # the restarts really differ
