"""Data-level input perturbation: occlude or mask the image, rescore, attribute the change."""

from mmelkit.methods.perturbation.occlusion import Occlusion
from mmelkit.methods.perturbation.rise import RISE

__all__ = ["RISE", "Occlusion"]
