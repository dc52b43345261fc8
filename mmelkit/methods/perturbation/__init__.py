"""Data-level input perturbation: occlude or mask the image, rescore, attribute the change."""

from mmelkit.methods.perturbation.occlusion import Occlusion

__all__ = ["Occlusion"]
