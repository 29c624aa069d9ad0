"""Per-block work of every data pass, in plain numpy (no Spark).

A *pass* is an object with `map_block(raw, shift, w) -> np.ndarray` and `combine(a, b)`: the engine
maps each cached block (raw rows (n, d) float64 or float32; the data shift (d,) to subtract from
them, or None where the blocks hold shifted rows; the row weights (n,) float64 or None) to a flat
float64 partial, and combines partials in a fixed order — blocks in storage order, then partitions
by index — so a result never depends on scheduling, and a retried task changes nothing. Passes are
pickled into the Spark closure, so they hold only numpy arrays and plain values.

The E-step and scoring run the compiled, fused kernel (`fused`, numba) by default; the numpy
functions here are the reference it is tested against, and the fallback, with a warning, in an
interpreter without numba (e.g. executors whose Python lacks it).
"""

from __future__ import annotations

import warnings

import numpy as np

from .mixture import ComponentStatistics, Mixture, packed_size

try:
    from . import fused
except ImportError as missing:  # numba is a dependency: only a broken environment lands here
    fused = None
    warnings.warn(
        f"numba cannot be imported ({missing}): spark_gmm runs its slower numpy kernels in this "
        "Python; install numba in it (pip install numba)",
        RuntimeWarning,
        stacklevel=2,
    )

LOG_2PI = float(np.log(2.0 * np.pi))

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


def mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser of each uint64 of `h`: a bijection in which every output bit depends
    on every input bit (uint64 arithmetic wraps, as the hash needs)."""
    h = (h ^ (h >> _U64(30))) * _MIX1
    h = (h ^ (h >> _U64(27))) * _MIX2
    return h ^ (h >> _U64(31))


def _splitmix(h: np.ndarray) -> np.ndarray:
    """splitmix64 (golden-ratio step, then its finaliser) of each uint64 of `h` (n,)."""
    return mix64(h + _GOLDEN)


def row_uniforms(raw: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """A uniform [0, 1) number per row of `raw` (n, d), float64 or float32: (n,) float64, a pure
    function of (row values, seed, stream).

    Sampling by these instead of by a per-partition RNG makes initialisation independent of how
    the rows are partitioned or ordered.
    """
    with np.errstate(over="ignore"):
        unsigned = np.uint64 if raw.dtype.itemsize == 8 else np.uint32
        folded = raw + raw.dtype.type(0)  # folds -0.0 into 0.0
        bits = np.ascontiguousarray(folded).view(unsigned).astype(_U64, copy=False)
        h = _splitmix(np.full(raw.shape[0], (seed * 1_000_003 + stream) & (2**64 - 1), dtype=_U64))
        for j in range(raw.shape[1]):
            h = _splitmix(h ^ bits[:, j])
    return (h >> _U64(11)).astype(np.float64) * 2.0**-53


#: Most doubles of the (components·d × rows) Mahalanobis temporary; more components go in chunks.
TEMPORARY_DOUBLES = 1 << 21
#: Second moments are accumulated around the shift (one product for all components, fastest up to
#: about this many features) only while ‖μ_j‖² / λ_min(Σ_j) stays below CANCELLATION_LIMIT, i.e.
#: while the cancellation costs under ~1e-10 relative (float32 blocks: FLOAT32_CANCELLATION_LIMIT,
#: ~1e-4 of σ²); otherwise around each component's mean.
SHIFTED_MOMENTS_MAX_D = 24
CANCELLATION_LIMIT = 1e6
FLOAT32_CANCELLATION_LIMIT = 1e3


def log_gaussian_density(x: np.ndarray, mixture: Mixture) -> np.ndarray:
    """(n, k) log N(x_i | μ_j, Σ_j) of the shifted rows `x` (n, d), float64 or float32, under the
    k components of `mixture`, through the precision Cholesky factors P_j (k, d, d).

    ‖(x − μ_j)P_j‖² for several components comes from one matrix product [P_1 … P_c]ᵀxᵀ − [μ_1P_1 …]ᵀ;
    x is already shifted near the data, so the subtraction loses nothing that matters. Work is laid
    out components × rows, so every later reduction over components runs along whole rows.
    """
    n, d = x.shape
    k = mixture.k
    stacked = np.swapaxes(mixture.precisions_cholesky, 1, 2).reshape(k * d, d).astype(x.dtype)
    offsets = np.einsum("jd,jde->je", mixture.means, mixture.precisions_cholesky).ravel().astype(x.dtype)
    maha = np.empty((k, n))
    step = max(1, TEMPORARY_DOUBLES // max(n * d, 1))
    for start in range(0, k, step):
        stop = min(k, start + step)
        y = stacked[start * d : stop * d] @ x.T
        y -= offsets[start * d : stop * d, None]
        y *= y
        maha[start:stop] = y.reshape(stop - start, d, n).sum(axis=1)
    log_det = np.log(np.diagonal(mixture.precisions_cholesky, axis1=1, axis2=2)).sum(axis=1)
    return (log_det[:, None] - 0.5 * (d * LOG_2PI + maha)).T


def normalize_log(a: np.ndarray):
    """(log Σ_j exp a_ij (n,), exp(a_ij) / Σ_j exp a_ij (n, k)) of `a` (n, k), stable for any magnitude."""
    top = a.max(axis=1, keepdims=True)
    e = np.exp(a - top)
    total = e.sum(axis=1, keepdims=True)
    e /= total
    return (top + np.log(total))[:, 0], e


def shifted(raw: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
    """The rows `raw` (n, d) minus the data `shift` (d,); `raw` itself for shift None."""
    return raw if shift is None else raw - shift


def posterior(x: np.ndarray, mixture: Mixture) -> tuple[np.ndarray, np.ndarray]:
    """(log p(x_i) (n,), responsibilities (n, k)) of the rows x (n, d) in the mixture's coordinates:
    what scoring reports."""
    if fused is None:
        return normalize_log(weighted_log_joint(x, mixture))
    return fused.posterior(x, mixture)


def weighted_log_joint(x: np.ndarray, mixture: Mixture) -> np.ndarray:
    """(n, k) log π_j + log N(x_i | μ_j, Σ_j) of the shifted rows `x` (n, d)."""
    return log_gaussian_density(x, mixture) + np.log(mixture.weights)


def packed_outer(x: np.ndarray) -> np.ndarray:
    """(d(d+1)/2, n): each row's outer product xxᵀ of `x` (n, d), upper triangle packed row by row,
    one column a row."""
    n, d = x.shape
    xt = np.ascontiguousarray(x.T)
    out = np.empty((packed_size(d), n))
    start = 0
    for a in range(d):
        np.multiply(xt[a], xt[a:], out=out[start : start + d - a])
        start += d - a
    return out


def moment_statistics(x, w, resp, centers, log_likelihood: float, around_centers=True, diagonal=False) -> np.ndarray:
    """Flat `ComponentStatistics` (`ComponentStatistics.size(k, d)`,) of the shifted rows `x` (n, d)
    with weights `w` (n,) or None and responsibilities `resp` (n, k), second moments centred on
    `centers` (k, d); with `diagonal`, only their diagonal (the rest zero, see `DIAGONAL_TYPES`).

    With `around_centers`, Σγ(x−c)(x−c)ᵀ is formed from √γ-scaled centred rows, one symmetric
    product per component. Otherwise Σγxxᵀ for all components comes from one product with the
    rows' packed outer products, then is moved onto the centres: faster for small d, exact enough
    while the centres are near the shift (see `CANCELLATION_LIMIT`).
    """
    n, d = x.shape
    k = centers.shape[0]
    weighted = resp if w is None else resp * w[:, None]
    mass = weighted.sum(axis=0)
    raw_first = weighted.T @ x
    rows, cols = np.triu_indices(d)
    if diagonal:
        second = np.zeros((k, packed_size(d)))
        second[:, rows == cols] = [weighted[:, j] @ (x - centers[j]) ** 2 for j in range(k)]
    elif around_centers:
        root = np.sqrt(weighted)
        second = np.empty((k, packed_size(d)))
        for j in range(k):
            scaled = x - centers[j]
            scaled *= root[:, j : j + 1]
            second[j] = (scaled.T @ scaled)[rows, cols]
    else:
        second = (packed_outer(x) @ weighted.astype(x.dtype, copy=False)).T.astype(np.float64)
        second -= raw_first[:, rows] * centers[:, cols] + centers[:, rows] * raw_first[:, cols]
        second += mass[:, None] * centers[:, rows] * centers[:, cols]
    first = raw_first - mass[:, None] * centers
    hard = np.bincount(resp.argmax(axis=1), minlength=k) if n else np.zeros(k)
    return np.concatenate([[log_likelihood], mass, hard, first.ravel(), second.ravel()])


class SumPass:
    """A pass whose block partials add up."""

    def combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a + b, two partials of the same shape, summed into `a`."""
        a += b
        return a


