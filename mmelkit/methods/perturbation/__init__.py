"""Data-level input perturbation: occlude or mask the input, rescore, attribute the change
(image pixels for CLIP models, visual tokens for generative VLMs)."""

from mmelkit.methods.perturbation.answer_occlusion import AnswerOcclusion
from mmelkit.methods.perturbation.occlusion import Occlusion
from mmelkit.methods.perturbation.rise import RISE

__all__ = ["RISE", "AnswerOcclusion", "Occlusion"]
