"""Gradient x input of a generative VLM's answer on its projected visual tokens (SPEC §6): the
visual tokens e_i (N, V, D) the decoder reads are the input, and the map of token i is
sum_c dTarget/de_ic * e_ic, made non-negative by ``sign`` (absolute value or positive part).
One forward and one backward for the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch

from mmelkit._checks import did_you_mean
from mmelkit.methods.answers import SIGNS, AnswerTarget, VlmMethod, clean_visual_tokens, signed, target_score
from mmelkit.methods.base import register
from mmelkit.models.vlm.adapter import VlmAdapter


def visual_gradient(vlm: VlmAdapter, target: AnswerTarget, visual: torch.Tensor) -> torch.Tensor:
    """dTarget/d visual tokens at ``visual`` (N, V, D); float32, no parameter gradients."""
    with torch.enable_grad():
        leaf = visual.detach().requires_grad_(True)
        score = target_score(vlm, target, leaf)
        (grad,) = torch.autograd.grad(score.sum(), leaf)  # rows are independent
    return grad.float()


@register
class AnswerGradientXInput(VlmMethod):
    name = "answer_gradient_x_input"
    family = "gradient"
    reference = "Shrikumar et al., Not Just a Black Box (gradient x input), 2016; on LLaVA's visual tokens as in SPEC §6"
    defaults: dict[str, Any] = {"sign": "absolute"}

    def visual_values(self, target: AnswerTarget) -> torch.Tensor:
        if self.params["sign"] not in SIGNS:
            raise ValueError(f"sign must be one of {SIGNS}; got {self.params['sign']!r}."
                             + did_you_mean(self.params["sign"], SIGNS))
        visual = clean_visual_tokens(self.vlm, target)
        grad = visual_gradient(self.vlm, target, visual)
        return signed((grad * visual.float()).sum(dim=-1), self.params["sign"])
