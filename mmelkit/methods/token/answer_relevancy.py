"""Relevancy of a generative VLM's answer to its visual tokens: Chefer et al.'s generic attention
explainability for self-attention decoders (SPEC §6).

With A_l the head-wise attention of decoder layer l and G_l = dTarget/dA_l (one backward for all
layers), A_bar_l = mean_h((G_l * A_l)^+) and, from R = I, R <- R + A_bar_l R for l = 1..L, i.e.
R = (I + A_bar_L) ... (I + A_bar_1). The map of a query column q is R[q, visual].

Only the answer's query rows of R are needed, so they are computed as row vectors from the last
layer down, r <- r + r A_bar_l: O(T L^2) per layer instead of O(L^3).

``through_vision=True`` chains the decoder's relevancy into the vision tower's own (LVLM-Interpret's
"relevancy through the CLIP layers"): the same backward also reaches the attentions of the vision
layers that feed the visual tokens (those up to ``vision_feature_layer``), R_v = prod_k (I + A_bar_k)
over them, and the map of image patch j is sum_i r_i R_v[i, j]: visual token i's relevancy spread
over the patches that its vision-tower token read from.
"""

from __future__ import annotations

from typing import Any

import torch

from mmelkit.methods.answers import AnswerTarget, VlmMethod, target_score
from mmelkit.methods.base import register
from mmelkit.models.vlm.adapter import VlmAdapter


def vision_layers_feeding_the_decoder(vlm: VlmAdapter) -> int:
    """How many vision layers (from the first) compute the visual tokens: the hidden state that
    ``vision_feature_layer`` picks (index 0 = the embeddings) is the output of that many layers."""
    depth = vlm.num_vision_layers
    picked = vlm.vision_feature_layer
    indices = picked if isinstance(picked, (list, tuple)) else [picked]
    return max(int(i) + depth + 1 if int(i) < 0 else int(i) for i in indices)


def attention_relevance(
    vlm: VlmAdapter, target: AnswerTarget, vision_layers: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The decoder attentions A_l (N, H, L, L) of one traced forward and dTarget/dA_l, in layer
    order; then the same for the first ``vision_layers`` vision layers ((N, Hv, P, P); empty lists
    for 0). One backward for all of them."""
    vision: Any = list(range(vision_layers)) if vision_layers else False
    with torch.enable_grad(), vlm.trace(decoder_hidden=False, vision=vision, visual_leaf=False) as trace:
        score = target_score(vlm, target)
        attentions = [record.require("attn") for record in trace.decoder]
        vision_attentions = [record.require("attn") for record in trace.vision] if vision_layers else []
        # rows are independent, so the gradient of the sum is each row's own
        grads = torch.autograd.grad(score.sum(), attentions + vision_attentions)
    depth = len(attentions)
    detached = [a.detach() for a in attentions + vision_attentions]
    grads = [g.detach() for g in grads]
    return detached[:depth], grads[:depth], detached[depth:], grads[depth:]


def propagate_rows(rows: torch.Tensor, attentions: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """rows (N, T, L) times R = (I + A_bar_last) ... (I + A_bar_first), applied from the last layer
    down: r <- r + r A_bar_l with A_bar_l = mean_h((G_l * A_l)^+)."""
    for attention, grad in zip(reversed(attentions), reversed(grads), strict=True):
        mixed = (grad.float() * attention.float()).clamp(min=0).mean(dim=1)  # (N, L, L)
        rows = rows + rows @ mixed
    return rows


def relevancy_rows(attentions: list[torch.Tensor], grads: list[torch.Tensor], target: AnswerTarget) -> torch.Tensor:
    """(N, L): the target-weighted query rows of R = prod_l (I + A_bar_l), last layer leftmost."""
    n, _, length, _ = attentions[0].shape
    queries = target.query_positions  # (N, T)
    rows = torch.zeros(n, queries.shape[1], length, device=attentions[0].device, dtype=torch.float32)
    rows.scatter_(2, queries[..., None], 1.0)  # e_q for every target token
    rows = propagate_rows(rows, attentions, grads)
    weights = target.weights / target.weights.sum(dim=1, keepdim=True)
    return (rows * weights[..., None]).sum(dim=1)


def relevancy_through_vision(
    vlm: VlmAdapter, visual_relevance: torch.Tensor, attentions: list[torch.Tensor], grads: list[torch.Tensor]
) -> torch.Tensor:
    """(N, V) relevancy of the visual tokens -> (N, rows * cols) relevancy of the image patches
    through the vision layers' R_v: the visual tokens are the vision tower's tokens after its CLS
    (all of them, CLS first, under the ``"full"`` strategy); the CLS column is dropped at the end."""
    n, _, tokens, _ = attentions[0].shape
    start = tokens - visual_relevance.shape[1]  # 1 for "default" (CLS dropped), 0 for "full"
    rows = torch.zeros(n, 1, tokens, device=visual_relevance.device, dtype=torch.float32)
    rows[:, 0, start:] = visual_relevance.float()
    patches = propagate_rows(rows, attentions, grads)[:, 0]
    return patches[:, tokens - vlm.grid[0] * vlm.grid[1] :]


@register
class AnswerRelevancy(VlmMethod):
    name = "answer_relevancy"
    family = "attention x gradient"
    reference = "Chefer et al., Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers, ICCV 2021"
    defaults: dict[str, Any] = {"through_vision": False}

    def visual_values(self, target: AnswerTarget) -> torch.Tensor:
        through_vision = self.params["through_vision"]
        if not isinstance(through_vision, bool):
            raise ValueError(f"through_vision must be True or False; got {through_vision!r}")
        vision_layers = vision_layers_feeding_the_decoder(self.vlm) if through_vision else 0
        attentions, grads, vision_attentions, vision_grads = attention_relevance(self.vlm, target, vision_layers)
        relevance = relevancy_rows(attentions, grads, target).gather(1, target.batch.visual_positions)
        if not vision_attentions:  # not asked, or the visual tokens are the patch embeddings themselves
            return relevance
        return relevancy_through_vision(self.vlm, relevance, vision_attentions, vision_grads)
