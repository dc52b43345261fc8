"""Rationale-quality metrics: hand-computed BLEU and ROUGE-L cases, slow plain-Python references on
random corpora, multi-reference and brevity rules, bad inputs, and CLIPScore against the formula
computed from the adapter's own embeddings."""

from __future__ import annotations

import functools
import math
import random
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import TEXTS, make_open_clip

import mmelkit
from mmelkit.metrics.text import (
    bleu,
    clip_score,
    lcs_length,
    rouge_l,
    rouge_l_scores,
    sentence_bleu,
    tokenize,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = ["the", "a", "red", "star", "left", "top", "big", "in"]
SMALL_VOCAB = VOCAB[:4]  # for BLEU: enough repeated 4-grams for non-zero BLEU-4 on random corpora


# -- slow references: written from the definitions, one sample at a time ----------------------------
def ref_ngram_counts(words: list[str], n: int) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = {}
    for start in range(len(words) - n + 1):
        gram = tuple(words[start:start + n])
        counts[gram] = counts.get(gram, 0) + 1
    return counts


def ref_bleu(candidates: list[str], references: list[list[str]], max_order: int, smooth: bool) -> float:
    hits = [0] * max_order
    grams = [0] * max_order
    c = r = 0
    for candidate, refs in zip(candidates, references, strict=True):
        words = candidate.lower().split()
        ref_words = [ref.lower().split() for ref in refs]
        c += len(words)
        lengths = sorted(len(w) for w in ref_words)  # ascending: the first of two equally close is shorter
        best = lengths[0]
        for length in lengths:
            if abs(length - len(words)) < abs(best - len(words)):
                best = length
        r += best
        for n in range(1, max_order + 1):
            own = ref_ngram_counts(words, n)
            for gram, count in own.items():
                allowed = 0
                for w in ref_words:
                    allowed = max(allowed, ref_ngram_counts(w, n).get(gram, 0))
                hits[n - 1] += min(count, allowed)
            grams[n - 1] += sum(own.values())
    if c == 0:
        return 0.0
    product = 1.0
    for n in range(max_order):
        num, den = hits[n], grams[n]
        if smooth and n > 0:
            num, den = num + 1, den + 1
        if num == 0:
            return 0.0
        product *= num / den
    penalty = 1.0 if c > r else math.exp(1 - r / c)
    return penalty * product ** (1 / max_order)


def ref_lcs(a: list[str], b: list[str]) -> int:
    @functools.cache
    def best(i: int, j: int) -> int:  # LCS of a[i:] and b[j:]
        if i == len(a) or j == len(b):
            return 0
        if a[i] == b[j]:
            return 1 + best(i + 1, j + 1)
        return max(best(i + 1, j), best(i, j + 1))

    return best(0, 0)


def ref_rouge_l(candidate: str, refs: list[str], beta: float) -> float:
    words = candidate.lower().split()
    scores = [0.0]
    for ref in refs:
        ref_words = ref.lower().split()
        common = ref_lcs(words, ref_words)
        if common:
            rec, prec = common / len(ref_words), common / len(words)
            scores.append((1 + beta * beta) * rec * prec / (rec + beta * beta * prec))
    return max(scores)


def random_sentence(rng: random.Random, low: int, high: int, vocab: list[str] = VOCAB) -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(low, high)))


def random_corpus(
    rng: random.Random, size: int, low: int = 0, vocab: list[str] = VOCAB
) -> tuple[list[str], list[list[str]]]:
    """``size`` candidates of ``low``..10 words, each with 1 to 3 references."""
    candidates = [random_sentence(rng, low, 10, vocab) for _ in range(size)]
    references = [[random_sentence(rng, low, 10, vocab) for _ in range(rng.randint(1, 3))] for _ in range(size)]
    return candidates, references


# -- BLEU: closed-form cases ----------------------------------------------------------------------
def test_tokenize_lowercases_and_splits_on_whitespace() -> None:
    assert tokenize("  The Big\tRED star.\n") == ["the", "big", "red", "star."]
    assert tokenize("") == []


def test_identical_candidate_scores_one() -> None:
    text = "the large red star in the top left"
    assert bleu([text], [text]) == 1.0
    assert sentence_bleu(text.upper(), text) == 1.0  # case does not matter
    assert bleu([text, "a blue bar on the right side"], [[text], ["a blue bar on the right side"]]) == 1.0


