"""The edges of the command line: strict flags and config keys, help texts, defaults shared with the
API, output names, overlapping inputs and outputs, and the cleanup after a failed write. In-process
(the suite's Spark session); tests/test_job.py runs the jobs as real processes."""

import json
import os
import time

import numpy as np
import pytest

from spark_gmm import GaussianMixture
from spark_gmm.cli import UsageError, main, parse_args
from spark_gmm.cli import arguments, storage
from spark_gmm.cli.arguments import output_kind
from spark_gmm.options import DTYPES, ENGINES, INIT_MODES
from spark_gmm.mixture import COVARIANCE_TYPES
from spark_gmm.selection import CRITERIA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def table(spark, tmp_path_factory):
    rng = np.random.default_rng(3)
    x = np.vstack([rng.normal(c, 1.0, size=(200, 2)) for c in ([0.0, 0.0], [8.0, 8.0])])
    path = str(tmp_path_factory.mktemp("edges") / "points.parquet")
    spark.createDataFrame([(i, float(a), float(b)) for i, (a, b) in enumerate(x)], "id long, x double, y double") \
        .write.parquet(path)
    return path


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def hidden(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


# -- flags, help, config --------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--inp", "--max-it", "--feat"])
def test_an_abbreviated_flag_exits_2(capsys, table, flag):
    argv = ["fit", "--input", table, "--features", "x,y", "--k", "2"]
    code, summary, err = run(capsys, *argv, flag, "5")
    assert code == 2 and summary["status"] == "error"
    assert f"unrecognized arguments: {flag} 5" in summary["error"] and err.startswith("error: ")


def test_top_level_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command, text in arguments.COMMANDS.items():
        assert f"  {command:<8}{text[:40]}" in out
    assert main([]) == 2 and "the first argument must be a command" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["fit", "score", "select", "report"])
def test_each_command_has_its_own_help(capsys, command):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    description = " ".join(out.split("\n\n")[1].split())
    assert description == arguments.COMMANDS[command]
    assert len(set(arguments.COMMANDS.values())) == len(arguments.COMMANDS)
    assert ("Score rows" in out) == (command == "score")
    assert ("--k-values" in out) == (command == "select")


def test_choices_and_defaults_are_the_apis():
    """The CLI reads the library's allowed values and the estimators' defaults, not copies."""
    def choices(command, flag):
        action = next(a for a in arguments.build_parser(command)._actions if flag in a.option_strings)
        return action.choices

    assert choices("fit", "--covariance-type") is COVARIANCE_TYPES
    assert choices("fit", "--init-mode") is INIT_MODES
    assert choices("fit", "--engine") is ENGINES
    assert choices("fit", "--dtype") is DTYPES
    assert choices("select", "--criterion") is CRITERIA
    api = GaussianMixture()
    args = parse_args("fit", ["--input", "t", "--features", "x", "--k", "2"])
    for flag, param in [("max_iter", "maxIter"), ("tol", "tol"), ("seed", "seed"), ("reg_covar", "regCovar"),
                        ("init_mode", "initMode"), ("engine", "engine"), ("dtype", "dtype"), ("n_init", "nInit"),
                        ("covariance_type", "covarianceType"), ("handle_invalid", "handleInvalid"),
                        ("checkpoint_interval", "checkpointInterval")]:
        assert getattr(args, flag) == api.getOrDefault(param), flag
    assert args.checkpoint_interval == 10  # MLlib's default, kept by the API and the CLI


@pytest.mark.parametrize(
    "config, message",
    [
        ("help = 1\n", "unknown setting 'help'"),
        ("[fit]\nhelp = true\n", "unknown setting [fit] 'help'"),
        ("config = 'other.toml'\n", "unknown setting 'config'"),
        ("[score]\nk = 3\n", "unknown setting [score] 'k' (score has no --k)"),
        ("[fitt]\nk = 3\n", "unknown table [fitt]"),
        ("[fit]\nk = true\n", "setting [fit] 'k' must be a string, number or list"),
        ("fit = 3\n", "[fit] must be a table"),
    ],
)
def test_config_refuses_keys_that_are_not_value_flags(capsys, tmp_path, config, message):
    path = tmp_path / "job.toml"
    path.write_text(config)
    code, summary, _ = run(capsys, "fit", "--config", str(path), "--input", "t", "--features", "x", "--k", "2")
    assert code == 2 and summary["status"] == "error" and message in summary["error"]


