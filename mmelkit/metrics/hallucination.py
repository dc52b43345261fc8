"""Object-hallucination metrics for generative VLMs: POPE and CHAIR.

These score a *model's answers*, not an explanation map, so they are not in the map-metric
registry (:mod:`mmelkit.metrics.registry`). Both take plain strings, so any VLM's output works.

* POPE (Li et al., EMNLP 2023): yes/no questions about present and absent objects; accuracy,
  precision, recall and F1 with "yes" as the positive class, and the share of "yes" answers. On a
  balanced probe set an always-"yes" model scores F1 = 2/3 and yes-ratio 1.
* CHAIR (Rohrbach et al., EMNLP 2018): on captions, CHAIR_i = hallucinated object mentions / all
  object mentions, CHAIR_s = captions with at least one hallucinated object / all captions.
* :func:`detector_auroc`: how well a per-answer signal (per layer) tells hallucinated answers from
  correct ones, e.g. the visual attention share of :mod:`mmelkit.methods.inference`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from mmelkit._checks import finite


@dataclass(frozen=True)
class PopeScores:
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    n: int
    unparsed: int  # answers that were neither "yes" nor "no" (counted as "no", as POPE does)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def parse_yes_no(answer: str) -> bool | None:
    """True for an answer whose first word is "yes", False for "no", None otherwise (punctuation
    ignored: "Yes!" is yes). POPE's published script reads the first sentence instead and calls it
    "no" when it holds "no" or "not"; answers here are single words, where both agree, and
    :func:`pope_scores` counts anything that is not "yes" as "no", as that script does."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a string; got {type(answer).__name__}")
    words = re.sub(r"[^\w\s]", " ", answer.lower()).split()
    if not words:
        return None
    return True if words[0] == "yes" else False if words[0] == "no" else None


def pope_scores(predictions: Sequence[str], answers: Sequence[str]) -> PopeScores:
    """POPE scores of generated ``predictions`` against the ground-truth ``answers`` ("yes"/"no")."""
    if isinstance(predictions, str) or isinstance(answers, str):
        raise TypeError("predictions and answers must be sequences of strings, not one string")
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers: give one per probe")
    if not answers:
        raise ValueError("no probes given")
    truth = [parse_yes_no(a) for a in answers]
    if any(t is None for t in truth):
        raise ValueError("ground-truth answers must be 'yes' or 'no'")
    parsed = [parse_yes_no(p) for p in predictions]
    said_yes = [p is True for p in parsed]
    tp = sum(s and t for s, t in zip(said_yes, truth, strict=True))
    fp = sum(s and not t for s, t in zip(said_yes, truth, strict=True))
    fn = sum((not s) and t for s, t in zip(said_yes, truth, strict=True))
    tn = len(truth) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PopeScores(
        accuracy=(tp + tn) / len(truth),
        precision=precision,
        recall=recall,
        f1=f1,
        yes_ratio=sum(said_yes) / len(truth),
        n=len(truth),
        unparsed=sum(p is None for p in parsed),
    )


@dataclass(frozen=True)
class ChairScores:
    chair_i: float
    chair_s: float
    mentions: int
    hallucinated_mentions: int
    captions: int
    hallucinated_captions: int
    recall: float  # share of the present objects the captions name (a caption that says nothing is not good)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def chair_scores(
    captions: Sequence[str],
    present: Sequence[Sequence[str]],
    mentions: Callable[[str], list[str]],
) -> ChairScores:
    """CHAIR of generated ``captions`` given the objects ``present`` in each image.

    ``mentions(caption)`` extracts the object names a caption mentions (for the scene world:
    :func:`mmelkit.datasets.vqa.caption_mentions`); a name mentioned twice counts once, as in CHAIR.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of strings, not one string")
    if len(captions) != len(present):
        raise ValueError(f"{len(captions)} captions for {len(present)} object lists: give one per image")
    if not captions:
        raise ValueError("no captions given")
    total = wrong = bad_captions = named = truth_total = 0
    for caption, objects in zip(captions, present, strict=True):
        said = set(mentions(caption))
        truth = set(objects)
        hallucinated = said - truth
        total += len(said)
        wrong += len(hallucinated)
        bad_captions += bool(hallucinated)
        named += len(said & truth)
        truth_total += len(truth)
    return ChairScores(
        chair_i=wrong / total if total else 0.0,
        chair_s=bad_captions / len(captions),
        mentions=total,
        hallucinated_mentions=wrong,
        captions=len(captions),
        hallucinated_captions=bad_captions,
        recall=named / truth_total if truth_total else 0.0,
    )


def binary_auroc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """AUROC of ``scores`` (K,) for the ``positive`` (K,) bool class, exact via Mann-Whitney U
    (ties count one half: constant scores give 0.5). A float64 scalar; undefined (an error) without
    both classes."""
    from mmelkit.methods.sanity import average_ranks

    if scores.ndim != 1 or positive.shape != scores.shape or positive.dtype != torch.bool:
        raise ValueError(f"scores must be (K,) and positive (K,) bool; got {tuple(scores.shape)} and "
                         f"{tuple(positive.shape)} {positive.dtype}")
    finite("scores", scores)  # NaN has no rank: it would move the AUROC without a word
    count = int(positive.sum())
    if count == 0 or count == len(scores):
        raise ValueError(f"the AUROC needs both classes; got {count} positives among {len(scores)}")
    ranks = average_ranks(scores.detach().double()[None])[0]
    positives, negatives = float(count), float(len(scores) - count)
    u = ranks[positive.to(ranks.device)].sum() - positives * (positives - 1) / 2
    return u / (positives * negatives)


def detector_auroc(signal: torch.Tensor, hallucinated: torch.Tensor, lower_means_hallucinated: bool = True) -> torch.Tensor:
    """(layers,) AUROC per layer of a detector that flags a hallucination where ``signal`` (N,
    layers) is low (or high, ``lower_means_hallucinated=False``); ``hallucinated`` (N,) bool.
    0.5 is chance."""
    if signal.ndim != 2 or hallucinated.shape != signal.shape[:1]:
        raise ValueError(f"signal must be (N, layers) and hallucinated (N,); got {tuple(signal.shape)} and "
                         f"{tuple(hallucinated.shape)}")
    sign = -1.0 if lower_means_hallucinated else 1.0
    return torch.stack([binary_auroc(sign * signal[:, layer], hallucinated) for layer in range(signal.shape[1])])
