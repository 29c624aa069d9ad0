"""The report of a `MixedMixtureModel` (docs/report.md): per-class profiles of a latent class model
— Bernoulli probabilities as a heat map, categorical distributions as stacked bars, Gaussian means
and Poisson rates as tables — with the class weights and the EM curve drawn as for a Gaussian
mixture (`report`'s figures and page). Needs matplotlib, imported only when drawing."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame

from .inputs import named_column
from .report import embed, html_table, likelihood_figure, page, sizes_figure

#: A categorical column's bars show this many levels (the most probable over all classes); the
#: rest are stacked as one "other" segment, so that a column of 1000 levels still reads.
SHOWN_LEVELS = 10
#: A segment of a stacked bar at least this wide is labelled with its probability.
LABELLED_SHARE = 0.08


def bernoulli_figure(probabilities: pd.DataFrame, values: dict):
    """(figure, alt, caption) of P(value coded 1 | class) as a heat map, classes × columns."""
    from matplotlib.figure import Figure

    p = probabilities.to_numpy()
    k, m = p.shape
    labels = [f"{name} = {values[name][1]}" for name in probabilities.columns]
    figure = Figure(figsize=(max(4.5, 1.1 * m + 2.5), max(2.5, 0.5 * k + 1.5)))
    ax = figure.subplots()
    image = ax.imshow(p, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for j in range(k):
        for i in range(m):
            ax.text(i, j, f"{p[j, i]:.2f}", ha="center", va="center", color="white" if p[j, i] < 0.6 else "black")
    ax.set_xticks(range(m), labels, rotation=30, ha="right")
    ax.set_yticks(range(k), [str(j) for j in range(k)])
    ax.set_xlabel("Bernoulli column = the value coded 1")
    ax.set_ylabel("class")
    ax.set_title("Bernoulli probabilities per class")
    figure.colorbar(image, ax=ax, label="P(value | class)")
    alt = "Heat map of the probability of each Bernoulli column's value per class: " + "; ".join(
        f"class {j}: " + ", ".join(f"{labels[i]} {p[j, i]:.2f}" for i in range(m)) for j in range(k)
    ) + "."
    caption = (
        "Each cell is the probability, in one class (row), that a Bernoulli column (column) takes the "
        "value named below it; the other value has the rest. Columns whose cells differ from row to row "
        "tell the classes apart; a column with the same colour in every row does not."
    )
    return figure, alt, caption


def shown_levels(table: pd.DataFrame, weights) -> pd.DataFrame:
    """`table` (k × levels) with at most SHOWN_LEVELS levels, the most probable over all classes
    (by class weight), in their sorted order, and the others summed into one 'other' column."""
    if table.shape[1] <= SHOWN_LEVELS:
        return table
    overall = np.asarray(weights) @ table.to_numpy()
    keep = sorted(np.argsort(-overall, kind="stable")[:SHOWN_LEVELS])
    shown = table.iloc[:, keep].copy()
    shown[f"other ({table.shape[1] - SHOWN_LEVELS} levels)"] = 1.0 - shown.sum(axis=1)
    return shown


def categorical_figure(tables: dict[str, pd.DataFrame], weights):
    """(figure, alt, caption): one panel per categorical column, a bar per class with its levels'
    probabilities stacked."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    k = len(weights)
    shown = {name: shown_levels(table, weights) for name, table in tables.items()}
    figure = Figure(figsize=(8.0, sum(0.45 * k + 1.3 for _ in shown)))
    axes = figure.subplots(len(shown), 1, squeeze=False)[:, 0]
    for ax, (name, table) in zip(axes, shown.items()):
        palette = colormaps["tab10" if table.shape[1] <= 10 else "tab20"]
        left = np.zeros(k)
        for i, level in enumerate(table.columns):
            width = table[level].to_numpy()
            ax.barh(range(k), width, left=left, color=palette(i % palette.N), edgecolor="white", label=str(level))
            for j in np.flatnonzero(width >= LABELLED_SHARE):
                ax.text(left[j] + width[j] / 2, j, f"{width[j]:.2f}", ha="center", va="center", fontsize=8)
            left += width
        ax.set_yticks(range(k), [f"class {j}" for j in range(k)])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(f"{name}: P(level | class)")
        ax.legend(title=name, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8)
    axes[-1].set_xlabel("probability (each bar sums to 1)")
    figure.tight_layout()
    alt = "Stacked bar charts, one per categorical column, of each class's distribution over levels: " + "; ".join(
        f"{name}: " + ", ".join(
            f"class {j} " + " ".join(f"{level} {table.iloc[j][level]:.2f}" for level in table.columns)
            for j in range(k))
        for name, table in shown.items()
    ) + "."
    caption = (
        "One panel per categorical column: each class's bar is split into the probabilities of the "
        "column's levels, in the legend's order, so a level's segment is its share within the class. "
        f"Columns with more than {SHOWN_LEVELS} levels show the {SHOWN_LEVELS} most frequent and stack "
        "the rest as 'other'."
    )
    return figure, alt, caption


