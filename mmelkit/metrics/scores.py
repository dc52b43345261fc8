"""Score functions for perturbed images: how much does the model still see the text?

A score function turns image embeddings (N, S, E), one row of S perturbation steps per sample,
into scores (N, S), given unit text embeddings of the candidate texts (C, E) and each sample's
target (N,) (the index of its own text among the candidates):

* ``cosine``: cos(image, own text), the CLIP similarity the explanations explain;
* ``softmax``: the probability of the own text under a softmax over ``temperature`` * cos against
  all candidates (CLIP's zero-shot confidence; MMEL's "confidence");
* ``recall``: 1 when the own text is among the ``k`` most similar candidates (text retrieval per
  image; averaged over samples this is Recall@k). Ties count against the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from mmelkit._checks import did_you_mean, positive_int
from mmelkit.models.adapter import ClipAdapter

ScoreKind = Literal["cosine", "softmax", "recall"]
SCORES: tuple[str, ...] = ("cosine", "softmax", "recall")


@dataclass(frozen=True)
class TextScore:
    """A score function over candidate texts; see the module docstring for the kinds."""

    kind: ScoreKind = "cosine"
    temperature: float = 100.0
    k: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCORES:
            raise ValueError(f"unknown score {self.kind!r};{did_you_mean(self.kind, SCORES)} scores: {', '.join(SCORES)}")
        positive_int("k", self.k)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive; got {self.temperature}")

    @property
    def label(self) -> str:
        return {"cosine": "cosine similarity", "softmax": "softmax confidence", "recall": f"Recall@{self.k}"}[self.kind]

    def __call__(self, features: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scores (N, S) for features (N, S, E), candidate embeddings (C, E), targets (N,)."""
        if features.ndim == 2:
            return self(features[:, None], candidates, targets)[:, 0]
        if features.ndim != 3 or len(features) != len(targets):
            raise ValueError(f"features {tuple(features.shape)} must be (N, S, E) with N = {len(targets)} targets")
        candidates = candidates.to(features)
        targets = targets.to(features.device)
        if self.kind == "cosine":
            return (features * candidates[targets][:, None, :]).sum(dim=-1)
        similarity = features @ candidates.T  # (N, S, C)
        own = similarity.gather(2, targets[:, None, None].expand(-1, similarity.shape[1], 1))
        if self.kind == "softmax":
            return torch.softmax(self.temperature * similarity, dim=-1).gather(
                2, targets[:, None, None].expand(-1, similarity.shape[1], 1))[..., 0]
        better = (similarity >= own).sum(dim=-1) - 1  # candidates scoring at least as high, itself excluded
        return (better < self.k).to(features.dtype)


@dataclass
class TextTargets:
    """Candidate texts with their unit embeddings and each sample's index among them."""

    texts: list[str]
    embeddings: torch.Tensor  # (C, E)
    targets: torch.Tensor  # (N,)


def text_targets(
    model: ClipAdapter,
    texts: Sequence[str],
    candidates: Sequence[str] | None = None,
    batch_size: int = 256,
) -> TextTargets:
    """Embed the candidate texts (default: the distinct ``texts``) and find each sample's own text.

    A sample's text missing from ``candidates`` is an error (its confidence would be undefined).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("no texts given")
    pool = list(dict.fromkeys(texts)) if candidates is None else list(dict.fromkeys(candidates))
    index = {text: k for k, text in enumerate(pool)}
    missing = sorted({t for t in texts if t not in index})
    if missing:
        raise ValueError(f"texts not among the candidate texts: {missing[:5]}")
    with torch.no_grad():
        embeddings = torch.cat([model.encode_text(pool[i:i + batch_size]).float()
                                for i in range(0, len(pool), batch_size)])
    targets = torch.tensor([index[t] for t in texts], device=embeddings.device)
    return TextTargets(pool, embeddings, targets)
