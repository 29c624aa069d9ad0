"""`MixedMixtureModel`: a fitted latent class model over mixed columns, labelled by column name;
scoring in the executors (the observed part of each row), profiles, and persistence."""

from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.ml import Model
from pyspark.sql import Column, DataFrame, SparkSession, functions as F
from pyspark.sql.functions import pandas_udf

from . import codec, persistence
from .exceptions import InvalidInputError
from .inputs import (
    adds_no_column,
    named_column,
    probability_output,
    require_batch,
    rows_for_python_udfs,
    transform_output,
    weight_column,
)
from .latent import LatentClassModel, model_arrays
from .latent_estep import posterior
from .mixed import MixedMixtureParams
from .mixed_input import KINDS, UNUSABLE, MixedSchema, coded, coded_rows, first_problem
from .mixture import information_criterion

SCORES_SCHEMA = "prediction int, probability array<double>, logDensity double, problem int"


def scoring_udf(model: LatentClassModel, schema: MixedSchema):
    """pandas UDF of the coded feature columns: prediction, probability and log density of the
    observed part of each row (unusable values marginalised; nulls for a row with nothing
    usable), and the `mixed_input.first_problem` code of the row (null if it has none)."""
    columns = schema.columns

    @pandas_udf(SCORES_SCHEMA)
    def score(features: pd.DataFrame) -> pd.DataFrame:
        values = [features[c].to_numpy(dtype=np.float64) for c in features.columns]
        rows, seen = coded_rows(values, schema, "keep")
        post = posterior(model, columns.block(rows, rows - schema.shift, None))
        problem = first_problem(values, schema)
        return pd.DataFrame({
            "prediction": pd.Series(post.responsibilities.argmax(axis=1), dtype="Int32").where(seen),
            "probability": [p if ok else None for p, ok in zip(post.responsibilities, seen)],
            "logDensity": pd.Series(post.log_density, dtype="Float64").where(seen),
            "problem": pd.Series(problem, dtype="Int32").where(problem >= 0),
        })

    return score


def problem_message(schema: MixedSchema, problem: Column) -> Column:
    """The message of a `first_problem` code: the column, and its value when it is unusable."""
    texts = []
    for f in schema.features:
        where = f"{f.kind} column '{f.name}'"
        texts.append(F.lit(f"{where} has a missing value (null or NaN)"))
        texts.append(F.concat(F.lit(f"{where} holds '"), named_column(f.name).cast("string"),
                              F.lit(f"' ({UNUSABLE[f.kind]} are not usable)")))
    return F.element_at(F.array(*texts), problem + 1)


