"""Figures for the CLIP-tower representation tools (plotly): accuracy per layer (probes, logit lens),
per-head heatmaps (mean-ablation drops, variance explained) and score distributions against their
baselines (neuron labels, sparse-autoencoder features)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import torch


def layer_accuracy_figure(frame: Any, *, title: str = "held-out accuracy per block",
                          extra: Mapping[str, Sequence[float]] | None = None) -> go.Figure:
    """One line per (task, site) of a probe table (columns task, site, layer, accuracy, chance), a
    dotted line at each task's chance rate; ``extra`` adds named curves over the same layers (the
    logit lens, say)."""
    figure = go.Figure()
    layers = sorted(set(frame["layer"]))
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    tasks = list(dict.fromkeys(frame["task"]))
    for index, task in enumerate(tasks):
        colour = palette[index % len(palette)]
        rows = frame[frame["task"] == task]
        for site in dict.fromkeys(rows["site"]):
            part = rows[rows["site"] == site].sort_values("layer")
            figure.add_trace(go.Scatter(
                x=part["layer"].tolist(), y=part["accuracy"].tolist(), mode="lines+markers", name=f"{task} · {site}",
                line=dict(color=colour, dash="solid" if site == "cls" else "dash"),
            ))
        chance = float(rows["chance"].iloc[0])
        figure.add_trace(go.Scatter(x=[layers[0], layers[-1]], y=[chance, chance], mode="lines", showlegend=False,
                                    line=dict(color=colour, dash="dot", width=1), hoverinfo="skip"))
    for name, values in (extra or {}).items():
        figure.add_trace(go.Scatter(x=layers, y=list(values), mode="lines+markers", name=name,
                                    line=dict(color="black", width=3)))
    return figure.update_layout(
        title=title, xaxis_title="after block", yaxis_title="accuracy", yaxis_range=[0, 1.02],
        xaxis=dict(tickmode="array", tickvals=layers), height=380, width=720, margin=dict(l=60, r=20, t=50, b=50),
    )


def head_heatmap(values: torch.Tensor, *, title: str, colorbar: str, layers: Sequence[int] | None = None,
                 colorscale: str = "Reds", text: Sequence[Sequence[str]] | None = None) -> go.Figure:
    """A (layers, heads) heatmap, e.g. the accuracy drop of mean-ablating each head; ``text`` writes
    a label into each cell (TextSpan's first pick, say)."""
    grid = values.detach().float().cpu()
    layer_names = [f"block {layer}" for layer in (layers if layers is not None else range(grid.shape[0]))]
    heat = go.Heatmap(z=grid.tolist(), x=[f"head {h}" for h in range(grid.shape[1])], y=layer_names,
                      colorscale=colorscale, colorbar=dict(title=colorbar),
                      text=[list(row) for row in text] if text is not None else None,
                      texttemplate="%{text}" if text is not None else None, textfont=dict(size=10))
    return go.Figure(heat).update_layout(
        title=title, height=120 + 48 * grid.shape[0], width=220 + 130 * grid.shape[1],
        margin=dict(l=80, r=20, t=50, b=40),
    )


def baseline_comparison_figure(scores: Mapping[str, torch.Tensor | Sequence[float]], *, title: str,
                               axis: str, reference: float | None = None) -> go.Figure:
    """Distributions of one score (best-concept AUROC of each feature, say) for several sources side by
    side as box plots with every point; ``reference`` draws a line (chance)."""
    figure = go.Figure()
    for name, values in scores.items():
        data = values.detach().float().cpu().tolist() if isinstance(values, torch.Tensor) else list(values)
        figure.add_trace(go.Box(y=data, name=name, boxpoints="all", jitter=0.4, pointpos=0, marker=dict(size=3)))
    if reference is not None:
        figure.add_hline(y=reference, line_dash="dot", line_color="grey")
    return figure.update_layout(title=title, yaxis_title=axis, showlegend=False, height=380, width=620,
                                margin=dict(l=60, r=20, t=50, b=40))


def rate_with_interval_figure(rows: Sequence[Mapping[str, Any]], *, title: str, axis: str) -> go.Figure:
    """Bars with 95% intervals: each row a dict with ``name``, ``value``, ``low``, ``high``."""
    names = [row["name"] for row in rows]
    values = [float(row["value"]) for row in rows]
    figure = go.Figure(go.Bar(
        x=names, y=values,
        error_y=dict(type="data", symmetric=False, array=[float(r["high"]) - float(r["value"]) for r in rows],
                     arrayminus=[float(r["value"]) - float(r["low"]) for r in rows]),
        marker_color=["#1f77b4" if "random" not in n.lower() else "#bbbbbb" for n in names],
    ))
    return figure.update_layout(title=title, yaxis_title=axis, height=340, width=560, margin=dict(l=60, r=20, t=50, b=60))
