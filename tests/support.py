"""Builders and assertions shared by the suites (importable from every test: pythonpath 'tests')."""

import numpy as np
import pyarrow as pa


def array_frame(spark, x, partitions=2, **extra):
    """A DataFrame with `features` array<double> from the n×d array `x`, plus `extra` columns,
    in `partitions` partitions (None: as Spark makes it)."""
    n, d = x.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    columns = {"features": pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x).ravel()))}
    columns.update({name: pa.array(values) for name, values in extra.items()})
    df = spark.createDataFrame(pa.table(columns))
    return df if partitions is None else df.repartition(partitions)


def assert_identical(a, b):
    """Two fitted models are the same bit for bit: parameters, history and iterations."""
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.covariances, b.covariances)
    assert a.summary.logLikelihoodHistory == b.summary.logLikelihoodHistory
    assert a.summary.numIter == b.summary.numIter


def indicator_clusters(seed=4, n=300):
    """(x (n, 3), labels): three unit blobs 8 apart in 2-D and an indicator column that is 0 in the
    first, 1 in the second and either in the third: a k-means start over them has two components
    singular but for regCovar (EM then runs under a covariance floor first)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])[labels] + rng.normal(size=(n, 2))
    flag = np.where(labels == 2, rng.integers(0, 2, n), labels == 1)
    return np.column_stack([x, flag]).astype(float), labels
