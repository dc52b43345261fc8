"""Grad-CAM for ViT image towers (Selvaraju et al., 2017, applied to patch tokens).

Tokens X of a chosen block (default: the input of the last block); channel weights w_c = the mean
over patch tokens of dS/dX_c; map_i = ReLU(sum_c w_c X_ic) over patch tokens i.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmelkit._checks import did_you_mean
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
class GradCAM(Method):
    name = "grad_cam"
    family = "gradient x activation"
    reference = "Selvaraju et al., Grad-CAM, ICCV 2017 (ViT variant over patch tokens)"
    defaults: dict[str, Any] = {"block": -1, "where": "input"}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        model = self.model
        where = self.params["where"]
        if where not in ("input", "output"):
            raise ValueError(f"where must be 'input' or 'output' (of the block); got {where!r}."
                             + did_you_mean(where, ("input", "output")))
        block = int(self.params["block"])
        pixels, tokens = pair_inputs(model, images, texts)
        targets = text_features(model, tokens)
        with torch.enable_grad():
            with model.trace(image_blocks=[block], attention_probs=False) as trace:
                score = paired_cosine(model.encode_image(pixels, normalize=False), targets)
            record = trace.image[block]
            activations = record.tokens_in if where == "input" else record.tokens_out
            grad, = torch.autograd.grad(score.sum(), activations)
        with torch.no_grad():
            prefix = record.num_prefix_tokens
            patches, patch_grads = activations[:, prefix:], grad[:, prefix:]
            weights = patch_grads.mean(dim=1, keepdim=True)  # (N, 1, D)
            maps = F.relu((weights * patches).sum(dim=-1)).reshape(-1, *record.grid)
        return Explanation(normalise_maps(maps), tuple(pixels.shape[-2:]), self.name, dict(self.params), tokens.texts)
