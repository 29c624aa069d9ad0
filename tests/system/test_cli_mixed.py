"""`spark-gmm fit` over typed columns (a MixedMixture), in-process: the flags and their refusals
(no Spark needed), type inference over an input (one bounded survey pass), and a fit with missing
values kept, scored and reported through the commands. tests/system/test_job.py runs it under
spark-submit."""

import json
import logging

import numpy as np
import pandas as pd
import pytest

from spark_gmm import MixedMixtureModel
from spark_gmm.cli import JobError, UsageError, main, parse_args
from spark_gmm.cli.mixed import INTEGER_LEVELS, infer_types

pytestmark = pytest.mark.slow


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


# -- flags and config, without Spark --------------------------------------------------------------


def test_typed_flags_and_config_keys_make_a_mixed_fit(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text('input = "t"\n[fit]\nk = 3\ngaussian-cols = ["x", "y"]\ncategorical_cols = "plan"\n'
                      'handle-invalid = "keep"\nmax-levels = 50\n')
    args = parse_args("fit", ["--config", str(config), "--bernoulli-cols", "flag", "--infer-types", "a,b"])
    assert args.mixed and args.features is None
    assert (args.gaussian_cols, args.bernoulli_cols, args.categorical_cols, args.poisson_cols) == (
        ["x", "y"], ["flag"], ["plan"], None)
    assert (args.infer_types, args.handle_invalid, args.max_levels, args.k) == (["a", "b"], "keep", 50, 3)
    assert not parse_args("fit", ["--input", "t", "--features", "x", "--k", "2"]).mixed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--features", "x"], "--features is for a Gaussian mixture fit, not a mixed one"),
        (["--dtype", "float32"], "--dtype is for a Gaussian mixture fit"),
        (["--init-mode", "random"], "--init-mode is for a Gaussian mixture fit"),
        (["--align-to", "m"], "--align-to is for a Gaussian mixture fit"),
        (["--bernoulli-cols", "x"], "column 'x' is in both --gaussian-cols and --bernoulli-cols"),
        (["--infer-types", "z,x"], "column 'x' is in both --gaussian-cols and --infer-types"),
        (["--max-levels", "1"], "argument --max-levels: expected an integer >= 2, got '1'"),
    ],
)
def test_bad_combinations_exit_2_with_one_line(capsys, extra, message):
    code, summary, err = run(capsys, "fit", "--input", "t", "--k", "2", "--gaussian-cols", "x", *extra)
    assert code == 2 and summary["status"] == "error" and summary["error"].startswith(message)
    assert err.splitlines() == [f"error: {summary['error']}"]  # one line, no traceback


def test_a_mixed_fit_still_needs_k_and_max_levels_needs_a_mixed_fit(capsys):
    code, summary, _ = run(capsys, "fit", "--input", "t", "--gaussian-cols", "x")
    assert code == 2 and summary["error"] == "missing required argument: --k"
    code, summary, _ = run(capsys, "fit", "--input", "t", "--features", "x", "--k", "2", "--max-levels", "9")
    assert code == 2 and summary["error"].startswith("--max-levels applies to a mixed fit only")
    code, summary, _ = run(capsys, "fit", "--input", "t", "--k", "2")
    assert code == 2 and summary["error"] == "missing required argument: --features"


# -- type inference ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def typed_frame(spark):
    rng = np.random.default_rng(4)
    n = 600
    frame = pd.DataFrame({
        "flag": rng.random(n) < 0.3,                                   # boolean
        "plan": rng.choice(["free", "pro", "team"], n),                # string
        "two": np.where(rng.random(n) < 0.5, 3.5, -1.0),              # double, two values
        "yes_no": rng.integers(0, 2, n) * 7,                           # integer, two values (0, 7)
        "levels20": np.arange(n) % INTEGER_LEVELS,                     # integer, 20 values: categorical
        "levels21": np.arange(n) % (INTEGER_LEVELS + 1),               # integer, 21 values: gaussian
        "x": rng.normal(size=n),                                       # double: gaussian
        "three": (np.arange(n) % 3).astype(float),                     # double, 3 values: gaussian
    })
    frame.loc[::7, "two"] = np.nan  # missing values are not values
    df = spark.createDataFrame(frame).repartition(3)
    return df.selectExpr("*", "cast(null as double) as empty", "current_timestamp() as seen")


def test_types_are_inferred_from_distinct_values_in_one_log_line(typed_frame, caplog):
    columns = ["flag", "plan", "two", "yes_no", "levels20", "levels21", "x", "three"]
    with caplog.at_level(logging.INFO, logger="spark_gmm.job"):
        inferred = infer_types(typed_frame, columns, max_levels=1000)
    assert inferred == {"gaussian": ["levels21", "x", "three"], "bernoulli": ["flag", "two", "yes_no"],
                        "categorical": ["plan", "levels20"], "poisson": []}
    lines = [r.getMessage() for r in caplog.records if r.name == "spark_gmm.job"]
    assert lines == ["inferred types: gaussian levels21, x, three; bernoulli flag, two, yes_no; "
                     "categorical plan, levels20"]
    # --max-levels bounds the integer levels too: 20 values are then too many for a category.
    assert infer_types(typed_frame, ["levels20"], max_levels=5)["gaussian"] == ["levels20"]


