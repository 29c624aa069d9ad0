"""From a DataFrame and a fit's settings to fitted mixtures, on the chosen engine.

The Spark side of a fit, in data-flow order: the input packed by the resident engine's tasks
(`barrier.start_packing`) or into cached blocks (`blocks`), and refused, naming the column, when it
cannot be fitted; the initial model moved into the fit's shifted coordinates; the engine chosen
(`barrier.reducer`); restarts (nInit) or several candidates run in shared passes (`em.fit`), or,
when handleInvalid='keep' finds rows with missing values, the exact EM over their observed values
(`marginal.fit`); checkpoints wired; the result moved back to the data's coordinates.
`GaussianMixture` only turns its Params into a `FitRequest` and the `Fitted` results into models.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from pyspark.sql import DataFrame

from . import barrier, codec, em, marginal
from .blocks import BlockCache, InputSummary, partials_at_driver
from .checkpoint import Checkpointer
from .exceptions import ComponentWarning, InputWarning, InvalidInputError, warn
from .inputs import (
    MEMORY_SHARE,
    available_memory_bytes,
    check_driver_memory,
    check_executor_memory,
    driver_memory_need,
    executor_errors_explained,
    feature_array,
    feature_count,
    feature_names,
    jvm_bytes,
    require_batch,
    require_executor_python,
    weight_column,
)
from .mixture import ComponentStatistics, Mixture, thin_components

log = logging.getLogger("spark_gmm")

#: Largest feature magnitude (and range) a fit accepts: squared distances must stay finite.
LARGEST_FEATURE = 1e150
#: Items a warning names before it says how many more there are.
LISTED = 10


@dataclass(frozen=True)
class FitRequest:
    """What a fit reads from the estimator's Params. `settings` is the EM of this fit (its `start`
    unset); an initial model comes in the data's coordinates, as arrays weights (k,), means (k, d)
    and covariances (k, d, d), and is moved to the fit's coordinates once the data are read."""

    settings: em.FitSettings
    features_col: str
    input_cols: list[str] | None = None
    weight_col: str | None = None
    handle_invalid: str = "error"
    aggregation_depth: int = 2
    engine: str = "auto"
    n_init: int = 1
    checkpoint_dir: str | None = None
    checkpoint_interval: int = 10
    initial: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def column_label(self) -> str:
        """The features' column(s), as messages name them."""
        return ", ".join(self.input_cols) if self.input_cols else self.features_col

    def feature_label(self, i: int) -> str:
        """Feature i, as messages name it."""
        return f"'{self.input_cols[i]}'" if self.input_cols else f"{i} of '{self.features_col}'"


@dataclass
class Fitted:
    """One fit's outcome, ready to become a model: the mixture in the data's coordinates."""

    mixture: Mixture
    result: em.FitResult  # its mixture in the fit's shifted coordinates
    skipped: int  # invalid rows left out (handleInvalid='skip' or 'keep')
    total_weight: float  # rows fitted, or their total weight with weightCol
    feature_names: list[str] | None
    incomplete: int = 0  # rows fitted with missing values marginalised (handleInvalid='keep')
    all_missing: int = 0  # rows with no finite feature, left out (handleInvalid='keep'; in `skipped`)


def fit(dataset: DataFrame, request: FitRequest, candidates: list[em.FitSettings] | None = None) -> list[Fitted]:
    """Fit `request` on `dataset`: one result (the best of nInit restarts, resumed from and saved
    to checkpointDir when set). With `candidates` (EM settings in place of `request.settings`), one
    result per candidate, all sharing every pass, without restarts or checkpoints; the data are
    validated once, for the largest k, with the request's other settings."""
    largest_k = max(c.k for c in candidates) if candidates else request.settings.k
    restarts = request.n_init > 1 and request.initial is None
    # Checkpoint writes are Spark jobs: they need a task slot the barrier stage leaves free.
    spare = 1 if candidates is None and request.checkpoint_dir and not restarts else 0
    cache, summary, skipped, resident = _prepare(dataset, request, largest_k, spare)
    spark = dataset.sparkSession
    run = _em_for(summary)
    try:
        if candidates is None:
            candidates = [request.settings]
            results = [_fit_one(cache, summary, spark, request, run, spare, resident)]
        else:
            with barrier.reducer(request.engine, cache, summary, spark, resident=resident) as reduce:
                results = run(
                    reduce, summary.d, summary.total_weight,
                    [_with_start(request, c, summary) for c in candidates], describe=cache.describe,
                )
    finally:
        _release(cache, resident)
    names = feature_names(dataset, request.features_col, request.input_cols)
    names = names if names and len(names) == summary.d else None
    all_missing = summary.null_rows if request.handle_invalid == "keep" else 0
    return [_fitted(result, settings, summary, skipped, names, all_missing)
            for result, settings in zip(results, candidates)]


