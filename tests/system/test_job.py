"""The jobs (`spark-gmm fit|score`, jobs/*.py): in-process for outputs and errors, and as real
processes (spark-submit, the console entry point) for a killed-and-restarted fit."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pyspark.ml.functions import vector_to_array

from spark_gmm import GaussianMixtureModel
from spark_gmm.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def table(spark, tmp_path_factory):
    rng = np.random.default_rng(5)
    centers = np.array([[0.0, 0.0], [8.0, 8.0]])
    x = np.vstack([rng.normal(c, 1.0, size=(500, 2)) for c in centers])
    rows = [(i, f"g{i % 3}", float(a), float(b)) for i, (a, b) in enumerate(x)]
    path = str(tmp_path_factory.mktemp("job") / "points.parquet")
    spark.createDataFrame(rows, "id long, grp string, x double, y double").write.parquet(path)
    return path


def summary_line(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def run(capsys, *argv):
    code = main(list(argv))
    return code, summary_line(capsys.readouterr().out)


def test_fit_writes_model_and_predictions(spark, table, tmp_path, capsys):
    model_dir, predictions = str(tmp_path / "model"), str(tmp_path / "predictions")
    code, summary = run(capsys, "fit", "--input", table, "--features", "x,y", "--k", "2", "--seed", "1",
                        "--model-out", model_dir, "--predictions-out", predictions,
                        "--probability-col", "p")
    assert code == 0 and summary["status"] == "ok" and summary["command"] == "fit"
    for key in ("k", "iterations", "converged", "logLikelihood", "resumedFromIteration", "modelPath", "seconds"):
        assert key in summary
    assert summary["k"] == 2 and summary["converged"] is True and summary["resumedFromIteration"] == 0
    model = GaussianMixtureModel.load(model_dir)
    assert model.featureNames == ["x", "y"]
    assert sorted(np.round(model.means[:, 0]).tolist()) == [0.0, 8.0]
    out = spark.read.parquet(predictions)
    assert out.columns == ["id", "grp", "x", "y", "prediction", "p"]
    assert out.count() == 1000
    assert dict(out.dtypes)["p"] == "array<double>"
    expected = model.transform(spark.read.parquet(table)).select("id", vector_to_array("probability").alias("p"))
    got, expected = (frame.toPandas().sort_values("id") for frame in (out.select("id", "p"), expected))
    np.testing.assert_allclose(np.stack(got["p"]), np.stack(expected["p"]), rtol=1e-12, atol=1e-15)
    assert out.select("prediction").distinct().count() == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging left behind


def test_score_with_a_saved_model(spark, table, tmp_path, capsys):
    model_dir = str(tmp_path / "model")
    code, _ = run(capsys, "fit", "--input", table, "--features", "x,y", "--k", "2", "--model-out", model_dir)
    assert code == 0
    scored = str(tmp_path / "scored")
    code, summary = run(capsys, "score", "--model", model_dir, "--input", table, "--predictions-out", scored,
                        "--log-likelihood-col", "ll", "--partition-by", "grp")
    assert code == 0 and summary["command"] == "score" and summary["features"] == ["x", "y"]
    assert sorted(p for p in os.listdir(scored) if p.startswith("grp=")) == ["grp=g0", "grp=g1", "grp=g2"]
    out = spark.read.parquet(scored)
    assert set(out.columns) == {"id", "grp", "x", "y", "prediction", "ll"}
    model = GaussianMixtureModel.load(model_dir)
    expected = model.transform(spark.read.parquet(table)).select("id", "prediction")
    assert sorted(out.select("id", "prediction").collect()) == sorted(expected.collect())
    # The summary line gives figures of the rows scored, not of the training.
    sizes = {r["prediction"]: r["count"] for r in expected.groupBy("prediction").count().collect()}
    assert summary["k"] == 2 and summary["rowsScored"] == 1000 and summary["rowsUnscored"] == 0
    assert summary["clusterSizes"] == [sizes[0], sizes[1]]
    assert summary["meanLogLikelihood"] == pytest.approx(model.score(spark.read.parquet(table)), rel=1e-12)
    assert not {"iterations", "converged", "logLikelihood", "resumedFromIteration"} & set(summary)


def test_score_refuses_a_model_feature_mismatch(spark, table, tmp_path, capsys):
    model_dir = str(tmp_path / "model")
    GaussianMixtureModel.fromArrays([1.0], [[0.0, 0.0, 0.0]], [np.eye(3)]).save(model_dir)
    code, summary = run(capsys, "score", "--model", model_dir, "--input", table, "--features", "x,y",
                        "--predictions-out", str(tmp_path / "p"))
    assert code == 1
    assert summary["error"] == "the model has 3 features but --features x, y gives 2"
    code, summary = run(capsys, "score", "--model", str(tmp_path / "nothing"), "--input", table,
                        "--predictions-out", str(tmp_path / "p"))
    assert code == 1 and "not a saved spark_gmm GaussianMixtureModel" in summary["error"]


def test_catalog_tables_in_and_out(spark, table, tmp_path, capsys):
    spark.read.parquet(table).write.saveAsTable("points_in")
    code, summary = run(capsys, "fit", "--input", "points_in", "--features", "x,y", "--k", "2",
                        "--predictions-out", "points_out", "--output-format", "parquet")
    assert code == 0, summary
    assert spark.table("points_out").count() == 1000
    code, summary = run(capsys, "fit", "--input", "points_in", "--features", "x,y", "--k", "2",
                        "--predictions-out", "points_out")
    assert code == 1 and "'points_out' already exists" in summary["error"]
    code, _ = run(capsys, "fit", "--input", "points_in", "--features", "x,y", "--k", "2",
                  "--predictions-out", "points_out", "--mode", "append")
    assert code == 0 and spark.table("points_out").count() == 2000


def test_config_file_and_flags_that_override_it(spark, table, tmp_path, capsys):
    config = tmp_path / "job.toml"
    config.write_text(
        f'input = "{table}"\nfeatures = ["x", "y"]\nlog-level = "WARNING"\n'
        '[fit]\nk = 5\nmax_iter = 3\nseed = 4\n'
        '[score]\nprobability-col = "p"\n'
    )
    code, summary = run(capsys, "fit", "--config", str(config), "--k", "2")
    assert code == 0 and summary["k"] == 2 and summary["iterations"] <= 3
    config.write_text('input = "x"\nfeatures = "x,y"\nkay = 3\n')
    code, summary = run(capsys, "fit", "--config", str(config), "--k", "2")
    assert code == 2 and "unknown setting 'kay'" in summary["error"]
    config.write_text("k = [\n")
    assert run(capsys, "fit", "--config", str(config))[0] == 2


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["fit", "--features", "x", "--k", "2"], 2, "missing required argument: --input"),
        (["fit", "--input", "{table}", "--features", "x,nope", "--k", "2"], 1, "'nope' not found"),
        (["fit", "--input", "{tmp}/absent.parquet", "--features", "x", "--k", "2"], 1, "does not exist"),
        (["fit", "--input", "{table}", "--features", "x", "--k", "0"], 2, "expected an integer >= 1"),
        (["score", "--input", "{table}", "--predictions-out", "{tmp}/p"], 2, "missing required argument: --model"),
        (["cluster"], 2, "the first argument must be a command"),
    ],
)
def test_exit_codes_and_one_line_errors(table, tmp_path, capsys, argv, code, message):
    argv = [a.format(table=table, tmp=tmp_path) for a in argv]
    got = main(argv)
    captured = capsys.readouterr()
    assert got == code
    assert message in summary_line(captured.out)["error"]
    assert summary_line(captured.out)["status"] == "error"


def _env():
    """This checkout's spark_gmm first on the path, and the venv's Python for the Spark workers."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)


