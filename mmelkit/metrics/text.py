"""Rationale quality: how good is a generated textual explanation?

Explanation-guided training (MEGL) has a generator write rationales ("the large red star in the
top left") that are compared with reference rationales, and with the image itself:

* :func:`bleu` -- corpus BLEU (Papineni et al., 2002): n-gram overlap with the references, as
  precision. Clipped n-gram matches and n-gram totals are summed over the whole corpus for
  n = 1..``max_order``, their precisions combined by a geometric mean with uniform weights, times
  a brevity penalty for candidates shorter than their references. :func:`sentence_bleu` is the
  same for one candidate (BLEU is a corpus statistic; per sentence it is noisy and often 0).
* :func:`rouge_l` -- ROUGE-L (Lin, 2004): the longest common subsequence (LCS) of candidate and
  reference, as an F-measure that weighs recall ``beta`` times as much as precision; the mean
  over samples of the per-sample values :func:`rouge_l_scores`.
* :func:`clip_score` -- CLIPScore (Hessel et al., 2021): reference-free, ``weight * max(cos, 0)``
  between the CLIP embeddings of each image and its rationale.

Conventions for the text metrics:

* Tokenisation (:func:`tokenize`): lower-case, then split on whitespace (``str.split()``).
  Punctuation stays attached to its word ("mat." and "mat" differ); strip it beforehand if it
  should not count.
* ``candidates`` is a sequence of strings, one per sample; ``references`` has one entry per sample,
  either one reference string or a non-empty sequence of reference strings. A bare string is not
  accepted as a corpus (it would be read as a sequence of characters).
* Empty texts are allowed: an empty candidate has no n-grams and an LCS of 0 with anything.
* Every score lies in [0, 1] (CLIPScore in [0, ``weight``]). Bad input is a ValueError.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from mmelkit._checks import positive_int, positive_number
from mmelkit.metrics.scores import TextScore
from mmelkit.models.adapter import ClipAdapter
from mmelkit.models.images import as_image_list

References = Sequence[str | Sequence[str]]


# -- inputs ------------------------------------------------------------------------------------------
def tokenize(text: str) -> list[str]:
    """The tokens every text metric here compares: ``text.lower().split()``."""
    if not isinstance(text, str):
        raise ValueError(f"texts must be strings; got {type(text).__name__}")
    return text.lower().split()


def _corpus(candidates: Sequence[str], references: References) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Tokenised candidates and, per sample, its tokenised references; validated."""
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise ValueError(f"candidates must be a sequence of strings (one per sample); got {type(candidates).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise ValueError(
            f"references must be a sequence with one entry per sample; got {type(references).__name__}"
        )
    if len(candidates) != len(references):
        raise ValueError(
            f"need one reference entry per candidate; got {len(candidates)} candidates and {len(references)} references"
        )
    if not candidates:
        raise ValueError("empty corpus: no candidates given")
    tokens: list[list[str]] = []
    for index, candidate in enumerate(candidates):
        if not isinstance(candidate, str):
            raise ValueError(f"candidate {index} must be a string; got {type(candidate).__name__}")
        tokens.append(tokenize(candidate))
    return tokens, [_references(index, entry) for index, entry in enumerate(references)]


def _references(index: int, entry: str | Sequence[str]) -> list[list[str]]:
    if isinstance(entry, str):
        return [tokenize(entry)]
    if not isinstance(entry, Sequence) or not entry:
        raise ValueError(
            f"references of sample {index} must be a string or a non-empty sequence of strings; got {entry!r}"
        )
    bad = [ref for ref in entry if not isinstance(ref, str)]
    if bad:
        raise ValueError(f"references of sample {index} must be strings; got {type(bad[0]).__name__}")
    return [tokenize(ref) for ref in entry]


# -- BLEU --------------------------------------------------------------------------------------------
def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(
    candidates: Sequence[str],
    references: References,
    max_order: int = 4,
    smooth: bool = False,
) -> float:
    """Corpus BLEU of ``candidates`` against ``references`` (one string or several per candidate).

    For each order n = 1..``max_order``: each candidate n-gram's count is clipped to the largest
    count of that n-gram in any one of the candidate's references; ``matches_n`` and ``total_n``
    (the candidate's n-grams, ``max(len - n + 1, 0)``) are summed over the corpus and
    ``p_n = matches_n / total_n``. BLEU = BP * (p_1 * ... * p_N) ** (1 / N), with the brevity penalty
    BP = 1 when c > r, else exp(1 - r / c), where c is the total candidate length and r the sum over
    candidates of the reference length closest to the candidate's length (ties: the shorter).

    Zero precisions: without smoothing, any ``p_n = 0`` (no matches, or no candidate n-grams of
    that order at all) gives 0.0. ``smooth=True`` is Lin & Och's (2004) add-one smoothing as
    in NLTK's ``method2``: for n > 1, ``p_n = (matches_n + 1) / (total_n + 1)`` (on the corpus
    sums); p_1 is never smoothed, so no unigram match still gives 0.0. A corpus whose candidates
    are all empty scores 0.0.
    """
    max_order = positive_int("max_order", max_order)
    cand_tokens, ref_tokens = _corpus(candidates, references)
    matches = [0] * max_order
    totals = [0] * max_order
    cand_length = ref_length = 0
    for cand, refs in zip(cand_tokens, ref_tokens, strict=True):
        cand_length += len(cand)
        ref_length += min((len(ref) for ref in refs), key=lambda length: (abs(length - len(cand)), length))
        for n in range(1, max_order + 1):
            counts = _ngrams(cand, n)
            most: Counter[tuple[str, ...]] = Counter()
            for ref in refs:
                most |= _ngrams(ref, n)  # union of Counters: the max count per n-gram
            matches[n - 1] += sum(min(count, most[gram]) for gram, count in counts.items())
            totals[n - 1] += max(len(cand) - n + 1, 0)
    if cand_length == 0 or matches[0] == 0:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_order + 1):
        matched, total = matches[n - 1], totals[n - 1]
        if smooth and n > 1:
            matched, total = matched + 1, total + 1
        if matched == 0:
            return 0.0
        log_precision += math.log(matched / total)
    brevity = 1.0 if cand_length > ref_length else math.exp(1.0 - ref_length / cand_length)
    return min(1.0, brevity * math.exp(log_precision / max_order))


