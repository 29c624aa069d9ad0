"""A fit report: one self-contained HTML file (pictures embedded as PNG, no network needed) showing
the log-likelihood per iteration, the data and the components in the two leading principal
components, weights and cluster sizes, per-component means and standard deviations, the model
selection curve, and the run's settings. Every picture has alt text and a caption that says how to
read it, for a reader who has not met EM before (a `MixedMixtureModel`'s report is
`report_mixed`'s, on the same page). Needs matplotlib (`pip install spark-gmm[report]`);
the figures are drawn on `matplotlib.figure.Figure` objects, so pyplot's global state is untouched."""

from __future__ import annotations

import base64
import html
import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame

from .inputs import named_column
from .rows import feature_rows

#: Rows drawn for the scatter plot: enough to see the clusters, bounded whatever the table's size.
SAMPLE_ROWS = 5000
#: The log-likelihood axis spans at least this fraction of the values' magnitude, so that a flat
#: history (EM started at its fixed point) shows as a flat line, not as round-off magnified.
MIN_RELATIVE_SPAN = 1e-3
#: Histories this short get each point's value written beside it.
LABELLED_POINTS = 3


def _moments(dataset: DataFrame, x, center: np.ndarray):
    """(n, mean, covariance) of the finite rows, in one distributed pass around `center`."""
    d = len(center)

    def partial(batches):
        n, first, second = 0, np.zeros(d), np.zeros((d, d))
        for batch in batches:
            x, missing, nonfinite = feature_rows(batch.column(0), d)
            values = x[~(missing | nonfinite)] - center
            n += len(values)
            first += values.sum(axis=0)
            second += values.T @ values
        yield pa.RecordBatch.from_pydict(
            {"n": [n], "first": [first.tolist()], "second": [second.ravel().tolist()]}
        )

    parts = dataset.select(x.alias("x")).mapInArrow(
        partial, "n long, first array<double>, second array<double>"
    ).toArrow()
    n = int(pc.sum(parts.column("n")).as_py() or 0)
    first = np.array(parts.column("first").to_pylist()).sum(axis=0) / max(n, 1)
    second = np.array(parts.column("second").to_pylist()).sum(axis=0).reshape(d, d) / max(n, 1)
    return n, center + first, second - np.outer(first, first)


def principal_axes(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two leading principal directions (d×2, zero columns when d < 2) and the share of the
    total variance each explains."""
    d = len(covariance)
    values, vectors = np.linalg.eigh(covariance)
    values, vectors = np.clip(values[::-1], 0, None), vectors[:, ::-1]
    axes, explained = np.zeros((d, 2)), np.zeros(2)
    axes[:, : min(d, 2)] = vectors[:, :2]
    explained[: min(d, 2)] = values[:2] / values.sum() if values.sum() > 0 else 0.0
    return axes, explained


def likelihood_curve(history: list[float], total_weight: float | None = None):
    """(iterations 0, 1, …, values, axis label): the log-likelihood after each EM iteration, per
    row (per unit of weight) when the total weight is known, otherwise the totals."""
    values = np.asarray(history, dtype=np.float64)
    if total_weight:
        return list(range(len(values))), (values / total_weight).tolist(), "log-likelihood per row"
    return list(range(len(values))), values.tolist(), "log-likelihood (total)"


def selection_deltas(selection: list[dict], criterion: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per covariance type, the candidates' k and their criterion minus the best (lowest) one."""
    best = min(row[criterion] for row in selection)
    curves = {}
    for kind in dict.fromkeys(row["covarianceType"] for row in selection):
        rows = sorted((row for row in selection if row["covarianceType"] == kind), key=lambda r: r["k"])
        curves[kind] = ([r["k"] for r in rows], [r[criterion] - best for r in rows])
    return curves


def _component_colours(k: int):
    """Component j's colour, the same in every picture."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if k <= 10 else "tab20"]
    return lambda j: palette(int(j) % palette.N)


def _plain(value: float) -> str:
    """A log-likelihood as a reader would write it: no exponent, thousands separated when large."""
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.6g}"


def likelihood_figure(history: list[float], total_weight: float | None = None, converged: bool | None = None):
    """(figure, alt, caption) of the log-likelihood against the EM iteration."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator, ScalarFormatter

    iterations, values, label = likelihood_curve(history, total_weight)
    figure = Figure(figsize=(6, 3.2))
    ax = figure.subplots()
    ax.plot(iterations, values, marker="o")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.5, max(iterations[-1], 1) + 0.5)
    low, high = min(values), max(values)
    half = max(high - low, MIN_RELATIVE_SPAN * max(abs(low), abs(high), 1.0)) * 0.6
    ax.set_ylim((low + high) / 2 - half, (low + high) / 2 + half)
    if max(abs(low), abs(high)) >= 1e4:  # the axis spans at least 10 here, so whole numbers do
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: _plain(value)))
    else:
        plain = ScalarFormatter(useOffset=False)
        plain.set_scientific(False)
        ax.yaxis.set_major_formatter(plain)
    if len(values) <= LABELLED_POINTS:
        for i, value in zip(iterations, values):
            ax.annotate(_plain(value), (i, value), xytext=(6, 6), textcoords="offset points")
    ax.set_xlabel("EM iteration (0 = the initial parameters)")
    ax.set_ylabel(label)
    ax.set_title("Log-likelihood per EM iteration")
    ax.grid(alpha=0.3)
    steps = iterations[-1]
    done = f"{steps} iteration{'s' * (steps != 1)}"
    ending = {True: " (converged)", False: " (stopped at maxIter, not converged)", None: ""}[converged]
    alt = (f"Line chart of the {label} against the EM iteration: {_plain(values[0])} at iteration 0, "
           f"{_plain(values[-1])} after {done}.")
    caption = (
        f"The {label} of the parameters after each EM iteration; iteration 0 is the start that the "
        "initialisation found. EM never lowers it, and the fit stops when an iteration gains less "
        f"than tol per row, or after maxIter iterations. Here it went from {_plain(values[0])} to "
        f"{_plain(values[-1])} in {done}{ending}."
    )
    if converged and steps <= 1:
        caption += (" A line this short means the initialisation already sat at EM's fixed point, "
                    "as happens when the clusters are far apart.")
    return figure, alt, caption


