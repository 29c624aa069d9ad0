"""The resident engine: the blocks held in the tasks of one barrier stage, EM on the driver.

The driver runs the same `em` loop as the driver engine; only `reduce(pass)` differs. A barrier stage, run
from a background thread of the driver, gives each task its blocks, which it keeps in its Python worker: where
the input has no shuffle and no more partitions than free task slots, each task packs its own input partition
(`start_packing`: the input is read once, and never written to Spark's cache and read back); else each task
loads a share of the cached blocks. Each task connects to a listener on the driver (`channel`) and serves
passes: it receives a pass (`wire`), folds it over its blocks per source partition (`fold_blocks`) and sends
back the (partition, partial) pairs; the driver combines them in partition order exactly as the driver engine
does (in the same tree when partials are large), so both engines give bit-identical models. A pass costs no
Spark job and no data movement, and what hooks into the EM loop (per-iteration logs, checkpoints, nInit
restarts, fitMultiple candidates) works unchanged. At the end the driver tells the tasks to finish.

A task that dies fails the barrier stage (Spark does not retry barrier result stages): the driver sees the
connection drop or the stage end, runs the stage again and repeats the pending pass. The EM state lives on the
driver, so the model is the same. After ATTEMPTS failed runs with no pass completed in between, the rest of
the fit runs on the driver engine, which computes the same partials (so still the same model). Packing tasks
read their partition again in a rerun, and their blocks' summary rows must equal the first run's, or the fit
stops with an error rather than fit rows that changed under it. Nothing goes through accumulators or
`allGather`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import uuid
from contextlib import contextmanager

import pyarrow as pa
from pyspark.sql import SparkSession

from . import channel, wire
from .blocks import BlockCache, combine_in_order, tree_fanout
from .barrier_stage import BarrierUnavailable, StageRun, await_slots
from .engine_choice import Plan, barrier_partitions, choose, network_timeout_seconds, packing_plan
from .exceptions import InvalidInputError, executor_environment_error
from .resident_tasks import (
    FINISH, PASS, SUMMARY, TOO_LARGE, UNREACHABLE, encode_go, make_packing_task, make_task, read_summary,
)

#: Runs of the barrier stage, with no pass completed in between, before a failure is final.
ATTEMPTS = 3
#: Longest wait for a task's hello; the per-read timeout is `spark.network.timeout`.
HANDSHAKE_SECONDS = 10.0
#: Largest summary a packing task may send: its blocks' summary rows are well under 1% of its data.
SUMMARY_LIMIT_BYTES = 1 << 28
#: Spark's refusals to schedule a barrier stage at all: the driver engine runs the fit instead.
REFUSALS = (
    "BarrierJobSlotsNumberCheckFailed",
    "BarrierJobRunWithDynamicAllocationException",
    "BarrierJobUnsupportedRDDChainException",
)

log = logging.getLogger("spark_gmm")


class _RunFailed(Exception):
    """The current run of the barrier stage is lost (a task died or its connection failed)."""


class ResidentEngine:
    """The driver's side: the listener, the stage runs and `reduce`."""

    def __init__(self, cache: BlockCache, spark: SparkSession, plan: Plan, partitions: int, rows: int = 0,
                 packing: bool = False):
        """Over the cached blocks, or with `packing` over the input rows, each task packing its
        own partition (`rows` is then set by `go`)."""
        self.cache, self.spark, self.plan, self.packing = cache, spark, plan, packing
        self.partitions, self.rows, self.dtype = partitions, rows, cache.dtype
        self.summary_rows: pa.Table | None = None  # packing: the first run's; reruns must match them
        self.go_message: bytes | None = None  # packing: GO, once the input is valid
        if packing:
            self.blocks = cache.input
        else:
            blocks = cache.blocks.select("pid", "seq", "n", "d", "x", "w")
            # Barrier stages refuse coalesce (SPARK-24820): more partitions than tasks, or a source
            # Spark would refuse, need a shuffle, by ranges of `pid` (a partition's blocks in one task).
            shuffle = partitions > plan.tasks or not barrier_partitions(blocks)
            self.blocks = blocks.repartitionByRange(plan.tasks, "pid") if shuffle else blocks
        self.read_seconds = network_timeout_seconds(spark)
        self.handshake_seconds = min(HANDSHAKE_SECONDS, self.read_seconds)
        self.key = secrets.token_bytes(channel.KEY_BYTES)
        self.tag = f"spark_gmm-resident-{uuid.uuid4().hex}"
        self.ready = threading.Condition()
        self.run, self.expected, self.members = 0, 0, {}
        self.accepting = False  # whether tasks of the current run may still connect
        self.stage: StageRun | None = None
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
        """Run the stage until every task holds its blocks and is connected. Packing tasks get one
        try: the cached blocks' packing pass reads the input again and explains what failed."""
        while True:
            try:
                return self._start_run()
            except _RunFailed as failure:
                if self.packing:
                    self._stop_run()
                    raise BarrierUnavailable(str(failure)) from None
                self._failed(failure)
                if self.failures >= ATTEMPTS:
                    raise BarrierUnavailable(f"{ATTEMPTS} runs of the barrier stage failed; last: {failure}")

    def _start_run(self) -> None:
        await_slots(self.spark, self.plan.tasks)
        with self.ready:
            self.run += 1
            self.members, self.expected, self.accepting = {}, 0, True
        if self.packing:
            task = make_packing_task(
                self.listener.address, self.key, self.run, self.cache.has_weight, self.cache.keep_missing,
                self.cache.widest, self.plan.budget, self.read_seconds, self.handshake_seconds,
            )
        else:
            task = make_task(
                self.listener.address, self.key, self.run, self.cache.shift, self.cache.has_weight,
                self.cache.dtype, self.read_seconds, self.handshake_seconds,
            )
        self.stage = StageRun(self.spark, self.blocks, task, self.tag, self.run)
        with self.ready:
            while not (self.expected and len(self.members) == self.expected):
                if self.stage.done.is_set():
                    if (unfit := executor_environment_error(self.stage.error)) is not None:
                        raise unfit  # every stage would fail alike: no second try
                    text = str(self.stage.error)
                    if UNREACHABLE in text or any(name in text for name in REFUSALS):
                        raise BarrierUnavailable(self.stage.reason())
                    raise _RunFailed(
                        f"stage run {self.run} ended before its tasks connected: {self.stage.reason()}"
                    )
                self.ready.wait(0.2)
        if self.packing:
            self._take_summaries()

    def _take_summaries(self) -> None:
        """Read every packing task's summary rows; on a rerun they must match the first run's,
        then the tasks are told to serve."""
        with self.ready:
            links = [self.members[i] for i in sorted(self.members)]
        stage, tables = self.stage, []
        try:
            for index, link in enumerate(links):
                reply = link.receive(SUMMARY_LIMIT_BYTES, alive=lambda: not stage.done.is_set())
                if reply[:1] == TOO_LARGE:
                    raise BarrierUnavailable(
                        f"partition {index} needs {int(bytes(reply[1:]))} bytes in its task, above the "
                        f"{self.plan.budget} its Python worker may use"
                    )
                if reply[:1] != SUMMARY:
                    raise wire.WireError(f"a {bytes(reply[:1])!r} message where a summary belongs")
                tables.append(read_summary(memoryview(reply)[1:]))
        except (channel.ChannelError, wire.WireError, ValueError) as error:
            cause = stage.reason() if stage.done.is_set() else str(error)
            raise _RunFailed(f"stage run {self.run} lost while packing ({cause})") from None
        table = pa.concat_tables(tables)
        if self.summary_rows is None:
            self.summary_rows = table
        elif not table.equals(self.summary_rows):
            raise InvalidInputError(
                "the input changed between two reads in one fit (rows, values or their partitions); "
                "cache the DataFrame or write it out before fitting, so that every read sees the same rows"
            )
        if self.go_message is not None:
            self._send_go()

    def go(self, shift, dtype, rows: int) -> None:
        """Let the packing tasks serve passes over their rows shifted by `shift`, as `dtype`."""
        self.go_message, self.dtype, self.rows = encode_go(shift, dtype), dtype, rows
        try:
            self._send_go()
        except _RunFailed as failure:
            self._failed(failure)  # the next pass runs the stage again

    def _send_go(self) -> None:
        with self.ready:
            links = [self.members[i] for i in sorted(self.members)]
        try:
            for link in links:
                link.send(self.go_message)
        except channel.ChannelError as error:
            raise _RunFailed(f"stage run {self.run} lost ({error})") from None

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
        payload = PASS + wire.encode_pass(pass_)
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
        log.warning("resident engine: %s; the rest of the fit runs on the driver engine, which gives the "
                    "same model", why)
        if self.dtype != self.cache.dtype:  # packing tasks held float32 blocks: the cache's become the same
            self.cache.store_as_float32()
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
                    link.send(FINISH)
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