def _prepare(dataset: DataFrame, request: FitRequest, k: int, spare_slots: int):
    """(blocks, input summary, rows skipped, resident engine or None), validated for `k` components.
    Where the input's partitions fit in the free task slots, the resident engine's tasks pack
    them and keep them (`barrier.start_packing`); else they are packed into cached blocks."""
    require_batch(dataset, "GaussianMixture.fit")
    features = feature_array(dataset, request.features_col, request.input_cols)
    weights = weight_column(dataset, request.weight_col)
    have = available_memory_bytes()
    _check_width(k, feature_count(dataset, request.features_col, request.input_cols) or 0, have)
    require_executor_python(dataset.sparkSession)
    cache = BlockCache(dataset, features, weights, request.aggregation_depth, request.handle_invalid == "keep",
                       widest=_widest(k, have))
    resident = None
    try:
        log.info("reading and validating the input")
        began = time.perf_counter()
        resident = barrier.start_packing(request.engine, cache, dataset.sparkSession, spare_slots)
        if resident is not None:
            summary = cache.adopt(resident.summary_rows)
        else:
            cache.describe("reading the input into cached blocks")
            summary = executor_errors_explained(cache.summarize)
        _check_width(k, summary.d, have)  # before other checks: wider input was read in part only
        skipped = _validate(summary, request, k, dataset.sparkSession)
        seconds = time.perf_counter() - began
        log.info(
            "input: %d rows × %d features in %d partitions%s, packed in %.1f s (%.0f rows/s)",
            summary.rows, summary.d, summary.partitions,
            f", {skipped} invalid rows left out" if skipped else "", seconds, summary.rows / max(seconds, 1e-9),
        )
        narrow = request.settings.dtype == "float32" and not summary.incomplete_rows
        if resident is not None:
            resident.go(summary.shift, np.float32 if narrow else np.float64, summary.rows)
        elif narrow:
            cache.store_as_float32()
    except BaseException:
        _release(cache, resident)
        raise
    return cache, summary, skipped, resident


def _check_width(k: int, d: int, have: int) -> None:
    """Refuse a fit whose d features (if known, > 0) are too many for the driver's `have` bytes."""
    if d > 0:
        check_driver_memory(k, d, 8 * ComponentStatistics.size(k, d), 1, 0, have)


def _widest(k: int, have: int) -> int:
    """The most features `_check_width` lets a fit of k components have. The packers stop reading
    at the first batch of wider rows, so a fit too wide for the driver is refused after one batch
    per partition, not after reading the whole input (the schema tells the width of columns listed
    in inputCols, or of vectors with ML attributes, before any read)."""
    lo, hi = 0, 1 << 24
    while lo < hi:
        mid = (lo + hi + 1) // 2
        fits = driver_memory_need(k, mid, 8 * ComponentStatistics.size(k, mid), 1) <= MEMORY_SHARE * have
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    return lo


def _release(cache: BlockCache, resident: barrier.ResidentEngine | None) -> None:
    try:
        if resident is not None:
            resident.close()
    finally:
        cache.describe(None)
        cache.unpersist()


