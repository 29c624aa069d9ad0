"""`MixedMixture` on Spark: classes recovered on generated mixed data, the Spark fit equal to the
in-memory engine's fit of the same rows, partitioning that does not matter, missing values
(keep / error / skip), unseen levels at scoring, persistence and Pipelines."""

import numpy as np
import pandas as pd
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import SQLTransformer
from sklearn.metrics import adjusted_rand_score

from spark_gmm import InvalidInputError, MixedMixture, MixedMixtureModel
from spark_gmm.latent import Columns
from spark_gmm.local import local_reduce
from spark_gmm.mixed import EMSettings, _run_em

K, N = 3, 1200
LEVELS = ["blue", "green", "red", "white"]  # sorted: the model's codes are these positions
COLUMNS = dict(gaussianCols=["x", "y"], bernoulliCols=["flag", "answer"], categoricalCols=["colour"],
               poissonCols=["visits"])


def generated(seed=7, n=N):
    """(labels, numpy arrays as `latent.Columns.pack` takes them, the same rows as a pandas frame
    with a boolean, a yes/no, a string and an integer column)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n)
    gaussian = np.column_stack([rng.normal(size=n) + 3.0 * labels, rng.normal(size=n) * 0.7 - 2.0 * labels])
    bernoulli = (rng.random((n, 2)) < np.array([[0.1, 0.8], [0.5, 0.2], [0.9, 0.6]])[labels]).astype(float)
    codes = ((labels + (rng.random(n) < 0.25)) % len(LEVELS))[:, None]
    counts = rng.poisson(np.array([1.0, 4.0, 9.0])[labels])[:, None].astype(float)
    frame = pd.DataFrame({
        "x": gaussian[:, 0], "y": gaussian[:, 1], "flag": bernoulli[:, 0] == 1,
        "answer": np.where(bernoulli[:, 1] == 1, "yes", "no"), "colour": np.array(LEVELS)[codes[:, 0]],
        "visits": counts[:, 0].astype(np.int64),
    })
    return labels, (gaussian, bernoulli, codes, counts), frame


def with_missing(frame, share, seed=3):
    """`frame` with `share` of the values of every feature column set to null."""
    rng = np.random.default_rng(seed)
    out = frame.astype(object)
    for name in frame.columns:
        out.loc[rng.random(len(frame)) < share, name] = None
    return out


def fitted(df, **params):
    """A fit with a loose tolerance: these tests check the fit's plumbing, EM's own accuracy is
    tests/unit/test_latent.py's."""
    return MixedMixture(k=K, seed=11, tol=1e-4, **COLUMNS, **params).fit(df)


def predictions(model, df):
    return model.transform(df).orderBy("id").toPandas()


@pytest.fixture(scope="module")
def data(spark):
    labels, arrays, frame = generated()
    df = spark.createDataFrame(frame.assign(id=np.arange(N)))
    return labels, arrays, df


@pytest.fixture(scope="module")
def model(data):
    return fitted(data[2])


def test_classes_are_recovered_with_labelled_parameters(data, model):
    labels, _, df = data
    out = predictions(model, df)
    assert adjusted_rand_score(labels, out["prediction"]) >= 0.9
    assert model.summary.converged and sum(model.summary.clusterSizes) == N
    assert model.bernoulliValues == {"flag": (False, True), "answer": ("no", "yes")}
    assert list(model.categoricalProbabilities["colour"].columns) == LEVELS
    assert list(model.means.columns) == ["x", "y"] and list(model.poissonRates.columns) == ["visits"]
    order = np.argsort(model.means["x"].to_numpy())  # classes by their x mean: 0, 3, 6
    np.testing.assert_allclose(model.means["x"].to_numpy()[order], [0, 3, 6], atol=0.2)
    np.testing.assert_allclose(model.poissonRates["visits"].to_numpy()[order], [1, 4, 9], rtol=0.15)
    np.testing.assert_allclose(model.bernoulliProbabilities["flag"].to_numpy()[order], [0.1, 0.5, 0.9], atol=0.07)
    n_parameters = 2 + K * (2 + 3) + K * 2 + K * (len(LEVELS) - 1) + K  # weights, Gaussian, tables, rates
    assert model.numParameters == n_parameters
    bic = -2 * model.summary.logLikelihood + n_parameters * np.log(N)  # the fit's last E-step
    assert model.bic(df) == pytest.approx(bic, rel=1e-12)
    profile = model.profile().toPandas()
    assert len(profile) == K * 6
    colour = profile[(profile.feature == "colour") & (profile["class"] == int(order[0]))].iloc[0]
    assert colour["mode"] == "blue" and colour["modeProbability"] == pytest.approx(0.75, abs=0.07)


