"""Resident tasks that pack their own input partition (no shuffle, no more partitions than task
slots): the fit reads its input once and gives the driver engine's model bit for bit; a rerun
after a lost task reads the input again and must find the same rows; a partition too large for
its task, or input that cannot be fitted, ends the stage and takes the cached-blocks path or the
plain error."""

import logging

import numpy as np
import pytest
from pyspark.sql import functions as F

from spark_gmm import GaussianMixture, engine_choice
from spark_gmm.exceptions import InvalidInputError
from support import array_frame, assert_identical
from test_engines import HANDED_OVER, SHORT_OF_SLOTS, killing_at_iteration, losing_a_slot_with_the_kill

PACKING = "engine: resident (a barrier stage of 2 task(s) packing their own partition"


@pytest.fixture(scope="module")
def unshuffled(spark):
    """Three blobs far from the origin, with weights, in the session's 2 partitions: no shuffle."""
    rng = np.random.default_rng(21)
    centers = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 0.0], [0.0, 7.0, 4.0]])
    x = np.vstack([rng.normal(c, [1.0, 0.5, 2.0], size=(700, 3)) for c in centers]) + 1e5
    df = array_frame(spark, x, partitions=None, w=rng.uniform(0.5, 2.0, len(x)).tolist())
    assert df.rdd.getNumPartitions() == 2
    return df


