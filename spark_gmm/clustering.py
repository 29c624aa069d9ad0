"""`GaussianMixture` and `GaussianMixtureModel`: a drop-in for pyspark.ml.clustering's, built on
pyspark.ml's Estimator/Model/Params and the distributed EM in `em` and `blocks`."""

from __future__ import annotations

import logging
import warnings
import zlib
from dataclasses import replace

import numpy as np
import pandas as pd
from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.functions import array_to_vector
from pyspark.ml.linalg import DenseMatrix, DenseVector, Vector, Vectors
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
from pyspark.ml.stat import MultivariateGaussian
from pyspark.sql import DataFrame, SparkSession, functions as F
from pyspark.sql.functions import pandas_udf

from . import barrier, codec, em, persistence
from .blocks import BlockCache, partials_at_driver
from .checkpoint import Checkpointer
from .inputs import (
    InputWarning,
    InvalidInputError,
    check_driver_memory,
    feature_array,
    feature_names,
    jvm_bytes,
    weight_column,
)
from .kernels import log_sum_exp, row_uniforms, weighted_log_joint
from .mixture import (
    COVARIANCE_TYPES,
    ComponentStatistics,
    Mixture,
    free_parameters,
    thin_components,
)

log = logging.getLogger("spark_gmm")

#: Default seed: fixed across processes (pyspark's hash-of-class-name default is not).
DEFAULT_SEED = zlib.crc32(b"spark_gmm.GaussianMixture")
INIT_MODES = ("k-means||", "random")
ENGINES = ("driver", "barrier")
DTYPES = ("float64", "float32")


class _GaussianMixtureParams(
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
    HasCheckpointInterval,
):
    k = Param(Params._dummy(), "k", "Number of components (> 0).", TypeConverters.toInt)
    regCovar = Param(
        Params._dummy(),
        "regCovar",
        "Non-negative value added to each covariance diagonal, so covariances stay positive definite.",
        TypeConverters.toFloat,
    )
    initMode = Param(
        Params._dummy(),
        "initMode",
        "Initialisation: 'k-means||' (scalable k-means++ then Lloyd) or 'random' (random rows).",
        TypeConverters.toString,
    )
    engine = Param(
        Params._dummy(),
        "engine",
        "'driver': one Spark job per EM iteration over cached blocks; 'barrier': the whole fit in "
        "one barrier stage with the data resident in the tasks (needs a free slot per task).",
        TypeConverters.toString,
    )
    dtype = Param(
        Params._dummy(),
        "dtype",
        "'float64', or 'float32': blocks cached as float32 shifted rows and densities computed in "
        "float32 (half the bytes per pass), statistics combined in float64.",
        TypeConverters.toString,
    )
    nInit = Param(
        Params._dummy(),
        "nInit",
        "Number of initialisations (seeds seed, seed+1, ...); the fit with the highest "
        "log-likelihood is kept. Restarts share every EM pass over the data.",
        TypeConverters.toInt,
    )
    covarianceType = Param(
        Params._dummy(),
        "covarianceType",
        "Covariance structure, as in scikit-learn: 'full', 'diag', 'spherical' or 'tied' "
        "(covariances are always returned as k×d×d matrices).",
        TypeConverters.toString,
    )
    checkpointDir = Param(
        Params._dummy(),
        "checkpointDir",
        "If set, the EM state is saved here every checkpointInterval iterations, and a fit started "
        "again with the same data and settings resumes from the latest one (driver engine).",
        TypeConverters.toString,
    )
    logLikelihoodCol = Param(
        Params._dummy(),
        "logLikelihoodCol",
        "If set, transform adds each row's log density log p(x) in this column.",
        TypeConverters.toString,
    )

    def __init__(self, *args):
        super().__init__(*args)
        self._setDefault(
            k=2,
            tol=1e-3,
            maxIter=100,
            seed=DEFAULT_SEED,
            aggregationDepth=2,
            regCovar=1e-6,
            initMode="k-means||",
            handleInvalid="error",
            engine="driver",
            dtype="float64",
            checkpointInterval=10,
            covarianceType="full",
            nInit=1,
        )

    def getK(self) -> int:
        return self.getOrDefault(self.k)

    def getRegCovar(self) -> float:
        return self.getOrDefault(self.regCovar)

    def getInitMode(self) -> str:
        return self.getOrDefault(self.initMode)

    def getEngine(self) -> str:
        return self.getOrDefault(self.engine)

    def getDtype(self) -> str:
        return self.getOrDefault(self.dtype)

    def getNInit(self) -> int:
        return self.getOrDefault(self.nInit)

    def getCovarianceType(self) -> str:
        return self.getOrDefault(self.covarianceType)

    def getCheckpointDir(self) -> str | None:
        return self.getOrDefault(self.checkpointDir) if self.isDefined(self.checkpointDir) else None

    def getLogLikelihoodCol(self) -> str | None:
        return self.getOrDefault(self.logLikelihoodCol) if self.isDefined(self.logLikelihoodCol) else None

    # Column setters (and handleInvalid): the estimator's and the model's, as in pyspark.ml.

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

    def _feature_array(self, df: DataFrame):
        input_cols = self.getInputCols() if self.isDefined(self.inputCols) else None
        return feature_array(df, self.getFeaturesCol(), input_cols)

    def _weight_column(self, df: DataFrame):
        name = self.getWeightCol() if self.isDefined(self.weightCol) else None
        return weight_column(df, name)


