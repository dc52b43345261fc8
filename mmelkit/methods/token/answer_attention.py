"""Raw attention of a generative VLM's answer to the visual tokens (LVLM-Interpret; SPEC §6).

For answer token a_t predicted at query column q_t, layer l's map is the decoder attention
A_l[h, q_t, visual] averaged over heads; over an answer span, the target tokens' rows are averaged
(weighted by the target, see :mod:`mmelkit.methods.answers`). The method's map averages a chosen
range of layers; :func:`answer_attention_per_layer` gives every layer's map.
"""

from __future__ import annotations

from typing import Any

import torch

from mmelkit.methods.answers import AnswerTarget, VlmMethod
from mmelkit.methods.base import register
from mmelkit.models.vlm.adapter import VlmAdapter
from mmelkit.models.vlm.tracing import resolve_layers


def answer_attention_per_layer(vlm: VlmAdapter, target: AnswerTarget) -> torch.Tensor:
    """(N, layers, V) the target-weighted, head-averaged attention of the answer's query columns
    to the visual tokens, for every decoder layer (one forward, eager attention)."""
    with torch.no_grad(), vlm.trace(decoder_hidden=False, vision=False, visual_leaf=False) as trace:
        vlm.forward(target.batch, logits_to_keep=1)
        attentions = trace.decoder_attentions()  # (layers, N, H, L, L)
    return _visual_rows(attentions.mean(dim=2), target)


def _visual_rows(attention: torch.Tensor, target: AnswerTarget) -> torch.Tensor:
    """(layers, N, L, L) -> (N, layers, V): rows at the query columns, target-weighted, columns at
    the visual positions."""
    queries = target.query_positions  # (N, T)
    rows = torch.arange(len(target), device=attention.device)[:, None]
    picked = attention[:, rows, queries]  # (layers, N, T, L)
    weights = target.weights / target.weights.sum(dim=1, keepdim=True)
    mixed = (picked * weights[None, :, :, None]).sum(dim=2)  # (layers, N, L)
    visual = target.batch.visual_positions  # (N, V)
    return mixed.gather(2, visual[None].expand(mixed.shape[0], -1, -1)).transpose(0, 1)


def layer_range(vlm: VlmAdapter, layers: Any) -> list[int]:
    """``None``: every decoder layer; an int, a list of ints, or a ``(start, stop)`` range given as
    a tuple (stop exclusive, negatives from the end)."""
    depth = vlm.num_decoder_layers
    if layers is None:
        return list(range(depth))
    if isinstance(layers, tuple):
        if len(layers) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
            raise ValueError(f"a layer range is a (start, stop) tuple of ints; got {layers!r}")
        start, stop = (v + depth if v < 0 else v for v in layers)
        if not 0 <= start < stop <= depth:
            raise ValueError(f"layer range {layers} is empty or outside the decoder's {depth} layers")
        return list(range(start, stop))
    try:
        return resolve_layers(layers, depth, "decoder")
    except (IndexError, TypeError) as error:
        raise ValueError(f"layers: {error}") from None


@register
class AnswerAttention(VlmMethod):
    name = "answer_attention"
    family = "attention"
    reference = "Stan et al., LVLM-Interpret, CVPR 2024 workshops (raw attention of the answer to the image)"
    defaults: dict[str, Any] = {"layers": None}

    def visual_values(self, target: AnswerTarget) -> torch.Tensor:
        chosen = layer_range(self.vlm, self.params["layers"])
        return answer_attention_per_layer(self.vlm, target)[:, chosen].mean(dim=1)
