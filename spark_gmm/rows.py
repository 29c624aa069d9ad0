"""Which rows can be used: the one rule, applied wherever rows are read (packing for a fit, scoring,
the report's moments). No Spark here: it works on Arrow list columns and numpy arrays.

A row's features are usable when they are present, have the expected count, and are all finite
(a null element counts as missing); a weight is usable when it is finite and non-negative.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def feature_rows(column: pa.Array, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (n, d) float64 with zeros in unusable rows, missing (n,), nonfinite (n,)) of an Arrow
    list column: `missing` marks rows that are null, hold a null, or have other than d values;
    `nonfinite` rows that are complete but hold NaN or ±inf."""
    n = len(column)
    lengths = pc.list_value_length(column).fill_null(-1).to_numpy(zero_copy_only=False)
    whole = lengths == d
    x = np.zeros((n, d))
    if whole.any():
        values = pc.list_flatten(column.filter(pa.array(whole)))
        flat = values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)  # nulls → NaN
        x[whole] = flat.reshape(-1, d) if d else np.empty((int(whole.sum()), 0))
        holes = np.zeros(n, bool)
        if values.null_count:
            holes[np.flatnonzero(whole)] = values.is_null().to_numpy(zero_copy_only=False).reshape(-1, d).any(axis=1)
        whole &= ~holes
    finite = np.isfinite(x).all(axis=1)
    nonfinite = whole & ~finite
    x[~(whole & finite)] = 0.0
    return x, ~whole, nonfinite


def usable_weights(w: np.ndarray) -> np.ndarray:
    """Weights that are finite and non-negative (nulls arrive as NaN)."""
    return np.isfinite(w) & (w >= 0)


def lengths_of(column: pa.Array) -> tuple[int, int]:
    """(smallest, largest) length of the non-null lists of an Arrow list column; (-1, -1) if none."""
    lengths = pc.list_value_length(column).drop_null().to_numpy(zero_copy_only=False)
    return (int(lengths.min()), int(lengths.max())) if len(lengths) else (-1, -1)
