"""The E-step fused into one compiled pass over a block (numba): Mahalanobis terms through the
precision Cholesky factors, log-sum-exp, responsibilities and the float64 statistics, tile by tile,
without the n×k and n×d(d+1)/2 temporaries of the numpy kernels (`kernels`, the reference this is
tested against).

Rows are taken in tiles of `TILE_ROWS`, transposed so that every inner loop runs along the rows of
the tile (SIMD across rows); each tile's sums are added to the block's in tile order. Everything is
single-threaded and the order of every sum is fixed by the compiled code, so the same block gives
bit-identical statistics on the same machine, whatever the scheduling. All arithmetic is float64:
float32 blocks are widened in numpy before the call (a copy per block, a few per cent of the kernel's
time), so that each kernel has a single compiled specialisation.

Also the packing pass's content digest (`content_digest`, `blocks.content_digest` its reference):
one pass over a block's bits, where numpy needs a dozen over temporaries of the block's size.

Compiled on first use in each process, one function at a time (a fit compiles `_estep` and
`_digest`, scoring `_posterior`), and cached on disk where numba can write its cache (see
`disk_cache_usable` and docs/performance.md); otherwise compiled again in each process.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile

import numpy as np
from numba import config, njit
from numba.misc.appdirs import AppDirs

from .mixture import ComponentStatistics

#: Reassociation (vectorised sums) and fused multiply-add; no assumption about NaN or infinities.
FAST = {"reassoc", "contract", "nsz", "arcp"}
#: Rows per tile: the fastest tile, or within 5 % of it, from d=2 to d=100 (one core, k=5 and 8,
#: 400k rows); 6–21 % less time than tiles of 4096 doubles for d ≤ 16.
TILE_ROWS = 128
#: Below this, exp(x) is a subnormal or zero: returned as 0 (an absolute error under 3e-308).
EXP_FLOOR = -708.0
_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # ln 2 split in two: n·_LN2_HI is exact for every n used here
_LN2_LO = 1.9082149292705877e-10
LOG_2PI = float(np.log(2.0 * np.pi))
_NO_WEIGHTS = np.empty(0)
_U64 = np.uint64
_MIX1, _MIX2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_NEGATIVE_ZERO, _ONE = _U64(1 << 63), np.float64(1.0).view(_U64)


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _cache_root() -> str:
    """NUMBA_CACHE_DIR if set, else the user's cache directory for numba."""
    return config.CACHE_DIR or AppDirs(appname="numba", appauthor=False).user_cache_dir


def disk_cache_usable() -> bool:
    """Whether numba's cache for this module can be written: NUMBA_CACHE_DIR if set, else next to
    this file or in the user's cache directory, and only the latter when the package is imported
    from a zip (`--py-files`), where numba 0.68 fails on the first call instead of falling back."""
    if config.CACHE_DIR or ".zip" in __file__:
        return _writable(_cache_root())
    return _writable(os.path.join(os.path.dirname(__file__), "__pycache__")) or _writable(_cache_root())


def _cache_zipped_kernels_by_content() -> None:
    """Put the cache of this module, when it is imported from a zip, in a directory named by the
    module's content under `_cache_root()`.

    numba names a zipped module's cache directory by the zip's path, and Spark copies a
    `--py-files` zip into each application's own directory, so every application compiled the
    kernels again; numba also ignored NUMBA_CACHE_DIR there. numba still checks the source's
    content and the CPU before loading an entry. This uses numba's locator classes (not a public
    API): where they differ, numba's own locator stays in charge.
    """
    from numba.core import caching

    zip_locator = getattr(caching, "ZipCacheLocator", None)
    locators = getattr(getattr(caching, "CacheImpl", None), "_locator_classes", None)
    if zip_locator is None or not isinstance(locators, list):
        return

    source = __loader__.get_data(__file__)  # this module, read from the zip
    directory = os.path.join(_cache_root(), f"spark_gmm-fused-{hashlib.sha256(source).hexdigest()[:16]}")

    class ContentKeyedZipLocator(zip_locator):
        def get_cache_path(self):
            return directory

        @classmethod
        def from_function(cls, py_func, py_file):
            if ".zip" not in py_file or py_func.__module__ != __name__:
                return None
            try:
                locator = cls(py_func, py_file)
                locator.ensure_cache_path()
            except (OSError, ValueError):
                return None
            return locator

    if not any(c.__name__ == ContentKeyedZipLocator.__name__ for c in locators):
        locators.insert(0, ContentKeyedZipLocator)