@pytest.mark.parametrize(
    "column, message",
    [
        ("seen", "--infer-types column 'seen' has type timestamp; only boolean, string and numeric"),
        ("empty", "--infer-types column 'empty' (double) has no value (all null or NaN)"),
        ("nope", "--infer-types column 'nope' not found in the input; available columns: flag, plan"),
    ],
)
def test_a_column_that_cannot_be_typed_is_refused_by_name(typed_frame, column, message):
    with pytest.raises(JobError) as refused:
        infer_types(typed_frame, ["x", column], max_levels=1000)
    assert str(refused.value).splitlines()[0].startswith(message)


# -- fit, score and report through the commands ------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_table(spark, tmp_path_factory):
    rng = np.random.default_rng(9)
    n = 400
    labels = rng.integers(0, 2, n)
    frame = pd.DataFrame({
        "id": np.arange(n), "x": rng.normal(size=n) + 5.0 * labels,
        "member": rng.random(n) < np.where(labels == 1, 0.9, 0.1),
        "plan": np.where(rng.random(n) < 0.85, np.where(labels == 1, "pro", "free"), "team"),
        "visits": rng.poisson(np.where(labels == 1, 6.0, 1.0)), "label": labels,
    }).astype({"x": object, "plan": object})
    frame.loc[::10, "x"] = None  # missing values, kept and marginalised
    frame.loc[5::10, "plan"] = None
    path = str(tmp_path_factory.mktemp("mixed") / "people.parquet")
    spark.createDataFrame(frame, "id long, x double, member boolean, plan string, visits long, label long") \
        .write.parquet(path)
    return path


def test_inferred_fit_with_missing_values_scored_and_reported(spark, mixed_table, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model_dir, report = str(tmp_path / "model"), tmp_path / "report.html"
    code, summary, err = run(capsys, "fit", "--input", mixed_table, "--k", "2", "--infer-types", "x,member,plan",
                             "--poisson-cols", "visits", "--handle-invalid", "keep", "--max-iter", "30",
                             "--model-out", model_dir, "--report", str(report),
                             "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-interval", "1")
    assert code == 0, summary
    assert summary["featureTypes"] == {"gaussian": ["x"], "bernoulli": ["member"], "categorical": ["plan"],
                                       "poisson": ["visits"]}
    assert summary["rows"] == 400 and summary["invalidRowsSkipped"] == 0 and summary["resumedFromIteration"] == 0
    assert (tmp_path / "ckpt" / "slot-0" / "state" / "_SUCCESS").exists()  # checkpoints as for a Gaussian fit
    assert "inferred types: gaussian x; bernoulli member; categorical plan" in err
    page = report.read_text()
    assert page.count("<img") == 4
    assert "Heat map" in page and "Stacked bar charts" in page and "rate visits" in page

    df = spark.read.parquet(mixed_table)
    scored = str(tmp_path / "scored")
    code, summary, _ = run(capsys, "score", "--model", model_dir, "--input", mixed_table,
                           "--predictions-out", scored, "--probability-col", "p", "--log-likelihood-col", "ll")
    assert code == 0, summary
    out = spark.read.parquet(scored)
    assert out.columns == df.columns + ["prediction", "p", "ll"]
    assert dict(out.dtypes)["p"] == "array<double>"
    model = MixedMixtureModel.load(model_dir)
    expected = model.transform(df).select("id", "prediction", "logDensity").toPandas().sort_values("id")
    got = out.select("id", "prediction", "ll").toPandas().sort_values("id")
    assert got["prediction"].tolist() == expected["prediction"].tolist()
    np.testing.assert_allclose(got["ll"], expected["logDensity"], rtol=1e-12)
    assert summary["features"] == ["x", "member", "plan", "visits"] and summary["rowsScored"] == 400
    assert summary["meanLogLikelihood"] == pytest.approx(model.score(df), rel=1e-12)
    labels = df.select("id", "label").toPandas().sort_values("id")["label"].to_numpy()
    agreement = np.mean(got["prediction"].to_numpy() == labels)
    assert max(agreement, 1 - agreement) > 0.95  # the two classes are found

    code, summary, _ = run(capsys, "score", "--model", model_dir, "--input", mixed_table, "--features", "x,plan",
                           "--predictions-out", str(tmp_path / "other"))
    assert code == 1 and summary["error"].startswith("the model is a mixed model over x, member, plan, visits; "
                                                     "--features x, plan names other columns")


def test_an_unknown_typed_column_fails_the_job_in_one_line(mixed_table, capsys):
    code, summary, err = run(capsys, "fit", "--input", mixed_table, "--k", "2", "--gaussian-cols", "x,height")
    assert code == 1 and summary["error"].startswith("gaussian column 'height' not found; available columns: id, x")
    assert err.splitlines()[-1] == f"error: {summary['error']}" and "Traceback" not in err