def test_clipping_classic_example() -> None:
    # Papineni et al.: "the" x7 against "the cat is on the mat": "the" is clipped to its 2
    # occurrences in the reference -> p1 = 2/7. c = 7 > r = 6, so no brevity penalty.
    candidate = "the the the the the the the"
    assert sentence_bleu(candidate, "the cat is on the mat", max_order=1) == pytest.approx(2 / 7, abs=1e-12)
    # With the paper's second reference the clip is max(2, 1) = 2; r = 7 (closest to c = 7).
    refs = ["the cat is on the mat", "there is a cat on the mat"]
    assert sentence_bleu(candidate, refs, max_order=1) == pytest.approx(2 / 7, abs=1e-12)
    assert sentence_bleu(candidate, refs, max_order=2) == 0.0  # no bigram "the the" in any reference


def test_worked_example_with_brevity_penalty() -> None:
    # candidate "the cat on the mat" (c = 5), reference "the cat sat on the mat" (r = 6).
    #   unigrams: the x2, cat, on, mat -- all in the reference (the x2)        p1 = 5/5
    #   bigrams : the cat, cat on, on the, the mat -- "cat on" missing          p2 = 3/4
    #   trigrams: the cat on, cat on the, on the mat -- only "on the mat"      p3 = 1/3
    #   4-grams : the cat on the, cat on the mat -- none                       p4 = 0/2
    #   BP = exp(1 - 6/5) = exp(-0.2)
    candidate, reference = "the cat on the mat", "the cat sat on the mat"
    penalty = math.exp(-0.2)
    assert sentence_bleu(candidate, reference, max_order=1) == pytest.approx(penalty, abs=1e-12)
    assert sentence_bleu(candidate, reference, max_order=2) == pytest.approx(penalty * math.sqrt(3 / 4), abs=1e-12)
    assert sentence_bleu(candidate, reference, max_order=3) == pytest.approx(penalty * (1 / 4) ** (1 / 3), abs=1e-12)
    assert sentence_bleu(candidate, reference) == 0.0  # p4 = 0, unsmoothed
    # add-one for n > 1: p2 = 4/5, p3 = 2/4, p4 = 1/3; p1 stays 5/5
    smoothed = penalty * (1 * 4 / 5 * 2 / 4 * 1 / 3) ** (1 / 4)
    assert sentence_bleu(candidate, reference, smooth=True) == pytest.approx(smoothed, abs=1e-12)


def test_corpus_bleu_pools_counts_rather_than_averaging() -> None:
    # sample 1: "a b" vs "a b" -> 2/2; sample 2: "c d e f" vs "c x y z" -> 1/4.
    # corpus p1 = 3/6 and c = r = 6 (BP = 1); the mean of sentence scores would be 0.625.
    candidates, references = ["a b", "c d e f"], ["a b", "c x y z"]
    assert bleu(candidates, references, max_order=1) == pytest.approx(0.5, abs=1e-12)
    mean = (sentence_bleu("a b", "a b", max_order=1) + sentence_bleu("c d e f", "c x y z", max_order=1)) / 2
    assert mean == pytest.approx(0.625, abs=1e-12)


def test_brevity_penalty_sums_lengths_over_the_corpus() -> None:
    # an empty candidate adds 0 to c but its closest reference length (2) to r: c = 2, r = 4.
    assert bleu(["", "a b"], ["a b", "a b"], max_order=1) == pytest.approx(math.exp(1 - 4 / 2), abs=1e-12)
    # longer than the reference: no penalty, only the precision (2/3)
    assert sentence_bleu("a b c", "a b", max_order=1) == pytest.approx(2 / 3, abs=1e-12)
    # equal length: exp(0) = 1
    assert sentence_bleu("a b", "b a", max_order=1) == 1.0


def test_closest_reference_length_ties_go_to_the_shorter() -> None:
    # c = 5, references of length 4 and 6 are equally close: r = 4, so c > r and BP = 1 (p1 = 5/5).
    # Taking 6 would give exp(1 - 6/5).
    candidate = "a b c d e"
    for refs in (["a b c d", "a b c d e f"], ["a b c d e f", "a b c d"]):
        assert sentence_bleu(candidate, refs, max_order=1) == 1.0
    # the closest length is used even when it is not the shortest: lengths 2 and 5, c = 5 -> r = 5
    assert sentence_bleu(candidate, ["a b", "e d c b a"], max_order=1) == 1.0


