"""Scoring rows with a fitted mixture in the executors: the pandas UDFs behind `transform` and behind
`score`, `bic` and `aic`, and the sampler. Which rows (and weights) can be used is `rows`' rule,
evaluated here on the same numpy arrays as when a fit packs its blocks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import Column, DataFrame, functions as F
from pyspark.sql.functions import pandas_udf

from .kernels import posterior, row_uniforms
from .mixture import Mixture
from .rows import feature_rows, usable_weights

SCORES_SCHEMA = "prediction int, probability array<double>, logLikelihood double"
WEIGHTED_SCHEMA = "logLikelihood double, weight double"


def unscorable(d: int) -> str:
    """What makes a row unscorable by a model of d features (one wording for every message)."""
    return f"null, NaN or infinite features, or other than {d} features (the model's)"


def scoring_udf(mixture: Mixture, center: np.ndarray):
    """pandas UDF of an array<double> column: prediction, probability (k,) and log density of each
    row (null for unusable rows). `mixture` (k components, d features) is in coordinates shifted by
    `center` (d,)."""

    @pandas_udf(SCORES_SCHEMA)
    def score(features: pd.Series) -> pd.DataFrame:
        x, missing, nonfinite = feature_rows(pa.array(features, type=pa.list_(pa.float64())), mixture.d)
        usable = ~(missing | nonfinite)
        log_norm, probability = posterior(x - center, mixture)
        return pd.DataFrame(
            {
                "prediction": pd.Series(probability.argmax(axis=1), dtype="Int32").where(usable),
                "probability": [p if ok else None for p, ok in zip(probability, usable)],
                "logLikelihood": np.where(usable, log_norm, np.nan),
            }
        )

    return score


def weighted_log_likelihood_udf(mixture: Mixture, center: np.ndarray):
    """pandas UDF of (features array<double>, weight double): each row's log density and weight,
    both null when the row cannot be scored or its weight is not usable (`rows.usable_weights`, the
    rule a fit applies). `mixture` (k components, d features) is in coordinates shifted by `center` (d,)."""

    @pandas_udf(WEIGHTED_SCHEMA)
    def score(features: pd.Series, weights: pd.Series) -> pd.DataFrame:
        x, missing, nonfinite = feature_rows(pa.array(features, type=pa.list_(pa.float64())), mixture.d)
        w = weights.to_numpy(dtype=np.float64, na_value=np.nan)  # null → NaN: not usable
        usable = ~(missing | nonfinite) & usable_weights(w)
        log_norm, _ = posterior(x - center, mixture)
        return pd.DataFrame(
            {"logLikelihood": np.where(usable, log_norm, np.nan), "weight": np.where(usable, w, np.nan)}
        )

    return score


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
