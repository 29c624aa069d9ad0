"""`GaussianMixtureSummary`: what a fit reports about itself (MLlib's fields, the log-likelihood
history, convergence, restarted components), and its figures as a dict for saving and jobs."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
from pyspark.sql import DataFrame

from .em import FitResult

if TYPE_CHECKING:
    from .model import GaussianMixtureModel


class GaussianMixtureSummary:
    """Training summary: MLlib's fields plus the log-likelihood history and convergence."""

    def __init__(
        self, model: "GaussianMixtureModel", dataset: DataFrame, result: FitResult, skipped: int,
        total_weight: float, incomplete: int = 0, all_missing: int = 0,
    ):
        self._model, self._dataset = model, dataset
        self.k = model.getK()
        self.clusterSizes = list(result.cluster_sizes)
        self.logLikelihood = float(result.log_likelihood)
        self.logLikelihoodHistory = [float(v) for v in result.history]
        self.numIter = int(result.iterations)
        self.converged = bool(result.converged)
        self.stopReason = result.stop_reason
        self.emptyComponents = list(result.empty_components)
        self.reseeded = [tuple(int(v) for v in item) for item in result.reseeded]
        self.iterationSeconds = [float(v) for v in result.iteration_seconds]
        self.invalidRowsSkipped = int(skipped)
        # handleInvalid='keep': rows fitted with missing values marginalised, and rows with no
        # finite feature (left out, also in invalidRowsSkipped)
        self.rowsWithMissingValues = int(incomplete)
        self.rowsAllMissing = int(all_missing)
        self.resumedFromIteration = int(result.resumed_from)
        # EM under a covariance floor until this iteration (a start singular but for regCovar), 0 if not
        self.flooredUntilIteration = int(result.floored_until)
        self.totalWeight = float(total_weight)  # rows fitted, or their total weight with weightCol
        self.featuresCol = model.getFeaturesCol()
        self.predictionCol = model.getPredictionCol()
        self.probabilityCol = model.getProbabilityCol()
        self.alignment: dict | None = None  # set on an aligned model's summary (alignTo)
        self._predictions = None

    def renumbered(self, model: "GaussianMixtureModel", order: np.ndarray) -> "GaussianMixtureSummary":
        """This summary for `model`, whose component i is this fit's component order[i] (`alignTo`)."""
        that = copy.copy(self)
        position = {int(old): new for new, old in enumerate(order)}
        that._model, that._predictions, that.alignment = model, None, model.alignment
        that.clusterSizes = [self.clusterSizes[j] for j in order]
        that.emptyComponents = sorted(position[j] for j in self.emptyComponents)
        that.reseeded = [(at, position[j], position[donor]) for at, j, donor in self.reseeded]
        return that

    @property
    def predictions(self) -> DataFrame:
        if self._predictions is None:
            self._predictions = self._model.transform(self._dataset)
        return self._predictions

    @property
    def cluster(self) -> DataFrame:
        return self.predictions.select(self._output("predictionCol"))

    @property
    def probability(self) -> DataFrame:
        return self.predictions.select(self._output("probabilityCol"))

    def _output(self, param: str) -> str:
        """The name of an output column of the fit's transform; an empty one was left out."""
        name = getattr(self, param)
        if not name:
            raise ValueError(f"the fit's {param} is empty, so its predictions have no such column")
        return name

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "clusterSizes": self.clusterSizes,
            "logLikelihood": self.logLikelihood,
            "logLikelihoodHistory": self.logLikelihoodHistory,
            "numIter": self.numIter,
            "converged": self.converged,
            "stopReason": self.stopReason,
            "emptyComponents": self.emptyComponents,
            "reseeded": [list(item) for item in self.reseeded],
            "iterationSeconds": self.iterationSeconds,
            "invalidRowsSkipped": self.invalidRowsSkipped,
            "rowsWithMissingValues": self.rowsWithMissingValues,
            "rowsAllMissing": self.rowsAllMissing,
            "resumedFromIteration": self.resumedFromIteration,
            "flooredUntilIteration": self.flooredUntilIteration,
            "totalWeight": self.totalWeight,
        }
