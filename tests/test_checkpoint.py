"""Checkpoints: a fit stopped after some iterations and started again ends with the unbroken model."""

import glob
import os

import numpy as np
import pytest

from spark_gmm import GaussianMixture
from spark_gmm.checkpoint import CheckpointMismatchError


@pytest.fixture(scope="module")
def data(spark):
    rng = np.random.default_rng(21)
    centers = np.array([[0.0, 0.0, 0.0], [4.0, 4.0, 0.0], [0.0, 5.0, 3.0]])
    x = np.vstack([rng.normal(c, [1.0, 1.5, 0.7], size=(700, 3)) for c in centers]) + 5e4
    return spark.createDataFrame([(r.tolist(),) for r in x], ["features"]).repartition(3).cache()


def settings(**extra):
    return dict(k=3, seed=8, tol=0.0, regCovar=1e-5, checkpointInterval=1, **extra)


def assert_identical(a, b):
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.covariances, b.covariances)
    assert a.summary.logLikelihoodHistory == b.summary.logLikelihoodHistory
    assert a.summary.numIter == b.summary.numIter


def test_resumed_fit_equals_the_unbroken_fit(data, tmp_path):
    unbroken = GaussianMixture(maxIter=8, **settings()).fit(data)
    directory = str(tmp_path / "ckpt")
    stopped = GaussianMixture(maxIter=5, checkpointDir=directory, **settings()).fit(data)
    assert stopped.summary.resumedFromIteration == 0
    resumed = GaussianMixture(maxIter=8, checkpointDir=directory, **settings()).fit(data)
    assert resumed.summary.resumedFromIteration == 5
    assert_identical(resumed, unbroken)


def test_a_torn_checkpoint_falls_back_to_the_other_slot(data, tmp_path):
    directory = tmp_path / "ckpt"
    GaussianMixture(maxIter=4, checkpointDir=str(directory), **settings()).fit(data)
    (newest,) = glob.glob(str(directory / "slot-0" / "part-*"))  # iteration 4 went to slot 0
    open(newest, "w").write('{"fingerprint": {"k"')  # a write cut short
    for crc in glob.glob(str(directory / "slot-0" / ".*.crc")):
        os.remove(crc)
    resumed = GaussianMixture(maxIter=6, checkpointDir=str(directory), **settings()).fit(data)
    assert resumed.summary.resumedFromIteration == 3
    assert_identical(resumed, GaussianMixture(maxIter=6, **settings()).fit(data))


def test_a_checkpoint_of_other_settings_or_data_is_refused(data, tmp_path):
    directory = str(tmp_path / "ckpt")
    GaussianMixture(maxIter=2, checkpointDir=directory, **settings()).fit(data)
    with pytest.raises(CheckpointMismatchError, match="differs in: seed"):
        GaussianMixture(maxIter=4, checkpointDir=directory, **{**settings(), "seed": 9}).fit(data)
    with pytest.raises(CheckpointMismatchError, match="rows, shift, totalWeight"):
        GaussianMixture(maxIter=4, checkpointDir=directory, **settings()).fit(data.limit(1500))


def test_checkpoint_dir_with_the_barrier_engine_runs_on_the_driver(data, tmp_path):
    directory = str(tmp_path / "ckpt")
    model = GaussianMixture(maxIter=3, checkpointDir=directory, engine="barrier", **settings()).fit(data)
    assert glob.glob(str(tmp_path / "ckpt" / "slot-*" / "part-*"))
    assert_identical(model, GaussianMixture(maxIter=3, **settings()).fit(data))
