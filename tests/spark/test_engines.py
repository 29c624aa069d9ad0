"""The resident ("barrier") engine runs the driver engine's EM loop with a different `reduce`, so
every fit — plain, float32, nInit restarts, fitMultiple candidates, checkpointed — gives the driver
engine's model bit for bit; `engine="auto"` picks it where it can run."""

import glob
import logging
import os
import socket
import struct
import threading
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pytest
from pyspark.conf import SparkConf

from spark_gmm import GaussianMixture, blocks, channel, engine_choice, inputs
from spark_gmm.exceptions import InputWarning
from support import array_frame, assert_identical


@pytest.fixture(scope="module")
def blobs(spark):
    rng = np.random.default_rng(7)
    centers = np.array([[0.0, 0.0, 0.0], [6.0, 6.0, 0.0], [0.0, 8.0, 5.0]])
    x = np.vstack([rng.normal(c, [1.0, 0.5, 2.0], size=(800, 3)) for c in centers]) + 1e6
    return spark.createDataFrame([(row.tolist(),) for row in x], ["features"])




@pytest.fixture
def engine_log(caplog):
    """The log lines of the engine choice (and of the resident engine) during a test."""
    caplog.set_level(logging.INFO, logger="spark_gmm")

    def lines(prefix):
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]

    return lines


@pytest.mark.parametrize("partitions", [1, 2, 5])
def test_resident_engine_gives_the_driver_engines_model(blobs, partitions, engine_log):
    df = blobs.repartition(partitions)
    driver = GaussianMixture(k=3, seed=3, tol=1e-9, maxIter=30, engine="driver").fit(df)
    resident = GaussianMixture(k=3, seed=3, tol=1e-9, maxIter=30, engine="barrier").fit(df)
    assert engine_log("engine: ")[-1].startswith(f"engine: resident (a barrier stage of {min(partitions, 2)} task")
    assert engine_log("resident engine unavailable") == []  # it ran, and did not hand over to the driver engine
    assert_identical(resident, driver)


def test_float32_blocks_on_both_engines(blobs):
    df = blobs.repartition(3)
    start = GaussianMixture(k=3, seed=3, maxIter=0).fit(df)
    fits = {
        (dtype, engine): GaussianMixture(maxIter=5, tol=0.0, dtype=dtype, engine=engine)
        .setInitialModel(start)
        .fit(df)
        for dtype, engine in (("float64", "driver"), ("float32", "driver"), ("float32", "barrier"))
    }
    wide, narrow = fits["float64", "driver"], fits["float32", "driver"]
    scale = np.sqrt(np.diagonal(wide.covariances, axis1=1, axis2=2))
    assert np.abs((narrow.means - wide.means) / scale).max() < 1e-4  # data sit at 1e6: shifted first
    np.testing.assert_allclose(narrow.covariances, wide.covariances, rtol=1e-3, atol=1e-4)
    assert narrow.summary.logLikelihood == pytest.approx(wide.summary.logLikelihood, rel=1e-6)
    assert_identical(fits["float32", "barrier"], narrow)


def test_restarts_and_candidates_on_the_resident_engine(blobs, engine_log):
    df = blobs.repartition(3)
    restarts = {
        engine: GaussianMixture(k=3, seed=5, nInit=3, maxIter=6, engine=engine).fit(df)
        for engine in ("driver", "barrier")
    }
    assert_identical(restarts["barrier"], restarts["driver"])
    est = GaussianMixture(seed=2, maxIter=6)
    maps = [{est.k: k, est.covarianceType: t} for k in (2, 4) for t in ("full", "diag")]
    fitted = {
        engine: dict(est.copy({est.engine: engine}).fitMultiple(df, maps)) for engine in ("driver", "barrier")
    }
    assert engine_log("engine: ")[-1].startswith("engine: resident")
    for i in range(len(maps)):
        assert_identical(fitted["barrier"][i], fitted["driver"][i])


def test_checkpoints_and_resuming_on_the_resident_engine(blobs, tmp_path, engine_log):
    df = blobs.repartition(3)
    settings = dict(k=3, seed=8, tol=0.0, checkpointInterval=1, engine="barrier")
    directory = str(tmp_path / "ckpt")
    stopped = GaussianMixture(maxIter=3, checkpointDir=directory, **settings).fit(df)
    # Checkpoint writes are Spark jobs: one of the session's two slots stays free for them.
    assert engine_log("engine: ")[-1].startswith("engine: resident (a barrier stage of 1 task")
    assert glob.glob(os.path.join(directory, "slot-*", "state", "part-*"))
    resumed = GaussianMixture(maxIter=6, checkpointDir=directory, **settings).fit(df)
    assert resumed.summary.resumedFromIteration == 3
    # Without checkpoints the stage has 2 tasks: the partials still combine in partition order.
    assert_identical(resumed, GaussianMixture(maxIter=6, **settings).fit(df))
    assert_identical(stopped, GaussianMixture(maxIter=3, **settings).fit(df))


