"""The resident engine: the whole fit inside one barrier stage.

Each barrier task keeps its cached blocks in memory and runs the same `em.fit_mixture` as the driver
engine. Its `reduce` folds the pass over the task's blocks per source partition and sends the
(partition, partial) pairs to task 0, which combines all of them in partition order — the driver
engine's order, so both engines give the same model — and sends the result back to every task, so
all tasks take identical steps. Task 0 returns the fitted result.

The exchange runs over TCP between the tasks (task 0 listens; its address is shared with one
`allGather`, and peers authenticate with a per-fit token). `allGather` itself is not used per
iteration: Spark polls barrier RPCs once a second, so each call costs up to a second. Nothing goes
through accumulators. Spark does not retry a failed barrier result stage, so `fit` reruns it (up to
`ATTEMPTS` runs) from the same start, which gives the same model.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import struct
import warnings

import numpy as np
import pyarrow as pa
from pyspark.sql import SparkSession

from . import em
from .blocks import BlockCache, arrow_blocks, combine_in_order, fold_blocks
from .mixture import Mixture, SpectralRepairWarning


RESULT_SCHEMA = "result string"
#: Spark's refusals to schedule a barrier stage at all: the driver engine runs the fit instead.
REFUSALS = (
    "BarrierJobSlotsNumberCheckFailed",
    "BarrierJobRunWithDynamicAllocationException",
    "BarrierJobUnsupportedRDDChainException",
)
#: Runs of the barrier stage before a failure (a crashed task, a lost executor) is final.
ATTEMPTS = 3

log = logging.getLogger("spark_gmm")


class BarrierUnavailable(RuntimeError):
    """A barrier stage cannot run here (no slot count, too few slots, or Spark refused it)."""


def task_slots(spark: SparkSession) -> int:
    """Concurrent task slots of the application, or 0 when this session cannot tell."""
    try:
        return int(spark.sparkContext.defaultParallelism)
    except Exception:  # Spark Connect has no sparkContext
        value = spark.conf.get("spark.default.parallelism", None)
        return int(value) if value else 0


def _encode(parts: list[tuple[int, np.ndarray]]) -> bytes:
    header = [float(len(parts))] + [float(p) for p, _ in parts] + [float(len(a)) for _, a in parts]
    return np.concatenate([np.array(header)] + [a for _, a in parts]).tobytes()


def _decode(message: bytes) -> list[tuple[int, np.ndarray]]:
    flat = np.frombuffer(message, dtype=np.float64)
    m = int(flat[0])
    pids, lengths = flat[1 : 1 + m].astype(int), flat[1 + m : 1 + 2 * m].astype(int)
    out, start = [], 1 + 2 * m
    for pid, length in zip(pids, lengths):
        out.append((int(pid), flat[start : start + length].copy()))
        start += length
    return out


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("<Q", len(payload)) + payload)


def _receive(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        buffer = bytearray(n)
        view, got = memoryview(buffer), 0
        while got < n:
            read = sock.recv_into(view[got:], n - got)
            if not read:
                raise ConnectionError("a barrier peer closed its connection mid-fit")
            got += read
        return bytes(buffer)

    return exactly(struct.unpack("<Q", exactly(8))[0])


class _Star:
    """Task 0 gathers every task's partials, combines them in partition order, sends the result."""

    ACCEPT_TIMEOUT = 120.0

    def __init__(self, context, token: str):
        self.index = context.partitionId()
        tasks = len(context.getTaskInfos())
        self.peers: list[socket.socket] = []
        if self.index == 0:
            server = socket.create_server(("", 0))
            server.settimeout(self.ACCEPT_TIMEOUT)
            host = context.getTaskInfos()[0].address.rsplit(":", 1)[0]
            context.allGather(f"{host}:{server.getsockname()[1]}")
            by_index = {}
            while len(by_index) < tasks - 1:
                sock, _ = server.accept()
                sock.settimeout(None)
                hello = _receive(sock).decode()
                given, index = hello.rsplit(":", 1)
                if secrets.compare_digest(given, token):
                    by_index[int(index)] = sock
                else:
                    sock.close()
            server.close()
            self.peers = [by_index[i] for i in sorted(by_index)]
        else:
            address = context.allGather("")[0]
            host, port = address.rsplit(":", 1)
            self.hub = socket.create_connection((host, int(port)), timeout=self.ACCEPT_TIMEOUT)
            self.hub.settimeout(None)
            self.hub.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _send(self.hub, f"{token}:{self.index}".encode())
        for sock in self.peers:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def reduce(self, pass_, mine: list[tuple[int, np.ndarray]]) -> np.ndarray:
        if self.index != 0:
            _send(self.hub, _encode(mine))
            return np.frombuffer(_receive(self.hub), dtype=np.float64).copy()
        parts = list(mine)
        for sock in self.peers:
            parts.extend(_decode(_receive(sock)))
        result = combine_in_order(pass_, parts)
        payload = result.tobytes()
        for sock in self.peers:
            _send(sock, payload)
        return result

    def close(self) -> None:
        for sock in self.peers + ([self.hub] if self.index else []):
            sock.close()


