"""The in-memory engine: passes folded over numpy blocks in one process.

It implements `reduce(pass) -> partial` the way the Spark engines do (blocks in order, the rows
shifted by the data's midpoint), so it is the reference they are tested against, and it fits
arrays that fit in memory without Spark.
"""

from __future__ import annotations

import numpy as np


def data_shift(x: np.ndarray) -> np.ndarray:
    """The per-feature midpoint (d,) of `x` (n, d) that the engines subtract from every row (see `blocks`)."""
    return x.min(axis=0) / 2 + x.max(axis=0) / 2


def local_reduce(x: np.ndarray, w: np.ndarray | None = None, block_rows: int = 4096, shift=None):
    """A `reduce` over `x` (n, d) with optional row weights `w` (n,), in blocks of `block_rows`
    rows; `shift` (d,) defaults to `data_shift(x)` and is kept as `reduce.shift`."""
    x = np.asarray(x, dtype=np.float64)
    shift = data_shift(x) if shift is None else np.asarray(shift, dtype=np.float64)
    starts = range(0, len(x), block_rows)

    def reduce(pass_):
        acc = None
        for start in starts:
            raw = np.ascontiguousarray(x[start : start + block_rows])
            weights = None if w is None else w[start : start + block_rows]
            part = pass_.map_block(raw, shift, weights)
            acc = part if acc is None else pass_.combine(acc, part)
        return acc

    reduce.shift = shift
    return reduce
