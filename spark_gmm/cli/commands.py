"""The commands (fit, select, score, report) and `main`, which runs one and prints its summary."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
import time
import traceback
import warnings

from spark_gmm.exceptions import ExecutorEnvironmentError
from spark_gmm.inputs import named_column, require_executor_python

from . import mixed
from .arguments import COMMANDS, output_kind, parse_args
from .columns import check_output_columns, is_mixed, resolve_features, saved_model_on
from .errors import JobError, UsageError, short_message
from .logs import job_logging, error_stream, job_session, log_warning
from .recurring import DRIFT_EXIT_CODE, align, log_to_mlflow, previous_models
from .storage import check_outputs, read_input, write_local_file, write_predictions

log = logging.getLogger("spark_gmm.job")


# -- fit and select ------------------------------------------------------------------------------


def run_fit(spark, args) -> dict:
    """Fit k components; save, score and report as asked."""
    def fit(estimator, df):
        if args.mixed or estimator.getInitialModel() is None:
            estimator.setK(args.k)
        return estimator.setCovarianceType(args.covariance_type).fit(df), {}

    return _fit_and_write(spark, args, fit)


def run_select(spark, args) -> dict:
    """Fit every candidate (k, covariance type), keep the lowest criterion; save, score and report it."""
    from spark_gmm import GaussianMixtureSelection

    def select(estimator, df):
        selection = GaussianMixtureSelection(
            estimator, kValues=args.k_values, covarianceTypes=args.covariance_types, criterion=args.criterion,
        ).fit(df)
        for row in selection.candidateRows:
            log.info("candidate k=%d %s: %s %.10g, %d iterations%s", row["k"], row["covarianceType"],
                     args.criterion, row[args.criterion], row["iterations"], " (chosen)" if row["chosen"] else "")
        return selection.bestModel, {"criterion": args.criterion, "candidates": selection.candidateRows}

    return _fit_and_write(spark, args, select)


def _fit_and_write(spark, args, fit) -> dict:
    """Read the input, run `fit(estimator, df) -> (model, extra summary fields)`, write the outputs."""
    from pyspark.errors import PySparkException

    from spark_gmm import GaussianMixture, InvalidInputError

    df, kind = read_input(spark, args.input, args.format)
    check_output_columns(args, df.columns)
    if args.mixed:
        estimator, by_kind = mixed.estimator(args, df)
        names = [name for columns in by_kind.values() for name in columns]
        log.info("input %s '%s': %s", kind, args.input, "; ".join(f"{t} {', '.join(c)}" for t, c in by_kind.items()))
    else:
        names, by_kind = args.features, {}
        log.info("input %s '%s': features %s", kind, args.input, ", ".join(names))
        estimator = GaussianMixture(
            maxIter=args.max_iter, tol=args.tol, seed=args.seed, weightCol=args.weight_col, regCovar=args.reg_covar,
            initMode=args.init_mode, nInit=args.n_init, handleInvalid=args.handle_invalid, engine=args.engine,
            dtype=args.dtype, reseedComponents=args.reseed_components, checkpointDir=getattr(args, "checkpoint_dir", None),
            checkpointInterval=getattr(args, "checkpoint_interval", None), **resolve_features(df, names),
        )
    initial, previous, recurring = previous_models(spark, args)
    if initial is not None:
        estimator.setInitialModel(initial)
    began = time.perf_counter()
    try:
        model, extra = fit(estimator, df)
    except (InvalidInputError, ValueError, FloatingPointError) as error:
        raise JobError(short_message(error)) from None
    fit_seconds = time.perf_counter() - began
    if previous is not None:
        model, drift = align(model, previous, df, args)
        recurring.update(drift)
    summary = model.summary
    if args.model_out:
        try:
            writer = model.write()
            (writer.overwrite() if args.mode == "overwrite" else writer).save(args.model_out)
        except (FileExistsError, PySparkException) as error:
            raise JobError(f"cannot save the model to '{args.model_out}': {short_message(error)}") from None
        log.info("model saved to %s", args.model_out)
    if args.predictions_out:
        _write(spark, _scored(model, df, args), args)
    if args.report:
        _write_report(args.report, model, df, {"input": args.input, "fit seconds": round(fit_seconds, 2)},
                      extra.get("candidates"), getattr(args, "criterion", "bic"))
    fields = {
        "k": model.getK(),
        "iterations": summary.numIter,
        "converged": summary.converged,
        "logLikelihood": summary.logLikelihood,
        "resumedFromIteration": summary.resumedFromIteration,
        **({"featureTypes": by_kind, "invalidRowsSkipped": summary.invalidRowsSkipped} if args.mixed else {}),
        "modelPath": args.model_out,
        "predictionsPath": args.predictions_out,
        "rows": int(sum(summary.clusterSizes)),
        "features": names,
        "clusterSizes": summary.clusterSizes,
        "weights": model.weights,
        "covarianceType": model.getCovarianceType(),
        "fitSeconds": round(fit_seconds, 3),
        "reportPath": args.report,
        **recurring,
        **extra,
    }
    if args.mlflow_experiment:
        fields["mlflowRunId"] = log_to_mlflow(args, model, fields)
    return fields


# -- score and report ----------------------------------------------------------------------------


def run_score(spark, args) -> dict:
    """Write every input row with its prediction; the summary gives figures of the rows scored."""
    model, df, kind = saved_model_on(spark, args)
    check_output_columns(args, df.columns)
    log.info("scoring input %s '%s' with %s (k=%d)", kind, args.input, args.model, model.getK())
    scored = _scored(model, df, args)
    _write(spark, scored, args)
    return {
        "k": model.getK(),
        "modelPath": args.model,
        "predictionsPath": args.predictions_out,
        "features": mixed.model_columns(model) if is_mixed(model) else
        model.getInputCols() if model.isDefined(model.inputCols) else [model.getFeaturesCol()],
        **_scoring_figures(spark, args, scored, model.getK()),
    }


def run_report(spark, args) -> dict:
    """The HTML report of a saved model on an input."""
    model, df, _ = saved_model_on(spark, args)
    _write_report(args.report, model, df, {"input": args.input, "model": args.model})
    return {"k": model.getK(), "modelPath": args.model, "reportPath": args.report}


def _scored(model, df, args):
    """The input rows plus the prediction (and optionally probabilities, as array<double>, and log
    density)."""
    model = model.copy()
    # An empty name: no column (and a Gaussian model computes no probabilities).
    model.setPredictionCol(args.prediction_col).setProbabilityCol(args.probability_col or "")
    model.setProbabilityFormat("array")
    if is_mixed(model):
        model.setLogDensityCol(args.log_likelihood_col or "")
    elif args.log_likelihood_col:
        model.setLogLikelihoodCol(args.log_likelihood_col)
    else:
        model.clear(model.logLikelihoodCol)
    return model.transform(df)


def _write(spark, predictions, args) -> None:
    from pyspark.errors import PySparkException

    try:
        write_predictions(spark, predictions, args)
    except PySparkException as error:  # the location or table cannot be written, said in one line
        raise JobError(f"cannot write predictions to '{args.predictions_out}': {short_message(error)}") from None
    log.info("predictions written to %s (mode %s)", args.predictions_out, args.mode)


def _scoring_figures(spark, args, scored, k: int) -> dict:
    """Rows scored and left unscored, rows per component and the mean log density per row, from one
    small aggregation over the predictions just written (with --mode append the output holds earlier
    rows too, so over the scored input instead, which costs a second scoring pass)."""
    from pyspark.sql import functions as F

    if args.mode == "append":
        source = scored
    elif output_kind(args.predictions_out) == "table":
        source = spark.table(args.predictions_out)
    else:
        source = spark.read.format(args.output_format).load(args.predictions_out)
    sums = [F.sum(named_column(args.log_likelihood_col)).alias("ll")] if args.log_likelihood_col else []
    groups = source.groupBy(named_column(args.prediction_col).alias("component")).agg(
        F.count(F.lit(1)).alias("rows"), *sums
    ).collect()
    sizes, unscored, total = [0] * k, 0, 0.0
    for row in groups:
        if row["component"] is None:
            unscored += row["rows"]
        else:
            sizes[row["component"]] = row["rows"]
            total += row["ll"] if sums else 0.0
    figures = {"rowsScored": sum(sizes), "rowsUnscored": unscored, "clusterSizes": sizes}
    if sums:
        figures["meanLogLikelihood"] = total / sum(sizes) if sum(sizes) else None
    return figures


def _write_report(path, model, df, run, selection=None, criterion="bic") -> None:
    from spark_gmm.report import render_report

    try:
        write_local_file(path, render_report(model, df, selection=selection, criterion=criterion, run=run))
    except OSError as error:
        raise JobError(f"cannot write the report to '{path}': {error.strerror}") from None
    log.info("report written to %s", path)


def _check_optional_dependencies(args) -> None:
    if getattr(args, "mlflow_experiment", None):
        try:
            import mlflow  # noqa: F401
        except ImportError as error:
            raise JobError(f"--mlflow-experiment needs MLflow ({error}); pip install 'spark-gmm[mlflow]'") from None
    if getattr(args, "report", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError as error:
            raise JobError(f"the report needs matplotlib ({error}); pip install 'spark-gmm[report]'") from None


# -- main ----------------------------------------------------------------------------------------

_RUN = {"fit": run_fit, "select": run_select, "score": run_score, "report": run_report}


def _overview(prog: str) -> str:
    commands = "\n".join(
        textwrap.fill(text, 100, initial_indent=f"  {name:<8}", subsequent_indent=" " * 10)
        for name, text in COMMANDS.items()
    )
    return (
        f"usage: {prog} {{{','.join(COMMANDS)}}} [--help] [flags]\n\n"
        "Gaussian-mixture clustering by distributed EM on Spark, as batch jobs.\n\n"
        f"commands:\n{commands}\n\n"
        f"'{prog} COMMAND --help' lists the command's flags. Flags can also come from --config FILE "
        "(TOML).\nThe last stdout line is a JSON summary. Exit code 0: done; 1: the job cannot run; "
        "2: a bad flag or config; 3: fit or select done, but the drift exceeded --max-drift."
    )


def _emit(fields: dict, began: float) -> None:
    fields["seconds"] = round(time.perf_counter() - began, 3)
    sys.stdout.flush()
    print(json.dumps(fields), flush=True)


def main(argv=None, prog: str | None = None) -> int:
    """`spark-gmm COMMAND [flags]` with argv = [COMMAND, flags...] (default sys.argv[1:]); returns
    the exit code."""
    began = time.perf_counter()
    stderr = error_stream()
    argv = list(sys.argv[1:] if argv is None else argv)
    command, prog = (argv[0] if argv else None), prog or "spark-gmm"
    try:
        if command in ("-h", "--help"):
            print(_overview(prog))
            return 0
        if command not in COMMANDS:
            raise UsageError(f"the first argument must be a command: {', '.join(COMMANDS)} (see {prog} --help)")
        args = parse_args(command, argv[1:], f"{prog} {command}")
    except UsageError as error:
        message = " ".join(str(error).split())
        print(f"error: {message}", file=stderr, flush=True)
        _emit({"status": "error", "command": command, "error": message}, began)
        return 2
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0

    with job_logging(args.log_level, stderr):
        for note in args.notes:
            log.warning(note)
        spark = created = None
        code, fields = 1, {"command": command}
        with warnings.catch_warnings():
            warnings.showwarning = log_warning
            try:
                spark, created = job_session(f"spark-gmm {command}")
                check_outputs(spark, args)  # before the input is read: a clash costs seconds, not a fit
                require_executor_python(spark)
                _check_optional_dependencies(args)
                fields = {"status": "ok", "command": command, **_RUN[command](spark, args)}
                code = 0
                if fields.get("driftExceeded"):
                    code, fields["status"] = DRIFT_EXIT_CODE, "drift"
            except (JobError, UsageError, ExecutorEnvironmentError) as error:
                code = 2 if isinstance(error, UsageError) else 1
                fields = {"status": "error", "command": command, "error": " ".join(str(error).split())}
            except KeyboardInterrupt:
                code, fields = 130, {"status": "error", "command": command, "error": "interrupted"}
            except Exception as error:  # a bug or a cluster failure: keep the trace for whoever debugs it
                traceback.print_exc(file=stderr)
                fields = {"status": "error", "command": command, "error": f"{type(error).__name__}: {short_message(error)}"}
            finally:
                if spark is not None and created:
                    try:
                        spark.stop()
                    except Exception:  # noqa: BLE001 - the job's outcome is already decided
                        pass
    if code == DRIFT_EXIT_CODE:
        print(f"drift: {'; '.join(fields['driftExceeded'])}", file=stderr, flush=True)
    elif code != 0:
        print(f"error: {fields['error']}", file=stderr, flush=True)
    _emit(fields, began)
    return code