#: A Java stack frame, an exception, or Spark's console progress bar.
NOISE = re.compile(r"^\s+at [\w$.<>]+\(|Exception|\[Stage \d+")


def noise(stderr: str) -> list[str]:
    return [line[:200] for line in stderr.splitlines() if NOISE.search(line)]


def test_mixed_fit_then_scored(spark, tmp_path, capsys):
    """Typed columns (one of each kind) with missing values kept: a MixedMixture fitted by the job,
    its predictions and summary line; then the saved model scored by `score`. (The jobs' entry
    points under spark-submit are the Gaussian tests' and the cluster test's.)"""
    import pandas as pd

    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 300)
    frame = pd.DataFrame({
        "id": np.arange(300), "x": rng.normal(size=300) + 6.0 * labels, "member": rng.random(300) < 0.1 + 0.8 * labels,
        "plan": np.where(labels == 1, "pro", "free"), "visits": rng.poisson(1.0 + 5.0 * labels),
    }).astype({"x": object})
    frame.loc[::6, "x"] = None
    table = str(tmp_path / "people.parquet")
    spark.createDataFrame(frame, "id long, x double, member boolean, plan string, visits long").write.parquet(table)
    model_dir, predictions = str(tmp_path / "model"), str(tmp_path / "predictions")
    code, summary = run(
        capsys, "fit", "--input", table, "--k", "2", "--gaussian-cols", "x", "--bernoulli-cols", "member",
        "--categorical-cols", "plan", "--poisson-cols", "visits", "--handle-invalid", "keep", "--max-iter", "20",
        "--model-out", model_dir, "--predictions-out", predictions, "--probability-col", "p",
    )
    assert code == 0 and summary["status"] == "ok" and summary["features"] == ["x", "member", "plan", "visits"]
    assert summary["featureTypes"] == {"gaussian": ["x"], "bernoulli": ["member"], "categorical": ["plan"],
                                       "poisson": ["visits"]}
    assert summary["rows"] == 300 and sum(summary["clusterSizes"]) == 300 and summary["invalidRowsSkipped"] == 0
    out = spark.read.parquet(predictions).toPandas().sort_values("id")
    assert list(out.columns) == ["id", "x", "member", "plan", "visits", "prediction", "p"]
    np.testing.assert_allclose([sum(p) for p in out["p"]], 1.0, rtol=1e-12)
    agreement = np.mean(out["prediction"].to_numpy() == labels)
    assert max(agreement, 1 - agreement) == 1.0  # "plan" alone separates the two classes
    assert np.bincount(out["prediction"], minlength=2).tolist() == summary["clusterSizes"]

    code, scored = run(capsys, "score", "--model", model_dir, "--input", table,
                       "--predictions-out", str(tmp_path / "scored"))
    assert code == 0 and scored["rowsScored"] == 300 and scored["clusterSizes"] == summary["clusterSizes"]
    again = spark.read.parquet(str(tmp_path / "scored")).toPandas().sort_values("id")
    assert again["prediction"].tolist() == out["prediction"].tolist()


