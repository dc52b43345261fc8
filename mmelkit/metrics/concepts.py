"""Scores of units (neurons, features, directions) against exact concept presence.

Representation tools (CLIP-Dissect's neuron labels, sparse-autoencoder features, probes) claim
that a unit "responds to" a concept. On the scene world the concepts each image holds are known
exactly (:mod:`mmelkit.datasets.concepts`), so the claim can be measured: how well does the unit's
activation separate the images that hold the concept from those that do not? The AUROC answers
that without assuming anything about the activation's scale or sign convention beyond "higher
means more": 1 is perfect separation, 0.5 chance, 0 perfect separation the other way round.

:func:`auroc` computes it for every (unit, concept) pair at once from rank statistics (the
Mann-Whitney U statistic, Mann & Whitney 1947), exact, with ties counting one half.
"""

from __future__ import annotations

import torch

__all__ = ["auroc"]


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based float64 ranks along the last dimension; tied values share their average rank."""
    values = values.contiguous()
    ordered = values.sort(dim=-1).values
    below = torch.searchsorted(ordered, values, right=False)  # how many are strictly smaller
    up_to = torch.searchsorted(ordered, values, right=True)  # how many are smaller or equal
    return (below + up_to - 1).to(torch.float64) / 2


def auroc(scores: torch.Tensor, positives: torch.Tensor, *, strict: bool = False) -> torch.Tensor:
    """AUROC of every unit's scores for every concept: (N, K) scores, (N, C) bool -> (K, C) float64.

    ``scores[:, k]`` is unit k's activation on N images, ``positives[:, c]`` says which images hold
    concept c. Entry (k, c) is P(s_pos > s_neg) + 0.5 * P(s_pos == s_neg) for a random
    (positive, negative) image pair, computed exactly via the Mann-Whitney U statistic: with
    0-based average ranks r of unit k's scores over all N images and P positives,
    U = sum of the positives' ranks - P (P - 1) / 2, AUROC = U / (P (N - P)). Average ranks make
    ties count one half, so a constant unit scores exactly 0.5 for every concept.

    A concept with no positive or no negative image has no pairs and no AUROC: its column is NaN,
    or, with ``strict=True``, a ValueError naming the column(s). Non-finite scores are an error
    (they have no rank). Runs on the scores' device, one sort per unit and one matrix product;
    memory is O(N (K + C)).
    """
    if scores.ndim != 2 or positives.ndim != 2 or scores.shape[0] != positives.shape[0]:
        raise ValueError(f"scores must be (N, K) and positives (N, C) with the same N; got {tuple(scores.shape)} "
                         f"and {tuple(positives.shape)}")
    if positives.dtype != torch.bool:
        raise TypeError(f"positives must be a bool tensor (concept presence); got {positives.dtype}")
    if scores.shape[0] == 0:
        raise ValueError("no images: scores and positives have N = 0 rows")
    scores = scores.detach()
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).any(dim=0).nonzero().flatten().tolist()
        raise ValueError(f"scores hold non-finite values (no rank) in unit column(s) {bad[:10]}")
    n = scores.shape[0]
    present = positives.to(device=scores.device, dtype=torch.float64)
    count = present.sum(dim=0)  # (C,)
    undefined = (count == 0) | (count == n)
    if strict and undefined.any():
        columns = undefined.nonzero().flatten().tolist()
        raise ValueError(f"concept column(s) {columns[:10]} have no positive or no negative image; "
                         "the AUROC needs both")
    ranks = _average_ranks(scores.T.to(torch.float64))  # (K, N)
    u = ranks @ present - count * (count - 1) / 2  # (K, C)
    # Undefined columns divide by zero; clamp keeps the arithmetic clean, the mask sets NaN.
    result = u / (count * (n - count)).clamp_min(1.0)
    return result.masked_fill(undefined[None, :], float("nan"))
