#!/usr/bin/env python3
"""Fit a Gaussian mixture to a table or Parquet data set with spark_gmm: a spark-submit entry point.

    spark-submit jobs/fit_gmm.py --input PATH_OR_TABLE --features a,b,c --k 3 \\
        [--format parquet] [--max-iter 100] [--tol 0.001] [--seed N] [--weight-col w] \\
        [--model-out DIR] [--predictions-out PATH] [--mode errorifexists|overwrite|append]

`--input` is read as a path with `--format` when it exists; otherwise, if it looks like a table name
(`table`, `db.table` or `catalog.db.table`), with `spark.table`. `--features` is either
comma-separated numeric columns or the name of one vector or numeric-array column.

Progress goes to stderr through Python logging (the `spark_gmm` logger: one line per EM
iteration); under spark-submit that is the driver JVM's stderr (see `error_stream`). The last line on stdout is one JSON object: `status`, `k`, `iterations`, `converged`,
`logLikelihood`, `modelPath`, `predictionsPath`, `seconds`, plus `rows`, `features`,
`clusterSizes`, `weights` and `fitSeconds`. Exit code 0 on success; 2 for a bad argument; 1 when
the job cannot run (missing input or column, an output that exists, input that cannot be fitted),
after one `error: ...` line on stderr (and `{"status": "error", ...}` on stdout).

All logic lives in `main(argv=None) -> int` and the functions it calls, so a console script can
reuse it as is.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings

log = logging.getLogger("spark_gmm.job")

MODES = ("errorifexists", "overwrite", "append")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_IDENT = r"(?:`[^`]+`|[A-Za-z_][A-Za-z0-9_]*)"
_TABLE_NAME = re.compile(rf"^{_IDENT}(?:\.{_IDENT}){{0,2}}$")
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_GLOB = re.compile(r"[*?\[{]")


class UsageError(Exception):
    """A bad command-line argument (exit code 2)."""


class JobError(Exception):
    """The job cannot run as asked: missing input, column or an existing output (exit code 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line
        raise UsageError(message)


def _bounded(kind, minimum, what):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not value >= minimum:  # also rejects NaN
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
        return value

    return convert


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Fit a Gaussian mixture model with spark_gmm (distributed EM) and optionally "
        "save the model and the per-row predictions.",
        epilog="The last stdout line is a JSON summary; progress is logged to stderr.",
    )
    data = parser.add_argument_group("input")
    data.add_argument("--input", required=True, metavar="PATH_OR_TABLE",
                      help="data set path (read with --format) or table name (read with spark.table)")
    data.add_argument("--format", default="parquet",
                      help="format of a path input, as for spark.read.format (default: parquet)")
    data.add_argument("--features", required=True, metavar="COLS",
                      help="comma-separated numeric columns, or one vector / numeric-array column")
    data.add_argument("--weight-col", metavar="COL", help="numeric column of non-negative row weights")
    data.add_argument("--handle-invalid", choices=("error", "skip"), default="error",
                      help="rows with null/NaN/infinite features or bad weights: fail (default) or skip")

    fit = parser.add_argument_group("model")
    fit.add_argument("--k", required=True, type=_bounded(int, 1, "an integer >= 1"),
                     help="number of mixture components")
    fit.add_argument("--max-iter", type=_bounded(int, 0, "an integer >= 0"), default=100,
                     help="maximum EM iterations (default: 100)")
    fit.add_argument("--tol", type=_bounded(float, 0.0, "a number >= 0"), default=1e-3,
                     help="stop when the mean log-likelihood per row changes by less (default: 0.001)")
    fit.add_argument("--seed", type=_bounded(int, -(2**63), "an integer"),
                     help="random seed of the initialisation (default: a fixed seed)")
    fit.add_argument("--reg-covar", type=_bounded(float, 0.0, "a number >= 0"), default=1e-6,
                     help="added to each covariance diagonal (default: 1e-6)")
    fit.add_argument("--init-mode", choices=("k-means||", "random"), default="k-means||",
                     help="initialisation (default: k-means||)")
    fit.add_argument("--engine", choices=("driver", "barrier"),
                     help="spark_gmm engine: one Spark job per pass (driver, the library default) or "
                     "the whole fit in one barrier stage (barrier)")

    out = parser.add_argument_group("output")
    out.add_argument("--model-out", metavar="DIR", help="save the fitted model to this directory")
    out.add_argument("--predictions-out", metavar="PATH",
                     help="write the input rows plus prediction and probability here (Parquet)")
    out.add_argument("--mode", choices=MODES, default="errorifexists",
                     help="when an output exists: fail (default), overwrite, or append (predictions "
                     "only; an existing model directory is replaced only with overwrite)")
    out.add_argument("--prediction-col", default="prediction", metavar="COL",
                     help="name of the predicted component column (default: prediction)")
    out.add_argument("--probability-col", default="probability", metavar="COL",
                     help="name of the array<double> of component probabilities (default: probability)")
    out.add_argument("--log-likelihood-col", metavar="COL",
                     help="also write each row's log density log p(x) in this column")
    out.add_argument("--log-level", choices=LOG_LEVELS, default="INFO", type=str.upper,
                     help="level of the spark_gmm logger on stderr (default: INFO)")
    return parser


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    names = [name.strip() for name in args.features.split(",")]
    if not all(names):
        raise UsageError(f"argument --features: empty column name in '{args.features}'")
    if len(set(names)) != len(names):
        raise UsageError(f"argument --features: a column is named twice in '{args.features}'")
    args.feature_names = names
    outputs = [args.prediction_col, args.probability_col] + (
        [args.log_likelihood_col] if args.log_likelihood_col else []
    )
    if not all(o.strip() for o in outputs) or len(set(outputs)) != len(outputs):
        raise UsageError("the prediction, probability and log-likelihood columns need distinct names")
    for flag in ("input", "model_out", "predictions_out", "weight_col"):
        value = getattr(args, flag)
        if value is not None and not value.strip():
            raise UsageError(f"argument --{flag.replace('_', '-')}: must not be empty")
    return args


