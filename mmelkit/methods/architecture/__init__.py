"""Model-level, architecture granularity: methods that read a different path through the network
(MaskCLIP's value path)."""

from mmelkit.methods.architecture.maskclip import MaskCLIP

__all__ = ["MaskCLIP"]
