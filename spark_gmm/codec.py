"""Mixtures as exact binary payloads: the one codec of saved models and checkpoints.

A payload is a set of named float64 arrays — a mixture's ``weights`` (k), ``means`` (k×d) and
``covariances`` (k×d×d), a latent class model's tables, or a checkpoint's two models under
prefixes. Each array is cut
into chunks of at most `CHUNK_VALUES` values, one row of `PAYLOAD_SCHEMA` each:

- ``writeId`` (string): the write the row belongs to, matched against the caller's metadata;
- ``name`` (string) and ``shape`` (array<bigint>): which array, and its full shape (on every row, so
  a table describes itself and rows may come back in any order);
- ``offset`` (bigint): the index of the chunk's first value in the flattened (row-major) array;
- ``values`` (binary): the chunk's values as raw little-endian IEEE-754 float64.

Raw float64 bytes round-trip exactly and cost a memory copy, where JSON text or Python lists cost a
float-to-text conversion per value and hit the 2 GB string limit near k·d² ≈ 5e7. Spark writes the
rows as Parquet (uncompressed and without dictionaries: neither helps random doubles, both cost time),
so any file system Spark can write works, under Spark Connect too. One Spark write or read moves at
most `WINDOW_VALUES` values, so no task, Connect message, driver JVM buffer or
`spark.driver.maxResultSize` has to hold a whole large model.
"""

from __future__ import annotations

import gc
import hashlib

import numpy as np
import pyarrow as pa
from pyspark.sql import functions as F
from pyspark.sql.utils import AnalysisException

from .exceptions import InvalidMixtureError

#: Values per row: 1 MiB, one Parquet page.
CHUNK_VALUES = 1 << 17
#: Values per Spark write or read: 32 MiB, so that a task carrying one window stays well under
#: spark.rpc.message.maxSize (128 MiB) and a default 1 GiB driver JVM holds its few copies of it.
WINDOW_VALUES = 1 << 22
#: Parquet row group size: the vectorized reader decodes a whole row group even when a window's
#: filter keeps part of it, so small row groups keep reads within the window too.
ROW_GROUP_BYTES = 8 << 20
#: |C_ij − C_ji| allowed, relative to sqrt(C_ii·C_jj): a thousand times the round-off of a covariance
#: computed in another order (a few 1e-16), far below any deliberate asymmetry.
SYMMETRY_TOLERANCE = 1e-12

