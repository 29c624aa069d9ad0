"""`MixedMixture` on the engines and with checkpoints: the resident engine gives the driver
engine's model bit for bit (missing values, nInit restarts), `engine="auto"` picks and logs as
for `GaussianMixture`, and a fit stopped and resumed from its checkpoint ends with the unbroken
fit's model; a checkpoint of other settings or data is refused."""

import logging

import numpy as np
import pytest

from spark_gmm import MixedMixture, engine_choice
from spark_gmm.checkpoint import CheckpointMismatchError
from test_mixed import COLUMNS, K, generated, with_missing

N = 600


@pytest.fixture(scope="module")
def holes(spark):
    """600 mixed rows, 10% of every value null, in 3 partitions."""
    _, _, frame = generated(seed=5, n=N)
    return spark.createDataFrame(with_missing(frame, 0.1), spark.createDataFrame(frame).schema).repartition(3).cache()


@pytest.fixture
def engine_log(caplog):
    caplog.set_level(logging.INFO, logger="spark_gmm")
    return lambda prefix: [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


def fit(df, **params):
    settings = dict(k=K, seed=4, tol=0.0, maxIter=6, handleInvalid="keep", **COLUMNS)
    return MixedMixture(**{**settings, **params}).fit(df)


def assert_same(a, b):
    """Two fitted mixed models are the same bit for bit: every table, the history, the iterations."""
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.means.to_numpy(), b.means.to_numpy())
    for ours, theirs in zip(a.covariances, b.covariances):
        np.testing.assert_array_equal(ours.to_numpy(), theirs.to_numpy())
    np.testing.assert_array_equal(a.bernoulliProbabilities.to_numpy(), b.bernoulliProbabilities.to_numpy())
    np.testing.assert_array_equal(a.categoricalProbabilities["colour"].to_numpy(),
                                  b.categoricalProbabilities["colour"].to_numpy())
    np.testing.assert_array_equal(a.poissonRates.to_numpy(), b.poissonRates.to_numpy())
    assert a.summary.logLikelihood == b.summary.logLikelihood
    assert a.summary.objectiveHistory == b.summary.objectiveHistory
    assert a.summary.numIter == b.summary.numIter


@pytest.mark.parametrize("n_init", [1, 2])
def test_resident_engine_gives_the_driver_engines_model(holes, n_init, engine_log):
    driver = fit(holes, engine="driver", nInit=n_init)
    assert engine_log("engine: ") == ["engine: driver (engine='driver')"]
    resident = fit(holes, engine="barrier", nInit=n_init)
    assert engine_log("engine: ")[-1].startswith("engine: resident (a barrier stage of 2 task(s) over 3 partition(s)")
    assert engine_log("resident engine: stage run") == []
    assert resident.summary.numIter == 6 and resident.summary.totalWeight == N  # rows with nulls kept
    assert_same(resident, driver)


def test_auto_is_the_default_and_falls_back_where_the_blocks_do_not_fit(holes, monkeypatch, engine_log):
    assert MixedMixture().getEngine() == "auto"
    auto = fit(holes, maxIter=2)
    assert engine_log("engine: ")[-1].startswith("engine: resident (")
    monkeypatch.setattr(engine_choice, "python_memory_per_task", lambda conf, master, slots: (1_000, "a test budget"))
    fallback = fit(holes, maxIter=2)
    assert engine_log("engine: ")[-1].startswith("engine: driver (")
    assert engine_log("engine: ")[-1].endswith("above the 1 kB of a test budget)")
    assert_same(fallback, auto)


def test_resumed_fit_equals_the_unbroken_fit(holes, tmp_path, engine_log):
    directory = str(tmp_path / "ckpt")
    stopped = fit(holes, maxIter=3, checkpointDir=directory, checkpointInterval=1)
    # Checkpoint writes are Spark jobs: one of the session's two slots stays free for them.
    assert engine_log("engine: ")[-1].startswith("engine: resident (a barrier stage of 1 task")
    assert stopped.summary.resumedFromIteration == 0
    resumed = fit(holes, maxIter=6, checkpointDir=directory, checkpointInterval=1)
    assert resumed.summary.resumedFromIteration == 3
    assert_same(resumed, fit(holes, maxIter=6, engine="driver"))


def test_a_checkpoint_of_other_settings_or_data_is_refused(holes, tmp_path):
    directory = str(tmp_path / "ckpt")
    fit(holes, maxIter=2, checkpointDir=directory, checkpointInterval=1, engine="driver")
    with pytest.raises(CheckpointMismatchError, match=r"differs in: seed, smoothing\)"):
        fit(holes, maxIter=4, checkpointDir=directory, seed=5, smoothing=0.5, engine="driver")
    with pytest.raises(CheckpointMismatchError, match=r"differs in: content, rows, totalWeight\)"):
        fit(holes.limit(500), maxIter=4, checkpointDir=directory, engine="driver")
    with pytest.raises(ValueError, match="checkpointDir needs nInit=1"):
        fit(holes, checkpointDir=directory, nInit=2)


def test_fit_multiple_in_shared_passes_equals_fits_one_by_one(holes, engine_log):
    estimator = MixedMixture(seed=4, tol=0.0, maxIter=4, handleInvalid="keep", **COLUMNS)
    maps = [{estimator.k: 2, estimator.covarianceType: "full"}, {estimator.k: 3, estimator.covarianceType: "diag"},
            {estimator.k: 3, estimator.seed: 9, estimator.regCovar: 1e-3}]
    together = dict(estimator.fitMultiple(holes, maps))
    assert len(engine_log("surveying the input")) == 1  # one survey, one packing, shared passes
    assert engine_log("initialisation (3 candidates)")
    for i, param_map in enumerate(maps):
        alone = estimator.copy(param_map).fit(holes)
        assert together[i].getK() == param_map[estimator.k]
        assert_same(together[i], alone)
