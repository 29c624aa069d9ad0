"""The fit report renders for low- and high-dimensional data, every covariance type and a selection
run; it embeds its pictures, each with alt text and a caption, and loads nothing from elsewhere. The
pictures' data are checked on the matplotlib objects (no pixels). The demo's data generator makes
overlapping clusters, on which EM needs several iterations."""

import html
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import multivariate_normal

from spark_gmm import GaussianMixture, GaussianMixtureModel, GaussianMixtureSelection
from spark_gmm.report import (
    likelihood_curve,
    likelihood_figure,
    principal_axes,
    render_report,
    selection_figure,
    write_report,
)

pytest.importorskip("matplotlib")

FIGURE = re.compile(
    r'<figure><img alt="([^"]*)" src="data:image/png;base64,[A-Za-z0-9+/=]{100,}">'
    r"<figcaption>([^<]*)</figcaption></figure>"
)


def frame(spark, x):
    return spark.createDataFrame([(r.tolist(),) for r in x], ["features"]).coalesce(2)


def figures(page: str, count: int) -> list[tuple[str, str]]:
    """The (alt, caption) of each picture, after checking the page is self-contained and that every
    image is a captioned figure with alt text."""
    found = FIGURE.findall(page)
    assert len(found) == count and page.count("<img") == count
    for alt, caption in found:
        assert len(html.unescape(alt)) > 40 and len(html.unescape(caption)) > 80
    assert not re.search(r"https?://|<script|<link|src=\"(?!data:)", page)
    return [(html.unescape(alt), html.unescape(caption)) for alt, caption in found]


def test_report_of_a_2d_fit(spark, tmp_path):
    rng = np.random.default_rng(1)
    x = np.vstack([rng.normal(c, 1.0, size=(300, 2)) for c in ([0, 0], [7, 2])])
    model = GaussianMixture(k=2, seed=1).fit(frame(spark, x))
    path = tmp_path / "report.html"
    write_report(str(path), model, frame(spark, x), run={"input": "two blobs"})
    page = path.read_text()
    (_, history), (scatter_alt, _), (_, sizes) = figures(page, 3)
    assert "log-likelihood per row" in history and f"{model.summary.numIter} iteration" in history
    per_row = np.array(model.summary.logLikelihoodHistory) / len(x)
    assert f"{per_row[0]:.6g}" in history and f"{per_row[-1]:.6g}" in history
    variance = np.linalg.eigvalsh(np.cov(x.T))[::-1] / np.trace(np.cov(x.T))
    assert f"PC1 {100 * variance[0]:.0f}%" in scatter_alt and f"PC2 {100 * variance[1]:.0f}%" in scatter_alt
    assert "the 600 rows" in sizes
    assert "two blobs" in page and "<td>k</td><td>2</td>" in page


def test_report_of_many_features_with_names(spark):
    rng = np.random.default_rng(2)
    x = np.vstack([rng.normal(c, 1.0, size=(200, 12)) for c in (np.zeros(12), np.full(12, 4.0))])
    df = spark.createDataFrame([tuple(r) for r in x.tolist()], [f"f{i}" for i in range(12)])
    model = GaussianMixture(k=2, seed=1, inputCols=[f"f{i}" for i in range(12)]).fit(df)
    page = render_report(model, df)
    figures(page, 3)
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
    _, (_, sizes) = figures(page, 2)  # no history for a model built from arrays
    assert "sampled rows" in sizes
    assert f"<td>covarianceType</td><td>{covariance_type}</td>" in page


def test_report_of_a_selection_run(spark):
    rng = np.random.default_rng(4)
    x = np.vstack([rng.normal(c, 0.7, size=(200, 2)) for c in ([0, 0], [5, 0], [0, 5])])
    df = frame(spark, x)
    selection = GaussianMixtureSelection(GaussianMixture(seed=2), kValues=[2, 3, 4]).fit(df)
    page = render_report(selection.bestModel, df, selection=selection.candidateRows)
    *_, (alt, caption) = figures(page, 4)
    assert "Δ BIC" in alt and "star marks the chosen candidate" in caption
    assert "<h2>Candidates</h2>" in page


def test_likelihood_curve_is_per_row_with_integer_iterations():
    history = [-1_782_345.5, -1_700_000.0, -1_690_123.25]
    assert likelihood_curve(history, 200_000.0) == (
        [0, 1, 2], [h / 200_000.0 for h in history], "log-likelihood per row"
    )
    assert likelihood_curve(history) == ([0, 1, 2], history, "log-likelihood (total)")


def drawn(figure):
    figure.canvas.draw()
    return figure.axes[0]


@pytest.mark.parametrize("total_weight", [200_000.0, None])
@pytest.mark.parametrize("history", [[-1_782_345.5], [-1_782_345.5, -1_782_345.5 + 5e-9],
                                     [-1_782_345.5 - 40_000.0 * 0.5 ** i for i in range(12)]])