def _result_json(result: em.FitResult, caught) -> str:
    m = result.mixture
    return json.dumps(
        {
            "weights": m.weights.tolist(),
            "means": m.means.tolist(),
            "covariances": m.covariances.tolist(),
            "log_likelihood": result.log_likelihood,
            "history": result.history,
            "iterations": result.iterations,
            "converged": result.converged,
            "stop_reason": result.stop_reason,
            "reseeded": result.reseeded,
            "cluster_sizes": result.cluster_sizes,
            "empty_components": result.empty_components,
            "iteration_seconds": result.iteration_seconds,
            "warnings": [[w.category.__name__, str(w.message)] for w in caught],
        }
    )


def _result_from_json(text: str) -> em.FitResult:
    r = json.loads(text)
    if "error" in r:
        raise (FloatingPointError if r["error"] == "FloatingPointError" else ValueError)(r["message"])
    categories = {c.__name__: c for c in (em.ComponentWarning, SpectralRepairWarning)}
    for category, message in r["warnings"]:
        warnings.warn(message, categories.get(category, UserWarning), stacklevel=3)
    return em.FitResult(
        mixture=Mixture.from_covariances(r["weights"], r["means"], r["covariances"]),
        log_likelihood=r["log_likelihood"],
        history=r["history"],
        iterations=r["iterations"],
        converged=r["converged"],
        stop_reason=r["stop_reason"],
        reseeded=[tuple(item) for item in r["reseeded"]],
        cluster_sizes=r["cluster_sizes"],
        empty_components=r["empty_components"],
        iteration_seconds=r["iteration_seconds"],
    )


def make_barrier_task(shift, has_weight, dtype, d, total_weight, settings: em.FitSettings):
    token = secrets.token_hex(16)

    def task(batches):
        from pyspark import BarrierTaskContext

        context = BarrierTaskContext.get()
        by_partition: dict[int, list] = {}
        for pid, seq, raw, w in arrow_blocks(batches, has_weight, dtype):
            by_partition.setdefault(pid, []).append((seq, raw, w))
        for blocks in by_partition.values():
            blocks.sort(key=lambda item: item[0])

        star = _Star(context, token)

        def reduce(pass_):
            mine = []
            for pid, blocks in by_partition.items():
                part = fold_blocks(pass_, ((raw, w) for _, raw, w in blocks), shift)
                if part is not None:
                    mine.append((pid, part))
            return star.reduce(pass_, mine)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                payload = _result_json(em.fit(reduce, d, total_weight, [settings])[0], caught)
            except (ValueError, FloatingPointError) as error:  # every task fails alike: report once
                payload = json.dumps({"error": type(error).__name__, "message": str(error)})
            finally:
                star.close()
        if context.partitionId() == 0:
            yield pa.RecordBatch.from_pydict({"result": [payload]})

    return task


def fit(cache: BlockCache, summary, settings: em.FitSettings, spark: SparkSession) -> em.FitResult:
    """Run the fit in one barrier stage over `cache`'s blocks, coalesced to the task slots."""
    slots = task_slots(spark)
    if slots < 1:
        raise BarrierUnavailable("this session does not expose its task slot count")
    blocks = cache.blocks.select("pid", "seq", "n", "d", "x", "w")
    if summary.partitions > slots:
        blocks = blocks.repartition(slots)
    task = make_barrier_task(
        cache.shift, cache.has_weight, cache.dtype, summary.d, summary.total_weight, settings
    )
    for attempt in range(1, ATTEMPTS + 1):
        try:
            rows = blocks.mapInArrow(task, RESULT_SCHEMA, barrier=True).toArrow()
            break
        except Exception as error:
            text = str(error)
            if any(name in text for name in REFUSALS):
                raise BarrierUnavailable(_reason(text)) from error
            if attempt == ATTEMPTS or "cancelled" in text.lower():
                raise
            # Spark cannot retry a failed barrier result stage itself; the rerun starts from the
            # same settings, so it gives the same model.
            log.warning(
                "barrier stage failed (attempt %d of %d: %s); running it again", attempt, ATTEMPTS, _reason(text)
            )
    return _result_from_json(rows.column("result")[0].as_py())


def _reason(text: str) -> str:
    """The informative line of a Py4J/Spark error (its first line is often just 'An error occurred')."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "Exception:" in line or "Job aborted" in line:
            return line
    return lines[0] if lines else "unknown error"
