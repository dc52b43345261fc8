"""Metrics that score explanations. Everything takes batches and stays on the model's device.

* faithfulness (:mod:`~mmelkit.metrics.faithfulness`): deletion / insertion curves and AUC,
  Average Drop / Increase in confidence; the shared perturbation core is
  :mod:`~mmelkit.metrics.perturbation`, the score functions :mod:`~mmelkit.metrics.scores`;
* retrieval (:mod:`~mmelkit.metrics.retrieval`): the IR / TR protocol under deletion or insertion;
* localisation (:mod:`~mmelkit.metrics.localisation`): pointing game, energy pointing game, IoU and
  AUROC against ground-truth masks; the scene-world pointing study;
* hallucination (:mod:`~mmelkit.metrics.hallucination`): POPE and CHAIR, which score a generative
  VLM's answers rather than a map;
* :mod:`~mmelkit.metrics.registry`: each metric's category, direction and scope.

The randomisation sanity check lives with the methods (:mod:`mmelkit.methods.sanity`); the
benchmark runner (:mod:`mmelkit.bench`) reports it as a metric.
"""

from mmelkit.metrics.concepts import auroc
from mmelkit.metrics.faithfulness import (
    ConfidenceChange,
    Curves,
    confidence_change,
    deletion_curves,
    insertion_curves,
    perturbation_curves,
)
from mmelkit.metrics.hallucination import (
    ChairScores,
    PopeScores,
    binary_auroc,
    chair_scores,
    detector_auroc,
    parse_yes_no,
    pope_scores,
)
from mmelkit.metrics.localisation import (
    box_masks,
    energy_pointing_game,
    mask_auroc,
    mask_iou,
    mask_precision,
    mask_recall,
    pointing_game,
)
from mmelkit.metrics.registry import GROUPS, METRICS, MetricInfo, resolve_metrics
from mmelkit.metrics.retrieval import RetrievalCurves, retrieval_protocol, retrieval_recall
from mmelkit.metrics.scene_pointing import PointingStudy, scene_pointing_game
from mmelkit.metrics.scores import TextScore

__all__ = [
    "auroc",
    "GROUPS",
    "METRICS",
    "ChairScores",
    "binary_auroc",
    "detector_auroc",
    "ConfidenceChange",
    "Curves",
    "MetricInfo",
    "PointingStudy",
    "PopeScores",
    "RetrievalCurves",
    "TextScore",
    "box_masks",
    "chair_scores",
    "confidence_change",
    "deletion_curves",
    "energy_pointing_game",
    "insertion_curves",
    "mask_auroc",
    "mask_iou",
    "mask_precision",
    "mask_recall",
    "parse_yes_no",
    "perturbation_curves",
    "pointing_game",
    "pope_scores",
    "resolve_metrics",
    "retrieval_protocol",
    "retrieval_recall",
    "scene_pointing_game",
]
