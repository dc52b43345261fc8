"""Generative vision-language models (LLaVA-style): the adapter, tracing, loading and the embedded
``scene-llava``'s parts.

    import mmelkit
    vlm = mmelkit.load_vlm("scene-llava")          # or a save_pretrained folder, or a model object
    out = vlm.generate(images, "what colour is the star ?")
    out.texts                                       # greedy answers
"""

from mmelkit.models.vlm.adapter import VlmAdapter
from mmelkit.models.vlm.loading import VLM_ZOO, VlmZooEntry, list_vlm_zoo, load_vlm, verify_checksums
from mmelkit.models.vlm.records import (
    AnswerLogprob,
    DecodeStep,
    DecodeStream,
    GenerateOutput,
    LogitsHook,
    VlmBatch,
)
from mmelkit.models.vlm.tracing import DecoderLayerTrace, LayerTrace, VisionLayerTrace, VlmTrace

__all__ = [
    "VLM_ZOO",
    "AnswerLogprob",
    "DecodeStep",
    "DecodeStream",
    "DecoderLayerTrace",
    "GenerateOutput",
    "LayerTrace",
    "LogitsHook",
    "VisionLayerTrace",
    "VlmAdapter",
    "VlmBatch",
    "VlmTrace",
    "VlmZooEntry",
    "list_vlm_zoo",
    "load_vlm",
    "verify_checksums",
]
