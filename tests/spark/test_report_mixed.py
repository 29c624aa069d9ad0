"""The report of a MixedMixtureModel: its per-class profiles (a Bernoulli heat map, categorical
stacked bars, Gaussian means and Poisson rates), class weights and EM curve, fresh, loaded and
without training figures. The pictures' data are checked on the matplotlib objects (no pixels)."""

import html
import re

import numpy as np
import pandas as pd
import pytest

from spark_gmm import MixedMixture, MixedMixtureModel
from spark_gmm.report import render_report
from spark_gmm.report_mixed import SHOWN_LEVELS, bernoulli_figure, categorical_figure, shown_levels

pytest.importorskip("matplotlib")

FIGURE = re.compile(r'<figure><img alt="([^"]*)" src="data:image/png;base64,[A-Za-z0-9+/=]{100,}">'
                    r"<figcaption>([^<]*)</figcaption></figure>")


@pytest.fixture(scope="module")
def people(spark):
    rng = np.random.default_rng(21)
    n = 300
    labels = rng.integers(0, 2, n)
    frame = pd.DataFrame({
        "age": rng.normal(30.0 + 25.0 * labels, 4.0), "income": rng.normal(2.0 + labels, 0.5),
        "churned": rng.random(n) < np.where(labels == 1, 0.8, 0.1),
        "answer": np.where(rng.random(n) < np.where(labels == 1, 0.3, 0.6), "yes", "no"),
        "plan": rng.choice(["basic", "plus", "pro"], n), "country": np.where(labels == 1, "fr", "de"),
        "visits": rng.poisson(np.where(labels == 1, 6.0, 1.0)),
    })
    return spark.createDataFrame(frame).coalesce(2)


@pytest.fixture(scope="module")
def model(people):
    return MixedMixture(k=2, seed=3, maxIter=15, tol=1e-4, gaussianCols=["age", "income"],
                        bernoulliCols=["churned", "answer"], categoricalCols=["plan", "country"],
                        poissonCols=["visits"]).fit(people)


def figures(page: str) -> list[tuple[str, str]]:
    found = FIGURE.findall(page)
    assert page.count("<img") == len(found) and not re.search(r"https?://|<script|<link", page)
    return [(html.unescape(alt), html.unescape(caption)) for alt, caption in found]


def test_report_shows_every_profile_of_a_mixed_model(model, people):
    page = render_report(model, people, run={"input": "people"})
    (history, _), (sizes, _), (heat, _), (bars, caption) = figures(page)
    assert f"after {model.summary.numIter} iteration" in history and "smoothing=0.01" in page
    assert f"0: {model.weights[0]:.3f} and" in sizes
    p = model.bernoulliProbabilities
    assert f"class 1: churned = True {p['churned'][1]:.2f}, answer = yes {p['answer'][1]:.2f}" in heat
    tables = model.categoricalProbabilities
    assert " ".join(f"{level} {tables['plan'].loc[0, level]:.2f}" for level in ["basic", "plus", "pro"]) in bars
    assert "country: class 0 de" in bars and "One panel per categorical column" in caption
    means = model.means
    assert "<h2>Gaussian columns: class means</h2>" in page and f"<td>{means.loc[1, 'age']:.4g}</td>" in page
    assert "<th>std income</th>" in page
    assert "<h2>Count columns: class rates</h2>" in page
    assert f"<td>{model.poissonRates.loc[0, 'visits']:.4g}</td>" in page
    assert "<td>categorical columns</td><td>plan, country</td>" in page and "<td>input</td><td>people</td>" in page


def test_a_loaded_model_and_one_without_training_figures(model, people, tmp_path):
    model.save(str(tmp_path / "m"))
    loaded = MixedMixtureModel.load(str(tmp_path / "m"))
    assert len(figures(render_report(loaded, people))) == 4  # the saved figures bring the curve back
    bare = MixedMixtureModel(model._latent, model._schema)  # as built, not fitted: no history, no sizes
    (sizes, caption), *_ = figures(render_report(bare, people))
    counts = np.bincount(model.transform(people).toPandas()["prediction"], minlength=2)
    shares = counts / counts.sum()
    assert sizes.endswith(f"0: {model.weights[0]:.3f} and {shares[0]:.3f}; 1: {model.weights[1]:.3f} and "
                          f"{shares[1]:.3f}.") and "the 300 rows" in caption


def test_the_heat_map_and_the_bars_draw_the_models_probabilities(model):
    figure, _, _ = bernoulli_figure(model.bernoulliProbabilities, model.bernoulliValues)
    ax = figure.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), model.bernoulliProbabilities.to_numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["churned = True", "answer = yes"]
    assert ax.images[0].get_clim() == (0.0, 1.0)
    tables = model.categoricalProbabilities
    figure, _, _ = categorical_figure(tables, model.weights)
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["plan: P(level | class)", "country: P(level | class)"]
    for ax, table in zip(panels, tables.values()):
        widths = np.array([[bar.get_width() for bar in bars] for bars in ax.containers])  # levels × classes
        np.testing.assert_allclose(widths, table.to_numpy().T)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(table.columns)


def test_a_column_of_many_levels_shows_the_most_probable_and_the_rest():
    rng = np.random.default_rng(2)
    table = pd.DataFrame(rng.dirichlet(np.ones(30), size=3), columns=[f"l{i:02d}" for i in range(30)])
    weights = [0.5, 0.3, 0.2]
    shown = shown_levels(table, weights)
    overall = np.asarray(weights) @ table.to_numpy()
    top = sorted(table.columns[np.argsort(-overall)[:SHOWN_LEVELS]])
    assert list(shown.columns) == top + [f"other ({30 - SHOWN_LEVELS} levels)"]
    np.testing.assert_allclose(shown.sum(axis=1), 1.0)
    np.testing.assert_allclose(shown[f"other ({30 - SHOWN_LEVELS} levels)"], 1.0 - table[top].sum(axis=1))
