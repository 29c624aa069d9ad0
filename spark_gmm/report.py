"""A fit report: one self-contained HTML file (pictures embedded as PNG, no network needed) showing
the log-likelihood per iteration, the data and the components in the two leading principal
components, weights and cluster sizes, per-component means and standard deviations, the model
selection curve, and the run's settings. Needs matplotlib (`pip install spark-gmm[report]`)."""

from __future__ import annotations

import base64
import html
import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, functions as F

#: Rows drawn for the scatter plot: enough to see the clusters, bounded whatever the table's size.
SAMPLE_ROWS = 5000


def _moments(dataset: DataFrame, x, center: np.ndarray):
    """(n, mean, covariance) of the finite rows, in one distributed pass around `center`."""
    d = len(center)

    def partial(batches):
        n, first, second = 0, np.zeros(d), np.zeros((d, d))
        for batch in batches:
            column = batch.column(0)
            whole = pc.equal(pc.list_value_length(column).fill_null(-1), d)
            values = pc.list_flatten(column.filter(whole)).to_numpy(zero_copy_only=False)
            values = values.astype(np.float64).reshape(-1, d) - center  # null elements become NaN
            values = values[np.isfinite(values).all(axis=1)]
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


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(header: list[str], rows: list[list]) -> str:
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in row)  # noqa: E731
    return "<table><tr>" + cells("th", header) + "</tr>" + "".join(
        f"<tr>{cells('td', row)}</tr>" for row in rows
    ) + "</table>"


def render_report(model, dataset: DataFrame, selection: list[dict] | None = None, criterion: str = "bic",
                  run: dict | None = None, history: list[float] | None = None) -> str:
    """The report's HTML for `model` on `dataset` (selection: candidate rows of a selection run;
    history: the log-likelihood per iteration, by default the model's training summary's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse
    from pyspark import __version__ as spark_version

    from . import __version__

    began = time.perf_counter()
    x = model._feature_array(dataset)
    n, mean, covariance = _moments(dataset, x, model._center)
    d, k = model.numFeatures, model.getK()
    values, vectors = np.linalg.eigh(covariance)
    axes = vectors[:, ::-1][:, :2] if d >= 2 else np.array([[1.0], [0.0]])[:d]
    if axes.shape[1] < 2:
        axes = np.column_stack([axes, np.zeros(d)])
    names = model.featureNames or [f"x{i}" for i in range(d)]

    fraction = min(1.0, SAMPLE_ROWS / max(n, 1))
    sample = model.transform(dataset.sample(fraction=fraction, seed=0).limit(SAMPLE_ROWS))
    sample = sample.select(x.alias("x"), F.col(f"`{model.getPredictionCol()}`").alias("c")).toPandas()
    sample = sample[sample["c"].notna()]
    points = (np.stack(sample["x"].to_numpy()) - mean) @ axes if len(sample) else np.zeros((0, 2))
    colours = plt.get_cmap("tab10" if k <= 10 else "tab20")
    pictures = []

    history = history or (model.summary.logLikelihoodHistory if model.hasSummary else None)
    if history:
        figure, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(range(len(history)), history, marker="o")
        ax.set_xlabel("iteration")
        ax.set_ylabel("log-likelihood")
        ax.set_title("Log-likelihood per EM iteration")
        pictures.append(_png(figure))
        plt.close(figure)

    figure, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.5,
               c=[colours(int(c) % colours.N) for c in sample["c"]])
    for j in range(k):
        centre = (model.means[j] - mean) @ axes
        spread = axes.T @ model.covariances[j] @ axes
        radii, directions = np.linalg.eigh(spread)
        angle = np.degrees(np.arctan2(directions[1, -1], directions[0, -1]))
        for scale, style in ((1.0, "-"), (2.0, "--")):  # black over the cluster's own colour
            ax.add_patch(Ellipse(centre, 2 * scale * np.sqrt(max(radii[-1], 0)),
                                 2 * scale * np.sqrt(max(radii[0], 0)), angle=angle, fill=False,
                                 edgecolor="black", linestyle=style, lw=1.2))
        ax.plot(*centre, "k+", ms=10)
        ax.annotate(str(j), centre, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(f"{len(sample)} sampled rows by cluster; components at 1σ (solid) and 2σ (dashed)")
    ax.set_aspect("equal", adjustable="datalim")
    pictures.append(_png(figure))
    plt.close(figure)

    sizes = model.summary.clusterSizes if model.hasSummary else np.bincount(
        sample["c"].astype(int), minlength=k).tolist()
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    left.bar(range(k), model.weights, color=[colours(j % colours.N) for j in range(k)])
    left.set_title("component weights")
    right.bar(range(k), sizes, color=[colours(j % colours.N) for j in range(k)])
    right.set_title("cluster sizes" + ("" if model.hasSummary else " (in the sample)"))
    for ax in (left, right):
        ax.set_xlabel("component")
    pictures.append(_png(figure))
    plt.close(figure)

    if selection:
        figure, ax = plt.subplots(figsize=(6, 3.5))
        for kind in dict.fromkeys(row["covarianceType"] for row in selection):
            rows = [row for row in selection if row["covarianceType"] == kind]
            ax.plot([r["k"] for r in rows], [r[criterion] for r in rows], marker="o", label=kind)
        chosen = [row for row in selection if row["chosen"]][0]
        ax.plot(chosen["k"], chosen[criterion], "r*", ms=16, label="chosen")
        ax.set_xlabel("k")
        ax.set_ylabel(criterion.upper())
        ax.legend()
        ax.set_title(f"Model selection by {criterion.upper()}")
        pictures.append(_png(figure))
        plt.close(figure)

    stds = np.sqrt(np.diagonal(model.covariances, axis1=1, axis2=2))
    components = _table(
        ["component", "weight"] + [f"mean {name}" for name in names] + [f"std {name}" for name in names],
        [[j, f"{model.weights[j]:.4f}"] + [f"{v:.4g}" for v in model.means[j]] + [f"{v:.4g}" for v in stds[j]]
         for j in range(k)],
    )
    settings = {
        "k": k, "covarianceType": model.getCovarianceType(), "features": ", ".join(names),
        "rows": n, "spark_gmm": __version__, "Spark": spark_version,
        **({"iterations": model.summary.numIter, "converged": model.summary.converged,
            "logLikelihood": model.summary.logLikelihood} if model.hasSummary else {}),
        **(run or {}), "report seconds": round(time.perf_counter() - began, 2),
    }
    candidates = _table(list(selection[0]), [list(r.values()) for r in selection]) if selection else ""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>spark-gmm report</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%;margin:1em 0}"
        "</style></head><body><h1>spark-gmm: Gaussian mixture report</h1>"
        + "".join(pictures)
        + "<h2>Components</h2>" + components
        + ("<h2>Candidates</h2>" + candidates if candidates else "")
        + "<h2>Run</h2>" + _table(["setting", "value"], [[key, value] for key, value in settings.items()])
        + "</body></html>"
    )


def write_report(path: str, model, dataset: DataFrame, **options) -> None:
    """Render the report and write it to the local file `path`."""
    content = render_report(model, dataset, **options)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(content)
