"""Metrics that score explanations: localisation against ground-truth masks (and, as they land,
faithfulness curves). Everything takes batches and stays on the maps' device."""

from mmelkit.metrics.localisation import (
    box_masks,
    energy_pointing_game,
    mask_auroc,
    mask_iou,
    pointing_game,
)
from mmelkit.metrics.scene_pointing import PointingStudy, scene_pointing_game

__all__ = [
    "PointingStudy",
    "box_masks",
    "energy_pointing_game",
    "mask_auroc",
    "mask_iou",
    "pointing_game",
    "scene_pointing_game",
]
