"""Resolving and validating the input: feature and weight columns, and whether the driver can hold a
fit of this size. Errors name the problem (column, count, value) in their first line."""

from __future__ import annotations

import json
import os
import re
import resource
import threading
import weakref
from contextlib import contextmanager

from pyspark.sql import Column, DataFrame, functions as F
from pyspark.sql.types import ArrayType, DataType, MapType, NumericType, StructType, UserDefinedType

from .exceptions import (
    EXECUTOR_MODULES,
    ExecutorEnvironmentError,
    InvalidInputError,
    executor_environment_error,
    executor_module_error,
    warn,
)
from .options import OPTIONS


def named_column(name: str) -> Column:
    """The column called `name`, whatever characters it holds (backticks are doubled in quoting)."""
    return F.col("`" + name.replace("`", "``") + "`")


def _field(df: DataFrame, name: str, role: str):
    fields = {f.name: f for f in df.schema.fields}
    if name not in fields:
        raise InvalidInputError(
            f"{role} column '{name}' not found; available columns: {', '.join(fields) or '(none)'}"
        )
    return fields[name]


def require_batch(df: DataFrame, action: str) -> None:
    """Refuse a streaming DataFrame where `action` must read the whole input: Spark's own error
    names neither the input nor the way out."""
    if df.isStreaming:
        raise InvalidInputError(
            f"{action} reads the whole input: it needs a batch DataFrame, not a streaming one "
            "(spark.readStream); pass a batch read of the same source (spark.read). A model's "
            "transform does take streams."
        )


def feature_array(df: DataFrame, features_col: str, input_cols: list[str] | None) -> Column:
    """The features as one `array<double>` column, from a vector, a numeric array or numeric columns."""
    # Here rather than at the top: executors' Python workers import this module, and pyspark.ml
    # (half a second) only here, on the driver.
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT

    if input_cols:
        for name in input_cols:
            field = _field(df, name, "input")
            if not isinstance(field.dataType, NumericType):
                raise InvalidInputError(
                    f"input column '{name}' has type {field.dataType.simpleString()}; "
                    "inputCols must be numeric columns"
                )
        return F.array(*[named_column(name).cast("double") for name in input_cols])
    field = _field(df, features_col, "features")
    kind = field.dataType
    if isinstance(kind, VectorUDT):
        column = named_column(features_col)
        return F.when(column.isNotNull(), vector_to_array(column, "float64"))
    if isinstance(kind, ArrayType) and isinstance(kind.elementType, NumericType):
        return named_column(features_col).cast("array<double>")
    raise InvalidInputError(
        f"features column '{features_col}' has type {kind.simpleString()}; expected a vector, "
        "an array of numbers, or set inputCols to numeric columns"
    )


def feature_names(df: DataFrame, features_col: str, input_cols: list[str] | None) -> list[str] | None:
    """Names of the features: the inputCols, or a vector column's ML attributes (as VectorAssembler
    writes them); None when the input does not name them all."""
    if input_cols:
        return list(input_cols)
    attributes = df.schema[features_col].metadata.get("ml_attr", {})
    by_index = {a["idx"]: a.get("name") for group in attributes.get("attrs", {}).values() for a in group}
    count = attributes.get("num_attrs", len(by_index))
    names = [by_index.get(i) for i in range(count)]
    return names if names and all(names) else None


def feature_count(df: DataFrame, features_col: str, input_cols: list[str] | None) -> int | None:
    """How many features the schema says a row has (inputCols, or a vector column's ML attributes);
    None when only the data can tell."""
    if input_cols:
        return len(input_cols)
    if features_col not in df.columns:
        return None
    count = df.schema[features_col].metadata.get("ml_attr", {}).get("num_attrs")
    return int(count) if count is not None else None


#: Spark ≥ 4.3 hands the columnar batches of a scan straight to a Python UDF when this is on; that
#: path fails on any column of a user-defined type ([UNSUPPORTED_DATATYPE] ... UDT), e.g. a vector.
COLUMNAR_UDF_INPUT = "spark.sql.execution.arrow.pythonUDF.columnarInput.enabled"


def rows_for_python_udfs(df: DataFrame) -> DataFrame:
    """`df`, read row by row before a Python UDF when Spark would otherwise hand it columnar batches
    holding a user-defined type (a vector read from Parquet, say), which fails. An always-true
    filter that Spark cannot drop (it reads the partition id) puts a row operator in between. It
    also stops later filters from being pushed below it, so only such inputs get it."""
    if not any(_has_udt(field.dataType) for field in df.schema.fields):
        return df
    try:  # not get(key, default): that returns the default given, not Spark's, when the key is unset
        columnar = df.sparkSession.conf.get(COLUMNAR_UDF_INPUT)
    except Exception:  # Spark before 4.3 does not know the key
        return df
    return df.where(F.spark_partition_id() >= 0) if str(columnar).lower() == "true" else df


def adds_no_column(names: dict[str, str]) -> bool:
    """True, with a warning, when every output column's name (`names`: Param name → column name)
    is empty: a transform then returns its input, as MLlib's does."""
    if any(names.values()):
        return False
    warn(f"transform adds no column: {', '.join(names)} are all empty", UserWarning)
    return True