PAYLOAD_SCHEMA = pa.schema(
    [
        ("writeId", pa.string()),
        ("name", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("offset", pa.int64()),
        ("values", pa.large_binary()),
    ]
)
_LITTLE_ENDIAN = np.dtype("<f8")


class PayloadError(ValueError):
    """Payload rows that do not make up the arrays expected (missing, foreign or torn)."""


def mixture_arrays(weights, means, covariances) -> dict[str, np.ndarray]:
    return {"weights": weights, "means": means, "covariances": covariances}


def mixture_shapes(k: int, d: int) -> dict[str, tuple[int, ...]]:
    return {"weights": (k,), "means": (k, d), "covariances": (k, d, d)}


def digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the arrays' names, shapes and exact values (hex): equal iff the arrays are."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name], dtype=_LITTLE_ENDIAN)
        h.update(f"{name}{array.shape}".encode())
        h.update(array.data)
    return h.hexdigest()


def binary_views(column) -> list[np.ndarray]:
    """Zero-copy uint8 views of each value of a binary (or large binary) Arrow array."""
    if isinstance(column, pa.ChunkedArray):
        return [v for chunk in column.chunks for v in binary_views(chunk)]
    _, offsets, data = column.buffers()
    kind = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(offsets, dtype=kind)[column.offset : column.offset + len(column) + 1]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
    return [data[offsets[i] : offsets[i + 1]] for i in range(len(column))]


# -- arrays ↔ Arrow tables (no Spark) -------------------------------------------------------------


def _chunk_batch(write_id: str, name: str, flat: np.ndarray, shape, start: int, stop: int) -> pa.RecordBatch:
    """The rows of values [start, stop) of one flattened array: a zero-copy view of its buffer."""
    offsets = np.arange(start, stop, CHUNK_VALUES, dtype=np.int64)
    ends = np.append(offsets, stop)
    values = pa.Array.from_buffers(
        pa.large_binary(), len(offsets),
        [None, pa.py_buffer((ends - start) * 8), pa.py_buffer(flat[start:stop])],
    )
    n = len(offsets)
    return pa.RecordBatch.from_arrays(
        [
            pa.array([write_id] * n, pa.string()),
            pa.array([name] * n, pa.string()),
            pa.array([list(shape)] * n, pa.list_(pa.int64())),
            pa.array(offsets, pa.int64()),
            values,
        ],
        schema=PAYLOAD_SCHEMA,
    )


def to_tables(arrays: dict[str, np.ndarray], write_id: str):
    """Arrow tables of payload rows, each of at most about WINDOW_VALUES values (one per write)."""
    batches, size = [], 0
    for name, array in arrays.items():
        array = np.asarray(array, dtype=np.float64)
        flat = np.ascontiguousarray(array, dtype=_LITTLE_ENDIAN).reshape(-1)
        start = 0
        while True:  # at least once: an empty array still gets its (empty) batch
            stop = min(flat.size, start + WINDOW_VALUES - size)
            batches.append(_chunk_batch(write_id, name, flat, array.shape, start, stop))
            size += stop - start
            if size >= WINDOW_VALUES:
                yield pa.Table.from_batches(batches, PAYLOAD_SCHEMA)
                batches, size = [], 0
            start = stop
            if start >= flat.size:
                break
    if batches:
        yield pa.Table.from_batches(batches, PAYLOAD_SCHEMA)


class Assembly:
    """Arrays rebuilt from payload rows arriving in any order and any number of tables; `result`
    checks that every value of every expected array came exactly once, from one write."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], write_id: str, where: str, owner: str):
        self.shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
        self.flat = {name: np.empty(int(np.prod(shape)), np.float64) for name, shape in self.shapes.items()}
        self.pieces: dict[str, list[tuple[int, int]]] = {name: [] for name in shapes}
        self.write_id, self.where, self.owner = write_id, where, owner

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        missing = {"writeId", "name", "shape", "offset", "values"} - set(table.column_names)
        if missing:
            columns = ", ".join(sorted(missing))
            raise PayloadError(f"{self.where} has no column {columns}: not a spark_gmm payload")
        if set(table.column("writeId").unique().to_pylist()) != {self.write_id}:
            raise PayloadError(
                f"{self.where} was not written by the save that wrote {self.owner} (a save into this "
                "directory was interrupted)"
            )
        names = table.column("name").to_pylist()
        shapes = table.column("shape").to_pylist()
        offsets = table.column("offset").to_numpy()
        for name, shape, offset, raw in zip(names, shapes, offsets, binary_views(table.column("values"))):
            if name not in self.shapes or tuple(shape or ()) != self.shapes[name]:
                raise PayloadError(
                    f"{self.where} holds an array '{name}' of shape {tuple(shape or ())}; expected "
                    + ", ".join(f"'{n}' {s}" for n, s in self.shapes.items())
                )
            flat = self.flat[name]
            if len(raw) % 8 or not 0 <= offset <= flat.size - len(raw) // 8:
                raise PayloadError(f"{self.where}: a chunk of '{name}' lies outside its {flat.size} values")
            flat[offset : offset + len(raw) // 8] = raw.view(_LITTLE_ENDIAN)
            self.pieces[name].append((int(offset), len(raw) // 8))

    def result(self) -> dict[str, np.ndarray]:
        for name, flat in self.flat.items():
            end = 0
            for offset, length in sorted(self.pieces[name]):
                if offset != end:
                    break
                end += length
            if end != flat.size or sum(length for _, length in self.pieces[name]) != flat.size:
                raise PayloadError(
                    f"{self.where}: the values of '{name}' are incomplete or repeated (a write was cut "
                    "short, or files were copied in)"
                )
        return {name: flat.reshape(self.shapes[name]) for name, flat in self.flat.items()}


# -- Spark I/O --------------------------------------------------------------------------------------


def exists(spark, path: str) -> bool:
    """Whether anything is at `path`, through Spark's own file listing (no JVM gateway needed).

    The path is given twice: Spark probes a single path for a streaming-sink log and, when the path
    is missing, logs a long FileNotFoundException trace at WARN; it skips that probe for two paths.
    """
    try:
        spark.read.format("binaryFile").load([path, path]).schema
    except AnalysisException as error:
        if "PATH_NOT_FOUND" in str(error) or "does not exist" in str(error).lower():
            return False
        raise
    return True


def write(spark, path: str, arrays: dict[str, np.ndarray], write_id: str, overwrite: bool) -> None:
    """Write `arrays` as payload rows under `path`: the first window replaces (or, without
    `overwrite`, refuses) what is there, the others append."""
    mode = "overwrite" if overwrite else "error"  # "errorifexists" is not accepted by Spark Connect
    for table in to_tables(arrays, write_id):
        (
            spark.createDataFrame(table)
            .coalesce(1)
            .write.mode(mode)
            .option("compression", "uncompressed")
            .option("parquet.enable.dictionary", "false")
            .option("parquet.block.size", str(ROW_GROUP_BYTES))
            .parquet(path)
        )
        mode = "append"
        # The window's DataFrame sits in a Python reference cycle that keeps its rows alive in the
        # JVM until Python collects it; without this, a large model's windows pile up there.
        gc.collect()


def read(spark, path: str, shapes: dict[str, tuple[int, ...]], write_id: str, owner: str):
    """The arrays of `shapes` written under `path` by write `write_id`, one window per Spark read."""
    assembly = Assembly(shapes, write_id, path, owner)
    frame = spark.read.parquet(path)
    sizes = {name: int(np.prod(shape)) for name, shape in shapes.items()}
    if sum(sizes.values()) <= WINDOW_VALUES:
        assembly.add(frame.toArrow())
    else:
        for name, size in sizes.items():
            for start in range(0, max(size, 1), WINDOW_VALUES):
                assembly.add(
                    frame.where(
                        (F.col("name") == name)
                        & (F.col("offset") >= start)
                        & (F.col("offset") < start + WINDOW_VALUES)
                    ).toArrow()
                )
                gc.collect()  # as in `write`
    return assembly.result()


# -- validation -----------------------------------------------------------------------------------


def _symmetric_part(cov: np.ndarray, j: int) -> np.ndarray | None:
    """None if `cov` is exactly symmetric; its symmetric part if asymmetric within SYMMETRY_TOLERANCE."""
    d = len(cov)
    scale = np.sqrt(np.abs(np.diagonal(cov)))
    symmetric = True
    for start in range(0, d, 256):  # in row blocks: no d×d temporary for a large d
        rows = slice(start, min(start + 256, d))
        gap = np.abs(cov[rows] - cov[:, rows].T)
        if not gap.any():
            continue
        symmetric = False
        excess = gap - SYMMETRY_TOLERANCE * scale[rows, None] * scale[None, :]
        if (excess > 0).any():
            r, c = np.unravel_index(np.argmax(excess), excess.shape)
            r += start
            raise InvalidMixtureError(
                f"component {j}: covariance is not symmetric (entry ({r}, {c}) is {float(cov[r, c])!r}, "
                f"entry ({c}, {r}) is {float(cov[c, r])!r}; allowed: a relative difference of "
                f"{SYMMETRY_TOLERANCE:g})"
            )
    # c + (cᵀ − c)/2 leaves exactly symmetric entries untouched and gives both halves one value.
    return None if symmetric else cov + (cov.T - cov) / 2


def checked_mixture(weights, means, covariances):
    """(weights, means, covariances) as float64 arrays, refusing what is not a Gaussian mixture:
    non-finite values, negative weights or a zero sum, covariances that are not symmetric (beyond
    SYMMETRY_TOLERANCE) or not positive definite (Cholesky fails). Nearly symmetric covariances
    come back as their symmetric part, so the matrix used is the one returned."""
    weights = np.asarray(weights, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    covariances = np.asarray(covariances, dtype=np.float64)
    k, d = means.shape
    if weights.shape != (k,) or covariances.shape != (k, d, d):
        raise InvalidMixtureError(
            f"{k} means of {d} features need {k} weights and {k} covariances of {d}×{d}; got "
            f"weights {weights.shape}, covariances {covariances.shape}"
        )
    for label, values in (("weight", weights), ("mean", means), ("covariance", covariances)):
        bad = ~np.isfinite(values.reshape(k, -1)).all(axis=1)
        if bad.any():
            raise InvalidMixtureError(f"component {int(np.argmax(bad))}: its {label} is not finite")
    if (weights < 0).any() or not weights.sum() > 0:
        raise InvalidMixtureError(
            f"mixture weights must be non-negative with a positive sum (component "
            f"{int(np.argmin(weights))} has {float(weights.min())!r})"
        )
    repaired = {j: part for j, cov in enumerate(covariances) if (part := _symmetric_part(cov, j)) is not None}
    if repaired:
        covariances = covariances.copy()
        for j, part in repaired.items():
            covariances[j] = part
    for j, cov in enumerate(covariances):
        try:
            np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            smallest = np.linalg.eigvalsh(cov)[0]
            raise InvalidMixtureError(
                f"component {j}: covariance is not positive definite (smallest eigenvalue "
                f"{smallest:.3g})"
            ) from None
    return weights, means, covariances