def _validate(summary: InputSummary, request: FitRequest, k: int, spark) -> int:
    """Refuse input that cannot be fitted, naming the column; returns the rows skipped."""
    column, reg_covar = request.column_label, request.settings.reg_covar
    if summary.dims[0] != summary.dims[1]:
        raise InvalidInputError(
            f"features column '{column}' has vectors of different lengths ({summary.dims[0]} and {summary.dims[1]})"
        )
    invalid = summary.null_rows + summary.nonfinite_rows + summary.bad_weight_rows
    if invalid and request.handle_invalid == "error":
        problems = []
        if summary.null_rows:
            problems.append(f"{summary.null_rows} rows with null features in '{column}'")
        if summary.nonfinite_rows:
            problems.append(f"{summary.nonfinite_rows} rows with NaN or infinite features in '{column}'")
        if summary.bad_weight_rows:
            problems.append(
                f"{summary.bad_weight_rows} rows with a null, negative, NaN or infinite weight in "
                f"'{request.weight_col}'"
            )
        raise InvalidInputError("; ".join(problems) + " (set handleInvalid='skip' to drop them)")
    if invalid:
        log.warning("handleInvalid='%s': left out %d invalid rows%s", request.handle_invalid, invalid,
                    " (no finite feature, or a bad weight)" if request.handle_invalid == "keep" else "")
    if summary.incomplete_rows:
        log.info("handleInvalid='keep': %d rows with missing values, marginalised", summary.incomplete_rows)
    if summary.rows == 0:
        raise InvalidInputError(f"no rows to fit in '{column}': the input is empty" + (
            f" after skipping {invalid} invalid rows" if invalid else ""))
    if summary.d == 0:
        raise InvalidInputError(f"features column '{column}' has vectors of length 0")
    if not summary.total_weight > 0:
        raise InvalidInputError(f"weight column '{request.weight_col}': all weights are zero")
    if k > summary.rows:
        raise InvalidInputError(f"k={k} is larger than the number of rows ({summary.rows})")
    for i in np.flatnonzero(np.isnan(summary.span)):
        raise InvalidInputError(f"feature {request.feature_label(i)} has no finite value: it cannot be fitted")
    extreme = np.maximum(np.abs(summary.shift) + summary.span / 2, summary.span)
    for i in np.flatnonzero(extreme > LARGEST_FEATURE):
        raise InvalidInputError(
            f"feature {request.feature_label(i)} has values as large as {extreme[i]:.3g}: their squares "
            "overflow float64 in the densities; rescale it (e.g. StandardScaler)"
        )
    constant = np.flatnonzero(summary.span == 0)
    if len(constant) and reg_covar <= 0:
        i = constant[0]
        raise InvalidInputError(
            f"feature {request.feature_label(i)} is constant ({summary.shift[i]:.17g}): with regCovar=0 "
            "every covariance is singular; set regCovar > 0 or drop the feature"
        )
    if len(constant) == 1:
        i = constant[0]
        warn(f"feature {request.feature_label(i)} is constant ({summary.shift[i]:.17g}): its variance is "
             f"regCovar={reg_covar:g} in every component", InputWarning)
    elif len(constant):
        named = [f"'{request.input_cols[i]}'" if request.input_cols else str(i) for i in constant]
        where = "" if request.input_cols else f" of '{request.features_col}'"
        warn(f"{len(constant)} features{where} are constant: "
             f"{_listed([f'{n} ({summary.shift[i]:.17g})' for n, i in zip(named, constant)])}; their "
             f"variance is regCovar={reg_covar:g} in every component", InputWarning)
    partial_bytes = 8 * ComponentStatistics.size(k, summary.d)
    check_driver_memory(
        k,
        summary.d,
        partial_bytes,
        partials_at_driver(summary.partitions, partial_bytes, request.aggregation_depth),
        jvm_bytes(spark.conf.get("spark.driver.maxResultSize", "1g")),
    )
    check_executor_memory(k, summary.d, spark)
    return invalid


def _listed(items: list[str]) -> str:
    """`items` joined, the first `LISTED` of them, and how many more."""
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more


def _em_for(summary: InputSummary) -> Callable[..., list[em.FitResult]]:
    """The EM that fits the cached rows (`em.fit`'s signature): `em.fit`, or, when rows miss some
    values (handleInvalid='keep'), `marginal.fit`, the exact EM over each row's observed values."""
    if not summary.incomplete_rows:
        return em.fit
    complete = summary.rows - summary.incomplete_rows

    def fit_marginal(reduce, d, total_weight, candidates, resume=None, on_state=None, describe=None):
        return marginal.fit(reduce, d, total_weight, candidates, complete, describe, resume, on_state)

    return fit_marginal


def _fit_one(cache: BlockCache, summary: InputSummary, spark, request: FitRequest,
             run: Callable[..., list[em.FitResult]], spare: int, resident) -> em.FitResult:
    """One fit by `run`: the best of nInit restarts in shared passes, or a single fit with checkpoints."""
    settings = _with_start(request, request.settings, summary)
    restarts = request.n_init > 1 and settings.start is None
    checkpointer = None if restarts else _checkpointer(spark, summary, request)
    resume = checkpointer.latest() if checkpointer else None
    with barrier.reducer(request.engine, cache, summary, spark, spare, resident) as reduce:
        if restarts:
            candidates = [replace(settings, seed=settings.seed + i) for i in range(request.n_init)]
            return _best(run(reduce, summary.d, summary.total_weight, candidates, describe=cache.describe), candidates)
        return run(
            reduce, summary.d, summary.total_weight, [settings], resume=resume,
            on_state=checkpointer.save if checkpointer else None, describe=cache.describe,
        )[0]


