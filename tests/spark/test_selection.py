"""GaussianMixtureSelection: the criterion of every candidate equals the fitted models' bic/aic,
the lowest wins, and it finds the generating k."""

import numpy as np
import pytest

from spark_gmm import GaussianMixture, GaussianMixtureSelection


@pytest.fixture(scope="module")
def data(spark):
    rng = np.random.default_rng(19)
    centers = np.array([[0.0, 0.0], [7.0, 0.0], [0.0, 7.0]])
    x = np.vstack([rng.normal(c, [1.0, 0.6], size=(250, 2)) for c in centers])
    return spark.createDataFrame([(r.tolist(),) for r in x], ["features"]).coalesce(2)


def test_selection_by_bic_finds_k_and_reports_every_candidate(data):
    selection = GaussianMixtureSelection(
        GaussianMixture(seed=3, tol=1e-6), kValues=[2, 3, 4], covarianceTypes=["full", "diag"]
    ).fit(data)
    rows = selection.candidateRows
    assert [(r["k"], r["covarianceType"]) for r in rows] == [
        (k, t) for t in ["full", "diag"] for k in [2, 3, 4]
    ]
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["bic"] == min(r["bic"] for r in rows)
    assert selection.bestModel.getK() == 3
    assert selection.bestModel.getCovarianceType() == chosen[0]["covarianceType"]
    # The reported figures are the models' own bic/aic on the data.
    np.testing.assert_allclose(chosen[0]["bic"], selection.bestModel.bic(data), rtol=1e-9)
    np.testing.assert_allclose(chosen[0]["aic"], selection.bestModel.aic(data), rtol=1e-9)
    frame = selection.candidates.toPandas()
    assert list(frame.columns) == ["k", "covarianceType", "bic", "aic", "logLikelihood", "parameters",
                                   "iterations", "converged", "chosen"]
    assert len(frame) == 6
    assert selection.transform(data).select("prediction").distinct().count() == 3


def test_selection_by_aic_and_bad_settings(data):
    selection = GaussianMixtureSelection(GaussianMixture(seed=3), kValues=[2, 3], criterion="aic").fit(data)
    rows = selection.candidateRows
    assert [r for r in rows if r["chosen"]][0]["aic"] == min(r["aic"] for r in rows)
    with pytest.raises(ValueError, match="criterion must be one of"):
        GaussianMixtureSelection(kValues=[2], criterion="icl").fit(data)
    with pytest.raises(ValueError, match="covarianceTypes must be"):
        GaussianMixtureSelection(kValues=[2], covarianceTypes=["banded"]).fit(data)
