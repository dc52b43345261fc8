"""Data attribution by embedding similarity: which training pairs does a prediction resemble?

The cheapest attribution there is (and a common baseline for costlier ones such as TracIn): embed
a bank of training pairs once, then for a query image return the training images nearest to it in
the model's image space, with their captions. When the nearest neighbours share the query's
objects, the prediction is backed by similar training data; when they share only its background,
the model may be leaning on the wrong cue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmelkit.models.adapter import ClipAdapter


@dataclass
class NearestPairs:
    indices: torch.Tensor  # (Q, k) indices into the training bank
    similarity: torch.Tensor  # (Q, k) cosine similarities
    captions: list[list[str]]  # captions of the neighbours


class TrainingBank:
    """Embeddings of ``count`` training pairs ``get_pair(i) -> (image, caption)``, computed once."""

    def __init__(
        self, model: ClipAdapter, get_pair: Callable[[int], tuple[Any, str]], count: int, batch: int = 256
    ) -> None:
        if count <= 0:
            raise ValueError("the training bank needs at least one pair")
        self.model = model
        pairs = [get_pair(i) for i in range(count)]
        self.images = [image for image, _ in pairs]
        self.captions = [caption for _, caption in pairs]
        with torch.no_grad():
            self.features = torch.cat(
                [model.encode_image(self.images[i : i + batch]) for i in range(0, count, batch)]
            )

    def __len__(self) -> int:
        return len(self.captions)


def nearest_training_pairs(bank: TrainingBank, queries: Sequence[Any] | torch.Tensor, k: int = 5) -> NearestPairs:
    """The ``k`` training pairs whose images lie nearest each query image (cosine, image space)."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must lie in 1..{len(bank)}; got {k}")
    with torch.no_grad():
        query_features = bank.model.encode_image(queries)
        similarity, indices = (query_features @ bank.features.T).topk(k, dim=1)
    captions = [[bank.captions[j] for j in row] for row in indices.tolist()]
    return NearestPairs(indices, similarity, captions)
