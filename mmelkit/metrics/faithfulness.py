"""Faithfulness: does removing what a map calls important change what the model sees?

* Deletion and insertion curves (Petsiuk et al., 2018): pixels are removed (deletion) or added
  back (insertion) in the order of the map, in ``steps`` steps up to ``max_fraction`` of the
  image, and the model re-scores the image against its text after each step. The area under the
  curve (trapezoid rule over the fraction rescaled to [0, 1]) summarises it: low for deletion and
  high for insertion mean the map found what the model uses.
* Average Drop and Average Increase in Confidence (Chattopadhyay et al., 2018; MMEL's
  "Confidence Drop / Increase"): the image is multiplied by its map (the rest becomes the
  substrate, black by default) and CLIP's confidence in the text, a softmax over 100 * cos
  against the candidate texts, is compared with the confidence on the full image.

Everything runs on the model's device, many perturbed copies per forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmelkit._checks import positive_int
from mmelkit.methods.base import Explanation, normalise_maps
from mmelkit.metrics.perturbation import (
    Mode,
    Substrate,
    as_map_tensor,
    even_fractions,
    perturbed_features,
    substrate_pixels,
    trapezoid_auc,
    upsample_maps,
)
from mmelkit.metrics.scores import ScoreKind, TextScore, text_targets
from mmelkit.models.adapter import ClipAdapter


@dataclass
class Curves:
    """Per-sample perturbation curves: ``scores`` (N, S) at ``fractions`` (S,) of the pixels."""

    mode: Mode
    fractions: torch.Tensor
    scores: torch.Tensor
    substrate: str
    score: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def auc(self) -> torch.Tensor:
        """Area under each sample's curve, (N,)."""
        return trapezoid_auc(self.fractions, self.scores)

    def mean_curve(self) -> torch.Tensor:
        """The curve averaged over samples, (S,)."""
        return self.scores.mean(dim=0)


def _check_texts(texts: str | Sequence[str], count: int) -> list[str]:
    texts = [texts] * count if isinstance(texts, str) else list(texts)
    if len(texts) != count:
        raise ValueError(f"got {len(texts)} texts for {count} images: pass one text per image (or one for all)")
    return texts


def perturbation_curves(
    model: ClipAdapter,
    images: Any,
    texts: str | Sequence[str],
    maps: Explanation | torch.Tensor,
    mode: Mode = "deletion",
    steps: int = 100,
    max_fraction: float = 1.0,
    substrate: Substrate | None = None,
    score: ScoreKind | TextScore = "cosine",
    candidates: Sequence[str] | None = None,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> Curves:
    """Deletion or insertion curves for image-text pairs (one map per pair).

    ``substrate`` defaults to ``black`` for deletion and ``blur`` for insertion (Petsiuk et al.);
    ``score`` is ``cosine`` (default), ``softmax`` or ``recall`` over ``candidates`` (default: the
    distinct ``texts``), or a :class:`TextScore`. ``seed`` fixes the tie-break order and the noise.
    """
    pixels = model.as_pixels(images)
    texts = _check_texts(texts, len(pixels))
    scorer = score if isinstance(score, TextScore) else TextScore(score)
    substrate = substrate or ("black" if mode == "deletion" else "blur")
    fractions = even_fractions(steps, max_fraction)
    targets = text_targets(model, texts, candidates)
    features = perturbed_features(model, pixels, maps, fractions, mode, substrate, batch_size, seed, progress)
    scores = scorer(features, targets.embeddings, targets.targets)
    return Curves(mode, fractions.to(scores.device), scores, substrate, scorer.label,
                  {"steps": steps, "max_fraction": max_fraction, "seed": seed})


def deletion_curves(model: ClipAdapter, images: Any, texts: str | Sequence[str], maps: Explanation | torch.Tensor,
                    **options: Any) -> Curves:
    """Deletion curves (most important pixels removed first); see :func:`perturbation_curves`."""
    return perturbation_curves(model, images, texts, maps, mode="deletion", **options)


def insertion_curves(model: ClipAdapter, images: Any, texts: str | Sequence[str], maps: Explanation | torch.Tensor,
                     **options: Any) -> Curves:
    """Insertion curves (most important pixels added first); see :func:`perturbation_curves`."""
    return perturbation_curves(model, images, texts, maps, mode="insertion", **options)


@dataclass
class ConfidenceChange:
    """Confidence on each full image (``original``) and on the image times its map (``explained``)."""

    original: torch.Tensor
    explained: torch.Tensor

    @property
    def drop(self) -> torch.Tensor:
        """Per-sample drop in percent of the original confidence, 100 * max(0, Y - O) / Y."""
        return 100 * (self.original - self.explained).clamp_min(0) / self.original

    @property
    def increase(self) -> torch.Tensor:
        """Per-sample indicator (0 or 100) that the confidence rose, 100 * [Y < O]."""
        return 100 * (self.original < self.explained).to(self.original.dtype)

    @property
    def average_drop(self) -> float:
        return float(self.drop.mean())

    @property
    def average_increase(self) -> float:
        return float(self.increase.mean())


def masked_by_maps(model: ClipAdapter, pixels: torch.Tensor, maps: torch.Tensor, substrate: Substrate = "black",
                   seed: int = 0) -> torch.Tensor:
    """``image * map`` as model input: each pixel mixes the image (weight = map, min-max normalised
    to [0, 1]) with the substrate (weight 1 - map). With the black substrate this is exactly the
    raw image times the map."""
    weights = upsample_maps(normalise_maps(maps), tuple(pixels.shape[-2:]))[:, None].to(pixels.dtype)
    fill = substrate_pixels(model, pixels, substrate, seed)
    return weights * pixels + (1 - weights) * fill


def confidence_change(
    model: ClipAdapter,
    images: Any,
    texts: str | Sequence[str],
    maps: Explanation | torch.Tensor,
    candidates: Sequence[str] | None = None,
    substrate: Substrate = "black",
    temperature: float = 100.0,
    batch_size: int = 128,
    seed: int = 0,
) -> ConfidenceChange:
    """Average Drop / Increase in Confidence: CLIP's softmax confidence in each text over
    ``candidates`` (default: the distinct ``texts``; pass a class list with more than one text),
    on the image and on the image times its map."""
    positive_int("batch_size", batch_size)
    pixels = model.as_pixels(images)
    texts = _check_texts(texts, len(pixels))
    maps = as_map_tensor(maps, len(pixels)).to(pixels.device)
    targets = text_targets(model, texts, candidates)
    if len(targets.texts) < 2:
        raise ValueError("confidence needs at least two candidate texts (a softmax over one text is always 1)")
    scorer = TextScore("softmax", temperature=temperature)
    original, explained = [], []
    with torch.no_grad():
        for first in range(0, len(pixels), batch_size):
            batch = slice(first, first + batch_size)
            masked = masked_by_maps(model, pixels[batch], maps[batch], substrate, seed)
            features = model.encode_image(torch.cat([pixels[batch], masked])).float()
            scores = scorer(features, targets.embeddings, targets.targets[batch].repeat(2))
            half = len(scores) // 2
            original.append(scores[:half])
            explained.append(scores[half:])
    return ConfidenceChange(torch.cat(original), torch.cat(explained))
