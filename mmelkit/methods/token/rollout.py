"""Attention rollout (Abnar & Zuidema, 2020): attention composed through the blocks.

Per block, A_hat = (mean over heads of A) + I, each row normalised to sum 1 (the identity stands
for the residual connection). R = A_hat_L ... A_hat_s for blocks s = ``start_layer`` .. L; the map
is R's CLS row over the patches. Text-independent.
"""

from __future__ import annotations

from typing import Any

import torch

from mmelkit.methods.base import Explanation, Method, normalise_maps, pair_inputs, register
from mmelkit.models.adapter import TextLike


@register
class AttentionRollout(Method):
    name = "rollout"
    family = "attention"
    reference = "Abnar & Zuidema, Quantifying Attention Flow in Transformers, ACL 2020"
    defaults: dict[str, Any] = {"start_layer": 0}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        model = self.model
        start, depth = int(self.params["start_layer"]), model.num_image_blocks
        if not -depth <= start < depth:  # a modulo would wrap a typo into some other block silently
            raise IndexError(f"start_layer {start} is out of range: the image tower has {depth} blocks")
        start %= depth
        pixels, tokens = pair_inputs(model, images, texts)
        blocks = list(range(start, model.num_image_blocks))
        with torch.no_grad(), model.trace(image_blocks=blocks) as trace:
            model.encode_image(pixels)
            rollout = None
            for record in trace.image:
                attention = record.attn.float().mean(dim=1)  # (N, L, L)
                attention = attention + torch.eye(attention.shape[-1], device=attention.device)
                attention = attention / attention.sum(dim=-1, keepdim=True)
                rollout = attention if rollout is None else attention @ rollout
        record = trace.image[-1]
        maps = rollout[:, 0, record.num_prefix_tokens :].reshape(-1, *record.grid)
        return Explanation(normalise_maps(maps), tuple(pixels.shape[-2:]), self.name, dict(self.params), tokens.texts)
