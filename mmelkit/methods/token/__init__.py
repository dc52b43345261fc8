"""Model-level, token-granularity methods: maps over image patches (and text tokens)."""

from mmelkit.methods.token.grad_eclip import GradECLIP

__all__ = ["GradECLIP"]
