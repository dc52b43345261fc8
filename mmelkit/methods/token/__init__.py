"""Model-level, token-granularity methods: maps over image patches."""

from mmelkit.methods.token.generic_attention import GenericAttention
from mmelkit.methods.token.grad_cam import GradCAM
from mmelkit.methods.token.grad_eclip import GradECLIP
from mmelkit.methods.token.raw_attention import RawAttention
from mmelkit.methods.token.rollout import AttentionRollout

__all__ = ["AttentionRollout", "GenericAttention", "GradCAM", "GradECLIP", "RawAttention"]
