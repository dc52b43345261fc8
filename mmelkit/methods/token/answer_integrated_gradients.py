"""Integrated Gradients of a generative VLM's answer on its projected visual tokens (SPEC §6;
Sundararajan et al. 2017): (e - e') * mean_k dTarget/de at e' + alpha_k (e - e'),
alpha_k = (k - 1/2) / m (the midpoint rule), with the baseline e' every token replaced by the
image's mean visual token (``"mean"``, the default) or all zeros (``"zero"``). Completeness: the
attribution sums to Target(e) - Target(e') up to the O(1/m^2) midpoint error.

Why not zeros by default: the visual tokens enter a pre-norm decoder (Llama's first op is an
RMSNorm), which is nearly blind to their scale, so Target(alpha e) barely moves along most of the
path and jumps within alpha ~ sqrt(eps) / |e| of the zero baseline, where no midpoint lands.
With ``"zero"`` the attribution is then far from complete at any practical m (tested).

All interpolation points of all rows go through the decoder ``batch_size`` copies at a time. The
map is the per-token sum made non-negative by ``sign`` (absolute value or positive part).
"""

from __future__ import annotations

from typing import Any

import torch

from mmelkit._checks import did_you_mean, positive_int
from mmelkit.methods.answers import SIGNS, AnswerTarget, VlmMethod, chunked_rows, clean_visual_tokens, signed
from mmelkit.methods.base import register
from mmelkit.methods.token.answer_gradient_x_input import visual_gradient
from mmelkit.models.vlm.adapter import VlmAdapter

BASELINES = ("zero", "mean")


def visual_baseline(visual: torch.Tensor, baseline: str) -> torch.Tensor:
    """The IG baseline e' for tokens (N, V, D): zeros, or each image's mean token everywhere."""
    if baseline == "zero":
        return torch.zeros_like(visual)
    if baseline == "mean":
        return visual.mean(dim=1, keepdim=True).expand_as(visual)
    raise ValueError(f"baseline must be one of {BASELINES}; got {baseline!r}")


def answer_integrated_gradients(
    vlm: VlmAdapter, target: AnswerTarget, steps: int = 32, baseline: str = "mean", batch_size: int = 32
) -> torch.Tensor:
    """(N, V, D) float32 attribution of the target to each visual token's channels."""
    steps = positive_int("steps", steps)
    batch_size = positive_int("batch_size", batch_size)
    visual = clean_visual_tokens(vlm, target)
    base = visual_baseline(visual, baseline)
    delta = visual - base
    alphas = (torch.arange(steps, device=visual.device, dtype=torch.float32) + 0.5) / steps
    total = torch.zeros(visual.shape, device=visual.device, dtype=torch.float32)
    for flat in chunked_rows(len(target) * steps, batch_size, visual.device):
        row, step = flat // steps, flat % steps
        points = base[row] + alphas[step].to(visual.dtype)[:, None, None] * delta[row]
        total.index_add_(0, row, visual_gradient(vlm, target.select(row), points))
    return delta.float() * total / steps


@register
class AnswerIntegratedGradients(VlmMethod):
    name = "answer_integrated_gradients"
    family = "gradient"
    reference = "Sundararajan et al., Axiomatic Attribution for Deep Networks, ICML 2017 (on the projected visual tokens)"
    defaults: dict[str, Any] = {"steps": 32, "baseline": "mean", "batch_size": 32, "sign": "absolute"}

    def visual_values(self, target: AnswerTarget) -> torch.Tensor:
        if self.params["sign"] not in SIGNS:
            raise ValueError(f"sign must be one of {SIGNS}; got {self.params['sign']!r}."
                             + did_you_mean(self.params["sign"], SIGNS))
        attribution = answer_integrated_gradients(
            self.vlm, target, self.params["steps"], self.params["baseline"], self.params["batch_size"]
        )
        return signed(attribution.sum(dim=-1), self.params["sign"])
