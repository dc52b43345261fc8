"""Plotly figures for the notebooks: galleries, embedding maps, bar charts.

Functions take tensors or arrays and return ``plotly.graph_objects.Figure``; tensors move to the
CPU here, at plot time, never earlier.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mmelkit.datasets.scenes import Scene

MASK_COLOURS = [(255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 255, 255), (0, 255, 0), (255, 128, 0)]


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def overlay_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The image with each mask tinted in its own colour and outlined."""
    out = image.astype(np.float32).copy()
    for k, mask in enumerate(masks):
        colour = np.array(MASK_COLOURS[k % len(MASK_COLOURS)], np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        out[edge] = colour
    return out.clip(0, 255).astype(np.uint8)


def scene_gallery(
    scenes: Sequence[Scene],
    titles: Sequence[str] | None = None,
    columns: int = 4,
    show_masks: bool = True,
    tile: int = 180,
) -> go.Figure:
    """A grid of scenes, optionally with their object masks overlaid; titles default to the
    first caption of each scene."""
    if not scenes:
        raise ValueError("no scenes to show")
    titles = list(titles) if titles is not None else [s.captions[0].text if s.captions else "" for s in scenes]
    rows = (len(scenes) + columns - 1) // columns
    figure = make_subplots(rows=rows, cols=columns, subplot_titles=titles, horizontal_spacing=0.02,
                           vertical_spacing=0.08)
    for i, scene in enumerate(scenes):
        image = overlay_masks(scene.image, scene.masks) if show_masks else scene.image
        figure.add_trace(go.Image(z=image), row=i // columns + 1, col=i % columns + 1)
    figure.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False)
    figure.update_annotations(font_size=11)
    return figure.update_layout(height=rows * tile + 40, width=columns * tile, margin=dict(l=5, r=5, t=40, b=5))


def embedding_map(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    image_labels: Sequence[str],
    text_labels: Sequence[str],
    title: str = "Joint embedding space (PCA of images and texts together)",
) -> go.Figure:
    """Images and texts in one 2-D map: the first two principal components of all embeddings."""
    images, texts = _numpy(image_features), _numpy(text_features)
    joint = np.concatenate([images, texts])
    centred = joint - joint.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    points = centred @ components[:2].T
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=points[: len(images), 0], y=points[: len(images), 1], mode="markers",
                                name="images", text=list(image_labels), marker=dict(size=9, symbol="circle")))
    figure.add_trace(go.Scatter(x=points[len(images):, 0], y=points[len(images):, 1], mode="markers+text",
                                name="texts", text=list(text_labels), textposition="top center",
                                marker=dict(size=10, symbol="diamond")))
    return figure.update_layout(title=title, xaxis_title="PC 1", yaxis_title="PC 2", height=520)


def bar_chart(values: torch.Tensor | Sequence[float], labels: Sequence[str], title: str, colour_by: Sequence[str] | None = None,
              x_title: str = "") -> go.Figure:
    """Horizontal bars, one per label, optionally coloured by a category."""
    values = _numpy(torch.as_tensor(values) if not isinstance(values, (torch.Tensor, np.ndarray)) else values)
    groups = list(colour_by) if colour_by is not None else ["" for _ in labels]
    figure = go.Figure()
    for group in dict.fromkeys(groups):
        keep = [i for i, g in enumerate(groups) if g == group]
        figure.add_trace(go.Bar(x=values[keep], y=[labels[i] for i in keep], orientation="h", name=group or None,
                                showlegend=bool(group)))
    return figure.update_layout(title=title, xaxis_title=x_title, height=max(300, 22 * len(labels) + 120),
                                yaxis=dict(autorange="reversed"))