def transform_output(dataset: DataFrame, scored: DataFrame, names: dict[str, str], values: dict, refuse=None):
    """`scored` reduced to `dataset`'s columns plus `values[p]` named `names[p]` for each Param `p`
    whose name is not empty (MLlib leaves such a column out). `refuse` (Column → Column) wraps the
    first column added, so that the rows it refuses fail the query whichever columns are asked."""
    out = [named_column(c) for c in dataset.columns]
    for param, name in names.items():
        if name:
            value = values[param]
            if refuse is not None:
                value, refuse = refuse(value), None
            out.append(value.alias(name))
    return scored.select(*out)


def probability_output(probability: Column, probability_format: str) -> Column:
    """transform's probability column from the scores' array<double>: a vector (MLlib's type), or
    with probabilityFormat='array' the array itself, which skips Spark's conversion of each row."""
    OPTIONS["probabilityFormat"].check("probabilityFormat", probability_format)
    if probability_format == "array":
        return probability
    from pyspark.ml.functions import array_to_vector

    return F.when(probability.isNotNull(), array_to_vector(probability))


#: Rows of one Arrow batch handed to a Python UDF (Spark's default: 10,000).
ARROW_BATCH_ROWS = "spark.sql.execution.arrow.maxRecordsPerBatch"


#: Sessions inside `arrow_batches_of`: id → [fits inside, the setting before the first].
_BATCH_LIMITS: dict[int, list] = {}
_BATCH_LOCK = threading.Lock()


@contextmanager
def arrow_batches_of(spark, rows: int):
    """Spark's Arrow batches hold at most `rows` rows inside the block (a smaller limit set by the
    user stays); the session's setting is restored when the last fit inside leaves, also on error.
    For passes over cached blocks of ~0.5 MB a row, where the default made a partition one batch:
    the JVM then wrote all of it before Python could start."""
    with _BATCH_LOCK:
        entry = _BATCH_LIMITS.get(id(spark))
        if entry is None:
            previous = spark.conf.get(ARROW_BATCH_ROWS, None)  # None: not set in this session
            limit = min(rows, int(previous)) if previous is not None and int(previous) > 0 else rows
            spark.conf.set(ARROW_BATCH_ROWS, str(limit))
            entry = _BATCH_LIMITS[id(spark)] = [0, previous]
        entry[0] += 1
    try:
        yield
    finally:
        with _BATCH_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _BATCH_LIMITS[id(spark)]
                if entry[1] is None:
                    spark.conf.unset(ARROW_BATCH_ROWS)
                else:
                    spark.conf.set(ARROW_BATCH_ROWS, entry[1])


def _has_udt(kind: DataType) -> bool:
    if isinstance(kind, UserDefinedType):
        return True
    if isinstance(kind, StructType):
        return any(_has_udt(f.dataType) for f in kind.fields)
    if isinstance(kind, ArrayType):
        return _has_udt(kind.elementType)
    if isinstance(kind, MapType):
        return _has_udt(kind.keyType) or _has_udt(kind.valueType)
    return False


def weight_column(df: DataFrame, weight_col: str | None) -> Column | None:
    if not weight_col:
        return None
    field = _field(df, weight_col, "weight")
    if not isinstance(field.dataType, NumericType):
        raise InvalidInputError(
            f"weight column '{weight_col}' has type {field.dataType.simpleString()}; it must be numeric"
        )
    return named_column(weight_col).cast("double")


#: float64 k×d×d arrays the driver holds at once: statistics, covariances, Cholesky factors and their
#: temporaries, for the current and the previous parameters.
DRIVER_COPIES = 10
#: Share of the available memory a fit may plan to use.
MEMORY_SHARE = 0.8


