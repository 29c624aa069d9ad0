"""One session-scoped local[2] SparkSession for the whole suite (task retries on: local[2,4])."""

import os
import sys
import tempfile

import numpy as np
import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
# Driver JVMs (this session's, and those of the spark-submit, Connect and job processes the tests
# start) compile with the first tier only: the suite's Spark work is many short jobs, and C2
# compiling them competes for the two cores (8 % of the Spark tests' time, 2 s of a process's start).
os.environ.setdefault("SPARK_SUBMIT_OPTS", "-XX:TieredStopAtLevel=1")


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2,4]")
        .appName("spark-gmm-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "2")
        .config("spark.driver.memory", "2g")
        .config("spark.sql.warehouse.dir", tempfile.mkdtemp(prefix="spark-gmm-warehouse-"))
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    # The executors' Python is checked once per session, in a job of its own; checked here, the
    # tests that count a fit's jobs count the same whatever runs before them.
    from spark_gmm.inputs import require_executor_python

    require_executor_python(session)
    yield session
    session.stop()


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