def test_config_tables_of_every_command_and_negative_values(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        'input = "t"\nfeatures = ["x", "y"]\nk = 4\n'
        "[fit]\ntol = 0.01\nseed = -5\n"
        '[select]\nk-values = "2-4"\ncriterion = "aic"\n'
        '[report]\nmodel = "m"\nreport = "r.html"\n'
    )
    fit = parse_args("fit", ["--config", str(path)])
    assert (fit.k, fit.tol, fit.seed, fit.notes) == (4, 0.01, -5, [])
    select = parse_args("select", ["--config", str(path)])
    assert (select.k_values, select.criterion, select.tol) == ([2, 3, 4], "aic", GaussianMixture().getTol())
    assert select.notes == [f"config file '{path}': select reads the top-level keys and [select] only; it does "
                            "not use [fit] (tol, seed)"]
    report = parse_args("report", ["--config", str(path)])
    assert (report.model, report.report, report.features) == ("m", "r.html", ["x", "y"])


def test_k_values_are_bounded_before_they_are_expanded(capsys):
    began = time.perf_counter()
    with pytest.raises(UsageError, match="k values must be at most 1000"):
        parse_args("select", ["--input", "t", "--features", "x", "--k-values", "2-1000000000"])
    assert time.perf_counter() - began < 1.0
    with pytest.raises(UsageError, match="more than 100 k values"):
        parse_args("select", ["--input", "t", "--features", "x", "--k-values", "1-101"])
    with pytest.raises(UsageError, match="more than 100 k values"):
        parse_args("select", ["--input", "t", "--features", "x", "--k-values", "1-60,200-260"])
    with pytest.raises(UsageError, match="empty k range '5-2'"):
        parse_args("select", ["--input", "t", "--features", "x", "--k-values", "5-2"])
    with pytest.raises(UsageError, match="40 k values x 3 covariance types is more than 100 candidates"):
        parse_args("select", ["--input", "t", "--features", "x", "--k-values", "1-40",
                              "--covariance-types", "full,diag,tied"])
    assert parse_args("select", ["--input", "t", "--features", "x", "--k-values", "1-100"]).k_values == list(range(1, 101))
    code, summary, _ = run(capsys, "select", "--input", "t", "--features", "x", "--k-values", "2-1000000000")
    assert code == 2 and "at most 1000" in summary["error"]


# -- output names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kind",
    [("preds", "table"), ("db.preds", "table"), ("cat.db.preds", "table"), ("`preds`.`parquet`", "table"),
     ("./preds.parquet", "path"), ("out/preds", "path"), ("s3a://bucket/preds.parquet", "path"),
     ("file:/tmp/preds", "path")],
)
def test_output_kind(name, kind):
    assert output_kind(name) == kind


@pytest.mark.parametrize("name", ["preds.parquet", "db.preds.CSV", "preds.json", "my-preds", "a.b.c.d"])
def test_an_output_name_that_is_neither_a_path_nor_a_table_is_refused(capsys, table, name):
    code, summary, _ = run(capsys, "fit", "--input", table, "--features", "x,y", "--k", "2",
                           "--predictions-out", name)
    assert code == 2 and f"output '{name}' is neither a path" in summary["error"]
    assert "write './" in summary["error"]


# -- outputs checked first, overlaps ---------------------------------------------------------------


def test_outputs_are_checked_before_the_input_is_read(spark, capsys, tmp_path):
    (tmp_path / "model").mkdir()
    absent = str(tmp_path / "no-such-input.parquet")
    code, summary, _ = run(capsys, "fit", "--input", absent, "--features", "x,y", "--k", "2",
                           "--model-out", str(tmp_path / "model"))
    assert code == 1 and summary["error"] == (
        f"model directory '{tmp_path / 'model'}' already exists; use --mode overwrite to replace it"
    )
    (tmp_path / "report.html").write_text("old")
    code, summary, _ = run(capsys, "report", "--input", absent, "--model", str(tmp_path / "model"),
                           "--report", str(tmp_path / "report.html"))
    assert code == 1 and "report" in summary["error"] and "already exists" in summary["error"]
    code, summary, _ = run(capsys, "fit", "--input", absent, "--features", "x,y", "--k", "2",
                           "--report", str(tmp_path / "missing-dir" / "r.html"))
    assert code == 1 and "no writable directory" in summary["error"]
    assert (tmp_path / "report.html").read_text() == "old"


