"""`spark-gmm fit` run day after day: --initial-model, --warm-start-from a dated layout, --align-to,
--label-changes and the --max-drift exit code."""

import json
from pathlib import Path

import numpy as np
import pytest

from spark_gmm import GaussianMixtureModel
from spark_gmm.cli import main
from spark_gmm.cli.recurring import latest_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tables(spark, tmp_path_factory):
    """Two days of the same two clusters, day 2 a new sample."""
    paths = []
    for day in (1, 2):
        rng = np.random.default_rng(day)
        x = np.vstack([rng.normal(c, 1.0, size=(500, 2)) for c in ([0.0, 0.0], [8.0, 8.0])])
        path = str(tmp_path_factory.mktemp("recurring") / f"day{day}.parquet")
        spark.createDataFrame([(float(a), float(b)) for a, b in x], "x double, y double").write.parquet(path)
        paths.append(path)
    return paths


def run(capsys, *argv):
    code = main(list(argv))
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def fit(capsys, table, *flags):
    return run(capsys, "fit", "--input", table, "--features", "x,y", "--seed", "1", *flags)


def test_daily_warm_start_aligns_to_yesterday(spark, tables, tmp_path, capsys):
    models = tmp_path / "models"
    code, first = fit(capsys, tables[0], "--k", "2", "--warm-start-from", str(models),
                      "--model-out", str(models / "2025-01-01"))
    assert code == 0 and first["initialModelPath"] is None and first["alignedTo"] is None
    (models / "2025-01-03").mkdir()  # an interrupted save (no metadata/) is never picked
    code, second = fit(capsys, tables[1], "--warm-start-from", str(models), "--max-iter", "5",
                       "--model-out", str(models / "2025-01-02"), "--label-changes", "--max-drift", "meanShift=1")
    assert code == 0 and second["status"] == "ok", second
    assert second["initialModelPath"] == second["alignedTo"] == str(models / "2025-01-01")
    assert second["k"] == 2 and second["componentIds"] == [0, 1] and second["driftExceeded"] == []
    day1 = GaussianMixtureModel.load(str(models / "2025-01-01"))
    day2 = GaussianMixtureModel.load(str(models / "2025-01-02"))
    assert day2.alignment["componentIds"] == [0, 1]
    for j, component in enumerate(second["drift"]["components"]):
        assert component["previousId"] == j
        assert component["meanShift"] < 0.5
        assert np.abs(day2.means[j] - day1.means[j]).max() < 0.3
    assert second["drift"]["rowsCompared"] == 1000 and second["drift"]["labelChangeShare"] < 0.01


def test_max_drift_exits_3_after_writing_outputs(spark, tables, tmp_path, capsys):
    yesterday, today = str(tmp_path / "yesterday"), str(tmp_path / "today")
    assert fit(capsys, tables[0], "--k", "2", "--model-out", yesterday)[0] == 0
    code, summary = fit(capsys, tables[1], "--k", "2", "--align-to", yesterday, "--model-out", today,
                        "--report", str(tmp_path / "r.html"), "--max-drift", "0")
    assert code == 3 and summary["status"] == "drift"
    assert summary["driftExceeded"] and all(": " in alarm for alarm in summary["driftExceeded"])
    assert GaussianMixtureModel.load(today).componentIds == [0, 1]
    report = (tmp_path / "r.html").read_text()
    assert "Drift from the previous model" in report and "mean shift (σ)" in report


def test_drift_table_lists_new_and_retired_components():
    from spark_gmm.report import drift_table

    table = drift_table({
        "components": [{"id": 0, "previousId": 0, "weight": 0.6, "weightChange": 0.1, "meanShift": 0.25,
                        "divergence": 0.01, "labelChange": 0.02},
                       {"id": 3, "previousId": None, "weight": 0.4, "weightChange": None, "meanShift": None,
                        "divergence": None}],
        "retired": [{"previousId": 1, "previousWeight": 0.5}],
    })
    assert "<td>0</td><td>0</td><td>0.6000</td><td>+0.1000</td><td>0.25</td><td>0.01</td><td>2.00%</td>" in table
    assert "<td>3</td><td>new</td><td>0.4000</td><td>—</td>" in table
    assert "<td>1 (retired)</td><td>0</td><td>-0.5000</td>" in table


