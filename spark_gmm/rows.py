"""Which rows can be used: the one rule, applied wherever rows are read (packing for a fit, scoring,
the report's moments). No Spark here: it works on Arrow list columns and numpy arrays.

A row's features are usable when they are present, have the expected count, and are all finite
(a null element counts as missing); a weight is usable when it is finite and non-negative. With
handleInvalid='keep' a row with some finite features is kept and the others are marked missing
(NaN), to be marginalised: `observed_rows`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _values(column: pa.Array, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (n, d) float64, NaN for null elements and in rows that are null or have other than d
    values; whole (n,): rows of d values; holes (n,): whole rows holding a null)."""
    n = len(column)
    lengths = pc.list_value_length(column).fill_null(-1).to_numpy(zero_copy_only=False)
    whole = lengths == d
    holes = np.zeros(n, bool)
    kept = int(whole.sum())
    if not kept:
        return np.full((n, d), np.nan), whole, holes
    complete = kept == n  # the usual batch: no row selection, one copy of the values buffer
    values = pc.list_flatten(column if complete else column.filter(pa.array(whole)))
    flat = values.to_numpy(zero_copy_only=False).astype(np.float64, copy=complete).reshape(kept, d)  # nulls → NaN
    if complete:
        x = flat
    else:
        x = np.full((n, d), np.nan)
        x[whole] = flat
    if values.null_count:
        holes[whole] = values.is_null().to_numpy(zero_copy_only=False).reshape(kept, d).any(axis=1)
    return x, whole, holes


def feature_rows(column: pa.Array, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (n, d) float64 with zeros in unusable rows, missing (n,), nonfinite (n,)) of an Arrow
    list column: `missing` marks rows that are null, hold a null, or have other than d values;
    `nonfinite` rows that are complete but hold NaN or ±inf."""
    x, whole, holes = _values(column, d)
    whole &= ~holes
    finite = np.isfinite(x).all(axis=1)
    nonfinite = whole & ~finite
    unusable = ~(whole & finite)
    if unusable.any():
        x[unusable] = 0.0
    return x, ~whole, nonfinite


def observed_rows(column: pa.Array, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, d) float64 with NaN for every value that is missing — null, NaN, ±inf, or in a row
    that is null or has other than d values —, observed (n, d): the finite values)."""
    x, _, _ = _values(column, d)
    observed = np.isfinite(x)
    x[~observed] = np.nan
    return x, observed


def usable_weights(w: np.ndarray) -> np.ndarray:
    """Weights that are finite and non-negative (nulls arrive as NaN)."""
    return np.isfinite(w) & (w >= 0)


def lengths_of(column: pa.Array) -> tuple[int, int]:
    """(smallest, largest) length of the non-null lists of an Arrow list column; (-1, -1) if none."""
    lengths = pc.list_value_length(column).drop_null().to_numpy(zero_copy_only=False)
    return (int(lengths.min()), int(lengths.max())) if len(lengths) else (-1, -1)


def batch_rows(batch: pa.RecordBatch, has_weight: bool, keep_missing: bool = False):
    """(x, w, [null, nonfinite, bad-weight, incomplete] counts, (dmin, dmax)) of the rows of a
    batch (features in column 0, weights in column 1) that a fit uses; x is None when the batch
    holds vectors of different lengths. Without `keep_missing` the rows with every feature usable;
    with it (handleInvalid='keep') also the rows with some finite feature, NaN marking the others
    (`incomplete` counts them), and `null` counts the rows with none."""
    dims = lengths_of(batch.column(0))
    if dims[0] != dims[1]:
        return None, None, [0, 0, 0, 0], dims
    d = max(dims[0], 0)
    if keep_missing and d:
        x, observed = observed_rows(batch.column(0), d)
        missing, nonfinite = ~observed.any(axis=1), np.zeros(len(x), bool)
        incomplete = ~missing & ~observed.all(axis=1)
    else:
        x, missing, nonfinite = feature_rows(batch.column(0), d)
        incomplete = np.zeros(len(x), bool)
    bad_weight = np.zeros(len(x), bool)
    w = None
    if has_weight:
        w = batch.column(1).to_numpy(zero_copy_only=False).astype(np.float64)
        bad_weight = ~missing & ~nonfinite & ~usable_weights(w)
    keep = ~(missing | nonfinite | bad_weight)
    counts = [int(missing.sum()), int(nonfinite.sum()), int(bad_weight.sum()), int((incomplete & keep).sum())]
    if keep.all():  # the usual batch: no copy
        return x, w, counts, dims
    return x[keep], (w[keep] if has_weight else None), counts, dims


class RowBlocker:
    """Rows arriving in batches of any size, cut into blocks of exactly `block_rows` rows (the last
    one of a partition shorter), in order, with their weights: what every packer emits."""

    def __init__(self, has_weight: bool):
        self.has_weight = has_weight
        self.xs, self.ws, self.pending = [], [], 0

    def add(self, x: np.ndarray, w: np.ndarray | None, block_rows: int):
        """Take rows x (n, d) and weights w (n,) (None without weights); yield each full block."""
        self.xs.append(x)
        if self.has_weight:
            self.ws.append(w)
        self.pending += len(x)
        if self.pending >= block_rows:
            yield from self._cut(self.pending - self.pending % block_rows, block_rows)

    def rest(self, block_rows: int):  # the rows left over: the partition's last block
        if self.pending:
            yield from self._cut(self.pending, block_rows)

    def _cut(self, stop: int, block_rows: int):
        x = np.concatenate(self.xs)
        w = np.concatenate(self.ws) if self.has_weight else None
        for start in range(0, stop, block_rows):
            end = min(start + block_rows, stop)
            yield x[start:end], (w[start:end] if self.has_weight else None)
        self.xs, self.ws = [x[stop:]], ([w[stop:]] if self.has_weight else [])
        self.pending = len(x) - stop