def test_spark_fit_equals_the_in_memory_fit_of_the_same_rows(data, model):
    _, arrays, _ = data
    columns = Columns(2, 2, 1, 1)
    rows = columns.pack(*arrays)
    settings = EMSettings(K, "full", 1e-6, 0.01, 100, 1e-4, (11,), (len(LEVELS),))
    local = _run_em(local_reduce(rows, None, 256, shift=columns.shift(rows)), columns, N, settings)
    assert local.iterations == model.summary.numIter
    assert local.log_likelihood == pytest.approx(model.summary.logLikelihood, rel=1e-12)
    fit = local.mixture
    np.testing.assert_allclose(model.weights, fit.weights, rtol=1e-9)
    np.testing.assert_allclose(model.means.to_numpy(), fit.gaussian.means + columns.shift(rows)[:2], rtol=1e-9)
    np.testing.assert_allclose(model.covariances[1].to_numpy(), fit.gaussian.covariances[1], rtol=1e-9)
    np.testing.assert_allclose(model.bernoulliProbabilities.to_numpy(), fit.bernoulli, rtol=1e-9)
    np.testing.assert_allclose(model.categoricalProbabilities["colour"].to_numpy(), fit.categorical[0], rtol=1e-9)
    np.testing.assert_allclose(model.poissonRates.to_numpy(), fit.poisson, rtol=1e-9)