CACHE = disk_cache_usable()
if CACHE and ".zip" in __file__:
    _cache_zipped_kernels_by_content()


@njit(cache=CACHE, fastmath={"contract"})  # no reassociation: it would undo the split of ln 2
def exp_nonpositive(values, m, scale, scale_bits):
    """values[:m] ← exp(values[:m]) for values ≤ 0, in loops the compiler vectorises (a polynomial
    on [-ln2/2, ln2/2] times 2ⁿ built from its bits); within 2 ulp of libm."""
    for t in range(m):
        v = max(values[t], EXP_FLOOR)
        n = math.floor(v * _LOG2E + 0.5)
        r = (v - n * _LN2_HI) - n * _LN2_LO
        p = 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        scale_bits[t] = (np.int64(n) + 1023) << 52
        values[t] = (p * r + 1.0) if values[t] >= EXP_FLOOR else 0.0
    for t in range(m):
        values[t] *= scale[t]


@njit(cache=CACHE, fastmath=FAST)
def _posterior_tile(x, shift, start, m, consts, means, prec, diagonal, xt, diff, y, maha, top, total, joint, scale):
    """Rows start..start+m of `x` minus `shift` into the tile: xt (d, m) float64, then joint (k, m)
    ← their responsibilities, total[:m] ← log p(x) per row."""
    d = x.shape[1]
    k = means.shape[0]
    for t in range(m):
        for a in range(d):
            xt[a, t] = x[start + t, a] - shift[a]
    for j in range(k):
        for a in range(d):
            mu = means[j, a]
            for t in range(m):
                diff[a, t] = xt[a, t] - mu
        for t in range(m):
            maha[t] = 0.0
        for e in range(d):
            if diagonal:  # the same sums as below, without the zero terms
                p = prec[j, e, e]
                for t in range(m):
                    y[t] = diff[e, t] * p
            else:
                for t in range(m):
                    y[t] = 0.0
                a = 0
                while a + 3 <= e:  # four terms per sweep of y: fewer loads and stores per product
                    p0, p1, p2, p3 = prec[j, a, e], prec[j, a + 1, e], prec[j, a + 2, e], prec[j, a + 3, e]
                    for t in range(m):
                        y[t] += diff[a, t] * p0 + diff[a + 1, t] * p1 + diff[a + 2, t] * p2 + diff[a + 3, t] * p3
                    a += 4
                for a in range(a, e + 1):
                    p = prec[j, a, e]
                    for t in range(m):
                        y[t] += diff[a, t] * p
            for t in range(m):
                maha[t] += y[t] * y[t]
        c = consts[j]
        for t in range(m):
            joint[j, t] = c - 0.5 * maha[t]
    for t in range(m):
        top[t] = joint[0, t]
    for j in range(1, k):
        for t in range(m):
            top[t] = max(top[t], joint[j, t])
    for t in range(m):
        total[t] = 0.0
    for j in range(k):
        for t in range(m):
            joint[j, t] -= top[t]
        exp_nonpositive(joint[j], m, scale, scale.view(np.int64))
        for t in range(m):
            total[t] += joint[j, t]
    for j in range(k):
        for t in range(m):
            joint[j, t] /= total[t]
    for t in range(m):
        total[t] = top[t] + math.log(total[t])


