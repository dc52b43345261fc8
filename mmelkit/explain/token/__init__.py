"""Model-level, token-granularity methods: maps over image patches (and text tokens)."""

from mmelkit.explain.token.grad_eclip import GradECLIP

__all__ = ["GradECLIP"]