def _class_table(values: pd.DataFrame, weights, spreads: pd.DataFrame | None = None, what=("mean", "std")) -> str:
    """One row per class: its weight, then each column's value (and spread)."""
    header = ["class", "weight"] + [f"{what[0]} {name}" for name in values.columns]
    rows = [[j, f"{weights[j]:.4f}"] + [f"{v:.4g}" for v in values.iloc[j]] for j in range(len(weights))]
    if spreads is not None:
        header += [f"{what[1]} {name}" for name in spreads.columns]
        rows = [row + [f"{v:.4g}" for v in spreads.iloc[j]] for j, row in enumerate(rows)]
    return html_table(header, rows)


def render_mixed_report(model, dataset: DataFrame, run: dict | None = None, history: list[float] | None = None,
                        total_weight: float | None = None) -> str:
    """The report's HTML for a `MixedMixtureModel` (history and total_weight: the EM objective per
    iteration and the weight it was summed over, by default the training summary's). `dataset`
    is read only when the model has no training figures: one aggregation of its class sizes."""
    from pyspark import __version__ as spark_version
    from pyspark.sql import functions as F

    from . import __version__

    began = time.perf_counter()
    summary, k, weights = model.trainingFigures, model.getK(), model.weights
    figures = []
    if history is None and summary is not None:
        history, total_weight = summary["objectiveHistory"], summary["totalWeight"]
    if history:
        figure, alt, caption = likelihood_figure(history, total_weight, summary["converged"] if summary else None)
        caption += (f" For a latent class model EM raises the log-likelihood plus the log prior of the smoothing "
                    f"(smoothing={model.getSmoothing():g}), which is drawn here.")
        figures.append((figure, alt, caption))
    if summary is not None:
        sizes = summary["clusterSizes"]
    else:
        scored = model.copy({model.handleInvalid: "keep"}).transform(dataset)
        counts = dict(scored.groupBy(named_column(model.getPredictionCol())).agg(F.count(F.lit(1))).collect())
        sizes = [counts.get(j, 0) for j in range(k)]
    figures.append(sizes_figure(weights, sizes, in_sample=False))
    types = model.featureTypes
    if types["bernoulli"]:
        figures.append(bernoulli_figure(model.bernoulliProbabilities, model.bernoulliValues))
    if types["categorical"]:
        figures.append(categorical_figure(model.categoricalProbabilities, weights))

    sections = ""
    if types["gaussian"]:
        means = model.means
        stds = pd.DataFrame([np.sqrt(np.diag(c.to_numpy())) for c in model.covariances], columns=means.columns)
        sections += "<h2>Gaussian columns: class means</h2>" + _class_table(means, weights, stds)
    if types["poisson"]:
        sections += "<h2>Count columns: class rates</h2>" + _class_table(model.poissonRates, weights, what=("rate",))
    settings = {
        "k": k, "covarianceType": model.getCovarianceType(),
        **{f"{kind} columns": ", ".join(names) or "—" for kind, names in types.items()},
        "smoothing": model.getSmoothing(), "handleInvalid": model.getHandleInvalid(), "rows": sum(sizes),
        "spark_gmm": __version__, "Spark": spark_version,
        **({"iterations": summary["numIter"], "converged": summary["converged"],
            "logLikelihood": summary["logLikelihood"], "rows left out": summary["invalidRowsSkipped"]}
           if summary else {}),
        **(run or {}), "report seconds": round(time.perf_counter() - began, 2),
    }
    return page("latent class (mixed) model report", "".join(embed(*figure) for figure in figures) + sections,
                settings)