class ConcatPass:
    """Several passes in one pass over the data: each block's partials side by side, after their
    lengths, so that candidates fitted together share the pass."""

    label = "passes together"

    def __init__(self, passes: list):
        self.passes = passes
        self.partial_bytes = sum(getattr(p, "partial_bytes", 0) for p in passes)

    @staticmethod
    def _join(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.array([float(len(p)) for p in parts])] + list(parts))

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        n = len(self.passes)
        out, start = [], n
        for length in flat[:n].astype(np.int64):
            out.append(flat[start : start + length])
            start += length
        return out

    def map_block(self, raw, shift, w):
        return self._join([p.map_block(raw, shift, w) for p in self.passes])

    def combine(self, a, b):
        return self._join([p.combine(pa, pb) for p, pa, pb in zip(self.passes, self.split(a), self.split(b))])


class EStepPass(SumPass):
    """E-step statistics of several candidate mixtures in one pass (concatenated, in order)."""

    label = "E-step"

    def __init__(self, mixtures: list[Mixture], diagonal: list[bool] | None = None):
        self.mixtures = mixtures
        self.diagonal = diagonal or [False] * len(mixtures)  # per mixture: only diagonal second moments
        self.offsets = [  # how far each mixture's means sit from the shift, in its narrowest σ²
            float(((m.means**2).sum(axis=1) / np.linalg.eigvalsh(m.covariances)[:, 0]).max())
            for m in mixtures
        ]
        self.partial_bytes = 8 * sum(ComponentStatistics.size(m.k, m.d) for m in mixtures)

    def map_block(self, raw, shift, w):
        if fused is None:
            return self.reference_statistics(shifted(raw, shift), w)
        pairs = zip(self.mixtures, self.diagonal)
        return np.concatenate([fused.statistics(raw, shift, w, m, diagonal) for m, diagonal in pairs])

    def reference_statistics(self, x, w):
        """The same statistics from the numpy kernels (the reference of `fused`)."""
        parts = []
        limit = CANCELLATION_LIMIT if x.dtype == np.float64 else FLOAT32_CANCELLATION_LIMIT
        for mixture, offset, diagonal in zip(self.mixtures, self.offsets, self.diagonal):
            around_centers = mixture.d > SHIFTED_MOMENTS_MAX_D or offset > limit
            log_norm, resp = normalize_log(weighted_log_joint(x, mixture))
            ll = float(log_norm.sum() if w is None else w @ log_norm)
            parts.append(moment_statistics(x, w, resp, mixture.means, ll, around_centers, diagonal))
        return np.concatenate(parts)

    def split(self, flat: np.ndarray) -> list[ComponentStatistics]:
        out, start = [], 0
        for m in self.mixtures:
            size = ComponentStatistics.size(m.k, m.d)
            out.append(ComponentStatistics.unpack(flat[start : start + size], m.k, m.d))
            start += size
        return out


def nearest(x: np.ndarray, centers: np.ndarray):
    """(index (n,) int64, squared distance (n,)): each row of `x` (n, d)'s nearest of the
    `centers` (k, d), and how far it is."""
    best = np.full(x.shape[0], np.inf)
    index = np.zeros(x.shape[0], dtype=np.int64)
    for j, c in enumerate(centers):
        dist = ((x - c) ** 2).sum(axis=1)
        closer = dist < best
        best[closer] = dist[closer]
        index[closer] = j
    return index, best


class CentersPass(SumPass):
    """A pass around `centers` (k, d): the k-means steps of the initialisation."""

    def __init__(self, centers: np.ndarray):
        self.centers = centers


class HardAssignmentPass(CentersPass):
    """Statistics of a hard assignment of rows to their nearest of `centers` (k, d), to start EM
    from k-means: a flat `ComponentStatistics` partial."""

    label = "assignment to the k-means centres"

    def map_block(self, raw, shift, w):
        x = shifted(raw, shift)
        index, _ = nearest(x, self.centers)
        resp = np.eye(len(self.centers))[index]  # one-hot rows
        return moment_statistics(x, w, resp, self.centers, 0.0)