def test_tree_reduction_gives_the_same_model_on_both_engines(blobs, monkeypatch):
    from spark_gmm import blocks

    df = blobs.repartition(9)
    start = GaussianMixture(k=3, seed=3, maxIter=0).fit(df)
    flat = GaussianMixture(maxIter=3, tol=0.0, engine="driver").setInitialModel(start).fit(df)
    monkeypatch.setattr(blocks, "TREE_THRESHOLD_BYTES", 0)  # every pass reduces in a tree
    tree = {
        engine: GaussianMixture(maxIter=3, tol=0.0, aggregationDepth=3, engine=engine).setInitialModel(start).fit(df)
        for engine in ("driver", "barrier")
    }
    np.testing.assert_allclose(tree["driver"].means, flat.means, rtol=1e-12)
    np.testing.assert_allclose(tree["driver"].covariances, flat.covariances, rtol=1e-10, atol=1e-12)
    assert_identical(tree["barrier"], tree["driver"])


def test_refusals_of_the_data_come_back_as_plain_errors(blobs):
    # Five identical rows cannot make three components: EM runs on the driver and says so.
    few = blobs.limit(1).crossJoin(blobs.sparkSession.range(5)).select("features")
    with pytest.warns(InputWarning, match="constant"), pytest.raises(ValueError, match="distinct points"):
        GaussianMixture(k=3, engine="barrier").fit(few)


# -- engine="auto" -----------------------------------------------------------------------------


def test_auto_is_the_default_and_picks_the_resident_engine_here(blobs, engine_log):
    df = blobs.repartition(2)
    assert GaussianMixture().getEngine() == "auto"
    auto = GaussianMixture(k=3, seed=4, maxIter=5).fit(df)
    (line,) = engine_log("engine: ")
    assert line.startswith("engine: resident (a barrier stage of 2 task(s) over 2 partition(s)")
    assert_identical(auto, GaussianMixture(k=3, seed=4, maxIter=5, engine="driver").fit(df))


def test_auto_falls_back_to_the_driver_engine_when_the_blocks_do_not_fit(blobs, monkeypatch, engine_log):
    # 10 kB: room for the k×d×d arrays of a task, not for its share of the blocks.
    monkeypatch.setattr(engine_choice, "python_memory_per_task", lambda conf, master, slots: (10_000, "a test budget"))
    df = blobs.repartition(2)
    auto = GaussianMixture(k=3, seed=4, maxIter=5).fit(df)
    (line,) = engine_log("engine: ")
    assert line.startswith("engine: driver (") and line.endswith("above the 10 kB of a test budget)")
    assert engine_log("resident engine:") == []
    assert_identical(auto, GaussianMixture(k=3, seed=4, maxIter=5, engine="driver").fit(df))


class FakeSession:
    """A classic session as `engine_choice` sees it: its settings, master and slot count."""

    def __init__(self, master="local[4]", slots=4, **settings):
        conf = SparkConf(loadDefaults=False)
        for key, value in settings.items():
            conf.set(key.replace("_", "."), value)
        self.sparkContext = type("Context", (), {"master": master, "getConf": lambda self: conf})()
        self.slots = slots


class ConnectSession:
    @property
    def sparkContext(self):
        raise RuntimeError("[JVM_ATTRIBUTE_NOT_SUPPORTED] sparkContext is not supported in Spark Connect")


class Summary:
    rows, d, partitions = 1_000_000, 10, 8


class Cache:
    dtype, has_weight = np.float64, False


@pytest.fixture
def plan(monkeypatch):
    def plan(session, engine="auto", spare=0):
        monkeypatch.setattr(engine_choice, "task_slots", lambda spark: spark.slots)
        return engine_choice.choose(engine, Cache(), Summary(), session, spare)

    return plan