class GaussianMixture(_GaussianMixtureParams, Estimator, persistence.Persistable):
    """Gaussian mixture clustering by distributed expectation-maximisation.

    Same parameters and defaults as `pyspark.ml.clustering.GaussianMixture`, plus `regCovar`,
    `initMode`, `inputCols`, `logLikelihoodCol` and `handleInvalid`.
    """

    @keyword_only
    def __init__(
        self,
        *,
        featuresCol="features",
        predictionCol="prediction",
        k=2,
        probabilityCol="probability",
        tol=1e-3,
        maxIter=100,
        seed=None,
        aggregationDepth=2,
        weightCol=None,
        regCovar=1e-6,
        initMode="k-means||",
        inputCols=None,
        logLikelihoodCol=None,
        handleInvalid="error",
        engine="driver",
        dtype="float64",
        checkpointDir=None,
        checkpointInterval=10,
        covarianceType="full",
        nInit=1,
    ):
        super().__init__()
        self._initial_model: GaussianMixtureModel | None = None
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(
        self,
        *,
        featuresCol="features",
        predictionCol="prediction",
        k=2,
        probabilityCol="probability",
        tol=1e-3,
        maxIter=100,
        seed=None,
        aggregationDepth=2,
        weightCol=None,
        regCovar=1e-6,
        initMode="k-means||",
        inputCols=None,
        logLikelihoodCol=None,
        handleInvalid="error",
        engine="driver",
        dtype="float64",
        checkpointDir=None,
        checkpointInterval=10,
        covarianceType="full",
        nInit=1,
    ):
        kwargs = {name: value for name, value in self._input_kwargs.items() if value is not None}
        return self._set(**kwargs)

    def setK(self, value: int):
        return self._set(k=value)

    def setMaxIter(self, value: int):
        return self._set(maxIter=value)

    def setTol(self, value: float):
        return self._set(tol=value)

    def setSeed(self, value: int):
        return self._set(seed=value)

    def setAggregationDepth(self, value: int):
        return self._set(aggregationDepth=value)

    def setRegCovar(self, value: float):
        return self._set(regCovar=value)

    def setInitMode(self, value: str):
        return self._set(initMode=value)

    def setEngine(self, value: str):
        return self._set(engine=value)

    def setDtype(self, value: str):
        return self._set(dtype=value)

    def setNInit(self, value: int):
        return self._set(nInit=value)

    def setCovarianceType(self, value: str):
        return self._set(covarianceType=value)

    def setCheckpointDir(self, value: str):
        return self._set(checkpointDir=value)

    def setCheckpointInterval(self, value: int):
        return self._set(checkpointInterval=value)

    def setInitialModel(self, model: "GaussianMixtureModel"):
        """Start EM from `model`'s parameters instead of `initMode` (k is taken from the model)."""
        if not isinstance(model, GaussianMixtureModel):
            raise TypeError(f"initial model must be a GaussianMixtureModel, got {type(model).__name__}")
        self._initial_model = model
        return self._set(k=len(model.weights))

    def getInitialModel(self) -> "GaussianMixtureModel | None":
        return self._initial_model

    def copy(self, extra=None):
        that = super().copy(extra)
        that._initial_model = self._initial_model
        return that

    # -- fitting -------------------------------------------------------------------------------

    def _check_params(self) -> None:
        if self.getK() < 1:
            raise ValueError(f"k must be at least 1, got {self.getK()}")
        if self.getInitMode() not in INIT_MODES:
            raise ValueError(f"initMode must be one of {INIT_MODES}, got '{self.getInitMode()}'")
        if not self.getRegCovar() >= 0:
            raise ValueError(f"regCovar must be non-negative, got {self.getRegCovar()}")
        if self.getMaxIter() < 0 or not self.getTol() >= 0:
            raise ValueError("maxIter and tol must be non-negative")
        if self.getEngine() not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got '{self.getEngine()}'")
        if self.getDtype() not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got '{self.getDtype()}'")
        if self.getCovarianceType() not in COVARIANCE_TYPES:
            raise ValueError(
                f"covarianceType must be one of {COVARIANCE_TYPES}, got '{self.getCovarianceType()}'"
            )
        if self.getNInit() < 1:
            raise ValueError(f"nInit must be at least 1, got {self.getNInit()}")
        if self.getNInit() > 1 and self.getCheckpointDir():
            raise ValueError("checkpointDir needs nInit=1 (restarts are not checkpointed)")
        if self.getHandleInvalid() not in ("error", "skip"):
            raise ValueError(f"handleInvalid must be 'error' or 'skip', got '{self.getHandleInvalid()}'")

    def _fit(self, dataset: DataFrame) -> "GaussianMixtureModel":
        self._check_params()
        cache, summary, skipped = self._prepare(dataset)
        try:
            result = self._run(cache, summary, dataset.sparkSession)
        finally:
            self._release(cache)
        return self._model(result, dataset, summary, skipped)

    #: Params that may differ between candidates fitted together in shared passes.
    CANDIDATE_PARAMS = ("k", "covarianceType", "seed", "initMode", "maxIter", "tol", "regCovar")

    def fitMultiple(self, dataset: DataFrame, paramMaps):
        """Fit one model per param map. When the maps only change `CANDIDATE_PARAMS` (k, covariance
        type, seed, ...), the candidates share every EM pass over the data (each still takes exactly
        the steps it takes alone); otherwise they are fitted one by one."""
        estimators = [self.copy(param_map) for param_map in paramMaps]
        shared = all(
            param.name in self.CANDIDATE_PARAMS
            for param_map in paramMaps for param in param_map
        ) and self.getCheckpointDir() is None and self._initial_model is None and all(
            e.getNInit() == 1 for e in estimators
        )
        if not shared or len(estimators) < 2:
            return super().fitMultiple(dataset, paramMaps)
        for estimator in estimators:
            estimator._check_params()
        cache, summary, skipped = self._prepare(dataset, max(e.getK() for e in estimators))
        try:
            results = em.fit_together(
                cache.reduce, summary.d, summary.total_weight,
                [e._settings(summary) for e in estimators], cache.describe,
            )
        finally:
            self._release(cache)
        models = [e._model(r, dataset, summary, skipped) for e, r in zip(estimators, results)]
        return iter(list(enumerate(models)))

    def _prepare(self, dataset: DataFrame, k: int | None = None):
        """(cached blocks, input summary, rows skipped), validated for `k` (default: this k)."""
        x = self._feature_array(dataset)
        w = self._weight_column(dataset)
        cache = BlockCache(dataset, x, w, self.getAggregationDepth())
        try:
            cache.describe("reading the input into cached blocks")
            summary = cache.summarize()
            skipped = self.copy({self.k: k or self.getK()})._validate(summary, dataset.sparkSession)
            if self.getDtype() == "float32":
                cache.narrow()
        except BaseException:
            self._release(cache)
            raise
        return cache, summary, skipped

    @staticmethod
    def _release(cache: BlockCache) -> None:
        cache.describe(None)
        cache.unpersist()

    def _model(self, result: em.FitResult, dataset: DataFrame, summary, skipped: int) -> "GaussianMixtureModel":
        final = result.mixture.shifted(summary.shift)
        for j, variance in thin_components(final.covariances, self.getRegCovar(), summary.span > 0):
            warnings.warn(
                f"component {j} is singular without regCovar (its smallest own variance is "
                f"{max(variance, 0.0):.3g} ≤ regCovar={self.getRegCovar():g}): it sits on fewer distinct "
                "points than features, or on collinear features, and regCovar sets its shape there",
                em.ComponentWarning,
                stacklevel=4,
            )
        model = GaussianMixtureModel(final.weights, final.means, final.covariances)
        input_cols = self.getInputCols() if self.isDefined(self.inputCols) else None
        names = feature_names(dataset, self.getFeaturesCol(), input_cols)
        model._feature_names = names if names and len(names) == summary.d else None
        self._copyValues(model)
        model._summary = GaussianMixtureSummary(model, dataset, result, skipped, summary.total_weight)
        log.info(
            "fit done: k=%d, %d iterations, converged=%s, log-likelihood %.10g",
            model.getK(), result.iterations, result.converged, result.log_likelihood,
        )
        return model

    def _feature_name(self, i: int) -> str:
        if self.isDefined(self.inputCols):
            return f"'{self.getInputCols()[i]}'"
        return f"{i} of '{self.getFeaturesCol()}'"

    def _validate(self, s, spark) -> int:
        """Refuse input that cannot be fitted, naming the column; returns the rows skipped."""
        column = ", ".join(self.getInputCols()) if self.isDefined(self.inputCols) else self.getFeaturesCol()
        if s.dims[0] != s.dims[1]:
            raise InvalidInputError(
                f"features column '{column}' has vectors of different lengths ({s.dims[0]} and {s.dims[1]})"
            )
        invalid = s.null_rows + s.nonfinite_rows + s.bad_weight_rows
        if invalid and self.getHandleInvalid() == "error":
            problems = []
            if s.null_rows:
                problems.append(f"{s.null_rows} rows with null features in '{column}'")
            if s.nonfinite_rows:
                problems.append(f"{s.nonfinite_rows} rows with NaN or infinite features in '{column}'")
            if s.bad_weight_rows:
                problems.append(
                    f"{s.bad_weight_rows} rows with a null, negative, NaN or infinite weight in "
                    f"'{self.getWeightCol()}'"
                )
            raise InvalidInputError("; ".join(problems) + " (set handleInvalid='skip' to drop them)")
        if invalid:
            log.warning("handleInvalid='skip': dropped %d invalid rows", invalid)
        if s.rows == 0:
            raise InvalidInputError(f"no rows to fit in '{column}': the input is empty" + (
                f" after skipping {invalid} invalid rows" if invalid else ""))
        if s.d == 0:
            raise InvalidInputError(f"features column '{column}' has vectors of length 0")
        if not s.total_weight > 0:
            raise InvalidInputError(f"weight column '{self.getWeightCol()}': all weights are zero")
        if self.getK() > s.rows:
            raise InvalidInputError(f"k={self.getK()} is larger than the number of rows ({s.rows})")
        for i in np.flatnonzero(s.span == 0):
            constant = f"feature {self._feature_name(i)} is constant ({s.shift[i]:.17g})"
            if self.getRegCovar() <= 0:
                raise InvalidInputError(
                    f"{constant}: with regCovar=0 every covariance is singular; set regCovar > 0 or "
                    "drop the feature"
                )
            warnings.warn(f"{constant}: its variance is regCovar={self.getRegCovar():g} in every component",
                          InputWarning, stacklevel=4)
        partial_bytes = 8 * ComponentStatistics.size(self.getK(), s.d)
        check_driver_memory(
            self.getK(),
            s.d,
            partial_bytes,
            partials_at_driver(s.partitions, partial_bytes, self.getAggregationDepth()),
            jvm_bytes(spark.conf.get("spark.driver.maxResultSize", "1g")),
        )
        return invalid

    def _run(self, cache: BlockCache, summary, spark) -> em.FitResult:
        settings = self._settings(summary)
        if self.getNInit() > 1 and settings.start is None:
            return self._restarts(cache, summary, settings)
        checkpointer = self._checkpointer(spark, summary)
        if self.getEngine() == "barrier":
            if checkpointer is None:
                try:
                    return barrier.fit(cache, summary, settings, spark)
                except barrier.BarrierUnavailable as why:
                    log.warning("barrier engine unavailable (%s); using the driver engine", why)
            else:  # the barrier stage iterates inside a task, which cannot write checkpoints
                log.warning("checkpointDir is set: the fit runs on the driver engine, which checkpoints")
        resume = checkpointer.latest() if checkpointer else None
        return em.fit_mixture(
            cache.reduce, summary.d, summary.total_weight, settings, resume=resume,
            on_state=checkpointer.save if checkpointer else None, describe=cache.describe,
        )

    def _restarts(self, cache: BlockCache, summary, settings: em.FitSettings) -> em.FitResult:
        """nInit fits from seeds seed, seed+1, ... in shared passes (driver engine); the best one."""
        if self.getEngine() == "barrier":
            log.warning("nInit > 1: the restarts share passes on the driver engine")
        candidates = [replace(settings, seed=settings.seed + i) for i in range(self.getNInit())]
        results = em.fit_together(cache.reduce, summary.d, summary.total_weight, candidates, cache.describe)
        best = max(range(len(results)), key=lambda i: results[i].log_likelihood)
        log.info(
            "nInit=%d: kept restart %d (seed %d), log-likelihood %.10g; others: %s",
            len(results), best, candidates[best].seed, results[best].log_likelihood,
            ", ".join(f"{r.log_likelihood:.10g}" for i, r in enumerate(results) if i != best),
        )
        return results[best]

    def _checkpointer(self, spark, summary) -> Checkpointer | None:
        directory = self.getCheckpointDir()
        if not directory:
            return None
        start = self._initial_model
        fingerprint = {  # the data and every setting that changes the model (maxIter: see Checkpointer)
            "k": self.getK(),
            "numFeatures": summary.d,
            "rows": summary.rows,
            "totalWeight": summary.total_weight,
            "content": summary.content,
            "regCovar": self.getRegCovar(),
            "tol": self.getTol(),
            "seed": self.getSeed(),
            "initMode": self.getInitMode() if start is None else "initialModel",
            "initialModel": None if start is None else codec.digest(
                codec.mixture_arrays(start.weights, start.means, start.covariances)
            ),
            "dtype": self.getDtype(),
            "covarianceType": self.getCovarianceType(),
        }
        return Checkpointer(
            spark, directory, self.getCheckpointInterval(), fingerprint, self.getMaxIter(), self.getRegCovar()
        )

    def _settings(self, summary) -> em.FitSettings:
        start = None
        if self._initial_model is not None:
            model = self._initial_model
            if model.numFeatures != summary.d:
                raise InvalidInputError(
                    f"initial model has {model.numFeatures} features, the data has {summary.d}"
                )
            start = Mixture.from_covariances(
                model.weights, model.means - summary.shift, model.covariances, self.getRegCovar()
            )
            means, covariances = model.means, model.covariances
            for j in range(model.getK()):
                for i in range(j):
                    if np.array_equal(means[i], means[j]) and np.array_equal(covariances[i], covariances[j]):
                        warnings.warn(
                            f"initial components {i} and {j} are identical; EM cannot tell them apart, "
                            "so they stay identical (give distinct starting means)",
                            em.ComponentWarning,
                            stacklevel=4,
                        )
        return em.FitSettings(
            k=self.getK(),
            max_iter=self.getMaxIter(),
            tol=self.getTol(),
            reg_covar=self.getRegCovar(),
            seed=self.getSeed(),
            init_mode=self.getInitMode(),
            start=start,
            covariance_type=self.getCovarianceType(),
        )

    # -- persistence ---------------------------------------------------------------------------

    def _save(self, path: str, overwrite: bool) -> str:
        extra = {"hasInitialModel": self._initial_model is not None}
        if self._initial_model is not None:
            extra["initialModelWriteId"] = self._initial_model._save(f"{path}/initialModel", overwrite)
        return persistence.write_directory(self, path, overwrite, extra)

    @classmethod
    def _load(cls, path: str) -> "GaussianMixture":
        metadata = persistence.read_metadata(path, cls.__name__)
        estimator = cls()
        persistence.restore_params(estimator, metadata)
        if metadata.get("hasInitialModel"):
            initial = persistence.read_metadata(f"{path}/initialModel", GaussianMixtureModel.__name__)
            if initial["writeId"] != metadata["initialModelWriteId"]:
                raise persistence.ModelFormatError(
                    f"{path}/initialModel was not written by the save that wrote {path}/metadata "
                    "(a save into this directory was interrupted); save the estimator again"
                )
            estimator._initial_model = GaussianMixtureModel.load(f"{path}/initialModel")
        return estimator


