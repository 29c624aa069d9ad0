"""Reliability: bad input gets a clear error, degenerate data a finite model with a warning, and a
killed Python worker changes nothing."""

import os
import threading
import time
import warnings

import numpy as np
import pytest
from pyspark.ml.linalg import Vectors, VectorUDT
from pyspark.sql.types import StructField, StructType

from spark_gmm import (
    ComponentWarning,
    GaussianMixture,
    GaussianMixtureModel,
    InputWarning,
    InvalidInputError,
)
from support import array_frame as frame, assert_identical

VECTOR_SCHEMA = StructType([StructField("features", VectorUDT(), True)])


def blobs(rng, n=300, centers=((0.0, 0.0), (8.0, 0.0), (0.0, 8.0))):
    return np.vstack([rng.normal(c, 1.0, size=(n // len(centers), len(c))) for c in centers])


def assert_finite(model):
    assert np.isfinite(model.weights).all()
    assert np.isfinite(model.means).all()
    assert np.isfinite(model.covariances).all()
    assert np.isfinite(model.summary.logLikelihood)
    assert all(np.isfinite(model.summary.logLikelihoodHistory))




def fit_catching(estimator, df):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = estimator.fit(df)
    ours = [w for w in caught if issubclass(w.category, (ComponentWarning, InputWarning))]
    assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]  # the caller's line
    return model, [str(w.message) for w in ours]


# -- bad input -------------------------------------------------------------------------------------


def test_all_zero_and_nan_weights(spark, rng):
    x = blobs(rng)
    with pytest.raises(InvalidInputError, match="weight column 'w': all weights are zero"):
        GaussianMixture(k=2, weightCol="w").fit(frame(spark, x, w=np.zeros(len(x))))
    w = np.ones(len(x))
    w[[4, 5, 6]] = np.nan
    with pytest.raises(InvalidInputError, match="^3 rows with a null, negative, NaN or infinite weight in 'w'"):
        GaussianMixture(k=2, weightCol="w").fit(frame(spark, x, w=w))


def test_k_below_one(spark, rng):
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        GaussianMixture(k=0).fit(frame(spark, blobs(rng)))


def test_unsupported_column_types(spark):
    df = spark.createDataFrame([(["a", "b"], True, {"x": 1.0})], "s array<string>, b boolean, m map<string,double>")
    for column, kind in [("s", "array<string>"), ("b", "boolean"), ("m", "map<string,double>")]:
        with pytest.raises(InvalidInputError, match=f"^features column '{column}' has type {kind}"):
            GaussianMixture(featuresCol=column).fit(df)


def test_covariances_too_large_for_the_driver_are_refused_before_any_pass(spark):
    d = 60_000  # k·d² = 7.2e9 doubles: far more than this machine has
    x = np.arange(3 * d, dtype=np.float64).reshape(3, d) % 7
    began = time.perf_counter()
    with pytest.raises(InvalidInputError, match=r"^k=2 components × d=60000 features need about .* GiB of driver memory"):
        GaussianMixture(k=2).fit(frame(spark, x, partitions=1))
    assert time.perf_counter() - began < 60


def test_statistics_above_max_result_size_are_refused(spark, rng):
    # 8 partitions × one 160 MB partial each (k=10, d=2000) is more than the default 1 GiB of
    # spark.driver.maxResultSize when no tree combines them first (aggregationDepth=1).
    x = rng.normal(size=(16, 2000))
    with pytest.raises(InvalidInputError, match=r"^each EM pass would collect 1.19 GiB of statistics \(8 partials"):
        GaussianMixture(k=10, aggregationDepth=1).fit(frame(spark, x, partitions=8))


# -- degenerate data -------------------------------------------------------------------------------


def test_constant_feature_fits_with_a_warning(spark, rng):
    x = np.column_stack([blobs(rng), np.full(300, 42.5)])
    model, said = fit_catching(GaussianMixture(k=3, seed=1), frame(spark, x))
    assert_finite(model)
    assert any("feature 2 of 'features' is constant (42.5)" in s for s in said), said
    np.testing.assert_allclose(model.covariances[:, 2, 2], 1e-6, rtol=1e-6)
    np.testing.assert_allclose(model.means[:, 2], 42.5)
    with pytest.raises(InvalidInputError, match=r"^feature 2 of 'features' is constant \(42.5\): with regCovar=0"):
        GaussianMixture(k=3, regCovar=0.0).fit(frame(spark, x))


def test_constant_features_are_named_in_one_warning(spark, rng):
    x = np.column_stack([np.full(300, 7.0), blobs(rng), np.full(300, -1.5)])
    df = spark.createDataFrame([tuple(map(float, row)) for row in x], ["c", "a", "b", "z"])
    _, said = fit_catching(GaussianMixture(k=3, seed=1, inputCols=["c", "a", "b", "z"]), df)
    assert said == ["2 features are constant: 'c' (7), 'z' (-1.5); their variance is regCovar=1e-06 in every component"]


def test_duplicate_points_fit_and_too_few_distinct_points_are_refused(spark):
    points = np.array([[0.0, 0.0], [5.0, 1.0], [1.0, 7.0], [9.0, 9.0]])
    x = np.repeat(points, 50, axis=0)
    df = frame(spark, x)
    model, said = fit_catching(GaussianMixture(k=4, seed=2), df)
    assert_finite(model)
    np.testing.assert_allclose(np.sort(model.means, axis=0), np.sort(points, axis=0), atol=1e-9)
    np.testing.assert_allclose(model.covariances, np.broadcast_to(1e-6 * np.eye(2), (4, 2, 2)), rtol=1e-6)
    (singular,) = [s for s in said if "singular without regCovar" in s]  # one warning for all four
    assert singular.startswith("components 0, 1, 2, 3 are singular without regCovar (smallest own variance 0 ≤")
    for params in [dict(), dict(initMode="random"), dict(engine="barrier")]:
        with pytest.raises(ValueError, match="^k=5 but the data has only 4 distinct points; lower k"):
            GaussianMixture(k=5, **params).fit(df)


def test_sparse_vectors_give_the_dense_model(spark, rng):
    x = blobs(rng)
    x[np.abs(x) < 1.0] = 0.0  # plenty of exact zeros
    sparse = [(Vectors.sparse(2, {i: v for i, v in enumerate(row) if v != 0.0}),) for row in x]
    dense = [(Vectors.dense(row),) for row in x]
    est = GaussianMixture(k=3, seed=4, tol=1e-8)
    a = est.fit(spark.createDataFrame(sparse, VECTOR_SCHEMA).coalesce(2))
    b = est.fit(spark.createDataFrame(dense, VECTOR_SCHEMA).coalesce(2))
    assert_identical(a, b)


def collapsing_start(rng):
    """Two clusters and one isolated point, with a component started on that point."""
    x = np.vstack([blobs(rng, centers=((0.0, 0.0), (8.0, 0.0))), [[40.0, 40.0]]])
    start = GaussianMixtureModel.fromArrays(
        [0.45, 0.45, 0.1], [[0.5, 0.5], [7.5, 0.5], [39.0, 39.0]], [np.eye(2), np.eye(2), np.eye(2)]
    )
    return x, start


def test_component_collapsing_onto_one_point_in_plain_em(spark, rng):
    """The singleton situation: with restarts off, the component shrinks onto the point, held
    finite by regCovar, and the user is told."""
    x, start = collapsing_start(rng)
    est = GaussianMixture(k=3, maxIter=50, reseedComponents=False).setInitialModel(start)
    model, said = fit_catching(est, frame(spark, x))
    assert_finite(model)
    np.testing.assert_allclose(model.means[2], [40.0, 40.0], atol=1e-6)
    np.testing.assert_allclose(model.covariances[2], 1e-6 * np.eye(2), rtol=1e-3)
    assert any(s.startswith("component 2 is singular without regCovar") for s in said), said


def test_component_collapsing_without_regulariser_is_refused(spark, rng):
    """As scikit-learn: with regCovar=0 a collapsed covariance is ill-defined; never NaN."""
    x, start = collapsing_start(rng)
    est = GaussianMixture(k=3, maxIter=50, regCovar=0.0, reseedComponents=False).setInitialModel(start)
    with pytest.raises(FloatingPointError, match=r"^component 2 has an ill-defined covariance.*set regCovar > 0"):
        est.fit(frame(spark, x))


def test_component_collapsing_onto_one_point_is_restarted(spark, rng):
    x, start = collapsing_start(rng)
    model, said = fit_catching(GaussianMixture(k=3, maxIter=50).setInitialModel(start), frame(spark, x))
    assert_finite(model)
    assert [j for _, j, _ in model.summary.reseeded][:1] == [2]
    assert min(model.summary.clusterSizes) > 1  # no component is left on the single point


def test_component_that_loses_all_its_points(spark, rng):
    x = blobs(rng, centers=((0.0, 0.0), (8.0, 0.0)))
    start = GaussianMixtureModel.fromArrays(
        [0.4, 0.4, 0.2], [[0.0, 0.0], [8.0, 0.0], [1e4, 1e4]], [np.eye(2)] * 3
    )
    plain = GaussianMixture(k=3, maxIter=20, reseedComponents=False).setInitialModel(start)
    model, said = fit_catching(plain, frame(spark, x))
    assert_finite(model)
    assert model.summary.emptyComponents == [2]
    assert any("component 2 lost all its data" in s for s in said), said
    np.testing.assert_array_equal(model.means[2], [1e4, 1e4])  # kept, with a negligible weight
    assert model.weights[2] < 1e-12


def test_identical_starting_components(spark, rng):
    x = blobs(rng)
    start = GaussianMixtureModel.fromArrays([0.3, 0.3, 0.4], [[1.0, 1.0], [1.0, 1.0], [4.0, 4.0]],
                                            [np.eye(2)] * 3)
    plain = GaussianMixture(k=3, maxIter=30, reseedComponents=False).setInitialModel(start)
    model, said = fit_catching(plain, frame(spark, x))
    assert_finite(model)
    assert any("initial components 0 and 1 are identical" in s for s in said), said
    np.testing.assert_allclose(model.means[0], model.means[1], rtol=1e-12)


# -- crashed workers -------------------------------------------------------------------------------


def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(entry))
    return kids


def _python_workers(jvm_pid):
    """Pids of the Python workers forked by this session's pyspark.daemon."""
    workers = []
    for daemon in _children(jvm_pid):
        try:
            cmdline = open(f"/proc/{daemon}/cmdline", "rb").read()
        except OSError:
            continue
        if b"pyspark.daemon" in cmdline:
            workers.extend(_children(daemon))
    return workers


def _cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


class WorkerKiller(threading.Thread):
    """Once `after_jobs` jobs of `group` have started, kill -9 a Python worker that has just started
    computing (a task's work); again, up to `MAX_KILLS` times, until Spark has seen a task or job of
    the group fail."""

    MAX_KILLS = 3

    def __init__(self, spark, group, after_jobs, long_tasks):
        super().__init__(daemon=True)
        self.long_tasks = long_tasks
        self.tracker = spark.sparkContext.statusTracker()
        self.jvm_pid = spark.sparkContext._gateway.proc.pid
        self.group, self.after_jobs = group, after_jobs
        self.killed = []
        self.done = threading.Event()

    def failures(self) -> int:
        jobs = [self.tracker.getJobInfo(j) for j in self.tracker.getJobIdsForGroup(self.group)]
        stages = [self.tracker.getStageInfo(s) for job in jobs if job for s in job.stageIds]
        return sum(s.numFailedTasks for s in stages if s) + sum(j.status == "FAILED" for j in jobs if j)

    def _busy_worker(self):
        """A worker at work: one that just started computing (idle over a 30 ms window, busy over the
        next), or, for long tasks, one busy over three windows in a row."""
        ticks = {pid: _cpu_ticks(pid) for pid in _python_workers(self.jvm_pid)}
        idle_seen, streak = set(), dict.fromkeys(ticks, 0)
        for _ in range(20):
            time.sleep(0.03)
            for pid in ticks:
                now = _cpu_ticks(pid)
                if now is None or ticks[pid] is None:
                    continue
                used, ticks[pid] = now - ticks[pid], now
                streak[pid] = streak[pid] + 1 if used >= 2 else 0
                if used == 0:
                    idle_seen.add(pid)
                if (streak[pid] == 1 and pid in idle_seen) or (self.long_tasks and streak[pid] >= 3):
                    return pid
        return None

    def run(self):
        while not self.done.is_set() and len(self.killed) < self.MAX_KILLS and not self.failures():
            if len(self.tracker.getJobIdsForGroup(self.group)) < self.after_jobs:
                time.sleep(0.005)
                continue
            pid = self._busy_worker()
            if pid is None:
                continue
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                continue
            self.killed.append(pid)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not self.failures() and not self.done.is_set():
                time.sleep(0.02)


def fit_in_group(spark, estimator, df, group):
    out = {}

    def fit():
        spark.sparkContext.setJobGroup(group, "worker kill drill")
        out["model"] = estimator.fit(df)

    thread = threading.Thread(target=fit)
    thread.start()
    thread.join()
    return out["model"]


@pytest.fixture(scope="module")
def kill_data(spark):
    rng = np.random.default_rng(99)
    centers = rng.normal(scale=6.0, size=(8, 16))
    x = np.vstack([rng.normal(c, 1.0, size=(40_000, 16)) for c in centers]) + 1e5
    return frame(spark, x, partitions=2).cache()


@pytest.mark.parametrize("engine", ["driver", "barrier"])
def test_killed_python_worker_changes_nothing(spark, kill_data, engine):
    # Driver engine: a job per pass, so the kill after job 10 lands in the initialisation's passes
    # and a few EM passes suffice; barrier: the fit is job 2.
    est = GaussianMixture(k=8, seed=11, tol=1e-10, maxIter=4 if engine == "driver" else 8, engine=engine)
    undisturbed = fit_in_group(spark, est, kill_data, f"calm-{engine}")
    killer = WorkerKiller(
        spark, f"drill-{engine}", after_jobs=10 if engine == "driver" else 2, long_tasks=engine == "barrier"
    )
    killer.start()
    try:
        disturbed = fit_in_group(spark, est, kill_data, f"drill-{engine}")
    finally:
        killer.done.set()
        killer.join()
    assert killer.killed, "no Python worker was running a task of the fit"
    assert killer.failures() >= 1, "no kill failed a task"  # so Spark did retry something
    assert_identical(disturbed, undisturbed)
    assert disturbed.summary.clusterSizes == undisturbed.summary.clusterSizes


# -- extreme inputs --------------------------------------------------------------------------------


def test_values_whose_squares_overflow_are_refused(spark, rng):
    x = blobs(rng)
    x[:, 1] *= 1e158
    with pytest.raises(InvalidInputError, match=r"^feature 1 of 'features' has values as large as .*e\+15[89].*rescale"):
        GaussianMixture(k=3, seed=1).fit(frame(spark, x))


def test_column_names_with_backticks_work(spark, rng):
    x = blobs(rng)
    df = spark.createDataFrame([(float(a), float(b)) for a, b in x], "`a``b` double, `c` double")
    fitted = GaussianMixture(k=3, seed=1, inputCols=["a`b", "c"]).fit(df)
    assert fitted.transform(df).count() == len(x)
    assert fitted.featureNames == ["a`b", "c"]


def test_a_fit_too_wide_for_the_driver_is_refused_before_the_input_is_packed(spark):
    """d = 100,000 features: the packing tasks stop at their first batch; the input is not read in full."""
    df = spark.range(1000).selectExpr("array_repeat(cast(id as double), 100000) as features")
    tracker = spark.sparkContext.statusTracker()
    before = set(tracker.getJobIdsForGroup(None))
    with pytest.raises(InvalidInputError, match=r"^k=2 components × d=100000 features need about .* of driver memory"):
        GaussianMixture(k=2).fit(df)
    jobs = [tracker.getJobInfo(j) for j in set(tracker.getJobIdsForGroup(None)) - before]
    assert len(jobs) == 1  # the packing stage; no job reads a first row


def test_executor_memory_is_checked_too(monkeypatch):
    from spark_gmm import engine_choice, inputs

    class Session:
        class sparkContext:  # noqa: N801 - the attribute pyspark sessions have
            master = "spark://cluster:7077"

            @staticmethod
            def getConf():
                return {"spark.executor.pyspark.memory": "512m", "spark.executor.cores": "4"}

    monkeypatch.setattr(engine_choice, "task_slots", lambda spark: 8)
    with pytest.raises(InvalidInputError, match=r"^k=5 components × d=2000 features need about 0.596 GiB in each executor task"):
        inputs.check_executor_memory(5, 2000, Session())
    inputs.check_executor_memory(5, 200, Session())  # 6 MB: fine