def available_memory_bytes() -> int:
    """Memory this process can still use: free RAM, within the cgroup limit and the address-space rlimit."""
    limits = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    try:
        with open("/proc/meminfo") as meminfo:
            found = re.search(r"MemAvailable:\s+(\d+) kB", meminfo.read())
        if found:
            limits.append(int(found.group(1)) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            ceiling = limit.read().strip()
            if ceiling != "max":
                limits.append(int(ceiling) - int(used.read().strip()))
    except (OSError, ValueError):
        pass
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    if address_space != resource.RLIM_INFINITY:
        limits.append(address_space)
    return max(0, min(limits))


def jvm_bytes(text: str) -> int:
    """A JVM size such as '1g', '512m' or '0' in bytes (0: no limit)."""
    found = re.fullmatch(r"\s*(\d+)\s*([kmgtp]?)b?\s*", str(text).lower())
    if not found:
        raise ValueError(f"not a size: {text!r}")
    return int(found.group(1)) << (10 * " kmgtp".index(found.group(2) or " "))


def _gib(byte_count: float) -> str:
    return f"{byte_count / 2**30:.3g} GiB"


def driver_memory_need(k: int, d: int, partial_bytes: int, partials: int) -> int:
    """Bytes the driver needs for the covariances (k·d² doubles, a few copies) and the collected statistics."""
    return 8 * k * d * d * DRIVER_COPIES + 2 * partials * partial_bytes


def check_driver_memory(k: int, d: int, partial_bytes: int, partials: int, max_result_bytes: int,
                        have: int | None = None) -> None:
    """Refuse a fit whose covariance storage (k·d² doubles) or collected statistics the driver cannot
    hold in `have` bytes (by default, the memory available now)."""
    need = driver_memory_need(k, d, partial_bytes, partials)
    have = available_memory_bytes() if have is None else have
    if need > MEMORY_SHARE * have:
        raise InvalidInputError(
            f"k={k} components × d={d} features need about {_gib(need)} of driver memory for "
            f"covariances and their statistics (k·d² = {k * d * d:.3g} doubles); this driver has "
            f"{_gib(have)} available. Reduce the number of features (e.g. with PCA) or of components"
        )
    collected = partials * partial_bytes
    if max_result_bytes and collected > max_result_bytes:
        raise InvalidInputError(
            f"each EM pass would collect {_gib(collected)} of statistics ({partials} partials of "
            f"{_gib(partial_bytes)}, k={k}, d={d}) but spark.driver.maxResultSize is "
            f"{_gib(max_result_bytes)}; raise aggregationDepth, coalesce the input, or raise "
            "spark.driver.maxResultSize"
        )


#: float64 k×d×d arrays an executor task holds at once: the mixture's covariances and precision
#: factors, the pass's statistics and their temporaries.
TASK_COPIES = 4


def check_executor_memory(k: int, d: int, spark) -> None:
    """Refuse a fit whose per-task arrays (k·d² doubles, a few copies) exceed an executor task's
    Python memory, as far as this session can tell (classic sessions only)."""
    from .engine_choice import python_memory_per_task, task_slots

    try:
        context = spark.sparkContext
    except Exception:  # Spark Connect: the executors' settings are not visible here
        return
    need = 8 * k * d * d * TASK_COPIES
    have, source = python_memory_per_task(context.getConf(), context.master, task_slots(spark))
    if need > MEMORY_SHARE * have:
        raise InvalidInputError(
            f"k={k} components × d={d} features need about {_gib(need)} in each executor task "
            f"(k·d² = {k * d * d:.3g} doubles, {TASK_COPIES} copies); the executors' Python has "
            f"{_gib(have)} ({source}). Reduce the number of features or components, or raise "
            "spark.executor.pyspark.memory"
        )


def executor_errors_explained(action):
    """Run a Spark action; if it fails for the executors' Python (a missing module, a Python that
    does not start or is another version), say so in one line instead of a worker traceback."""
    try:
        return action()
    except Exception as error:
        if (explained := executor_environment_error(error)) is None:
            raise
        raise explained from None


#: Sessions whose executors' Python was found to import spark_gmm and what its tasks need.
_PYTHON_CHECKED: weakref.WeakSet = weakref.WeakSet()


def require_executor_python(spark) -> None:
    """Refuse, in one line and before any pass, executors whose Python lacks a module spark_gmm's
    tasks import or has another spark_gmm version. A plain Python UDF, which needs none of those
    modules, looks each up in one task per slot: a pass would fail inside its Arrow worker instead,
    and Spark would log a JVM and a Python traceback per task. Once per session."""
    if spark in _PYTHON_CHECKED:
        return
    from . import __version__
    from .engine_choice import pass_tasks

    tasks = pass_tasks(spark) or 1  # a task per slot; one under Spark Connect or dynamic allocation
    probe = F.udf(_import_probe(EXECUTOR_MODULES), "string", useArrow=False)
    found = executor_errors_explained(
        lambda: spark.range(0, tasks, numPartitions=tasks).select(probe("id")).collect()
    )
    reports = {tuple(json.loads(row[0])) for row in found}  # executors may differ: each is checked
    for interpreter, missing, version in sorted(reports, key=lambda report: [str(part) for part in report]):
        if missing is not None:
            raise executor_module_error(missing, f"the executors' Python ({interpreter})")
        if version != __version__:
            raise ExecutorEnvironmentError(
                f"the executors' Python ({interpreter}) has spark_gmm {version}, this driver {__version__}: "
                "install the same version on both, or ship the driver's with --py-files"
            )
    _PYTHON_CHECKED.add(spark)


def _import_probe(modules: tuple[str, ...]):
    """The probe UDF's function: a closure, so that cloudpickle sends it by value and the worker
    unpickles it without importing spark_gmm. It looks the modules up without importing them
    (pandas and pyarrow take a second to import in a task that does not use them)."""
    def probe(_) -> str:
        import importlib.util
        import json
        import sys

        missing = next((name for name in modules if importlib.util.find_spec(name) is None), None)
        if missing is not None:
            return json.dumps([sys.executable, missing, None])
        import spark_gmm  # light: its modules load on first use

        return json.dumps([sys.executable, None, getattr(spark_gmm, "__version__", "without a version")])

    return probe