@pytest.mark.parametrize("spelling", ["{table}", "{table}/", "file:{table}", "{parent}/./points.parquet"])
def test_predictions_out_naming_the_input_is_refused_before_writing(spark, capsys, table, spelling):
    before = sorted(os.listdir(table))
    out = spelling.format(table=table, parent=os.path.dirname(table))
    code, summary, _ = run(capsys, "fit", "--input", table, "--features", "x,y", "--k", "2",
                           "--predictions-out", out, "--mode", "overwrite")
    assert code == 1 and "are the same location" in summary["error"]
    assert sorted(os.listdir(table)) == before and spark.read.parquet(table).count() == 400
    assert hidden(os.path.dirname(table)) == []


def test_outputs_overlapping_inputs_or_each_other_are_refused(spark, capsys, table, tmp_path):
    common = ["fit", "--input", table, "--features", "x,y", "--k", "2", "--mode", "overwrite"]
    code, summary, _ = run(capsys, *common, "--predictions-out", f"{table}/scored")
    assert code == 1 and "overlap (one lies inside the other)" in summary["error"]
    code, summary, _ = run(capsys, *common, "--model-out", str(tmp_path / "m"),
                           "--predictions-out", str(tmp_path / "m" / "p"))
    assert code == 1 and "--model-out" in summary["error"] and "--predictions-out" in summary["error"]
    spark.read.parquet(table).write.mode("overwrite").saveAsTable("edges_in")
    code, summary, _ = run(capsys, "fit", "--input", "edges_in", "--features", "x,y", "--k", "2",
                           "--predictions-out", "default.EDGES_IN", "--mode", "overwrite")
    assert code == 1 and "are the same location" in summary["error"]
    assert spark.table("edges_in").count() == 400


def test_a_leftover_table_directory_is_reported_before_the_fit(spark, capsys, table):
    """saveAsTable refuses to create a managed table over an existing directory, after the fit."""
    location = spark.conf.get("spark.sql.warehouse.dir").removeprefix("file:") + "/leftover_t"
    os.makedirs(location)
    code, summary, err = run(capsys, "fit", "--input", table, "--features", "x,y", "--k", "2",
                             "--predictions-out", "leftover_t", "--mode", "overwrite")
    assert code == 1 and summary["error"].startswith("table 'leftover_t' does not exist but its location")
    assert "iteration 0" not in err


# -- failed writes ----------------------------------------------------------------------------------


def test_a_failed_predictions_write_leaves_no_staging(spark, capsys, table, tmp_path, monkeypatch):
    from pyspark.sql.readwriter import DataFrameWriter

    original = DataFrameWriter.save

    def save_then_fail(self, path=None, *args, **kwargs):
        original(self, path, *args, **kwargs)  # the staging directory is complete, then the job dies
        raise RuntimeError("simulated failure after the write")

    monkeypatch.setattr(DataFrameWriter, "save", save_then_fail)
    code, summary, _ = run(capsys, "fit", "--input", table, "--features", "x,y", "--k", "2",
                           "--predictions-out", str(tmp_path / "p"))
    assert code == 1 and "simulated failure" in summary["error"]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("rollback_works", [True, False])
def test_a_failed_rename_rolls_back_and_says_where_the_old_output_is(spark, capsys, table, tmp_path, monkeypatch,
                                                                     rollback_works):
    target = tmp_path / "p"
    spark.createDataFrame([(1,)], "old int").write.parquet(str(target))
    real = storage.rename

    def rename(fs, source, destination):
        moving_new_in = source.getName().startswith(".p.spark-gmm-") and "old-" not in source.getName()
        moving_old_back = "old-" in source.getName()
        if moving_new_in or (moving_old_back and not rollback_works):
            return False
        return real(fs, source, destination)

    monkeypatch.setattr(storage, "rename", rename)
    code, summary, _ = run(capsys, "fit", "--input", table, "--features", "x,y", "--k", "2",
                           "--predictions-out", str(target), "--mode", "overwrite")
    assert code == 1
    if rollback_works:
        assert summary["error"] == f"cannot move the new predictions into '{target}'; the old ones are back in place"
        assert spark.read.parquet(str(target)).columns == ["old"]
        assert hidden(tmp_path) == []
    else:
        old = hidden(tmp_path)
        assert len(old) == 1 and old[0].startswith(".p.spark-gmm-old-")  # kept: the only copy
        assert summary["error"].endswith(f"nor the old ones back: they are in 'file:{tmp_path / old[0]}'")
        assert spark.read.parquet(str(tmp_path / old[0])).columns == ["old"]
