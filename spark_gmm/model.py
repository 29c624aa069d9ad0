"""`GaussianMixtureModel`: a fitted mixture in the data's coordinates, scoring rows in the executors
(`scoring`), sampling, alignment to a previous model, and persistence; `fitted_model` makes one
from a fit's result (its training summary is `summary.GaussianMixtureSummary`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pyspark.ml import Model
from pyspark.ml.functions import array_to_vector
from pyspark.ml.linalg import DenseMatrix, DenseVector, Vector, Vectors
from pyspark.ml.stat import MultivariateGaussian
from pyspark.sql import DataFrame, SparkSession, functions as F

from . import codec, persistence
from .alignment import MAX_DIVERGENCE, add_label_changes, align, drift
from .exceptions import InvalidInputError
from .inputs import (
    adds_no_column,
    feature_count,
    probability_output,
    require_batch,
    rows_for_python_udfs,
    transform_output,
)
from .kernels import posterior
from .latent_estep import gaussian_posterior
from .mixture import COVARIANCE_TYPES, Mixture, free_parameters, information_criterion, precision_cholesky
from .params import GaussianMixtureParams
from .scoring import (
    log_likelihood_sums,
    refuse_unscorable,
    sampler,
    scoring_udf,
    unscorable,
    weighted_log_likelihood_udf,
)
from .summary import GaussianMixtureSummary

if TYPE_CHECKING:
    from .fitting import Fitted


class GaussianMixtureModel(GaussianMixtureParams, Model, persistence.Persistable):
    """A fitted Gaussian mixture: weights, means and full covariances in the data's coordinates."""

    def __init__(self, weights, means, covariances):
        super().__init__()
        means = np.atleast_2d(np.asarray(means, dtype=np.float64))
        k, d = means.shape
        weights, means, covariances = codec.checked_mixture(
            np.asarray(weights, dtype=np.float64).reshape(k),
            means,
            np.asarray(covariances, dtype=np.float64).reshape(k, d, d),
        )
        # Weights that already sum to 1 are kept as they are, so a save and load is exact (dividing
        # by a sum of 1 ± rounding is not idempotent); checked_mixture has proven every covariance
        # positive definite: no repair to attempt.
        if abs(weights.sum() - 1.0) > 1e-12:
            weights = weights / weights.sum()
        self._mixture = Mixture(weights, means, covariances, precision_cholesky(covariances))
        # Scoring works around the means' centre, as fitting works around the data's.
        self._center = (means.min(axis=0) + means.max(axis=0)) / 2
        self._centred = self._mixture.shifted(-self._center)
        self._summary: GaussianMixtureSummary | None = None
        self._feature_names: list[str] | None = None
        self._alignment: dict | None = None
        self._training: dict | None = None  # a loaded model's saved summary figures
        self._setDefault(k=k)
        self._set(k=k)

    @classmethod
    def fromArrays(cls, weights, means, covariances, covarianceType: str = "full") -> "GaussianMixtureModel":
        """A model from k weights, k×d means and k×d×d covariances (to score, or to start a fit);
        `covarianceType` must describe the covariances (it sets the parameter count of bic/aic)."""
        model = cls(weights, means, covariances)
        if covarianceType not in COVARIANCE_TYPES:
            raise ValueError(f"covarianceType must be one of {COVARIANCE_TYPES}, got '{covarianceType}'")
        covariances = model.covariances
        diagonal_only = not (covariances * (1 - np.eye(model.numFeatures))).any()
        variances = np.diagonal(covariances, axis1=1, axis2=2)
        fits = {
            "full": True,
            "diag": diagonal_only,
            "spherical": diagonal_only and (variances == variances[:, :1]).all(),
            "tied": (covariances == covariances[0]).all(),
        }[covarianceType]
        if not fits:
            raise ValueError(f"the covariances do not have the structure of covarianceType '{covarianceType}'")
        return model._set(covarianceType=covarianceType)

    @classmethod
    def fromMLlib(cls, model) -> "GaussianMixtureModel":
        """A spark_gmm model with the parameters and column settings of a fitted
        `pyspark.ml.clustering.GaussianMixtureModel` (to score with it, or to start a fit from it)."""
        rows = model.gaussiansDF.collect()  # works in classic and Spark Connect sessions
        means = [row["mean"].toArray() for row in rows]
        covariances = [row["cov"].toArray() for row in rows]
        converted = cls(list(model.weights), means, covariances)
        for name in ("featuresCol", "predictionCol", "probabilityCol"):
            converted._set(**{name: model.getOrDefault(name)})
        return converted

    @property
    def weights(self) -> list[float]:
        return self._mixture.weights.tolist()

    @property
    def means(self) -> np.ndarray:
        return self._mixture.means.copy()

    @property
    def covariances(self) -> np.ndarray:
        return self._mixture.covariances.copy()

    @property
    def numFeatures(self) -> int:
        return self._mixture.d

    @property
    def featureNames(self) -> list[str] | None:
        """The features' names (inputCols, or the vector column's attributes), when known."""
        return None if self._feature_names is None else list(self._feature_names)

    @property
    def gaussians(self) -> list[MultivariateGaussian]:
        d = self.numFeatures
        return [
            MultivariateGaussian(DenseVector(mu), DenseMatrix(d, d, cov.ravel(order="F").tolist()))
            for mu, cov in zip(self._mixture.means, self._mixture.covariances)
        ]

    @property
    def gaussiansDF(self) -> DataFrame:
        """One row per component: `mean` (vector) and `cov` (matrix), as in MLlib."""
        spark = SparkSession.active()
        return spark.createDataFrame(
            [(g.mean, g.cov) for g in self.gaussians], ["mean", "cov"]
        )

    @property
    def componentIds(self) -> list[int]:
        """The stable id of each component (`prediction` is the position in this list): 0..k-1
        unless the model was aligned to a previous one (`alignTo`)."""
        return list(self._alignment["componentIds"]) if self._alignment else list(range(self.getK()))

    @property
    def alignment(self) -> dict | None:
        """How `alignTo` renumbered the components, with the drift figures; None if not aligned."""
        return self._alignment

    def alignTo(self, previous: "GaussianMixtureModel", maxDivergence: float = MAX_DIVERGENCE,
                dataset: DataFrame | None = None) -> "GaussianMixtureModel":
        """This model with its components renumbered to continue `previous`'s ids (docs/recurring.md):
        each is matched to at most one previous component by a minimum-total Bhattacharyya divergence
        assignment; one with no match within `maxDivergence` gets a never-issued id. `alignment`
        holds the mapping and the drift; with `dataset`, also the share of its rows whose id changed
        (both models score it in one pass)."""
        if not isinstance(previous, GaussianMixtureModel):
            raise TypeError(f"previous must be a GaussianMixtureModel, got {type(previous).__name__}")
        if previous.numFeatures != self.numFeatures:
            raise ValueError(f"the previous model has {previous.numFeatures} features, this one {self.numFeatures}")
        mine, theirs = self._mixture, previous._mixture
        next_id = previous._alignment["nextComponentId"] if previous._alignment else previous.getK()
        found = align(mine.means, mine.covariances, theirs.means, theirs.covariances,
                      previous.componentIds, next_id, maxDivergence)
        order = found.order
        aligned = GaussianMixtureModel(mine.weights[order], mine.means[order], mine.covariances[order])
        self._copyValues(aligned)
        aligned._resetUid(self.uid)
        aligned._feature_names = self._feature_names
        aligned._alignment = {
            "componentIds": found.ids.tolist(), "nextComponentId": found.next_id,
            "previousComponentIds": previous.componentIds, "maxDivergence": float(maxDivergence),
            **drift(mine.weights[order], mine.means[order], mine.covariances[order], theirs.weights, theirs.means,
                    theirs.covariances, found.ids, previous.componentIds, found.previous),
        }
        if dataset is not None:
            add_label_changes(aligned._alignment, *_label_change_counts(aligned, previous, dataset))
        if self._summary is not None:
            aligned._summary = self._summary.renumbered(aligned, order)
        return aligned

    @property
    def hasSummary(self) -> bool:
        return self._summary is not None

    @property
    def trainingFigures(self) -> dict | None:
        """The training summary's figures (k, clusterSizes, logLikelihood, logLikelihoodHistory,
        numIter, converged, stopReason, totalWeight, ...): also on a loaded model, which has no
        `summary`; None for a model that was never fitted (fromArrays)."""
        if self._summary is not None:
            return self._summary.to_dict()
        return None if self._training is None else dict(self._training)

    @property
    def summary(self) -> "GaussianMixtureSummary":
        if self._summary is None:
            raise RuntimeError("no training summary: this model was not fitted in this session")
        return self._summary

    def _posterior(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return posterior(np.asarray(x, dtype=np.float64) - self._center, self._centred)

    def _as_row(self, vector) -> np.ndarray:
        x = np.asarray(vector.toArray() if isinstance(vector, Vector) else vector, dtype=np.float64)
        if x.shape != (self.numFeatures,):
            raise ValueError(f"expected a vector of {self.numFeatures} features, got shape {x.shape}")
        return x[None, :]

    def predict(self, value) -> int:
        """Most probable component of one feature vector."""
        return int(self._posterior(self._as_row(value))[1].argmax())

    def predictProbability(self, value) -> DenseVector:
        """Posterior probability of each component for one feature vector."""
        return Vectors.dense(self._posterior(self._as_row(value))[1][0])

    def scoreArray(self, x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction (n,), probability (n, k), log density (n,)) of the rows of the n×d array `x`,
        in numpy on the driver (no Spark), computed as `transform` computes them: with
        handleInvalid='keep', a row with NaN or ±inf values on its finite ones (a row with none:
        prediction -1, probabilities 0, log density NaN)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.numFeatures:
            raise ValueError(f"expected an array of shape (n, {self.numFeatures}), got {x.shape}")
        log_density, probability = self._posterior(x)
        missing = ~np.isfinite(x).all(axis=1)
        if not (self._marginalise() and missing.any()):
            return probability.argmax(axis=1), probability, log_density
        partial = np.where(np.isfinite(x[missing]), x[missing], np.nan) - self._center
        log_density[missing], probability[missing] = gaussian_posterior(partial, self._centred)
        return np.where(np.isnan(log_density), -1, probability.argmax(axis=1)), probability, log_density

    def _transform(self, dataset: DataFrame) -> DataFrame:
        """Adds prediction, probability (and logLikelihoodCol); as in MLlib, an empty predictionCol
        or probabilityCol leaves that column out (without probabilities, scoring is cheaper). A row
        that cannot be scored fails the query (handleInvalid='error', as MLlib), is dropped
        ('skip'), or ('keep') is scored on its finite features by their marginal density (nulls if
        it has none)."""
        self._check_feature_count(dataset)
        names = {"predictionCol": self.getPredictionCol(), "probabilityCol": self.getProbabilityCol(),
                 "logLikelihoodCol": self.getLogLikelihoodCol() or ""}
        if adds_no_column(names):
            return dataset
        scores = F.col("__spark_gmm_scores")
        udf = scoring_udf(self._centred, self._center, self._marginalise(), probabilities=bool(names["probabilityCol"]))
        scored = rows_for_python_udfs(dataset).withColumn("__spark_gmm_scores", udf(self.featureColumn(dataset)))
        handle = self.getHandleInvalid()
        if handle == "skip":
            scored = scored.where(scores.prediction.isNotNull())
        values = {"predictionCol": scores.prediction, "logLikelihoodCol": scores.logLikelihood}
        if names["probabilityCol"]:
            values["probabilityCol"] = probability_output(scores.probability, self.getProbabilityFormat())
        refuse = None
        if handle == "error":
            refuse = lambda value: refuse_unscorable(value, scores, self._features_label(), self.numFeatures)  # noqa: E731
        return transform_output(dataset, scored, names, values, refuse)

    def _marginalise(self) -> bool:
        """Whether rows with missing features are scored on their observed ones (handleInvalid='keep')."""
        return self.getHandleInvalid() == "keep"

    def _features_label(self) -> str:
        return ", ".join(self.getInputCols()) if self.isDefined(self.inputCols) else self.getFeaturesCol()

    def _check_feature_count(self, dataset: DataFrame) -> None:
        """Refuse at once when the schema tells the feature count (inputCols, or a vector column's
        ML attributes) and it is not the model's; otherwise rows are checked as they are scored."""
        input_cols = self.getInputCols() if self.isDefined(self.inputCols) else None
        count = feature_count(dataset, self.getFeaturesCol(), input_cols)
        if count is not None and count != self.numFeatures:
            raise InvalidInputError(
                f"the model has {self.numFeatures} features but '{self._features_label()}' has {count}"
            )

    def _log_likelihood(self, dataset: DataFrame) -> tuple[float, float]:
        """(Σ w·log p(x), Σ w) over `dataset`, in one pass; rows that cannot be scored, or whose
        weight a fit would refuse, are refused (or, with handleInvalid 'skip' or 'keep', left out)."""
        require_batch(dataset, "score (and bic, aic)")
        self._check_feature_count(dataset)
        weight = self.weightColumn(dataset)
        scores = weighted_log_likelihood_udf(self._centred, self._center, self._marginalise())(
            self.featureColumn(dataset), F.lit(1.0) if weight is None else weight
        )
        total, mass, bad = log_likelihood_sums(rows_for_python_udfs(dataset), scores)
        if bad and self.getHandleInvalid() == "error":
            raise InvalidInputError(
                f"{bad} rows cannot be scored ({unscorable(self.numFeatures)}, or a null, negative, "
                "NaN or infinite weight); set handleInvalid='skip' to leave them out"
            )
        if not mass:
            raise InvalidInputError("no rows to score: the input is empty")
        return float(total), float(mass)

    def score(self, dataset: DataFrame) -> float:
        """Mean log-likelihood per row (per unit of weight with weightCol), as scikit-learn's."""
        total, mass = self._log_likelihood(dataset)
        return total / mass

    def bic(self, dataset: DataFrame) -> float:
        """Bayesian information criterion on `dataset` (lower is better), with scikit-learn's count
        of free parameters; n is the row count (the total weight with weightCol)."""
        total, mass = self._log_likelihood(dataset)
        return information_criterion("bic", total, self._free_parameters(), mass)

    def aic(self, dataset: DataFrame) -> float:
        """Akaike information criterion on `dataset` (lower is better)."""
        total, mass = self._log_likelihood(dataset)
        return information_criterion("aic", total, self._free_parameters(), mass)

    def _free_parameters(self) -> int:
        return free_parameters(self.getK(), self.numFeatures, self.getCovarianceType())

    def sample(self, n: int, seed: int = 0, numPartitions: int | None = None) -> DataFrame:
        """`n` rows drawn from the mixture: `features` (vector) and `component` (int).

        Row i's draw is a function of (i, seed) alone, so the sample does not depend on the
        partitioning.
        """
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        spark = SparkSession.active()
        ids = spark.range(0, n, numPartitions=numPartitions)
        drawn = ids.mapInPandas(
            sampler(self._mixture, seed), "features array<double>, component int"
        )
        return drawn.select(array_to_vector("features").alias("features"), "component")

    def _save(self, path: str, overwrite: bool) -> str:
        extra = {
            "k": self.getK(),
            "numFeatures": self.numFeatures,
            "featureNames": self._feature_names,
            "covarianceType": self.getCovarianceType(),
        }
        if self._summary is not None:
            extra["summary"] = self._summary.to_dict()
        if self._alignment is not None:
            extra["alignment"] = self._alignment
        mixture = self._mixture
        return persistence.write_directory(
            self, path, overwrite, extra, (mixture.weights, mixture.means, mixture.covariances)
        )

    @classmethod
    def _load(cls, path: str) -> "GaussianMixtureModel":
        metadata = persistence.read_metadata(path, cls.__name__)
        model = cls(*persistence.read_components(path, metadata))
        model._feature_names = metadata.get("featureNames")
        model._alignment = metadata.get("alignment")
        model._training = metadata.get("summary")
        persistence.restore_params(model, metadata)
        return model

    def __repr__(self) -> str:
        return f"GaussianMixtureModel(uid={self.uid}, k={self.getK()}, numFeatures={self.numFeatures})"


def _label_change_counts(model: GaussianMixtureModel, previous: GaussianMixtureModel, dataset: DataFrame):
    """(rows, rows whose id changed) per component of `model`, both models scoring `dataset`'s
    features (as `model` reads them) in one select; rows either cannot score are left out."""
    def scorer(source: GaussianMixtureModel, name: str) -> GaussianMixtureModel:
        """`source` predicting into `name`, reading the features as `model` reads them."""
        copied = source.copy().setPredictionCol(name).setProbabilityCol(f"{name}_p").setHandleInvalid("keep")
        copied.clear(copied.logLikelihoodCol)
        copied.clear(copied.inputCols)
        if model.isDefined(model.inputCols):
            copied.setInputCols(model.getInputCols())
        return copied.setFeaturesCol(model.getFeaturesCol())

    def stable_id(source: GaussianMixtureModel, position: str):
        return F.element_at(F.array(*[F.lit(i) for i in source.componentIds]), F.col(position) + 1)

    scored = scorer(previous, "__before").transform(scorer(model, "__now").transform(dataset))
    scored = scored.where(F.col("__now").isNotNull() & F.col("__before").isNotNull())
    changed = stable_id(model, "__now") != stable_id(previous, "__before")
    rows = scored.groupBy("__now").agg(F.count(F.lit(1)).alias("n"), F.count(F.when(changed, 1)).alias("c")).collect()
    counts = np.zeros((2, model.getK()), dtype=np.int64)
    for row in rows:
        counts[:, row["__now"]] = row["n"], row["c"]
    return counts[0], counts[1]


def fitted_model(fitted: "Fitted", dataset: DataFrame, estimator) -> GaussianMixtureModel:
    """The model of a `fitting.Fitted` result on `dataset`: the estimator's Params and uid (as
    pyspark.ml's estimators give their models), the features' names and the training summary."""
    mixture = fitted.mixture
    model = GaussianMixtureModel(mixture.weights, mixture.means, mixture.covariances)
    model._feature_names = fitted.feature_names
    estimator._copyValues(model)
    model._resetUid(estimator.uid)
    model._summary = GaussianMixtureSummary(model, dataset, fitted.result, fitted.skipped, fitted.total_weight,
                                            fitted.incomplete, fitted.all_missing)
    return model
