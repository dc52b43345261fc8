"""Relevancy of a generative VLM's answer to its visual tokens: Chefer et al.'s generic attention
explainability for self-attention decoders (SPEC §6).

With A_l the head-wise attention of decoder layer l and G_l = dTarget/dA_l (one backward for all
layers), A_bar_l = mean_h((G_l * A_l)^+) and, from R = I, R <- R + A_bar_l R for l = 1..L, i.e.
R = (I + A_bar_L) ... (I + A_bar_1). The map of a query column q is R[q, visual].

Only the answer's query rows of R are needed, so they are computed as row vectors from the last
layer down, r <- r + r A_bar_l: O(T L^2) per layer instead of O(L^3).
"""

from __future__ import annotations

from typing import Any

import torch

from mmelkit.methods.answers import AnswerTarget, VlmMethod, target_score
from mmelkit.methods.base import register
from mmelkit.models.vlm.adapter import VlmAdapter


def attention_relevance(vlm: VlmAdapter, target: AnswerTarget) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The decoder attentions A_l (N, H, L, L) of one traced forward and dTarget/dA_l, in layer order."""
    with torch.enable_grad(), vlm.trace(decoder_hidden=False, vision=False, visual_leaf=False) as trace:
        score = target_score(vlm, target)
        attentions = [record.require("attn") for record in trace.decoder]
        # rows are independent, so the gradient of the sum is each row's own
        grads = torch.autograd.grad(score.sum(), attentions)
    return [a.detach() for a in attentions], [g.detach() for g in grads]


def relevancy_rows(attentions: list[torch.Tensor], grads: list[torch.Tensor], target: AnswerTarget) -> torch.Tensor:
    """(N, L): the target-weighted query rows of R = prod_l (I + A_bar_l), last layer leftmost."""
    n, _, length, _ = attentions[0].shape
    queries = target.query_positions  # (N, T)
    rows = torch.zeros(n, queries.shape[1], length, device=attentions[0].device, dtype=torch.float32)
    rows.scatter_(2, queries[..., None], 1.0)  # e_q for every target token
    for attention, grad in zip(reversed(attentions), reversed(grads), strict=True):
        mixed = (grad.float() * attention.float()).clamp(min=0).mean(dim=1)  # (N, L, L)
        rows = rows + rows @ mixed
    weights = target.weights / target.weights.sum(dim=1, keepdim=True)
    return (rows * weights[..., None]).sum(dim=1)


@register
class AnswerRelevancy(VlmMethod):
    name = "answer_relevancy"
    family = "attention x gradient"
    reference = "Chefer et al., Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers, ICCV 2021"
    defaults: dict[str, Any] = {}

    def visual_values(self, target: AnswerTarget) -> torch.Tensor:
        attentions, grads = attention_relevance(self.vlm, target)
        relevance = relevancy_rows(attentions, grads, target)
        return relevance.gather(1, target.batch.visual_positions)
