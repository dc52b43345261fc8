"""Plotly figures for notebooks and reports: scene galleries and embedding maps (figures.py),
explanation overlays, grids and text-score bars (explanations.py)."""

from mmelkit.viz import explanations
from mmelkit.viz.explanations import *  # noqa: F403  (its __all__ is the public list)
from mmelkit.viz.figures import bar_chart, embedding_map, overlay_masks, scene_gallery

__all__ = ["bar_chart", "embedding_map", "overlay_masks", "scene_gallery", *explanations.__all__]
