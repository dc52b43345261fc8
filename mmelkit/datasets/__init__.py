"""Datasets with ground truth: the synthetic scene world, real photos and a local COCO copy.

All three yield :class:`Scene` records (image, per-object masks and boxes, captions that name the
objects they refer to). ``SceneQA`` (:mod:`~mmelkit.datasets.vqa`) asks questions about scene-world
scenes for generative VLMs, with POPE probes and a co-occurrence knob. ``CocoDataset`` lives in ``mmelkit.datasets.coco`` (it needs pycocotools).
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
from mmelkit.datasets.vqa import (
    POPE_SPLITS,
    QUESTION_KINDS,
    QAItem,
    SceneQA,
    VqaConfig,
    partner_map,
    pope_probes,
)

__all__ = [
    "POPE_SPLITS",
    "QUESTION_KINDS",
    "QAItem",
    "SceneQA",
    "VqaConfig",
    "partner_map",
    "pope_probes",
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
