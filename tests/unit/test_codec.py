"""The mixture codec, mixture validation and the data digest, without Spark."""

import struct

import numpy as np
import pyarrow as pa
import pytest

from spark_gmm import blocks, codec
from spark_gmm.blocks import content_digest

SPECIAL = np.array([0.0, -0.0, 5e-324, -1.7976931348623157e308, 1e-300, np.pi, 1 / 3, 2.0**-1074, 1e7 + 0.1])


@pytest.fixture
def small_windows(monkeypatch):
    """Chunks of 7 values and windows of 20, so a small array spans many rows and tables."""
    monkeypatch.setattr(codec, "CHUNK_VALUES", 7)
    monkeypatch.setattr(codec, "WINDOW_VALUES", 20)


def assemble(tables, shapes, write_id="w1"):
    assembly = codec.Assembly(shapes, write_id, "payload", "metadata")
    for table in tables:
        assembly.add(table)
    return assembly.result()


def shuffled(tables, seed=0):
    table = pa.concat_tables(tables)
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


def test_round_trip_is_bit_exact_in_any_row_order(small_windows, rng):
    arrays = {
        "weights": np.array([0.25, 0.75]),
        "means": np.vstack([SPECIAL, -SPECIAL]),
        "covariances": rng.normal(size=(2, 9, 9)) * 1e-200,
        "empty": np.empty((0, 3)),
    }
    tables = list(codec.to_tables(arrays, "w1"))
    assert len(tables) > 5 and all(t.num_rows for t in tables)
    assert max(len(v) // 8 for t in tables for v in t.column("values").to_pylist()) == 7
    back = assemble([shuffled(tables)], {name: a.shape for name, a in arrays.items()})
    for name, array in arrays.items():
        assert back[name].shape == array.shape and back[name].dtype == np.float64
        assert back[name].tobytes() == array.tobytes(), name  # -0.0 and subnormals included


def test_values_are_little_endian_float64_in_row_major_order():
    covariances = np.arange(8.0).reshape(2, 2, 2)
    (table,) = codec.to_tables({"covariances": covariances}, "w1")
    row = table.to_pylist()[0]
    assert row["shape"] == [2, 2, 2] and row["offset"] == 0 and row["writeId"] == "w1"
    assert struct.unpack("<8d", row["values"]) == tuple(range(8))


def test_missing_repeated_or_foreign_rows_are_refused(small_windows):
    arrays = {"means": np.arange(50.0).reshape(5, 10)}
    table = pa.concat_tables(codec.to_tables(arrays, "w1"))
    shapes = {"means": (5, 10)}
    with pytest.raises(codec.PayloadError, match="values of 'means' are incomplete or repeated"):
        assemble([table.slice(1)], shapes)
    with pytest.raises(codec.PayloadError, match="incomplete or repeated"):
        assemble([table, table.slice(0, 1)], shapes)
    with pytest.raises(codec.PayloadError, match="not written by the save that wrote metadata"):
        assemble([table], shapes, write_id="w2")
    with pytest.raises(codec.PayloadError, match=r"'means' of shape \(5, 10\); expected 'means' \(10, 5\)"):
        assemble([table], {"means": (10, 5)})
    with pytest.raises(codec.PayloadError, match="incomplete"):
        assemble([], shapes)


def test_digest_tells_arrays_apart_exactly():
    a = codec.mixture_arrays(np.array([0.5, 0.5]), np.zeros((2, 2)), np.stack([np.eye(2)] * 2))
    same = {name: array.copy() for name, array in a.items()}
    assert codec.digest(a) == codec.digest(same)
    same["means"][1, 1] = np.nextafter(0.0, 1.0)
    assert codec.digest(a) != codec.digest(same)
    assert codec.digest(a) != codec.digest({**a, "means": np.zeros((1, 4))})  # same bytes, other shape


# -- checked_mixture -----------------------------------------------------------------------------


def spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return (a @ a.T + d * np.eye(d)) * scale


def test_exactly_symmetric_covariances_come_back_untouched(rng):
    covariances = np.stack([spd(rng, 4), spd(rng, 4, 1e-9)])
    _, _, checked = codec.checked_mixture([0.5, 0.5], np.zeros((2, 4)), covariances)
    assert checked is covariances


def test_round_off_asymmetry_is_accepted_and_symmetrised(rng):
    covariances = np.stack([spd(rng, 4), spd(rng, 4, 1e6)])
    nudged = covariances.copy()
    nudged[1, 0, 3] = np.nextafter(nudged[1, 0, 3], np.inf) * (1 + 1e-14)
    _, _, checked = codec.checked_mixture([0.5, 0.5], np.zeros((2, 4)), nudged)
    np.testing.assert_array_equal(checked, np.swapaxes(checked, 1, 2))
    np.testing.assert_array_equal(checked[0], covariances[0])
    assert checked[1, 0, 3] == pytest.approx((nudged[1, 0, 3] + nudged[1, 3, 0]) / 2, rel=1e-16)


def test_asymmetric_covariance_is_refused_naming_the_component(rng):
    covariances = np.stack([spd(rng, 3), spd(rng, 3)])
    covariances[1, 2, 0] += 1e-9 * np.sqrt(covariances[1, 0, 0] * covariances[1, 2, 2])
    with pytest.raises(codec.InvalidMixtureError, match=r"component 1: covariance is not symmetric \(entry \(0, 2\)"):
        codec.checked_mixture([0.5, 0.5], np.zeros((2, 3)), covariances)


def test_non_positive_definite_covariance_is_refused_naming_the_component(rng):
    line = np.array([[1.0, 1.0], [1.0, 1.0 - 1e-3]])  # symmetric, eigenvalues ≈ 2 and −5e-4
    with pytest.raises(codec.InvalidMixtureError, match=r"component 2: covariance is not positive definite \(smallest eigenvalue -0.0005"):
        codec.checked_mixture(np.ones(3), np.zeros((3, 2)), [np.eye(2), np.eye(2), line])


@pytest.mark.parametrize(
    "weights, means, message",
    [
        ([0.5, np.nan], np.zeros((2, 2)), "component 1: its weight is not finite"),
        ([0.5, 0.5], [[0.0, 0.0], [np.inf, 0.0]], "component 1: its mean is not finite"),
        ([0.5, -0.1], np.zeros((2, 2)), "non-negative with a positive sum"),
        ([0.0, 0.0], np.zeros((2, 2)), "non-negative with a positive sum"),
        ([1.0], np.zeros((2, 2)), "need 2 weights"),
    ],
)
def test_other_invalid_mixtures_are_refused(weights, means, message):
    with pytest.raises(codec.InvalidMixtureError, match=message):
        codec.checked_mixture(weights, means, [np.eye(2)] * 2)


# -- content digest of the data ------------------------------------------------------------------

MASK = (1 << 64) - 1


def reference_mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference_digest(x, w):
    """The documented digest, one Python integer at a time."""
    total = 0
    for i, row in enumerate(x):
        values = list(row) + [1.0 if w is None else w[i]]
        per_row = 0
        for j, value in enumerate(values):
            bits = struct.unpack("<Q", struct.pack("<d", value + 0.0))[0]
            per_row = (per_row + reference_mix(bits ^ reference_mix(j + 1))) & MASK
        total = (total + reference_mix(per_row)) & MASK
    return total


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_content_digest_matches_its_definition(rng, monkeypatch, compiled):
    if not compiled:
        monkeypatch.setattr(blocks, "fused", None)  # the numpy reference, as without numba
    x = rng.normal(size=(40, 3)) * 1e5
    x[[3, 9], [0, 2]] = -0.0, np.nan
    w = rng.random(40)
    w[5] = -0.0
    assert content_digest(x, w) == reference_digest(x, w)
    assert content_digest(x, None) == reference_digest(x, None) == content_digest(x, np.ones(40))
    assert content_digest(np.asfortranarray(x[::2]), w[::2]) == reference_digest(x[::2], w[::2])
    assert content_digest(np.empty((0, 3)), None) == 0


def test_content_digest_ignores_order_and_splits_but_not_content(rng):
    x = rng.normal(size=(300, 4))
    w = rng.random(300)
    whole = content_digest(x, w)
    order = rng.permutation(300)
    assert content_digest(x[order], w[order]) == whole
    assert (content_digest(x[:120], w[:120]) + content_digest(x[120:], w[120:])) & MASK == whole

    swapped = x.copy()
    swapped[[0, 1], 2] = swapped[[1, 0], 2]  # same values per column, other rows
    assert content_digest(swapped, w) != whole
    assert content_digest(x[:, [1, 0, 2, 3]], w) != whole  # same values per row, other columns
    heavier = w.copy()
    heavier[7] *= 2
    assert content_digest(x, heavier) != whole
    nudged = x.copy()
    nudged[5, 3] = np.nextafter(nudged[5, 3], np.inf)
    assert content_digest(nudged, w) != whole
    signed = np.zeros((2, 2))
    assert content_digest(-signed, None) == content_digest(signed, None)
