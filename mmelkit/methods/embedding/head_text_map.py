"""Per-head spatial maps for a text (Gandelsman, Efros & Steinhardt, ICLR 2024).

The residual decomposition (:mod:`mmelkit.methods.embedding.residual_decomposition`) splits each
attention head's direct contribution to the image embedding over the tokens it reads from: head
h of block l adds ``c_{l,h,t}`` (a vector in the joint space) for token t. Dotting each with the
unit text embedding says how much of the image-text similarity that head draws from that patch:

    map_t = ReLU( sum_{(l, h) chosen} <c_{l,h,t}, text> )     over the patches t (CLS dropped)

normalised to [0, 1]. One forward pass, no gradients. The paper shows single heads' maps; the
default here sums all heads of the last two blocks, where direct effects concentrate.

Parameters: ``layers`` the blocks (``"last<k>"``, "all", an int or ints, negative ones counting
from the last block; default ``"last2"``), ``heads`` the heads within each chosen block (None: all; an int
or ints, negative ones from the last head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmelkit.methods.base import Explanation, Method, normalise_maps, pair_inputs, register, text_features
from mmelkit.methods.embedding.residual_decomposition import decompose_image
from mmelkit.models.adapter import TextLike
from mmelkit.models.tracing import resolve_blocks

_CHUNK = 16  # images decomposed at a time


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
        parts = []
        # A few images at a time: the token terms are (n, blocks, H, T, E) floats.
        for start in range(0, len(pixels), _CHUNK):
            rows = slice(start, start + _CHUNK)
            decomposition = decompose_image(model, pixels[rows], tokens=True, layers=layers, batch_size=_CHUNK)
            heads = resolve_heads(self.params["heads"], decomposition.num_heads)
            with torch.no_grad():
                chosen = decomposition.head_tokens[:, :, heads, 1:, :]  # (n, B_sel, H_sel, P, E): patches only
                scores = torch.einsum("nlhpe,ne->np", chosen, targets[rows])
            parts.append(scores.clamp_min(0).reshape(-1, *decomposition.grid))
        maps = normalise_maps(torch.cat(parts)).to(model.dtype)
        return Explanation(maps, tuple(pixels.shape[-2:]), self.name, dict(self.params), tokens.texts)