def test_auto_chooses_by_what_spark_can_schedule(plan, caplog):
    caplog.set_level(logging.INFO, logger="spark_gmm")
    resident = plan(FakeSession(slots=4))
    assert (resident.resident, resident.tasks, resident.host) == (True, 4, "127.0.0.1")
    cluster = plan(FakeSession("spark://master:7077", slots=16, **{
        "spark_driver_host": "10.1.2.3", "spark_executor_memory": "8g", "spark_executor_cores": "4"}))
    # 80 MB in 8 tasks, twice 10 MB per task, within the default overhead of 8g executors / 4 cores.
    assert (cluster.resident, cluster.tasks, cluster.host) == (True, 8, "10.1.2.3")
    assert "executor memory overhead per core" in cluster.reason
    for session, spare, why in [
        (ConnectSession(), 0, "Spark Connect"),
        (FakeSession(**{"spark_dynamicAllocation_enabled": "true"}), 0, "dynamic allocation"),
        (FakeSession(slots=1), 1, "1 task slot(s), 1 of them kept free for checkpoint writes"),
        (FakeSession(**{"spark_network_crypto_enabled": "true"}), 0, "spark.network.crypto.enabled is on"),
        (FakeSession(**{"spark_ssl_enabled": "TRUE"}), 0, "spark.ssl.enabled is on"),
        (FakeSession(**{"spark_executor_pyspark_memory": "30"}), 0, "above the 31.5 MB of spark.executor.pyspark.memory per core"),
        (FakeSession("yarn", slots=8, **{"spark_executor_memoryOverhead": "10"}), 0, "executor memory overhead"),
    ]:
        chosen = plan(session, spare=spare)
        assert not chosen.resident and why in chosen.reason, chosen.reason
        assert caplog.records[-1].getMessage() == f"engine: driver ({chosen.reason})"
    assert plan(FakeSession(), engine="driver").reason == "engine='driver'"


def test_explicit_barrier_warns_where_auto_would_not_use_it(plan, caplog):
    encrypted = plan(FakeSession(**{"spark_network_crypto_enabled": "true"}), engine="barrier")
    assert encrypted.resident
    assert "NOT encrypted" in caplog.text
    dynamic = plan(FakeSession(**{"spark_dynamicAllocation_enabled": "true"}), engine="barrier")
    assert not dynamic.resident
    assert caplog.records[-1].levelname == "WARNING"
    assert "engine='barrier' cannot run here (dynamic allocation" in caplog.records[-1].getMessage()


# -- the coordinator under attack ---------------------------------------------------------------


class Attackers(logging.Handler):
    """When the coordinator logs its address, local clients connect to it and misbehave."""

    def __init__(self):
        super().__init__()
        self.address, self.threads, self.closed = None, [], {}

    def emit(self, record):
        message = record.getMessage()
        if self.address is None and message.startswith("resident engine: coordinator listening on "):
            host, port = message.rsplit(" ", 1)[1].rsplit(":", 1)
            self.address = (host, int(port))
            for name, behaviour in [
                ("silent", b""),
                ("garbage", os.urandom(200)),
                ("huge length", struct.pack("<Q", 2**62)),
                ("wrong key", None),
            ]:
                thread = threading.Thread(target=self.attack, args=(name, behaviour), daemon=True)
                thread.start()
                self.threads.append(thread)

    def attack(self, name, payload):
        if payload is None:  # a well-formed hello under another key
            try:
                channel.connect(self.address, os.urandom(32), channel.Hello(0, 2, 1), 5.0, 5.0)
                self.closed[name] = False
            except channel.ChannelError:
                self.closed[name] = True
            return
        sock = socket.create_connection(self.address)
        sock.sendall(payload)
        sock.settimeout(30)
        try:
            while sock.recv(1 << 16):  # the challenge, then nothing until the coordinator hangs up
                pass
            self.closed[name] = True
        except OSError:
            self.closed[name] = True
        finally:
            sock.close()


def test_a_fit_under_attack_gives_the_same_model(blobs, monkeypatch, caplog):
    from spark_gmm import barrier

    df = blobs.repartition(2)
    calm = GaussianMixture(k=3, seed=6, maxIter=20, tol=0.0, engine="barrier").fit(df)
    monkeypatch.setattr(barrier, "HANDSHAKE_SECONDS", 1.0)
    attackers = Attackers()
    logger = logging.getLogger("spark_gmm")
    logger.addHandler(attackers)
    logger.setLevel(logging.INFO)
    caplog.set_level(logging.INFO, logger="spark_gmm")
    try:
        attacked = GaussianMixture(k=3, seed=6, maxIter=20, tol=0.0, engine="barrier").fit(df)
    finally:
        logger.removeHandler(attackers)
    for thread in attackers.threads:
        thread.join(30)
    assert attackers.address[0] == "127.0.0.1"  # local mode: loopback only
    assert attackers.closed == dict.fromkeys(["silent", "garbage", "huge length", "wrong key"], True)
    assert caplog.text.count("resident engine: dropped a connection") == 4
    assert_identical(attacked, calm)


