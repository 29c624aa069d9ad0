"""The barrier engine runs the same kernels, statistics and M-step as the driver engine."""

import numpy as np
import pytest

from spark_gmm import GaussianMixture


@pytest.fixture(scope="module")
def blobs(spark):
    rng = np.random.default_rng(7)
    centers = np.array([[0.0, 0.0, 0.0], [6.0, 6.0, 0.0], [0.0, 8.0, 5.0]])
    x = np.vstack([rng.normal(c, [1.0, 0.5, 2.0], size=(800, 3)) for c in centers]) + 1e6
    return spark.createDataFrame([(row.tolist(),) for row in x], ["features"])


@pytest.mark.parametrize("partitions", [1, 2, 5])
def test_barrier_engine_gives_the_driver_engines_model(blobs, partitions):
    df = blobs.repartition(partitions)
    fits = {
        engine: GaussianMixture(k=3, seed=3, tol=1e-9, maxIter=30, engine=engine).fit(df)
        for engine in ("driver", "barrier")
    }
    driver, barrier = fits["driver"], fits["barrier"]
    np.testing.assert_allclose(barrier.weights, driver.weights, rtol=1e-10)
    np.testing.assert_allclose(barrier.means, driver.means, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(barrier.covariances, driver.covariances, rtol=1e-10, atol=1e-12)
    assert barrier.summary.logLikelihoodHistory == pytest.approx(
        driver.summary.logLikelihoodHistory, rel=1e-12
    )
    assert barrier.summary.numIter == driver.summary.numIter
    assert barrier.summary.clusterSizes == driver.summary.clusterSizes


def test_barrier_engine_reports_refusals_at_the_driver(blobs):
    # Five identical rows cannot make three components: the refusal comes back as a plain error.
    few = blobs.limit(1).crossJoin(blobs.sparkSession.range(5)).select("features")
    with pytest.raises(ValueError, match="distinct points"):
        GaussianMixture(k=3, engine="barrier").fit(few)


def test_tree_reduction_gives_the_same_model(blobs, monkeypatch):
    from spark_gmm import blocks

    df = blobs.repartition(9)
    start = GaussianMixture(k=3, seed=3, maxIter=0).fit(df)
    flat = GaussianMixture(maxIter=3, tol=0.0).setInitialModel(start).fit(df)
    monkeypatch.setattr(blocks, "TREE_THRESHOLD_BYTES", 0)  # every pass reduces in a tree
    tree = GaussianMixture(maxIter=3, tol=0.0, aggregationDepth=3).setInitialModel(start).fit(df)
    np.testing.assert_allclose(tree.means, flat.means, rtol=1e-12)
    np.testing.assert_allclose(tree.covariances, flat.covariances, rtol=1e-10, atol=1e-12)
    assert tree.summary.numIter == flat.summary.numIter


def test_float32_blocks_stay_close_to_float64(blobs):
    """dtype='float32' halves the cached bytes; its model stays within float32 round-off."""
    df = blobs.repartition(3)
    start = GaussianMixture(k=3, seed=3, maxIter=0).fit(df)
    fits = {
        (dtype, engine): GaussianMixture(maxIter=5, tol=0.0, dtype=dtype, engine=engine)
        .setInitialModel(start)
        .fit(df)
        for dtype, engine in (("float64", "driver"), ("float32", "driver"), ("float32", "barrier"))
    }
    wide, narrow = fits["float64", "driver"], fits["float32", "driver"]
    scale = np.sqrt(np.diagonal(wide.covariances, axis1=1, axis2=2))
    assert np.abs((narrow.means - wide.means) / scale).max() < 1e-4  # data sit at 1e6: shifted first
    np.testing.assert_allclose(narrow.covariances, wide.covariances, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(narrow.weights, wide.weights, rtol=1e-4)
    assert narrow.summary.logLikelihood == pytest.approx(wide.summary.logLikelihood, rel=1e-6)
    barrier = fits["float32", "barrier"]
    np.testing.assert_allclose(barrier.means, narrow.means, rtol=1e-12)
    np.testing.assert_allclose(barrier.covariances, narrow.covariances, rtol=1e-10, atol=1e-12)
