"""Figures for the generative-VLM tools (plotly): attention knockout curves, causal-tracing maps
and the logit lens's words on the patch grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go


def knockout_figure(result: Any, rows: Sequence[int] | None = None, titles: Sequence[str] | None = None) -> go.Figure:
    """The relative drop of p(answer) per first knocked-out layer, a line per row of a
    :class:`~mmelkit.methods.layer.KnockoutResult`."""
    rows = list(range(len(result.answers))) if rows is None else list(rows)
    names = list(titles) if titles is not None else [f"row {r}: {result.answers[r]!r}" for r in rows]
    figure = go.Figure()
    for row, name in zip(rows, names, strict=True):
        figure.add_trace(go.Scatter(x=result.starts, y=result.drops[row].cpu().tolist(), mode="lines+markers", name=name))
    figure.add_hline(y=0, line_width=0.5, line_color="grey")
    return figure.update_layout(
        xaxis_title=f"first knocked-out decoder layer (window {result.window})",
        yaxis_title="relative drop of p(answer)", height=320, width=620, margin=dict(l=60, r=20, t=30, b=50),
    )


def causal_trace_figure(trace: Any, row: int = 0, title: str | None = None) -> go.Figure:
    """The layers x positions recovery map of one row of a
    :class:`~mmelkit.methods.layer.CausalTrace` (0: as corrupted, 1: as clean); the visual
    tokens' columns are shaded."""
    effect = trace.effect[row].cpu()
    figure = go.Figure(go.Heatmap(z=effect.tolist(), colorscale="Magma", zmin=0, zmax=1,
                                  colorbar=dict(title="recovery")))
    visual = trace.visual_positions[row].cpu()
    figure.add_vrect(x0=float(visual.min()) - 0.5, x1=float(visual.max()) + 0.5, line_width=0,
                     fillcolor="cyan", opacity=0.12, annotation_text="visual tokens", annotation_position="top left")
    return figure.update_layout(
        title=title or f"restoring one clean state: recovery of p({trace.answers[row]!r})",
        xaxis_title="sequence position", yaxis_title="decoder layer", height=300, width=820,
        margin=dict(l=60, r=20, t=50, b=50),
    )


def logit_lens_figure(lens: Any, row: int = 0, layers: Sequence[int] | None = None) -> go.Figure:
    """The top-1 word of every visual token on the patch grid, one panel per layer (0 = the
    decoder's input), coloured by its probability."""
    from plotly.subplots import make_subplots

    depth = lens.top_ids.shape[1]
    layers = list(range(depth)) if layers is None else list(layers)
    titles = ["input" if layer == 0 else f"after layer {layer - 1}" for layer in layers]
    figure = make_subplots(rows=1, cols=len(layers), subplot_titles=titles, horizontal_spacing=0.02)
    rows, cols = lens.grid
    for column, layer in enumerate(layers, start=1):
        words = lens.words(row, layer)
        probs = lens.top_probs[row, layer, :, 0].reshape(rows, cols).cpu().tolist()
        figure.add_trace(go.Heatmap(z=probs, text=words, texttemplate="%{text}", textfont=dict(size=8),
                                    colorscale="Blues", zmin=0, zmax=1, showscale=column == len(layers)),
                         row=1, col=column)
    figure.update_yaxes(autorange="reversed", showticklabels=False).update_xaxes(showticklabels=False)
    return figure.update_layout(height=260, width=220 * len(layers) + 80, margin=dict(l=10, r=10, t=40, b=10))