@pytest.fixture(scope="module")
def big_table(spark, tmp_path_factory):
    rng = np.random.default_rng(8)
    centers = rng.normal(scale=3.0, size=(6, 6))
    x = np.vstack([rng.normal(c, 1.0, size=(5_000, 6)) for c in centers])
    path = str(tmp_path_factory.mktemp("big") / "points.parquet")
    spark.createDataFrame([tuple(r) for r in x.tolist()], [f"f{i}" for i in range(6)]).coalesce(2).write.parquet(path)
    return path


def test_a_killed_spark_submit_fit_resumes_quietly_from_the_console_script(spark, big_table, tmp_path, capsys):
    """kill -9 a fit job under spark-submit (driver and JVM) after a few checkpoints; `spark-gmm fit`
    (the console entry point, run from this checkout) with the same arguments resumes and saves the
    model an uninterrupted fit saves. Neither prints a stack trace or the progress bar (Spark's file
    listing used to print a FileNotFoundException trace for each of the checkpoint, model and
    predictions directories that do not exist yet), nor, once the job runs, Spark's INFO lines."""
    args = ["--input", big_table, "--features", ",".join(f"f{i}" for i in range(6)), "--k", "6", "--tol", "0",
            "--max-iter", "6", "--model-out", "model", "--checkpoint-dir", "ckpt", "--checkpoint-interval", "1",
            "--predictions-out", "./fitted"]
    spark_submit = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]",
                    "--conf", "spark.ui.enabled=false", str(ROOT / "jobs" / "fit_gmm.py")]
    with open(tmp_path / "killed.err", "w") as stderr:
        proc = subprocess.Popen(spark_submit + args, stdout=subprocess.DEVNULL, stderr=stderr, env=_env(),
                                cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "ckpt" / "slot-1" / "state" / "_SUCCESS").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = (tmp_path / "killed.err").read_text()  # the last lines may die in the JVM's pipe from Python
    assert "reading and validating the input" in killed and noise(killed) == []
    after_start = killed[killed.index("spark_gmm"):].splitlines()
    assert [line for line in after_start if " INFO " in line and "spark_gmm" not in line] == []  # Spark at WARN

    console = [sys.executable, "-c", "import sys; from spark_gmm.cli import main; sys.exit(main())"]
    resumed = subprocess.run(console + ["fit", *args], capture_output=True, text=True, env=_env(), timeout=300,
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    summary = summary_line(resumed.stdout)
    assert summary["status"] == "ok" and summary["resumedFromIteration"] >= 1  # slot-1 holds iteration 1, 3, 5
    assert "model saved to model" in resumed.stderr and noise(resumed.stderr) == []
    assert spark.read.parquet(str(tmp_path / "fitted")).count() == 30_000

    uninterrupted = args[:args.index("--model-out")] + ["--model-out", str(tmp_path / "fresh")]
    code, fresh = run(capsys, "fit", *uninterrupted)  # in this process, without checkpoints
    assert code == 0 and fresh["resumedFromIteration"] == 0
    a = GaussianMixtureModel.load(str(tmp_path / "model"))
    b = GaussianMixtureModel.load(str(tmp_path / "fresh"))
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.covariances, b.covariances)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert summary["logLikelihood"] == fresh["logLikelihood"]


