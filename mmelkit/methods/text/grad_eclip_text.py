"""Grad-ECLIP on the text side (Zhao et al., ICML 2024): which words the image-text score rests on.

For each of the last n text blocks l, with attention output ``o^l`` (before the output projection),
per-head queries, keys and values, and S = cos(f_I, f_T):

* channel importance ``g^l = dS/do^l`` at the EOS row (the position the text tower pools);
* per head ``lambda^{l,h}_j = minmax_j cos(q^{l,h}_eos, k^{l,h}_j)`` over the positions the causal
  mask lets EOS see (j <= eos), with an epsilon in the denominator; 1 with
  ``key_similarity=False`` (ablation);
* ``m^l_j = sum_h lambda^{l,h}_j sum_{c in h} g^l_c v^{l,h}_{j,c}`` (faithful multi-head form, the
  model's own forward untouched);
* token score ``w_j = ReLU(sum_l m^l_j)``: summed over layers first, then the ReLU; kept only for the
  tokens strictly between start- and end-of-text and normalised to sum 1 per text (all-zero stays
  zero). A word's score is the sum of its BPE pieces'.

``layers`` defaults to ``min(8, depth)`` (the reference uses the last 8 of 12 blocks). Gradients go to
the traced text tensors only; the image features are computed without a graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmelkit.methods.base import Method, TextExplanation, pair_inputs, paired_cosine, register, text_layout
from mmelkit.methods.text._common import image_features
from mmelkit.models.adapter import TextLike
from mmelkit.models.tracing import BlockTrace


def grad_eclip_text_block(
    block: BlockTrace, grad_out: torch.Tensor, eos_index: torch.Tensor, key_similarity: bool = True
) -> torch.Tensor:
    """One text block's ``m^l`` (N, L) before the sum over layers and the ReLU.

    ``grad_out``: dS/d(attn_out) of the block, (N, L, D); ``eos_index`` (N,) the pooled positions.
    Positions after EOS get 0.
    """
    rows = torch.arange(grad_out.shape[0], device=grad_out.device)
    heads, head_dim = block.num_heads, block.head_dim
    channel = grad_out[rows, eos_index].reshape(-1, heads, head_dim)  # (N, H, d)
    contribution = (block.v * channel[:, :, None, :]).sum(dim=-1)  # (N, H, L)
    length = contribution.shape[-1]
    allowed = (torch.arange(length, device=grad_out.device)[None, :] <= eos_index[:, None])[:, None, :]  # (N, 1, L)
    if key_similarity:
        query = F.normalize(block.q[rows, :, eos_index], dim=-1)  # (N, H, d)
        cosine = (F.normalize(block.k, dim=-1) * query[:, :, None, :]).sum(dim=-1)  # (N, H, L)
        low = cosine.masked_fill(~allowed, float("inf")).amin(dim=-1, keepdim=True)
        high = cosine.masked_fill(~allowed, float("-inf")).amax(dim=-1, keepdim=True)
        weight = (cosine - low) / (high - low + 1e-8)
        contribution = contribution * weight
    return (contribution * allowed).sum(dim=1)


@register
class GradECLIPText(Method):
    name = "grad_eclip_text"
    family = "gradient x attention"
    modality = "text"
    reference = "Zhao et al., Gradient-based Visual Explanation for Transformer-based CLIP, ICML 2024 (text side)"
    defaults: dict[str, Any] = {"layers": None, "key_similarity": True}

    def explain(self, images: Any, texts: TextLike) -> TextExplanation:
        model = self.model
        depth = model.num_text_blocks
        layers = self.params["layers"]
        layers = min(8, depth) if layers is None else layers
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= depth:
            raise ValueError(f"layers must be None or an int in 1..{depth} (the text tower's depth); got {layers!r}")
        pixels, tokens = pair_inputs(model, images, texts)
        layout = text_layout(model, tokens)
        image = image_features(model, pixels)
        blocks = list(range(-layers, 0))
        with torch.enable_grad():  # works inside a caller's no_grad block too
            with model.trace(image_blocks=None, text_blocks=blocks, attention_probs=False) as trace:
                score = paired_cosine(image, model.encode_text(tokens))
            records = [trace.text[b] for b in blocks]
            grads = torch.autograd.grad(score.sum(), [r.attn_out for r in records])
        with torch.no_grad():
            key_similarity = bool(self.params["key_similarity"])
            total = sum(
                grad_eclip_text_block(record, grad, tokens.eos_index, key_similarity)
                for record, grad in zip(records, grads, strict=True)
            )
            weights = F.relu(total) * layout.content
            sums = weights.sum(dim=1, keepdim=True)
            weights = torch.where(sums > 0, weights / sums.clamp_min(torch.finfo(weights.dtype).tiny), weights)
        params = {**self.params, "layers": layers}
        return TextExplanation.from_scores(layout, weights.detach(), self.name, params, tokens.texts)
