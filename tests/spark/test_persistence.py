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


def decoded(table: pa.Table, name: str) -> np.ndarray:
    """One array of a payload table, decoded by hand: little-endian float64 chunks at their offsets."""
    rows = sorted((r for r in table.to_pylist() if r["name"] == name), key=lambda r: r["offset"])
    flat = np.concatenate([np.frombuffer(r["values"], dtype="<f8") for r in rows])
    return flat.reshape(rows[0]["shape"])


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
    assert meta["formatVersion"] == 2
    assert meta["uid"] == fitted.uid
    assert meta["k"] == 3 and meta["numFeatures"] == 2
    assert meta["paramMap"]["featuresCol"] == "arr"
    assert meta["paramMap"]["predictionCol"] == "cluster"
    assert meta["summary"]["logLikelihood"] == fitted.summary.logLikelihood
    assert meta["summary"]["logLikelihoodHistory"] == fitted.summary.logLikelihoodHistory
    assert meta["summary"]["numIter"] == fitted.summary.numIter

    # Data: Parquet rows of raw float64 chunks (no text, no lists of floats), tagged with the writeId.
    table = pq.read_table(str(path / "data"))
    assert table.schema.field("values").type in (pa.binary(), pa.large_binary())
    assert table.schema.field("offset").type == pa.int64()
    assert set(table.column("writeId").to_pylist()) == {meta["writeId"]}
    assert sorted(table.column("name").to_pylist()) == ["covariances", "means", "weights"]
    np.testing.assert_array_equal(decoded(table, "weights"), fitted.weights)
    np.testing.assert_array_equal(decoded(table, "means"), fitted.means)
    np.testing.assert_array_equal(decoded(table, "covariances"), fitted.covariances)

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
    np.testing.assert_array_equal(decoded(table, "means"), start.means)


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


# -- validation, old formats, large models, loading without Spark ------------------------------------


def _replace_data(path, weights, means, covariances):
    """Rewrite a saved model's data/ with other arrays under the same writeId (as a foreign tool or a
    hand edit would), leaving the metadata alone."""
    from spark_gmm import codec

    (meta,) = glob.glob(str(path / "metadata" / "part-*"))
    write_id = json.loads(open(meta).read())["writeId"]
    for old in glob.glob(str(path / "data" / "*")) + glob.glob(str(path / "data" / ".*.crc")):
        os.remove(old)
    table = pa.concat_tables(codec.to_tables(codec.mixture_arrays(weights, means, covariances), write_id))
    pq.write_table(table, str(path / "data" / "part-00000.parquet"))


@pytest.mark.parametrize(
    "covariance, message",
    [
        ([[2.0, 0.3], [0.2999, 1.0]], r"component 1: covariance is not symmetric \(entry \(0, 1\) is 0.3, entry \(1, 0\) is 0.2999"),
        ([[1.0, 2.0], [2.0, 1.0]], r"component 1: covariance is not positive definite \(smallest eigenvalue -1"),
    ],
)
def test_a_saved_model_with_a_bad_covariance_is_refused(spark, tmp_path, covariance, message):
    from spark_gmm.persistence import read_arrays

    path = tmp_path / "model"
    GaussianMixtureModel.fromArrays([0.5, 0.5], [[0.0, 0.0], [3.0, 3.0]], [np.eye(2)] * 2).save(str(path))
    _replace_data(path, [0.5, 0.5], [[0.0, 0.0], [3.0, 3.0]], [np.eye(2), covariance])
    with pytest.raises(ModelFormatError, match=f"model holds an invalid mixture: {message}"):
        GaussianMixtureModel.load(str(path))
    with pytest.raises(ModelFormatError, match=message):
        read_arrays(str(path))


def test_round_off_asymmetry_in_a_saved_model_loads_symmetrised(spark, tmp_path):
    path = tmp_path / "model"
    covariance = np.array([[2.0, 0.3], [np.nextafter(0.3, 1.0), 1.0]])
    GaussianMixtureModel.fromArrays([1.0], [[0.0, 0.0]], [np.eye(2)]).save(str(path))
    _replace_data(path, [1.0], [[0.0, 0.0]], [covariance])
    loaded = GaussianMixtureModel.load(str(path)).covariances[0]
    assert loaded[0, 1] == loaded[1, 0] and 0.3 <= loaded[0, 1] <= np.nextafter(0.3, 1.0)


def test_a_model_with_a_bad_covariance_is_never_written(spark, tmp_path):
    """Refused when the model is built or, at the latest, before its save writes anything."""
    path = tmp_path / "model"
    with pytest.raises(ValueError, match="component 0: covariance is not symmetric"):
        GaussianMixtureModel.fromArrays([1.0], [[0.0, 0.0]], [[[1.0, 0.5], [0.1, 1.0]]]).save(str(path))
    assert not path.exists()