def test_executors_without_the_dependencies_end_a_spark_submit_job_in_one_line(table, tmp_path):
    """Executors whose Python has none of numpy, pandas, pyarrow (a bare venv; a common slip on a
    cluster): the job ends before any pass with one line naming the module and the interpreter,
    and Spark logs no task failure (a pass would fail in every task, each with a JVM and a Python
    traceback)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    bare = tmp_path / "bare" / "bin" / "python"
    env = dict(_env(), PYSPARK_PYTHON=str(bare))
    spark_submit = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]",
                    "--conf", "spark.ui.enabled=false", str(ROOT / "jobs" / "fit_gmm.py")]
    job = subprocess.run(spark_submit + ["--input", table, "--features", "x,y", "--k", "2", "--model-out", "model"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert job.returncode == 1, job.stderr[-2000:]
    error = summary_line(job.stdout)["error"]
    assert error.startswith(f"the executors' Python ({bare}) cannot import 'numpy': "), error
    assert f"error: {error}" in job.stderr
    assert noise(job.stderr) == [] and " ERROR " not in job.stderr and "Traceback" not in job.stderr
    assert not (tmp_path / "model").exists()


def test_select_chooses_k_by_bic(spark, table, tmp_path, capsys):
    model_dir = str(tmp_path / "best")
    code, summary = run(capsys, "select", "--input", table, "--features", "x,y", "--k-values", "1-3",
                        "--covariance-types", "full,spherical", "--model-out", model_dir)
    assert code == 0 and summary["command"] == "select" and summary["criterion"] == "bic"
    assert [(c["k"], c["covarianceType"]) for c in summary["candidates"]] == [
        (k, t) for t in ("full", "spherical") for k in (1, 2, 3)
    ]
    chosen = [c for c in summary["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["bic"] == min(c["bic"] for c in summary["candidates"])
    assert summary["k"] == chosen[0]["k"] == 2  # two blobs
    assert GaussianMixtureModel.load(model_dir).getCovarianceType() == chosen[0]["covarianceType"]
    code, summary = run(capsys, "select", "--input", table, "--features", "x,y", "--k-values", "0-2")
    assert code == 2 and "k values must be integers >= 1" in summary["error"]


def test_reports_from_fit_select_and_a_saved_model(spark, table, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model_dir, fit_report = str(tmp_path / "model"), tmp_path / "fit.html"
    code, summary = run(capsys, "fit", "--input", table, "--features", "x,y", "--k", "2",
                        "--model-out", model_dir, "--report", str(fit_report))
    assert code == 0 and summary["reportPath"] == str(fit_report)
    assert fit_report.read_text().count("data:image/png;base64,") == 3
    select_report = tmp_path / "select.html"
    code, _ = run(capsys, "select", "--input", table, "--features", "x,y", "--k-values", "1-3",
                  "--report", str(select_report))
    assert code == 0 and select_report.read_text().count("data:image/png;base64,") == 4
    saved_report = tmp_path / "saved.html"
    code, summary = run(capsys, "report", "--model", model_dir, "--input", table, "--report", str(saved_report))
    # The loaded model's training figures (trainingFigures) bring the history picture back.
    assert code == 0 and saved_report.read_text().count("data:image/png;base64,") == 3
    code, summary = run(capsys, "report", "--model", model_dir, "--input", table,
                        "--report", str(tmp_path / "no" / "such" / "dir.html"))
    assert code == 1 and "cannot write the report" in summary["error"]