def test_multi_reference_clipping_uses_the_best_single_reference() -> None:
    # "red red star" vs refs "red star" and "red red": "red" may count max(1, 2) = 2, "star" 1
    # -> p1 = 3/3; bigrams: "red red" (in ref 2), "red star" (in ref 1) -> p2 = 2/2. Lengths 2, 2
    # are closest to c = 3: r = 2, no penalty.
    assert sentence_bleu("red red star", ["red star", "red red"], max_order=2) == 1.0
    # the counts are not summed over references: three "red" against two refs with one each -> 1/3
    assert sentence_bleu("red red red", ["red star", "star red"], max_order=1) == pytest.approx(1 / 3, abs=1e-12)
    # a single-string reference and a one-element list are the same
    assert bleu(["the red star"], ["the big red star"]) == bleu(["the red star"], [["the big red star"]])


def test_degenerate_corpora_score_zero() -> None:
    assert bleu([""], ["a b"]) == 0.0
    assert bleu(["", ""], [["a"], ["b c"]], smooth=True) == 0.0
    assert sentence_bleu("x y z", "a b c", smooth=True) == 0.0  # no unigram match: p1 is not smoothed
    # a candidate shorter than max_order has no 4-grams: 0 unsmoothed, (0 + 1) / (0 + 1) smoothed
    assert sentence_bleu("a b", "a b") == 0.0
    assert sentence_bleu("a b", "a b", smooth=True) == pytest.approx(1 * 1 * 1 * 1, abs=1e-12)


# -- BLEU and ROUGE-L against the slow references -----------------------------------------------------
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_bleu_matches_reference_implementation(max_order: int, smooth: bool) -> None:
    rng = random.Random(1000 * max_order + smooth)
    values = []
    for size in (1, 3, 50):
        for _ in range(4):
            candidates, references = random_corpus(rng, size, vocab=SMALL_VOCAB)
            got = bleu(candidates, references, max_order=max_order, smooth=smooth)
            assert got == pytest.approx(ref_bleu(candidates, references, max_order, smooth), abs=1e-12)
            assert 0.0 <= got <= 1.0
            values.append(got)
    assert len({round(v, 9) for v in values}) > 3  # the random corpora exercise more than 0 and 1


def test_lcs_matches_reference() -> None:
    rng = random.Random(7)
    for _ in range(50):
        a = random_sentence(rng, 0, 12).split()
        b = random_sentence(rng, 0, 12).split()
        assert lcs_length(a, b) == ref_lcs(a, b) == lcs_length(b, a)
    assert lcs_length("a b c d e".split(), "x b y d z e".split()) == 3


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.2, 3.0])
def test_rouge_l_matches_reference_implementation(beta: float) -> None:
    rng = random.Random(int(beta * 10))
    candidates, references = random_corpus(rng, 50)
    scores = rouge_l_scores(candidates, references, beta=beta)
    expected = [ref_rouge_l(c, refs, beta) for c, refs in zip(candidates, references, strict=True)]
    assert scores == pytest.approx(expected, abs=1e-12)
    assert rouge_l(candidates, references, beta=beta) == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert len(set(scores)) > 5


# -- ROUGE-L: closed-form cases -----------------------------------------------------------------------
def test_rouge_l_worked_examples() -> None:
    reference = "police killed the gunman"
    assert rouge_l(["Police killed the gunman"], [reference]) == 1.0
    # Lin's example: LCS("police kill the gunman", ref) = 3 ("police the gunman"): R = P = 3/4,
    # and with R = P the F-measure is R whatever beta; "the gunman kill police": LCS 2 -> 1/2.
    assert rouge_l_scores(["police kill the gunman", "the gunman kill police"], [reference, reference]) == pytest.approx(
        [3 / 4, 1 / 2], abs=1e-12
    )
    assert rouge_l(["police kill the gunman", "the gunman kill police"], [reference] * 2) == pytest.approx(5 / 8)