def scatter_figure(points, clusters, centres, spreads, explained, weights, rows: int):
    """(figure, alt, caption) of sampled rows and each component (mean, 1σ and 2σ ellipses) in the
    two leading principal components; `centres` (k×2) and `spreads` (k×2×2) are projected already."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Ellipse

    k = len(weights)
    colour = _component_colours(k)
    figure = Figure(figsize=(7.5, 5.5))
    ax = figure.subplots()
    ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.4, c=[colour(c) for c in clusters], linewidths=0)
    for j in range(k):
        radii, directions = np.linalg.eigh(spreads[j])
        angle = np.degrees(np.arctan2(directions[1, -1], directions[0, -1]))
        for scale, style in ((1.0, "-"), (2.0, "--")):  # black over the cluster's own colour
            ax.add_patch(Ellipse(centres[j], 2 * scale * np.sqrt(max(radii[-1], 0)),
                                 2 * scale * np.sqrt(max(radii[0], 0)), angle=angle, fill=False,
                                 edgecolor="black", linestyle=style, lw=1.2, zorder=3))
        ax.plot(*centres[j], "k+", ms=12, mew=2, zorder=4)
        box = {"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": colour(j), "alpha": 0.85}
        ax.annotate(str(j), centres[j], xytext=(9, 9), textcoords="offset points", fontsize=12,
                    fontweight="bold", zorder=5, bbox=box)
    key = [Line2D([], [], marker="o", linestyle="", color=colour(j), label=f"{j}: weight {weights[j]:.2f}")
           for j in range(k)]
    ax.legend(handles=key, title="component", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    share = [f"{100 * e:.0f}%" for e in explained]
    ax.set_xlabel(f"PC1 ({share[0]} of variance)")
    ax.set_ylabel(f"PC2 ({share[1]} of variance)")
    ax.set_title("Rows and components in the two leading principal components")
    ax.set_aspect("equal", adjustable="datalim")
    alt = (f"Scatter plot of {len(points)} sampled rows on the first two principal components "
           f"(PC1 {share[0]}, PC2 {share[1]} of the variance), coloured by cluster, with {k} numbered "
           "component means and their ellipses.")
    hidden = 1 - explained.sum()
    caption = (
        f"{len(points)} rows drawn at random from the {rows} rows, projected on the data's two "
        "principal components (the directions in which all rows vary most) and coloured by their "
        f"most probable component. PC1 and PC2 carry {share[0]} and {share[1]} of the total variance"
        + (f"; the other {100 * hidden:.0f}% is not shown, so clusters that overlap here may still be "
           "apart in other directions. " if hidden > 0.005 else ". ")
        + "Each component is drawn at its mean (+ and its number) with the ellipses of its covariance "
        "at 1σ (solid, about 39% of its rows inside in two dimensions) and 2σ (dashed, about 86%)."
    )
    return figure, alt, caption


def sizes_figure(weights, sizes, in_sample: bool):
    """(figure, alt, caption) of each component's weight beside its share of hard-assigned rows."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    k, total = len(weights), max(sum(sizes), 1)
    shares = [s / total for s in sizes]
    colour = _component_colours(k)
    figure = Figure(figsize=(max(5.0, 1.2 * k + 2), 3.2))
    ax = figure.subplots()
    position = np.arange(k)
    fill = [colour(j) for j in range(k)]
    ax.bar(position - 0.2, weights, width=0.4, color=fill, edgecolor="black")
    ax.bar(position + 0.2, shares, width=0.4, color=fill, alpha=0.45, hatch="//", edgecolor="black")
    ax.set_xticks(position)
    ax.set_xlabel("component")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, max(max(weights), max(shares)) * 1.2)
    key = [Patch(facecolor="lightgrey", edgecolor="black", label="weight"),
           Patch(facecolor="lightgrey", edgecolor="black", hatch="//", label="share of rows assigned")]
    ax.legend(handles=key, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    ax.set_title("Component weights and cluster sizes")
    rows = f"the {total} sampled rows" if in_sample else f"the {total} rows"
    alt = "Bar chart, per component, of its weight and of its share of rows: " + "; ".join(
        f"{j}: {weights[j]:.3f} and {shares[j]:.3f}" for j in range(k)) + "."
    caption = (
        "For each component, its weight (the model's estimate of the share of the data it generates) "
        f"beside the share of {rows} whose most probable component it is. The two differ where "
        "components overlap: a row in an overlap counts wholly for one of them, so large components "
        "tend to gain rows from smaller neighbours."
    )
    return figure, alt, caption


def selection_figure(selection: list[dict], criterion: str):
    """(figure, alt, caption) of each candidate's criterion minus the best, against k."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    name = criterion.upper()
    curves = selection_deltas(selection, criterion)
    figure = Figure(figsize=(6.5, 3.8))
    ax = figure.subplots()
    for kind, (ks, deltas) in curves.items():
        ax.plot(ks, deltas, marker="o", label=kind)
    chosen = next(row for row in selection if row["chosen"])
    ax.plot(chosen["k"], 0.0, "r*", ms=16, label=f"chosen (k={chosen['k']}, {chosen['covarianceType']})")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.set_ylim(bottom=-0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("k (components)")
    ax.set_ylabel(f"Δ {name} (0 = best)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"Model selection by {name}")
    alt = f"Line chart of Δ {name} against k per covariance type: " + "; ".join(
        f"{kind}: " + ", ".join(f"k={k} {delta:,.1f}" for k, delta in zip(ks, deltas))
        for kind, (ks, deltas) in curves.items()
    ) + "."
    caption = (
        f"Each candidate's {name} minus the lowest {name} of all candidates, against k, one line per "
        f"covariance type; the star marks the chosen candidate (Δ {name} = 0). Lower is better: "
        f"{name} rewards the fit's log-likelihood and charges for every parameter. The axis is linear "
        "below 1 and logarithmic above, so small and large differences both show; a difference of "
        "more than about 10 is usually read as strong evidence against the candidate."
    )
    return figure, alt, caption


def embed(figure, alt: str, caption: str) -> str:
    """The figure as a PNG inside <figure> with its alt text and caption."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode()
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def html_table(header: list[str], rows: list[list]) -> str:
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in row)  # noqa: E731
    return "<table><tr>" + cells("th", header) + "</tr>" + "".join(
        f"<tr>{cells('td', row)}</tr>" for row in rows
    ) + "</table>"


