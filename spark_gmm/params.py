"""The Params shared by `GaussianMixture` and its model, built from the `options` table.

pyspark's own mixins declare the standard names (featuresCol, maxIter, tol, seed, ...); the others
are declared here from the table, and every default comes from it.
"""

from __future__ import annotations

from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasAggregationDepth,
    HasCheckpointInterval,
    HasFeaturesCol,
    HasHandleInvalid,
    HasInputCols,
    HasMaxIter,
    HasPredictionCol,
    HasProbabilityCol,
    HasSeed,
    HasTol,
    HasWeightCol,
)
from pyspark.sql import Column, DataFrame

from .inputs import feature_array, weight_column
from .options import OPTIONS

_CONVERTERS = {int: TypeConverters.toInt, float: TypeConverters.toFloat, str: TypeConverters.toString,
               bool: TypeConverters.toBoolean}


def declared(name: str, table: dict = OPTIONS) -> Param:
    """The Param of option `name` of an options table (`options.OPTIONS` or `MIXED_OPTIONS`)."""
    option = table[name]
    return Param(Params._dummy(), name, option.doc, _CONVERTERS[option.kind])


class KeywordParams:
    """`setParams` of the estimators."""

    def setParams(self, **params):
        """Set any Params by name (keyword arguments only, as pyspark.ml's); None leaves one unset."""
        unknown = sorted(set(params) - {p.name for p in self.params})
        if unknown:
            raise TypeError(f"unknown parameter(s) {', '.join(unknown)} for {type(self).__name__}")
        return self._set(**{name: value for name, value in params.items() if value is not None})


class SharedMixtureParams(HasCheckpointInterval):
    """Getters of the Params that every mixture's Params declare (from an options table), the
    probability column's format, and checkpointDir, which they share."""

    checkpointDir = Param(
        Params._dummy(),
        "checkpointDir",
        "If set, the EM state is saved here every checkpointInterval iterations, and a fit started "
        "again with the same data and settings resumes from the latest one.",
        TypeConverters.toString,
    )

    def getK(self) -> int:
        return self.getOrDefault(self.k)

    def getRegCovar(self) -> float:
        return self.getOrDefault(self.regCovar)

    def getCovarianceType(self) -> str:
        return self.getOrDefault(self.covarianceType)

    def getNInit(self) -> int:
        return self.getOrDefault(self.nInit)

    def getEngine(self) -> str:
        return self.getOrDefault(self.engine)

    def getProbabilityFormat(self) -> str:
        return self.getOrDefault(self.probabilityFormat)

    def setProbabilityFormat(self, value: str):
        return self._set(probabilityFormat=value)

    def getCheckpointDir(self) -> str | None:
        return self.getOrDefault(self.checkpointDir) if self.isDefined(self.checkpointDir) else None


class GaussianMixtureParams(
    SharedMixtureParams,
    HasFeaturesCol,
    HasPredictionCol,
    HasProbabilityCol,
    HasMaxIter,
    HasTol,
    HasSeed,
    HasAggregationDepth,
    HasWeightCol,
    HasInputCols,
    HasHandleInvalid,
):
    """Columns and settings of a Gaussian mixture fit, with pyspark.ml's getters."""

    k = declared("k")
    regCovar = declared("regCovar")
    covarianceType = declared("covarianceType")
    initMode = declared("initMode")
    nInit = declared("nInit")
    reseedComponents = declared("reseedComponents")
    engine = declared("engine")
    dtype = declared("dtype")
    probabilityFormat = declared("probabilityFormat")
    logLikelihoodCol = Param(
        Params._dummy(),
        "logLikelihoodCol",
        "If set, transform adds each row's log density log p(x) in this column.",
        TypeConverters.toString,
    )

    def __init__(self, *args):
        super().__init__(*args)
        self._setDefault(**{name: option.default for name, option in OPTIONS.items()})

    def getInitMode(self) -> str:
        return self.getOrDefault(self.initMode)


    def getReseedComponents(self) -> bool:
        return self.getOrDefault(self.reseedComponents)

    def getDtype(self) -> str:
        return self.getOrDefault(self.dtype)

    def getLogLikelihoodCol(self) -> str | None:
        return self.getOrDefault(self.logLikelihoodCol) if self.isDefined(self.logLikelihoodCol) else None

    # Column setters (and handleInvalid) belong to the estimator and the model, as in pyspark.ml.

    def setFeaturesCol(self, value: str):
        return self._set(featuresCol=value)

    def setInputCols(self, value: list[str]):
        return self._set(inputCols=value)

    def setPredictionCol(self, value: str):
        return self._set(predictionCol=value)

    def setProbabilityCol(self, value: str):
        return self._set(probabilityCol=value)

    def setLogLikelihoodCol(self, value: str):
        return self._set(logLikelihoodCol=value)

    def setWeightCol(self, value: str):
        return self._set(weightCol=value)

    def setHandleInvalid(self, value: str):
        return self._set(handleInvalid=value)

    def featureColumn(self, df: DataFrame) -> Column:
        """The features of `df` as one array<double> column (from featuresCol or inputCols)."""
        input_cols = self.getInputCols() if self.isDefined(self.inputCols) else None
        return feature_array(df, self.getFeaturesCol(), input_cols)

    def weightColumn(self, df: DataFrame) -> Column | None:
        """The row weights of `df` as a double column, or None without weightCol."""
        return weight_column(df, self.getWeightCol() if self.isDefined(self.weightCol) else None)