class LloydPass(CentersPass):
    """One Lloyd step over all rows from `centers` (k, d): [Σw·min‖x − c‖², Σw per centre (k),
    Σw·x per centre (k·d), Σw·x (d), Σw·x² (d)]. The last two give the data's variance, the scale
    of the stopping test."""

    label = "Lloyd's k-means step"

    def map_block(self, raw, shift, w):
        x = shifted(raw, shift)
        index, dist = nearest(x, self.centers)
        k, d = self.centers.shape
        weights = np.ones(x.shape[0]) if w is None else w
        mass = np.bincount(index, weights=weights, minlength=k)
        sums = np.zeros((k, d))
        for j in range(d):  # per feature: bincount is a fast grouped sum
            sums[:, j] = np.bincount(index, weights=weights * x[:, j], minlength=k)
        xw = x * weights[:, None]
        total, squares = xw.sum(axis=0), (xw * x).sum(axis=0)
        return np.concatenate([[weights @ dist], mass, sums.ravel(), total, squares]).astype(np.float64)

    def split(self, flat: np.ndarray):
        """(cost, mass (k,), sums (k, d), variance of each feature (d,))."""
        k, d = self.centers.shape
        cost, mass, sums, total, squares = np.split(flat, np.cumsum([1, k, k * d, d]))
        weight = mass.sum()
        variance = squares / weight - (total / weight) ** 2
        return float(cost[0]), mass, sums.reshape(k, d), variance


class CostPass(CentersPass):
    """Σ w·min_j ‖x − c_j‖² over `centers` (c, d), the k-means|| potential φ: a (1,) partial."""

    label = "k-means|| cost"

    def map_block(self, raw, shift, w):
        _, dist = nearest(shifted(raw, shift), self.centers)
        return np.array([dist.sum() if w is None else w @ dist])


class ClosestWeightPass(CentersPass):
    """Weight of the rows closest to each of `centers` (c, d), to weigh k-means|| candidates: (c,)."""

    label = "k-means|| candidate weights"

    def map_block(self, raw, shift, w):
        index, _ = nearest(shifted(raw, shift), self.centers)
        return np.bincount(index, weights=w, minlength=len(self.centers)).astype(np.float64)


class RowsPass:
    """Passes that return rows: partials are flat (m, 1 + d) arrays of [uniform, shifted row]."""

    def __init__(self, d: int):
        self.width = d + 1

    def rows(self, flat: np.ndarray) -> np.ndarray:
        return flat.reshape(-1, self.width)


class SamplePass(RowsPass):
    """k-means|| sampling round around `centers` (c, d): keep each row with probability
    min(1, ℓ·w·d²(x)/φ); partials are (m, 1 + d) rows (see `RowsPass`)."""

    label = "k-means|| sampling"

    def __init__(self, centers, cost: float, oversampling: float, seed: int, stream: int):
        super().__init__(centers.shape[1])
        self.centers, self.cost, self.oversampling = centers, cost, oversampling
        self.seed, self.stream = seed, stream

    def map_block(self, raw, shift, w):
        x = shifted(raw, shift)
        _, dist = nearest(x, self.centers)
        weighted = dist if w is None else w * dist
        u = row_uniforms(raw, self.seed, self.stream)
        keep = u * self.cost < self.oversampling * weighted
        return np.column_stack([u[keep], x[keep]]).ravel()

    def combine(self, a, b):
        return np.concatenate([a, b])


class SmallestUniformPass(RowsPass):
    """The `count` distinct rows with the smallest per-row uniform (a partition-free random choice)."""

    label = "random rows"

    def __init__(self, d: int, count: int, seed: int, stream: int):
        super().__init__(d)
        self.count, self.seed, self.stream = count, seed, stream

    def map_block(self, raw, shift, w):
        u = row_uniforms(raw, self.seed, self.stream)
        if w is not None:
            u = np.where(w > 0, u, np.inf)
        # Copies of a row share its uniform: one per uniform, so duplicates cannot crowd out rows.
        _, first = np.unique(u, return_index=True)
        take = first[: self.count]
        take = take[np.isfinite(u[take])]
        return self._distinct(np.column_stack([u[take], shifted(raw[take], shift)]))

    def combine(self, a, b):
        return self._distinct(np.concatenate([self.rows(a), self.rows(b)]))

    def _distinct(self, rows: np.ndarray) -> np.ndarray:
        rows = np.unique(rows, axis=0)  # sorted by uniform, then by value: order-independent
        return rows[: self.count].ravel()
