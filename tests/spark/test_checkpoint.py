"""Checkpoints: a fit stopped after some iterations and started again ends with the unbroken model;
a checkpoint of other data or settings is refused."""

import glob
import os
import shutil

import numpy as np
import pytest
from pyspark.sql import functions as F

from spark_gmm import ComponentWarning, GaussianMixture, GaussianMixtureModel
from spark_gmm.checkpoint import Checkpointer, CheckpointMismatchError
from spark_gmm.em import EMState, FitSettings
from spark_gmm.mixture import Mixture
from support import array_frame, assert_identical, indicator_clusters


@pytest.fixture(scope="module")
def data(spark):
    rng = np.random.default_rng(21)
    centers = np.array([[0.0, 0.0, 0.0], [4.0, 4.0, 0.0], [0.0, 5.0, 3.0]])
    x = np.vstack([rng.normal(c, [1.0, 1.5, 0.7], size=(700, 3)) for c in centers]) + 5e4
    return spark.createDataFrame([(i, r.tolist()) for i, r in enumerate(x)], ["id", "features"]).repartition(3).cache()


def settings(**extra):
    return dict(k=3, seed=8, tol=0.0, regCovar=1e-5, checkpointInterval=1, **extra)




def test_resumed_fit_equals_the_unbroken_fit(data, tmp_path):
    unbroken = GaussianMixture(maxIter=5, **settings()).fit(data)
    directory = str(tmp_path / "ckpt")
    stopped = GaussianMixture(maxIter=3, checkpointDir=directory, **settings()).fit(data)
    assert stopped.summary.resumedFromIteration == 0
    resumed = GaussianMixture(maxIter=5, checkpointDir=directory, **settings()).fit(data)  # maxIter extended
    assert resumed.summary.resumedFromIteration == 3
    assert_identical(resumed, unbroken)


def test_a_fit_stopped_under_the_covariance_floor_resumes_to_the_unbroken_fit(spark, tmp_path):
    """A start singular but for regCovar runs EM under a floor first: the floor is checkpointed."""
    df = array_frame(spark, indicator_clusters()[0]).cache()
    with pytest.warns(ComponentWarning, match="singular without regCovar"):  # the indicator, in two clusters
        unbroken = GaussianMixture(k=3, seed=0, checkpointInterval=1).fit(df)
    assert unbroken.summary.flooredUntilIteration > 2 and unbroken.summary.converged
    directory = str(tmp_path / "ckpt")
    stopped = GaussianMixture(k=3, seed=0, maxIter=2, checkpointDir=directory, checkpointInterval=1).fit(df)
    assert stopped.summary.flooredUntilIteration == 0 and stopped.summary.stopReason == "max-iter"
    with pytest.warns(ComponentWarning, match="singular without regCovar"):
        resumed = GaussianMixture(k=3, seed=0, checkpointDir=directory, checkpointInterval=1).fit(df)
    assert resumed.summary.resumedFromIteration == 2
    assert resumed.summary.flooredUntilIteration == unbroken.summary.flooredUntilIteration
    assert_identical(resumed, unbroken)


def _tear_state(directory):
    (state,) = glob.glob(str(directory / "slot-0" / "state" / "part-*"))
    open(state, "w").write('{"writeId": "')  # a write cut short
    for crc in glob.glob(str(directory / "slot-0" / "state" / ".*.crc")):
        os.remove(crc)


def _arrays_of_another_write(directory):
    """A kill between a slot's two writes: new arrays, the state of the write before."""
    shutil.rmtree(directory / "slot-0" / "arrays")
    shutil.copytree(directory / "slot-1" / "arrays", directory / "slot-0" / "arrays")


@pytest.mark.parametrize("tear", [_tear_state, _arrays_of_another_write])
def test_a_torn_checkpoint_falls_back_to_the_other_slot(data, tmp_path, tear):
    directory = tmp_path / "ckpt"
    GaussianMixture(maxIter=4, checkpointDir=str(directory), **settings()).fit(data)
    tear(directory)  # iteration 4 went to slot 0, iteration 3 to slot 1
    resumed = GaussianMixture(maxIter=6, checkpointDir=str(directory), **settings()).fit(data)
    assert resumed.summary.resumedFromIteration == 3
    assert_identical(resumed, GaussianMixture(maxIter=6, **settings()).fit(data))


def test_a_checkpoint_of_other_settings_or_data_is_refused(data, tmp_path):
    directory = str(tmp_path / "ckpt")
    GaussianMixture(maxIter=2, checkpointDir=directory, **settings()).fit(data)
    with pytest.raises(CheckpointMismatchError, match=r"differs in: seed\)"):
        GaussianMixture(maxIter=4, checkpointDir=directory, **{**settings(), "seed": 9}).fit(data)
    with pytest.raises(CheckpointMismatchError, match=r"differs in: content, rows, totalWeight\)"):
        GaussianMixture(maxIter=4, checkpointDir=directory, **settings()).fit(data.limit(1500))


