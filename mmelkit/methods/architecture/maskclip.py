"""MaskCLIP (Zhou et al., ECCV 2022): dense image-text similarity from the last block's value path.

The last block's attention mixes tokens; its value path does not. Taking each patch's value
(all heads), the block's output projection, the tower's final norm and projection gives one
embedding per patch, z_i = proj(LN_post(v_i W_o + b_o)); the map is cos(z_i, t)^+. Training-free,
one forward, no gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmelkit.methods.base import Explanation, Method, normalise_maps, pair_inputs, register, text_features
from mmelkit.models.adapter import ClipAdapter, TextLike
from mmelkit.models.tracing import BlockTrace


def attention_output(attention: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
    """The attention module's steps after the attention itself: (N, H, L, d) -> (N, L, D).

    Per-head scale (open_clip ``head_scale``), heads concatenated, inner norm (open_clip
    ``ln_inner``), output projection. Plain ``nn.MultiheadAttention`` and Hugging Face
    ``CLIPAttention`` have only the output projection.
    """
    head_scale = getattr(attention, "head_scale", None)
    if head_scale is not None:
        heads_out = heads_out * head_scale
    merged = heads_out.transpose(1, 2).flatten(2)
    ln_inner = getattr(attention, "ln_inner", None)
    if ln_inner is not None:
        merged = ln_inner(merged)
    return attention.out_proj(merged)


def value_path_embeddings(model: ClipAdapter, record: BlockTrace) -> torch.Tensor:
    """Per-patch embeddings of a traced image block's value path, proj(LN_post(v_i W_o + b_o)):
    (N, P, E), unnormalised. The values skip the attention's mixing, so each keeps its patch; every
    step the module takes after the mixing (head scale, inner norm, output projection) still applies,
    so the path equals the attention's output for a token that attends only to itself."""
    attention = model.backend.image_tower().attentions[record.index]
    values = record.v[:, :, record.num_prefix_tokens :]  # (N, H, P, d)
    return model.project_image_tokens(attention_output(attention, values))


@register
class MaskCLIP(Method):
    name = "maskclip"
    granularity = "architecture"
    family = "value path"
    reference = "Zhou, Loy & Dai, Extract Free Dense Labels from CLIP, ECCV 2022"
    defaults: dict[str, Any] = {}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        model = self.model
        pixels, tokens = pair_inputs(model, images, texts)
        targets = text_features(model, tokens)
        with torch.no_grad():
            with model.trace(image_blocks=[-1], attention_probs=False) as trace:
                model.encode_image(pixels)
            record = trace.image[-1]
            dense = F.normalize(value_path_embeddings(model, record), dim=-1)  # (N, P, E)
            maps = (dense * targets[:, None, :]).sum(dim=-1).clamp_min(0).reshape(-1, *record.grid)
        return Explanation(normalise_maps(maps), tuple(pixels.shape[-2:]), self.name, dict(self.params), tokens.texts)