@pytest.fixture
def log_lines(caplog):
    caplog.set_level(logging.INFO, logger="spark_gmm")
    return lambda prefix: [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


@pytest.mark.parametrize("dtype, weighted", [("float64", False), ("float32", True)])
def test_packing_tasks_give_the_driver_engines_model(unshuffled, log_lines, dtype, weighted):
    settings = dict(k=3, seed=2, maxIter=5, tol=0.0, dtype=dtype, weightCol="w" if weighted else None)
    resident = GaussianMixture(**settings).fit(unshuffled)
    assert log_lines("engine: ")[-1].startswith(PACKING)
    assert log_lines("resident engine: its tasks cannot pack") == []
    assert_identical(resident, GaussianMixture(engine="driver", **settings).fit(unshuffled))


def test_packing_tasks_missing_a_module_stop_the_fit_at_once(unshuffled, log_lines, monkeypatch):
    """An executor Python without pyarrow fails every stage alike: the packing stage's failure is
    explained in one line, without a second stage over cached blocks (which here would succeed)."""
    from spark_gmm import ExecutorEnvironmentError, barrier

    def without_pyarrow(*args):
        def task(batches):
            raise ModuleNotFoundError("No module named 'pyarrow'")

        return task

    monkeypatch.setattr(barrier, "make_packing_task", without_pyarrow)
    with pytest.raises(ExecutorEnvironmentError, match=r"^the executors' Python cannot import 'pyarrow'"):
        GaussianMixture(k=3, seed=2, maxIter=2).fit(unshuffled)
    assert log_lines("engine: ")[-1].startswith(PACKING)
    assert log_lines("resident engine: its tasks cannot pack") == []


def test_a_packing_task_killed_mid_fit_reads_its_partition_again(spark, unshuffled, caplog):
    est = GaussianMixture(k=3, seed=6, maxIter=8, tol=0.0)
    calm = est.fit(unshuffled)
    with killing_at_iteration(spark, caplog, 3) as killer:
        disturbed = est.fit(unshuffled)
    assert killer.killed, "no resident task was found to kill"
    assert "packing their own partition" in caplog.text
    assert "running the barrier stage again (failure 1 of at most 2 in a row)" in caplog.text
    assert "runs on the driver engine" not in caplog.text
    assert_identical(disturbed, calm)


def test_a_packing_task_lost_with_its_slot_leaves_the_fit_to_the_driver_engine(spark, unshuffled, caplog,
                                                                               monkeypatch):
    """The packing tasks held the input: the driver engine packs it into cached blocks and ends
    the fit with the same model."""
    est = GaussianMixture(k=3, seed=6, maxIter=8, tol=0.0)
    calm = est.fit(unshuffled)
    with killing_at_iteration(spark, caplog, 3) as killer:
        losing_a_slot_with_the_kill(monkeypatch, killer)
        disturbed = est.fit(unshuffled)
    assert killer.killed, "no resident task was found to kill"
    assert SHORT_OF_SLOTS in caplog.text and HANDED_OVER in caplog.text
    assert_identical(disturbed, calm)


def test_input_that_changes_between_reads_is_refused(spark, caplog):
    # A Python UDF drawing fresh numbers on every read: the rerun after the kill sees other rows.
    noise = F.udf(lambda i: [float(v) for v in np.random.default_rng().normal(size=2) + 6 * (i % 2)],
                  "array<double>").asNondeterministic()
    df = spark.range(0, 2000, numPartitions=2).select(noise("id").alias("features"))
    with killing_at_iteration(spark, caplog, 2) as killer:
        with pytest.raises(InvalidInputError, match="^the input changed between two reads in one fit"):
            GaussianMixture(k=2, seed=1, maxIter=6, tol=0.0).fit(df)
    assert killer.killed and "packing their own partition" in caplog.text


def test_a_partition_too_large_for_its_task_is_packed_into_cached_blocks(unshuffled, monkeypatch, log_lines):
    monkeypatch.setattr(engine_choice, "python_memory_per_task", lambda conf, master, slots: (10_000, "a test budget"))
    auto = GaussianMixture(k=3, seed=4, maxIter=3).fit(unshuffled)
    (cannot,) = log_lines("resident engine: its tasks cannot pack the input")
    assert "bytes in its task, above the 10000 its Python worker may use" in cannot
    assert log_lines("engine: ")[-1].startswith("engine: driver (")
    assert_identical(auto, GaussianMixture(k=3, seed=4, maxIter=3, engine="driver").fit(unshuffled))


def test_input_refused_after_packing_ends_the_stage(spark, unshuffled, log_lines):
    bad = unshuffled.withColumn("features", F.when(F.col("w") > 1.9, F.array(F.lit(float("nan")), F.lit(0.0),
                                                                             F.lit(0.0))).otherwise(F.col("features")))
    count = bad.where(F.col("w") > 1.9).count()
    with pytest.raises(InvalidInputError, match=f"^{count} rows with NaN or infinite features in 'features'"):
        GaussianMixture(k=3).fit(bad)
    assert log_lines("engine: ")[-1].startswith(PACKING)
    # The refused fit's stage has ended: the next one gets both task slots and packs again.
    skipped = GaussianMixture(k=3, seed=1, maxIter=4, handleInvalid="skip").fit(bad)
    assert log_lines("engine: ")[-1].startswith(PACKING)
    assert skipped.summary.invalidRowsSkipped == count > 0
    driver = GaussianMixture(k=3, seed=1, maxIter=4, handleInvalid="skip", engine="driver").fit(bad)
    assert_identical(skipped, driver)


def test_a_coalesced_input_runs_resident_without_sparks_refusal(unshuffled, log_lines):
    # Spark refuses a barrier stage over a coalesce, even through the cache: the blocks are shuffled.
    df = unshuffled.coalesce(1)
    resident = GaussianMixture(k=3, seed=7, maxIter=3).fit(df)
    assert log_lines("engine: ")[-1].startswith("engine: resident (a barrier stage of 1 task(s) over 1 partition(s)")
    assert log_lines("resident engine unavailable") == [] and log_lines("resident engine: its tasks") == []
    assert_identical(resident, GaussianMixture(k=3, seed=7, maxIter=3, engine="driver").fit(df))


def test_rows_with_missing_values_are_packed_and_marginalised_alike(unshuffled, log_lines):
    hole = F.array(F.lit(float("nan")), F.col("features")[1], F.col("features")[2])
    holes = unshuffled.withColumn("features", F.when(F.col("w") > 1.8, hole).otherwise(F.col("features")))
    settings = dict(k=3, seed=3, maxIter=3, tol=0.0, handleInvalid="keep")
    resident = GaussianMixture(**settings).fit(holes)
    assert log_lines("engine: ")[-1].startswith(PACKING)
    assert resident.summary.rowsWithMissingValues == holes.where(F.col("w") > 1.8).count() > 0
    assert_identical(resident, GaussianMixture(engine="driver", **settings).fit(holes))


def test_a_fit_reads_no_first_row_before_the_packing_tasks(spark):
    """The packing tasks learn the input's width themselves. A job that read a first row (a limit)
    stopped a DataFrame made from Python objects before its Python worker had written its
    partition, and Spark printed that worker's BrokenPipeError on stderr, on every fit."""
    from pyspark.ml.linalg import Vectors

    rng = np.random.default_rng(5)
    rows = [(Vectors.dense(r),) for r in np.vstack([rng.normal(c, 1.0, size=(300, 2)) for c in (0.0, 9.0)])]
    df = spark.createDataFrame(rows, ["features"])  # rows pickled by Python: a Python worker makes each partition
    tracker = spark.sparkContext.statusTracker()
    before = set(tracker.getJobIdsForGroup(None))
    fitted = GaussianMixture(k=2, seed=1).fit(df)
    assert len(set(tracker.getJobIdsForGroup(None)) - before) == 1  # the packing stage, which runs EM too
    assert sorted(np.round(fitted.means[:, 0])) == [0.0, 9.0]
