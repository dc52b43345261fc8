"""Plotly figures for notebooks and reports."""

from mmelkit.viz.figures import bar_chart, embedding_map, overlay_masks, scene_gallery

__all__ = ["bar_chart", "embedding_map", "overlay_masks", "scene_gallery"]
