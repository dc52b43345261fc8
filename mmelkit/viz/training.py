"""Plotly figures for training-level interpretability (chapter 04, explanation-guided learning).

* :func:`sample_gallery` -- training images with their target masks (withheld ones left bare);
* :func:`cam_gallery` -- images by rows, one column of maps (Grad-CAMs, masks...) per title;
* :func:`loss_curves` -- each loss part over training steps, one line per run;
* :func:`study_bars` -- one panel per metric, a bar per configuration, error bars = std over seeds;
* :func:`rationale_table` -- reference and generated rationales side by side.

Images are (N, H, W, 3) uint8 arrays (``MeglSplit.raw_images``); maps are (N, h, w) tensors or
arrays, upsampled to the image. Tensors move to the CPU here, at plot time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mmelkit.viz.explanations import explanation_grid
from mmelkit.viz.figures import overlay_masks

# Metric directions, for panel titles (kept here so that plotting needs no training imports).
_DIRECTION = {
    "test_acc": "higher", "test_f1": "higher", "debiased_acc": "higher", "debiased_f1": "higher",
    "shortcut": "lower", "iou": "higher", "pointing": "higher", "cue_energy": "lower",
    "bleu4": "higher", "rouge_l": "higher", "clip_score": "higher",
}
_ARROW = {"higher": " ↑", "lower": " ↓"}


def _image_stack(images: Any) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8; got shape {array.shape}, dtype {array.dtype}")
    if len(array) == 0:
        raise ValueError("no images to show")
    return array


def sample_gallery(
    images: Any,
    titles: Sequence[str],
    masks: Sequence[Any] | None = None,
    columns: int = 4,
    tile: int = 170,
) -> go.Figure:
    """A grid of images, each with its mask tinted and outlined (``None``: a withheld mask, shown bare).

    ``images``: (N, H, W, 3) uint8. ``titles``: one per image (``<br>`` breaks lines). ``masks``:
    one (H, W) bool array or tensor per image, or ``None`` for that image; default: no masks.
    """
    pictures = _image_stack(images)
    titles = list(titles)
    if len(titles) != len(pictures):
        raise ValueError(f"{len(titles)} titles for {len(pictures)} images")
    if masks is not None and len(masks) != len(pictures):
        raise ValueError(f"{len(masks)} masks for {len(pictures)} images")
    if columns < 1:
        raise ValueError(f"columns must be at least 1; got {columns}")
    columns = min(columns, len(pictures))
    rows = math.ceil(len(pictures) / columns)
    figure = make_subplots(rows=rows, cols=columns, subplot_titles=titles, horizontal_spacing=0.02,
                           vertical_spacing=0.12 / rows)
    for i, picture in enumerate(pictures):
        mask = None if masks is None else masks[i]
        if mask is not None:
            mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            if mask.shape != picture.shape[:2]:
                raise ValueError(f"mask {i} has shape {mask.shape}; its image is {picture.shape[:2]}")
            picture = overlay_masks(picture, mask.astype(bool)[None])
        figure.add_trace(go.Image(z=picture, hoverinfo="skip"), row=i // columns + 1, col=i % columns + 1)
    figure.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    figure.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    figure.update_annotations(font_size=10)
    return figure.update_layout(height=rows * (tile + 30) + 30, width=columns * tile + 20,
                                margin=dict(l=5, r=5, t=50, b=5))


def cam_gallery(
    images: Any,
    maps_by_title: Mapping[str, Any],
    titles: Sequence[str],
    opacity: float = 0.55,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    tile: int = 150,
) -> go.Figure:
    """A row per image, the plain image first, then one column per entry of ``maps_by_title``
    (title -> (N, h, w) maps: Grad-CAMs of several models, a mask next to a pseudo-mask...).

    ``titles``: one row title per image. ``value_range``: the shared colour scale (maps of
    :func:`~mmelkit.training.megl.models.grad_cam` and masks lie in [0, 1]); ``None``: automatic.
    A thin wrapper of :func:`~mmelkit.viz.explanations.explanation_grid`.
    """
    pictures = _image_stack(images)
    if not maps_by_title:
        raise ValueError("no maps to show: pass {column title: (N, h, w) maps}")
    maps: dict[str, torch.Tensor] = {}
    for name, value in maps_by_title.items():
        tensor = torch.as_tensor(value.detach().cpu() if isinstance(value, torch.Tensor) else np.asarray(value)).float()
        if tensor.dim() != 3 or len(tensor) != len(pictures):
            raise ValueError(f"maps {name!r} must be (N, h, w) with N = {len(pictures)} images; got {tuple(tensor.shape)}")
        maps[name] = tensor
    if len(titles) != len(pictures):
        raise ValueError(f"{len(titles)} titles for {len(pictures)} images")
    figure = explanation_grid(list(pictures), maps, texts=list(titles), opacity=opacity, tile=tile)
    if value_range is not None:
        figure.update_layout(coloraxis_cmin=value_range[0], coloraxis_cmax=value_range[1])
    return figure


def loss_curves(
    history_by_config: Mapping[str, Sequence[Mapping[str, float]]],
    parts: Sequence[str] | None = None,
    title: str = "training losses",
) -> go.Figure:
    """One panel per loss part, one line per run: ``{name: model.history}``, each history a list
    of ``{"step": t, "cls": ..., "att": ...}`` as :func:`~mmelkit.training.megl.train_megl` logs.

    ``parts``: the panels, in order (default: every part any run logged, in the order
    cls, att, tsv, dc, txt, then others). A run without a part has no line in that panel.
    """
    if not history_by_config:
        raise ValueError("no runs to plot: pass {name: model.history}")
    for name, history in history_by_config.items():
        if not history:
            raise ValueError(f"run {name!r} has an empty history")
        if any("step" not in entry for entry in history):
            raise ValueError(f"run {name!r}: every history entry needs a 'step'")
    logged = list(dict.fromkeys(k for h in history_by_config.values() for e in h for k in e if k != "step"))
    order = ["cls", "att", "tsv", "dc", "txt"]
    if parts is None:
        parts = [p for p in order if p in logged] + [p for p in logged if p not in order]
    parts = list(parts)
    missing = [p for p in parts if p not in logged]
    if not parts or missing:
        raise ValueError(f"no run logged {missing or 'any loss'}; logged parts: {logged}")
    figure = make_subplots(rows=1, cols=len(parts), subplot_titles=[f"L_{p}" for p in parts], horizontal_spacing=0.05)
    palette = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880",
               "#ff97ff", "#fecb52"]
    for n, (name, history) in enumerate(history_by_config.items()):
        shown = False
        for col, part in enumerate(parts, start=1):
            points = [(e["step"], e[part]) for e in history if part in e]
            if not points:
                continue
            figure.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines", name=name,
                                        legendgroup=name, showlegend=not shown,
                                        line={"color": palette[n % len(palette)]}), row=1, col=col)
            shown = True
    figure.update_xaxes(title_text="step")
    return figure.update_layout(title=title, height=320, width=max(500, 260 * len(parts)), template="plotly_white")


def _summary_rows(result_or_summary: Any) -> list[dict[str, Any]]:
    rows = result_or_summary.summary() if hasattr(result_or_summary, "summary") else result_or_summary
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("the summary is empty: no configuration to plot")
    if any("config" not in r for r in rows):
        raise ValueError("every summary row needs a 'config' (pass a StudyResult or its .summary())")
    return rows


def study_bars(
    result_or_summary: Any,
    metrics: Sequence[str] = ("debiased_acc", "iou"),
    title: str = "explanation-guided training: mean over seeds (error bars: std)",
    chance: Mapping[str, float] | None = None,
) -> go.Figure:
    """One panel per metric, one bar per configuration: the mean over seeds, the error bar its
    standard deviation (``<metric>_std``; none with a single seed).

    ``result_or_summary``: a :class:`~mmelkit.training.megl.StudyResult` or its ``summary()``
    (a list of dicts with ``config``, ``<metric>`` and ``<metric>_std``). ``chance``: metric ->
    value drawn as a dashed line in that metric's panel (e.g. 0.25 for de-biased accuracy with
    four classes). Metrics a configuration lacks (NaN: rationales of a model without a generator)
    have no bar.
    """
    rows = _summary_rows(result_or_summary)
    metrics = list(metrics)
    if not metrics:
        raise ValueError("give at least one metric")
    unknown = [m for m in metrics if any(m not in r for r in rows)]
    if unknown:
        known = [k for k in rows[0] if k not in ("config", "seeds") and not k.endswith("_std")]
        raise ValueError(f"metrics {unknown} are not in the summary; it has {known}")
    chance = dict(chance or {})
    stray = [m for m in chance if m not in metrics]
    if stray:
        raise ValueError(f"chance levels for metrics that are not plotted: {stray}")
    configs = [str(r["config"]) for r in rows]
    names = [m + _ARROW.get(_DIRECTION.get(m, ""), "") for m in metrics]
    figure = make_subplots(rows=1, cols=len(metrics), subplot_titles=names, horizontal_spacing=0.06)
    for col, metric in enumerate(metrics, start=1):
        values = [float(r[metric]) for r in rows]
        spread = [float(r.get(f"{metric}_std", 0.0)) for r in rows]
        spread = [0.0 if math.isnan(s) else s for s in spread]
        figure.add_trace(go.Bar(x=configs, y=values, name=metric, showlegend=False,
                                error_y={"type": "data", "array": spread, "visible": any(spread)},
                                hovertemplate="%{x}: %{y:.3f}<extra>" + metric + "</extra>"), row=1, col=col)
        if metric in chance:
            figure.add_hline(y=chance[metric], line_dash="dash", line_color="grey", row=1, col=col,
                             annotation_text="chance", annotation_position="top right")
    figure.update_xaxes(tickangle=-40)
    return figure.update_layout(title=title, height=400, width=max(500, 90 * len(configs) * len(metrics) + 120),
                                template="plotly_white")


def _mark_differences(text: str, reference: str) -> str:
    """``text`` with the words that differ from ``reference`` (position by position) in bold."""
    ref = reference.split()
    return " ".join(w if i < len(ref) and ref[i] == w else f"<b>{w}</b>" for i, w in enumerate(text.split()))


def rationale_table(
    columns: Mapping[str, Sequence[str]],
    reference: str | None = "reference",
    title: str = "rationales",
    row_labels: Sequence[str] | None = None,
) -> go.Figure:
    """A plotly table of rationales: one column per source (``{"reference": [...], "megl": [...]}``),
    one row per image.

    ``reference``: the column the others are compared to; words of the other columns that differ
    from it at the same position are shown in bold (``None``: no marking). ``row_labels``: a first
    column naming the rows (say, the image index).
    """
    if not columns:
        raise ValueError("no rationales to show")
    lengths = {name: len(texts) for name, texts in columns.items()}
    count = next(iter(lengths.values()))
    if set(lengths.values()) != {count}:
        raise ValueError(f"every column needs the same number of rationales; got {lengths}")
    if reference is not None and reference not in columns:
        raise ValueError(f"no reference column {reference!r}; columns: {list(columns)}")
    if row_labels is not None and len(row_labels) != count:
        raise ValueError(f"{len(row_labels)} row labels for {count} rows")
    header = ([""] if row_labels is not None else []) + list(columns)
    cells: list[list[str]] = [[str(x) for x in row_labels]] if row_labels is not None else []
    for name, texts in columns.items():
        if reference is None or name == reference:
            cells.append([str(t) for t in texts])
        else:
            cells.append([_mark_differences(str(t), str(r)) for t, r in zip(texts, columns[reference], strict=True)])
    widths = ([0.25] if row_labels is not None else []) + [1.0] * len(columns)
    figure = go.Figure(go.Table(header={"values": [f"<b>{h}</b>" for h in header], "align": "left"},
                                cells={"values": cells, "align": "left", "height": 24}, columnwidth=widths))
    return figure.update_layout(title=title, height=110 + 26 * count, width=max(500, 260 * len(columns) + 60),
                                margin=dict(l=5, r=5, t=40, b=5))


__all__ = ["cam_gallery", "loss_curves", "rationale_table", "sample_gallery", "study_bars"]
