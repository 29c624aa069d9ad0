"""Saving and loading estimators and models: plain JSON and Parquet, never pickle.

Layout of a saved directory (format version 1):

- ``data/``: Parquet, one row per component — ``component`` (int), ``weight`` (double), ``mean``
  (array<double>, length d), ``covariance`` (array<double>, the d×d matrix in row-major order).
  Models only.
- ``metadata/``: one text file holding one JSON object — ``class``, ``formatVersion``,
  ``sparkGmmVersion``, ``sparkVersion``, ``uid``, ``timestamp``, ``paramMap``, ``defaultParamMap``,
  and for models ``k``, ``numFeatures`` and ``summary`` (training log-likelihood, history, iterations).

Metadata is written last, so a directory without it is not a model. Both parts are written with Spark's
DataFrame writers, so any path Spark can write (local, HDFS, S3, DBFS) works, under Spark Connect too;
the files are readable without Spark (any JSON and Parquet reader).
"""

from __future__ import annotations

import json
import time

import numpy as np
from pyspark.ml.util import MLReadable, MLReader, MLWritable, MLWriter
from pyspark.sql import SparkSession
from pyspark.sql.utils import AnalysisException

FORMAT_VERSION = 1


class ModelFormatError(ValueError):
    """A directory is not a spark_gmm estimator or model this version can read."""


def _session() -> SparkSession:
    session = SparkSession.getActiveSession()
    if session is None:
        raise RuntimeError("saving or loading needs an active SparkSession")
    return session


def _param_values(instance, param_map) -> dict:
    return {p.name: v for p, v in param_map.items() if p.name in {q.name for q in instance.params}}


def write_directory(instance, path: str, overwrite: bool, extra: dict, components=None) -> None:
    from . import __version__

    spark = _session()
    mode = "overwrite" if overwrite else "error"  # "errorifexists" is not accepted by Spark Connect
    metadata = {
        "class": f"{type(instance).__module__.split('.')[0]}.{type(instance).__name__}",
        "formatVersion": FORMAT_VERSION,
        "sparkGmmVersion": __version__,
        "sparkVersion": spark.version,
        "uid": instance.uid,
        "timestamp": int(time.time() * 1000),
        "paramMap": _param_values(instance, instance._paramMap),
        "defaultParamMap": _param_values(instance, instance._defaultParamMap),
        **extra,
    }
    try:
        if components is not None:
            weights, means, covariances = components
            rows = [
                (j, float(weights[j]), means[j].tolist(), covariances[j].ravel().tolist())
                for j in range(len(weights))
            ]
            spark.createDataFrame(
                rows, "component int, weight double, mean array<double>, covariance array<double>"
            ).coalesce(1).write.mode(mode).parquet(f"{path}/data")
        spark.createDataFrame([(json.dumps(metadata),)], "value string").coalesce(1).write.mode(
            mode
        ).text(f"{path}/metadata")
    except AnalysisException as error:
        if "already exists" in str(error).lower() or "PATH_ALREADY_EXISTS" in str(error):
            raise FileExistsError(
                f"path {path} already exists; use write().overwrite().save(path) to replace it"
            ) from None
        raise


def read_metadata(path: str, expected_class: str) -> dict:
    spark = _session()
    try:
        lines = [r[0] for r in spark.read.text(f"{path}/metadata").collect()]
    except AnalysisException:
        raise ModelFormatError(f"{path} is not a saved spark_gmm {expected_class}: no metadata/") from None
    try:
        metadata = json.loads(lines[0])
    except (IndexError, ValueError):
        raise ModelFormatError(f"{path}/metadata does not hold spark_gmm metadata JSON") from None
    found = metadata.get("class", "?")
    if found != f"spark_gmm.{expected_class}":
        raise ModelFormatError(f"{path} holds a {found}, not a spark_gmm.{expected_class}")
    if metadata.get("formatVersion") != FORMAT_VERSION:
        raise ModelFormatError(
            f"{path} has format version {metadata.get('formatVersion')}; this spark_gmm reads "
            f"version {FORMAT_VERSION}"
        )
    return metadata


def read_components(path: str, k: int, d: int):
    table = _session().read.parquet(f"{path}/data").toArrow().sort_by("component")
    if table.num_rows != k:
        raise ModelFormatError(f"{path}/data has {table.num_rows} components, metadata says {k}")
    weights = table.column("weight").to_numpy()
    means = np.array(table.column("mean").to_pylist(), dtype=np.float64).reshape(k, d)
    covariances = np.array(table.column("covariance").to_pylist(), dtype=np.float64).reshape(k, d, d)
    return weights, means, covariances


def restore_params(instance, metadata: dict) -> None:
    names = {p.name for p in instance.params}
    instance._set(**{n: v for n, v in metadata["paramMap"].items() if n in names})
    instance._resetUid(metadata["uid"])


class Writer(MLWriter):
    """`write().overwrite().save(path)` without the JVM (so it works under Spark Connect)."""

    def __init__(self, instance, save):
        super().__init__()
        self.instance, self._save = instance, save

    def save(self, path: str) -> None:
        self._save(path, self.shouldOverwrite)


class Reader(MLReader):
    def __init__(self, cls):
        super().__init__()
        self.cls = cls

    def load(self, path: str):
        return self.cls._load(path)


class Persistable(MLWritable, MLReadable):
    """Mixin: `save`, `load`, `write()`, `read()` through `_save(path, overwrite)` / `_load(path)`."""

    def write(self) -> MLWriter:
        return Writer(self, self._save)

    @classmethod
    def read(cls) -> MLReader:
        return Reader(cls)