def test_likelihood_plot_has_no_offset_and_integer_ticks(history, total_weight):
    """A flat or single-point history still reads plainly: no 1e6 offset, no magnified round-off,
    whole iterations on the x axis, and the points labelled when there are few."""
    figure, alt, caption = likelihood_figure(history, total_weight, converged=True)
    ax = drawn(figure)
    iterations, values, _ = likelihood_curve(history, total_weight)
    assert np.allclose(ax.lines[0].get_xydata(), np.column_stack([iterations, values]))
    assert ax.yaxis.get_offset_text().get_text() == "" and ax.xaxis.get_offset_text().get_text() == ""
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    low, high = ax.get_ylim()
    assert high - low >= 1e-3 * abs(values[0])
    labels = [label.get_text() for label in ax.get_yticklabels() if label.get_text()]
    assert len(set(labels)) == len(labels) >= 2 and not any("e" in label for label in labels)
    assert len(ax.texts) == (len(history) if len(history) <= 3 else 0)
    assert "e+" not in alt + caption and ("fixed point" in caption) == (len(history) <= 2)


def test_selection_plot_shows_differences_from_the_best():
    rows = [{"k": k, "covarianceType": kind, "bic": 1.5e6 + delta, "chosen": False}
            for kind, deltas in {"full": [9e4, 0.0, 12.0, 30.0], "diag": [1e5, 400.0, 450.0, 500.0]}.items()
            for k, delta in zip([2, 3, 4, 5], deltas)]
    rows[1]["chosen"] = True
    figure, alt, caption = selection_figure(rows, "bic")
    ax = drawn(figure)
    assert np.allclose(ax.lines[0].get_ydata(), [9e4, 0.0, 12.0, 30.0])
    assert np.allclose(ax.lines[1].get_ydata(), [1e5, 400.0, 450.0, 500.0])
    assert ax.get_yscale() == "symlog" and ax.yaxis.get_offset_text().get_text() == ""
    assert "Δ BIC" in ax.get_ylabel() and "k=4 12" in alt


def test_principal_axes_explain_the_variance():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2000, 3)) @ np.diag([3.0, 1.0, 0.5])
    axes, explained = principal_axes(np.cov(x.T))
    assert np.allclose(np.abs(axes[:, 0]), [1, 0, 0], atol=0.05)
    assert np.allclose(explained, np.var(x @ axes, axis=0, ddof=1) / np.var(x, axis=0, ddof=1).sum())
    one_feature = principal_axes(np.array([[2.0]]))
    assert np.allclose(one_feature[0], [[1.0, 0.0]]) and np.allclose(one_feature[1], [1.0, 0.0])


def load_make_data():
    path = Path(__file__).resolve().parents[2] / "scripts" / "make_data.py"
    spec = importlib.util.spec_from_file_location("make_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_data_overlaps_so_that_em_takes_several_iterations(spark, tmp_path):
    """The demo's mixture (make_data defaults) is a teaching case: the true mixture itself misassigns
    a few per cent of rows (checked with scipy), a default fit needs several EM iterations and
    visibly raises the log-likelihood, and still finds the true means."""
    out = tmp_path / "data.parquet"
    assert load_make_data().main(["--rows", "20000", "--out", str(out)]) == 0
    truth = json.loads((tmp_path / "data.truth.json").read_text())
    table = pq.read_table(out)
    x = np.column_stack([table.column(f"f{i}").to_numpy() for i in range(5)])
    labels = table.column("component").to_numpy()
    assert np.bincount(labels).tolist() == truth["counts"] and sum(truth["counts"]) == 20000
    assert sorted(truth["weights"]) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    densities = np.column_stack([
        w * multivariate_normal(m, np.reshape(c, (5, 5))).pdf(x)
        for w, m, c in zip(truth["weights"], truth["means"], truth["covariances"])
    ])
    bayes_error = np.mean(densities.argmax(axis=1) != labels)
    assert truth["bayesError"] == pytest.approx(bayes_error, abs=1.5 / 20000)  # a tie may go either way
    assert 0.01 < bayes_error < 0.25

    df = spark.read.parquet(str(out))
    model = GaussianMixture(k=4, inputCols=[f"f{i}" for i in range(5)]).fit(df)
    per_row = np.array(model.summary.logLikelihoodHistory) / 20000
    assert model.summary.numIter >= 4 and per_row[-1] - per_row[0] > 0.05
    distance = np.linalg.norm(model.means[:, None] - np.array(truth["means"])[None], axis=2)
    assert sorted(distance.argmin(axis=1)) == [0, 1, 2, 3] and distance.min(axis=1).max() < 0.3


def test_report_is_reachable_from_the_package():
    """`import spark_gmm` is enough for `spark_gmm.report.write_report` (the docs' spelling)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import spark_gmm; print(spark_gmm.report.write_report.__name__)"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "write_report", done.stderr