# -- a task killed mid-fit ------------------------------------------------------------------------


def connected_workers(jvm_pid, port):
    """Pids of this session's Python workers holding a TCP connection to `port` on loopback."""
    from test_reliability import _python_workers

    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    holders = []
    for pid in _python_workers(jvm_pid):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                holders.append(pid)
        except OSError:
            continue
    return holders


class KillAtIteration(logging.Handler):
    """Kills one resident task's Python worker when the driver logs EM iteration `iteration`."""

    def __init__(self, jvm_pid, iteration):
        super().__init__()
        self.jvm_pid, self.iteration = jvm_pid, iteration
        self.port, self.killed = None, []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("resident engine: coordinator listening on "):
            self.port = int(message.rsplit(":", 1)[1])
        elif message.startswith(f"iteration {self.iteration}:") and not self.killed:
            victims = connected_workers(self.jvm_pid, self.port)
            if victims:
                os.kill(victims[0], 9)
                self.killed.append(victims[0])


@contextmanager
def killing_at_iteration(spark, caplog, iteration):
    """A `KillAtIteration` listening to spark_gmm's log (at INFO, also into `caplog`) in the block."""
    killer = KillAtIteration(spark.sparkContext._gateway.proc.pid, iteration)
    logger = logging.getLogger("spark_gmm")
    logger.addHandler(killer)
    caplog.set_level(logging.INFO, logger="spark_gmm")
    try:
        yield killer
    finally:
        logger.removeHandler(killer)


def test_a_task_killed_mid_fit_changes_nothing(spark, blobs, caplog):
    df = blobs.repartition(2)
    est = GaussianMixture(k=3, seed=6, maxIter=8, tol=0.0, engine="barrier")
    calm = est.fit(df)
    with killing_at_iteration(spark, caplog, 3) as killer:
        disturbed = est.fit(df)
    assert killer.killed, "no resident task was found to kill"
    assert "running the barrier stage again (failure 1 of at most 2 in a row)" in caplog.text
    assert "runs on the driver engine" not in caplog.text  # the rerun itself finished the fit
    assert_identical(disturbed, calm)


def losing_a_slot_with_the_kill(monkeypatch, killer, back_after: int | None = None):
    """Once `killer` has killed a task, the session reports one task slot fewer (as if the task's
    executor was lost), for `back_after` asks or for good; the resident engine waits 2 s at most."""
    from spark_gmm import barrier_stage

    spark_slots, short = barrier_stage.task_slots, []

    def slots(session):
        if not killer.killed or (back_after is not None and len(short) >= back_after):
            return spark_slots(session)
        short.append(spark_slots(session) - 1)
        return short[-1]

    monkeypatch.setattr(barrier_stage, "task_slots", slots)
    monkeypatch.setattr(barrier_stage, "SLOT_WAIT_SECONDS", 2.0)


#: The log lines of a rerun short of one of its 2 task slots: waiting, and giving up to the driver engine.
SHORT_OF_SLOTS = "resident engine: 1 task slot(s) left of the 2 its barrier stage needs; waiting up to 2 s"
HANDED_OVER = ("1 task slot(s) left of the 2 its barrier stage needs (executors lost), after 2 s; the rest of "
               "the fit runs on the driver engine")


@pytest.mark.parametrize("slots_return", [True, False])
def test_a_rerun_short_of_task_slots_waits_for_them_then_leaves_the_stage(spark, blobs, caplog, monkeypatch,
                                                                          slots_return):
    """An executor lost with its task leaves fewer task slots than the barrier stage needs at once,
    which Spark would wait for 40 × 15 s. The rerun waits a while: slots that come back resume the
    resident engine; else the driver engine finishes the fit. The model is the same either way."""
    df = blobs.repartition(2)
    est = GaussianMixture(k=3, seed=6, maxIter=8, tol=0.0, engine="barrier")
    calm = est.fit(df)
    with killing_at_iteration(spark, caplog, 3) as killer:
        losing_a_slot_with_the_kill(monkeypatch, killer, back_after=2 if slots_return else None)
        disturbed = est.fit(df)
    assert killer.killed, "no resident task was found to kill"
    assert SHORT_OF_SLOTS in caplog.text
    assert (HANDED_OVER in caplog.text) is not slots_return
    assert_identical(disturbed, calm)


