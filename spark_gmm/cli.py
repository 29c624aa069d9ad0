"""The batch jobs, `spark-gmm fit`, `score` and `select` (also `spark-submit jobs/fit_gmm.py`,
`jobs/score_gmm.py`, `jobs/select_gmm.py`): read a path or a catalog table; fit, score, or choose k
and the covariance type by BIC/AIC; write the model and predictions.

Every flag can also come from a TOML file given with `--config`: top-level keys (the flag names,
`max-iter` or `max_iter`) apply to every command, `[fit]` and `[score]` tables to one; flags on the
command line override the file.

Progress goes to stderr through Python logging (the `spark_gmm` logger: one line per EM
iteration); under spark-submit that is the driver JVM's stderr (see `error_stream`). The last line on
stdout is one JSON object for schedulers: `status`, `command`, `k`, `iterations`, `converged`,
`logLikelihood`, `resumedFromIteration`, `modelPath`, `predictionsPath`, `seconds` and more. Exit
code 0 on success; 2 for a bad argument or config; 1 when the job cannot run (missing input or
column, an output that exists, a model that does not match the features, input that cannot be
fitted), after one `error: ...` line on stderr (and `{"status": "error", ...}` on stdout).
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
import uuid
import warnings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger("spark_gmm.job")

COMMANDS = ("fit", "score", "select", "report")
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


def _columns(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty column name in '{text}'")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a column is named twice in '{text}'")
    return names


def _k_values(text: str) -> list[int]:
    """'2,3,5' or '2-10' (or a mix) → the list of k."""
    values = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            values += list(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected k values like '2,3,5' or '2-10', got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"k values must be integers >= 1, got '{text}'")
    return sorted(set(values))


def _covariance_types(text: str) -> list[str]:
    types = _columns(text)
    unknown = [t for t in types if t not in ("full", "diag", "spherical", "tied")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown covariance type '{unknown[0]}'")
    return types


def build_parser(command: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of `command` ('fit', 'score' or 'select')."""
    fitting = command in ("fit", "select")
    parser = _Parser(
        prog=prog,
        description="Fit a Gaussian mixture with spark_gmm (distributed EM); save the model and the "
        "predictions." if fitting else "Score rows with a saved spark_gmm model.",
        epilog="Flags can also come from --config FILE (TOML). The last stdout line is a JSON "
        "summary; progress is logged to stderr.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file of flag values (flags override it)")
    data = parser.add_argument_group("input")
    data.add_argument("--input", metavar="PATH_OR_TABLE",
                      help="data set path (read with --format) or catalog table name (required)")
    data.add_argument("--format", default="parquet",
                      help="format of a path input: parquet (default), csv, json, orc, delta or any "
                      "Spark source")
    data.add_argument("--features", type=_columns, metavar="COLS",
                      help="comma-separated numeric columns, or one vector / numeric-array column"
                      + (" (required)" if fitting else " (default: the model's)"))
    if fitting:
        data.add_argument("--weight-col", metavar="COL", help="numeric column of non-negative row weights")
        data.add_argument("--handle-invalid", choices=("error", "skip"), default="error",
                          help="rows with null/NaN/infinite features or bad weights: fail (default) or skip")

        fit = parser.add_argument_group("model")
        if command == "fit":
            fit.add_argument("--k", type=_bounded(int, 1, "an integer >= 1"),
                             help="number of mixture components (required)")
            fit.add_argument("--covariance-type", choices=("full", "diag", "spherical", "tied"),
                             default="full", help="covariance structure (default: full)")
        else:
            fit.add_argument("--k-values", type=_k_values, default=list(range(1, 11)), metavar="KS",
                             help="candidate k: '2,3,5' or '2-10' (default: 1-10)")
            fit.add_argument("--covariance-types", type=_covariance_types, default=["full"], metavar="TYPES",
                             help="candidate covariance types, comma-separated (default: full)")
            fit.add_argument("--criterion", choices=("bic", "aic"), default="bic",
                             help="the candidate with the lowest value wins (default: bic)")
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
        fit.add_argument("--engine", choices=("auto", "driver", "barrier"), default="auto",
                         help="auto (default: barrier where Spark can run it, else driver), driver (one "
                         "Spark job per EM pass) or barrier (the data held in one barrier stage's tasks)")
    if command == "fit":
        fit.add_argument("--checkpoint-dir", metavar="DIR",
                         help="checkpoint the EM state here; a rerun with the same arguments resumes "
                         "from the latest checkpoint")
        fit.add_argument("--checkpoint-interval", type=_bounded(int, 1, "an integer >= 1"), default=1,
                         help="iterations between checkpoints (default: 1)")

    out = parser.add_argument_group("output")
    if command == "report":
        out.add_argument("--model", metavar="DIR", help="the saved model to report on (required)")
        out.add_argument("--report", metavar="FILE", help="the HTML file to write (required)")
        out.add_argument("--log-level", choices=LOG_LEVELS, default="INFO", type=str.upper,
                         help="level of the spark_gmm logger on stderr (default: INFO)")
        return parser
    if fitting:
        out.add_argument("--report", metavar="FILE", help="also write an HTML report with pictures "
                         "(needs matplotlib: pip install spark-gmm[report])")
        out.add_argument("--model-out", metavar="DIR", help="save the fitted model to this directory")
    else:
        out.add_argument("--model", metavar="DIR", help="the saved model to score with (required)")
    out.add_argument("--predictions-out", metavar="PATH_OR_TABLE",
                     help="write the input rows plus the prediction here: a path (anything with '/' "
                     "or a scheme) or a catalog table name" + ("" if fitting else " (required)"))
    out.add_argument("--output-format", default="parquet",
                     help="format of the predictions: parquet (default), delta, orc, json, ...")
    out.add_argument("--partition-by", type=_columns, metavar="COLS",
                     help="partition the predictions by these input columns")
    out.add_argument("--mode", choices=MODES, default="errorifexists",
                     help="when an output exists: fail (default), overwrite, or append (predictions "
                     "only; a model directory is replaced only with overwrite)")
    out.add_argument("--prediction-col", default="prediction", metavar="COL",
                     help="name of the predicted component column (default: prediction)")
    out.add_argument("--probability-col", metavar="COL",
                     help="also write the component probabilities (array<double>) in this column")
    out.add_argument("--log-likelihood-col", metavar="COL",
                     help="also write each row's log density log p(x) in this column")
    out.add_argument("--log-level", choices=LOG_LEVELS, default="INFO", type=str.upper,
                     help="level of the spark_gmm logger on stderr (default: INFO)")
    return parser


