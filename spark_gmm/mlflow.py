"""MLflow for spark_gmm (`pip install 'spark-gmm[mlflow]'`; the rest of the library never imports
this module): `log_model` logs a fitted model as an MLflow `python_function` model that scores a
pandas DataFrame in numpy, without Spark, and `log_run` logs a fit or select job's run (parameters,
the log-likelihood per iteration, the summary figures, the drift, the report and the model).

The MLflow model holds the mixture as JSON (floats written exactly) plus the spark_gmm package
itself (`code_paths`), so `mlflow.pyfunc.load_model` and `mlflow models serve` need numpy, pandas and
pyspark installed (spark_gmm imports pyspark) but no Spark session and no spark-gmm install. Its
predictions are those of `transform`: `prediction` (position; `componentId` gives the stable id) and
`probability`; a row with a missing or non-finite feature gets nulls (it is not scored).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile

import numpy as np
import pandas as pd

try:
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import PythonModel
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, Schema
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"spark_gmm.mlflow needs MLflow ({error}); pip install 'spark-gmm[mlflow]'") from None

#: The artifact holding the mixture inside the MLflow model.
MIXTURE_ARTIFACT = "mixture"


def _input_columns(model) -> tuple[list[str], bool]:
    """(input column names, whether they are one array column): the model's feature names when
    known, otherwise its features column holding arrays of numbers."""
    if model.featureNames:
        return list(model.featureNames), False
    return [model.getFeaturesCol()], True


def signature(model) -> ModelSignature:
    """Input columns (double each, or one array<double>) → prediction, componentId, probability."""
    columns, vector = _input_columns(model)
    inputs = Schema([ColSpec(Array(DataType.double) if vector else DataType.double, c) for c in columns])
    outputs = Schema([
        ColSpec(DataType.long, "prediction"), ColSpec(DataType.long, "componentId"),
        ColSpec(Array(DataType.double), "probability"),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


class MixtureModel(PythonModel):
    """The python_function model: the saved mixture scored with `GaussianMixtureModel.scoreArray`."""

    def load_context(self, context):
        from spark_gmm import GaussianMixtureModel

        with open(context.artifacts[MIXTURE_ARTIFACT]) as handle:
            spec = json.load(handle)
        self._model = GaussianMixtureModel(spec["weights"], spec["means"], spec["covariances"])
        self._columns, self._vector, self._ids = spec["columns"], spec["vectorColumn"], spec["componentIds"]

    def _features(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self._columns if c not in frame.columns]
        if missing:
            raise ValueError(f"input column '{missing[0]}' is missing; the model reads {', '.join(self._columns)}")
        d = self._model.numFeatures
        if not self._vector:
            return frame[self._columns].to_numpy(dtype=np.float64, na_value=np.nan)
        rows = [np.asarray(v, dtype=np.float64) if v is not None else np.full(d, np.nan) for v in frame[self._columns[0]]]
        return np.stack([r if r.shape == (d,) else np.full(d, np.nan) for r in rows]) if rows else np.empty((0, d))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        x = self._features(model_input)
        usable = np.isfinite(x).all(axis=1)
        prediction, probability, _ = self._model.scoreArray(np.where(usable[:, None], x, 0.0))
        ids = np.asarray(self._ids)[prediction]
        return pd.DataFrame({
            "prediction": pd.Series(prediction, dtype="Int64").where(usable),
            "componentId": pd.Series(ids, dtype="Int64").where(usable),
            "probability": [p.tolist() if ok else None for p, ok in zip(probability, usable)],
        })


def _log_model_call(name: str) -> dict:
    """`name=` on MLflow 3, `artifact_path=` on MLflow 2."""
    return {"name": name} if "name" in inspect.signature(mlflow.pyfunc.log_model).parameters else {"artifact_path": name}


def log_model(model, name: str = "model", registered_model_name: str | None = None, **kwargs):
    """Log `model` (a GaussianMixtureModel) to the active MLflow run (one is started if none is) as a
    python_function model with a signature; returns MLflow's ModelInfo. `registered_model_name`
    also registers it (a Unity Catalog name `catalog.schema.model` with the registry URI
    'databricks-uc'); other keyword arguments go to `mlflow.pyfunc.log_model`."""
    import pyarrow
    import pyspark

    import spark_gmm

    columns, vector = _input_columns(model)
    spec = {
        "weights": model.weights, "means": model.means.tolist(), "covariances": model.covariances.tolist(),
        "columns": columns, "vectorColumn": vector, "componentIds": model.componentIds,
    }
    centre = model.means[0].tolist()
    example = pd.DataFrame({columns[0]: [centre]}) if vector else pd.DataFrame([centre], columns=columns)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "mixture.json")
        with open(path, "w") as handle:
            json.dump(spec, handle)
        return mlflow.pyfunc.log_model(
            python_model=MixtureModel(),
            artifacts={MIXTURE_ARTIFACT: path},
            signature=signature(model),
            input_example=example,
            code_paths=[os.path.dirname(spark_gmm.__file__)],
            pip_requirements=[f"numpy=={np.__version__}", f"pandas=={pd.__version__}",
                              f"pyarrow=={pyarrow.__version__}", f"pyspark=={pyspark.__version__}"],
            registered_model_name=registered_model_name,
            **_log_model_call(name),
            **kwargs,
        )


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def log_run(experiment: str, model, params: dict, fields: dict, report: str | None = None,
            run_name: str | None = None) -> str:
    """Log a job's run to `experiment` (tracking URI from MLFLOW_TRACKING_URI); returns the run id.

    Parameters: `params`. Metrics: `logLikelihood` at each EM iteration (step = iteration), the
    summary's figures, each component's weight (`weight.<id>`) and drift (`<figure>.<id>`). Artifacts:
    the JSON summary line's fields as summary.json, the report, and the model (`log_model`)."""
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({key: value for key, value in params.items() if value is not None})
        history = model.summary.logLikelihoodHistory if model.hasSummary else []
        for step, value in enumerate(history):
            mlflow.log_metric("logLikelihood", value, step=step)
        figures = {key: fields[key] for key in ("k", "iterations", "rows", "fitSeconds")
                   if _finite(fields.get(key))}
        figures["converged"] = float(bool(fields.get("converged")))
        for j, weight in zip(model.componentIds, model.weights):
            figures[f"weight.{j}"] = weight
        drift = fields.get("drift") or {}
        for component in drift.get("components", []):
            for figure in ("weightChange", "meanShift", "divergence", "labelChange"):
                if _finite(component.get(figure)):
                    figures[f"{figure}.{component['id']}"] = component[figure]
        if _finite(drift.get("labelChangeShare")):
            figures["labelChangeShare"] = drift["labelChangeShare"]
        if "driftExceeded" in fields:
            figures["driftAlarms"] = len(fields["driftExceeded"])
        mlflow.log_metrics(figures)
        mlflow.log_dict(fields, "summary.json")
        if report:
            mlflow.log_artifact(report)
        log_model(model, "model")
        return run.info.run_id
