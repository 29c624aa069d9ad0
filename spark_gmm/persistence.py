"""Saving and loading estimators and models: plain JSON and Parquet, never pickle.

Layout of a saved directory (format version 1):

- ``data/``: Parquet, one row per component — ``component`` (int), ``weight`` (double), ``mean``
  (array<double>, length d), ``covariance`` (array<double>, the d×d matrix in row-major order),
  ``writeId`` (string). Models only.
- ``metadata/``: one text file holding one JSON object — ``class``, ``formatVersion``,
  ``sparkGmmVersion``, ``sparkVersion``, ``uid``, ``timestamp``, ``writeId``, ``paramMap``,
  ``defaultParamMap``; for estimators ``hasInitialModel`` (the model in ``initialModel/``, with its
  ``initialModelWriteId``); for models ``k``, ``numFeatures``, ``featureNames`` (or null), ``covarianceType`` and ``summary``
(training log-likelihood, history, iterations).

Each save draws a fresh ``writeId``, stored in the metadata and in every data row, and writes the
metadata last. So a save killed at any moment leaves a directory that does not load as a model: either
it has no metadata, or its metadata names another save's data (an interrupted overwrite). Both parts
are written with Spark's DataFrame writers, so any path Spark can write (local, HDFS, S3, DBFS) works,
under Spark Connect too; the files are readable without Spark (any JSON and Parquet reader).
"""

from __future__ import annotations

import json
import time
import uuid

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


def _exists(spark: SparkSession, path: str) -> bool:
    """Whether anything is at `path`, through Spark's own file listing (no JVM gateway needed)."""
    try:
        spark.read.format("binaryFile").load(path).schema
    except AnalysisException as error:
        if "PATH_NOT_FOUND" in str(error) or "does not exist" in str(error).lower():
            return False
        raise
    return True


def refuse_existing(path: str, overwrite: bool) -> None:
    """Without overwrite, refuse any existing `path` before writing anything into it."""
    if not overwrite and _exists(_session(), path):
        raise FileExistsError(f"path {path} already exists; use write().overwrite().save(path) to replace it")


def write_directory(instance, path: str, overwrite: bool, extra: dict, components=None) -> str:
    """Write `instance` (and a model's components) under `path`, metadata last; returns the writeId."""
    from . import __version__

    spark = _session()
    mode = "overwrite" if overwrite else "error"  # "errorifexists" is not accepted by Spark Connect
    write_id = uuid.uuid4().hex
    metadata = {
        "class": f"{type(instance).__module__.split('.')[0]}.{type(instance).__name__}",
        "formatVersion": FORMAT_VERSION,
        "sparkGmmVersion": __version__,
        "sparkVersion": spark.version,
        "uid": instance.uid,
        "timestamp": int(time.time() * 1000),
        "writeId": write_id,
        "paramMap": _param_values(instance, instance._paramMap),
        "defaultParamMap": _param_values(instance, instance._defaultParamMap),
        **extra,
    }
    if components is not None:
        weights, means, covariances = components
        rows = [
            (j, float(weights[j]), means[j].tolist(), covariances[j].ravel().tolist(), write_id)
            for j in range(len(weights))
        ]
        spark.createDataFrame(
            rows,
            "component int, weight double, mean array<double>, covariance array<double>, writeId string",
        ).coalesce(1).write.mode(mode).parquet(f"{path}/data")
    spark.createDataFrame([(json.dumps(metadata),)], "value string").coalesce(1).write.mode(
        mode
    ).text(f"{path}/metadata")
    return write_id


def read_metadata(path: str, expected_class: str) -> dict:
    spark = _session()
    try:
        lines = [r[0] for r in spark.read.text(f"{path}/metadata").collect()]
    except AnalysisException:
        lines = []
    if not lines:
        raise ModelFormatError(
            f"{path} is not a saved spark_gmm {expected_class}: no metadata/ (not a model directory, "
            "or a save that was interrupted)"
        )
    try:
        metadata = json.loads(lines[0])
    except ValueError:
        raise ModelFormatError(f"{path}/metadata does not hold spark_gmm metadata JSON") from None
    found = metadata.get("class", "?") if isinstance(metadata, dict) else "?"
    if found != f"spark_gmm.{expected_class}":
        raise ModelFormatError(f"{path} holds a {found}, not a spark_gmm.{expected_class}")
    if metadata.get("formatVersion") != FORMAT_VERSION:
        raise ModelFormatError(
            f"{path} has format version {metadata.get('formatVersion')}; this spark_gmm reads "
            f"version {FORMAT_VERSION}"
        )
    return metadata


def read_components(path: str, metadata: dict):
    """(weights, means, covariances) saved under `path`, checked against its metadata."""
    k, d, write_id = metadata["k"], metadata["numFeatures"], metadata["writeId"]
    try:
        table = _session().read.parquet(f"{path}/data").toArrow().sort_by("component")
        ids = set(table.column("writeId").to_pylist())
        weights = table.column("weight").to_numpy()
        means = np.array(table.column("mean").to_pylist(), dtype=np.float64)
        covariances = np.array(table.column("covariance").to_pylist(), dtype=np.float64)
    except Exception as error:  # missing, truncated or foreign files: one clear line, not a JVM trace
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFormatError(
            f"{path}/data cannot be read as spark_gmm model data (corrupt, or a save into this "
            f"directory was interrupted): {first}"
        ) from None
    if ids != {write_id}:
        raise ModelFormatError(
            f"{path}/data was not written by the save that wrote {path}/metadata (a save into this "
            "directory was interrupted); save the model again"
        )
    if table.num_rows != k or means.shape != (k, d) or covariances.shape != (k, d * d):
        raise ModelFormatError(
            f"{path}/data holds {table.num_rows} components of shape {means.shape[1:]}, metadata says "
            f"k={k}, numFeatures={d}"
        )
    return weights, means, covariances.reshape(k, d, d)


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
        refuse_existing(path, self.shouldOverwrite)
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