def test_rouge_l_beta_weighs_recall() -> None:
    # "police the gunman" vs "police killed the gunman": LCS 3, R = 3/4, P = 3/3.
    candidate, reference = ["police the gunman"], ["police killed the gunman"]
    recall, precision = 3 / 4, 1.0

    def f(beta: float) -> float:
        return (1 + beta**2) * recall * precision / (recall + beta**2 * precision)

    assert rouge_l(candidate, reference, beta=1.0) == pytest.approx(6 / 7, abs=1e-12)  # 2PR / (P + R)
    assert rouge_l(candidate, reference) == pytest.approx(f(1.2), abs=1e-12)  # default beta 1.2
    assert rouge_l(candidate, reference) == pytest.approx(2.44 * 0.75 / (0.75 + 1.44), abs=1e-12)
    assert rouge_l(candidate, reference, beta=1000.0) == pytest.approx(recall, abs=1e-5)  # large beta -> recall
    assert rouge_l(candidate, reference, beta=1e-3) == pytest.approx(precision, abs=1e-5)  # small beta -> precision


def test_rouge_l_multi_reference_takes_the_best() -> None:
    candidate = "police kill the gunman"
    refs = ["the gunman kill police", "police killed the gunman"]  # F = 1/2 and 3/4
    assert rouge_l_scores([candidate], [refs]) == pytest.approx([3 / 4], abs=1e-12)
    assert rouge_l_scores([candidate], [refs[::-1]]) == pytest.approx([3 / 4], abs=1e-12)
    assert rouge_l([candidate], [[refs[0]]]) == pytest.approx(1 / 2, abs=1e-12)


def test_rouge_l_empty_texts_score_zero() -> None:
    assert rouge_l_scores(["", "a"], ["a b", ""]) == [0.0, 0.0]
    assert rouge_l_scores(["x y"], ["a b"]) == [0.0]


# -- bad inputs ---------------------------------------------------------------------------------------
TEXT_METRICS = [bleu, rouge_l, rouge_l_scores]