def test_partitions_of_several_blocks_stay_whole_in_one_resident_task(spark, engine_log, monkeypatch):
    """Five partitions of three blocks each (64 features: 1,024 rows a block) on two tasks: every
    partition's blocks must reach the same task, or two tasks would each answer for it. The driver
    engine reads them one block per Arrow batch: the folds must not depend on the batching."""
    monkeypatch.setattr(blocks, "BLOCKS_PER_BATCH", 1)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(15_000, 64)) + 6.0 * rng.integers(0, 2, size=(15_000, 1))
    df = array_frame(spark, x, partitions=5).cache()
    settings = {"k": 2, "seed": 1, "maxIter": 2, "tol": 0.0}
    resident = GaussianMixture(engine="barrier", **settings).fit(df)
    assert engine_log("resident engine: stage run") == []
    assert engine_log("engine: ")[-1].startswith("engine: resident (a barrier stage of 2 task(s) over 5 partition(s)")
    assert_identical(resident, GaussianMixture(engine="driver", **settings).fit(df))
    df.unpersist()


def test_a_driver_engine_pass_runs_a_task_per_slot_whatever_the_partitions(spark, blobs, monkeypatch):
    """Seven input partitions on two slots: each pass reads the cached partitions coalesced into two
    tasks, the partials still one per input partition, so the model is the one of a task per
    partition, bit for bit."""
    from spark_gmm.blocks import BlockCache
    from spark_gmm.inputs import feature_array
    from spark_gmm.kernels import SumPass

    df = blobs.repartition(7)

    class RowsAndSums(SumPass):  # defined here: shipped by value
        def map_block(self, raw, shift, w):
            return np.array([len(raw), (raw - shift).sum()])

    def pass_tasks_and_sums(group):
        cache = BlockCache(df, feature_array(df, "features", None), None)
        cache.summarize()
        out = {}

        def run():  # in a thread of its own, so that the job group stays with this pass
            spark.sparkContext.setJobGroup(group, "tasks of one pass")
            out["sums"] = cache.reduce(RowsAndSums())

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        cache.unpersist()
        tracker = spark.sparkContext.statusTracker()
        (job,) = tracker.getJobIdsForGroup(group)
        return tracker.getStageInfo(max(tracker.getJobInfo(job).stageIds)).numTasks, out["sums"]  # the pass's stage

    tasks, sums = pass_tasks_and_sums("pass-coalesced")
    settings = {"k": 3, "seed": 4, "maxIter": 3, "tol": 0.0, "engine": "driver"}
    coalesced = GaussianMixture(**settings).fit(df)
    monkeypatch.setattr(blocks, "pass_tasks", lambda session: None)  # a task per input partition
    tasks_apart, sums_apart = pass_tasks_and_sums("pass-apart")
    assert tasks == 2 and tasks_apart == 7
    assert sums[0] == sums_apart[0] == 2400 and sums[1] == pytest.approx(sums_apart[1], rel=1e-12)
    assert_identical(coalesced, GaussianMixture(**settings).fit(df))


def test_arrow_batches_are_limited_inside_the_block_and_the_setting_restored(spark):
    """What `BlockCache.reduce` wraps its pass in: batches of at most the given rows (or the
    user's smaller limit); the session's setting as it was afterwards, also after an error and
    when two fits overlap (the second must not take the first's limit for the user's)."""
    key = inputs.ARROW_BATCH_ROWS

    def batch_sizes():
        sizes = spark.range(20).repartition(1).mapInArrow(
            lambda batches: (pa.RecordBatch.from_pydict({"n": [b.num_rows]}) for b in batches), "n long")
        return sorted(row.n for row in sizes.collect())

    assert spark.conf.get(key, None) is None
    with inputs.arrow_batches_of(spark, 3):
        assert batch_sizes() == [2] + [3] * 6
    assert spark.conf.get(key, None) is None and batch_sizes() == [20]
    with pytest.raises(ZeroDivisionError), inputs.arrow_batches_of(spark, 3):
        1 / 0
    first, second = inputs.arrow_batches_of(spark, 3), inputs.arrow_batches_of(spark, 3)
    first.__enter__()
    second.__enter__()  # two fits overlap; the first leaves first
    first.__exit__(None, None, None)
    assert spark.conf.get(key, None) == "3"
    second.__exit__(None, None, None)
    assert spark.conf.get(key, None) is None
    spark.conf.set(key, "2")
    try:
        with inputs.arrow_batches_of(spark, 3):
            assert batch_sizes() == [2] * 10
        assert spark.conf.get(key) == "2"
    finally:
        spark.conf.unset(key)