def test_other_data_of_the_same_size_and_range_is_refused(spark, tmp_path):
    """Two min-max-scaled data sets of the same size agree in rows, total weight and midpoints: only
    their content tells them apart."""
    rng = np.random.default_rng(5)

    def scaled(x):
        x = (x - x.min(axis=0)) / (x.max(axis=0) - x.min(axis=0))
        return spark.createDataFrame([(r.tolist(),) for r in x], ["features"])

    first = scaled(np.vstack([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 5]))
    second = scaled(np.vstack([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) - 5]))
    directory = str(tmp_path / "ckpt")
    GaussianMixture(k=2, maxIter=3, checkpointDir=directory, checkpointInterval=1).fit(first)
    with pytest.raises(CheckpointMismatchError, match=r"differs in: content\)"):
        GaussianMixture(k=2, maxIter=6, checkpointDir=directory, checkpointInterval=1).fit(second)


def test_another_initial_model_is_refused(data, tmp_path):
    def start(shift):
        means = np.array([[0.0, 0.0, 0.0], [4.0, 4.0, 0.0], [0.0, 5.0, 3.0]]) + 5e4 + shift
        return GaussianMixtureModel.fromArrays(np.ones(3) / 3, means, [np.eye(3)] * 3)

    directory = str(tmp_path / "ckpt")
    GaussianMixture(maxIter=2, checkpointDir=directory, **settings()).setInitialModel(start(0.0)).fit(data)
    with pytest.raises(CheckpointMismatchError, match=r"differs in: initialModel\)"):
        GaussianMixture(maxIter=4, checkpointDir=directory, **settings()).setInitialModel(start(0.5)).fit(data)
    with pytest.raises(CheckpointMismatchError, match=r"differs in: initMode, initialModel\)"):
        GaussianMixture(maxIter=4, checkpointDir=directory, **settings()).fit(data)
    resumed = GaussianMixture(maxIter=4, checkpointDir=directory, **settings()).setInitialModel(start(0.0)).fit(data)
    assert resumed.summary.resumedFromIteration == 2


def test_a_checkpoint_beyond_max_iter_is_refused(data, tmp_path):
    directory = str(tmp_path / "ckpt")
    GaussianMixture(maxIter=4, checkpointDir=directory, **settings()).fit(data)
    with pytest.raises(CheckpointMismatchError, match=r"at iteration 4, beyond maxIter=3 \(differs in: maxIter\)"):
        GaussianMixture(maxIter=3, checkpointDir=directory, **settings()).fit(data)
    again = GaussianMixture(maxIter=4, checkpointDir=directory, **settings()).fit(data)  # a rerun of a finished fit
    assert again.summary.resumedFromIteration == 4
    assert_identical(again, GaussianMixture(maxIter=4, **settings()).fit(data))


def test_the_same_data_in_another_order_and_partitioning_resumes(data, tmp_path):
    directory = str(tmp_path / "ckpt")
    GaussianMixture(maxIter=3, checkpointDir=directory, **settings()).fit(data)
    shuffled = data.orderBy(F.rand(seed=1)).repartition(5, "id")
    resumed = GaussianMixture(maxIter=6, checkpointDir=directory, **settings()).fit(shuffled)
    assert resumed.summary.resumedFromIteration == 3
    unbroken = GaussianMixture(maxIter=6, **settings()).fit(data)
    # The same EM from the same state; only the order of the sums differs.
    np.testing.assert_allclose(resumed.means, unbroken.means, rtol=1e-10)
    np.testing.assert_allclose(resumed.covariances, unbroken.covariances, rtol=1e-8, atol=1e-12)


def test_checkpoint_dir_with_the_barrier_engine_runs_on_the_driver(data, tmp_path):
    directory = str(tmp_path / "ckpt")
    model = GaussianMixture(maxIter=3, checkpointDir=directory, engine="barrier", **settings()).fit(data)
    assert glob.glob(str(tmp_path / "ckpt" / "slot-*" / "arrays" / "part-*"))
    assert_identical(model, GaussianMixture(maxIter=3, **settings()).fit(data))


def test_a_large_state_checkpoints_exactly(spark, tmp_path, monkeypatch):
    """Two mixtures of k·d² = 2e6 doubles each, through small windows: the state comes back bit for bit."""
    from spark_gmm import codec

    monkeypatch.setattr(codec, "CHUNK_VALUES", 1 << 16)
    monkeypatch.setattr(codec, "WINDOW_VALUES", 1 << 19)
    rng = np.random.default_rng(4)
    k, d = 2, 1000

    def mixture():
        factors = rng.normal(size=(k, d, 10))
        covariances = np.einsum("kif,kjf->kij", factors, factors) + np.eye(d)
        return Mixture.from_covariances(rng.random(k), rng.normal(size=(k, d)), covariances)

    state = EMState(7, mixture(), mixture(), [-3.5, -2.25], [0.5, 0.25], [1])
    settings = FitSettings(k=k, max_iter=10, tol=0.0, reg_covar=0.0, seed=0)
    checkpointer = Checkpointer(spark, str(tmp_path / "ckpt"), 1, {"content": "x"}, settings)
    checkpointer.save(state)
    back = checkpointer.latest()
    assert (back.iteration, back.history, back.seconds, back.empty) == (7, [-3.5, -2.25], [0.5, 0.25], [1])
    for ours, theirs in ((back.mixture, state.mixture), (back.previous, state.previous)):
        for field in ("weights", "means", "covariances", "precisions_cholesky"):
            np.testing.assert_array_equal(getattr(ours, field), getattr(theirs, field))
