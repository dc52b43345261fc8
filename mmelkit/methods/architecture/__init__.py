"""Model-level, architecture granularity: methods that read a different path through the network
(MaskCLIP's value path, CLIP Surgery's value-value path with feature surgery)."""

from mmelkit.methods.architecture.clip_surgery import CLIPSurgery
from mmelkit.methods.architecture.maskclip import MaskCLIP

__all__ = ["CLIPSurgery", "MaskCLIP"]