@pytest.mark.parametrize("metric", TEXT_METRICS)
def test_text_metrics_reject_bad_corpora(metric: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match="one reference entry per candidate"):
        metric(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty corpus"):
        metric([], [])
    with pytest.raises(ValueError, match="candidate 1 must be a string"):
        metric(["a", 3], ["a", "b"])
    with pytest.raises(ValueError, match="candidates must be a sequence"):
        metric("a b", ["a b"])
    with pytest.raises(ValueError, match="references must be a sequence"):
        metric(["a b"], "a b")
    with pytest.raises(ValueError, match="references of sample 0 must be strings"):
        metric(["a b"], [["a b", None]])
    with pytest.raises(ValueError, match="references of sample 1 must be a string or a non-empty"):
        metric(["a", "b"], ["a", []])
    with pytest.raises(ValueError, match="references of sample 0 must be a string or a non-empty"):
        metric(["a"], [7])


def test_bleu_rejects_bad_orders() -> None:
    for order in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="max_order"):
            bleu(["a"], ["a"], max_order=order)
    with pytest.raises(ValueError, match="candidate must be a string"):
        sentence_bleu(["a"], "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="texts must be strings"):
        tokenize(None)  # type: ignore[arg-type]


def test_rouge_l_rejects_bad_beta() -> None:
    for beta in (0, -1.0, math.inf, math.nan, True, "1.2"):
        with pytest.raises(ValueError, match="beta"):
            rouge_l(["a"], ["a"], beta=beta)


# -- optional cross-checks with the usual packages (skipped when not installed) -----------------------
def test_bleu_agrees_with_nltk() -> None:
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    rng = random.Random(3)
    smoothing = nltk_bleu.SmoothingFunction().method2
    for _ in range(5):
        # NLTK counts a sentence without n-grams of order n as one n-gram (denominator max(1, .)):
        # keep every candidate at least max_order long so that quirk does not show.
        candidates, references = random_corpus(rng, 20, low=4, vocab=SMALL_VOCAB)
        hyps = [c.split() for c in candidates]
        refs = [[r.split() for r in rs] for rs in references]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = nltk_bleu.corpus_bleu(refs, hyps)
            smoothed = nltk_bleu.corpus_bleu(refs, hyps, smoothing_function=smoothing)
        assert bleu(candidates, references) == pytest.approx(plain, abs=1e-9)
        assert bleu(candidates, references, smooth=True) == pytest.approx(smoothed, abs=1e-9)


def test_rouge_l_agrees_with_rouge_score() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rng = random.Random(4)
    candidates, references = random_corpus(rng, 30)
    expected = [max(scorer.score(ref, cand)["rougeL"].fmeasure for ref in refs)
                for cand, refs in zip(candidates, references, strict=True)]
    assert rouge_l_scores(candidates, references, beta=1.0) == pytest.approx(expected, abs=1e-9)


# -- CLIPScore ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> mmelkit.ClipAdapter:
    return mmelkit.load_model(make_open_clip(seed=3), device="cpu")


@pytest.fixture
def arrays(images: torch.Tensor) -> list[np.ndarray]:
    """The conftest images as HxWx3 uint8 arrays."""
    return [a for a in (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()]


def direct_cosines(model: mmelkit.ClipAdapter, arrays: list[np.ndarray], texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        image_features = model.encode_image(model.preprocess(arrays))
        text_features = model.encode_text(texts)
    return (image_features * text_features).sum(dim=-1)


def all_pairs(arrays: list[np.ndarray]) -> tuple[list[np.ndarray], list[str]]:
    """Every image with every text: 9 pairs, so cosines of both signs are likely."""
    pairs = [(a, t) for a in arrays for t in TEXTS]
    return [a for a, _ in pairs], [t for _, t in pairs]


def test_clip_score_is_the_clipped_scaled_cosine(model: mmelkit.ClipAdapter, arrays: list[np.ndarray]) -> None:
    pair_images, pair_texts = all_pairs(arrays)
    cosines = direct_cosines(model, pair_images, pair_texts)
    scores = clip_score(model, pair_images, pair_texts)
    assert scores.shape == (9,) and scores.dtype == torch.float32
    assert scores.device == torch.device(model.device) and not scores.requires_grad
    torch.testing.assert_close(scores, 2.5 * cosines.clamp_min(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip_score(model, pair_images, pair_texts, weight=1.0), cosines.clamp_min(0),
                               atol=1e-5, rtol=1e-5)
    # model input and raw images give the same scores
    torch.testing.assert_close(clip_score(model, model.preprocess(arrays), TEXTS), scores[[0, 4, 8]],
                               atol=1e-5, rtol=1e-5)


def test_clip_score_batch_size_does_not_matter(model: mmelkit.ClipAdapter, arrays: list[np.ndarray]) -> None:
    pair_images, pair_texts = all_pairs(arrays)
    one = clip_score(model, pair_images, pair_texts, batch_size=1)
    four = clip_score(model, pair_images, pair_texts, batch_size=4)  # a ragged last batch
    full = clip_score(model, pair_images, pair_texts, batch_size=64)
    torch.testing.assert_close(one, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(four, full, atol=1e-5, rtol=1e-5)


def test_clip_score_clips_negative_cosines(
    model: mmelkit.ClipAdapter, arrays: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    pair_images, pair_texts = all_pairs(arrays)
    cosines = direct_cosines(model, pair_images, pair_texts)
    assert (cosines > 0).any() and (cosines < 0).any()  # both signs occur with this seed
    encode_text = model.encode_text
    # negated text embeddings flip every cosine: the pairs that were positive must now score 0
    monkeypatch.setattr(model, "encode_text", lambda texts, normalize=True: -encode_text(texts, normalize))
    flipped = clip_score(model, pair_images, pair_texts)
    assert (flipped[cosines > 0] == 0).all()
    torch.testing.assert_close(flipped, 2.5 * (-cosines).clamp_min(0), atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    plain = clip_score(model, pair_images, pair_texts)
    assert (plain[cosines < 0] == 0).all()
    torch.testing.assert_close(plain + flipped, 2.5 * cosines.abs(), atol=1e-5, rtol=1e-5)


def test_clip_score_rejects_bad_inputs(model: mmelkit.ClipAdapter, arrays: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match="one text per image; got 3 images and 2 texts"):
        clip_score(model, arrays, TEXTS[:2])
    with pytest.raises(ValueError, match="one text per image; got 1 images and 3 texts"):
        clip_score(model, arrays[0], TEXTS)
    with pytest.raises(ValueError, match="sequence of strings"):
        clip_score(model, arrays[:1], TEXTS[0])
    with pytest.raises(ValueError, match="texts must be strings"):
        clip_score(model, arrays[:2], ["a", 2])
    with pytest.raises(ValueError, match="batch_size"):
        clip_score(model, arrays, TEXTS, batch_size=0)
    for weight in (0, -2.5, math.nan):
        with pytest.raises(ValueError, match="weight"):
            clip_score(model, arrays, TEXTS, weight=weight)
