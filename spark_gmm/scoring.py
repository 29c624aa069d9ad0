"""Scoring rows with a fitted mixture in the executors: the Arrow UDFs behind `transform` and behind
`score`, `bic` and `aic`, and the sampler. Which rows (and weights) can be used is `rows`' rule,
evaluated here on the same numpy arrays as when a fit packs its blocks.

Scores go from Arrow to numpy and back without a Python object per row: the feature lists are
flattened into an (n, d) array, the compiled kernel (`kernels.posterior`) fills the log densities
and an (n, k) array of probabilities, which becomes the values buffer of the output list column.
With handleInvalid='keep' (`marginalise`), a row with missing values (null, NaN, ±inf) is scored
by the marginal density of its observed features (`latent_estep.gaussian_posterior`, rows grouped
by missingness pattern); only batches that hold such rows pay for it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import Column, DataFrame, functions as F

from .kernels import posterior, row_uniforms
from .latent_estep import gaussian_posterior
from .mixture import Mixture
from .rows import feature_rows, observed_rows, usable_weights

SCORES_SCHEMA = "prediction int, probability array<double>, logLikelihood double"
PREDICTIONS_SCHEMA = "prediction int, logLikelihood double"  # scores without the probabilities
WEIGHTED_SCHEMA = "logLikelihood double, weight double"


def unscorable(d: int) -> str:
    """What makes a row unscorable by a model of d features (one wording for every message)."""
    return f"null, NaN or infinite features, or other than {d} features (the model's)"


def _scored(features: pa.Array, mixture: Mixture, center: np.ndarray, marginalise: bool):
    """(unusable (n,), log p(x) (n,), probabilities (n, k)) of an Arrow list<double> array; with
    `marginalise`, rows with some finite feature are scored on those (unusable: none finite)."""
    x, missing, nonfinite = feature_rows(features, mixture.d)
    unusable = missing | nonfinite
    x -= center
    log_density, probability = posterior(x, mixture)
    if marginalise and unusable.any():
        partial, _ = observed_rows(features.filter(pa.array(unusable)), mixture.d)
        log_density[unusable], probability[unusable] = gaussian_posterior(partial - center, mixture)
        unusable = np.isnan(log_density)
    return unusable, log_density, probability


def scores_arrow(features: pa.Array, mixture: Mixture, center: np.ndarray, marginalise: bool = False,
                 probabilities: bool = True) -> pa.StructArray:
    """SCORES_SCHEMA of each row (nulls for unusable rows), PREDICTIONS_SCHEMA without
    `probabilities`; the probabilities (n, k) are the values buffer of the list column, with no
    copy per row."""
    unusable, log_density, probability = _scored(features, mixture, center, marginalise)
    n, k = probability.shape
    columns = {"prediction": pa.array(probability.argmax(axis=1).astype(np.int32), mask=unusable)}
    if probabilities:
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
        columns["probability"] = pa.ListArray.from_arrays(offsets, pa.array(probability.ravel()), mask=pa.array(unusable))
    columns["logLikelihood"] = pa.array(log_density, mask=unusable)
    return pa.StructArray.from_arrays(list(columns.values()), names=list(columns))


def weighted_log_density_arrow(features: pa.Array, weights: pa.Array, mixture: Mixture,
                               center: np.ndarray, marginalise: bool = False) -> pa.StructArray:
    """WEIGHTED_SCHEMA of each row: its log density and weight, both null when the row cannot be
    scored or its weight is not usable (`rows.usable_weights`, the rule a fit applies)."""
    unusable, log_density, _ = _scored(features, mixture, center, marginalise)
    w = np.asarray(weights.to_numpy(zero_copy_only=False), dtype=np.float64)  # null → NaN: not usable
    left_out = unusable | ~usable_weights(w)
    return pa.StructArray.from_arrays(
        [pa.array(log_density, mask=left_out), pa.array(w, mask=left_out)], names=["logLikelihood", "weight"]
    )


def _columns_udf(compute, schema: str):
    """`compute` (Arrow arrays: the features as list<double>, then any double columns → an Arrow
    array of `schema`) as a UDF: an Arrow UDF (Spark ≥ 4.1), else a pandas UDF around it (Spark
    4.0, which converts each row's list to a numpy array and back)."""
    try:
        from pyspark.sql.functions import arrow_udf
    except ImportError:
        from pyspark.sql.functions import pandas_udf

        def via_pandas(features: pd.Series, *others: pd.Series) -> pd.DataFrame:
            arrays = [pa.array(other, type=pa.float64(), from_pandas=True) for other in others]
            out = compute(pa.array(features, type=pa.list_(pa.float64())), *arrays)
            return pa.Table.from_struct_array(out).to_pandas(integer_object_nulls=True)

        return pandas_udf(via_pandas, schema)

    def via_arrow(features: pa.Array, *others: pa.Array) -> pa.Array:
        return compute(features, *others)

    return arrow_udf(via_arrow, schema)


def scoring_udf(mixture: Mixture, center: np.ndarray, marginalise: bool = False, probabilities: bool = True):
    """UDF of an array<double> column: prediction, probability (k,) and log density of each row
    (null for unusable rows; with `marginalise`, for rows with no finite feature); without
    `probabilities`, no probability field, which spares Spark its conversion (about a third of a
    `transform`). `mixture` (k components, d features) is in coordinates shifted by `center` (d,)."""
    return _columns_udf(
        lambda features: scores_arrow(features, mixture, center, marginalise, probabilities),
        SCORES_SCHEMA if probabilities else PREDICTIONS_SCHEMA,
    )


def weighted_log_likelihood_udf(mixture: Mixture, center: np.ndarray, marginalise: bool = False):
    """UDF of (features array<double>, weight double): `weighted_log_density_arrow` of each row.
    `mixture` (k components, d features) is in coordinates shifted by `center` (d,)."""
    return _columns_udf(
        lambda features, weights: weighted_log_density_arrow(features, weights, mixture, center, marginalise),
        WEIGHTED_SCHEMA,
    )


def log_likelihood_sums(dataset: DataFrame, scores: Column) -> tuple[float, float, int]:
    """(Σ w·log p(x), Σ w, rows left out) over `dataset` in one pass, where `scores` is the
    `weighted_log_likelihood_udf` column (nulls mark the rows left out)."""
    usable = scores.logLikelihood.isNotNull() & scores.weight.isNotNull()
    total, mass, left_out = dataset.select(
        F.sum(F.when(usable, scores.logLikelihood * scores.weight)),
        F.sum(F.when(usable, scores.weight)),
        F.count(F.when(~usable, F.lit(1))),
    ).first()
    return total, mass, left_out


def refuse_unscorable(value: Column, scores: Column, column: str, d: int) -> Column:
    """`value`, or a Spark error naming the problem when the row behind `scores` is unscorable."""
    message = f"a row of '{column}' cannot be scored ({unscorable(d)}); set handleInvalid='skip' or 'keep'"
    return F.when(scores.prediction.isNull(), F.raise_error(F.lit(message))).otherwise(value)


def sampler(mixture: Mixture, seed: int):
    """mapInPandas function from batches of `id` (n,) to `features` (n, d) and `component` (n,):
    row i's component and Gaussian draw come from uniforms hashed from (i, seed)."""
    cumulative = np.cumsum(mixture.weights)
    factors = np.linalg.cholesky(mixture.covariances)

    def draw(batches):
        for batch in batches:
            ids = batch["id"].to_numpy(dtype=np.float64)[:, None]
            d = mixture.d
            pick = np.searchsorted(cumulative, row_uniforms(ids, seed, 0) * cumulative[-1], side="right")
            pick = np.minimum(pick, mixture.k - 1)
            u = np.column_stack([1.0 - row_uniforms(ids, seed, 1 + j) for j in range(2 * d)])
            z = np.sqrt(-2.0 * np.log(u[:, :d])) * np.cos(2.0 * np.pi * u[:, d:])  # Box–Muller
            x = mixture.means[pick] + np.einsum("nij,nj->ni", factors[pick], z)
            yield pd.DataFrame({"features": list(x), "component": pick.astype(np.int32)})

    return draw
