"""One run of the resident engine's barrier stage (`barrier`): the task slots it needs before it
starts, its Spark action in a background thread, and the reason it ended."""

from __future__ import annotations

import logging
import threading
import time

from pyspark.sql import SparkSession

from .engine_choice import task_slots
from .resident_tasks import UNREACHABLE

#: Longest wait, before a run of the barrier stage, for the task slots it needs (after an executor
#: was lost). Spark would keep the stage waiting for 40 × 15 s; the driver engine needs no slot count.
SLOT_WAIT_SECONDS = 60.0

log = logging.getLogger("spark_gmm")


class BarrierUnavailable(RuntimeError):
    """The barrier stage cannot start here (Spark refused it, or its tasks cannot reach the driver)."""


def await_slots(spark: SparkSession, tasks: int) -> None:
    """A barrier stage runs all its `tasks` at once: with fewer task slots than that (an executor
    was lost), wait a while for replacements, then give up to the driver engine."""
    deadline, told = time.monotonic() + SLOT_WAIT_SECONDS, False
    while (slots := task_slots(spark)) < tasks:
        if not told:
            log.warning("resident engine: %d task slot(s) left of the %d its barrier stage needs; waiting up "
                        "to %.0f s for executors", slots, tasks, SLOT_WAIT_SECONDS)
            told = True
        left = deadline - time.monotonic()
        if left <= 0:
            raise BarrierUnavailable(
                f"{slots} task slot(s) left of the {tasks} its barrier stage needs (executors lost), "
                f"after {SLOT_WAIT_SECONDS:.0f} s"
            )
        time.sleep(min(1.0, left))


class StageRun:
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
        return next((line.strip() for line in text.splitlines() if UNREACHABLE in line), informative_line(text))


def informative_line(text: str) -> str:
    """The informative line of a Py4J/Spark error (its first line is often just 'An error occurred')."""
    lines = [line.strip().removeprefix(": ") for line in text.splitlines() if line.strip()]  # Py4J's ": org…"
    for line in lines:
        if "Exception:" in line or "Job aborted" in line:
            return line
    return lines[0] if lines else "unknown error"
