"""The mixed fit of `fit` (docs/jobs.md): typed-column flags, their checks, type inference over
the input (one bounded survey pass, nothing collected), the `MixedMixture` estimator, and a saved
`MixedMixtureModel`'s columns when scoring."""

from __future__ import annotations

import logging

from spark_gmm.mixed import MixedMixture
from spark_gmm.mixed_input import KINDS, Feature, survey

from .errors import JobError, UsageError

log = logging.getLogger("spark_gmm.job")

#: An integer column with at most this many distinct values (and at most --max-levels) is inferred
#: categorical; with more, Gaussian.
INTEGER_LEVELS = 20
#: Flags of a Gaussian fit that a mixed fit does not take (their argparse dest).
GAUSSIAN_ONLY = ("features", "init_mode", "dtype", "reseed_components", "initial_model", "warm_start_from",
                 "align_to", "max_divergence", "label_changes", "max_drift", "mlflow_experiment")
TYPED = tuple(f"{kind}_cols" for kind in KINDS)


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_flags(group, columns, levels) -> None:
    """The typed-column flags of `fit` (`columns` parses a comma-separated list, `levels` a count)."""
    api = MixedMixture()
    for kind, what in (("gaussian", "numeric columns, one multivariate Gaussian per class"),
                       ("bernoulli", "0/1, boolean or two-valued columns"),
                       ("categorical", "string or integer columns, one distribution over levels per class"),
                       ("poisson", "counts (whole numbers >= 0)")):
        group.add_argument(f"--{kind}-cols", type=columns, metavar="COLS",
                           help=f"a mixed fit (MixedMixture, instead of --features): {what}")
    group.add_argument("--infer-types", type=columns, metavar="COLS",
                       help="a mixed fit over these columns, each typed from the input: boolean or two "
                       f"distinct values -> bernoulli; string, or integer with at most {INTEGER_LEVELS} "
                       "values -> categorical; other numeric -> gaussian")
    group.add_argument("--max-levels", type=levels, default=api.getMaxLevels(), metavar="N",
                       help=f"most levels of a categorical column (default: {api.getMaxLevels()})")


def check(args, parser) -> None:
    """Set `args.mixed`; refuse a mixed fit mixed with a Gaussian fit's flags, and a column given
    twice."""
    args.mixed = any(getattr(args, dest, None) for dest in TYPED + ("infer_types",))
    if args.command != "fit":
        return
    if not args.mixed:
        if args.max_levels != parser.get_default("max_levels"):
            raise UsageError("--max-levels applies to a mixed fit only (--gaussian-cols, ..., --infer-types)")
        return
    given = [dest for dest in GAUSSIAN_ONLY if getattr(args, dest) != parser.get_default(dest)]
    if given:
        raise UsageError(
            f"{flag(given[0])} is for a Gaussian mixture fit, not a mixed one (--gaussian-cols, "
            "--bernoulli-cols, --categorical-cols, --poisson-cols, --infer-types): drop it"
            + (" (a config file may set it)" if given[0] == "features" else "")
        )
    seen: dict[str, str] = {}
    for dest in TYPED + ("infer_types",):
        for name in getattr(args, dest) or []:
            if name in seen:
                raise UsageError(f"column '{name}' is in both {flag(seen[name])} and {flag(dest)}")
            seen[name] = dest


def infer_types(df, names: list[str], max_levels: int) -> dict[str, list[str]]:
    """{kind: columns} for `names`: boolean → bernoulli, string → categorical, numeric by its
    number of distinct values (2 → bernoulli, an integer with few → categorical, else gaussian).
    The numeric columns' distinct values are counted up to a bound in one survey pass."""
    from pyspark.sql.types import BooleanType, IntegralType, NumericType, StringType

    fields = {f.name: f.dataType for f in df.schema.fields}
    for name in names:
        if name not in fields:
            raise JobError(f"--infer-types column '{name}' not found in the input; available columns: "
                           f"{', '.join(fields)}")
        if not isinstance(fields[name], (BooleanType, StringType, NumericType)):
            raise JobError(f"--infer-types column '{name}' has type {fields[name].simpleString()}; only boolean, "
                           "string and numeric columns can be typed: leave it out or cast it")
    numeric = [n for n in names if isinstance(fields[n], NumericType)]
    bound = max(2, min(INTEGER_LEVELS, max_levels))
    found = survey(df, [Feature(n, "categorical") for n in numeric], None, bound).columns if numeric else []
    counts = {n: len(column["values"]) for n, column in zip(numeric, found)}  # more than `bound`: many
    inferred: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for name in names:
        kind = fields[name]
        if isinstance(kind, BooleanType):
            inferred["bernoulli"].append(name)
        elif isinstance(kind, StringType):
            inferred["categorical"].append(name)
        elif counts[name] == 0:
            raise JobError(f"--infer-types column '{name}' ({kind.simpleString()}) has no value (all null or NaN), "
                           "so its type cannot be told: leave it out")
        elif counts[name] == 2:
            inferred["bernoulli"].append(name)
        elif isinstance(kind, IntegralType) and counts[name] <= bound:
            inferred["categorical"].append(name)
        else:
            inferred["gaussian"].append(name)
    log.info("inferred types: %s", "; ".join(f"{kind} {', '.join(cols)}" for kind, cols in inferred.items() if cols))
    return inferred


def estimator(args, df) -> tuple[MixedMixture, dict[str, list[str]]]:
    """The `MixedMixture` of a mixed fit, and its columns by kind (given, then inferred)."""
    by_kind = {kind: list(getattr(args, f"{kind}_cols") or []) for kind in KINDS}
    if args.infer_types:
        for kind, names in infer_types(df, args.infer_types, args.max_levels).items():
            by_kind[kind] += names
    mixture = MixedMixture(
        k=args.k, covarianceType=args.covariance_type, maxIter=args.max_iter, tol=args.tol, seed=args.seed,
        regCovar=args.reg_covar, nInit=args.n_init, handleInvalid=args.handle_invalid, weightCol=args.weight_col,
        maxLevels=args.max_levels, engine=args.engine, checkpointInterval=args.checkpoint_interval,
        **({"checkpointDir": args.checkpoint_dir} if args.checkpoint_dir else {}),
        **{f"{kind}Cols": names for kind, names in by_kind.items()},
    )
    return mixture, {kind: names for kind, names in by_kind.items() if names}


def model_columns(model) -> list[str]:
    """The input columns a saved `MixedMixtureModel` reads, in its order."""
    return [name for names in model.featureTypes.values() for name in names]


def check_model_columns(model, df, names: list[str] | None) -> None:
    """Scoring with a mixed model: --features, when given (a config file's top level may set it),
    must name the model's columns; the input must have them."""
    columns = model_columns(model)
    if names is not None and sorted(names) != sorted(columns):
        raise JobError(f"the model is a mixed model over {', '.join(columns)}; --features {', '.join(names)} "
                       "names other columns (drop --features: the model reads its columns by name)")
    missing = [name for name in columns if name not in df.columns]
    if missing:
        raise JobError(f"column '{missing[0]}' of the mixed model not found in the input; available columns: "
                       f"{', '.join(df.columns)}")
