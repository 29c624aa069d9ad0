"""Flags and TOML config: each command's arguments, parsed and checked before Spark starts.

Allowed values and defaults are the library's own (its constants and the estimators' defaults), so
the command line cannot drift from the API.
"""

from __future__ import annotations

import argparse
import re
import sys

from spark_gmm.alignment import DRIFT_FIGURES, MAX_DIVERGENCE
from spark_gmm.clustering import GaussianMixture
from spark_gmm.options import COVARIANCE_TYPES, CRITERIA, DTYPES, ENGINES, HANDLE_INVALID, INIT_MODES
from spark_gmm.selection import GaussianMixtureSelection

from . import mixed
from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: The commands and what each does (the top-level help and each command's --help).
COMMANDS = {
    "fit": "Fit a Gaussian mixture of k components (distributed EM); save the model and, if asked, "
    "the predictions and an HTML report.",
    "score": "Score rows with a saved model: write every input row with its component (and, if "
    "asked, its probabilities and log density).",
    "select": "Choose k and the covariance type by BIC or AIC: fit every candidate in shared passes "
    "over the data, keep the lowest, save it like fit.",
    "report": "Write an HTML report (pictures and tables) of a saved model on an input.",
}
MODES = ("errorifexists", "overwrite", "append")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Selection fits every candidate at once; beyond these it is a typo or a different problem.
MAX_CANDIDATES = 100
MAX_SELECTION_K = 1000

_IDENT = r"(?:`[^`]+`|[A-Za-z_][A-Za-z0-9_]*)"
TABLE_NAME = re.compile(rf"^{_IDENT}(?:\.{_IDENT}){{0,2}}$")
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
#: A last name part that is a data format is a file name someone meant as a path, not a table.
_FILE_SUFFIX = re.compile(r"\.(parquet|csv|tsv|json|jsonl|orc|avro|delta|txt|text|xml)$", re.IGNORECASE)


def output_kind(name: str) -> str:
    """'path' (anything with '/' or a scheme) or 'table' (`t`, `db.t`, `cat.db.t`); a name that is
    neither, or a would-be table ending in a file-format suffix (`preds.parquet`), is refused."""
    if "/" in name or URI_SCHEME.match(name):
        return "path"
    if TABLE_NAME.match(name) and not _FILE_SUFFIX.search(name):
        return "table"
    hint = f"write './{name}' for a path" + (
        f", or quote a table name that really ends so (`{name.rsplit('.', 1)[0]}`.`{name.rsplit('.', 1)[1]}`)"
        if "." in name else ""
    )
    raise UsageError(f"output '{name}' is neither a path (no '/' or scheme) nor a table name: {hint}")


class _Parser(argparse.ArgumentParser):
    """One-line errors instead of usage (and, as built, no abbreviated flags: a job must not guess)."""

    def error(self, message):
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
    """'2,3,5' or '2-10' (or a mix) → the sorted k, bounded before any range is expanded."""
    values: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            low, high = int(low), int(high) if dash else int(low)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected k values like '2,3,5' or '2-10', got '{text}'") from None
        if low < 1:
            raise argparse.ArgumentTypeError(f"k values must be integers >= 1, got '{text}'")
        if high < low:
            raise argparse.ArgumentTypeError(f"empty k range '{part.strip()}'")
        if high > MAX_SELECTION_K:
            raise argparse.ArgumentTypeError(f"k values must be at most {MAX_SELECTION_K}, got '{text}'")
        if high - low + 1 > MAX_CANDIDATES or len(values | set(range(low, high + 1))) > MAX_CANDIDATES:
            raise argparse.ArgumentTypeError(f"more than {MAX_CANDIDATES} k values in '{text}'")
        values.update(range(low, high + 1))
    return sorted(values)


def _choices_list(allowed):
    def convert(text: str) -> list[str]:
        items = _columns(text)
        unknown = [item for item in items if item not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"'{unknown[0]}' is not one of {', '.join(allowed)}")
        return items

    return convert


def build_parser(command: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of `command` (one of COMMANDS), with the estimators' defaults."""
    api = GaussianMixture()
    selection = GaussianMixtureSelection(api)
    fitting = command in ("fit", "select")
    parser = _Parser(
        prog=prog, allow_abbrev=False,
        description=COMMANDS[command],
        epilog="Flags can also come from --config FILE (TOML; see docs/jobs.md). The last stdout line "
        "is a JSON summary; progress is logged to stderr. Exit code 0: done; 1: the job cannot run; "
        "2: a bad flag or config" + ("; 3: done, but the drift exceeded --max-drift." if fitting else "."),
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file of flag values (flags override it)")
    data = parser.add_argument_group("input")
    data.add_argument("--input", metavar="PATH_OR_TABLE",
                      help="data set path (read with --format) or catalog table name (required)")
    data.add_argument("--format", default="parquet",
                      help="format of a path input: parquet (default), csv, json, orc, delta or any Spark source")
    data.add_argument("--features", type=_columns, metavar="COLS",
                      help="comma-separated numeric columns, or one vector / numeric-array column"
                      + (" (required for a Gaussian mixture)" if fitting else " (default: the model's)"))
    if fitting:
        data.add_argument("--weight-col", metavar="COL", help="numeric column of non-negative row weights")
        data.add_argument("--handle-invalid", choices=HANDLE_INVALID, default=api.getHandleInvalid(),
                          help="rows with null/NaN/infinite features or bad weights: error fails the job, "
                          "skip leaves them out, keep marginalises the missing features (rows with none "
                          f"finite, or a bad weight, left out) (default: {api.getHandleInvalid()})")
        if command == "fit":
            mixed.add_flags(parser.add_argument_group("mixed feature types, instead of --features (docs/mixed.md)"),
                            _columns, _bounded(int, 2, "an integer >= 2"))
        _model_flags(parser.add_argument_group("model"), command, api, selection)
        _recurring_flags(parser.add_argument_group("recurring fits (docs/recurring.md)"), command)
    out = parser.add_argument_group("output")
    if command == "report":
        out.add_argument("--model", metavar="DIR", help="the saved model to report on (required)")
        out.add_argument("--report", metavar="FILE", help="the local HTML file to write (required)")
        out.add_argument("--mode", choices=MODES[:2], default="errorifexists",
                         help="when the report file exists: fail (default) or overwrite")
    else:
        _output_flags(out, fitting)
    out.add_argument("--log-level", choices=LOG_LEVELS, default="INFO", type=str.upper,
                     help="level of the spark_gmm logger on stderr (default: INFO)")
    return parser


def _model_flags(group, command: str, api: GaussianMixture, selection: GaussianMixtureSelection) -> None:
    if command == "fit":
        group.add_argument("--k", type=_bounded(int, 1, "an integer >= 1"),
                           help="number of mixture components (required)")
        group.add_argument("--covariance-type", choices=COVARIANCE_TYPES, default=api.getCovarianceType(),
                           help=f"covariance structure (default: {api.getCovarianceType()})")
    else:
        ks = selection.getKValues()
        group.add_argument("--k-values", type=_k_values, default=ks, metavar="KS",
                           help=f"candidate k: '2,3,5' or '2-10' (default: {ks[0]}-{ks[-1]}; at most "
                           f"{MAX_CANDIDATES} candidates in all, k <= {MAX_SELECTION_K})")
        group.add_argument("--covariance-types", type=_choices_list(COVARIANCE_TYPES),
                           default=selection.getCovarianceTypes(), metavar="TYPES",
                           help=f"candidate covariance types from {', '.join(COVARIANCE_TYPES)}, "
                           f"comma-separated (default: {','.join(selection.getCovarianceTypes())})")
        group.add_argument("--criterion", choices=CRITERIA, default=selection.getCriterion(),
                           help=f"the candidate with the lowest value wins (default: {selection.getCriterion()})")
    group.add_argument("--max-iter", type=_bounded(int, 0, "an integer >= 0"), default=api.getMaxIter(),
                       help=f"maximum EM iterations (default: {api.getMaxIter()})")
    group.add_argument("--tol", type=_bounded(float, 0.0, "a number >= 0"), default=api.getTol(),
                       help="stop when the mean log-likelihood per row changes by less "
                       f"(default: {api.getTol()})")
    group.add_argument("--seed", type=_bounded(int, -(2**63), "an integer"), default=api.getSeed(),
                       help=f"random seed of the initialisation (default: the estimator's, {api.getSeed()})")
    group.add_argument("--reg-covar", type=_bounded(float, 0.0, "a number >= 0"), default=api.getRegCovar(),
                       help=f"added to each covariance diagonal (default: {api.getRegCovar()})")
    group.add_argument("--init-mode", choices=INIT_MODES, default=api.getInitMode(),
                       help=f"initialisation (default: {api.getInitMode()})")
    group.add_argument("--n-init", type=_bounded(int, 1, "an integer >= 1"), default=api.getNInit(),
                       help=f"initialisations, the best kept (default: {api.getNInit()})")
    group.add_argument("--no-reseed", dest="reseed_components", action="store_false",
                       help="plain EM: keep a component that empties or collapses onto one row instead "
                       "of restarting it; no challengers, no covariance floor")
    group.add_argument("--engine", choices=ENGINES, default=api.getEngine(),
                       help="driver: one Spark job per EM pass; barrier: the whole fit in one barrier "
                       f"stage (default: {api.getEngine()})")
    group.add_argument("--dtype", choices=DTYPES, default=api.getDtype(),
                       help=f"precision of the cached blocks and densities (default: {api.getDtype()})")
    if command == "fit":
        interval = api.getOrDefault(api.checkpointInterval)
        group.add_argument("--checkpoint-dir", metavar="DIR",
                           help="checkpoint the EM state here; a rerun with the same arguments resumes "
                           "from the latest checkpoint")
        group.add_argument("--checkpoint-interval", type=_bounded(int, 1, "an integer >= 1"), default=interval,
                           help=f"iterations between checkpoints (default: {interval}, as in the API and MLlib)")


def _drift_limits(text: str) -> dict[str, float]:
    """'0.5' (every figure) or 'meanShift=1,weightChange=0.05' → {figure: largest allowed value}."""
    limit = _bounded(float, 0.0, "a number >= 0")
    if "=" not in text:
        try:
            return dict.fromkeys(DRIFT_FIGURES, limit(text))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected a number or FIGURE=LIMIT pairs like 'meanShift=1,weightChange=0.05', got '{text}'"
            ) from None
    limits = {}
    for part in text.split(","):
        name, _, value = (item.strip() for item in part.partition("="))
        if name not in DRIFT_FIGURES:
            raise argparse.ArgumentTypeError(f"'{name}' is not a drift figure: {', '.join(DRIFT_FIGURES)}")
        limits[name] = limit(value)
    return limits


def _recurring_flags(group, command: str) -> None:
    if command == "fit":
        group.add_argument("--initial-model", metavar="DIR",
                           help="start EM from this saved model instead of --init-mode (k is the model's; "
                           "with a small --max-iter this is the cheap daily refresh)")
        group.add_argument("--warm-start-from", metavar="PARENT",
                           help="dated layout: start from, and align to, the latest model saved under PARENT "
                           "(PARENT/2025-01-14, ...) whose name sorts before --model-out's; a cold fit "
                           "when there is none")
    group.add_argument("--align-to", metavar="DIR",
                       help="renumber the new model's components to continue this saved model's ids, and "
                       "report the drift of each component")
    group.add_argument("--max-divergence", type=_bounded(float, 0.0, "a number >= 0"), default=MAX_DIVERGENCE,
                       help="largest Bhattacharyya divergence of a match; a component further from every "
                       f"previous one gets a new id (default: {MAX_DIVERGENCE})")
    group.add_argument("--label-changes", action="store_true",
                       help="also score the input with both models (one more pass) and report the share "
                       "of rows whose component id changed")
    group.add_argument("--max-drift", type=_drift_limits, metavar="LIMITS",
                       help="exit with code 3 (after writing every output) when a drift figure exceeds its "
                       f"limit or a component is new or retired: a number for all of {', '.join(DRIFT_FIGURES)}, "
                       "or FIGURE=LIMIT pairs")
    group.add_argument("--mlflow-experiment", metavar="NAME",
                       help="log the run to this MLflow experiment (tracking URI from MLFLOW_TRACKING_URI; "
                       "needs pip install 'spark-gmm[mlflow]')")


def _output_flags(group, fitting: bool) -> None:
    if fitting:
        group.add_argument("--model-out", metavar="DIR", help="save the fitted model to this directory")
        group.add_argument("--report", metavar="FILE", help="also write an HTML report with pictures to "
                           "this local file (needs matplotlib: pip install 'spark-gmm[report]')")
    else:
        group.add_argument("--model", metavar="DIR", help="the saved model to score with (required)")
    group.add_argument("--predictions-out", metavar="PATH_OR_TABLE",
                       help="write the input rows plus the prediction here: a path (anything with '/' or a "
                       "scheme) or a catalog table name; a name like preds.parquet is refused as ambiguous "
                       "(write ./preds.parquet)" + ("" if fitting else " (required)"))
    group.add_argument("--output-format", default="parquet",
                       help="format of the predictions: parquet (default), delta, orc, json, ...")
    group.add_argument("--partition-by", type=_columns, metavar="COLS",
                       help="partition the predictions by these input columns")
    group.add_argument("--mode", choices=MODES, default="errorifexists",
                       help="when an output exists: fail (errorifexists, default), overwrite, or append "
                       "(predictions only; a model directory or report is replaced only with overwrite)")
    group.add_argument("--prediction-col", default="prediction", metavar="COL",
                       help="name of the predicted component column (default: prediction)")
    group.add_argument("--probability-col", metavar="COL",
                       help="also write the component probabilities (array<double>) in this column")
    group.add_argument("--log-likelihood-col", metavar="COL",
                       help="also write each row's log density log p(x) in this column")


def _value_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The flags that take one value: the only ones a config file may set."""
    return {
        option for action in parser._actions if action.nargs is None and action.dest != "config"
        for option in action.option_strings
    }


def _config_argv(path: str, command: str) -> tuple[list[str], list[str]]:
    """(command-line tokens, notes for the log) from the TOML config file at `path`.

    Top-level keys apply to every command that has the flag; a `[fit]`, `[score]`, `[select]` or
    `[report]` table to its command only. A key no command takes (`help = 1`, a typo) or that its
    table's command does not take is refused, as is a value that is not a string, a number or a list.
    """
    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except OSError as error:
        raise UsageError(f"config file '{path}': {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"config file '{path}' is not valid TOML: {error}") from None
    flags = {name: _value_flags(build_parser(name)) for name in COMMANDS}
    every = set().union(*flags.values())

    def flag_of(key, value, table=None):
        flag = "--" + key.replace("_", "-")
        where = f"[{table}] " if table else ""
        if flag not in (flags[table] if table else every):
            raise UsageError(f"config file '{path}': unknown setting {where}'{key}'"
                             + (f" ({table} has no {flag})" if table and flag in every else ""))
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            return flag, ",".join(str(v) for v in value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return flag, str(value)
        raise UsageError(f"config file '{path}': setting {where}'{key}' must be a string, number or list")

    settings, tables = {}, {}
    for key, value in config.items():
        if isinstance(value, dict):
            if key not in COMMANDS:
                raise UsageError(f"config file '{path}': unknown table [{key}]; tables: {', '.join(COMMANDS)}")
            tables[key] = dict(flag_of(name, item, key) for name, item in value.items())
        elif key in COMMANDS:
            raise UsageError(f"config file '{path}': [{key}] must be a table")
        else:
            flag, text = flag_of(key, value)
            if flag in flags[command]:
                settings[flag] = text
    settings.update(tables.get(command, {}))  # the command's table wins over the top level
    notes = []
    if command == "select" and config.get("fit"):
        notes.append(
            f"config file '{path}': select reads the top-level keys and [select] only; it does not use "
            f"[fit] ({', '.join(config['fit'])})"
        )
    return [f"{flag}={text}" for flag, text in settings.items()], notes  # '=': a value may start with '-'


def parse_args(command: str, argv: list[str], prog: str | None = None) -> argparse.Namespace:
    """The settings of `command` from `argv` over its `--config` file; `.notes` holds lines to log."""
    parser = build_parser(command, prog)
    config = parser.parse_known_args(argv)[0].config
    tokens, notes = _config_argv(config, command) if config else ([], [])
    args = parser.parse_args(tokens + list(argv))
    args.command, args.notes = command, notes
    mixed.check(args, parser)
    _check(args)
    return args


def _check(args: argparse.Namespace) -> None:
    """What argparse cannot say: required flags, empty names, clashing columns, output names."""
    required = {
        "fit": ["input", "features", "k"],
        "select": ["input", "features"],
        "score": ["input", "model", "predictions_out"],
        "report": ["input", "model", "report"],
    }[args.command]
    if args.mixed:
        required.remove("features")
    if args.command == "fit" and (args.initial_model or args.warm_start_from):
        required.remove("k")  # the model's, or --k for a first cold fit (checked when it is known)
    missing = [f"--{name.replace('_', '-')}" for name in required if getattr(args, name) is None]
    if missing:
        raise UsageError(f"missing required argument{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    previous = [f"--{n.replace('_', '-')}" for n in ("initial_model", "warm_start_from", "align_to")
                if getattr(args, n, None) is not None]
    if "--warm-start-from" in previous and len(previous) > 1:
        others = ", ".join(flag for flag in previous if flag != "--warm-start-from")
        raise UsageError(f"--warm-start-from chooses the previous model itself; drop {others}")
    if "--warm-start-from" in previous and not args.model_out:
        raise UsageError("--warm-start-from needs --model-out (the new model goes next to the ones it starts from)")
    aligned = getattr(args, "align_to", None) or getattr(args, "warm_start_from", None)
    for flag in ("max_drift", "label_changes"):
        if getattr(args, flag, None) and not aligned:
            raise UsageError(f"--{flag.replace('_', '-')} needs a previous model: --align-to or --warm-start-from")
    for name in ("input", "model_out", "model", "predictions_out", "weight_col", "checkpoint_dir", "report",
                 "initial_model", "warm_start_from", "align_to", "mlflow_experiment"):
        value = getattr(args, name, None)
        if value is not None and not value.strip():
            raise UsageError(f"argument --{name.replace('_', '-')}: must not be empty")
    columns = [getattr(args, n, None) for n in ("prediction_col", "probability_col", "log_likelihood_col")]
    columns = [c for c in columns if c is not None]
    if not all(c.strip() for c in columns) or len(set(columns)) != len(columns):
        raise UsageError("the prediction, probability and log-likelihood columns need distinct names")
    if getattr(args, "predictions_out", None):
        output_kind(args.predictions_out)
    if args.command == "select" and len(args.k_values) * len(args.covariance_types) > MAX_CANDIDATES:
        raise UsageError(
            f"{len(args.k_values)} k values x {len(args.covariance_types)} covariance types is more than "
            f"{MAX_CANDIDATES} candidates"
        )