# -- logging -------------------------------------------------------------------------------------


class _JvmStderr(io.TextIOBase):
    """The driver JVM's System.err, as a Python text stream."""

    def __init__(self, jvm):
        self._err = jvm.java.lang.System.err

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._err.print(text)
        return len(text)

    def flush(self) -> None:
        self._err.flush()


def error_stream():
    """Where logs and errors go: the process's real stderr.

    spark-submit runs this file with the Python process's stderr merged into its stdout (Spark's
    PythonRunner redirects it), so there sys.stderr would land on spark-submit's stdout. When
    launched that way (PYSPARK_GATEWAY_PORT is set) write to the JVM's System.err instead, which
    is spark-submit's stderr; otherwise (plain `python`) to sys.stderr.
    """
    if "PYSPARK_GATEWAY_PORT" in os.environ:
        try:
            from pyspark import SparkContext

            SparkContext._ensure_initialized()  # connects to spark-submit's gateway; no context yet
            return _JvmStderr(SparkContext._jvm)
        except Exception:  # noqa: BLE001 - fall back to the merged stream rather than fail
            pass
    return sys.stderr


def configure_logging(level: str, stream) -> None:
    """Show the `spark_gmm` loggers (the library's EM progress and this job's steps) on `stream`."""
    logger = logging.getLogger("spark_gmm")
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if getattr(h, "_spark_gmm_job", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    handler._spark_gmm_job = True
    logger.addHandler(handler)
    logger.propagate = False


class _IterationCounter(logging.Filter):
    """Counts the library's per-iteration log records (to know whether they reached the driver)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("iteration "):
            self.count += 1
        return True


def _log_warning(message, category, filename, lineno, file=None, line=None):
    """Library warnings (an emptied component, a repaired covariance) as one log line each."""
    log.warning("%s: %s", category.__name__, message)


# -- input ---------------------------------------------------------------------------------------


def _short(error: BaseException) -> str:
    """The first meaningful line of an exception message (Spark's carry JVM stack traces)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("An error occurred while calling"):
        lines = [lines[1].lstrip(": ")]  # py4j: the Java exception is on the next line
    return " ".join(lines[0].split()) if lines else type(error).__name__


def path_exists(spark, path: str) -> bool | None:
    """Whether `path` (or, for a glob, any match) exists, on the file system Spark would use.

    Asks Hadoop's FileSystem through the JVM when there is one (so relative paths resolve against
    the cluster's default file system); otherwise checks local paths. None: cannot tell.
    """
    try:
        jvm = spark.sparkContext._jvm
        hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
        fs = hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
        if _GLOB.search(path):
            matches = fs.globStatus(hadoop_path)
            return matches is not None and len(matches) > 0
        return bool(fs.exists(hadoop_path))
    except Exception:  # Spark Connect (no JVM) or a file system we cannot reach from the driver
        if path.startswith("file:"):
            path = re.sub(r"^file:(//)?", "", path)
        elif _URI_SCHEME.match(path):
            return None
        if _GLOB.search(path):
            import glob

            return bool(glob.glob(path))
        return os.path.exists(path)


def read_input(spark, source: str, fmt: str):
    """(DataFrame, 'path' or 'table'): a path that exists is read as `fmt`, else a table name."""
    from pyspark.errors import AnalysisException

    exists = path_exists(spark, source)
    if exists is False and _TABLE_NAME.match(source):
        try:
            return spark.table(source), "table"
        except AnalysisException:
            raise JobError(f"input '{source}' is neither an existing path nor a table") from None
    if exists is False:
        raise JobError(f"input path '{source}' does not exist")
    try:
        return spark.read.format(fmt).load(source), "path"
    except Exception as error:  # AnalysisException, or a reader failing on the files
        raise JobError(f"cannot read input '{source}' as {fmt}: {_short(error)}") from None


def resolve_features(df, names: list[str]) -> dict:
    """Estimator params for the feature columns: {'inputCols': [...]} or {'featuresCol': name}."""
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import ArrayType, NumericType

    fields = {f.name: f.dataType for f in df.schema.fields}
    missing = [n for n in names if n not in fields]
    if missing:
        what = "column" if len(missing) == 1 else "columns"
        raise JobError(
            f"feature {what} {', '.join(repr(m) for m in missing)} not found in the input; "
            f"available columns: {', '.join(fields) or '(none)'}"
        )
    if len(names) == 1:
        kind = fields[names[0]]
        if isinstance(kind, VectorUDT) or (
            isinstance(kind, ArrayType) and isinstance(kind.elementType, NumericType)
        ):
            return {"featuresCol": names[0]}
        if isinstance(kind, NumericType):
            return {"inputCols": names}
        raise JobError(
            f"feature column '{names[0]}' has type {kind.simpleString()}; --features needs numeric "
            "columns or one vector / numeric-array column"
        )
    wrong = [f"'{n}' ({fields[n].simpleString()})" for n in names if not isinstance(fields[n], NumericType)]
    if wrong:
        raise JobError(f"feature columns must be numeric: {', '.join(wrong)}")
    return {"inputCols": names}


def check_outputs(spark, args, input_columns: list[str]) -> None:
    """Refuse before fitting what would fail after it: existing outputs, clashing column names."""
    if args.model_out and args.mode != "overwrite" and path_exists(spark, args.model_out):
        raise JobError(
            f"model directory '{args.model_out}' already exists; use --mode overwrite to replace it"
        )
    if args.predictions_out:
        if args.mode == "errorifexists" and path_exists(spark, args.predictions_out):
            raise JobError(
                f"predictions path '{args.predictions_out}' already exists; use --mode overwrite "
                "or --mode append"
            )
        added = [args.prediction_col, args.probability_col, args.log_likelihood_col]
        clash = [c for c in added if c and c in input_columns]
        if clash:
            raise JobError(
                f"the input already has a column named '{clash[0]}'; choose another name with "
                "--prediction-col / --probability-col / --log-likelihood-col"
            )


# -- the job -------------------------------------------------------------------------------------


def run(spark, args) -> dict:
    """Read, fit, save; returns the summary fields (without status and seconds)."""
    from pyspark.errors import AnalysisException
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    from spark_gmm import GaussianMixture, InvalidInputError

    df, kind = read_input(spark, args.input, args.format)
    features = resolve_features(df, args.feature_names)
    check_outputs(spark, args, df.columns)
    log.info("input %s '%s': features %s, k=%d", kind, args.input, ", ".join(args.feature_names), args.k)

    estimator = GaussianMixture(
        k=args.k,
        maxIter=args.max_iter,
        tol=args.tol,
        seed=args.seed,
        weightCol=args.weight_col,
        regCovar=args.reg_covar,
        initMode=args.init_mode,
        handleInvalid=args.handle_invalid,
        predictionCol=args.prediction_col,
        probabilityCol=args.probability_col,
        logLikelihoodCol=args.log_likelihood_col,
        **features,
    )
    if args.engine:
        estimator.setEngine(args.engine)
    began = time.perf_counter()
    progress = _IterationCounter()
    library_log = logging.getLogger("spark_gmm")
    library_log.addFilter(progress)
    try:
        model = estimator.fit(df)
    except (InvalidInputError, ValueError, FloatingPointError) as error:
        raise JobError(_short(error)) from None
    finally:
        library_log.removeFilter(progress)
    fit_seconds = time.perf_counter() - began
    summary = model.summary
    if not progress.count:
        # The barrier engine iterates inside a Spark task, whose log stays on the executor: report
        # the history the summary brings back instead.
        for i, value in enumerate(summary.logLikelihoodHistory):
            log.info("iteration %d: log-likelihood %.10g (reported by the barrier stage)", i, value)

    if args.model_out:
        try:
            writer = model.write()
            (writer.overwrite() if args.mode == "overwrite" else writer).save(args.model_out)
        except (FileExistsError, AnalysisException) as error:
            raise JobError(f"cannot save the model to '{args.model_out}': {_short(error)}") from None
        log.info("model saved to %s", args.model_out)

    if args.predictions_out:
        probability = F.col(f"`{args.probability_col}`")
        predictions = model.transform(df).withColumn(
            # vector_to_array fails on null (unscorable rows), so only convert the others.
            args.probability_col,
            F.when(probability.isNotNull(), vector_to_array(probability, "float64")),
        )
        try:
            predictions.write.mode(args.mode).parquet(args.predictions_out)
        except AnalysisException as error:
            raise JobError(
                f"cannot write predictions to '{args.predictions_out}': {_short(error)}"
            ) from None
        log.info("predictions written to %s (mode %s)", args.predictions_out, args.mode)

    return {
        "k": model.getK(),
        "iterations": summary.numIter,
        "converged": summary.converged,
        "logLikelihood": summary.logLikelihood,
        "modelPath": args.model_out,
        "predictionsPath": args.predictions_out,
        "rows": int(sum(summary.clusterSizes)),
        "features": args.feature_names,
        "clusterSizes": summary.clusterSizes,
        "weights": model.weights,
        "fitSeconds": round(fit_seconds, 3),
    }


def _emit(fields: dict, began: float) -> None:
    fields["seconds"] = round(time.perf_counter() - began, 3)
    sys.stdout.flush()
    print(json.dumps(fields), flush=True)


def main(argv=None, prog: str | None = None) -> int:
    """Run the job with command-line arguments `argv` (default sys.argv[1:]); returns the exit code."""
    began = time.perf_counter()
    stderr = error_stream()
    try:
        args = parse_args(argv, prog)
    except UsageError as error:
        message = " ".join(str(error).split())
        print(f"error: {message}", file=stderr, flush=True)
        _emit({"status": "error", "error": message}, began)
        return 2
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0

    configure_logging(args.log_level, stderr)
    spark = created = None
    code, fields = 1, {}
    with warnings.catch_warnings():
        warnings.showwarning = _log_warning
        try:
            from pyspark.sql import SparkSession

            created = SparkSession.getActiveSession() is None
            spark = SparkSession.builder.appName("spark-gmm fit").getOrCreate()
            fields = {"status": "ok", **run(spark, args)}
            code = 0
        except (JobError, UsageError) as error:
            fields = {"status": "error", "error": " ".join(str(error).split())}
        except KeyboardInterrupt:
            code, fields = 130, {"status": "error", "error": "interrupted"}
        except Exception as error:  # a bug or a cluster failure: keep the trace for whoever debugs it
            traceback.print_exc(file=stderr)
            fields = {"status": "error", "error": f"{type(error).__name__}: {_short(error)}"}
        finally:
            if spark is not None and created:
                try:
                    spark.stop()
                except Exception:  # noqa: BLE001 - the job's outcome is already decided
                    pass
    if code != 0:
        print(f"error: {fields['error']}", file=stderr, flush=True)
    _emit(fields, began)
    return code


if __name__ == "__main__":
    sys.exit(main(prog=os.path.basename(sys.argv[0]) or None))
