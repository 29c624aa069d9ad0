"""`GaussianMixture`: the estimator, a drop-in for pyspark.ml.clustering's, built on pyspark.ml's
Estimator and Params and the distributed EM in `em` and `blocks`."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import replace

import numpy as np
from pyspark.ml import Estimator
from pyspark.sql import DataFrame, functions as F

from . import barrier, codec, em, persistence
from .blocks import BlockCache, partials_at_driver
from .checkpoint import Checkpointer
from .exceptions import ComponentWarning, InputWarning, InvalidInputError
from .inputs import (
    check_driver_memory,
    check_executor_memory,
    executor_errors_explained,
    feature_count,
    feature_names,
    jvm_bytes,
)
from .mixture import ComponentStatistics, Mixture, thin_components
from .model import GaussianMixtureModel, GaussianMixtureSummary
from .options import check_options
from .params import GaussianMixtureParams

log = logging.getLogger("spark_gmm")

#: Largest feature magnitude (and range) a fit accepts: squared distances must stay finite.
LARGEST_FEATURE = 1e150


class GaussianMixture(GaussianMixtureParams, Estimator, persistence.Persistable):
    """Gaussian mixture clustering by distributed expectation-maximisation.

    Same parameters and defaults as `pyspark.ml.clustering.GaussianMixture`, plus `regCovar`,
    `initMode`, `inputCols`, `logLikelihoodCol` and `handleInvalid`.
    """

    def __init__(self, **params):
        super().__init__()
        self._initial_model: GaussianMixtureModel | None = None
        self.setParams(**params)

    def setParams(self, **params):
        """Set any Params by name (keyword arguments only, as pyspark.ml's); None leaves one unset."""
        unknown = sorted(set(params) - {p.name for p in self.params})
        if unknown:
            raise TypeError(f"unknown parameter(s) {', '.join(unknown)} for GaussianMixture")
        return self._set(**{name: value for name, value in params.items() if value is not None})

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

    def setCovarianceType(self, value: str):
        return self._set(covarianceType=value)

    def setInitMode(self, value: str):
        return self._set(initMode=value)

    def setNInit(self, value: int):
        return self._set(nInit=value)

    def setReseedComponents(self, value: bool):
        return self._set(reseedComponents=value)

    def setEngine(self, value: str):
        return self._set(engine=value)

    def setDtype(self, value: str):
        return self._set(dtype=value)

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
        check_options({p.name: self.getOrDefault(p) for p in self.params if self.isDefined(p)})
        if self.getNInit() > 1 and self.getCheckpointDir():
            raise ValueError("checkpointDir needs nInit=1 (restarts are not checkpointed)")

    def _fit(self, dataset: DataFrame) -> "GaussianMixtureModel":
        self._check_params()
        cache, summary, skipped = self._prepare(dataset)
        try:
            result = self._run(cache, summary, dataset.sparkSession)
        finally:
            self._release(cache)
        return self._model(result, dataset, summary, skipped)

    #: Params that may differ between candidates fitted together in shared passes.
    CANDIDATE_PARAMS = ("k", "covarianceType", "seed", "initMode", "maxIter", "tol", "regCovar", "reseedComponents")

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
            with barrier.reducer(self.getEngine(), cache, summary, dataset.sparkSession) as reduce:
                results = em.fit(
                    reduce, summary.d, summary.total_weight,
                    [e._settings(summary) for e in estimators], describe=cache.describe,
                )
        finally:
            self._release(cache)
        models = [e._model(r, dataset, summary, skipped) for e, r in zip(estimators, results)]
        return iter(list(enumerate(models)))

    def _prepare(self, dataset: DataFrame, k: int | None = None):
        """(cached blocks, input summary, rows skipped), validated for `k` (default: this k)."""
        x = self.featureColumn(dataset)
        w = self.weightColumn(dataset)
        self._check_size_before_packing(dataset, x, k or self.getK())
        cache = BlockCache(dataset, x, w, self.getAggregationDepth())
        try:
            log.info("reading and validating the input into cached blocks")
            began = time.perf_counter()
            cache.describe("reading the input into cached blocks")
            summary = executor_errors_explained(cache.summarize)
            skipped = self.copy({self.k: k or self.getK()})._validate(summary, dataset.sparkSession)
            seconds = time.perf_counter() - began
            log.info(
                "input: %d rows × %d features in %d partitions%s, packed in %.1f s (%.0f rows/s)",
                summary.rows, summary.d, summary.partitions,
                f", {skipped} invalid rows left out" if skipped else "", seconds, summary.rows / max(seconds, 1e-9),
            )
            if self.getDtype() == "float32":
                cache.narrow()
        except BaseException:
            self._release(cache)
            raise
        return cache, summary, skipped

    def _check_size_before_packing(self, dataset: DataFrame, x, k: int) -> None:
        """Refuse a fit too large for the driver before the input is read in full: the feature count
        comes from the schema, or from the first row that has features."""
        input_cols = self.getInputCols() if self.isDefined(self.inputCols) else None
        d = feature_count(dataset, self.getFeaturesCol(), input_cols)
        if d is None:
            first = dataset.select(F.size(x).alias("d")).where(x.isNotNull()).first()
            d = int(first["d"]) if first is not None else 0
        if d > 0:
            check_driver_memory(k, d, 8 * ComponentStatistics.size(k, d), 1, 0)

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
                ComponentWarning,
                stacklevel=4,
            )
        model = GaussianMixtureModel(final.weights, final.means, final.covariances)
        input_cols = self.getInputCols() if self.isDefined(self.inputCols) else None
        names = feature_names(dataset, self.getFeaturesCol(), input_cols)
        model._feature_names = names if names and len(names) == summary.d else None
        self._copyValues(model)
        model._resetUid(self.uid)  # as pyspark.ml: the model shares its estimator's uid and Params
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
            log.warning("handleInvalid='%s': left out %d invalid rows", self.getHandleInvalid(), invalid)
        if s.rows == 0:
            raise InvalidInputError(f"no rows to fit in '{column}': the input is empty" + (
                f" after skipping {invalid} invalid rows" if invalid else ""))
        if s.d == 0:
            raise InvalidInputError(f"features column '{column}' has vectors of length 0")
        if not s.total_weight > 0:
            raise InvalidInputError(f"weight column '{self.getWeightCol()}': all weights are zero")
        if self.getK() > s.rows:
            raise InvalidInputError(f"k={self.getK()} is larger than the number of rows ({s.rows})")
        extreme = np.maximum(np.abs(s.shift) + s.span / 2, s.span)
        for i in np.flatnonzero(extreme > LARGEST_FEATURE):
            raise InvalidInputError(
                f"feature {self._feature_name(i)} has values as large as {extreme[i]:.3g}: their squares "
                "overflow float64 in the densities; rescale it (e.g. StandardScaler)"
            )
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
        check_executor_memory(self.getK(), s.d, spark)
        return invalid

    def _run(self, cache: BlockCache, summary, spark) -> em.FitResult:
        settings = self._settings(summary)
        restarts = self.getNInit() > 1 and settings.start is None
        checkpointer = None if restarts else self._checkpointer(spark, summary)
        resume = checkpointer.latest() if checkpointer else None
        # Checkpoint writes are Spark jobs: they need a task slot the barrier stage leaves free.
        spare = 1 if checkpointer else 0
        with barrier.reducer(self.getEngine(), cache, summary, spark, spare) as reduce:
            if restarts:
                return self._restarts(reduce, cache, summary, settings)
            return em.fit(
                reduce, summary.d, summary.total_weight, [settings], resume=resume,
                on_state=checkpointer.save if checkpointer else None, describe=cache.describe,
            )[0]

    def _restarts(self, reduce, cache: BlockCache, summary, settings: em.FitSettings) -> em.FitResult:
        """nInit fits from seeds seed, seed+1, ... in shared passes; the best one."""
        candidates = [replace(settings, seed=settings.seed + i) for i in range(self.getNInit())]
        results = em.fit(reduce, summary.d, summary.total_weight, candidates, describe=cache.describe)
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
            "reseedComponents": self.getReseedComponents(),
        }
        return Checkpointer(
            spark, directory, self.getCheckpointInterval(), fingerprint, self.getMaxIter()
        )

    def _settings(self, summary) -> em.FitSettings:
        start = None
        if self._initial_model is not None:
            model = self._initial_model
            if model.getK() != self.getK():
                raise InvalidInputError(
                    f"k={self.getK()} but the initial model has {model.getK()} components; set k to "
                    "match it (setInitialModel sets it)"
                )
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
                            ComponentWarning,
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
            reseed=self.getReseedComponents(),
            dtype=self.getDtype(),
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