class GaussianMixtureModel(_GaussianMixtureParams, Model, persistence.Persistable):
    """A fitted Gaussian mixture: weights, means and full covariances in the data's coordinates."""

    def __init__(self, weights, means, covariances):
        super().__init__()
        means = np.atleast_2d(np.asarray(means, dtype=np.float64))
        k, d = means.shape
        covariances = np.asarray(covariances, dtype=np.float64).reshape(k, d, d)
        weights = np.asarray(weights, dtype=np.float64).reshape(k)
        if not (np.isfinite(weights).all() and np.isfinite(means).all() and np.isfinite(covariances).all()):
            raise ValueError("mixture parameters must be finite")
        if (weights < 0).any() or not weights.sum() > 0:
            raise ValueError("mixture weights must be non-negative with a positive sum")
        self._mixture = Mixture.from_covariances(weights, means, covariances)
        # Scoring works around the means' centre, as fitting works around the data's.
        self._center = (means.min(axis=0) + means.max(axis=0)) / 2
        self._centred = self._mixture.shifted(-self._center)
        self._summary: GaussianMixtureSummary | None = None
        self._feature_names: list[str] | None = None
        self._setDefault(k=k)
        self._set(k=k)

    @classmethod
    def fromArrays(cls, weights, means, covariances, covarianceType: str = "full") -> "GaussianMixtureModel":
        """A model from k weights, k×d means and k×d×d covariances (to score, or to start a fit);
        `covarianceType` must describe the covariances (it sets the parameter count of bic/aic)."""
        model = cls(weights, means, covariances)
        if covarianceType not in COVARIANCE_TYPES:
            raise ValueError(f"covarianceType must be one of {COVARIANCE_TYPES}, got '{covarianceType}'")
        c = model.covariances
        diagonal_only = not (c * (1 - np.eye(model.numFeatures))).any()
        variances = np.diagonal(c, axis1=1, axis2=2)
        fits = {
            "full": True,
            "diag": diagonal_only,
            "spherical": diagonal_only and (variances == variances[:, :1]).all(),
            "tied": (c == c[0]).all(),
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
    def hasSummary(self) -> bool:
        return self._summary is not None

    @property
    def summary(self) -> "GaussianMixtureSummary":
        if self._summary is None:
            raise RuntimeError("no training summary: this model was not fitted in this session")
        return self._summary

    def _log_joint(self, x: np.ndarray) -> np.ndarray:
        return weighted_log_joint(np.asarray(x, dtype=np.float64) - self._center, self._centred)

    def _as_row(self, vector) -> np.ndarray:
        x = np.asarray(vector.toArray() if isinstance(vector, Vector) else vector, dtype=np.float64)
        if x.shape != (self.numFeatures,):
            raise ValueError(f"expected a vector of {self.numFeatures} features, got shape {x.shape}")
        return x[None, :]

    def predict(self, value) -> int:
        """Most probable component of one feature vector."""
        return int(self._log_joint(self._as_row(value)).argmax())

    def predictProbability(self, value) -> DenseVector:
        """Posterior probability of each component for one feature vector."""
        log_joint = self._log_joint(self._as_row(value))
        return Vectors.dense(np.exp(log_joint - log_sum_exp(log_joint)[:, None])[0])

    def _transform(self, dataset: DataFrame) -> DataFrame:
        x = self._feature_array(dataset)
        scored = dataset.withColumn("__spark_gmm_scores", _scoring_udf(self._centred, self._center)(x))
        out = [F.col(f"`{c}`") for c in dataset.columns]
        out.append(F.col("__spark_gmm_scores.prediction").alias(self.getPredictionCol()))
        probability = F.col("__spark_gmm_scores.probability")
        out.append(
            F.when(probability.isNotNull(), array_to_vector(probability)).alias(self.getProbabilityCol())
        )
        if self.getLogLikelihoodCol():
            out.append(F.col("__spark_gmm_scores.logLikelihood").alias(self.getLogLikelihoodCol()))
        return scored.select(*out)

    def _log_likelihood(self, dataset: DataFrame) -> tuple[float, float]:
        """(Σ w·log p(x), Σ w) over `dataset`, in one pass; rows that cannot be scored are refused
        (or, with handleInvalid='skip', left out)."""
        x = self._feature_array(dataset)
        w = self._weight_column(dataset) if self.isDefined(self.weightCol) else None
        ll = _scoring_udf(self._centred, self._center)(x).logLikelihood
        weight = F.lit(1.0) if w is None else w
        usable = ll.isNotNull() & weight.isNotNull() & (weight >= 0) & ~F.isnan(weight)
        total, mass, bad = dataset.select(
            F.sum(F.when(usable, ll * weight)),
            F.sum(F.when(usable, weight)),
            F.count(F.when(~usable, F.lit(1))),
        ).first()
        if bad and self.getHandleInvalid() != "skip":
            raise InvalidInputError(
                f"{bad} rows cannot be scored (null, NaN or infinite features, a vector of other than "
                f"{self.numFeatures} features, or a bad weight); set handleInvalid='skip' to leave them out"
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
        return -2.0 * total + free_parameters(self.getK(), self.numFeatures, self.getCovarianceType()) * np.log(mass)

    def aic(self, dataset: DataFrame) -> float:
        """Akaike information criterion on `dataset` (lower is better)."""
        total, _ = self._log_likelihood(dataset)
        return -2.0 * total + 2.0 * free_parameters(self.getK(), self.numFeatures, self.getCovarianceType())

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
            _sampler(self._mixture, seed), "features array<double>, component int"
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
        m = self._mixture
        return persistence.write_directory(
            self, path, overwrite, extra, (m.weights, m.means, m.covariances)
        )

    @classmethod
    def _load(cls, path: str) -> "GaussianMixtureModel":
        metadata = persistence.read_metadata(path, cls.__name__)
        model = cls(*persistence.read_components(path, metadata))
        model._feature_names = metadata.get("featureNames")
        persistence.restore_params(model, metadata)
        return model

    def __repr__(self) -> str:
        return f"GaussianMixtureModel(uid={self.uid}, k={self.getK()}, numFeatures={self.numFeatures})"


def _scoring_udf(mixture: Mixture, center: np.ndarray):
    """pandas UDF: prediction, probability and log density of each row; null for unusable rows."""

    @pandas_udf("prediction int, probability array<double>, logLikelihood double")
    def score(features: pd.Series) -> pd.DataFrame:
        n, d = len(features), mixture.d
        usable = np.array([v is not None and len(v) == d for v in features], dtype=bool)
        x = np.zeros((n, d))
        if usable.any():
            x[usable] = np.stack(features[usable].to_numpy())
        usable &= np.isfinite(x).all(axis=1)
        log_joint = weighted_log_joint(x - center, mixture)
        log_norm = log_sum_exp(log_joint)
        probability = np.exp(log_joint - log_norm[:, None])
        return pd.DataFrame(
            {
                "prediction": pd.Series(log_joint.argmax(axis=1), dtype="Int32").where(usable),
                "probability": [p if ok else None for p, ok in zip(probability, usable)],
                "logLikelihood": np.where(usable, log_norm, np.nan),
            }
        )

    return score


def _sampler(mixture: Mixture, seed: int):
    """mapInPandas function: row i's component and Gaussian draw from uniforms hashed from (i, seed)."""
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


class GaussianMixtureSummary:
    """Training summary: MLlib's fields plus the log-likelihood history and convergence."""

    def __init__(
        self, model: GaussianMixtureModel, dataset: DataFrame, result: em.FitResult, skipped: int,
        total_weight: float,
    ):
        self._model, self._dataset = model, dataset
        self.k = model.getK()
        self.clusterSizes = list(result.cluster_sizes)
        self.logLikelihood = float(result.log_likelihood)
        self.logLikelihoodHistory = [float(v) for v in result.history]
        self.numIter = int(result.iterations)
        self.converged = bool(result.converged)
        self.emptyComponents = list(result.empty_components)
        self.iterationSeconds = [float(v) for v in result.iteration_seconds]
        self.invalidRowsSkipped = int(skipped)
        self.resumedFromIteration = int(result.resumed_from)
        self.totalWeight = float(total_weight)  # rows fitted, or their total weight with weightCol
        self.featuresCol = model.getFeaturesCol()
        self.predictionCol = model.getPredictionCol()
        self.probabilityCol = model.getProbabilityCol()
        self._predictions = None

    @property
    def predictions(self) -> DataFrame:
        if self._predictions is None:
            self._predictions = self._model.transform(self._dataset)
        return self._predictions

    @property
    def cluster(self) -> DataFrame:
        return self.predictions.select(self.predictionCol)

    @property
    def probability(self) -> DataFrame:
        return self.predictions.select(self.probabilityCol)

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "clusterSizes": self.clusterSizes,
            "logLikelihood": self.logLikelihood,
            "logLikelihoodHistory": self.logLikelihoodHistory,
            "numIter": self.numIter,
            "converged": self.converged,
            "emptyComponents": self.emptyComponents,
            "iterationSeconds": self.iterationSeconds,
            "invalidRowsSkipped": self.invalidRowsSkipped,
            "resumedFromIteration": self.resumedFromIteration,
            "totalWeight": self.totalWeight,
        }
