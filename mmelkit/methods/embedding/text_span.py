"""TextSpan (Gandelsman, Efros & Steinhardt, ICLR 2024): describe an attention head by texts.

A head's direct contributions to the image embeddings of a data set (one vector per image, from
:func:`~mmelkit.methods.embedding.residual_decomposition.decompose_image`) vary along a few
directions of the joint space. TextSpan names them with texts from a pool, greedily:

1. centre the head's outputs over the data set;
2. among the pool's text embeddings, take the direction (unit vector) along which the current
   outputs vary most, i.e. the largest sum of squared projections;
3. project that direction out of the outputs AND out of every pool direction, so the next pick
   must explain something the earlier picks did not;
4. repeat m times.

The fraction of the outputs' variance that the span of the picks explains grows with every pick
(each step removes a projection from the residual). The paper first restricts the pool to the
head's top principal components (``rank``); without it (the default) the whole joint space is
used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmelkit._checks import positive_int, same_device
from mmelkit.datasets.scenes import COLOURS, NUMBER_WORDS, SHAPES
from mmelkit.methods.base import register_tool
from mmelkit.methods.embedding.residual_decomposition import ResidualDecomposition
from mmelkit.models.adapter import ClipAdapter
from mmelkit.models.tracing import BlockSelection, resolve_blocks

__all__ = ["HeadTextSpans", "TextSpanResult", "scene_text_pool", "text_span", "text_span_heads"]

# A pool direction whose remaining length fell below this share of its original length lies in
# the span of the earlier picks: it explains nothing new and its unit vector would be rounding noise.
_DEGENERATE = 1e-6


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def scene_text_pool() -> list[str]:
    """Descriptions in the synthetic scenes' vocabulary: colours, shapes, sizes, counts, positions.

    E.g. "a red object", "a circle", "a large shape", "two objects", "an object on the left".
    """
    pool = [f"{_article(colour)} {colour} object" for colour in COLOURS]
    pool += [f"{_article(shape)} {shape}" for shape in SHAPES]
    pool += [f"a {size} {noun}" for size in ("small", "large") for noun in ("shape", "object")]
    pool += ["one object"] + [f"{NUMBER_WORDS[count]} objects" for count in range(2, 5)]
    pool += [f"an object {place}" for place in ("on the left", "on the right", "at the top", "at the bottom",
                                                  "in the centre")]
    pool += ["a noisy background", "a textured background"]
    return list(dict.fromkeys(pool))  # order kept, duplicates (none today) dropped


@dataclass(eq=False)
class TextSpanResult:
    """The texts TextSpan picked for one head, in order.

    ``indices`` their positions in the pool; ``variance_explained`` (m,) on the CPU: share of the
    head outputs' variance explained by the span of the first k+1 picks (non-decreasing);
    ``reconstruction`` (N, E): the outputs' mean plus their projection onto the picks' span (the
    outputs as the m texts describe them). ``layer``/``head`` say which head, when known.
    """

    texts: list[str]
    indices: list[int]
    variance_explained: torch.Tensor
    reconstruction: torch.Tensor
    layer: int | None = None
    head: int | None = None

    @property
    def gains(self) -> torch.Tensor:
        """Variance explained by each pick on top of the earlier ones, (m,)."""
        return torch.diff(self.variance_explained, prepend=self.variance_explained.new_zeros(1))

    def to_frame(self) -> Any:
        """A pandas DataFrame: one row per pick (rank, text, pool index, cumulative and own share)."""
        import pandas as pd

        gains = self.gains.tolist()
        rows = [{"layer": self.layer, "head": self.head, "rank": k, "text": text, "pool_index": index,
                 "variance_explained": float(self.variance_explained[k]), "gain": gains[k]}
                for k, (text, index) in enumerate(zip(self.texts, self.indices, strict=True))]
        return pd.DataFrame(rows, columns=["layer", "head", "rank", "text", "pool_index", "variance_explained",
                                           "gain"])


def _work_dtype(device: torch.device) -> torch.dtype:
    # Greedy projections accumulate rounding; float64 keeps late picks clean (MPS has no float64).
    return torch.float32 if device.type == "mps" else torch.float64


def text_span(
    head_outputs: torch.Tensor,
    text_features: torch.Tensor,
    m: int,
    texts: Sequence[str],
    *,
    rank: int | None = None,
    layer: int | None = None,
    head: int | None = None,
) -> TextSpanResult:
    """Greedily pick ``m`` texts whose directions explain most variance of ``head_outputs``.

    ``head_outputs`` (N, E): one head's direct contribution per image (N >= 2);
    ``text_features`` (M, E): the pool's text embeddings (any length; directions are what count);
    ``texts``: the pool's M strings. ``rank``: first project the pool onto the outputs' top
    ``rank`` principal directions, as the paper does. ``layer``/``head`` are only recorded.
    """
    m = positive_int("m", m)
    texts = list(texts)
    if isinstance(text_features, torch.Tensor) and text_features.dim() == 2 and text_features.shape[0] == 0:
        raise ValueError("the text pool is empty")
    if not texts:
        raise ValueError("the text pool is empty")
    if not isinstance(head_outputs, torch.Tensor) or head_outputs.dim() != 2:
        shape = tuple(head_outputs.shape) if isinstance(head_outputs, torch.Tensor) else type(head_outputs).__name__
        raise ValueError(f"head_outputs must be an (N, E) tensor; got {shape}")
    if not isinstance(text_features, torch.Tensor) or text_features.dim() != 2:
        shape = tuple(text_features.shape) if isinstance(text_features, torch.Tensor) else type(text_features).__name__
        raise ValueError(f"text_features must be an (M, E) tensor; got {shape}")
    num_images, width = head_outputs.shape
    if text_features.shape[1] != width:
        raise ValueError(f"text_features have width {text_features.shape[1]}; head_outputs have {width}")
    if text_features.shape[0] != len(texts):
        raise ValueError(f"{len(texts)} texts for {text_features.shape[0]} text features")
    same_device(head_outputs=head_outputs, text_features=text_features)
    if num_images < 2:
        raise ValueError(f"TextSpan needs the outputs of at least 2 images to have a variance; got {num_images}")
    if m > len(texts):
        raise ValueError(f"m={m} picks asked from a pool of {len(texts)} texts")
    if m > width:
        raise ValueError(f"m={m} picks asked in a {width}-dimensional space; at most {width} are independent")

    device = head_outputs.device
    dtype = _work_dtype(device)
    with torch.no_grad():
        outputs = head_outputs.detach().to(dtype)
        mean = outputs.mean(dim=0, keepdim=True)
        residual = outputs - mean
        total = residual.square().sum()
        if total <= 0:
            raise ValueError("the head outputs do not vary over the images: there is no variance to explain")
        directions = text_features.detach().to(device, dtype)
        if rank is not None:
            rank = positive_int("rank", rank)
            basis = torch.linalg.svd(residual, full_matrices=False).Vh[:rank]  # (rank, E)
            directions = directions @ basis.T @ basis
        original_length = torch.linalg.vector_norm(directions, dim=-1)
        picked = torch.zeros(len(texts), dtype=torch.bool, device=device)
        indices: list[int] = []
        explained: list[float] = []
        for step in range(m):
            length = torch.linalg.vector_norm(directions, dim=-1)
            usable = ~picked & (length > _DEGENERATE * original_length) & (original_length > 0)
            if not usable.any():
                raise ValueError(f"the pool spans only {step} direction(s) here; ask for m <= {step}")
            unit = directions / length.clamp_min(torch.finfo(dtype).tiny)[:, None]
            along = (residual @ unit.T).square().sum(dim=0)  # variance (times N) along each direction
            along = torch.where(usable, along, torch.full_like(along, -1.0))
            best = int(along.argmax())
            direction = unit[best]
            residual = residual - (residual @ direction)[:, None] * direction
            directions = directions - (directions @ direction)[:, None] * direction
            picked[best] = True
            indices.append(best)
            explained.append(float(1 - residual.square().sum() / total))
        reconstruction = (outputs - residual).to(torch.float32)
    return TextSpanResult([texts[i] for i in indices], indices, torch.tensor(explained), reconstruction,
                          layer, head)


@dataclass(eq=False)
class HeadTextSpans:
    """TextSpan results of many heads: ``results[(layer, head)]``, layers as block indices."""

    results: dict[tuple[int, int], TextSpanResult] = field(default_factory=dict)
    pool: list[str] = field(default_factory=list)

    def __getitem__(self, key: tuple[int, int]) -> TextSpanResult:
        return self.results[key]

    def __len__(self) -> int:
        return len(self.results)

    def to_frame(self) -> Any:
        """A pandas DataFrame: one row per (layer, head, pick)."""
        import pandas as pd

        frames = [result.to_frame() for _, result in sorted(self.results.items())]
        return pd.concat(frames, ignore_index=True)


def _pool_features(model: ClipAdapter, texts: list[str], batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.encode_text(texts[i : i + batch_size]).float()
                          for i in range(0, len(texts), batch_size)])


@register_tool("text_span", level="model", granularity="embedding", family="decomposition",
               reference="Gandelsman, Efros & Steinhardt, ICLR 2024 (TextSpan); SPEC §7")
def text_span_heads(
    decomposition: ResidualDecomposition,
    model: ClipAdapter,
    texts: Sequence[str] | None = None,
    m: int = 5,
    layers: BlockSelection = None,
    *,
    rank: int | None = None,
    batch_size: int = 256,
) -> HeadTextSpans:
    """:func:`text_span` for every head of ``layers`` (None or "all": every block; ints, negative
    ones from the last block). ``texts``: the pool (default :func:`scene_text_pool`), embedded
    with ``model``'s text tower ``batch_size`` at a time."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    pool = scene_text_pool() if texts is None else list(texts)
    if not pool:
        raise ValueError("the text pool is empty")
    m = positive_int("m", m)
    if m > len(pool):
        raise ValueError(f"m={m} picks asked from a pool of {len(pool)} texts")
    blocks = resolve_blocks("all" if layers is None else layers, decomposition.num_layers, "image")
    features = _pool_features(model, pool, positive_int("batch_size", batch_size)).to(decomposition.heads.device)
    spans = HeadTextSpans(pool=pool)
    for layer in blocks:
        for head in range(decomposition.num_heads):
            spans.results[(layer, head)] = text_span(decomposition.heads[:, layer, head], features, m, pool,
                                                     rank=rank, layer=layer, head=head)
    return spans
