"""Raw attention: how much the last block's CLS query attends to each patch, averaged over heads."""

from __future__ import annotations

from typing import Any

import torch

from mmelkit.methods.base import Explanation, Method, normalise_maps, pair_inputs, register
from mmelkit.models.adapter import TextLike


@register
class RawAttention(Method):
    name = "raw_attention"
    family = "attention"
    reference = "Attention as explanation baseline (e.g. Abnar & Zuidema 2020, Chefer et al. 2021)"
    defaults: dict[str, Any] = {"block": -1}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        """Text-independent: every pair of the same image gets the same map."""
        pixels, tokens = pair_inputs(self.model, images, texts)
        block = int(self.params["block"])
        with torch.no_grad(), self.model.trace(image_blocks=[block]) as trace:
            self.model.encode_image(pixels)
        record = trace.image[block]
        prefix = record.num_prefix_tokens
        maps = record.attn[:, :, 0, prefix:].mean(dim=1).reshape(-1, *record.grid)
        return Explanation(normalise_maps(maps), tuple(pixels.shape[-2:]), self.name, dict(self.params), tokens.texts)
