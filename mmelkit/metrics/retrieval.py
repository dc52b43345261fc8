"""The retrieval protocol (Grad-ECLIP style; a reconstruction for COCO-like image-text data).

Every image is perturbed by its own map (deletion: its top pixels replaced by the substrate;
insertion: its top pixels put onto the substrate) at 0, 5, ..., 50% of its pixels. At each step:

* image retrieval (IR): every distinct caption queries the gallery of perturbed images; a hit when
  the top image's caption is the query;
* text retrieval (TR): every perturbed image queries the gallery of distinct captions; a hit when
  the top caption is the image's own.

Recall@k per step gives two curves; their area (trapezoid rule, fraction rescaled to [0, 1]) is
the score. Deletion curves should fall fast (low AUC) and insertion curves rise fast (high AUC).
Captions shared by several images (the scene world's "a red circle") count as the same item, so
retrieving any image with the query's caption is a hit; with unique captions (COCO) this is the
usual protocol.

Recall needs the whole gallery, so the protocol is split: :func:`perturbed_features` embeds each
image's perturbed copies (that part shards across processes), :func:`retrieval_recall` scores the
gathered embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmelkit._checks import positive_int
from mmelkit.methods.base import Explanation
from mmelkit.metrics.perturbation import (
    Mode,
    Substrate,
    check_fractions,
    perturbed_features,
    trapezoid_auc,
)
from mmelkit.metrics.scores import text_targets
from mmelkit.models.adapter import ClipAdapter

RETRIEVAL_FRACTIONS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(11))  # 0 to 50% in 5% steps


@dataclass
class RetrievalCurves:
    """Recall@k of image retrieval and text retrieval at each fraction of perturbed pixels."""

    mode: Mode
    fractions: torch.Tensor
    image_retrieval: torch.Tensor
    text_retrieval: torch.Tensor
    k: int = 1

    @property
    def image_retrieval_auc(self) -> float:
        return float(trapezoid_auc(self.fractions, self.image_retrieval))

    @property
    def text_retrieval_auc(self) -> float:
        return float(trapezoid_auc(self.fractions, self.text_retrieval))


def retrieval_recall(
    image_features: torch.Tensor, texts: Sequence[str], text_features: torch.Tensor, caption_texts: Sequence[str],
    k: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall@k of image retrieval and of text retrieval at each step, each (S,).

    ``image_features`` (N, S, E) unit embeddings of the perturbed images, ``texts`` (N) each
    image's caption; ``text_features`` (C, E) unit embeddings of the distinct captions
    ``caption_texts``. Ties in similarity count against the query.
    """
    if image_features.ndim != 3 or len(image_features) != len(texts):
        raise ValueError(f"image features {tuple(image_features.shape)} must be (N, S, E) for N = {len(texts)} texts")
    positive_int("k", k)
    if len(text_features) != len(caption_texts):
        raise ValueError(f"got {len(text_features)} caption embeddings for {len(caption_texts)} captions")
    index = {t: c for c, t in enumerate(caption_texts)}
    missing = sorted({t for t in texts if t not in index})
    if missing:
        raise ValueError(f"texts not among the captions: {missing[:5]}")
    device = image_features.device
    owner = torch.tensor([index[t] for t in texts], device=device)  # (N,) caption of each image
    similarity = torch.einsum("nse,ce->snc", image_features, text_features.to(image_features))  # (S, N, C)
    # text retrieval: rank the captions for each image; hit when fewer than k others beat its own
    own = similarity.gather(2, owner[None, :, None].expand(similarity.shape[0], -1, 1))
    text_hits = ((similarity >= own).sum(dim=2) - 1) < k  # (S, N)
    # image retrieval: each caption ranks the images; hit when one of its top k images carries it,
    # i.e. when fewer than k images of other captions score at least as high as its best own image
    # (equal captions share credit; ties count against the query, as for text retrieval, so that
    # identical images, e.g. every copy at 0% inserted onto black, retrieve nothing on any device).
    carries = owner[:, None] == torch.arange(len(caption_texts), device=device)  # (N, C)
    image_hits = []
    for step in similarity:  # (N, C): one step at a time keeps the extra memory at (N, C)
        best = step.masked_fill(~carries, float("-inf")).amax(dim=0)  # each caption's closest own image
        rivals = ((step >= best) & ~carries).sum(dim=0)  # images of other captions at least as close
        image_hits.append((rivals < k) & carries.any(dim=0))
    return torch.stack(image_hits).float().mean(dim=1), text_hits.float().mean(dim=1)


def retrieval_protocol(
    model: ClipAdapter,
    images: Any,
    texts: Sequence[str],
    maps: Explanation | torch.Tensor,
    mode: Mode = "deletion",
    fractions: Sequence[float] | torch.Tensor = RETRIEVAL_FRACTIONS,
    substrate: Substrate | None = None,
    k: int = 1,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> RetrievalCurves:
    """IR and TR Recall@k curves for a gallery of image-caption pairs explained by ``maps``.

    ``substrate`` defaults to ``black`` for deletion and ``blur`` for insertion. A gallery needs at
    least two distinct captions."""
    if isinstance(texts, str):
        raise TypeError("the retrieval protocol needs one caption per image (a list), not a single string")
    texts = list(texts)
    pixels = model.as_pixels(images)
    if len(texts) != len(pixels):
        raise ValueError(f"got {len(texts)} captions for {len(pixels)} images: the protocol needs one caption per image")
    captions = text_targets(model, texts)
    if len(captions.texts) < 2:
        raise ValueError("retrieval needs at least two distinct captions in the gallery")
    steps = check_fractions(fractions)
    substrate = substrate or ("black" if mode == "deletion" else "blur")
    features = perturbed_features(model, pixels, maps, steps, mode, substrate, batch_size, seed, progress)
    image_recall, text_recall = retrieval_recall(features, texts, captions.embeddings, captions.texts, k)
    return RetrievalCurves(mode, steps.to(features.device), image_recall, text_recall, k)
