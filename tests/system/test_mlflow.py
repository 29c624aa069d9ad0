"""spark_gmm.mlflow against a local file-based tracking store: the python_function model loaded in
a fresh process predicts what `transform` predicts, and a job's run holds its parameters, the
log-likelihood history, the drift, the report and the model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")

from spark_gmm import GaussianMixture, GaussianMixtureModel  # noqa: E402
from spark_gmm.cli import main  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FEATURES = ["a", "b", "c"]


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow ≥ 3.7 asks for it; older ones ignore it
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def table(spark):
    rng = np.random.default_rng(11)
    centres = np.array([[0.0, 0.0, 0.0], [4.0, 1.0, -2.0], [-3.0, 5.0, 1.0]])
    x = np.vstack([rng.normal(c, [1.0, 0.7, 1.3], size=(3334, 3)) for c in centres])[:10_000]
    return pd.DataFrame(x[rng.permutation(len(x))], columns=FEATURES)


def test_pyfunc_in_a_fresh_process_predicts_as_transform(spark, table, tracking, tmp_path):
    from spark_gmm.mlflow import log_model

    df = spark.createDataFrame(table)
    model = GaussianMixture(k=3, inputCols=FEATURES, seed=3).fit(df)
    expected = model.transform(df).select("prediction", "probability").toPandas()
    with mlflow.start_run():
        info = log_model(model, "gmm")
    assert info.signature.inputs.input_names() == FEATURES
    assert info.signature.outputs.input_names() == ["prediction", "componentId", "probability"]
    table.to_parquet(tmp_path / "rows.parquet")
    script = (
        "import sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = model.predict(pd.read_parquet(sys.argv[2]))\n"
        "out.assign(probability=out.probability.map(list)).to_json(sys.argv[3], orient='records', double_precision=15)\n"
        "from pyspark import SparkContext\n"
        "print(SparkContext._active_spark_context is None)\n"
    )
    environment = {**os.environ, "PYTHONPATH": "", "MLFLOW_TRACKING_URI": tracking}
    done = subprocess.run([sys.executable, "-c", script, info.model_uri, str(tmp_path / "rows.parquet"),
                           str(tmp_path / "out.json")], env=environment, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "True"  # no Spark was started
    got = pd.read_json(tmp_path / "out.json", orient="records")
    assert len(got) == 10_000
    np.testing.assert_array_equal(got["prediction"].to_numpy(), expected["prediction"].to_numpy())
    np.testing.assert_array_equal(got["componentId"].to_numpy(), expected["prediction"].to_numpy())
    np.testing.assert_allclose(np.stack(got["probability"]), np.stack(expected["probability"].map(lambda v: v.toArray())),
                               rtol=0, atol=1e-12)


def test_pyfunc_of_an_aligned_vector_model_gives_ids_and_nulls(tracking):
    from spark_gmm.mlflow import log_model

    previous = GaussianMixtureModel.fromArrays([0.5, 0.5], [[0.0, 0.0], [9.0, 9.0]], [np.eye(2)] * 2)
    previous._alignment = {"componentIds": [0, 4], "nextComponentId": 5}
    model = GaussianMixtureModel.fromArrays([0.5, 0.5], [[9.1, 9.0], [-20.0, 0.0]], [np.eye(2)] * 2).alignTo(previous)
    assert model.componentIds == [4, 5]
    with mlflow.start_run():
        info = log_model(model)
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    out = loaded.predict(pd.DataFrame({"features": [[9.0, 9.0], [-19.0, 1.0], [np.nan, 0.0], [1.0, 2.0, 3.0]]}))
    assert out["prediction"].tolist()[:2] == [0, 1] and out["componentId"].tolist()[:2] == [4, 5]
    assert out["prediction"].isna().tolist() == [False, False, True, True]
    assert out["probability"][2] is None


def test_fit_job_logs_its_run(spark, table, tracking, tmp_path, capsys):
    path = str(tmp_path / "rows.parquet")
    spark.createDataFrame(table).write.parquet(path)
    common = ["--input", path, "--features", ",".join(FEATURES), "--k", "3", "--seed", "5"]
    assert main(["fit", *common, "--model-out", str(tmp_path / "day1")]) == 0
    capsys.readouterr()
    code = main(["fit", *common, "--align-to", str(tmp_path / "day1"), "--label-changes", "--seed", "9",
                 "--model-out", str(tmp_path / "day2"), "--report", str(tmp_path / "report.html"),
                 "--mlflow-experiment", "segments"])
    fields = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, fields
    client = mlflow.MlflowClient()
    run = client.get_run(fields["mlflowRunId"])
    assert client.get_experiment(run.info.experiment_id).name == "segments"
    params = run.data.params
    assert (params["k"], params["seed"], params["features"], params["align_to"]) == ("3", "9", "a,b,c", str(tmp_path / "day1"))
    history = client.get_metric_history(run.info.run_id, "logLikelihood")
    # (MLflow 3 copies a run's latest metrics again when a model is logged: compare distinct points.)
    points = sorted({(m.step, m.value) for m in history})
    assert [step for step, _ in points] == list(range(fields["iterations"] + 1))
    assert points[-1][1] == fields["logLikelihood"]
    metrics = run.data.metrics
    assert metrics["k"] == 3 and metrics["iterations"] == fields["iterations"]
    for c in fields["drift"]["components"]:
        assert metrics[f"meanShift.{c['id']}"] == pytest.approx(c["meanShift"])
        assert metrics[f"labelChange.{c['id']}"] == pytest.approx(c["labelChange"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "summary.json"} <= artifacts
    model_uri = f"runs:/{run.info.run_id}/model"
    loaded = mlflow.pyfunc.load_model(model_uri)
    day2 = GaussianMixtureModel.load(str(tmp_path / "day2"))
    assert loaded.predict(table.head(100))["prediction"].tolist() == day2.scoreArray(table.head(100).to_numpy())[0].tolist()


def test_job_without_mlflow_installed_fails_before_fitting(spark, table, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    code = main(["fit", "--input", str(tmp_path / "none"), "--features", "a", "--k", "2",
                 "--mlflow-experiment", "x"])
    fields = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and fields["error"].startswith("--mlflow-experiment needs MLflow")


def test_autolog_logs_the_fit_with_an_allowlist(spark, table, tracking, tmp_path):
    """mlflow.pyspark.ml.autolog logs spark_gmm's params; the model too once the allowlist names it."""
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text("spark_gmm.model.GaussianMixtureModel\n")
    spark.sparkContext._conf.set("spark.mlflow.pysparkml.autolog.logModelAllowlistFile", str(allowlist))
    mlflow.set_experiment("autolog")
    mlflow.pyspark.ml.autolog(log_models=True, log_input_examples=False, log_model_signatures=False)
    try:
        df = spark.createDataFrame(table.head(500))
        with mlflow.start_run() as run:
            GaussianMixture(k=2, inputCols=FEATURES, seed=1, maxIter=5).fit(df)
    finally:
        mlflow.pyspark.ml.autolog(disable=True)
        spark.sparkContext._conf.set("spark.mlflow.pysparkml.autolog.logModelAllowlistFile", "")
    logged = mlflow.get_run(run.info.run_id)
    assert logged.data.params["k"] == "2" and logged.data.params["maxIter"] == "5"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "model" in artifacts