def _best(results: list[em.FitResult], candidates: list[em.FitSettings]) -> em.FitResult:
    """The restart with the highest log-likelihood (logged with the others)."""
    best = max(range(len(results)), key=lambda i: results[i].log_likelihood)
    log.info(
        "nInit=%d: kept restart %d (seed %d), log-likelihood %.10g; others: %s",
        len(results), best, candidates[best].seed, results[best].log_likelihood,
        ", ".join(f"{r.log_likelihood:.10g}" for i, r in enumerate(results) if i != best),
    )
    return results[best]


def _checkpointer(spark, summary: InputSummary, request: FitRequest) -> Checkpointer | None:
    """The fit's checkpointer, or None without checkpointDir. With rows missing some values the
    states it writes are the latent class models `marginal.fit` fits."""
    if not request.checkpoint_dir:
        return None
    settings, initial = request.settings, request.initial
    fingerprint = {  # the data and every setting that changes the model (maxIter: see Checkpointer)
        "k": settings.k,
        "numFeatures": summary.d,
        "rows": summary.rows,
        "totalWeight": summary.total_weight,
        "content": summary.content,
        "regCovar": settings.reg_covar,
        "tol": settings.tol,
        "seed": settings.seed,
        "initMode": settings.init_mode if initial is None else "initialModel",
        "initialModel": None if initial is None else codec.digest(codec.mixture_arrays(*initial)),
        "dtype": settings.dtype,
        "covarianceType": settings.covariance_type,
        "reseedComponents": settings.reseed,
    }
    return Checkpointer(spark, request.checkpoint_dir, request.checkpoint_interval, fingerprint,
                        marginal.latent_settings(settings, summary.d) if summary.incomplete_rows else settings)


def _with_start(request: FitRequest, settings: em.FitSettings, summary: InputSummary) -> em.FitSettings:
    """`settings` starting from the request's initial model, in the fit's shifted coordinates."""
    if request.initial is None:
        return settings
    weights, means, covariances = request.initial
    k, d = means.shape
    if k != settings.k:
        raise InvalidInputError(
            f"k={settings.k} but the initial model has {k} components; set k to "
            "match it (setInitialModel sets it)"
        )
    if d != summary.d:
        raise InvalidInputError(f"initial model has {d} features, the data has {summary.d}")
    start = Mixture.from_covariances(weights, means - summary.shift, covariances, settings.reg_covar)
    for j in range(k):
        for i in range(j):
            if np.array_equal(means[i], means[j]) and np.array_equal(covariances[i], covariances[j]):
                warn(
                    f"initial components {i} and {j} are identical; EM cannot tell them apart, "
                    "so they stay identical (give distinct starting means)",
                    ComponentWarning,
                )
    return replace(settings, start=start)


def _fitted(result: em.FitResult, settings: em.FitSettings, summary: InputSummary, skipped: int,
            names: list[str] | None, all_missing: int) -> Fitted:
    """`result` in the data's coordinates, with one warning naming the components the regulariser shapes."""
    final = result.mixture.shifted(summary.shift)
    thin = thin_components(final.covariances, settings.reg_covar, summary.span > 0)
    if thin:
        many = len(thin) > 1
        warn(
            f"component{'s' if many else ''} {', '.join(str(j) for j, _ in thin)} "
            f"{'are' if many else 'is'} singular without regCovar (smallest own variance "
            f"{max(min(v for _, v in thin), 0.0):.3g} ≤ regCovar={settings.reg_covar:g}): "
            f"{'each' if many else 'it'} sits on fewer distinct points than features, or on features "
            "constant or collinear within it, and regCovar sets its shape there. The likelihood "
            "favours such components over broader ones: for clusters rather than a density, raise "
            "regCovar (to about 1e-2 of the features' variance: 0.01 on standardised features)",
            ComponentWarning,
        )
    log.info(
        "fit done: k=%d, %d iterations, converged=%s, log-likelihood %.10g",
        final.k, result.iterations, result.converged, result.log_likelihood,
    )
    return Fitted(final, result, skipped, summary.total_weight, names, summary.incomplete_rows, all_missing)
