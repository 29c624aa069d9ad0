"""Console output: spark_gmm's log lines on the right stderr, and a quiet Spark session.

Library warnings become log lines; Spark's progress bar and its stack traces for harmless missing
paths stay off the console.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from contextlib import contextmanager

log = logging.getLogger("spark_gmm.job")

#: Spark's file-source listing warns with a full FileNotFoundException trace whenever it looks for a
#: directory that does not exist yet (a checkpoint slot, a model directory before its first save).
#: The class moved between Spark 4 releases, hence both names.
_NOISY_LOGGERS = (
    "org.apache.spark.sql.execution.streaming.FileStreamSink",
    "org.apache.spark.sql.execution.streaming.sinks.FileStreamSink",
)


class _JvmStderr(io.TextIOBase):
    """The driver JVM's System.err, as a Python text stream."""

    def __init__(self, jvm):
        self._err = jvm.java.lang.System.err

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._err.print(text)
        return len(text)

    def flush(self) -> None:
        self._err.flush()


def error_stream():
    """Where logs and errors go: the process's real stderr.

    spark-submit runs the job with the Python process's stderr merged into its stdout (Spark's
    PythonRunner redirects it), so there sys.stderr would land on spark-submit's stdout. When
    launched that way (PYSPARK_GATEWAY_PORT is set) write to the JVM's System.err instead, which
    is spark-submit's stderr; otherwise (the console script) to sys.stderr.
    """
    if "PYSPARK_GATEWAY_PORT" in os.environ:
        try:
            from pyspark import SparkContext

            SparkContext._ensure_initialized()  # connects to spark-submit's gateway; no context yet
            return _JvmStderr(SparkContext._jvm)
        except Exception:  # noqa: BLE001 - fall back to the merged stream rather than fail
            pass
    return sys.stderr


@contextmanager
def job_logging(level: str, stream):
    """Show the `spark_gmm` loggers (the library's EM progress and this job's steps) on `stream`
    while the job runs; the logger is as it was afterwards (the job may run inside a notebook)."""
    logger = logging.getLogger("spark_gmm")
    before = logger.level, logger.propagate
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    logger.setLevel(level)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]


def log_warning(message, category, filename, lineno, file=None, line=None):
    """Library warnings (an emptied component, a repaired covariance) as one log line each."""
    log.warning("%s: %s", category.__name__, message)


def job_session(app_name: str):
    """(the active SparkSession or a new one, whether it is new).

    The console script's new session has Spark's console progress bar off: PySpark launches its JVM
    as a shell, for which Spark turns the bar on, and it would interleave with the
    one-line-per-iteration log. (Under spark-submit the bar is off unless the user's --conf or
    properties file turns it on, and that is left alone; so is a Spark Connect server.) In any
    session, the loggers that print stack traces for harmless missing paths are limited to errors,
    and Spark's INFO chatter is turned down where nobody configured Spark's logging.
    """
    from pyspark.sql import SparkSession
    from pyspark.sql.utils import is_remote

    spark = SparkSession.getActiveSession()
    created = spark is None
    if created:
        builder = SparkSession.builder.appName(app_name)
        if "PYSPARK_GATEWAY_PORT" not in os.environ and not is_remote():
            builder = builder.config("spark.ui.showConsoleProgress", "false")
        spark = builder.getOrCreate()
    _quiet_noisy_loggers(spark)
    return spark, created


def _quiet_noisy_loggers(spark) -> None:
    try:
        jvm = spark.sparkContext._jvm
    except Exception:  # noqa: BLE001 - Spark Connect: no JVM here, the server logs
        return
    log4j = jvm.org.apache.logging.log4j
    configurator = log4j.core.config.Configurator
    for name in _NOISY_LOGGERS:
        configurator.setLevel(name, log4j.Level.ERROR)
    if _uses_sparks_default_profile(log4j):
        root = log4j.LogManager.getRootLogger()
        if root.getLevel().isLessSpecificThan(log4j.Level.WARN):  # INFO under spark-submit
            configurator.setRootLevel(log4j.Level.WARN)


def _uses_sparks_default_profile(log4j) -> bool:
    """Whether log4j runs Spark's built-in profile, i.e. nobody configured logging for this job.

    Under spark-submit that profile logs every task at INFO (hundreds of lines for one fit); a job
    then drops Spark to WARN, as Spark's own shells do, once its session is up. A log4j2
    configuration of the user's own (`-Dlog4j2.configurationFile`, `$SPARK_CONF_DIR`) is left alone.
    """
    try:
        source = log4j.LogManager.getContext(False).getConfiguration().getConfigurationSource()
        return str(source.getLocation() or "").endswith("org/apache/spark/log4j2-defaults.properties")
    except Exception:  # noqa: BLE001 - another logging backend: leave it as it is
        return False