def test_select_aligns_the_chosen_model(spark, tables, tmp_path, capsys):
    yesterday = str(tmp_path / "yesterday")
    GaussianMixtureModel.fromArrays([0.5, 0.5], [[8.0, 8.0], [0.0, 0.0]], [np.eye(2)] * 2).save(yesterday)
    code, summary = run(capsys, "select", "--input", tables[1], "--features", "x,y", "--k-values", "2,3",
                        "--covariance-types", "full", "--align-to", yesterday)
    assert code == 0 and summary["k"] == 2 and summary["componentIds"] == [0, 1]
    assert [round(c["weight"], 1) for c in summary["drift"]["components"]] == [0.5, 0.5]
    assert all(c["meanShift"] < 0.3 for c in summary["drift"]["components"])


def test_initial_model_sets_k_and_refuses_another(spark, tables, tmp_path, capsys):
    start = str(tmp_path / "start")
    GaussianMixtureModel.fromArrays([0.5, 0.5], [[0.0, 0.0], [8.0, 8.0]], [np.eye(2)] * 2).save(start)
    code, summary = fit(capsys, tables[0], "--initial-model", start, "--max-iter", "1")
    assert code == 0 and summary["k"] == 2 and summary["iterations"] == 1
    assert summary["initialModelPath"] == start and summary["alignedTo"] is None
    code, summary = fit(capsys, tables[0], "--initial-model", start, "--k", "3")
    assert code == 1 and summary["error"].startswith("--k 3 but the initial model")


def test_first_warm_start_without_k_says_so(spark, tables, tmp_path, capsys):
    code, summary = fit(capsys, tables[0], "--warm-start-from", str(tmp_path / "none"),
                        "--model-out", str(tmp_path / "none" / "2025-01-01"))
    assert code == 1 and "give --k for the first fit" in summary["error"]


@pytest.mark.parametrize("flags, message", [
    (["--k", "2", "--max-drift", "1"], "--max-drift needs a previous model"),
    (["--k", "2", "--label-changes"], "--label-changes needs a previous model"),
    (["--warm-start-from", "m", "--align-to", "a", "--model-out", "m/x"], "drop --align-to"),
    (["--warm-start-from", "m"], "--warm-start-from needs --model-out"),
    (["--k", "2", "--align-to", "a", "--max-drift", "shift=1"], "'shift' is not a drift figure"),
    (["--k", "2", "--align-to", "a", "--max-drift", "-1"], "expected a number or FIGURE=LIMIT"),
])
def test_bad_recurring_flags_exit_2(tables, capsys, flags, message):
    code, summary = fit(capsys, tables[0], *flags)
    assert code == 2 and message in summary["error"]


def test_latest_model_before_the_output(spark, tmp_path):
    for name in ("2025-01-01", "2025-01-02", "2025-01-04"):
        (tmp_path / name / "metadata").mkdir(parents=True)
    (tmp_path / "2025-01-03").mkdir()
    parent = str(tmp_path)
    assert latest_model(spark, parent, f"{parent}/2025-01-04") == f"{parent}/2025-01-02"
    assert latest_model(spark, parent, f"{parent}/2025-01-02/") == f"{parent}/2025-01-01"
    assert latest_model(spark, parent, f"{parent}/2025-01-01") is None
    assert latest_model(spark, parent + "/", "/elsewhere/x") == f"{parent}/2025-01-04"
    assert latest_model(spark, str(Path(parent) / "missing"), "/elsewhere/x") is None


def test_scheduled_fits_warm_start_align_and_log_to_mlflow(monkeypatch):
    """The Airflow DAG and the Databricks job: each day's fit starts from and aligns to the latest
    earlier model next to its own dated directory, checks the drift and logs to MLflow."""
    import ast

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import test_scheduler_examples as examples
    from spark_gmm.cli import parse_args

    dag = ast.parse(examples.DAG_FILE.read_text())
    names = {}
    for node in dag.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                names[node.targets[0].id] = examples.resolve(node.value, names)
            except examples.Unresolved:
                pass
    fit_call = next(n for n in ast.walk(dag) if isinstance(n, ast.Call)
                    and any(k.arg == "task_id" and getattr(k.value, "value", None) == "fit" for k in n.keywords))
    airflow = examples.resolve(next(k.value for k in fit_call.keywords if k.arg == "application_args"), names)
    databricks = next(t for t in json.loads(examples.DATABRICKS_JOB.read_text())["tasks"] if t["task_key"] == "fit")
    for argv in (airflow, databricks["spark_python_task"]["parameters"]):
        args = parse_args("fit", examples.local_argv(argv))
        assert args.model_out.rpartition("/")[0] == args.warm_start_from.rstrip("/")
        assert args.label_changes and args.max_drift and args.mlflow_experiment
