"""Rows → cached blocks, and passes over them: the thin Spark layer.

Input rows are converted once (`mapInArrow`) into blocks of a few thousand rows, each one row of the
cached DataFrame holding the block's values as raw bytes: float32 where every value of the block is
a float32 number (counts, pixels, float columns: half the bytes to cache and to move into Python
each pass, and no value changes), else float64. Every data pass then maps the cached blocks to
float64 numpy rows, folds the pass's partials per input partition in storage order, and the driver
combines one partial per input partition in partition order. The hot path uses DataFrame APIs (and
the SparkContext only where there is one: `pass_tasks`), so the same code runs under Spark Connect.

The packing pass also takes a digest of the rows it keeps (`content_digest`), so a checkpoint can
tell the data it was made from without another pass. Its cutting of rows into blocks
(`pack_blocks`) is also what resident tasks that pack their own partition run (`resident_tasks`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property
from operator import itemgetter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.sql import DataFrame, functions as F

from .codec import binary_views as _binary_views
from .engine_choice import pass_tasks
from .inputs import arrow_batches_of
from .kernels import fused, mix64
from .rows import RowBlocker, batch_rows

#: Target bytes of one block: large enough that numpy calls amortise, small enough for the cache.
BLOCK_BYTES = 1 << 19
#: Cached blocks per Arrow batch of a pass (~4 MB): Python folds a batch while the JVM writes the next.
BLOCKS_PER_BATCH = 8
#: Above this many bytes of partials per pass, the driver combines them in a tree (aggregationDepth).
TREE_THRESHOLD_BYTES = 32 << 20

BLOCK_SCHEMA = (
    "pid int, seq int, n int, d int, x binary, w binary, wsum double, xmin binary, xmax binary, "
    "null_rows long, nonfinite_rows long, bad_weight_rows long, incomplete_rows long, dmin int, dmax int, digest long"
)
#: The counts of a block row that reports none (see `block_batch`).
NO_COUNTS = [0, 0, 0, 0]
SUMMARY_COLUMNS = [
    "pid", "n", "d", "wsum", "xmin", "xmax",
    "null_rows", "nonfinite_rows", "bad_weight_rows", "incomplete_rows", "dmin", "dmax", "digest",
]
_U64 = (1 << 64) - 1
PARTIAL_SCHEMA = "pid int, part binary"


def block_rows_for(d: int) -> int:
    return int(min(1 << 16, max(256, BLOCK_BYTES // (8 * max(d, 1)))))


def partition_id() -> int:
    from pyspark import TaskContext

    return TaskContext.get().partitionId()


def content_digest(x: np.ndarray, w: np.ndarray | None) -> int:
    """Digest of the multiset of rows (x_i, w_i): Σ_i h(x_i, w_i) mod 2⁶⁴ (w_i = 1 without weights).

    Summed, it does not depend on row order or partitioning, and digests of parts add up to the
    digest of the whole. h mixes each value's bits with a salt for its position, sums over the row
    and mixes again, so moving a value to another column or another row changes it. -0.0 counts as
    0.0 (the fit cannot tell them apart). A guard against resuming on other data, not a
    cryptographic hash. Compiled (`fused.content_digest`); this numpy is its reference.
    """
    if fused is not None:
        return fused.content_digest(x, w)
    n, d = x.shape
    weights = np.ones(n) if w is None else w
    salts = mix64(np.arange(1, d + 2, dtype=np.uint64))
    total = 0
    step = max(1, (1 << 18) // (d + 1))  # bounded temporaries for any d
    for start in range(0, n, step):
        rows = np.column_stack([x[start : start + step], weights[start : start + step]]) + 0.0
        per_row = mix64(rows.view(np.uint64) ^ salts).sum(axis=1, dtype=np.uint64)
        total = (total + int(mix64(per_row).sum(dtype=np.uint64))) & _U64
    return total


def stored_values(x: np.ndarray) -> bytes:
    """A block's values as cached: float32 bytes when that loses nothing, else float64 bytes."""
    narrow = x.astype(np.float32)
    return narrow.tobytes() if np.array_equal(narrow, x) else x.tobytes()


def block_values(data: np.ndarray, n: int, d: int, dtype=np.float64) -> np.ndarray:
    """The (n, d) rows of a cached block's bytes, as `dtype`: float64 (float32 blocks widened
    exactly), or float32 for the blocks of a cache narrowed by `BlockCache.store_as_float32`."""
    stored = np.float32 if len(data) == 4 * n * d else np.float64
    rows = data.view(stored).reshape(n, d)
    return rows if stored == dtype else rows.astype(dtype)


