"""`MixedMixture`: the latent class model over Gaussian, Bernoulli, categorical and count columns
of a DataFrame (docs/mixed.md), fitted by distributed EM over cached blocks that keep missing
values; the model is `mixed_model.MixedMixtureModel`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark.ml import Estimator
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasHandleInvalid,
    HasMaxIter,
    HasPredictionCol,
    HasProbabilityCol,
    HasSeed,
    HasTol,
    HasWeightCol,
)
from pyspark.sql import DataFrame

from . import barrier, em, persistence
from .checkpoint import Checkpointer
from .exceptions import InvalidInputError
from .inputs import require_batch, require_executor_python, weight_column
from .latent import Columns, LatentFamily
from .mixed_input import (
    UNUSABLE,
    MixedBlockCache,
    MixedSchema,
    PackedSummary,
    Survey,
    schema_of,
    survey,
    typed_features,
)
from .options import MIXED_OPTIONS, check_options
from .params import KeywordParams, SharedMixtureParams, declared

log = logging.getLogger("spark_gmm")

def _declared(name: str) -> Param:
    return declared(name, MIXED_OPTIONS)


def _columns_param(kind: str, what: str) -> Param:
    return Param(Params._dummy(), f"{kind}Cols", f"Input columns modelled as {what}.", TypeConverters.toListString)


class MixedMixtureParams(SharedMixtureParams, HasPredictionCol, HasProbabilityCol, HasMaxIter, HasTol, HasSeed, HasWeightCol,
                         HasHandleInvalid):
    """Columns and settings of a latent class fit, with pyspark.ml's getters; defaults from
    `options.MIXED_OPTIONS`."""

    k = _declared("k")
    regCovar = _declared("regCovar")
    covarianceType = _declared("covarianceType")
    nInit = _declared("nInit")
    engine = _declared("engine")
    probabilityFormat = _declared("probabilityFormat")
    smoothing = _declared("smoothing")
    maxLevels = _declared("maxLevels")
    gaussianCols = _columns_param("gaussian", "one multivariate Gaussian per class (numeric)")
    bernoulliCols = _columns_param("bernoulli", "one Bernoulli per class (0/1, boolean or two-valued)")
    categoricalCols = _columns_param("categorical", "one categorical distribution per class (string, integer)")
    poissonCols = _columns_param("poisson", "one Poisson per class (whole numbers ≥ 0)")
    logDensityCol = Param(Params._dummy(), "logDensityCol",
                          "transform adds each row's log density of its observed part in this column.",
                          TypeConverters.toString)

    def __init__(self, *args):
        super().__init__(*args)
        self._setDefault(**{name: option.default for name, option in MIXED_OPTIONS.items()})
        self._setDefault(gaussianCols=[], bernoulliCols=[], categoricalCols=[], poissonCols=[],
                         logDensityCol="logDensity")

    def getSmoothing(self) -> float:
        return self.getOrDefault(self.smoothing)

    def getMaxLevels(self) -> int:
        return self.getOrDefault(self.maxLevels)

    def getGaussianCols(self) -> list[str]:
        return self.getOrDefault(self.gaussianCols)

    def getBernoulliCols(self) -> list[str]:
        return self.getOrDefault(self.bernoulliCols)

    def getCategoricalCols(self) -> list[str]:
        return self.getOrDefault(self.categoricalCols)

    def getPoissonCols(self) -> list[str]:
        return self.getOrDefault(self.poissonCols)

    def getLogDensityCol(self) -> str:
        return self.getOrDefault(self.logDensityCol)

    def setPredictionCol(self, value: str):
        return self._set(predictionCol=value)

    def setProbabilityCol(self, value: str):
        return self._set(probabilityCol=value)

    def setLogDensityCol(self, value: str):
        return self._set(logDensityCol=value)

    def setWeightCol(self, value: str):
        return self._set(weightCol=value)

    def setHandleInvalid(self, value: str):
        return self._set(handleInvalid=value)

    def weightName(self) -> str | None:
        return self.getWeightCol() if self.isDefined(self.weightCol) and self.getWeightCol() else None


# -- the EM loop: the shared `em.fit`, one candidate per seed --------------------------------------


@dataclass(frozen=True)
class EMSettings:
    k: int
    covariance_type: str
    reg_covar: float
    smoothing: float
    max_iter: int
    tol: float
    seeds: tuple[int, ...]  # one fit per seed (nInit), the best objective kept
    levels: tuple[int, ...]


    def candidates(self, columns: Columns) -> list[em.FitSettings]:
        """One `em.FitSettings` per seed, of the latent class family over `columns`."""
        family = LatentFamily(columns, self.levels, self.smoothing)
        return [
            em.FitSettings(k=self.k, max_iter=self.max_iter, tol=self.tol, reg_covar=self.reg_covar, seed=seed,
                           covariance_type=self.covariance_type, family=family)
            for seed in self.seeds
        ]

    def fingerprint(self, summary: PackedSummary, schema: MixedSchema) -> dict:
        """What a checkpoint of this fit must match: the data and every setting that changes the
        model (maxIter: see `checkpoint.Checkpointer`)."""
        return {"k": self.k, "rows": summary.rows, "totalWeight": summary.total_weight, "content": summary.content,
                "schema": schema.to_dict(), "regCovar": self.reg_covar, "tol": self.tol, "seed": self.seeds[0],
                "covarianceType": self.covariance_type, "smoothing": self.smoothing}


def _run_em(reduce, columns: Columns, total_weight: float, settings: EMSettings, describe=None,
            checkpointer: Checkpointer | None = None) -> em.FitResult:
    """EM from each seed's random start, all in shared passes of the one EM loop (`em.fit` with
    `latent.LatentFamily`); the fit with the highest objective. `total_weight` is the weight of
    the rows with something observed. With a `checkpointer` (one seed), resumed from its latest
    checkpoint and saved to it."""
    candidates = settings.candidates(columns)
    resume = checkpointer.latest() if checkpointer else None
    results = em.fit(reduce, columns.d, total_weight, candidates, resume=resume,
                     on_state=checkpointer.save if checkpointer else None, describe=describe)
    best = max(range(len(results)), key=lambda i: results[i].history[-1])
    if len(results) > 1:
        others = ", ".join(f"{r.history[-1]:.10g}" for i, r in enumerate(results) if i != best)
        log.info("nInit=%d: kept seed %d, objective %.10g; others: %s", len(results), settings.seeds[best],
                 results[best].history[-1], others)
    return results[best]


# -- the estimator ---------------------------------------------------------------------------------


class MixedMixture(MixedMixtureParams, KeywordParams, Estimator, persistence.Persistable):
    """Latent class clustering of mixed columns by distributed EM: given its class, a row's
    Gaussian block, Bernoulli, categorical and count columns are independent; missing values can
    be marginalised (handleInvalid='keep')."""

    def __init__(self, **params):
        super().__init__()
        self.setParams(**params)

    def setK(self, value: int):
        return self._set(k=value)

    def setGaussianCols(self, value: list[str]):
        return self._set(gaussianCols=value)

    def setBernoulliCols(self, value: list[str]):
        return self._set(bernoulliCols=value)

    def setCategoricalCols(self, value: list[str]):
        return self._set(categoricalCols=value)

    def setPoissonCols(self, value: list[str]):
        return self._set(poissonCols=value)

    def setCovarianceType(self, value: str):
        return self._set(covarianceType=value)

    def setRegCovar(self, value: float):
        return self._set(regCovar=value)

    def setSmoothing(self, value: float):
        return self._set(smoothing=value)

    def setMaxLevels(self, value: int):
        return self._set(maxLevels=value)

    def setMaxIter(self, value: int):
        return self._set(maxIter=value)

    def setTol(self, value: float):
        return self._set(tol=value)

    def setSeed(self, value: int):
        return self._set(seed=value)

    def setNInit(self, value: int):
        return self._set(nInit=value)

    def setEngine(self, value: str):
        return self._set(engine=value)

    def setCheckpointDir(self, value: str):
        return self._set(checkpointDir=value)

    def setCheckpointInterval(self, value: int):
        return self._set(checkpointInterval=value)

    #: Params that may differ between candidates fitted together in shared passes (the others set
    #: the packed rows or the model family, which candidates share).
    CANDIDATE_PARAMS = ("k", "covarianceType", "seed", "maxIter", "tol", "regCovar")

    def _fit(self, dataset: DataFrame):
        (model,) = self._fit_together(dataset, [self])
        return model

    def fitMultiple(self, dataset: DataFrame, paramMaps):
        """One model per param map. When the maps change only `CANDIDATE_PARAMS` (and nInit is 1,
        without checkpointDir), the input is surveyed and packed once and the candidates share
        every EM pass (each takes exactly the steps it takes alone); otherwise one by one."""
        estimators = [self.copy(param_map) for param_map in paramMaps]
        shared = all(param.name in self.CANDIDATE_PARAMS for param_map in paramMaps for param in param_map)
        if not shared or len(estimators) < 2 or self.getCheckpointDir() or any(e.getNInit() > 1 for e in estimators):
            return super().fitMultiple(dataset, paramMaps)
        return iter(list(enumerate(self._fit_together(dataset, estimators))))

    def _em_settings(self, levels: tuple[int, ...]) -> EMSettings:
        return EMSettings(self.getK(), self.getCovarianceType(), self.getRegCovar(), self.getSmoothing(),
                          self.getMaxIter(), self.getTol(), tuple(self.getSeed() + i for i in range(self.getNInit())),
                          levels)

    def _fit_together(self, dataset: DataFrame, estimators: list["MixedMixture"]) -> list:
        """The models of `estimators` (this one, or copies differing in `CANDIDATE_PARAMS` only)
        from one survey and one packing; several share every pass."""
        from .mixed_model import MixedMixtureModel

        require_batch(dataset, "MixedMixture.fit")
        for estimator in estimators:
            values = {p.name: estimator.getOrDefault(p) for p in estimator.params if estimator.isDefined(p)}
            check_options(values, MIXED_OPTIONS)
        if self.getNInit() > 1 and self.getCheckpointDir():
            raise ValueError("checkpointDir needs nInit=1 (restarts are not checkpointed)")
        kinds = {"gaussian": self.getGaussianCols(), "bernoulli": self.getBernoulliCols(),
                 "categorical": self.getCategoricalCols(), "poisson": self.getPoissonCols()}
        features = typed_features(dataset, kinds)
        weight = weight_column(dataset, self.weightName())
        require_executor_python(dataset.sparkSession)
        log.info("surveying the input: levels, ranges, missing values")
        found = survey(dataset, features, weight, self.getMaxLevels())
        skipped = self._validate(found, features)
        schema = schema_of(dataset, features, found, self.getMaxLevels())
        cache = MixedBlockCache(dataset, schema, weight, self.getHandleInvalid())
        try:
            cache.describe("reading the input into cached blocks")
            packed = cache.summarize()
            log.info("input: %d rows × %d columns in %d partitions%s", packed.rows, len(features), packed.partitions,
                     f", {skipped} rows left out" if skipped else "")
            largest = max(e.getK() for e in estimators)
            if packed.rows < largest:
                raise InvalidInputError(f"k={largest} is larger than the number of rows to fit ({packed.rows})")
            if not packed.total_weight > 0:
                raise InvalidInputError(f"weight column '{self.weightName()}': all weights are zero")
            settings = [e._em_settings(schema.levels) for e in estimators]
            checkpointer = None
            if self.getCheckpointDir():
                checkpointer = Checkpointer(dataset.sparkSession, self.getCheckpointDir(), self.getCheckpointInterval(),
                                            settings[0].fingerprint(packed, schema),
                                            settings[0].candidates(schema.columns)[0])
            # Checkpoint writes are Spark jobs: they need a task slot the barrier stage leaves free.
            spare = 1 if checkpointer else 0
            with barrier.reducer(self.getEngine(), cache, packed, dataset.sparkSession, spare) as reduce:
                if len(settings) == 1:
                    results = [_run_em(reduce, schema.columns, packed.total_weight, settings[0], cache.describe,
                                       checkpointer)]
                else:
                    candidates = [s.candidates(schema.columns)[0] for s in settings]
                    results = em.fit(reduce, schema.columns.d, packed.total_weight, candidates,
                                     describe=cache.describe)
        finally:
            cache.describe(None)
            cache.unpersist()
        models = []
        for estimator, result in zip(estimators, results):
            model = MixedMixtureModel(result.mixture, schema)
            estimator._copyValues(model)
            model._resetUid(estimator.uid)
            model.attach_summary(dataset, result, skipped, packed.total_weight)
            log.info("fit done: k=%d, %d iterations, converged=%s, log-likelihood %.10g",
                     estimator.getK(), result.iterations, result.converged, result.log_likelihood)
            models.append(model)
        return models

    def _validate(self, found: Survey, features) -> int:
        """Refuse what cannot be fitted, naming the column, the count and a value; returns the
        rows left out (by 'skip' or 'keep')."""
        handle = self.getHandleInvalid()
        if found.rows == 0:
            raise InvalidInputError("no rows to fit: the input is empty")
        for feature, column in zip(features, found.columns):
            if feature.kind == "gaussian" and column["min"] is None:
                raise InvalidInputError(f"gaussian column '{feature.name}' has no finite value")
            if handle != "error":
                continue
            if column["missing"]:
                raise InvalidInputError(
                    f"{feature.kind} column '{feature.name}' has {column['missing']} missing values (null or "
                    f"NaN) in {found.rows} rows; set handleInvalid='keep' to marginalise them or 'skip' to "
                    "leave their rows out"
                )
            if column["bad"]:
                raise InvalidInputError(
                    f"{feature.kind} column '{feature.name}' has {column['bad']} {UNUSABLE[feature.kind]} "
                    f"(e.g. {column['example']!r}); set handleInvalid='keep' to treat them as missing or "
                    "'skip' to leave their rows out"
                )
        if found.bad_weights and handle == "error":
            raise InvalidInputError(
                f"weight column '{self.weightName()}' has {found.bad_weights} null, negative, NaN or infinite "
                "weights; set handleInvalid='skip' to leave their rows out"
            )
        skipped = {"error": 0, "skip": found.dropped_skip, "keep": found.dropped_keep}[handle]
        if skipped:
            log.warning("handleInvalid='%s': %d of %d rows left out", handle, skipped, found.rows)
        if skipped == found.rows:
            raise InvalidInputError(f"no rows to fit: handleInvalid='{handle}' leaves out all {found.rows} rows")
        return skipped

    def _save(self, path: str, overwrite: bool) -> str:
        return persistence.write_directory(self, path, overwrite, {})

    @classmethod
    def _load(cls, path: str) -> "MixedMixture":
        estimator = cls()
        persistence.restore_params(estimator, persistence.read_metadata(path, cls.__name__))
        return estimator
