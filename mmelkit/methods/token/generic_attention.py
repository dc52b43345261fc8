"""Generic attention explainability (Chefer et al., ICCV 2021) for the image tower of a CLIP.

R starts as the identity; for each block l >= ``start_layer``, R += mean_h((dS/dA_l * A_l)^+) R,
with A_l the attention probabilities and S the image-text cosine. The map is R's CLS row over the
patches. All blocks' gradients come from one autograd call.
"""

from __future__ import annotations

from typing import Any

import torch

from mmelkit.methods.base import (
    Explanation,
    Method,
    normalise_maps,
    pair_inputs,
    paired_cosine,
    register,
    text_features,
)
from mmelkit.models.adapter import TextLike


@register
class GenericAttention(Method):
    name = "generic_attention"
    family = "gradient x attention"
    reference = "Chefer, Gur & Wolf, Generic Attention-model Explainability for Bi-Modal Transformers, ICCV 2021"
    defaults: dict[str, Any] = {"start_layer": 0}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        model = self.model
        start, depth = int(self.params["start_layer"]), model.num_image_blocks
        if not -depth <= start < depth:  # a modulo would wrap a typo into some other block silently
            raise IndexError(f"start_layer {start} is out of range: the image tower has {depth} blocks")
        start %= depth
        pixels, tokens = pair_inputs(model, images, texts)
        targets = text_features(model, tokens)
        blocks = list(range(start, model.num_image_blocks))
        with torch.enable_grad():
            with model.trace(image_blocks=blocks) as trace:
                score = paired_cosine(model.encode_image(pixels, normalize=False), targets)
            records = list(trace.image)
            grads = torch.autograd.grad(score.sum(), [r.attn for r in records])
        with torch.no_grad():
            length = records[0].attn.shape[-1]
            relevance = torch.eye(length, device=pixels.device).expand(len(pixels), -1, -1).clone()
            for record, grad in zip(records, grads, strict=True):
                weighted = (grad * record.attn).clamp_min(0).float().mean(dim=1)  # (N, L, L)
                relevance = relevance + weighted @ relevance
        last = records[-1]
        maps = relevance[:, 0, last.num_prefix_tokens :].reshape(-1, *last.grid)
        return Explanation(normalise_maps(maps), tuple(pixels.shape[-2:]), self.name, dict(self.params), tokens.texts)
