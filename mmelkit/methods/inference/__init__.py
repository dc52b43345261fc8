"""Inference-level tools for generative VLMs: hallucination detection and decoding strategies
(SPEC §6). They change or watch how a model answers rather than map an answer onto the image.

* :class:`VisualContrastiveDecoding`: a ``logits_hook`` for :meth:`VlmAdapter.generate`;
* :func:`visual_attention_share`: per layer, how much of the answer's attention goes to the image
  (:func:`mmelkit.metrics.hallucination.detector_auroc` scores it as a hallucination detector).
"""

from mmelkit.methods.inference.visual_attention_share import visual_attention_share
from mmelkit.methods.inference.visual_contrastive_decoding import (
    VisualContrastiveDecoding,
    distort_pixels,
    vcd_logits,
)

__all__ = ["VisualContrastiveDecoding", "distort_pixels", "vcd_logits", "visual_attention_share"]
