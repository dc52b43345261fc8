"""Per-head spatial maps for a text (Gandelsman, Efros & Steinhardt, ICLR 2024).

The residual decomposition (:mod:`mmelkit.methods.embedding.residual_decomposition`) splits each
attention head's direct contribution to the image embedding over the tokens it reads from: head
h of block l adds ``c_{l,h,t}`` (a vector in the joint space) for token t. Dotting each with the
unit text embedding says how much of the image-text similarity that head draws from that patch:

    map_t = ReLU( sum_{(l, h) chosen} <c_{l,h,t}, text> )     over the patches t (CLS dropped)

normalised to [0, 1]. One forward pass, no gradients. The paper shows single heads' maps; the
default here sums all heads of the last two blocks, where direct effects concentrate.

How it is computed: the final norm is linearised at each image's own ``std`` (see
:func:`~mmelkit.methods.embedding.residual_decomposition.linearised_head`), so the dot product with
the text is linear in the head term, and the text is carried back into each head's value space
first: ``<c_{l,h,t}, text> = A_h[CLS, t] * <v_{h,t}, u_{l,h}>`` with
``u_{l,h} = W_o[:, h]^T centre(gamma * (proj @ text) / std)`` (times the block's LayerScale gain and
open_clip's head scale, when present). That is the decomposition's per-token terms dotted with the
text, without building them (N x blocks x H x T x E floats); only the chosen blocks are traced with
attention probabilities, the others keep the model's fused attention.

Parameters: ``layers`` the blocks (``"last<k>"``, "all", an int or ints, negative ones counting
from the last block; default ``"last2"``), ``heads`` the heads within each chosen block (None: all; an int
or ints, negative ones from the last head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmelkit.methods.base import Explanation, Method, normalise_maps, pair_inputs, register, text_features
from mmelkit.methods.embedding.residual_decomposition import _model_parts, _refuse_active_dropout
from mmelkit.models.adapter import ClipAdapter, TextLike
from mmelkit.models.tracing import resolve_blocks

_CHUNK = 64  # images traced at a time (each chosen block keeps its attention probabilities)


def resolve_layers(layers: Any, depth: int) -> list[int]:
    """Block selection -> sorted block indices: ``"last<k>"`` (the last k blocks, fewer if the
    tower is shallower), ``"all"``, an int or ints (negative ones counting from the last block)."""
    if isinstance(layers, str) and layers.startswith("last"):
        count = layers.removeprefix("last")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"layers={layers!r}: write 'last<k>' with k >= 1, e.g. 'last2'")
        return list(range(max(0, depth - int(count)), depth))
    chosen = resolve_blocks(layers, depth, "image")
    if not chosen:
        raise ValueError("layers is empty: name at least one block")
    return chosen


def resolve_heads(heads: None | int | Sequence[int], num_heads: int) -> list[int]:
    """Head selection -> sorted head indices in [0, num_heads)."""
    if heads is None:
        return list(range(num_heads))
    items = [heads] if isinstance(heads, int) and not isinstance(heads, bool) else heads
    if isinstance(items, str) or not isinstance(items, Sequence):
        raise TypeError(f"heads must be None, an int or a list of ints; got {heads!r}")
    chosen = set()
    for item in items:
        if not isinstance(item, int) or isinstance(item, bool):
            raise TypeError(f"head indices must be ints; got {item!r}")
        if not -num_heads <= item < num_heads:
            raise IndexError(f"blocks have {num_heads} heads; head {item} is out of range")
        chosen.add(item % num_heads)
    if not chosen:
        raise ValueError("heads is empty: name at least one head (or None for all)")
    return sorted(chosen)


@register
class HeadTextMap(Method):
    name = "head_text_map"
    level = "model"
    granularity = "embedding"
    family = "decomposition"
    reference = "Gandelsman, Efros & Steinhardt, Interpreting CLIP's Image Representation via Text-Based Decomposition, ICLR 2024"
    defaults: dict[str, Any] = {"layers": "last2", "heads": None}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        model = self.model
        layers = resolve_layers(self.params["layers"], model.num_image_blocks)
        pixels, tokens = pair_inputs(model, images, texts)
        targets = text_features(model, tokens).float()  # (N, E), unit length
        parts = [
            head_patch_scores(model, pixels[start : start + _CHUNK], targets[start : start + _CHUNK], layers,
                              self.params["heads"])
            for start in range(0, len(pixels), _CHUNK)
        ]
        grid = model.grid(pixels)
        maps = normalise_maps(torch.cat(parts).clamp_min(0).reshape(-1, *grid)).to(model.dtype)
        return Explanation(maps, tuple(pixels.shape[-2:]), self.name, dict(self.params), tokens.texts)


def head_patch_scores(
    model: ClipAdapter, pixels: torch.Tensor, targets: torch.Tensor, layers: list[int], heads: Any
) -> torch.Tensor:
    """sum over the chosen blocks and heads of <c_{l,h,t}, target> for every patch t: (n, P) float32.

    ``targets`` (n, E) unit text embeddings, one per image; ``layers`` sorted block indices;
    ``heads`` as :func:`resolve_heads` takes them. Equal to the decomposition's token terms
    (``decompose_image(..., tokens=True)``) dotted with the targets, up to float rounding."""
    head, blocks = _model_parts(model)
    _refuse_active_dropout(model)
    last = model.num_image_blocks - 1
    with torch.no_grad():
        with model.trace(image_blocks=sorted(set(layers) | {last}), attention_probs=True) as trace:
            model.encode_image(pixels, normalize=False)
        final = trace.image[last].tokens_out[:, 0].float()  # (n, D): what the final norm reads
        std = torch.sqrt(final.var(dim=-1, unbiased=False) + head.eps)
        # <((c - mean c) * gamma / std) @ proj, t> = <c, centre(gamma * (proj @ t) / std)>
        direction = targets.float() @ head.projection.T if head.projection is not None else targets.float()
        if head.norm_weight is not None:
            direction = direction * head.norm_weight
        direction = direction / std[:, None]
        direction = direction - direction.mean(dim=-1, keepdim=True)  # (n, D)
        total = None
        for index in layers:
            record, block = trace.image[index], blocks[index]
            values, probs = record.v, record.attn  # (n, H, T, d), (n, H, T, T)
            chosen = resolve_heads(heads, values.shape[1])
            width, head_dim = block.out_weight.shape[0], values.shape[-1]
            per_head_weight = block.out_weight.reshape(width, values.shape[1], head_dim)[:, chosen]  # (D, H', d)
            gained = direction * block.attention_gain if block.attention_gain is not None else direction
            read = torch.einsum("nD,Dhd->nhd", gained, per_head_weight)  # the text in each head's value space
            if block.head_scale is not None:
                read = read * block.head_scale[chosen][None, :, None]
            along = torch.einsum("nhtd,nhd->nht", values[:, chosen].float(), read)  # <v_{h,t}, u_h>
            scores = (probs[:, chosen, 0, :].float() * along).sum(dim=1)  # (n, T)
            total = scores if total is None else total + scores
    return total[:, record.num_prefix_tokens :]