def block_batch(pid, seq, x, w, counts, dims, digest=0, values=True):
    """One output row: a block of valid rows plus what the driver needs to validate the input:
    `counts` of rows [null, non-finite, bad weight, kept with missing values], per-feature ranges
    over the observed (not NaN) values. Without `values`, the summary alone (`x` and `w` empty)."""
    n, d = x.shape if x is not None else (0, -1)
    finite = x if x is not None else np.empty((0, 0))
    return pa.RecordBatch.from_pydict(
        {
            "pid": pa.array([pid], pa.int32()),
            "seq": pa.array([seq], pa.int32()),
            "n": pa.array([n], pa.int32()),
            "d": pa.array([d], pa.int32()),
            "x": pa.array([stored_values(finite) if values else b""], pa.binary()),
            "w": pa.array([b"" if w is None or not values else w.tobytes()], pa.binary()),
            "wsum": pa.array([float(n if w is None else w.sum())], pa.float64()),
            "xmin": pa.array([np.fmin.reduce(finite, axis=0).tobytes() if n else b""], pa.binary()),
            "xmax": pa.array([np.fmax.reduce(finite, axis=0).tobytes() if n else b""], pa.binary()),
            "null_rows": pa.array([counts[0]], pa.int64()),
            "nonfinite_rows": pa.array([counts[1]], pa.int64()),
            "bad_weight_rows": pa.array([counts[2]], pa.int64()),
            "incomplete_rows": pa.array([counts[3]], pa.int64()),
            "dmin": pa.array([dims[0]], pa.int32()),
            "dmax": pa.array([dims[1]], pa.int32()),
            "digest": pa.array(np.array([digest], np.uint64).view(np.int64)),
        }
    )


def pack_blocks(batches, has_weight: bool, keep_missing: bool = False, widest: int | None = None):
    """Input rows (Arrow batches of the `x` and optional `w` columns of one partition) cut into
    blocks: (pid, seq, rows, weights, counts, dims, digest) per block, then one that carries the
    partition's counts of invalid rows and its digest; with `keep_missing`, rows with some finite
    feature are kept, NaN marking the others (`rows.batch_rows`). Vectors of different lengths, or
    longer than `widest`, end the reading: the driver refuses such input."""
    pid, block_rows, seq, blocker = partition_id(), None, 0, RowBlocker(has_weight)
    counts, dims, digest = np.zeros(4, np.int64), (-1, -1), 0
    for batch in batches:
        x, w, c, batch_dims = batch_rows(batch, has_weight, keep_missing)
        counts += c
        if batch_dims[0] >= 0:
            dims = batch_dims if dims[0] < 0 else (min(dims[0], batch_dims[0]), max(dims[1], batch_dims[1]))
        if x is None or dims[0] != dims[1] or (widest is not None and dims[1] > widest):
            yield pid, seq, None, None, counts.tolist(), dims, 0
            return
        if not len(x):
            continue
        digest = (digest + content_digest(x, w)) & _U64
        block_rows = block_rows or block_rows_for(x.shape[1])
        for bx, bw in blocker.add(x, w, block_rows):
            yield pid, seq, bx, bw, NO_COUNTS, (bx.shape[1],) * 2, 0
            seq += 1
    for bx, bw in blocker.rest(block_rows):
        yield pid, seq, bx, bw, NO_COUNTS, (bx.shape[1],) * 2, 0
        seq += 1
    yield pid, seq, None, None, counts.tolist(), dims, digest


def make_packer(has_weight: bool, keep_missing: bool = False, widest: int | None = None):
    """The `mapInArrow` function that turns input rows into cached blocks (`pack_blocks`)."""

    def pack(batches):
        for block in pack_blocks(batches, has_weight, keep_missing, widest):
            yield block_batch(*block)

    return pack


def arrow_blocks(batches, has_weight: bool, dtype=np.float64):
    """(pid, seq, raw rows as `dtype`, weights) of each non-empty cached block (zero-copy views where
    the stored width is `dtype`'s)."""
    for batch in batches:
        ns = batch.column("n").to_numpy()
        ds = batch.column("d").to_numpy()
        pids = batch.column("pid").to_numpy()
        seqs = batch.column("seq").to_numpy()
        xs = _binary_views(batch.column("x"))
        ws = _binary_views(batch.column("w")) if has_weight else None
        for i in np.flatnonzero(ns > 0):
            raw = block_values(xs[i], int(ns[i]), int(ds[i]), dtype)
            yield int(pids[i]), int(seqs[i]), raw, (ws[i].view(np.float64) if has_weight else None)


def fold_blocks(pass_, blocks, shift: np.ndarray | None):
    """Fold `pass_` over (raw, weights) blocks in the order given; None when there are none.

    `shift` is subtracted from the raw rows; None when the blocks hold shifted rows already.
    """
    acc = None
    for raw, w in blocks:
        part = pass_.map_block(raw, shift, w)
        acc = part if acc is None else pass_.combine(acc, part)
    return acc


