"""Which engine runs a fit: the resident engine where Spark can hold the data in a barrier stage,
else the driver engine. `choose` reads only the session's configuration and the input summary;
`packing_plan`, tried first, lets the resident tasks pack the input themselves where its plan has no
shuffle and its partitions fit in the free task slots (each task then checks its own partition
against the memory budget below, and one over it sends the fit to the cached blocks and `choose`).

`engine="auto"` (the default) uses the resident engine when all of these hold:
- a classic session: under Spark Connect the tasks cannot reach the client that runs EM;
- no dynamic allocation: Spark refuses barrier stages with it;
- at least one task slot (`spare_slots` more are kept free, e.g. for checkpoint writes);
- the Python side of each task can hold its share of the cached blocks: RESIDENT_HEADROOM × (cached
  bytes / tasks) within `spark.executor.pyspark.memory` per executor core if set; else, in local
  mode, within this machine's free memory per task slot; else within the executor memory overhead
  per executor core (`spark.executor.memoryOverhead`, by default max(384 MiB, 10% of
  `spark.executor.memory`)), where YARN and Kubernetes count Python workers;
- Spark's own traffic is not encrypted (`spark.network.crypto.enabled`, `spark.ssl.enabled`): the
  resident channel is integrity-protected but not encrypted, so with those on the data stays inside
  Spark's encrypted channels.
`engine="barrier"` insists: it warns and falls back only where the stage cannot run, and only warns
about encryption.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import numpy as np
from pyspark.sql import SparkSession

from .inputs import available_memory_bytes, jvm_bytes

log = logging.getLogger("spark_gmm")


#: A task holds its share of the cached blocks plus per-block temporaries; twice the even share
#: leaves room for those and for partitions of uneven size.
RESIDENT_HEADROOM = 2.0
ENCRYPTION_SETTINGS = ("spark.network.crypto.enabled", "spark.ssl.enabled")


@dataclass(frozen=True)
class Plan:
    resident: bool
    reason: str
    tasks: int = 0
    host: str = ""  # the address the coordinator listens on
    budget: int = 0  # bytes a task packing its own partition may hold


def _mib(text: str) -> int:
    """A Spark memory setting in bytes; a bare number means MiB, as Spark reads these settings."""
    text = str(text).strip()
    return int(text) << 20 if text.isdigit() else jvm_bytes(text)


def network_timeout_seconds(spark: SparkSession) -> float:
    """`spark.network.timeout` (default 120 s) in seconds: the resident channel's per-read timeout."""
    text = str(spark.sparkContext.getConf().get("spark.network.timeout", "120s")).strip().lower()
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?", text)
    if not found:
        raise ValueError(f"spark.network.timeout is not a duration: {text!r}")
    scale = {"ms": 1e-3, "s": 1.0, None: 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}[found.group(2)]
    return float(found.group(1)) * scale


def task_slots(spark: SparkSession) -> int:
    """Tasks the application can run at once: the count Spark checks a barrier stage against."""
    context = spark.sparkContext
    try:
        jvm = context._jsc.sc()
        return int(jvm.maxNumConcurrentTasks(jvm.resourceProfileManager().defaultResourceProfile()))
    except Exception:  # that JVM method is Spark-internal: fall back to the default parallelism
        return int(context.defaultParallelism)


def pass_tasks(spark: SparkSession) -> int | None:
    """The tasks a driver-engine pass runs in: one per task slot of the executors registered now
    (asked again each pass, as executors come and go), not one per input partition, each with its
    Spark scheduling cost. None (a task per partition) under dynamic allocation, where the slots of
    the moment say little, and under Spark Connect (no SparkContext to ask)."""
    try:
        context = spark.sparkContext
    except Exception:  # Spark Connect
        return None
    return None if _dynamic_allocation(context.getConf()) else max(1, task_slots(spark))


def _dynamic_allocation(conf) -> bool:
    return conf.get("spark.dynamicAllocation.enabled", "false").strip().lower() == "true"


def _is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def python_memory_per_task(conf, master: str, slots: int) -> tuple[int, str]:
    """(bytes a task's Python worker may use, where that figure comes from); see the module docstring."""
    cores = max(1, int(conf.get("spark.executor.cores", "1")))
    if conf.get("spark.executor.pyspark.memory", None):
        budget = _mib(conf.get("spark.executor.pyspark.memory"))
        return budget // cores, "spark.executor.pyspark.memory per core"
    if _is_local(master):
        return available_memory_bytes() // max(slots, 1), "free memory per task slot"
    overhead = conf.get("spark.executor.memoryOverhead", None)
    if overhead:
        budget = _mib(overhead)
    else:
        factor = float(conf.get("spark.executor.memoryOverheadFactor", "0.1"))
        budget = max(384 << 20, int(factor * _mib(conf.get("spark.executor.memory", "1g"))))
    return budget // cores, "executor memory overhead per core"


def advertised_host(conf, master: str) -> str:
    """The address tasks reach the driver at: loopback in local mode, else `spark.driver.host`."""
    return "127.0.0.1" if _is_local(master) else conf.get("spark.driver.host")


