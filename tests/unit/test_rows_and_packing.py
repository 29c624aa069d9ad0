"""The row rule and the packing of rows into blocks, without Spark (Arrow batches in, blocks out)."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from spark_gmm import blocks
from spark_gmm.rows import feature_rows, usable_weights


def test_the_row_rule():
    column = pa.array([[1.0, 2.0], None, [1.0, None], [np.nan, 0.0], [1.0, 2.0, 3.0], [np.inf, 1.0], [3.0, 4.0]],
                      type=pa.list_(pa.float64()))
    x, missing, nonfinite = feature_rows(column, 2)
    assert missing.tolist() == [False, True, True, False, True, False, False]
    assert nonfinite.tolist() == [False, False, False, True, False, True, False]
    np.testing.assert_array_equal(x[[0, 6]], [[1.0, 2.0], [3.0, 4.0]])
    assert np.isfinite(x).all()  # unusable rows are zeros, never NaN
    assert usable_weights(np.array([1.0, 0.0, -1.0, np.nan, np.inf])).tolist() == [True, True, False, False, False]


def test_the_scoring_udf_input_follows_the_same_rule():
    features = pd.Series([np.array([1.0, 2.0]), None, np.array([np.nan, 1.0]), np.array([1.0, 2.0, 3.0])])
    _, missing, nonfinite = feature_rows(pa.array(features, type=pa.list_(pa.float64())), 2)
    assert (missing | nonfinite).tolist() == [False, True, True, True]


def batch(rows, weights=None):
    columns = {"x": pa.array(rows, type=pa.list_(pa.float64()))}
    if weights is not None:
        columns["w"] = pa.array(weights, type=pa.float64())
    return pa.RecordBatch.from_pydict(columns)


def unpack(out):
    table = pa.Table.from_batches(list(out))
    blocks_ = [(int(n), np.frombuffer(x, np.float64).reshape(n, -1) if n else None)
               for n, x in zip(table.column("n").to_pylist(), table.column("x").to_pylist())]
    return table, blocks_


@pytest.fixture(autouse=True)
def one_partition(monkeypatch):
    monkeypatch.setattr(blocks, "partition_id", lambda: 3)


def test_packing_keeps_valid_rows_in_order_and_counts_the_others(monkeypatch):
    monkeypatch.setattr(blocks, "block_rows_for", lambda d: 4)
    rng = np.random.default_rng(0)
    good = rng.normal(size=(10, 2))
    rows = [good[i].tolist() for i in range(5)] + [None, [1.0, np.nan]] + [good[i].tolist() for i in range(5, 10)]
    weights = [1.0] * 5 + [1.0, 1.0] + [2.0, -1.0, 2.0, 2.0, 2.0]
    table, packed = unpack(blocks.make_packer(True)([batch(rows[:6], weights[:6]), batch(rows[6:], weights[6:])]))
    sizes = [n for n, _ in packed if n]
    assert sizes == [4, 4, 1]  # full blocks of block_rows, then the rest
    kept = np.vstack([x for n, x in packed if n])
    np.testing.assert_array_equal(kept, np.delete(good, 6, axis=0))  # row 6 has weight -1
    assert table.column("pid").to_pylist() == [3] * len(packed)
    assert table.column("seq").to_pylist() == list(range(len(packed)))
    counts = table.slice(len(packed) - 1)
    assert counts.column("null_rows")[0].as_py() == 1
    assert counts.column("nonfinite_rows")[0].as_py() == 1
    assert counts.column("bad_weight_rows")[0].as_py() == 1
    assert sum(table.column("wsum").to_pylist()) == 5 * 1.0 + 4 * 2.0


def test_packing_reports_vectors_of_different_lengths():
    table, packed = unpack(blocks.make_packer(False)([batch([[1.0, 2.0], [1.0, 2.0, 3.0]])]))
    assert table.column("dmin").to_pylist()[-1] == 2 and table.column("dmax").to_pylist()[-1] == 3
    assert all(n == 0 for n, _ in packed)


def test_packing_stops_at_the_first_batch_wider_than_the_driver_allows():
    read = []

    def batches():
        for i in range(3):
            read.append(i)
            yield batch([[float(i)] * 5] * 4)

    table, packed = unpack(blocks.make_packer(False, widest=4)(batches()))
    assert read == [0]  # the rest of the partition is never read
    assert table.column("dmax").to_pylist() == [5] and packed == [(0, None)]
    table = pa.Table.from_batches(list(blocks.make_packer(False, widest=5)(batches())))
    assert read == [0, 0, 1, 2] and sum(table.column("n").to_pylist()) == 12


def test_the_widest_fit_is_the_last_width_the_driver_memory_check_accepts():
    from spark_gmm import fitting
    from spark_gmm.exceptions import InvalidInputError

    for k, have in [(2, 8 << 30), (10, 1 << 30), (1, 123_456_789)]:
        widest = fitting._widest(k, have)
        assert widest > 0
        fitting._check_width(k, widest, have)
        with pytest.raises(InvalidInputError, match=f"^k={k} components × d={widest + 1} features need about"):
            fitting._check_width(k, widest + 1, have)
    assert fitting._widest(3, 0) == 0


def test_the_content_digest_ignores_how_rows_are_batched():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(50, 3)).tolist()
    whole, _ = unpack(blocks.make_packer(False)([batch(rows)]))
    split, _ = unpack(blocks.make_packer(False)([batch(rows[:17]), batch(rows[17:40]), batch(rows[40:])]))
    assert whole.column("digest").to_pylist()[-1] == split.column("digest").to_pylist()[-1] != 0


def test_blocks_of_float32_numbers_are_cached_in_half_the_bytes_and_read_back_unchanged(monkeypatch):
    monkeypatch.setattr(blocks, "block_rows_for", lambda d: 4)
    rng = np.random.default_rng(3)
    exact = rng.normal(size=(4, 3)).astype(np.float32).astype(np.float64)  # float32 numbers
    exact[0, 0] = float(np.float32(1e-40))  # a float32 subnormal: still exact
    inexact = exact.copy()
    inexact[2, 1] += 1e-12  # one value needs float64
    table = pa.Table.from_batches(list(blocks.make_packer(False)([batch(np.vstack([exact, inexact]).tolist())])))
    sizes = [len(x) for x, n in zip(table.column("x").to_pylist(), table.column("n").to_pylist()) if n]
    assert sizes == [4 * 12, 8 * 12]
    read = [raw for _, _, raw, _ in blocks.arrow_blocks(table.to_batches(), False)]
    assert all(raw.dtype == np.float64 for raw in read)
    np.testing.assert_array_equal(read[0], exact)
    np.testing.assert_array_equal(read[1], inexact)
    # A cache narrowed to float32 (dtype="float32") holds shifted rows, read as float32.
    shift = np.array([0.5, -1.0, 2.0])
    narrowed = pa.Table.from_batches(list(blocks.make_float32_converter(shift)(table.to_batches())))
    read = [raw for _, _, raw, _ in blocks.arrow_blocks(narrowed.to_batches(), False, np.float32)]
    np.testing.assert_array_equal(read[1], (inexact - shift).astype(np.float32))


def test_a_packing_tasks_summary_is_the_cached_blocks_summary_and_survives_its_message(monkeypatch):
    from spark_gmm import resident_tasks, wire

    monkeypatch.setattr(blocks, "block_rows_for", lambda d: 4)
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(11, 3)).tolist() + [None, [1.0, np.nan, 2.0]]
    weights = rng.uniform(0.5, 2.0, len(rows)).tolist()
    batches = [batch(rows[:5], weights[:5]), batch(rows[5:], weights[5:])]
    cached = pa.Table.from_batches(list(blocks.make_packer(True)(batches))).select(blocks.SUMMARY_COLUMNS)
    summaries = [blocks.block_batch(*block, values=False) for block in blocks.pack_blocks(batches, True)]
    sent = resident_tasks.summary_bytes(summaries)
    assert resident_tasks.read_summary(sent).equals(cached)
    def stream(table):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    retyped = cached.set_column(1, "n", cached.column("n").cast(pa.int64()))  # right names, wrong type
    for bad in (sent[: len(sent) // 2], b"not an arrow stream", stream(pa.table({"n": [1]})), stream(retyped)):
        with pytest.raises(wire.WireError):
            resident_tasks.read_summary(bad)


def test_the_go_message_carries_the_dtype_and_the_exact_shift():
    from spark_gmm import resident_tasks

    shift = np.array([1e7 + 0.1, -0.5, 0.0])
    for dtype, width in ((np.float64, 8), (np.float32, 4)):
        message = resident_tasks.encode_go(shift, dtype)
        assert message[:1] == resident_tasks.GO
        got_width, got_shift = resident_tasks.decode_go(message)
        assert got_width == width and got_shift.tobytes() == shift.tobytes()