@njit(cache=CACHE, fastmath=FAST)
def _estep(x, shift, w, consts, means, prec, diagonal, diagonal_moments, tile, out):
    """Adds the `ComponentStatistics` of the rows `x` minus `shift` (flat, second moments around
    `means`; with `diagonal_moments` only their diagonal) to `out`; `w` is the row weights, or
    empty for unit weights."""
    n, d = x.shape
    k = means.shape[0]
    p = d * (d + 1) // 2
    xt, diff, y, maha, top, total, joint, scale = (
        np.empty((d, tile)), np.empty((d, tile)), np.empty(tile), np.empty(tile), np.empty(tile),
        np.empty(tile), np.empty((k, tile)), np.empty(tile),
    )
    gd = np.empty((d, tile))
    best = np.empty(tile, np.int64)
    weighted = w.shape[0] > 0
    for start in range(0, n, tile):
        m = min(tile, n - start)
        _posterior_tile(x, shift, start, m, consts, means, prec, diagonal, xt, diff, y, maha, top, total, joint, scale)
        ll = 0.0
        for t in range(m):
            ll += (w[start + t] * total[t]) if weighted else total[t]
        out[0] += ll
        for t in range(m):  # the first most probable component, as numpy's argmax
            best[t] = 0
            top[t] = joint[0, t]
        for j in range(1, k):
            for t in range(m):
                if joint[j, t] > top[t]:
                    top[t] = joint[j, t]
                    best[t] = j
        for t in range(m):
            out[1 + k + best[t]] += 1.0
        for j in range(k):
            if weighted:
                for t in range(m):
                    y[t] = joint[j, t] * w[start + t]
            else:
                for t in range(m):
                    y[t] = joint[j, t]
            mass = 0.0
            for t in range(m):
                mass += y[t]
            out[1 + j] += mass
            first = 1 + 2 * k + j * d
            second = 1 + 2 * k + k * d + j * p
            if diagonal_moments:  # both sums in one sweep, no temporaries
                for a in range(d):
                    mu = means[j, a]
                    s1 = s2 = 0.0
                    for t in range(m):
                        g = y[t] * (xt[a, t] - mu)
                        s1 += g
                        s2 += g * (xt[a, t] - mu)
                    out[first + a] += s1
                    out[second + a * d - a * (a - 1) // 2] += s2  # (a, a) in the packed upper triangle
                continue
            for a in range(d):
                mu = means[j, a]
                s = 0.0
                for t in range(m):
                    diff[a, t] = xt[a, t] - mu
                    gd[a, t] = y[t] * diff[a, t]
                    s += gd[a, t]
                out[first + a] += s
            for a in range(d):
                b = a
                while b + 4 <= d:  # four sums per sweep of gd[a]
                    s0 = s1 = s2 = s3 = 0.0
                    for t in range(m):
                        g = gd[a, t]
                        s0 += g * diff[b, t]
                        s1 += g * diff[b + 1, t]
                        s2 += g * diff[b + 2, t]
                        s3 += g * diff[b + 3, t]
                    out[second] += s0
                    out[second + 1] += s1
                    out[second + 2] += s2
                    out[second + 3] += s3
                    second += 4
                    b += 4
                for b in range(b, d):
                    s = 0.0
                    for t in range(m):
                        s += gd[a, t] * diff[b, t]
                    out[second] += s
                    second += 1


@njit(cache=CACHE, fastmath=FAST)
def _posterior(x, shift, consts, means, prec, diagonal, tile, log_density, resp):
    """log_density (n,) ← log p(x − shift) per row, resp (n, k) ← the responsibilities."""
    n, d = x.shape
    k = means.shape[0]
    xt, diff, y, maha, top, total, joint, scale = (
        np.empty((d, tile)), np.empty((d, tile)), np.empty(tile), np.empty(tile), np.empty(tile),
        np.empty(tile), np.empty((k, tile)), np.empty(tile),
    )
    for start in range(0, n, tile):
        m = min(tile, n - start)
        _posterior_tile(x, shift, start, m, consts, means, prec, diagonal, xt, diff, y, maha, top, total, joint, scale)
        for t in range(m):
            log_density[start + t] = total[t]
            for j in range(k):
                resp[start + t, j] = joint[j, t]


@njit(cache=CACHE)
def _mix64(h):
    h = (h ^ (h >> _U64(30))) * _MIX1
    h = (h ^ (h >> _U64(27))) * _MIX2
    return h ^ (h >> _U64(31))


@njit(cache=CACHE)
def _hashed(bits, salt):
    return _mix64((_U64(0) if bits == _NEGATIVE_ZERO else bits) ^ salt)


@njit(cache=CACHE)
def _digest(bits, weight_bits):
    """Σ_i mix64(Σ_j mix64(bits_ij ^ salt_j) + mix64(bits of w_i ^ salt_d)) mod 2⁶⁴, salt_j =
    mix64(j + 1), -0.0 taken as 0.0; empty `weight_bits` means weights of 1."""
    n, d = bits.shape
    salts = np.empty(d + 1, dtype=_U64)
    for j in range(d + 1):
        salts[j] = _mix64(_U64(j + 1))
    total = _U64(0)
    for i in range(n):
        per_row = _hashed(weight_bits[i] if weight_bits.size else _ONE, salts[d])
        for j in range(d):
            per_row += _hashed(bits[i, j], salts[j])
        total += _mix64(per_row)
    return total


def content_digest(x: np.ndarray, w) -> int:
    """`blocks.content_digest` (its definition and numpy reference) of the rows x (n, d) and weights
    w (n,) or None, in one compiled pass."""
    weights = _NO_WEIGHTS if w is None else np.ascontiguousarray(w, dtype=np.float64)
    return int(_digest(np.ascontiguousarray(x, dtype=np.float64).view(_U64), weights.view(_U64)))


def _parameters(mixture):
    """(constants log π_j + log|P_j| − d/2·log 2π, means, precision factors, whether all factors
    are diagonal) of a `Mixture`, as the compiled loops take them."""
    prec = np.ascontiguousarray(mixture.precisions_cholesky, dtype=np.float64)
    log_det = np.log(np.diagonal(prec, axis1=1, axis2=2)).sum(axis=1)
    consts = np.log(mixture.weights) + log_det - 0.5 * mixture.d * LOG_2PI
    diagonal = not np.triu(prec, 1).any()
    return consts, np.ascontiguousarray(mixture.means, dtype=np.float64), prec, diagonal


def statistics(raw: np.ndarray, shift, w, mixture, diagonal_moments: bool = False) -> np.ndarray:
    """Flat `ComponentStatistics` of the rows raw (n, d) float32 or float64 minus `shift` (d,), or
    of raw itself for shift None, with weights w (or None), second moments around the mixture's
    means (only their diagonal with `diagonal_moments`). The shift is subtracted tile by tile: no
    shifted copy of the block."""
    out = np.zeros(ComponentStatistics.size(mixture.k, mixture.d))
    weights = _NO_WEIGHTS if w is None else np.ascontiguousarray(w, dtype=np.float64)
    shift = np.zeros(mixture.d) if shift is None else np.ascontiguousarray(shift, dtype=np.float64)
    _estep(np.ascontiguousarray(raw, dtype=np.float64), shift, weights, *_parameters(mixture), diagonal_moments,
           TILE_ROWS, out)
    return out


def posterior(x: np.ndarray, mixture) -> tuple[np.ndarray, np.ndarray]:
    """(log p(x) (n,), responsibilities (n, k)) of the rows x (n, d)."""
    log_density, resp = np.empty(x.shape[0]), np.empty((x.shape[0], mixture.k))
    _posterior(np.ascontiguousarray(x, dtype=np.float64), np.zeros(mixture.d), *_parameters(mixture), TILE_ROWS,
               log_density, resp)
    return log_density, resp
