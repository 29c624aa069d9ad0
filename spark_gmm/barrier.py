"""The resident engine: the cached blocks held in the tasks of one barrier stage, EM on the driver.

The driver runs the same `em` loop as the driver engine; only `reduce(pass)` differs. A barrier stage,
run from a background thread of the driver, hands each task a share of the cached blocks, which the
task loads once and keeps in its Python worker. Each task connects to a listener on the driver
(`channel`) and serves passes: it receives a pass (`wire`), folds it over its blocks per source
partition (`fold_blocks`) and sends back the (partition, partial) pairs; the driver combines them
in partition order exactly as the driver engine does (in the same tree when partials are large), so
both engines give bit-identical models. A pass costs no Spark job and no data movement, and what
hooks into the EM loop (per-iteration logs, checkpoints, nInit restarts, fitMultiple candidates)
works unchanged. At the end the driver tells the tasks to finish.

A task that dies fails the barrier stage (Spark does not retry barrier result stages): the driver
sees the connection drop or the stage end, runs the stage again and repeats the pending pass. The
EM state lives on the driver, so the model is the same. After ATTEMPTS failed runs with no pass
completed in between, the rest of the fit runs on the driver engine, which computes the same
partials (so still the same model). Nothing goes through accumulators or `allGather`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import uuid
from contextlib import contextmanager

from pyspark.sql import SparkSession

from . import channel, wire
from .blocks import BlockCache, arrow_blocks, combine_in_order, fold_blocks, tree_fanout
from .engine_choice import Plan, choose, network_timeout_seconds

#: Runs of the barrier stage, with no pass completed in between, before a failure is final.
ATTEMPTS = 3
#: Longest wait for a task's hello; the per-read timeout is `spark.network.timeout`.
HANDSHAKE_SECONDS = 10.0
#: Largest pass a task accepts (the driver has authenticated itself before it sends any).
PASS_LIMIT_BYTES = 1 << 30
#: Spark's refusals to schedule a barrier stage at all: the driver engine runs the fit instead.
REFUSALS = (
    "BarrierJobSlotsNumberCheckFailed",
    "BarrierJobRunWithDynamicAllocationException",
    "BarrierJobUnsupportedRDDChainException",
)
_PASS, _FINISH = b"P", b"F"
#: How a task reports that it cannot reach the coordinator (the driver engine runs the fit instead).
UNREACHABLE = "spark_gmm: a resident task cannot reach the driver"

log = logging.getLogger("spark_gmm")


class BarrierUnavailable(RuntimeError):
    """The barrier stage cannot start here (Spark refused it, or its tasks cannot reach the driver)."""


class _RunFailed(Exception):
    """The current run of the barrier stage is lost (a task died or its connection failed)."""


def make_task(address, key: bytes, run: int, shift, has_weight: bool, dtype, read_seconds: float,
              handshake_seconds: float):
    """The barrier stage's `mapInArrow` function: load the blocks, then serve passes until told to finish."""

    def task(batches):
        from pyspark import BarrierTaskContext

        context = BarrierTaskContext.get()
        by_partition: dict[int, list] = {}
        for pid, seq, raw, w in arrow_blocks(batches, has_weight, dtype):
            by_partition.setdefault(pid, []).append((seq, raw, w))
        for blocks in by_partition.values():
            blocks.sort(key=lambda item: item[0])
        hello = channel.Hello(context.partitionId(), len(context.getTaskInfos()), run)
        try:
            link = channel.connect(address, key, hello, handshake_seconds, read_seconds)
        except channel.ChannelError as error:
            raise RuntimeError(f"{UNREACHABLE}: {error}") from None
        try:
            _serve(link, by_partition, shift)
        finally:
            link.close()
        return iter(())

    return task


def _serve(link: channel.Channel, by_partition: dict, shift) -> None:
    """Answer passes until the driver says finish or ends this run (a rerun, or a failed fit)."""
    while True:
        try:
            message = link.receive(PASS_LIMIT_BYTES)
        except channel.ChannelError:
            return
        if message[:1] == _FINISH:
            return
        pass_ = wire.decode_pass(bytes(message[1:]))
        mine = []
        for pid in sorted(by_partition):
            part = fold_blocks(pass_, ((raw, w) for _, raw, w in by_partition[pid]), shift)
            if part is not None:
                mine.append((pid, part))
        try:
            link.send(wire.encode_partials(mine))
        except channel.ChannelError:
            return