def _size(byte_count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if byte_count >= scale:
            return f"{byte_count / scale:.3g} {unit}"
    return f"{byte_count:.0f} bytes"


def choose(engine: str, cache, summary, spark: SparkSession, spare_slots: int = 0) -> Plan:
    """The engine for this fit and why, logged in one line."""
    plan = _plan(engine, cache, summary, spark, spare_slots)
    if engine == "barrier" and not plan.resident:
        log.warning("engine='barrier' cannot run here (%s); using the driver engine", plan.reason)
    else:
        log.info("engine: %s (%s)", "resident" if plan.resident else "driver", plan.reason)
    return plan


def packing_plan(engine: str, spark: SparkSession, rows, spare_slots: int = 0) -> Plan | None:
    """A plan for resident tasks that pack the DataFrame `rows` themselves, one per partition
    (`resident_tasks.make_packing_task`), or None where the cached blocks must come first: more
    partitions than free slots, partitions not known before a shuffle runs, encryption on, or no
    resident engine at all. Each task checks its own blocks against `Plan.budget`."""
    refusal, slots = _refusal(engine, spark, spare_slots)
    if refusal:
        return None
    conf, master = spark.sparkContext.getConf(), spark.sparkContext.master
    if any(conf.get(name, "false").strip().lower() == "true" for name in ENCRYPTION_SETTINGS):
        return None
    partitions = _partitions_known(rows)
    if not 0 < partitions <= slots - spare_slots:
        return None
    budget, source = python_memory_per_task(conf, master, slots)
    reason = f"a barrier stage of {partitions} task(s) packing their own partition, each within the {_size(budget)} of {source}"
    return Plan(True, reason, partitions, advertised_host(conf, master), budget)


def _partitions_known(df) -> int:
    """Partitions a barrier stage would read `df` in, where Spark knows them before running
    anything; 0 for a plan with a shuffle (its partitions exist once the shuffle has run) or one
    Spark would refuse in a barrier stage."""
    if "Exchange" in df._jdf.queryExecution().executedPlan().toString():
        return 0
    return barrier_partitions(df)


def barrier_partitions(df) -> int:
    """Partitions a barrier stage reads `df` in; 0 where Spark would refuse that stage (SPARK-24820):
    when an RDD back to the stage's shuffle boundaries has another partition count than the last
    (coalesce, union), also through a cache. Asking first keeps Spark's refusal, a stack trace at
    WARN, out of the log."""
    last = df._jdf.queryExecution().toRdd()
    pending, partitions = [last], last.getNumPartitions()
    while pending:
        rdd = pending.pop()
        if rdd.getNumPartitions() != partitions:
            return 0
        dependencies = rdd.dependencies()
        for i in range(dependencies.size()):
            dependency = dependencies.apply(i)
            if dependency.getClass().getSimpleName() != "ShuffleDependency":
                pending.append(dependency.rdd())
    return partitions


def _refusal(engine: str, spark: SparkSession, spare_slots: int) -> tuple[str | None, int]:
    """(why no resident engine can run, or None; the task slots)."""
    if engine == "driver":
        return "engine='driver'", 0
    try:
        context = spark.sparkContext
    except Exception:  # Spark Connect has no SparkContext
        return "Spark Connect: tasks cannot reach the client that runs EM", 0
    if _dynamic_allocation(context.getConf()):
        return "dynamic allocation is on, and Spark refuses barrier stages with it", 0
    slots = task_slots(spark)
    if slots - spare_slots < 1:
        return f"{slots} task slot(s), {spare_slots} of them kept free for checkpoint writes", slots
    return None, slots


def _plan(engine: str, cache, summary, spark: SparkSession, spare_slots: int) -> Plan:
    refusal, slots = _refusal(engine, spark, spare_slots)
    if refusal:
        return Plan(False, refusal)
    conf, master = spark.sparkContext.getConf(), spark.sparkContext.master
    tasks = min(summary.partitions, slots - spare_slots)
    row_bytes = summary.d * np.dtype(cache.dtype).itemsize + (8 if cache.has_weight else 0)
    need = RESIDENT_HEADROOM * math.ceil(summary.rows * row_bytes / tasks)
    budget, source = python_memory_per_task(conf, master, slots)
    if need > budget:
        return Plan(False, f"{_size(need)} per task for its blocks is above the {_size(budget)} of {source}")
    encrypted = [name for name in ENCRYPTION_SETTINGS if conf.get(name, "false").strip().lower() == "true"]
    if encrypted and engine == "auto":
        return Plan(False, f"{encrypted[0]} is on and the resident channel is not encrypted")
    if encrypted:
        log.warning(
            "engine='barrier' with %s: passes and partials (parameters, sums, sampled rows) travel "
            "between the driver and its tasks integrity-protected but NOT encrypted", encrypted[0],
        )
    return Plan(
        True,
        f"a barrier stage of {tasks} task(s) over {summary.partitions} partition(s), {_size(need)} per task "
        f"within the {_size(budget)} of {source}",
        tasks,
        advertised_host(conf, master),
    )