def _partials(table: pa.Table) -> list[tuple[int, np.ndarray]]:
    """(pid, partial) pairs of a table of PARTIAL_SCHEMA rows."""
    pids = table.column("pid").to_numpy()
    views = _binary_views(table.column("part").combine_chunks())
    return [(int(p), v.view(np.float64).copy()) for p, v in zip(pids, views)]


def combine_in_order(pass_, parts) -> np.ndarray:
    """Combine (pid, partial) pairs in partition order: the one reduction order of every engine."""
    acc = None
    for _, part in sorted(parts, key=lambda item: item[0]):
        acc = part if acc is None else pass_.combine(acc, part)
    return acc


def make_partition_fold(pass_, shift, has_weight: bool, dtype):
    """`mapInArrow` function folding `pass_` over each input partition's cached blocks in storage order
    (a task may read several): one (pid, partial) row per input partition that has rows."""

    def fold_partitions(batches):
        for pid, blocks in itertools.groupby(arrow_blocks(batches, has_weight, dtype), key=itemgetter(0)):
            acc = fold_blocks(pass_, ((raw, w) for _, _, raw, w in blocks), shift)
            if acc is not None:
                yield pa.RecordBatch.from_pydict(
                    {"pid": pa.array([pid], pa.int32()), "part": pa.array([acc.tobytes()])}
                )

    return fold_partitions


def make_float32_converter(shift: np.ndarray):
    """`mapInArrow` function turning cached blocks into float32 blocks of the shifted rows."""

    def to_float32(batches):
        for batch in batches:
            xs = _binary_views(batch.column("x"))
            ns, ds = batch.column("n").to_numpy(), batch.column("d").to_numpy()
            column = [
                (block_values(v, int(ns[i]), int(ds[i])) - shift).astype(np.float32).tobytes() if ns[i] else b""
                for i, v in enumerate(xs)
            ]
            arrays = [pa.array(column, pa.binary()) if name == "x" else batch.column(name)
                      for name in batch.schema.names]
            yield pa.RecordBatch.from_arrays(arrays, schema=batch.schema)

    return to_float32


def make_combiner(pass_):
    """`applyInArrow` function combining a group's partials in partition order (one tree level)."""

    def combine(table: pa.Table) -> pa.Table:
        acc = combine_in_order(pass_, _partials(table))
        pid = int(pc.min(table.column("pid")).as_py())
        return pa.table({"pid": pa.array([pid], pa.int32()), "part": pa.array([acc.tobytes()])})

    return combine


def tree_fanout(partitions: int, partial_bytes: int, depth: int) -> int:
    """Fan-in of each tree level, or 0 when the driver can combine all partials directly."""
    if depth < 2 or partitions * partial_bytes <= TREE_THRESHOLD_BYTES:
        return 0
    return max(2, math.ceil(partitions ** (1.0 / depth)))


def partials_at_driver(partitions: int, partial_bytes: int, depth: int) -> int:
    """How many partials of `partial_bytes` the driver receives per pass (after the tree, if any)."""
    fanout = tree_fanout(partitions, partial_bytes, depth)
    return math.ceil(partitions / fanout ** (depth - 1)) if fanout else partitions


@dataclass
class InputSummary:
    rows: int
    total_weight: float
    d: int
    shift: np.ndarray
    span: np.ndarray  # max − min of each feature over the valid rows (NaN if never observed)
    null_rows: int  # with handleInvalid='keep': rows with no finite feature
    nonfinite_rows: int
    bad_weight_rows: int
    incomplete_rows: int  # rows kept with missing values (handleInvalid='keep')
    dims: tuple[int, int]
    partitions: int
    content: str  # 16 hex digits: `content_digest` of all valid rows, whatever their order


