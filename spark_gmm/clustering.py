"""`GaussianMixture`: the estimator, a drop-in for pyspark.ml.clustering's. It holds Params and
setters, turns them into a `fitting.FitRequest`, and builds the model from the result; reading,
validating and fitting the data on an engine is `fitting`'s job."""

from __future__ import annotations

import numpy as np
from pyspark.ml import Estimator
from pyspark.sql import DataFrame

from . import em, fitting, persistence
from .model import GaussianMixtureModel, fitted_model
from .options import check_options
from .params import GaussianMixtureParams, KeywordParams


class GaussianMixture(GaussianMixtureParams, KeywordParams, Estimator, persistence.Persistable):
    """Gaussian mixture clustering by distributed expectation-maximisation.

    Same parameters and defaults as `pyspark.ml.clustering.GaussianMixture`, plus `regCovar`,
    `initMode`, `inputCols`, `logLikelihoodCol` and `handleInvalid`.
    """

    def __init__(self, **params):
        super().__init__()
        self._initial_model: GaussianMixtureModel | None = None
        self.setParams(**params)

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

    # -- fitting: the Spark side lives in `fitting`; here, Params in and a model out -------------

    def _check_params(self) -> None:
        check_options({p.name: self.getOrDefault(p) for p in self.params if self.isDefined(p)})
        if self.getNInit() > 1 and self.getCheckpointDir():
            raise ValueError("checkpointDir needs nInit=1 (restarts are not checkpointed)")

    def _settings(self) -> em.FitSettings:
        return em.FitSettings(
            k=self.getK(),
            max_iter=self.getMaxIter(),
            tol=self.getTol(),
            reg_covar=self.getRegCovar(),
            seed=self.getSeed(),
            init_mode=self.getInitMode(),
            covariance_type=self.getCovarianceType(),
            reseed=self.getReseedComponents(),
            dtype=self.getDtype(),
        )

    def _request(self) -> fitting.FitRequest:
        initial = self._initial_model
        return fitting.FitRequest(
            settings=self._settings(),
            features_col=self.getFeaturesCol(),
            input_cols=self.getInputCols() if self.isDefined(self.inputCols) else None,
            weight_col=self.getWeightCol() if self.isDefined(self.weightCol) else None,
            handle_invalid=self.getHandleInvalid(),
            aggregation_depth=self.getAggregationDepth(),
            engine=self.getEngine(),
            n_init=self.getNInit(),
            checkpoint_dir=self.getCheckpointDir(),
            checkpoint_interval=self.getCheckpointInterval(),
            initial=None if initial is None else (np.asarray(initial.weights), initial.means, initial.covariances),
        )

    def _fit(self, dataset: DataFrame) -> GaussianMixtureModel:
        self._check_params()
        (fitted,) = fitting.fit(dataset, self._request())
        return fitted_model(fitted, dataset, self)

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
        fits = fitting.fit(dataset, self._request(), [e._settings() for e in estimators])
        models = [fitted_model(f, dataset, e) for e, f in zip(estimators, fits)]
        return iter(list(enumerate(models)))

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
