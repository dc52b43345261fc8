"""Plotly figure for the model-randomisation sanity check (:mod:`mmelkit.methods.sanity`)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go


def _x_labels(frame: Any) -> list[str]:
    return ["trained" if step == 0 else c for step, c in zip(frame["step"], frame["component"], strict=True)]


def randomisation_figure(table: Any, threshold: float | None = None, title: str | None = None) -> go.Figure:
    """One line per method: x = the component randomised at each step (in step order), y = the
    mean Spearman correlation with the trained model's map, error bars = its std over pairs.

    ``table`` comes from :func:`~mmelkit.methods.sanity.randomisation_check`. A dashed line marks
    ``threshold`` (default: the table's own). Steps where a method raised have no point; the
    method still has its legend entry, labelled "(error)".
    """
    mode = table.attrs.get("mode", "cascading")
    if threshold is None:
        threshold = table.attrs.get("threshold")
    order = table.drop_duplicates("step").sort_values("step")
    categories = _x_labels(order)
    figure = go.Figure()
    for name, group in table.groupby("method", sort=False):
        group = group.sort_values("step")
        errors = group["error"].map(lambda e: isinstance(e, str))
        label = f"{name} (error)" if errors.any() else name
        figure.add_trace(go.Scatter(
            x=_x_labels(group),
            y=group["spearman_mean"].where(~errors),
            error_y=dict(type="data", array=group["spearman_std"].where(~errors).fillna(0).tolist(), visible=True),
            mode="lines+markers",
            name=label,
            hovertext=[e if isinstance(e, str) else r for e, r in zip(group["error"], group["randomised"], strict=True)],
        ))
    if threshold is not None:
        figure.add_hline(y=float(threshold), line_dash="dash", line_color="grey",
                         annotation_text=f"threshold {float(threshold):g}", annotation_position="bottom left")
    how = "cascading, from the top" if mode == "cascading" else "independently, one component at a time"
    return figure.update_layout(
        title=title or f"Model randomisation sanity check ({how})",
        xaxis=dict(title="randomised component", categoryorder="array", categoryarray=categories),
        yaxis=dict(title="Spearman rank correlation with the trained model's map", range=[-1.05, 1.05]),
        height=460,
    )


__all__ = ["randomisation_figure"]