class BlockCache:
    """The input packed into cached blocks (float64 rows, or float32 shifted rows after `store_as_float32`);
    `reduce` runs a pass over all of them."""

    def __init__(self, df: DataFrame, x_col, weight_col, aggregation_depth: int = 2, keep_missing: bool = False,
                 widest: int | None = None):
        """`widest`: the packers stop at vectors longer than this (`pack_blocks`)."""
        has_weight = weight_col is not None
        self.has_weight, self.keep_missing, self.aggregation_depth = has_weight, keep_missing, aggregation_depth
        self.widest = widest
        # The rows to pack: what a resident task packing its own partition reads (`resident_tasks`).
        self.input = df.select(*([x_col.alias("x")] + ([weight_col.alias("w")] if has_weight else [])))
        self.session = df.sparkSession
        self.shift, self.dtype, self.partitions = None, np.float64, 0

    @cached_property
    def blocks(self) -> DataFrame:
        """The packed blocks, cached; made on first use: a fit whose resident tasks pack the input
        needs them only if it hands over to the driver engine."""
        packer = make_packer(self.has_weight, self.keep_missing, self.widest)
        return self.input.mapInArrow(packer, BLOCK_SCHEMA).persist(StorageLevel.MEMORY_AND_DISK)

    def summarize(self) -> InputSummary:
        """Materialise the cache and take its summary (`adopt`)."""
        return self.adopt(self.blocks.select(*SUMMARY_COLUMNS).toArrow())

    def adopt(self, table: pa.Table) -> InputSummary:
        """Count rows, weights and invalid rows of the summary rows of all blocks (in partition and
        storage order); choose the data shift."""
        n = table.column("n").to_numpy()
        d_known = table.column("d").to_numpy()[n > 0]
        dmin, dmax = table.column("dmin").to_numpy(), table.column("dmax").to_numpy()
        seen = dmin >= 0
        dims = (int(dmin[seen].min()), int(dmax[seen].max())) if seen.any() else (-1, -1)
        d = int(d_known[0]) if len(d_known) else dims[0]
        shift, span = np.zeros(max(d, 0)), np.zeros(max(d, 0))
        if len(d_known) and dims[0] == dims[1]:
            keep = np.flatnonzero(n > 0)
            xmin = _binary_views(table.column("xmin").combine_chunks())
            xmax = _binary_views(table.column("xmax").combine_chunks())
            lo = np.fmin.reduce([xmin[i].view(np.float64) for i in keep], axis=0)  # NaN: never observed
            hi = np.fmax.reduce([xmax[i].view(np.float64) for i in keep], axis=0)
            shift, span = lo / 2 + hi / 2, hi - lo
        self.shift = shift
        self.partitions = int(table.column("pid").to_numpy().max()) + 1 if len(table) else 0
        return InputSummary(
            rows=int(n.sum()),
            total_weight=float(table.column("wsum").to_numpy().sum()),
            d=d,
            shift=shift,
            span=span,
            null_rows=int(table.column("null_rows").to_numpy().sum()),
            nonfinite_rows=int(table.column("nonfinite_rows").to_numpy().sum()),
            bad_weight_rows=int(table.column("bad_weight_rows").to_numpy().sum()),
            incomplete_rows=int(table.column("incomplete_rows").to_numpy().sum()),
            dims=dims,
            partitions=self.partitions,
            content=f"{int(table.column('digest').to_numpy().view(np.uint64).sum(dtype=np.uint64)):016x}",
        )

    def store_as_float32(self) -> None:
        """Replace the blocks with float32 values of the shifted rows (after `summarize`).

        Shifting before rounding keeps float32's 24 bits for the data's spread, not its offset, and
        the values stay a pure function of each row, so partitioning still does not matter.
        """
        converted = self.blocks.mapInArrow(make_float32_converter(self.shift), BLOCK_SCHEMA).persist(
            StorageLevel.MEMORY_AND_DISK
        )
        converted.select("n").agg(F.sum("n")).collect()  # materialise before the old blocks go
        self.blocks.unpersist()
        self.blocks, self.dtype, self.shift = converted, np.float32, None

    def reduce(self, pass_) -> np.ndarray:
        """Run `pass_` over every block, a task per slot of the moment (`pass_tasks`); the partials,
        one per input partition whatever the slots, combined in partition order (in a tree if large)."""
        tasks = pass_tasks(self.session)
        blocks = self.blocks.coalesce(tasks) if tasks else self.blocks
        parts = blocks.select("pid", "seq", "n", "d", "x", "w").mapInArrow(
            make_partition_fold(pass_, self.shift, self.has_weight, self.dtype), PARTIAL_SCHEMA
        )
        fanout = tree_fanout(self.partitions, getattr(pass_, "partial_bytes", 0), self.aggregation_depth)
        if fanout:
            width = 1
            for _ in range(self.aggregation_depth - 1):
                width *= fanout
                group = F.floor(F.col("pid") / F.lit(width))
                parts = parts.groupBy(group).applyInArrow(make_combiner(pass_), PARTIAL_SCHEMA)
        with arrow_batches_of(self.session, BLOCKS_PER_BATCH):
            table = parts.toArrow()
        return combine_in_order(pass_, _partials(table))

    def describe(self, text: str | None) -> None:
        """Name the next Spark jobs in the UI (`spark_gmm: EM iteration 3`); None clears the name."""
        try:
            context = self.session.sparkContext
        except Exception:  # Spark Connect: no job descriptions
            return
        context.setJobDescription(f"spark_gmm: {text}" if text else None)

    def unpersist(self) -> None:
        if "blocks" in vars(self):  # made
            self.blocks.unpersist()
