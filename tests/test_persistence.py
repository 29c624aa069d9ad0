"""Saving and loading estimators and models: round trips, overwrite rules, errors, and the format."""

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from spark_gmm import GaussianMixture, GaussianMixtureModel
from spark_gmm.persistence import ModelFormatError


def make_df(spark, seed=0, n=600):
    rng = np.random.default_rng(seed)
    x = np.vstack(
        [rng.normal(size=(n // 3, 2)), rng.normal(size=(n // 3, 2)) + [6.0, 0.0],
         rng.normal(size=(n - 2 * (n // 3), 2)) + [0.0, 6.0]]
    )
    rows = [(i, r.tolist()) for i, r in enumerate(x)]
    return spark.createDataFrame(rows, "id long, arr array<double>")


@pytest.fixture(scope="module")
def data(spark):
    return make_df(spark)


@pytest.fixture(scope="module")
def fitted(data):
    est = GaussianMixture(
        k=3, featuresCol="arr", predictionCol="cluster", probabilityCol="posterior",
        logLikelihoodCol="logLik", maxIter=20, tol=1e-6, seed=5, regCovar=1e-5,
    )
    return est.fit(data)


def assert_same_arrays(a, b):
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.covariances, b.covariances)


def test_model_round_trip(fitted, data, tmp_path):
    path = str(tmp_path / "model")
    fitted.save(path)
    loaded = GaussianMixtureModel.load(path)
    assert isinstance(loaded, GaussianMixtureModel)
    assert_same_arrays(loaded, fitted)
    assert loaded.getK() == 3 and loaded.numFeatures == 2
    assert loaded.getFeaturesCol() == "arr"
    assert loaded.getPredictionCol() == "cluster"
    assert loaded.getProbabilityCol() == "posterior"
    assert loaded.getLogLikelihoodCol() == "logLik"
    assert loaded.getRegCovar() == 1e-5
    assert loaded.getSeed() == 5
    assert_df_equality(
        loaded.transform(data).select("id", "cluster", "logLik"),
        fitted.transform(data).select("id", "cluster", "logLik"),
    )


def test_model_from_arrays_round_trip(spark, tmp_path):
    model = GaussianMixtureModel.fromArrays(
        [0.25, 0.75], [[1.0, 2.0, 3.0], [-1.0, 0.5, 1e7]],
        [np.diag([1.0, 2.0, 3.0]), [[2.0, 0.3, 0.1], [0.3, 1.0, 0.0], [0.1, 0.0, 0.5]]],
    )
    path = str(tmp_path / "arrays")
    model.write().save(path)
    loaded = GaussianMixtureModel.read().load(path)
    assert_same_arrays(loaded, model)  # bit-exact, 1e7 included
    assert loaded.getK() == 2


def test_overwrite_replaces_the_model(spark, data, fitted, tmp_path):
    path = str(tmp_path / "model")
    fitted.save(path)
    other = GaussianMixtureModel.fromArrays([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [np.eye(2)] * 2)
    other.write().overwrite().save(path)
    loaded = GaussianMixtureModel.load(path)
    assert loaded.getK() == 2
    assert_same_arrays(loaded, other)


def test_save_to_existing_path_without_overwrite_raises(fitted, tmp_path):
    path = str(tmp_path / "model")
    fitted.save(path)
    other = GaussianMixtureModel.fromArrays([1.0], [[0.0, 0.0]], [np.eye(2)])
    with pytest.raises(FileExistsError, match="already exists"):
        other.save(path)
    with pytest.raises(FileExistsError, match="overwrite"):
        other.write().save(path)
    # The saved model is untouched.
    assert_same_arrays(GaussianMixtureModel.load(path), fitted)


def test_estimator_round_trip_keeps_params_and_initial_model(spark, data, tmp_path):
    start = GaussianMixtureModel.fromArrays(
        [0.3, 0.3, 0.4], [[0.5, 0.5], [5.0, 1.0], [1.0, 5.0]], [np.eye(2) * 1.5] * 3
    )
    est = GaussianMixture(
        featuresCol="arr", predictionCol="c", probabilityCol="p", tol=0.0, maxIter=3, seed=42,
        aggregationDepth=3, weightCol="w", regCovar=1e-4, initMode="random",
        inputCols=["a", "b"], logLikelihoodCol="ll", handleInvalid="skip",
    ).setInitialModel(start)
    path = str(tmp_path / "estimator")
    est.save(path)
    loaded = GaussianMixture.load(path)
    assert isinstance(loaded, GaussianMixture)
    assert loaded.getK() == 3
    assert loaded.getFeaturesCol() == "arr"
    assert loaded.getPredictionCol() == "c"
    assert loaded.getProbabilityCol() == "p"
    assert loaded.getTol() == 0.0
    assert loaded.getMaxIter() == 3
    assert loaded.getSeed() == 42
    assert loaded.getAggregationDepth() == 3
    assert loaded.getWeightCol() == "w"
    assert loaded.getRegCovar() == 1e-4
    assert loaded.getInitMode() == "random"
    assert loaded.getInputCols() == ["a", "b"]
    assert loaded.getLogLikelihoodCol() == "ll"
    assert loaded.getHandleInvalid() == "skip"
    assert loaded.getInitialModel() is not None
    assert_same_arrays(loaded.getInitialModel(), start)

    # The loaded estimator fits exactly like the original (inputCols, weightCol, start: all kept).
    frame = data.select("id", F.col("arr")[0].alias("a"), F.col("arr")[1].alias("b"),
                        F.lit(1.0).alias("w"))
    assert_same_arrays(loaded.fit(frame), est.fit(frame))


def test_uid_is_kept(spark, fitted, tmp_path):
    """As in pyspark.ml persistence, a loaded instance has the saved instance's uid."""
    fitted.save(str(tmp_path / "model"))
    loaded = GaussianMixtureModel.load(str(tmp_path / "model"))
    assert loaded.uid == fitted.uid
    # Params belong to the instance under its (restored) uid, and still resolve.
    assert all(p.parent == loaded.uid for p in loaded.params)
    assert loaded.getPredictionCol() == "cluster"
    assert loaded.isSet(loaded.predictionCol)

    est = GaussianMixture(k=5, seed=3)
    est.save(str(tmp_path / "estimator"))
    loaded_est = GaussianMixture.load(str(tmp_path / "estimator"))
    assert loaded_est.uid == est.uid
    assert all(p.parent == loaded_est.uid for p in loaded_est.params)
    assert loaded_est.getK() == 5 and loaded_est.getSeed() == 3


def test_estimator_without_initial_model(spark, tmp_path):
    est = GaussianMixture(k=4, maxIter=9)
    path = str(tmp_path / "estimator")
    est.save(path)
    loaded = GaussianMixture.load(path)
    assert loaded.getInitialModel() is None
    assert loaded.getK() == 4 and loaded.getMaxIter() == 9
    assert loaded.getTol() == GaussianMixture().getTol()  # default kept
    # Overwriting an estimator that had an initial model with one that has none.
    with_start = GaussianMixture(k=1).setInitialModel(
        GaussianMixtureModel.fromArrays([1.0], [[0.0]], [[[1.0]]])
    )
    with_start.write().overwrite().save(path)
    assert GaussianMixture.load(path).getInitialModel() is not None
    est.write().overwrite().save(path)
    assert GaussianMixture.load(path).getInitialModel() is None


def test_loading_a_non_model_directory_fails_clearly(spark, data, fitted, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a saved spark_gmm GaussianMixtureModel"):
        GaussianMixtureModel.load(str(empty))
    with pytest.raises(ValueError, match="not a saved spark_gmm"):
        GaussianMixtureModel.load(str(tmp_path / "does-not-exist"))

    table_dir = str(tmp_path / "table")
    data.write.parquet(table_dir)
    with pytest.raises(ValueError, match="not a saved spark_gmm GaussianMixtureModel"):
        GaussianMixtureModel.load(table_dir)

    garbage = tmp_path / "garbage" / "metadata"
    garbage.mkdir(parents=True)
    (garbage / "part-00000.txt").write_text("this is not json\n")
    with pytest.raises(ValueError, match="metadata"):
        GaussianMixtureModel.load(str(tmp_path / "garbage"))

    # A model is not an estimator, and the other way round.
    model_dir = str(tmp_path / "model")
    fitted.save(model_dir)
    with pytest.raises(ValueError, match="GaussianMixtureModel, not a spark_gmm.GaussianMixture"):
        GaussianMixture.load(model_dir)
    estimator_dir = str(tmp_path / "estimator")
    GaussianMixture().save(estimator_dir)
    with pytest.raises(ValueError, match="not a spark_gmm.GaussianMixtureModel"):
        GaussianMixtureModel.load(estimator_dir)


PICKLE_MARKERS = [b"\x80\x02", b"\x80\x03", b"\x80\x04\x95", b"\x80\x05\x95", b"cloudpickle",
                  b"pickle"]


def test_saved_files_are_plain_parquet_and_json(fitted, tmp_path):
    path = tmp_path / "model"
    fitted.save(str(path))

    # Metadata: one JSON object in a text file.
    meta_files = sorted(glob.glob(str(path / "metadata" / "part-*")))
    assert len(meta_files) == 1
    lines = [line for line in open(meta_files[0], encoding="utf-8").read().splitlines() if line]
    assert len(lines) == 1
    meta = json.loads(lines[0])
    assert meta["class"] == "spark_gmm.GaussianMixtureModel"
    assert meta["formatVersion"] == 1
    assert meta["uid"] == fitted.uid
    assert meta["k"] == 3 and meta["numFeatures"] == 2
    assert meta["paramMap"]["featuresCol"] == "arr"
    assert meta["paramMap"]["predictionCol"] == "cluster"
    assert meta["summary"]["logLikelihood"] == fitted.summary.logLikelihood
    assert meta["summary"]["logLikelihoodHistory"] == fitted.summary.logLikelihoodHistory
    assert meta["summary"]["numIter"] == fitted.summary.numIter

    # Data: Parquet, one row per component, plain types.
    table = pq.read_table(str(path / "data")).sort_by("component")
    assert table.schema.field("component").type in (pa.int32(), pa.int64())
    assert table.schema.field("weight").type == pa.float64()
    assert pa.types.is_list(table.schema.field("mean").type)
    assert table.schema.field("mean").type.value_type == pa.float64()
    assert table.schema.field("covariance").type.value_type == pa.float64()
    assert table.column("component").to_pylist() == [0, 1, 2]
    np.testing.assert_array_equal(table.column("weight").to_numpy(), fitted.weights)
    np.testing.assert_array_equal(np.array(table.column("mean").to_pylist()), fitted.means)
    np.testing.assert_array_equal(
        np.array(table.column("covariance").to_pylist()).reshape(3, 2, 2), fitted.covariances
    )

    # Nothing but Parquet, JSON text and Hadoop's bookkeeping files; no pickle anywhere.
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            assert not name.endswith((".pkl", ".pickle")), rel
            if name.startswith(".") and name.endswith(".crc") or name == "_SUCCESS":
                continue
            assert rel.startswith(("data" + os.sep, "metadata" + os.sep)), rel
            content = open(full, "rb").read()
            if rel.startswith("data"):
                assert name.endswith(".parquet") and content[:4] == b"PAR1", rel
            else:
                json.loads(content.decode("utf-8"))
            for marker in PICKLE_MARKERS:
                assert marker not in content, (rel, marker)


def test_saved_estimator_files_are_json(spark, tmp_path):
    start = GaussianMixtureModel.fromArrays([1.0], [[0.0, 1.0]], [np.eye(2)])
    path = tmp_path / "estimator"
    GaussianMixture(maxIter=4).setInitialModel(start).save(str(path))
    meta_files = glob.glob(str(path / "metadata" / "part-*"))
    assert len(meta_files) == 1
    meta = json.loads(open(meta_files[0], encoding="utf-8").read())
    assert meta["class"] == "spark_gmm.GaussianMixture"
    assert meta["paramMap"]["maxIter"] == 4
    assert meta["hasInitialModel"] is True
    table = pq.read_table(str(path / "initialModel" / "data"))
    assert table.num_rows == 1


# -- interrupted and corrupt saves -------------------------------------------------------------------


def _fail_metadata_write(monkeypatch):
    """Make the metadata write (the last step of a save) die, as a killed job would there."""
    from pyspark.sql.readwriter import DataFrameWriter

    def killed(self, path, *args, **kwargs):
        raise KeyboardInterrupt(f"killed while writing {path}")

    monkeypatch.setattr(DataFrameWriter, "text", killed)


def test_interrupted_save_does_not_load(spark, fitted, tmp_path, monkeypatch):
    path = str(tmp_path / "model")
    with monkeypatch.context() as patch:
        _fail_metadata_write(patch)
        with pytest.raises(KeyboardInterrupt):
            fitted.save(path)
    assert os.path.isdir(os.path.join(path, "data"))  # the data got written, the metadata did not
    with pytest.raises(ValueError, match="no metadata/ .*interrupted"):
        GaussianMixtureModel.load(path)
    fitted.write().overwrite().save(path)  # saving again repairs the directory
    assert_same_arrays(GaussianMixtureModel.load(path), fitted)


def test_interrupted_overwrite_does_not_load_a_mixture_of_two_saves(spark, fitted, tmp_path, monkeypatch):
    path = str(tmp_path / "model")
    fitted.save(path)
    other = GaussianMixtureModel.fromArrays(
        fitted.weights, fitted.means + 1.0, fitted.covariances
    )  # same k and d: only the writeId tells the halves apart
    with monkeypatch.context() as patch:
        _fail_metadata_write(patch)
        with pytest.raises(KeyboardInterrupt):
            other.write().overwrite().save(path)
    with pytest.raises(ValueError, match="not written by the save that wrote .*metadata.*interrupted"):
        GaussianMixtureModel.load(path)


def test_interrupted_estimator_save_does_not_load(spark, tmp_path, monkeypatch):
    start = GaussianMixtureModel.fromArrays([1.0], [[0.0, 1.0]], [np.eye(2)])
    path = str(tmp_path / "estimator")
    GaussianMixture(maxIter=4).setInitialModel(start).save(path)
    other = GaussianMixtureModel.fromArrays([1.0], [[5.0, 1.0]], [np.eye(2)])
    calls = []
    from pyspark.sql.readwriter import DataFrameWriter

    real_text = DataFrameWriter.text

    def dies_on_second_metadata(self, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == 2:  # the initial model's metadata went through; the estimator's does not
            raise KeyboardInterrupt(target)
        return real_text(self, target, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(DataFrameWriter, "text", dies_on_second_metadata)
        with pytest.raises(KeyboardInterrupt):
            GaussianMixture(maxIter=9).setInitialModel(other).write().overwrite().save(path)
    with pytest.raises(ValueError, match="initialModel was not written by the save"):
        GaussianMixture.load(path)


def test_save_refuses_any_existing_path_before_writing(spark, data, fitted, tmp_path):
    table = str(tmp_path / "table")
    data.write.parquet(table)
    before = sorted(os.listdir(table))
    with pytest.raises(FileExistsError, match=f"path {table} already exists"):
        fitted.save(table)
    with pytest.raises(FileExistsError, match="already exists"):
        GaussianMixture().setInitialModel(fitted).save(table)
    assert sorted(os.listdir(table)) == before  # nothing written into someone else's directory


def test_corrupt_data_files_give_a_clear_error(spark, fitted, tmp_path):
    path = tmp_path / "model"
    fitted.save(str(path))
    (part,) = glob.glob(str(path / "data" / "part-*.parquet"))
    content = open(part, "rb").read()
    open(part, "wb").write(content[: len(content) // 2])
    for crc in glob.glob(str(path / "data" / ".*.crc")):
        os.remove(crc)
    with pytest.raises(ValueError, match=r"model/data cannot be read as spark_gmm model data") as error:
        GaussianMixtureModel.load(str(path))
    assert "\n" not in str(error.value)

    wrong_shape = tmp_path / "wrong"
    fitted.save(str(wrong_shape))
    (meta,) = glob.glob(str(wrong_shape / "metadata" / "part-*"))
    record = json.loads(open(meta).read())
    record["numFeatures"] = 5
    open(meta, "w").write(json.dumps(record) + "\n")
    for crc in glob.glob(str(wrong_shape / "metadata" / ".*.crc")):
        os.remove(crc)
    with pytest.raises(ValueError, match="metadata says k=3, numFeatures=5"):
        GaussianMixtureModel.load(str(wrong_shape))


KILLED_SAVER = """
import sys
import numpy as np
from pyspark.sql import SparkSession
from spark_gmm import GaussianMixtureModel

spark = SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false").getOrCreate()
models = [GaussianMixtureModel.fromArrays([0.5, 0.5], [[i, 0.0], [0.0, i]], [np.eye(2)] * 2)
          for i in (1.0, 2.0)]
models[0].save(sys.argv[1])
print("saved", flush=True)
i = 1
while True:
    models[i % 2].write().overwrite().save(sys.argv[1])
    i += 1
"""


@pytest.mark.parametrize("delay", [1.2])
def test_killed_save_never_leaves_a_directory_that_loads_wrongly(spark, tmp_path, delay):
    """Kill -9 a driver (Python and JVM) that keeps overwriting a model: what is left either loads as
    one of the two models it was writing, or refuses to load with a clear error."""
    import signal
    import subprocess
    import sys
    import time

    path = str(tmp_path / "model")
    script = tmp_path / "saver.py"
    script.write_text(KILLED_SAVER)
    proc = subprocess.Popen([sys.executable, str(script), path], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved"
        time.sleep(delay)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
        loaded = GaussianMixtureModel.load(path)
    except ModelFormatError as error:
        assert "interrupted" in str(error)
    else:
        assert loaded.means[0, 0] in (1.0, 2.0)
        np.testing.assert_array_equal(loaded.means, [[loaded.means[0, 0], 0.0], [0.0, loaded.means[0, 0]]])