def start_packing(engine: str, cache: BlockCache, spark: SparkSession, spare_slots: int = 0) -> ResidentEngine | None:
    """A resident engine whose tasks packed the input and sent its summary rows, or None where the
    fit must pack it into cached blocks first. The caller validates the summary, then calls `go`
    or `close`."""
    plan = packing_plan(engine, spark, cache.input, spare_slots)
    if plan is None:
        return None
    log.info("engine: resident (%s)", plan.reason)
    try:
        resident = _started(ResidentEngine(cache, spark, plan, plan.tasks, packing=True))
    except BarrierUnavailable as why:
        log.info("resident engine: its tasks cannot pack the input (%s); packing it into cached blocks", why)
        return None
    return resident


def _started(resident: ResidentEngine) -> ResidentEngine:
    """`resident` with its stage running; closed if it cannot start."""
    try:
        resident.start()
    except BaseException:
        resident.close()
        raise
    return resident


@contextmanager
def reducer(engine: str, cache: BlockCache, summary, spark: SparkSession, spare_slots: int = 0,
            resident: ResidentEngine | None = None):
    """`reduce` of the engine `engine` ('auto', 'barrier' or 'driver') picks, for the `with` block;
    of `resident` when given (`start_packing`'s, which its caller closes).

    `spare_slots` task slots stay free of the barrier stage (checkpoint writes need one).
    """
    if resident is not None:
        yield resident.reduce
        return
    plan = choose(engine, cache, summary, spark, spare_slots)
    if not plan.resident:
        yield cache.reduce
        return
    try:
        resident = _started(ResidentEngine(cache, spark, plan, summary.partitions, summary.rows))
    except BarrierUnavailable as why:
        log.warning("resident engine unavailable (%s); using the driver engine", why)
        yield cache.reduce
        return
    try:
        yield resident.reduce
    finally:
        resident.close()
