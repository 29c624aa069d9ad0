"""Saving and loading estimators and models: JSON metadata and exact binary Parquet, never pickle.

Layout of a saved directory (format version 2; version 1 directories still load):

- ``data/``: the model's ``weights`` (k), ``means`` (k×d) and ``covariances`` (k×d×d) as exact
  float64 payloads of `codec` (Parquet rows of raw little-endian float64 chunks). Models only.
- ``metadata/``: one text file holding one JSON object — ``class``, ``formatVersion``,
  ``sparkGmmVersion``, ``sparkVersion``, ``uid``, ``timestamp``, ``writeId``, ``paramMap``,
  ``defaultParamMap``; for estimators ``hasInitialModel`` (the model in ``initialModel/``, with its
  ``initialModelWriteId``); for models ``k``, ``numFeatures``, ``featureNames`` (or null),
  ``covarianceType`` and ``summary`` (training log-likelihood, history, iterations).

Each save draws a fresh ``writeId``, stored in the metadata and in every data row, and writes the
metadata last. So a save killed at any moment leaves a directory that does not load as a model: either
it has no metadata, or its metadata names another save's data (an interrupted overwrite). Both parts
are written with Spark's DataFrame writers, so any path Spark can write (local, HDFS, S3, DBFS) works,
under Spark Connect too. Saving and loading check the mixture (`codec.checked_mixture`): a saved
model with an asymmetric or non-positive-definite covariance is refused, naming the component.
`read_arrays` reads a saved model with pyarrow alone, for scoring without Spark.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.ml.util import MLReadable, MLReader, MLWritable, MLWriter
from pyspark.sql import SparkSession
from pyspark.sql.utils import AnalysisException

from . import codec

log = logging.getLogger("spark_gmm")

FORMAT_VERSION = 2
#: Format versions this spark_gmm reads (version 1: one row per component, array<double> columns).
READABLE_VERSIONS = (1, 2)


class ModelFormatError(ValueError):
    """A directory is not a spark_gmm estimator or model this version can read."""


def _session() -> SparkSession:
    """The active session, or a new one (as pyspark.ml's readers and writers do)."""
    session = SparkSession.getActiveSession()
    if session is None:
        log.info("no active SparkSession: starting one to save or load")
        session = SparkSession.builder.getOrCreate()
    return session


def _param_values(instance, param_map) -> dict:
    return {p.name: v for p, v in param_map.items() if p.name in {q.name for q in instance.params}}


def refuse_existing(path: str, overwrite: bool) -> None:
    """Without overwrite, refuse any existing `path` before writing anything into it."""
    if not overwrite and codec.exists(_session(), path):
        raise FileExistsError(f"path {path} already exists; use write().overwrite().save(path) to replace it")


def write_directory(instance, path: str, overwrite: bool, extra: dict, components=None, arrays=None) -> str:
    """Write `instance` (and a model's components, or other named float64 `arrays`) under `path`,
    metadata last; returns the writeId.

    A mixture that would not load again (see `codec.checked_mixture`) is refused before writing."""
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
        try:
            checked = codec.checked_mixture(*components)
        except codec.InvalidMixtureError as why:
            raise codec.InvalidMixtureError(f"cannot save a model to {path}: {why}") from None
        codec.write(spark, f"{path}/data", codec.mixture_arrays(*checked), write_id, overwrite)
    if arrays is not None:
        codec.write(spark, f"{path}/data", arrays, write_id, overwrite)
    spark.createDataFrame([(json.dumps(metadata),)], "value string").coalesce(1).write.mode(
        mode
    ).text(f"{path}/metadata")
    return write_id


def _parse_metadata(lines: list[str], path: str, expected_class: str) -> dict:
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
    if metadata.get("formatVersion") not in READABLE_VERSIONS:
        raise ModelFormatError(
            f"{path} has format version {metadata.get('formatVersion')}; this spark_gmm reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    return metadata


def read_metadata(path: str, expected_class: str) -> dict:
    spark = _session()
    try:
        lines = [r[0] for r in spark.read.text(f"{path}/metadata").collect()]
    except AnalysisException:
        lines = []
    return _parse_metadata(lines, path, expected_class)


def saved_class(path: str) -> str | None:
    """The class a saved directory holds ('spark_gmm.MixedMixtureModel', ...); None when it holds
    no readable metadata (loading it then says why)."""
    try:
        lines = [r[0] for r in _session().read.text(f"{path}/metadata").collect()]
        found = json.loads(lines[0]) if lines else None
    except (AnalysisException, ValueError):
        return None
    return found.get("class") if isinstance(found, dict) else None


def _unreadable(path: str, error: Exception) -> ModelFormatError:
    """Missing, truncated or foreign data files: one clear line, not a JVM trace."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelFormatError(
        f"{path}/data cannot be read as spark_gmm model data (corrupt, or a save into this directory "
        f"was interrupted): {first}"
    )


def _version_1_components(table: pa.Table, path: str, metadata: dict):
    """(weights, means, covariances) of a format-1 data table: one row per component."""
    k, d = metadata["k"], metadata["numFeatures"]
    table = table.sort_by("component")
    if set(table.column("writeId").unique().to_pylist()) != {metadata["writeId"]}:
        raise ModelFormatError(
            f"{path}/data was not written by the save that wrote {path}/metadata (a save into this "
            "directory was interrupted); save the model again"
        )
    means = pc.list_flatten(table.column("mean")).to_numpy()
    covariances = pc.list_flatten(table.column("covariance")).to_numpy()
    if table.num_rows != k or means.size != k * d or covariances.size != k * d * d:
        raise ModelFormatError(
            f"{path}/data holds {table.num_rows} components and {means.size} mean values; metadata "
            f"says k={k}, numFeatures={d}"
        )
    return table.column("weight").to_numpy(), means.reshape(k, d), covariances.reshape(k, d, d)


def _checked(path: str, components):
    try:
        return codec.checked_mixture(*components)
    except codec.InvalidMixtureError as why:
        raise ModelFormatError(f"{path} holds an invalid mixture: {why}") from None


def _payload_error(path: str, metadata: dict, why: codec.PayloadError) -> ModelFormatError:
    k, d = metadata["k"], metadata["numFeatures"]
    return ModelFormatError(f"{why}; its metadata says k={k}, numFeatures={d}")


def read_components(path: str, metadata: dict):
    """(weights, means, covariances) saved under `path`, checked against its metadata."""
    spark = _session()
    try:
        if metadata["formatVersion"] == 1:
            table = spark.read.parquet(f"{path}/data").toArrow()
            return _checked(path, _version_1_components(table, path, metadata))
        shapes = codec.mixture_shapes(metadata["k"], metadata["numFeatures"])
        arrays = codec.read(spark, f"{path}/data", shapes, metadata["writeId"], f"{path}/metadata")
    except (ModelFormatError, codec.PayloadError) as why:
        raise (why if isinstance(why, ModelFormatError) else _payload_error(path, metadata, why)) from None
    except Exception as error:  # noqa: BLE001 — reported as one line naming the path
        raise _unreadable(path, error) from None
    return _checked(path, (arrays["weights"], arrays["means"], arrays["covariances"]))


class SavedMixture(NamedTuple):
    """A saved model's parameters and metadata, as `read_arrays` returns them."""

    weights: np.ndarray  # (k,)
    means: np.ndarray  # (k, d)
    covariances: np.ndarray  # (k, d, d)
    metadata: dict


def read_arrays(path: str) -> SavedMixture:
    """A saved model's parameters, read with pyarrow alone: no SparkSession, no JVM.

    `path` is a local directory or a URI that pyarrow's file systems know (``s3://``, ``gs://``,
    ``hdfs://``). The result scores rows on the driver with
    ``GaussianMixtureModel.fromArrays(*saved[:3], saved.metadata["covarianceType"])``.
    """
    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(path)
    visible = [
        f for f in fs.get_file_info(pafs.FileSelector(f"{root}/metadata", allow_not_found=True))
        if f.is_file and not os.path.basename(f.path).startswith(("_", "."))
    ]
    lines = []
    for info in visible:
        with fs.open_input_stream(info.path) as stream:
            lines += [line for line in stream.read().decode("utf-8").splitlines() if line.strip()]
    metadata = _parse_metadata(lines, path, "GaussianMixtureModel")
    try:
        if metadata["formatVersion"] == 1:
            components = _version_1_components(pq.read_table(f"{root}/data", filesystem=fs), path, metadata)
        else:
            assembly = codec.Assembly(
                codec.mixture_shapes(metadata["k"], metadata["numFeatures"]), metadata["writeId"],
                f"{path}/data", f"{path}/metadata",
            )
            for fragment in pq.ParquetDataset(f"{root}/data", filesystem=fs).fragments:
                for batch in fragment.to_batches(batch_size=16):  # 16 MiB at a time, not a 2nd copy
                    assembly.add(pa.Table.from_batches([batch]))
            arrays = assembly.result()
            components = arrays["weights"], arrays["means"], arrays["covariances"]
    except ModelFormatError:
        raise
    except codec.PayloadError as why:
        raise _payload_error(path, metadata, why) from None
    except Exception as error:  # noqa: BLE001 — reported as one line naming the path
        raise _unreadable(path, error) from None
    return SavedMixture(*_checked(path, components), metadata)


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
