"""Inference-level tools: how a model reaches its answer at inference time, rather than a map of it.

CLIP (SPEC §5):

* :func:`classify_by_description`: zero-shot classes scored by descriptor texts, whose cosines
  are the classifier's rationale (Menon & Vondrick, ICLR 2023).

Generative VLMs (SPEC §6): hallucination detection and decoding strategies.

* :class:`VisualContrastiveDecoding`: a ``logits_hook`` for :meth:`VlmAdapter.generate`;
* :func:`visual_attention_share`: per layer, how much of the answer's attention goes to the image
  (:func:`mmelkit.metrics.hallucination.detector_auroc` scores it as a hallucination detector).
"""

from mmelkit.methods.inference.classification_by_description import DescriptionScores, classify_by_description
from mmelkit.methods.inference.visual_attention_share import visual_attention_share
from mmelkit.methods.inference.visual_contrastive_decoding import (
    VisualContrastiveDecoding,
    distort_pixels,
    vcd_logits,
)

__all__ = ["DescriptionScores", "VisualContrastiveDecoding", "classify_by_description", "distort_pixels", "vcd_logits", "visual_attention_share"]