class _Stage:
    """One run of the barrier stage, its Spark action running in a background thread."""

    def __init__(self, spark: SparkSession, blocks, task, tag: str, run: int):
        from pyspark import InheritableThread

        self.error: BaseException | None = None
        self.done = threading.Event()

        def act():
            context = spark.sparkContext
            try:
                context.addJobTag(tag)
                context.setInterruptOnCancel(True)
                context.setJobDescription(f"spark_gmm: resident engine, stage run {run}")
                blocks.mapInArrow(task, "done int", barrier=True).collect()
            except BaseException as error:  # reported to the driver's EM thread
                self.error = error
            finally:
                self.done.set()

        # Inherits the caller's job group and properties, so the stage is the fit's job.
        self.thread = InheritableThread(target=act, name=f"spark_gmm-resident-{run}", daemon=True)
        self.thread.start()

    def reason(self) -> str:
        if self.error is None:
            return "the stage ended before the fit did"
        text = str(self.error)
        return next((line.strip() for line in text.splitlines() if UNREACHABLE in line), _reason(text))


class ResidentEngine:
    """The driver's side: the listener, the stage runs and `reduce`."""

    def __init__(self, cache: BlockCache, summary, spark: SparkSession, plan: Plan):
        self.cache, self.spark = cache, spark
        self.partitions, self.rows = summary.partitions, summary.rows
        blocks = cache.blocks.select("pid", "seq", "n", "d", "x", "w")
        # Barrier stages refuse coalesce (SPARK-24820): more partitions than tasks need a shuffle,
        # by ranges of `pid`, so that each partition's blocks all reach one task.
        self.blocks = blocks.repartitionByRange(plan.tasks, "pid") if summary.partitions > plan.tasks else blocks
        self.read_seconds = network_timeout_seconds(spark)
        self.handshake_seconds = min(HANDSHAKE_SECONDS, self.read_seconds)
        self.key = secrets.token_bytes(channel.KEY_BYTES)
        self.tag = f"spark_gmm-resident-{uuid.uuid4().hex}"
        self.ready = threading.Condition()
        self.run, self.expected, self.members = 0, 0, {}
        self.accepting = False  # whether tasks of the current run may still connect
        self.stage: _Stage | None = None
        self.failures = 0
        try:
            self.listener = channel.Listener(
                plan.host, self.key, self.handshake_seconds, self.read_seconds, self._admit
            )
        except OSError as error:
            raise BarrierUnavailable(f"cannot listen on the driver's address {plan.host}: {error}") from None
        log.info("resident engine: coordinator listening on %s:%d", *self.listener.address)

    def _admit(self, hello: channel.Hello, link: channel.Channel) -> bool:
        with self.ready:
            current = self.accepting and hello.run == self.run
            if not current or hello.index >= hello.tasks or hello.index in self.members:
                return False
            if self.members and hello.tasks != self.expected:
                return False
            self.expected = hello.tasks
            self.members[hello.index] = link
            self.ready.notify_all()
            return True

    def start(self) -> None:
        """Run the stage until every task holds its blocks and is connected."""
        while True:
            try:
                return self._start_run()
            except _RunFailed as failure:
                self._failed(failure)
                if self.failures >= ATTEMPTS:
                    raise BarrierUnavailable(f"{ATTEMPTS} runs of the barrier stage failed; last: {failure}")

    def _start_run(self) -> None:
        with self.ready:
            self.run += 1
            self.members, self.expected, self.accepting = {}, 0, True
        task = make_task(
            self.listener.address, self.key, self.run, self.cache.shift, self.cache.has_weight,
            self.cache.dtype, self.read_seconds, self.handshake_seconds,
        )
        self.stage = _Stage(self.spark, self.blocks, task, self.tag, self.run)
        with self.ready:
            while not (self.expected and len(self.members) == self.expected):
                if self.stage.done.is_set():
                    text = str(self.stage.error)
                    if UNREACHABLE in text or any(name in text for name in REFUSALS):
                        raise BarrierUnavailable(self.stage.reason())
                    raise _RunFailed(
                        f"stage run {self.run} ended before its tasks connected: {self.stage.reason()}"
                    )
                self.ready.wait(0.2)

    def _failed(self, failure: _RunFailed) -> None:
        """Count a lost run and end it; the caller runs the stage again or gives up."""
        self._stop_run()
        self.failures += 1
        if self.failures < ATTEMPTS:
            log.warning(
                "resident engine: %s; running the barrier stage again (failure %d of at most %d in a row)",
                failure, self.failures, ATTEMPTS - 1,
            )

    def reduce(self, pass_):
        """`pass_` over every block, combined as the driver engine combines it."""
        if self.failures >= ATTEMPTS:
            return self.cache.reduce(pass_)
        payload = _PASS + wire.encode_pass(pass_)
        limit = wire.reply_limit(pass_, self.partitions, self.rows)
        while True:
            try:
                if self.stage is None:
                    self._start_run()
                parts = self._exchange(payload, limit)
                self.failures = 0
                return self._combine(pass_, parts)
            except _RunFailed as failure:
                self._failed(failure)
                if self.failures >= ATTEMPTS:
                    why = f"{ATTEMPTS} runs of the barrier stage failed in a row; last: {failure}"
                    return self._hand_over(why, pass_)
            except BarrierUnavailable as why:
                self._stop_run()
                self.failures = ATTEMPTS
                return self._hand_over(str(why), pass_)

    def _hand_over(self, why: str, pass_):
        log.warning(
            "resident engine: %s; the rest of the fit runs on the driver engine, which gives the same model",
            why,
        )
        return self.cache.reduce(pass_)

    def _exchange(self, payload: bytes, limit: int) -> list:
        with self.ready:
            links = [self.members[i] for i in sorted(self.members)]
        stage = self.stage
        parts, seen = [], set()
        try:
            for link in links:
                link.send(payload)
            for link in links:
                reply = link.receive(limit, alive=lambda: not stage.done.is_set())
                for pid, part in wire.decode_partials(reply, self.partitions):
                    if pid in seen:
                        raise wire.WireError(f"partition {pid} came from two tasks")
                    seen.add(pid)
                    parts.append((pid, part))
        except (channel.ChannelError, wire.WireError) as error:
            cause = stage.reason() if stage.done.is_set() else str(error)
            raise _RunFailed(f"stage run {self.run} lost ({cause})") from None
        return parts

    def _combine(self, pass_, parts):
        """The driver engine's reduction: partition order, in its tree when partials are large."""
        depth = self.cache.aggregation_depth
        fanout = tree_fanout(self.partitions, getattr(pass_, "partial_bytes", 0), depth)
        if fanout:
            width = 1
            for _ in range(depth - 1):
                width *= fanout
                groups: dict[int, list] = {}
                for pid, part in parts:
                    groups.setdefault(pid // width, []).append((pid, part))
                parts = [(min(p for p, _ in g), combine_in_order(pass_, g)) for g in groups.values()]
        return combine_in_order(pass_, parts)

    def _stop_run(self, finish: bool = False) -> None:
        """End the current run: tell its tasks to finish (or drop them), and wait for the stage."""
        with self.ready:
            links, self.members, self.accepting = list(self.members.values()), {}, False
        for link in links:
            if finish:
                try:
                    link.send(_FINISH)
                except channel.ChannelError:
                    pass
            link.close()
        stage, self.stage = self.stage, None
        if stage is None:
            return
        # Tasks end on their own once told or dropped; one still busy with a pass is cancelled.
        if not stage.done.wait(self.read_seconds if finish else self.handshake_seconds):
            log.warning("resident engine: stage run %d did not end; cancelling it", self.run)
            self.spark.sparkContext.cancelJobsWithTag(self.tag)
            stage.done.wait(self.read_seconds)
        if finish and stage.error is not None:
            log.warning("resident engine: the stage ended with an error after the fit: %s", stage.reason())

    def close(self) -> None:
        try:
            self._stop_run(finish=True)
        finally:
            self.listener.close()


@contextmanager
def reducer(engine: str, cache: BlockCache, summary, spark: SparkSession, spare_slots: int = 0):
    """`reduce` of the engine `engine` ('auto', 'barrier' or 'driver') picks, for the `with` block.

    `spare_slots` task slots stay free of the barrier stage (checkpoint writes need one).
    """
    plan = choose(engine, cache, summary, spark, spare_slots)
    if not plan.resident:
        yield cache.reduce
        return
    try:
        resident = ResidentEngine(cache, summary, spark, plan)
        try:
            resident.start()
        except BaseException:
            resident.close()
            raise
    except BarrierUnavailable as why:
        log.warning("resident engine unavailable (%s); using the driver engine", why)
        yield cache.reduce
        return
    try:
        yield resident.reduce
    finally:
        resident.close()


def _reason(text: str) -> str:
    """The informative line of a Py4J/Spark error (its first line is often just 'An error occurred')."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "Exception:" in line or "Job aborted" in line:
            return line
    return lines[0] if lines else "unknown error"
