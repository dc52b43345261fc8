"""Grad-ECLIP (Zhao et al., ICML 2024): gradient-weighted values of the last attention blocks.

For block l with attention output ``o`` (before the output projection), values ``v`` and
queries/keys ``q``/``k`` per head, and S = cos(f_I, f_T):

* channel importance ``g = dS/do`` at the CLS row;
* "loosened attention" per head ``lambda^h_i = minmax_i cos(q^h_cls, k^h_i)`` over patches i
  (min-max, not softmax), or 1 with ``key_similarity=False`` (the paper's ablation);
* ``map_i = ReLU(sum_h lambda^h_i * sum_{c in h} g_c v^h_{i,c})``.

Modes:

* ``faithful`` (default): the model's own multi-head forward, untouched.
* ``official``: what the authors' reference code does. The explained blocks run their attention
  as ONE head over the full width (softmax(q k^T / sqrt(D))), and lambda compares q and k after
  the output projection (q W_o + b_o). This changes the model's forward, so the explained score
  is not the model's score; it exists to reproduce published numbers.

With ``layers=n`` the maps of the last n blocks come from one backward pass, are ReLU'd each and
summed. Maps are normalised to [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmelkit._checks import did_you_mean
from mmelkit.methods.base import (
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


def grad_eclip_block_map(
    block: BlockTrace, grad_out: torch.Tensor, key_similarity: bool = True, out_proj: nn.Module | None = None
) -> torch.Tensor:
    """One block's Grad-ECLIP map over patches, (N, P), before the ReLU.

    ``grad_out``: dS/d(attn_out) of the block, (N, L, D). ``out_proj``: compare queries and keys
    after this projection (official mode; the block must have run as a single head).
    """
    heads, head_dim = block.num_heads, block.head_dim
    prefix = block.num_prefix_tokens
    channel = grad_out[:, 0].reshape(-1, heads, head_dim)  # (N, H, d): gradient at the CLS row
    values = block.v[:, :, prefix:]  # (N, H, P, d)
    contribution = (values * channel[:, :, None, :]).sum(dim=-1)  # (N, H, P)
    if key_similarity:
        q, k = block.q, block.k
        if out_proj is not None:
            q, k = out_proj(q), out_proj(k)  # one head: (N, 1, L, D) -> projected, same shape
        query = F.normalize(q[:, :, 0], dim=-1)  # (N, H, d)
        keys = F.normalize(k[:, :, prefix:], dim=-1)  # (N, H, P, d)
        weight = minmax_over((keys * query[:, :, None, :]).sum(dim=-1), dim=-1)
        contribution = contribution * weight
    return contribution.sum(dim=1)


@register
class GradECLIP(Method):
    name = "grad_eclip"
    family = "gradient x attention"
    reference = "Zhao et al., Gradient-based Visual Explanation for Transformer-based CLIP, ICML 2024"
    defaults: dict[str, Any] = {"layers": 1, "key_similarity": True, "mode": "faithful"}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        model = self.model
        layers = int(self.params["layers"])
        if not 1 <= layers <= model.num_image_blocks:
            raise ValueError(f"layers must lie in 1..{model.num_image_blocks}; got {layers}")
        mode = self.params["mode"]
        if mode not in ("faithful", "official"):
            raise ValueError(f"mode must be 'faithful' or 'official'; got {mode!r}." + did_you_mean(mode, ("faithful", "official")))
        official = mode == "official"
        pixels, tokens = pair_inputs(model, images, texts)
        targets = text_features(model, tokens)
        blocks = list(range(-layers, 0))
        attentions = model.backend.image_tower().attentions
        with torch.enable_grad():  # explanations work inside a caller's no_grad block too
            with model.trace(image_blocks=blocks, attention_probs=False,
                             single_head_blocks=blocks if official else None) as trace:
                score = paired_cosine(model.encode_image(pixels, normalize=False), targets)
            records = [trace.image[b] for b in blocks]
            grads = torch.autograd.grad(score.sum(), [r.attn_out for r in records])
        total = None
        with torch.no_grad():
            for record, grad in zip(records, grads, strict=True):
                out_proj = attentions[record.index].out_proj if official else None
                block_map = F.relu(grad_eclip_block_map(record, grad, bool(self.params["key_similarity"]), out_proj))
                total = block_map if total is None else total + block_map
        grid = records[0].grid
        maps = normalise_maps(total.detach().reshape(-1, *grid))
        return Explanation(maps, tuple(pixels.shape[-2:]), self.name, dict(self.params), tokens.texts)
