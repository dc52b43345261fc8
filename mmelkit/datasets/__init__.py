"""Datasets with ground truth: the synthetic scene world, real photos and a local COCO copy.

All three yield :class:`Scene` records (image, per-object masks and boxes, captions that name the
objects they refer to). ``CocoDataset`` lives in ``mmelkit.datasets.coco`` (it needs pycocotools).
"""

from mmelkit.datasets.photos import PhotoObject, RealPhotos
from mmelkit.datasets.scenes import (
    CAPTION_KINDS,
    COLOURS,
    SHAPES,
    Caption,
    Scene,
    SceneConfig,
    SceneObject,
    SceneWorld,
    collate_scenes,
    make_captions,
    relation,
    swapped_relation,
)

__all__ = [
    "PhotoObject",
    "RealPhotos",
    "CAPTION_KINDS",
    "COLOURS",
    "SHAPES",
    "Caption",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "SceneWorld",
    "collate_scenes",
    "make_captions",
    "relation",
    "swapped_relation",
]