class MixedMixtureModel(MixedMixtureParams, Model, persistence.Persistable):
    """A fitted latent class model: class weights and, per class, the Gaussian block, Bernoulli
    probabilities, categorical tables and Poisson rates, all labelled by column name."""

    def __init__(self, latent: LatentClassModel, schema: MixedSchema):
        super().__init__()
        self._latent, self._schema = latent, schema
        self._summary = None
        self._training: dict | None = None  # a loaded model's summary figures
        self._set(k=latent.k)

    def attach_summary(self, dataset: DataFrame, result, skipped: int, total_weight: float) -> None:
        """Give a freshly fitted model its training summary (`em.FitResult` of the fit)."""
        self._summary = MixedMixtureSummary(self, dataset, result, skipped, total_weight)

    # -- parameters ----------------------------------------------------------------------------

    def _frame(self, values: np.ndarray, names: list[str]) -> pd.DataFrame:
        return pd.DataFrame(values, columns=names, index=pd.RangeIndex(self.getK(), name="class"))

    @property
    def weights(self) -> list[float]:
        return self._latent.weights.tolist()

    @property
    def means(self) -> pd.DataFrame:
        """k × Gaussian columns: each class's mean."""
        d = self._latent.d
        means = self._latent.gaussian.means + self._schema.shift[:d] if d else np.zeros((self.getK(), 0))
        return self._frame(means, self._schema.names("gaussian"))

    @property
    def covariances(self) -> list[pd.DataFrame]:
        """Per class, the Gaussian columns' covariance matrix (full for every covarianceType)."""
        names = self._schema.names("gaussian")
        if not names:
            return []
        return [pd.DataFrame(c, index=names, columns=names) for c in self._latent.gaussian.covariances]

    @property
    def featureTypes(self) -> dict[str, list[str]]:
        """The input columns by kind (gaussian, bernoulli, categorical, poisson), in the model's order."""
        return {kind: self._schema.names(kind) for kind in KINDS}

    @property
    def bernoulliValues(self) -> dict:
        """Per Bernoulli column, (value coded 0, value coded 1): 0/1, False/True, or its two
        values in sorted order."""
        return {f.name: tuple(f.values) for f in self._schema.of("bernoulli")}

    @property
    def bernoulliProbabilities(self) -> pd.DataFrame:
        """k × Bernoulli columns: P(column = its value coded 1 | class)."""
        return self._frame(self._latent.bernoulli, self._schema.names("bernoulli"))

    @property
    def categoricalProbabilities(self) -> dict[str, pd.DataFrame]:
        """Per categorical column, a k × levels table of P(level | class) (levels as columns)."""
        return {f.name: self._frame(t, list(f.values))
                for f, t in zip(self._schema.of("categorical"), self._latent.categorical)}

    @property
    def poissonRates(self) -> pd.DataFrame:
        """k × count columns: each class's Poisson rate."""
        return self._frame(self._latent.poisson, self._schema.names("poisson"))

    @property
    def numParameters(self) -> int:
        """Free parameters (for BIC and AIC)."""
        return self._latent.free_parameters()

    def profile(self) -> DataFrame:
        """One row per class and feature: the class weight, the feature's kind, its mean (Gaussian
        mean, P(value coded 1), Poisson rate), standard deviation (Gaussian, Poisson), most
        probable value and its probability, and the distribution over values (Bernoulli,
        categorical)."""
        rows = []
        means, sds = self.means, {}
        if self._latent.d:
            sds = np.sqrt(np.diagonal(self._latent.gaussian.covariances, axis1=1, axis2=2))
        for j, weight in enumerate(self.weights):
            for i, name in enumerate(self._schema.names("gaussian")):
                rows.append((j, weight, name, "gaussian", float(means.iloc[j, i]), float(sds[j, i]), None, None, None))
            for f, p in zip(self._schema.of("bernoulli"), self._latent.bernoulli[j]):
                dist = {str(f.values[0]): float(1 - p), str(f.values[1]): float(p)}
                top = max(dist, key=dist.get)
                rows.append((j, weight, f.name, "bernoulli", float(p), None, top, dist[top], dist))
            for f, t in zip(self._schema.of("categorical"), self._latent.categorical):
                dist = {str(v): float(p) for v, p in zip(f.values, t[j])}
                top = max(dist, key=dist.get)
                rows.append((j, weight, f.name, "categorical", None, None, top, dist[top], dist))
            for name, rate in zip(self._schema.names("poisson"), self._latent.poisson[j]):
                rows.append((j, weight, name, "poisson", float(rate), float(np.sqrt(rate)), None, None, None))
        return SparkSession.active().createDataFrame(
            rows, "class int, weight double, feature string, kind string, mean double, std double, "
                  "mode string, modeProbability double, probabilities map<string,double>")

    # -- scoring -------------------------------------------------------------------------------

    def _scores(self, dataset: DataFrame) -> Column:
        missing = [f.name for f in self._schema.features if f.name not in dataset.columns]
        if missing:
            raise InvalidInputError(f"column '{missing[0]}' of the model not found in the input "
                                    f"(the model reads {', '.join(f.name for f in self._schema.features)})")
        features = F.struct(*[coded(dataset, f).alias(f"c{i}") for i, f in enumerate(self._schema.features)])
        return scoring_udf(self._latent, self._schema)(features)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        """Adds prediction, probability and log density of each row's observed part (an empty
        column name leaves that column out). A missing or unusable value (an unseen level, say)
        fails the query naming the column and the value (handleInvalid='error'), drops the row
        ('skip'), or is marginalised ('keep'); a row with nothing usable gets nulls."""
        names = {"predictionCol": self.getPredictionCol(), "probabilityCol": self.getProbabilityCol(),
                 "logDensityCol": self.getLogDensityCol()}
        if adds_no_column(names):
            return dataset
        scores = F.col("__spark_gmm_scores")
        scored = rows_for_python_udfs(dataset).withColumn("__spark_gmm_scores", self._scores(dataset))
        handle = self.getHandleInvalid()
        if handle == "skip":
            scored = scored.where(scores.problem.isNull())
        refuse = None
        if handle == "error":
            message = F.concat(problem_message(self._schema, scores.problem),
                               F.lit("; set handleInvalid='keep' or 'skip'"))
            refuse = lambda value: F.when(scores.problem.isNotNull(), F.raise_error(message)).otherwise(value)  # noqa: E731
        values = {
            "predictionCol": scores.prediction,
            "probabilityCol": probability_output(scores.probability, self.getProbabilityFormat()),
            "logDensityCol": scores.logDensity,
        }
        return transform_output(dataset, scored, names, values, refuse)

    def _log_likelihood(self, dataset: DataFrame) -> tuple[float, float]:
        """(Σ w·log p(observed part), Σ w) over the rows with something usable, in one pass."""
        require_batch(dataset, "score (and bic, aic)")
        w = weight_column(dataset, self.weightName())
        frame = rows_for_python_udfs(dataset).select(
            self._scores(dataset).alias("__spark_gmm_scores"),
            (F.lit(1.0) if w is None else w).alias("__spark_gmm_weight"),
            *[named_column(f.name) for f in self._schema.features],  # for the message
        )
        scores, weight = F.col("__spark_gmm_scores"), F.col("__spark_gmm_weight")
        usable = scores.logDensity.isNotNull() & weight.isNotNull() & (weight >= 0) & (weight < float("inf"))
        if self.getHandleInvalid() == "skip":
            usable = usable & scores.problem.isNull()
        total, mass, bad, first = frame.select(
            F.sum(F.when(usable, scores.logDensity * weight)), F.sum(F.when(usable, weight)),
            F.count(scores.problem),
            F.first(F.when(scores.problem.isNotNull(), problem_message(self._schema, scores.problem)),
                    ignorenulls=True),
        ).first()
        if bad and self.getHandleInvalid() == "error":
            raise InvalidInputError(f"{bad} rows cannot be scored; the first: {first}; set handleInvalid='keep' "
                                    "or 'skip'")
        if not mass:
            raise InvalidInputError("no rows to score: the input is empty, or no row has a usable value")
        return float(total), float(mass)

    def score(self, dataset: DataFrame) -> float:
        """Mean log density of the rows' observed parts (per unit of weight with weightCol)."""
        total, mass = self._log_likelihood(dataset)
        return total / mass

    def bic(self, dataset: DataFrame) -> float:
        """Bayesian information criterion on `dataset` (lower is better); n is the total weight."""
        total, mass = self._log_likelihood(dataset)
        return information_criterion("bic", total, self.numParameters, mass)

    def aic(self, dataset: DataFrame) -> float:
        """Akaike information criterion on `dataset` (lower is better)."""
        total, mass = self._log_likelihood(dataset)
        return information_criterion("aic", total, self.numParameters, mass)

    # -- summary and persistence ---------------------------------------------------------------

    @property
    def hasSummary(self) -> bool:
        return self._summary is not None

    @property
    def summary(self) -> "MixedMixtureSummary":
        if self._summary is None:
            raise RuntimeError("no training summary: this model was not fitted in this session")
        return self._summary

    @property
    def trainingFigures(self) -> dict | None:
        """The training summary's figures, also on a loaded model."""
        return self._summary.to_dict() if self._summary is not None else self._training

    def _save(self, path: str, overwrite: bool) -> str:
        arrays = model_arrays(self._latent)
        shapes = {name: list(a.shape) for name, a in arrays.items()}
        extra = {"k": self.getK(), "schema": self._schema.to_dict(), "covarianceType": self._latent.covariance_type,
                 "shapes": shapes, "summary": self.trainingFigures}
        return persistence.write_directory(self, path, overwrite, extra, arrays=arrays)

    @classmethod
    def _load(cls, path: str) -> "MixedMixtureModel":
        metadata = persistence.read_metadata(path, cls.__name__)
        schema = MixedSchema.from_dict(metadata["schema"])
        spark = SparkSession.active()
        try:
            a = codec.read(spark, f"{path}/data", {n: tuple(s) for n, s in metadata["shapes"].items()},
                           metadata["writeId"], f"{path}/metadata")
        except codec.PayloadError as why:
            raise persistence.ModelFormatError(f"{path}/data: {why}") from None
        k, columns = metadata["k"], schema.columns
        latent = LatentClassModel.create(
            a["weights"], a.get("means", np.zeros((k, 0))), a.get("covariances"), metadata["covarianceType"],
            a.get("bernoulli", np.zeros((k, 0))), [a.get(f"categorical{i}") for i in range(columns.c)],
            a.get("poisson", np.zeros((k, 0))),
        )
        model = cls(latent, schema)
        model._training = metadata.get("summary")
        persistence.restore_params(model, metadata)
        return model

    def __repr__(self) -> str:
        return f"MixedMixtureModel(uid={self.uid}, k={self.getK()}, columns={len(self._schema.features)})"


class MixedMixtureSummary:
    """Training summary: log-likelihood, iterations, convergence, class sizes, rows left out, the
    checkpoint's iteration a resumed fit started from."""

    def __init__(self, model: MixedMixtureModel, dataset: DataFrame, result, skipped: int, total_weight: float):
        self._model, self._dataset, self._predictions = model, dataset, None
        self.k = model.getK()
        self.logLikelihood = float(result.log_likelihood)
        self.objectiveHistory = [float(v) for v in result.history]
        self.numIter = int(result.iterations)
        self.converged = bool(result.converged)
        self.clusterSizes = list(result.cluster_sizes)
        self.iterationSeconds = list(result.iteration_seconds)
        self.resumedFromIteration = int(result.resumed_from)  # 0: not resumed from a checkpoint
        self.invalidRowsSkipped = int(skipped)
        self.totalWeight = float(total_weight)

    @property
    def predictions(self) -> DataFrame:
        if self._predictions is None:
            self._predictions = self._model.transform(self._dataset)
        return self._predictions

    def to_dict(self) -> dict:
        return {key: value for key, value in vars(self).items() if not key.startswith("_")}