def test_the_partitioning_does_not_change_the_model(data):
    df = data[2]
    one, three = fitted(df.repartition(1), maxIter=3), fitted(df.repartition(3), maxIter=3)
    assert one.summary.numIter == three.summary.numIter == 3
    np.testing.assert_allclose(one.means.to_numpy(), three.means.to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(one.categoricalProbabilities["colour"].to_numpy(),
                               three.categoricalProbabilities["colour"].to_numpy(), rtol=1e-9)
    assert one.summary.logLikelihood == pytest.approx(three.summary.logLikelihood, rel=1e-12)


def test_a_row_weight_counts_like_copies_of_the_row(spark, data):
    frame = data[2].toPandas()
    doubled = frame.iloc[:300].assign(w=2.0)
    copies = pd.concat([doubled, doubled]).assign(w=1.0)
    rest = frame.iloc[300:].assign(w=1.0)
    weighted = fitted(spark.createDataFrame(pd.concat([doubled, rest])), weightCol="w", maxIter=3)
    copied = fitted(spark.createDataFrame(pd.concat([copies, rest])), maxIter=3)
    assert weighted.summary.totalWeight == copied.summary.totalWeight == N + 300
    np.testing.assert_allclose(weighted.means.to_numpy(), copied.means.to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(weighted.bernoulliProbabilities.to_numpy(), copied.bernoulliProbabilities.to_numpy(),
                               rtol=1e-9)


@pytest.fixture(scope="module")
def missing(spark, data):
    labels, _, df = data
    frame = with_missing(df.toPandas().drop(columns="id"), 0.1)
    holes = spark.createDataFrame(frame.assign(id=np.arange(N)), df.schema)
    return labels, frame, holes


def test_missing_values_kept_still_recover_the_classes(missing):
    labels, frame, df = missing
    nothing = int(frame.isna().all(axis=1).sum())
    model = fitted(df, handleInvalid="keep")
    assert model.summary.invalidRowsSkipped == nothing
    out = predictions(model, df)
    assert out["prediction"].notna().sum() == N - nothing
    assert adjusted_rand_score(labels[out["prediction"].notna()], out["prediction"].dropna()) >= 0.9


def test_missing_values_refused_naming_the_column(missing):
    _, frame, df = missing
    with pytest.raises(InvalidInputError) as refused:
        fitted(df)  # handleInvalid='error' by default
    first = str(refused.value).splitlines()[0]
    assert f"gaussian column 'x' has {int(frame['x'].isna().sum())} missing values" in first


def test_skip_leaves_out_and_counts_the_rows_with_missing_values(missing):
    _, frame, df = missing
    incomplete = int(frame.isna().any(axis=1).sum())
    model = fitted(df, handleInvalid="skip", maxIter=3)
    assert model.summary.invalidRowsSkipped == incomplete
    assert model.summary.totalWeight == N - incomplete
    assert model.copy().setHandleInvalid("skip").transform(df).count() == N - incomplete


def test_unseen_level_at_scoring_refused_or_treated_as_missing(spark, model):
    row = {"x": 3.0, "y": -2.0, "flag": True, "answer": "no", "visits": 4, "id": 0}
    df = spark.createDataFrame(pd.DataFrame([{**row, "colour": "purple"}, {**row, "colour": None}]))
    with pytest.raises(Exception, match="categorical column 'colour' holds 'purple'"):
        model.transform(df.limit(1)).collect()
    kept = model.copy().setHandleInvalid("keep").transform(df).toPandas()
    assert kept["prediction"].notna().all()
    assert kept["logDensity"][0] == pytest.approx(kept["logDensity"][1], rel=1e-15)  # unseen = missing
    assert model.copy().setHandleInvalid("skip").transform(df).count() == 0
    with pytest.raises(InvalidInputError, match="2 rows cannot be scored; the first: categorical column 'colour'"):
        model.score(df)


def test_an_empty_column_name_leaves_the_column_out(spark, data, model):
    df = data[2].limit(50)
    full = predictions(model, df)
    only_density = model.copy().setPredictionCol("").setProbabilityCol("").transform(df)
    assert only_density.columns == df.columns + ["logDensity"]
    np.testing.assert_array_equal(only_density.orderBy("id").toPandas()["logDensity"], full["logDensity"])
    row = {"x": 3.0, "y": -2.0, "flag": True, "answer": "no", "visits": 4, "id": 0, "colour": "purple"}
    with pytest.raises(Exception, match="categorical column 'colour' holds 'purple'"):  # still refused
        model.copy().setPredictionCol("").transform(spark.createDataFrame(pd.DataFrame([row]))).collect()
    with pytest.warns(UserWarning, match="adds no column"):
        assert model.copy().setPredictionCol("").setProbabilityCol("").setLogDensityCol("").transform(df) is df


def test_a_stream_is_refused_where_it_must_be_read_whole(data, model, tmp_path):
    """fit, score, bic and aic refuse a stream in words (transform takes one: test_scores.py)."""
    df = data[2].limit(40)
    df.write.parquet(str(tmp_path / "in"))
    stream = df.sparkSession.readStream.schema(df.schema).parquet(str(tmp_path / "in"))
    with pytest.raises(InvalidInputError, match=r"^score \(and bic, aic\) reads the whole input"):
        model.score(stream)
    with pytest.raises(InvalidInputError, match=r"^MixedMixture.fit reads the whole input: .*streaming"):
        fitted(stream)


def test_probabilities_as_arrays_hold_the_vectors_values(data, model):
    df = data[2].limit(50)
    out = model.copy().setProbabilityFormat("array").transform(df)
    assert out.schema["probability"].dataType.simpleString() == "array<double>"
    arrays = out.orderBy("id").toPandas()["probability"]
    vectors = predictions(model, df)["probability"]
    assert all(np.array_equal(a, v.toArray()) for a, v in zip(arrays, vectors))


def test_input_errors_name_the_column_count_and_value(spark):
    df = spark.createDataFrame(pd.DataFrame({"b": ["a", "b", "c"] * 4, "c": [str(i) for i in range(12)]}))
    with pytest.raises(InvalidInputError, match=r"bernoulli column 'b' has 3 distinct value\(s\) \('a', 'b', 'c'\)"):
        MixedMixture(k=2, bernoulliCols=["b"]).fit(df)
    with pytest.raises(InvalidInputError, match="categorical column 'c' has 12 levels, more than maxLevels=5"):
        MixedMixture(k=2, categoricalCols=["c"], maxLevels=5).fit(df)
    with pytest.raises(InvalidInputError, match="gaussian column 'b' has type string"):
        MixedMixture(k=2, gaussianCols=["b"]).fit(df)


def test_save_load_round_trip(model, data, tmp_path):
    df = data[2]
    model.write().overwrite().save(str(tmp_path / "model"))
    loaded = MixedMixtureModel.load(str(tmp_path / "model"))
    assert loaded.bernoulliValues == model.bernoulliValues and loaded.getK() == K
    pd.testing.assert_frame_equal(loaded.categoricalProbabilities["colour"], model.categoricalProbabilities["colour"])
    np.testing.assert_array_equal(loaded.means.to_numpy(), model.means.to_numpy())
    assert loaded.trainingFigures["logLikelihood"] == model.summary.logLikelihood
    before, after = predictions(model, df), predictions(loaded, df)
    np.testing.assert_array_equal(before["prediction"], after["prediction"])
    np.testing.assert_allclose(before["logDensity"], after["logDensity"], rtol=1e-12)
    estimator = MixedMixture(k=4, smoothing=0.5, **COLUMNS)
    estimator.save(str(tmp_path / "estimator"))
    again = MixedMixture.load(str(tmp_path / "estimator"))
    assert again.getSmoothing() == 0.5 and again.getCategoricalCols() == ["colour"]


def test_pipeline_fit_and_round_trip(data, tmp_path):
    df = data[2]
    scale = SQLTransformer(statement="SELECT *, x * 10 AS x10 FROM __THIS__")
    mixture = MixedMixture(k=K, seed=11, gaussianCols=["x10", "y"], categoricalCols=["colour"], maxIter=3)
    fitted_pipeline = Pipeline(stages=[scale, mixture]).fit(df)
    fitted_pipeline.write().overwrite().save(str(tmp_path / "pipeline"))
    loaded = PipelineModel.load(str(tmp_path / "pipeline"))
    ours = fitted_pipeline.transform(df).orderBy("id").toPandas()
    theirs = loaded.transform(df).orderBy("id").toPandas()
    np.testing.assert_array_equal(ours["prediction"], theirs["prediction"])
    assert list(loaded.stages[1].means.columns) == ["x10", "y"]
