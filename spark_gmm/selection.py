"""`GaussianMixtureSelection`: choose k and the covariance type by BIC or AIC, fitting every
candidate in the same passes over the data (`GaussianMixture.fitMultiple`)."""

from __future__ import annotations

from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.sql import DataFrame, SparkSession

from .clustering import GaussianMixture
from .model import GaussianMixtureModel
from .mixture import COVARIANCE_TYPES, free_parameters, information_criterion
from .options import CRITERIA


class GaussianMixtureSelection(Estimator):
    """Fits `estimator` for every k in `kValues` and covariance type in `covarianceTypes` (all in
    shared EM passes) and keeps the candidate with the lowest `criterion`."""

    kValues = Param(Params._dummy(), "kValues", "Candidate numbers of components.", TypeConverters.toListInt)
    covarianceTypes = Param(
        Params._dummy(), "covarianceTypes", "Candidate covariance types.", TypeConverters.toListString
    )
    criterion = Param(Params._dummy(), "criterion", "'bic' (default) or 'aic'.", TypeConverters.toString)

    def __init__(self, estimator: GaussianMixture | None = None, kValues=None, covarianceTypes=None,
                 criterion="bic"):
        super().__init__()
        self.estimator = estimator or GaussianMixture()
        self._setDefault(kValues=list(range(1, 11)), covarianceTypes=["full"], criterion="bic")
        for name, value in (("kValues", kValues), ("covarianceTypes", covarianceTypes), ("criterion", criterion)):
            if value is not None:
                self._set(**{name: value})

    def getKValues(self) -> list[int]:
        return self.getOrDefault(self.kValues)

    def getCovarianceTypes(self) -> list[str]:
        return self.getOrDefault(self.covarianceTypes)

    def getCriterion(self) -> str:
        return self.getOrDefault(self.criterion)

    def _fit(self, dataset: DataFrame) -> "GaussianMixtureSelectionModel":
        ks, types, criterion = self.getKValues(), self.getCovarianceTypes(), self.getCriterion()
        if not ks or min(ks) < 1:
            raise ValueError(f"kValues must be a non-empty list of integers >= 1, got {ks}")
        unknown = [t for t in types if t not in COVARIANCE_TYPES]
        if not types or unknown:
            raise ValueError(f"covarianceTypes must be a non-empty list from {COVARIANCE_TYPES}, got {types}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got '{criterion}'")
        est = self.estimator
        if est.getCheckpointDir():
            raise ValueError("GaussianMixtureSelection does not checkpoint: unset the estimator's checkpointDir")
        maps = [{est.k: k, est.covarianceType: t} for t in types for k in ks]
        models = [model for _, model in sorted(est.fitMultiple(dataset, maps), key=lambda item: item[0])]
        rows = []
        for model in models:
            summary = model.summary
            parameters = free_parameters(model.getK(), model.numFeatures, model.getCovarianceType())
            rows.append({
                "k": model.getK(),
                "covarianceType": model.getCovarianceType(),
                "bic": information_criterion("bic", summary.logLikelihood, parameters, summary.totalWeight),
                "aic": information_criterion("aic", summary.logLikelihood, parameters, summary.totalWeight),
                "logLikelihood": summary.logLikelihood,
                "parameters": parameters,
                "iterations": summary.numIter,
                "converged": summary.converged,
            })
        best = min(range(len(rows)), key=lambda i: rows[i][criterion])
        for i, row in enumerate(rows):
            row["chosen"] = i == best
        return GaussianMixtureSelectionModel(models[best], rows, criterion)


class GaussianMixtureSelectionModel(Model):
    """The chosen model (`bestModel`, which `transform` uses) and every candidate's figures."""

    def __init__(self, bestModel: GaussianMixtureModel, rows: list[dict], criterion: str):
        super().__init__()
        self.bestModel, self.criterion, self._rows = bestModel, criterion, rows

    @property
    def candidates(self) -> DataFrame:
        """One row per candidate: k, covarianceType, bic, aic, logLikelihood, parameters,
        iterations, converged, chosen."""
        return SparkSession.active().createDataFrame(
            [tuple(row.values()) for row in self._rows],
            "k int, covarianceType string, bic double, aic double, logLikelihood double, "
            "parameters int, iterations int, converged boolean, chosen boolean",
        )

    @property
    def candidateRows(self) -> list[dict]:
        return [dict(row) for row in self._rows]

    def _transform(self, dataset: DataFrame) -> DataFrame:
        return self.bestModel.transform(dataset)