def _config_argv(path: str, command: str, parser: argparse.ArgumentParser) -> list[str]:
    """The settings of a TOML config file for `command`, as command-line tokens."""
    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except OSError as error:
        raise UsageError(f"config file '{path}': {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"config file '{path}' is not valid TOML: {error}") from None
    known = {c: {o for a in build_parser(c)._actions for o in a.option_strings} for c in COMMANDS}
    settings = {}
    for key, value in config.items():
        if key in COMMANDS:
            if not isinstance(value, dict):
                raise UsageError(f"config file '{path}': [{key}] must be a table")
            continue
        settings[key] = value
    settings.update(config.get(command, {}))
    tokens = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if flag == "--config" or not any(flag in known[c] for c in COMMANDS):
            raise UsageError(f"config file '{path}': unknown setting '{key}'")
        if flag not in known[command]:
            continue  # another command's setting
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool) or isinstance(value, dict):
            raise UsageError(f"config file '{path}': setting '{key}' must be a string, number or list")
        tokens += [flag, str(value)]
    return tokens


def parse_args(command: str, argv: list[str], prog: str | None = None) -> argparse.Namespace:
    parser = build_parser(command, prog)
    config = parser.parse_known_args(argv)[0].config
    args = parser.parse_args((_config_argv(config, command, parser) if config else []) + list(argv))
    args.command = command
    required = {
        "fit": ["input", "features", "k"],
        "select": ["input", "features"],
        "score": ["input", "model", "predictions_out"],
        "report": ["input", "model", "report"],
    }[command]
    missing = [f"--{name.replace('_', '-')}" for name in required if getattr(args, name) is None]
    if missing:
        raise UsageError(f"missing required argument{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    outputs = [getattr(args, n, None) for n in ("prediction_col", "probability_col", "log_likelihood_col")]
    outputs = [o for o in outputs if o is not None]
    if not all(o.strip() for o in outputs) or len(set(outputs)) != len(outputs):
        raise UsageError("the prediction, probability and log-likelihood columns need distinct names")
    for flag in ("input", "model_out", "model", "predictions_out", "weight_col", "checkpoint_dir"):
        value = getattr(args, flag, None)
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
        if isinstance(record.msg, str) and "iteration %d: log-likelihood" in record.msg:
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
    filesystem = _hadoop(spark)
    if filesystem is not None:
        try:
            fs, hadoop_path = filesystem(path)
            if _GLOB.search(path):
                matches = fs.globStatus(hadoop_path)
                return matches is not None and len(matches) > 0
            return bool(fs.exists(hadoop_path))
        except Exception:  # noqa: BLE001 - a file system we cannot reach from the driver
            pass
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


def is_table_name(target: str) -> bool:
    """Outputs: a name without '/' or a scheme is a catalog table; anything else is a path."""
    return "/" not in target and not _URI_SCHEME.match(target) and bool(_TABLE_NAME.match(target))


def output_exists(spark, target: str) -> bool:
    if is_table_name(target):
        return spark.catalog.tableExists(target)
    return bool(path_exists(spark, target))


def check_outputs(spark, args, input_columns: list[str]) -> None:
    """Refuse before the work what would fail after it: existing outputs, clashing column names."""
    model_out = getattr(args, "model_out", None)
    if model_out and args.mode != "overwrite" and path_exists(spark, model_out):
        raise JobError(f"model directory '{model_out}' already exists; use --mode overwrite to replace it")
    if args.predictions_out:
        if args.mode == "errorifexists" and output_exists(spark, args.predictions_out):
            raise JobError(
                f"predictions output '{args.predictions_out}' already exists; use --mode overwrite "
                "or --mode append"
            )
        added = [args.prediction_col, args.probability_col, args.log_likelihood_col]
        clash = [c for c in added if c and c in input_columns]
        if clash:
            raise JobError(
                f"the input already has a column named '{clash[0]}'; choose another name with "
                "--prediction-col / --probability-col / --log-likelihood-col"
            )
        missing = [c for c in args.partition_by or [] if c not in input_columns]
        if missing:
            raise JobError(f"--partition-by column '{missing[0]}' is not in the input")


def _hadoop(spark):
    """(jvm, FileSystem-for-path function), or None under Spark Connect."""
    try:
        jvm, conf = spark.sparkContext._jvm, spark.sparkContext._jsc.hadoopConfiguration()
    except Exception:  # noqa: BLE001 - Spark Connect: no JVM
        return None

    def filesystem(path):
        hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
        return hadoop_path.getFileSystem(conf), hadoop_path

    return filesystem


def write_predictions(spark, predictions, args) -> None:
    """Write to a table (saveAsTable) or a path. A path is written beside the target and renamed
    into place when complete, so a killed job leaves no half-written directory under that name."""
    target, mode = args.predictions_out, "error" if args.mode == "errorifexists" else args.mode
    writer = predictions.write.format(args.output_format)
    if args.partition_by:
        writer = writer.partitionBy(*args.partition_by)
    if is_table_name(target):
        writer.mode(mode).saveAsTable(target)
        return
    filesystem = _hadoop(spark)
    if filesystem is None or args.mode == "append":
        writer.mode(mode).save(target)  # Spark's commit protocol only
        return
    fs, final = filesystem(target)
    name = final.getName()
    staging = final.getParent().suffix(f"/.{name}.spark-gmm-{uuid.uuid4().hex[:12]}")
    writer.mode("error").save(staging.toString())
    if fs.exists(final):
        if args.mode != "overwrite":
            fs.delete(staging, True)
            raise JobError(f"predictions output '{target}' appeared while the job ran")
        old = final.getParent().suffix(f"/.{name}.spark-gmm-old-{uuid.uuid4().hex[:12]}")
        if not fs.rename(final, old):
            raise JobError(f"cannot move the old predictions '{target}' aside")
        if not fs.rename(staging, final):
            fs.rename(old, final)
            raise JobError(f"cannot move the new predictions into '{target}'")
        fs.delete(old, True)
    elif not fs.rename(staging, final):
        raise JobError(f"cannot move the new predictions into '{target}'")


def _scored(model, df, args):
    """The input rows plus the prediction (and optionally probabilities and log density)."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    probability = args.probability_col or "__spark_gmm_probability"
    model = model.copy()
    model.setPredictionCol(args.prediction_col).setProbabilityCol(probability)
    if args.log_likelihood_col:
        model.setLogLikelihoodCol(args.log_likelihood_col)
    else:
        model.clear(model.logLikelihoodCol)
    out = model.transform(df)
    if not args.probability_col:
        return out.drop(probability)
    column = F.col(f"`{probability}`")
    # vector_to_array fails on null (unscorable rows), so only convert the others.
    return out.withColumn(probability, F.when(column.isNotNull(), vector_to_array(column, "float64")))


def run_fit(spark, args) -> dict:
    """Read, fit, save; returns the summary fields (without status and seconds)."""
    from pyspark.errors import AnalysisException

    from spark_gmm import GaussianMixture, GaussianMixtureSelection, InvalidInputError

    df, kind = read_input(spark, args.input, args.format)
    features = resolve_features(df, args.features)
    check_outputs(spark, args, df.columns)
    log.info("input %s '%s': features %s", kind, args.input, ", ".join(args.features))

    estimator = GaussianMixture(
        maxIter=args.max_iter,
        tol=args.tol,
        seed=args.seed,
        weightCol=args.weight_col,
        regCovar=args.reg_covar,
        initMode=args.init_mode,
        handleInvalid=args.handle_invalid,
        engine=args.engine,
        checkpointDir=getattr(args, "checkpoint_dir", None),
        checkpointInterval=getattr(args, "checkpoint_interval", 1),
        **features,
    )
    extra = {}
    began = time.perf_counter()
    progress = _IterationCounter()
    library_log = logging.getLogger("spark_gmm")
    library_log.addFilter(progress)
    try:
        if args.command == "fit":
            model = estimator.setK(args.k).setCovarianceType(args.covariance_type).fit(df)
        else:
            selection = GaussianMixtureSelection(
                estimator, kValues=args.k_values, covarianceTypes=args.covariance_types,
                criterion=args.criterion,
            ).fit(df)
            model = selection.bestModel
            extra = {"criterion": args.criterion, "candidates": selection.candidateRows}
            for row in selection.candidateRows:
                log.info(
                    "candidate k=%d %s: %s %.10g, %d iterations%s", row["k"], row["covarianceType"],
                    args.criterion, row[args.criterion], row["iterations"], " (chosen)" if row["chosen"] else "",
                )
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
        _write(spark, _scored(model, df, args), args)
    if args.report:
        _report(args.report, model, df, extra.get("candidates"), getattr(args, "criterion", "bic"),
                {"input": args.input, "fit seconds": round(fit_seconds, 2)})

    return {
        "k": model.getK(),
        "iterations": summary.numIter,
        "converged": summary.converged,
        "logLikelihood": summary.logLikelihood,
        "resumedFromIteration": summary.resumedFromIteration,
        "modelPath": args.model_out,
        "predictionsPath": args.predictions_out,
        "rows": int(sum(summary.clusterSizes)),
        "features": args.features,
        "clusterSizes": summary.clusterSizes,
        "weights": model.weights,
        "covarianceType": model.getCovarianceType(),
        "fitSeconds": round(fit_seconds, 3),
        "reportPath": args.report,
        **extra,
    }


def _write(spark, predictions, args) -> None:
    from pyspark.errors import AnalysisException

    try:
        write_predictions(spark, predictions, args)
    except AnalysisException as error:
        raise JobError(f"cannot write predictions to '{args.predictions_out}': {_short(error)}") from None
    log.info("predictions written to %s (mode %s)", args.predictions_out, args.mode)


def model_features(model, df, names: list[str] | None) -> dict:
    """Estimator-style feature params for scoring `df` with `model`, checked against the model."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import functions as F

    if names is None:  # the columns the model was fitted on
        names = model.getInputCols() if model.isDefined(model.inputCols) else [model.getFeaturesCol()]
    features = resolve_features(df, names)
    if "inputCols" in features:
        count = len(features["inputCols"])
    else:
        column = F.col(f"`{features['featuresCol']}`")
        if isinstance(df.schema[features["featuresCol"]].dataType, VectorUDT):
            column = vector_to_array(column)
        first = df.where(column.isNotNull()).select(F.size(column)).first()
        count = first[0] if first else model.numFeatures
    if count != model.numFeatures:
        raise JobError(
            f"the model has {model.numFeatures} features but --features {', '.join(names)} gives "
            f"{count}"
        )
    return features


def _report(path, model, df, selection, criterion, run, history=None) -> None:
    try:
        from spark_gmm.report import write_report

        write_report(path, model, df, selection=selection, criterion=criterion, run=run, history=history)
    except ImportError as error:
        raise JobError(f"the report needs matplotlib ({error}); pip install 'spark-gmm[report]'") from None
    except OSError as error:
        raise JobError(f"cannot write the report to '{path}': {error.strerror}") from None
    log.info("report written to %s", path)


def _saved_model_on(spark, args):
    """(model set to score `args.input`'s features, its training summary, input DataFrame, kind)."""
    from spark_gmm import GaussianMixtureModel, ModelFormatError
    from spark_gmm.persistence import read_metadata

    try:
        model = GaussianMixtureModel.load(args.model)
        trained = read_metadata(args.model, "GaussianMixtureModel").get("summary") or {}
    except ModelFormatError as error:
        raise JobError(_short(error)) from None
    df, kind = read_input(spark, args.input, args.format)
    features = model_features(model, df, args.features)
    model = model.copy()
    if "inputCols" in features:
        model.setInputCols(features["inputCols"])
    else:
        model.clear(model.inputCols)
        model.setFeaturesCol(features["featuresCol"])
    return model, trained, df, kind


def run_report(spark, args) -> dict:
    """The report of a saved model on an input."""
    model, trained, df, _ = _saved_model_on(spark, args)
    _report(args.report, model, df, None, "bic", {"input": args.input, "model": args.model},
            trained.get("logLikelihoodHistory"))
    return {"k": model.getK(), "modelPath": args.model, "reportPath": args.report}


def run_score(spark, args) -> dict:
    model, trained, df, kind = _saved_model_on(spark, args)
    check_outputs(spark, args, df.columns)
    log.info("scoring input %s '%s' with %s (k=%d)", kind, args.input, args.model, model.getK())
    _write(spark, _scored(model, df, args), args)
    features = model.getInputCols() if model.isDefined(model.inputCols) else [model.getFeaturesCol()]
    return {
        "k": model.getK(),
        # the model's training, for schedulers that read one summary shape from both jobs
        "iterations": trained.get("numIter"),
        "converged": trained.get("converged"),
        "logLikelihood": trained.get("logLikelihood"),
        "resumedFromIteration": 0,
        "modelPath": args.model,
        "predictionsPath": args.predictions_out,
        "features": features,
    }


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
    command = argv[0] if argv else None
    try:
        if command not in COMMANDS:
            if command in ("-h", "--help"):
                print(f"usage: {prog or 'spark-gmm'} {{{','.join(COMMANDS)}}} [--help] [flags]")
                return 0
            raise UsageError(f"the first argument must be a command: {', '.join(COMMANDS)}")
        args = parse_args(command, argv[1:], f"{prog or 'spark-gmm'} {command}")
    except UsageError as error:
        message = " ".join(str(error).split())
        print(f"error: {message}", file=stderr, flush=True)
        _emit({"status": "error", "command": command, "error": message}, began)
        return 2
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0

    configure_logging(args.log_level, stderr)
    spark = created = None
    code, fields = 1, {"command": command}
    with warnings.catch_warnings():
        warnings.showwarning = _log_warning
        try:
            from pyspark.sql import SparkSession

            created = SparkSession.getActiveSession() is None
            spark = SparkSession.builder.appName(f"spark-gmm {command}").getOrCreate()
            run = {"score": run_score, "report": run_report}.get(command, run_fit)
            fields = {"status": "ok", "command": command, **run(spark, args)}
            code = 0
        except (JobError, UsageError) as error:
            fields = {"status": "error", "command": command, "error": " ".join(str(error).split())}
        except KeyboardInterrupt:
            code, fields = 130, {"status": "error", "command": command, "error": "interrupted"}
        except Exception as error:  # a bug or a cluster failure: keep the trace for whoever debugs it
            traceback.print_exc(file=stderr)
            fields = {"status": "error", "command": command, "error": f"{type(error).__name__}: {_short(error)}"}
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
