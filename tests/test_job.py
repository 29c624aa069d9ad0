"""jobs/fit_gmm.py: in-process for the outputs and errors, once through spark-submit."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spark_gmm import GaussianMixtureModel

ROOT = Path(__file__).resolve().parents[1]


def _job():
    spec = importlib.util.spec_from_file_location("fit_gmm", ROOT / "jobs" / "fit_gmm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table(spark, tmp_path_factory):
    rng = np.random.default_rng(5)
    centers = np.array([[0.0, 0.0], [8.0, 8.0]])
    x = np.vstack([rng.normal(c, 1.0, size=(500, 2)) for c in centers])
    rows = [(i, float(a), float(b)) for i, (a, b) in enumerate(x)]
    path = str(tmp_path_factory.mktemp("job") / "points.parquet")
    spark.createDataFrame(rows, "id long, x double, y double").write.parquet(path)
    return path


def _summary(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_fit_job_writes_model_and_predictions(spark, table, tmp_path, capsys):
    model_dir, predictions = str(tmp_path / "model"), str(tmp_path / "predictions")
    code = _job().main(
        ["--input", table, "--features", "x,y", "--k", "2", "--seed", "1",
         "--model-out", model_dir, "--predictions-out", predictions]
    )
    summary = _summary(capsys.readouterr().out)
    assert code == 0 and summary["status"] == "ok"
    assert summary["k"] == 2 and summary["converged"] is True
    model = GaussianMixtureModel.load(model_dir)
    assert sorted(np.round(model.means[:, 0]).tolist()) == [0.0, 8.0]
    out = spark.read.parquet(predictions)
    assert {"id", "x", "y", "prediction", "probability"} <= set(out.columns)
    assert out.count() == 1000
    assert out.select("prediction").distinct().count() == 2


def test_fit_job_names_a_missing_column(table, tmp_path, capsys):
    code = _job().main(["--input", table, "--features", "x,nope", "--k", "2",
                        "--model-out", str(tmp_path / "m")])
    captured = capsys.readouterr()
    assert code != 0
    assert _summary(captured.out)["status"] == "error"
    assert "nope" in _summary(captured.out)["error"]


def test_fit_job_refuses_a_missing_input(tmp_path, capsys):
    code = _job().main(["--input", str(tmp_path / "absent.parquet"), "--features", "x", "--k", "2"])
    assert code != 0
    assert "does not exist" in _summary(capsys.readouterr().out)["error"]


def test_fit_job_under_spark_submit(table, tmp_path):
    spark_submit = Path(sys.executable).parent / "spark-submit"
    model_dir = str(tmp_path / "model")
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    done = subprocess.run(
        [str(spark_submit), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
         str(ROOT / "jobs" / "fit_gmm.py"), "--input", table, "--features", "x,y", "--k", "2",
         "--model-out", model_dir],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = _summary(done.stdout)
    assert summary["status"] == "ok" and summary["modelPath"].endswith("model")
    assert Path(model_dir, "metadata").is_dir() and Path(model_dir, "data").is_dir()
