"""Grad-ECLIP (Zhao et al., ICML 2024): gradient-weighted values of the last attention blocks.

For block l with attention output ``o`` (before the output projection), values ``v`` and
queries/keys ``q``/``k`` per head, and S = cos(f_I, f_T):

* channel importance ``g = dS/do`` at the CLS row;
* "loosened attention" per head ``lambda^h_i = minmax_i cos(q^h_cls, k^h_i)`` over patches i
  (min-max, not softmax), or 1 with ``key_similarity=False`` (the paper's ablation);
* ``map_i = ReLU(sum_h lambda^h_i * sum_{c in h} g_c v^h_{i,c})``.

This is the ``faithful`` mode of mmelkit's method reference: the model's own multi-head forward,
untouched. With ``layers=n`` the maps of the last n blocks are computed from one backward pass,
ReLU'd each and summed. Maps are normalised to [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmelkit.explain.base import (
    Explanation,
    Method,
    minmax_over,
    normalise_maps,
    pair_inputs,
    paired_cosine,
    register,
    text_features,
)
from mmelkit.models.adapter import TextLike
from mmelkit.models.tracing import BlockTrace


def grad_eclip_block_map(block: BlockTrace, grad_out: torch.Tensor, key_similarity: bool = True) -> torch.Tensor:
    """One block's Grad-ECLIP map over patches, (N, P), before the ReLU.

    ``grad_out``: dS/d(attn_out) of the block, (N, L, D).
    """
    heads, head_dim = block.num_heads, block.head_dim
    prefix = block.num_prefix_tokens
    channel = grad_out[:, 0].reshape(-1, heads, head_dim)  # (N, H, d): gradient at the CLS row
    values = block.v[:, :, prefix:]  # (N, H, P, d)
    contribution = (values * channel[:, :, None, :]).sum(dim=-1)  # (N, H, P)
    if key_similarity:
        query = F.normalize(block.q[:, :, 0], dim=-1)  # (N, H, d)
        keys = F.normalize(block.k[:, :, prefix:], dim=-1)  # (N, H, P, d)
        weight = minmax_over((keys * query[:, :, None, :]).sum(dim=-1), dim=-1)
        contribution = contribution * weight
    return contribution.sum(dim=1)


@register
class GradECLIP(Method):
    name = "grad_eclip"
    family = "gradient x attention"
    reference = "Zhao et al., Gradient-based Visual Explanation for Transformer-based CLIP, ICML 2024"
    defaults: dict[str, Any] = {"layers": 1, "key_similarity": True}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        model = self.model
        layers = int(self.params["layers"])
        if not 1 <= layers <= model.num_image_blocks:
            raise ValueError(f"layers must lie in 1..{model.num_image_blocks}; got {layers}")
        pixels, tokens = pair_inputs(model, images, texts)
        targets = text_features(model, tokens)
        blocks = list(range(-layers, 0))
        with torch.enable_grad():  # explanations work inside a caller's no_grad block too
            with model.trace(image_blocks=blocks, attention_probs=False) as trace:
                score = paired_cosine(model.encode_image(pixels, normalize=False), targets)
            records = [trace.image[b] for b in blocks]
            grads = torch.autograd.grad(score.sum(), [r.attn_out for r in records])
        total = None
        for record, grad in zip(records, grads, strict=True):
            block_map = F.relu(grad_eclip_block_map(record, grad, bool(self.params["key_similarity"])))
            total = block_map if total is None else total + block_map
        grid = records[0].grid
        maps = normalise_maps(total.detach().reshape(-1, *grid))
        return Explanation(maps, tuple(pixels.shape[-2:]), self.name, dict(self.params), tokens.texts)
