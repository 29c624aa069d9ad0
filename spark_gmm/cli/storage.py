"""File-system I/O: reading the input, checking the outputs before any work, staged writes.

A failed job leaves the old output or the new one, never half of one. Paths go through Hadoop's
FileSystem on the driver JVM (the file system Spark itself would use); under Spark Connect there is
none, and local paths are checked with `os`.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import uuid

from .arguments import TABLE_NAME, URI_SCHEME, output_kind
from .errors import JobError, short_message

log = logging.getLogger("spark_gmm.job")

_GLOB = re.compile(r"[*?\[{]")


def hadoop_filesystem(spark):
    """A function path → (Hadoop FileSystem, Hadoop Path), or None under Spark Connect."""
    try:
        jvm, conf = spark.sparkContext._jvm, spark.sparkContext._jsc.hadoopConfiguration()
    except Exception:  # noqa: BLE001 - Spark Connect: no JVM
        return None

    def filesystem(path):
        hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
        return hadoop_path.getFileSystem(conf), hadoop_path

    return filesystem


def path_exists(spark, path: str) -> bool | None:
    """Whether `path` (or, for a glob, any match) exists, on the file system Spark would use.
    None: cannot tell (a scheme without a Hadoop file system here)."""
    return None if (found := _matches(spark, path)) is None else bool(found)


def _matches(spark, path: str) -> list[str] | None:
    """The qualified locations `path` names (a glob's matches), or None if this cannot be told."""
    filesystem = hadoop_filesystem(spark)
    if filesystem is not None:
        try:
            fs, hadoop_path = filesystem(path)
            if _GLOB.search(path):
                return [status.getPath().toString() for status in fs.globStatus(hadoop_path) or []]
            return [fs.makeQualified(hadoop_path).toString()] if fs.exists(hadoop_path) else []
        except Exception:  # noqa: BLE001 - a file system we cannot reach from the driver
            pass
    if URI_SCHEME.match(path) and not path.startswith("file:"):
        return None
    local = re.sub(r"^file:(//)?", "", path)
    found = glob.glob(local) if _GLOB.search(local) else [local] if os.path.exists(local) else []
    return [_qualified(spark, p) for p in found]


def _qualified(spark, path: str) -> str:
    """`path` as a full URI without a trailing '/', so two spellings of a location compare equal."""
    filesystem = hadoop_filesystem(spark)
    if filesystem is not None:
        try:
            fs, hadoop_path = filesystem(path)
            return fs.makeQualified(hadoop_path).toString().rstrip("/")
        except Exception:  # noqa: BLE001 - unreachable file system: compare the spelling
            pass
    if URI_SCHEME.match(path) and not path.startswith("file:"):
        return path.rstrip("/")
    return "file:" + os.path.abspath(re.sub(r"^file:(//)?", "", path))


def read_input(spark, source: str, fmt: str):
    """(DataFrame, 'path' or 'table'): a path that exists is read as `fmt`, else a table name."""
    from pyspark.errors import AnalysisException

    exists = path_exists(spark, source)
    if exists is False and TABLE_NAME.match(source):
        try:
            return spark.table(source), "table"
        except AnalysisException:
            raise JobError(f"input '{source}' is neither an existing path nor a table") from None
    if exists is False:
        raise JobError(f"input path '{source}' does not exist")
    try:
        return spark.read.format(fmt).load(source), "path"
    except Exception as error:  # AnalysisException, or a reader failing on the files
        raise JobError(f"cannot read input '{source}' as {fmt}: {short_message(error)}") from None


def check_outputs(spark, args) -> None:
    """Refuse, before the input is read, outputs that exist (unless --mode allows it), a report
    that cannot be written, and outputs that overlap the inputs or each other."""
    mode = args.mode
    model_out = getattr(args, "model_out", None)
    if model_out and mode != "overwrite" and path_exists(spark, model_out):
        raise JobError(f"model directory '{model_out}' already exists; use --mode overwrite to replace it")
    target = getattr(args, "predictions_out", None)
    if target and mode == "errorifexists" and _output_exists(spark, target):
        raise JobError(f"predictions output '{target}' already exists; use --mode overwrite or --mode append")
    leftover = target and _orphaned_table_location(spark, target)
    if leftover:
        raise JobError(f"table '{target}' does not exist but its location '{leftover}' does (left by a dropped "
                       "table or a killed job), and Spark will not create the table over it; remove it")
    report = getattr(args, "report", None)  # score writes none
    if report:
        _check_report_file(report, mode)
    _check_overlaps(spark, args)


def _output_exists(spark, target: str) -> bool:
    if output_kind(target) == "table":
        return spark.catalog.tableExists(target)
    return bool(path_exists(spark, target))


def _orphaned_table_location(spark, target: str) -> str | None:
    """The default location of managed table `target` in the session catalog when the table does not
    exist but that directory does, which saveAsTable refuses (in any mode)."""
    if output_kind(target) != "table" or spark.catalog.tableExists(target):
        return None
    catalog, database, table = _table_parts(spark, target)
    if catalog != "spark_catalog":
        return None
    try:
        location = f"{spark.catalog.getDatabase(database).locationUri.rstrip('/')}/{table}"
    except Exception:  # noqa: BLE001 - no such database: saveAsTable will say so
        return None
    return location if path_exists(spark, location) else None


def _check_report_file(path: str, mode: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise JobError(f"report '{path}' is a directory")
    if os.path.exists(path) and mode != "overwrite":
        raise JobError(f"report '{path}' already exists; use --mode overwrite to replace it")
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise JobError(f"cannot write the report to '{path}': no writable directory '{directory}'")


def _check_overlaps(spark, args) -> None:
    """No output may be, contain or lie inside an input (a later --mode overwrite would delete what
    the job reads) or another output."""
    reads = [("--input", args.input)] + ([("--model", args.model)] if getattr(args, "model", None) else [])
    writes = [(f"--{name.replace('_', '-')}", getattr(args, name, None))
              for name in ("model_out", "predictions_out", "report", "checkpoint_dir")]
    writes = [(flag, value) for flag, value in writes if value]
    located = {}

    def locations(flag, value):
        if (flag, value) not in located:
            if flag == "--report":  # a local file written by Python
                located[flag, value] = [("path", "file:" + os.path.abspath(value))]
            elif flag == "--predictions-out" and output_kind(value) == "table":
                located[flag, value] = [("table", ".".join(_table_parts(spark, value)))]
            elif flag == "--input" and path_exists(spark, value) is False:
                located[flag, value] = [("table", ".".join(_table_parts(spark, value)))] if TABLE_NAME.match(value) else []
            else:
                located[flag, value] = [("path", p) for p in (_matches(spark, value) if _GLOB.search(value)
                                                            else [_qualified(spark, value)]) or []]
        return located[flag, value]

    pairs = [(w, r) for w in writes for r in reads] + [
        (a, b) for i, a in enumerate(writes) for b in writes[i + 1:]
    ]
    for (out_flag, out), (other_flag, other) in pairs:
        for out_kind, out_at in locations(out_flag, out):
            for other_kind, other_at in locations(other_flag, other):
                if out_kind != other_kind:
                    continue
                if out_at == other_at:
                    raise JobError(f"{out_flag} '{out}' and {other_flag} '{other}' are the same location "
                                   f"({out_at}); the job would overwrite what it uses")
                if out_kind == "path" and (out_at.startswith(other_at + "/") or other_at.startswith(out_at + "/")):
                    raise JobError(f"{out_flag} '{out}' and {other_flag} '{other}' overlap (one lies inside "
                                   "the other); choose separate locations")


def _table_parts(spark, name: str) -> list[str]:
    """[catalog, database, table], lower-cased (Spark's default catalog is case-insensitive)."""
    parts = [quoted or plain for quoted, plain in re.findall(r"`([^`]+)`|([^.`]+)", name)]
    if len(parts) < 3:
        parts = [spark.catalog.currentCatalog(), spark.catalog.currentDatabase()][: 3 - len(parts)] + parts
    return [part.lower() for part in parts]


def write_predictions(spark, predictions, args) -> None:
    """Write to a table (saveAsTable) or a path. A path is written to a hidden sibling and renamed
    into place when complete, so a failed or killed job leaves no half-written directory under that
    name; the sibling is removed when the job fails."""
    target, mode = args.predictions_out, "error" if args.mode == "errorifexists" else args.mode
    writer = predictions.write.format(args.output_format)
    if args.partition_by:
        writer = writer.partitionBy(*args.partition_by)
    if output_kind(target) == "table":
        writer.mode(mode).saveAsTable(target)
        return
    filesystem = hadoop_filesystem(spark)
    if filesystem is None or args.mode == "append":
        writer.mode(mode).save(target)  # Spark's commit protocol only
        return
    fs, final = filesystem(target)
    final = fs.makeQualified(final)
    staging = _sibling(final, "")
    try:
        writer.mode("error").save(staging.toString())
        _move_into_place(fs, staging, final, target, args.mode == "overwrite")
    finally:
        if fs.exists(staging) and not fs.delete(staging, True):
            log.warning("could not delete the staging directory %s", staging.toString())


def _sibling(path, kind: str):
    """A hidden sibling of `path` (Spark's readers skip names starting with '.')."""
    return path.getParent().suffix(f"/.{path.getName()}.spark-gmm-{kind}{uuid.uuid4().hex[:12]}")


def rename(fs, source, target) -> bool:
    """Hadoop's rename, which reports most failures by returning false rather than raising."""
    return bool(fs.rename(source, target))


def _move_into_place(fs, staging, final, target: str, replace: bool) -> None:
    if not fs.exists(final):
        if not rename(fs, staging, final):
            raise JobError(f"cannot move the new predictions into '{target}'")
        return
    if not replace:
        raise JobError(f"predictions output '{target}' appeared while the job ran")
    old = _sibling(final, "old-")
    if not rename(fs, final, old):
        raise JobError(f"cannot move the old predictions '{target}' aside")
    if not rename(fs, staging, final):
        if not rename(fs, old, final):
            raise JobError(f"cannot move the new predictions into '{target}', nor the old ones back: "
                           f"they are in '{old.toString()}'")
        raise JobError(f"cannot move the new predictions into '{target}'; the old ones are back in place")
    if not fs.delete(old, True):
        log.warning("could not delete the replaced predictions at %s", old.toString())


def write_local_file(path: str, text: str) -> None:
    """Write `text` to the local file `path` through a hidden sibling renamed over it: readers see
    the old file or the whole new one."""
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.spark-gmm-{uuid.uuid4().hex[:12]}")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