def sentence_bleu(
    candidate: str,
    references: str | Sequence[str],
    max_order: int = 4,
    smooth: bool = False,
) -> float:
    """BLEU of one candidate against its reference(s): :func:`bleu` on a corpus of one.

    Short candidates often have no 4-gram match; ``smooth=True`` or a lower ``max_order`` helps.
    """
    if not isinstance(candidate, str):
        raise ValueError(f"candidate must be a string; got {type(candidate).__name__}")
    return bleu([candidate], [references], max_order=max_order, smooth=smooth)


# -- ROUGE-L -----------------------------------------------------------------------------------------
def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (dynamic programme, O(len a * len b))."""
    if len(b) > len(a):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def _rouge_l_f(cand: list[str], ref: list[str], beta: float) -> float:
    common = lcs_length(cand, ref)
    if common == 0:
        return 0.0
    recall = common / len(ref)
    precision = common / len(cand)
    return (1 + beta**2) * recall * precision / (recall + beta**2 * precision)


def rouge_l_scores(candidates: Sequence[str], references: References, beta: float = 1.2) -> list[float]:
    """Sentence ROUGE-L F-measure of each candidate, in [0, 1].

    With ``L = LCS(candidate, reference)`` on tokens: R = L / len(reference), P = L / len(candidate),
    F = (1 + beta^2) R P / (R + beta^2 P); ``beta > 1`` weighs recall more (1.2 is the COCO caption
    evaluation's choice; 1 is the plain F1 of the ``rouge_score`` package). With several references
    the sample's score is the largest F over them (as ``rouge_score``'s ``score_multi``; COCO's
    evaluation instead combines the largest P and the largest R, which can differ). An LCS of 0
    (including an empty candidate or reference) scores 0.
    """
    beta = positive_number("beta", beta)
    cand_tokens, ref_tokens = _corpus(candidates, references)
    return [max(_rouge_l_f(cand, ref, beta) for ref in refs) for cand, refs in zip(cand_tokens, ref_tokens, strict=True)]


def rouge_l(candidates: Sequence[str], references: References, beta: float = 1.2) -> float:
    """Mean over samples of :func:`rouge_l_scores`."""
    scores = rouge_l_scores(candidates, references, beta)
    return math.fsum(scores) / len(scores)


# -- CLIPScore ---------------------------------------------------------------------------------------
def clip_score(
    model: ClipAdapter,
    images: Any,
    texts: Sequence[str],
    weight: float = 2.5,
    batch_size: int = 64,
) -> torch.Tensor:
    """CLIPScore (Hessel et al., 2021) of each image with its text: ``weight * max(cos(E_I, E_T), 0)``.

    ``images``: anything :meth:`ClipAdapter.as_pixels` takes (a list of PIL images or HxWx3 uint8
    arrays, raw image tensors, or model input ``(N, 3, H, W)`` float from ``model.preprocess``);
    ``texts``: one string per image. Images are preprocessed and both sides encoded
    ``batch_size`` pairs at a time, under ``torch.no_grad``; the cosine is the ``"cosine"``
    :class:`~mmelkit.metrics.scores.TextScore` of the unit embeddings (in float32). ``weight`` 2.5
    is the paper's rescaling (cosines of real pairs rarely pass 0.4).

    Returns (N,) float32 on the model's device, each in [0, ``weight``]; its mean is the corpus
    CLIPScore.
    """
    weight = positive_number("weight", weight)
    batch_size = positive_int("batch_size", batch_size)
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"texts must be a sequence of strings (one per image); got {type(texts).__name__}")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must be strings; got {type(bad[0]).__name__}")
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
        items: Any = images  # model input: sliced as is
    else:
        items = as_image_list(images)  # preprocessed batch by batch, not all at once
    if len(items) != len(texts):
        raise ValueError(f"clip_score needs one text per image; got {len(items)} images and {len(texts)} texts")
    cosine = TextScore("cosine")
    scores = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            image_features = model.encode_image(model.as_pixels(items[start:start + batch_size])).float()
            text_features = model.encode_text(list(texts[start:start + batch_size])).float()
            own = torch.arange(len(text_features), device=image_features.device)
            scores.append(cosine(image_features, text_features, own))
    return weight * torch.cat(scores).clamp_min(0.0)
