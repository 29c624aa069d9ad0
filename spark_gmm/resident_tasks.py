"""What a resident task runs on its executor: take its blocks, then answer the driver's passes.

A task gets its blocks in one of two ways. `make_task` reads them from the fit's cached blocks.
`make_packing_task` cuts its input partition into blocks as the caching pass does
(`blocks.pack_blocks`) and keeps them as they come, so a fit whose input has no more partitions
than there are task slots reads its input once, and never writes the blocks to Spark's cache or
reads them back. Such a task first sends the driver its blocks' summary rows (the ones the cache
would have given) and serves passes only once the driver, having validated the whole input,
answers GO with the data's shift and the fit's dtype.

Messages, after the channel's handshake: task → driver SUMMARY + an Arrow stream of the summary
rows, or TOO_LARGE + the bytes it would hold; driver → task GO + dtype width + shift, PASS + a pass
(`wire`), or FINISH. A task answers a pass with its (partition, partial) pairs.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import channel, wire
from .blocks import NO_COUNTS, SUMMARY_COLUMNS, arrow_blocks, block_batch, fold_blocks, pack_blocks
from .engine_choice import RESIDENT_HEADROOM

PASS, FINISH, GO = b"P", b"F", b"G"
SUMMARY, TOO_LARGE = b"S", b"L"
#: Largest pass a task accepts (the driver has authenticated itself before it sends any).
PASS_LIMIT_BYTES = 1 << 30
#: How a task reports that it cannot reach the coordinator (the driver engine runs the fit instead).
UNREACHABLE = "spark_gmm: a resident task cannot reach the driver"


def _link(address, key: bytes, run: int, handshake_seconds: float, read_seconds: float) -> channel.Channel:
    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    hello = channel.Hello(context.partitionId(), len(context.getTaskInfos()), run)
    try:
        return channel.connect(address, key, hello, handshake_seconds, read_seconds)
    except channel.ChannelError as error:
        raise RuntimeError(f"{UNREACHABLE}: {error}") from None


def make_task(address, key: bytes, run: int, shift, has_weight: bool, dtype, read_seconds: float,
              handshake_seconds: float):
    """The barrier stage's `mapInArrow` function over cached blocks: load them, then serve passes."""

    def task(batches):
        by_partition: dict[int, list] = {}  # partition: [(seq, raw rows, weights)] in storage order
        for pid, seq, raw, w in arrow_blocks(batches, has_weight, dtype):
            by_partition.setdefault(pid, []).append((seq, raw, w))
        for blocks in by_partition.values():
            blocks.sort(key=lambda item: item[0])
        link = _link(address, key, run, handshake_seconds, read_seconds)
        try:
            serve(link, by_partition, shift)
        finally:
            link.close()
        return iter(())

    return task


def make_packing_task(address, key: bytes, run: int, has_weight: bool, keep_missing: bool, widest: int | None,
                      budget_bytes: int, read_seconds: float, handshake_seconds: float):
    """The barrier stage's `mapInArrow` function over input rows: pack them as the cached blocks'
    packing pass does (`blocks.pack_blocks`), keep the blocks as they come, report their summary
    rows, and serve passes once the driver says GO (a task over its budget reports that and stops)."""

    def task(batches):
        summaries, by_partition, held = [], {}, 0
        for pid, seq, x, w, counts, dims, digest in pack_blocks(batches, has_weight, keep_missing, widest):
            summaries.append(block_batch(pid, seq, x, w, counts, dims, digest, values=False))
            if x is not None and len(x):
                by_partition.setdefault(pid, []).append((seq, x, w))
                held += x.nbytes + (0 if w is None else w.nbytes)
                if RESIDENT_HEADROOM * held > budget_bytes:
                    break
        link = _link(address, key, run, handshake_seconds, read_seconds)
        try:
            if RESIDENT_HEADROOM * held > budget_bytes:
                link.send(TOO_LARGE + str(int(RESIDENT_HEADROOM * held)).encode())
                return iter(())
            link.send(SUMMARY + summary_bytes(summaries))
            reply = link.receive(2 + 8 * (1 << 20))
            if reply[:1] != GO:
                return iter(())
            width, shift = decode_go(bytes(reply))
            if width == 4:  # as `BlockCache.store_as_float32` converts the cached blocks
                by_partition = {pid: [(seq, (x - shift).astype(np.float32), w) for seq, x, w in blocks]
                                for pid, blocks in by_partition.items()}
                shift = None
            serve(link, by_partition, shift)
        except channel.ChannelError:
            pass  # the driver ended this run
        finally:
            link.close()
        return iter(())

    return task


def summary_bytes(summaries: list[pa.RecordBatch]) -> bytes:
    """Summary rows of blocks (a partition has at least one), as an Arrow stream."""
    table = pa.Table.from_batches(summaries).select(SUMMARY_COLUMNS)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_summary(data) -> pa.Table:
    """A task's summary rows; WireError if malformed or not of the summary's columns and types."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except pa.ArrowException as error:
        raise wire.WireError(f"malformed summary: {error}") from None
    expected = pa.Table.from_batches([block_batch(0, 0, None, None, NO_COUNTS, (-1, -1))]).select(SUMMARY_COLUMNS)
    if not table.schema.equals(expected.schema):
        raise wire.WireError(f"a summary of schema {table.schema}")
    return table


def encode_go(shift: np.ndarray, dtype) -> bytes:
    return GO + bytes([np.dtype(dtype).itemsize]) + np.ascontiguousarray(shift, np.float64).tobytes()


def decode_go(data: bytes) -> tuple[int, np.ndarray]:
    """(the dtype's width in bytes, the shift) of a GO message."""
    return data[1], np.frombuffer(data[2:], np.float64).copy()


def serve(link: channel.Channel, by_partition: dict, shift) -> None:
    """Answer passes until the driver says finish or ends this run (a rerun, or a failed fit)."""
    while True:
        try:
            message = link.receive(PASS_LIMIT_BYTES)
        except channel.ChannelError:
            return
        if message[:1] == FINISH:
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