def test_format_version_1_directories_still_load(spark, tmp_path):
    """A directory as spark_gmm 0.1 wrote it: one row per component with array<double> columns."""
    from spark_gmm.persistence import read_arrays

    weights, means = [0.25, 0.75], [[1.0, 2.0], [-1.0, 1e7]]
    covariances = [np.diag([1.0, 2.0]), [[2.0, 0.3], [0.3, 1.0]]]
    path = tmp_path / "v1"
    (path / "data").mkdir(parents=True)
    (path / "metadata").mkdir()
    pq.write_table(pa.table({
        "component": pa.array([1, 0], pa.int32()),
        "weight": [weights[1], weights[0]],
        "mean": [means[1], means[0]],
        "covariance": [np.ravel(covariances[1]).tolist(), np.ravel(covariances[0]).tolist()],
        "writeId": ["abc", "abc"],
    }), str(path / "data" / "part-00000.parquet"))
    metadata = {
        "class": "spark_gmm.GaussianMixtureModel", "formatVersion": 1, "uid": "GaussianMixtureModel_1",
        "writeId": "abc", "paramMap": {"k": 2, "featuresCol": "x"}, "defaultParamMap": {}, "k": 2,
        "numFeatures": 2, "featureNames": None, "covarianceType": "full",
    }
    (path / "metadata" / "part-00000").write_text(json.dumps(metadata) + "\n")
    loaded = GaussianMixtureModel.load(str(path))
    assert loaded.weights == weights and loaded.getFeaturesCol() == "x"
    np.testing.assert_array_equal(loaded.means, means)
    np.testing.assert_array_equal(loaded.covariances, covariances)
    np.testing.assert_array_equal(read_arrays(str(path)).covariances, covariances)


def test_a_large_model_saves_and_loads_exactly_in_windows(spark, tmp_path, monkeypatch):
    """k·d² = 2e6 doubles in 16 MiB; small windows force many writes, reads and chunks per array."""
    from spark_gmm import codec
    from spark_gmm.persistence import read_arrays

    monkeypatch.setattr(codec, "CHUNK_VALUES", 1 << 16)
    monkeypatch.setattr(codec, "WINDOW_VALUES", 1 << 18)
    rng = np.random.default_rng(3)
    k, d = 2, 1000
    factors = rng.normal(size=(k, d, 20))
    covariances = np.einsum("kif,kjf->kij", factors, factors) + np.eye(d)
    model = GaussianMixtureModel.fromArrays([0.4, 0.6], rng.normal(size=(k, d)) * 1e3, covariances)
    path = tmp_path / "large"
    model.save(str(path))
    assert len(glob.glob(str(path / "data" / "part-*.parquet"))) == 8  # one file per window
    loaded = GaussianMixtureModel.load(str(path))
    assert_same_arrays(loaded, model)
    assert_same_arrays(read_arrays(str(path)), model)


NO_SESSION = """
import json, sys
import numpy as np
from pyspark import SparkContext
from pyspark.sql import SparkSession
from spark_gmm import GaussianMixtureModel
from spark_gmm.persistence import read_arrays

saved = read_arrays(sys.argv[1])
local = GaussianMixtureModel.fromArrays(*saved[:3], saved.metadata["covarianceType"])
rows = json.loads(sys.argv[2])
probabilities = [local.predictProbability(r).toArray().tolist() for r in rows]
no_spark = SparkContext._gateway is None and SparkSession.getActiveSession() is None
loaded = GaussianMixtureModel.load(sys.argv[1])  # no session yet: load starts one
print(json.dumps({"no_spark": no_spark, "probabilities": probabilities,
                  "means": saved.means.tolist(), "loaded": loaded.means.tolist(),
                  "features": loaded.getFeaturesCol()}))
"""


def test_a_saved_model_reads_without_spark_and_loads_without_a_session(fitted, tmp_path):
    import subprocess
    import sys

    path = str(tmp_path / "model")
    fitted.save(path)
    rows = [[0.0, 0.0], [3.0, 3.0], [6.0, 0.5]]
    done = subprocess.run(
        [sys.executable, "-c", NO_SESSION, path, json.dumps(rows)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["no_spark"]  # read_arrays started neither a JVM nor a session
    assert result["probabilities"] == [fitted.predictProbability(r).toArray().tolist() for r in rows]
    assert result["means"] == result["loaded"] == fitted.means.tolist()
    assert result["features"] == "arr"



def test_a_loaded_model_keeps_its_training_figures(spark, tmp_path):
    """`trainingFigures` is public on a loaded model (no `summary` there): history, sizes, stop."""
    rng = np.random.default_rng(5)
    x = np.vstack([rng.normal(c, 1.0, size=(300, 2)) for c in ([0.0, 0.0], [6.0, 6.0])])
    df = spark.createDataFrame([(r.tolist(),) for r in x], ["features"])
    model = GaussianMixture(k=2, seed=1).fit(df)
    model.save(str(tmp_path / "m"))
    loaded = GaussianMixtureModel.load(str(tmp_path / "m"))
    assert not loaded.hasSummary
    figures = loaded.trainingFigures
    assert figures["logLikelihoodHistory"] == model.summary.logLikelihoodHistory
    assert figures["clusterSizes"] == model.summary.clusterSizes and figures["stopReason"] == "converged"
    assert GaussianMixtureModel.fromArrays([1.0], [[0.0]], [[[1.0]]]).trainingFigures is None
