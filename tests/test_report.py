"""The fit report renders for low- and high-dimensional data, every covariance type and a selection
run; it embeds its pictures and loads nothing from elsewhere."""

import re

import numpy as np
import pytest

from spark_gmm import GaussianMixture, GaussianMixtureModel, GaussianMixtureSelection
from spark_gmm.report import render_report, write_report

pytest.importorskip("matplotlib")


def frame(spark, x):
    return spark.createDataFrame([(r.tolist(),) for r in x], ["features"]).coalesce(2)


def assert_self_contained(page: str, pictures: int):
    assert len(re.findall(r'<img alt="" src="data:image/png;base64,[A-Za-z0-9+/=]{100,}">', page)) == pictures
    assert not re.search(r"https?://|<script|<link|src=\"(?!data:)", page)


def test_report_of_a_2d_fit(spark, tmp_path):
    rng = np.random.default_rng(1)
    x = np.vstack([rng.normal(c, 1.0, size=(300, 2)) for c in ([0, 0], [7, 2])])
    model = GaussianMixture(k=2, seed=1).fit(frame(spark, x))
    path = tmp_path / "report.html"
    write_report(str(path), model, frame(spark, x), run={"input": "two blobs"})
    page = path.read_text()
    assert_self_contained(page, pictures=3)  # history, scatter, weights and sizes
    assert "two blobs" in page and "<td>k</td><td>2</td>" in page


def test_report_of_many_features_with_names(spark):
    rng = np.random.default_rng(2)
    x = np.vstack([rng.normal(c, 1.0, size=(200, 12)) for c in (np.zeros(12), np.full(12, 4.0))])
    df = spark.createDataFrame([tuple(r) for r in x.tolist()], [f"f{i}" for i in range(12)])
    model = GaussianMixture(k=2, seed=1, inputCols=[f"f{i}" for i in range(12)]).fit(df)
    page = render_report(model, df)
    assert_self_contained(page, pictures=3)
    assert "mean f11" in page and "std f0" in page


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical", "tied"])
def test_report_of_each_covariance_type(spark, covariance_type):
    covariances = {
        "full": [[[1.0, 0.5], [0.5, 2.0]], [[0.5, 0.0], [0.0, 0.5]]],
        "diag": [[[1.0, 0.0], [0.0, 2.0]], [[0.5, 0.0], [0.0, 0.3]]],
        "spherical": [np.eye(2), 0.5 * np.eye(2)],
        "tied": [[[1.0, 0.5], [0.5, 2.0]]] * 2,
    }[covariance_type]
    model = GaussianMixtureModel.fromArrays([0.5, 0.5], [[0.0, 0.0], [5.0, 5.0]], covariances, covariance_type)
    x = np.random.default_rng(3).normal(size=(400, 2)) * 2 + 2
    page = render_report(model, frame(spark, x))
    assert_self_contained(page, pictures=2)  # no history for a model built from arrays
    assert f"<td>covarianceType</td><td>{covariance_type}</td>" in page


def test_report_of_a_selection_run(spark):
    rng = np.random.default_rng(4)
    x = np.vstack([rng.normal(c, 0.7, size=(200, 2)) for c in ([0, 0], [5, 0], [0, 5])])
    df = frame(spark, x)
    selection = GaussianMixtureSelection(GaussianMixture(seed=2), kValues=[2, 3, 4]).fit(df)
    page = render_report(selection.bestModel, df, selection=selection.candidateRows)
    assert_self_contained(page, pictures=4)
    assert "Model selection by BIC" not in page  # titles are inside the pictures
    assert "<h2>Candidates</h2>" in page
