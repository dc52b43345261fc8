"""Plotly figures for the metrics and the benchmark runner: curves, metric bars, clutter sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mmelkit._io import atomic_write_text
from mmelkit.metrics.registry import METRICS


def perturbation_curves_figure(curves: dict[str, Any], title: str = "", show_samples: int = 0) -> go.Figure:
    """Mean curve per entry of ``curves`` (label -> :class:`~mmelkit.metrics.faithfulness.Curves`),
    with the AUC in the legend; ``show_samples`` thin lines of single samples per entry."""
    figure = go.Figure()
    first = None
    for label, curve in curves.items():
        first = first or curve
        x = curve.fractions.cpu().numpy()
        for k in range(min(show_samples, len(curve.scores))):
            figure.add_trace(go.Scatter(x=x, y=curve.scores[k].cpu().numpy(), mode="lines", opacity=0.25,
                                        line={"width": 1}, showlegend=False, hoverinfo="skip", legendgroup=label))
        figure.add_trace(go.Scatter(x=x, y=curve.mean_curve().cpu().numpy(), mode="lines", legendgroup=label,
                                    name=f"{label} (AUC {float(curve.auc.mean()):.3f})"))
    if first is not None:
        figure.update_layout(title=title or f"{first.mode} curves ({first.substrate} substrate)",
                             xaxis_title=f"fraction of pixels {'removed' if first.mode == 'deletion' else 'inserted'}",
                             yaxis_title=first.score, template="plotly_white")
    return figure


def retrieval_curves_figure(curves: dict[str, Any], title: str = "") -> go.Figure:
    """Image- and text-retrieval Recall@k side by side for label -> RetrievalCurves."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("image retrieval", "text retrieval"))
    for n, (label, curve) in enumerate(curves.items()):
        colour = _colour(n)
        x = curve.fractions.cpu().numpy()
        figure.add_trace(go.Scatter(x=x, y=curve.image_retrieval.cpu().numpy(), name=f"{label} (AUC {curve.image_retrieval_auc:.3f})",
                                    line={"color": colour}, legendgroup=label), row=1, col=1)
        figure.add_trace(go.Scatter(x=x, y=curve.text_retrieval.cpu().numpy(), name=f"{label} (AUC {curve.text_retrieval_auc:.3f})",
                                    line={"color": colour, "dash": "dot"}, legendgroup=label), row=1, col=2)
    figure.update_xaxes(title_text="fraction of pixels perturbed")
    figure.update_yaxes(title_text="Recall@1", range=[0, 1.02])
    figure.update_layout(title=title or "retrieval protocol", template="plotly_white")
    return figure


def image_row(model: Any, images: Any, labels: list[str], title: str = "") -> go.Figure:
    """A row of model-input images (S, 3, H, W), un-normalised for display, one label each."""
    from mmelkit.viz.explanations import display_image

    count = len(images)
    if len(labels) != count:
        raise ValueError(f"got {len(labels)} labels for {count} images")
    figure = make_subplots(rows=1, cols=count, subplot_titles=labels, horizontal_spacing=0.01)
    for k in range(count):
        array = display_image(images[k:k + 1].float(), mean=model.backend.image_mean, std=model.backend.image_std)
        figure.add_trace(go.Image(z=array), row=1, col=k + 1)
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    figure.update_layout(title=title, height=220, margin={"l": 10, "r": 10, "t": 60, "b": 10})
    return figure


def perturbation_strip(model: Any, images: Any, fractions: Any, title: str = "") -> go.Figure:
    """Perturbed copies (S, 3, H, W) of one image, e.g. ``perturbed_images(...)[0]``, labelled
    with their fractions."""
    return image_row(model, images, [f"{float(f):.0%}" for f in fractions], title)


def _colour(n: int) -> str:
    import plotly.colors

    palette = plotly.colors.qualitative.Plotly
    return palette[n % len(palette)]


def metric_bars(table: Any, metric: str, dataset: str | None = None) -> go.Figure:
    """Bars of one metric per method (with standard errors) from a bench ``table``."""
    rows = table[table["metric"] == metric]
    if dataset is not None:
        rows = rows[rows["dataset"] == dataset]
    info = METRICS[metric]
    figure = go.Figure()
    for name, group in rows.groupby("dataset", sort=False):
        figure.add_trace(go.Bar(x=group["method"], y=group["value"], name=str(name),
                                error_y={"type": "data", "array": group["sem"].fillna(0).tolist()}))
    figure.update_layout(title=f"{metric} ({info.direction})", yaxis_title=metric, template="plotly_white",
                         barmode="group")
    return figure


def sweep_figure(table: Any, metric: str, x_of_dataset: dict[str, float], x_title: str = "objects per scene") -> go.Figure:
    """One line per method of ``metric`` against a number attached to each dataset (a clutter sweep)."""
    rows = table[(table["metric"] == metric) & table["dataset"].isin(list(x_of_dataset))]
    figure = go.Figure()
    for name, group in rows.groupby("method", sort=False):
        group = group.assign(x=group["dataset"].map(x_of_dataset)).sort_values("x")
        figure.add_trace(go.Scatter(x=group["x"], y=group["value"], mode="lines+markers", name=str(name),
                                    error_y={"type": "data", "array": group["sem"].fillna(0).tolist()}))
    figure.update_layout(title=f"{metric} against clutter ({METRICS[metric].direction})", xaxis_title=x_title,
                         yaxis_title=metric, template="plotly_white")
    return figure


def bench_figures(result: Any) -> list[go.Figure]:
    """The figures a benchmark run writes: mean curves per dataset and a bar chart per metric."""
    figures = []
    for dataset in result.config.datasets:
        for curve in ("deletion_auc", "insertion_auc"):
            lines = {key.split("|")[1]: value for key, value in result.curves.items()
                     if key.startswith(f"{dataset}|") and key.endswith(f"|{curve}")}
            if lines:
                figure = go.Figure()
                for method, value in lines.items():
                    figure.add_trace(go.Scatter(x=value["fractions"], y=value["mean"], mode="lines", name=method))
                figure.update_layout(title=f"{curve.split('_')[0]} curves on {dataset}", template="plotly_white",
                                     xaxis_title="fraction of pixels", yaxis_title=lines[next(iter(lines))]["score"])
                figures.append(figure)
        for mode in ("deletion", "insertion"):
            lines = {key.split("|")[1]: value for key, value in result.curves.items()
                     if key.startswith(f"{dataset}|") and key.endswith(f"|{mode}_retrieval")}
            if lines:
                figure = make_subplots(rows=1, cols=2, subplot_titles=("image retrieval", "text retrieval"))
                for n, (method, value) in enumerate(lines.items()):
                    for col, kind in ((1, "image_retrieval"), (2, "text_retrieval")):
                        figure.add_trace(go.Scatter(x=value["fractions"], y=value[kind], name=method, legendgroup=method,
                                                    showlegend=col == 1, line={"color": _colour(n)}), row=1, col=col)
                figure.update_layout(title=f"retrieval Recall@1 under {mode} on {dataset}", template="plotly_white")
                figures.append(figure)
    for metric in result.config.metrics:
        figures.append(metric_bars(result.table, metric))
    return figures


def write_figures(figures: list[go.Figure], path: str | Path) -> Path:
    """All figures in one self-contained HTML file (plotly.js inlined once: it opens offline),
    written atomically (an interrupted write leaves the previous file)."""
    path = Path(path)
    parts = [figure.to_html(full_html=False, include_plotlyjs=(n == 0)) for n, figure in enumerate(figures)]
    atomic_write_text(path, "<html><head><meta charset='utf-8'></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    return path