def drift_table(alignment: dict) -> str:
    """One row per component of an aligned model (and per retired one): its stable id, the id it
    continues, and how far it moved (docs/recurring.md)."""
    def figure(value, spec):
        return "—" if value is None else format(value, spec)

    rows = [[c["id"], figure(c["previousId"], "d") if c["previousId"] is not None else "new",
             figure(c["weight"], ".4f"), figure(c["weightChange"], "+.4f"), figure(c["meanShift"], ".3g"),
             figure(c["divergence"], ".3g"), figure(c.get("labelChange"), ".2%")]
            for c in alignment["components"]]
    rows += [["—", f"{r['previousId']} (retired)", "0", figure(-r["previousWeight"], "+.4f"), "—", "—", "—"]
             for r in alignment["retired"]]
    return html_table(["id", "previous id", "weight", "weight change", "mean shift (σ)", "divergence",
                   "rows relabelled"], rows)


def render_report(model, dataset: DataFrame, selection: list[dict] | None = None, criterion: str = "bic",
                  run: dict | None = None, history: list[float] | None = None,
                  total_weight: float | None = None) -> str:
    """The report's HTML for `model` on `dataset` (selection: candidate rows of a selection run;
    history: the log-likelihood per iteration and total_weight: the rows (weights) it was summed
    over, by default the model's training summary's)."""
    from pyspark import __version__ as spark_version

    from . import __version__
    from .mixed_model import MixedMixtureModel

    if isinstance(model, MixedMixtureModel):
        from .report_mixed import render_mixed_report

        return render_mixed_report(model, dataset, run, history, total_weight)
    began = time.perf_counter()
    summary = model.trainingFigures  # also on a loaded model
    x = model.featureColumn(dataset)
    means = model.means
    n, mean, covariance = _moments(dataset, x, (means.min(axis=0) + means.max(axis=0)) / 2)
    d, k = model.numFeatures, model.getK()
    axes, explained = principal_axes(covariance)
    names = model.featureNames or [f"x{i}" for i in range(d)]

    fraction = min(1.0, SAMPLE_ROWS / max(n, 1))
    scorer = model.copy({model.handleInvalid: "skip"})  # the pictures show the rows it can score
    sample = scorer.transform(dataset.sample(fraction=fraction, seed=0).limit(SAMPLE_ROWS))
    sample = sample.select(x.alias("x"), named_column(model.getPredictionCol()).alias("c")).toPandas()
    sample = sample[sample["c"].notna()]
    points = (np.stack(sample["x"].to_numpy()) - mean) @ axes if len(sample) else np.zeros((0, 2))
    clusters = sample["c"].astype(int).to_numpy()

    figures = []
    if history is None and summary is not None:
        history, total_weight = summary["logLikelihoodHistory"], summary.get("totalWeight")
    if history:
        figures.append(likelihood_figure(history, total_weight, summary["converged"] if summary else None))
    figures.append(scatter_figure(
        points, clusters, (means - mean) @ axes, np.einsum("di,kde,ej->kij", axes, model.covariances, axes),
        explained, model.weights, n,
    ))
    sizes = summary["clusterSizes"] if summary else np.bincount(clusters, minlength=k).tolist()
    figures.append(sizes_figure(model.weights, sizes, in_sample=summary is None))
    if selection:
        figures.append(selection_figure(selection, criterion))

    stds = np.sqrt(np.diagonal(model.covariances, axis1=1, axis2=2))
    components = html_table(
        ["component", "weight"] + [f"mean {name}" for name in names] + [f"std {name}" for name in names],
        [[j, f"{model.weights[j]:.4f}"] + [f"{v:.4g}" for v in means[j]] + [f"{v:.4g}" for v in stds[j]]
         for j in range(k)],
    )
    settings = {
        "k": k, "covarianceType": model.getCovarianceType(), "features": ", ".join(names),
        "rows": n, "spark_gmm": __version__, "Spark": spark_version,
        **({"iterations": summary["numIter"], "converged": summary["converged"],
            "logLikelihood": summary["logLikelihood"]} if summary else {}),
        **(run or {}), "report seconds": round(time.perf_counter() - began, 2),
    }
    candidates = html_table(list(selection[0]), [list(r.values()) for r in selection]) if selection else ""
    drift = drift_table(model.alignment) if model.alignment else ""
    return page(
        "Gaussian mixture report",
        "".join(embed(*figure) for figure in figures)
        + "<h2>Components</h2>" + components
        + ("<h2>Candidates</h2>" + candidates if candidates else "")
        + ("<h2>Drift from the previous model</h2>" + drift if drift else ""),
        settings,
    )


def page(title: str, body: str, settings: dict) -> str:
    """The report's self-contained HTML page: `body`, then the run's settings."""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>spark-gmm report</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"
        "figure{margin:1.5em 0}figcaption{max-width:50em;color:#333;font-size:0.95em}"
        f"</style></head><body><h1>spark-gmm: {html.escape(title)}</h1>" + body
        + "<h2>Run</h2>" + html_table(["setting", "value"], [[key, value] for key, value in settings.items()])
        + "</body></html>"
    )


def write_report(path: str, model, dataset: DataFrame, **options) -> None:
    """Render the report and write it to the local file `path`."""
    content = render_report(model, dataset, **options)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(content)
