"""Faithfulness metrics: an oracle with closed-form curves, slow references, substrates, misuse.

The oracle model sees only the mean pixel value s inside a known region R and embeds the image as
[s, sqrt(1 - s^2)]; the text "target" is [1, 0], so the cosine score is s itself and every curve
has a closed form. The references below build one perturbed image at a time, encode it alone and
score it from the formulas (not from the batched code), so the batching across samples and steps,
the tie-break order, the substrates and the score functions are what they check.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXTS, make_open_clip

import mmelkit
from mmelkit.methods.base import Explanation
from mmelkit.metrics.faithfulness import (
    ConfidenceChange,
    confidence_change,
    deletion_curves,
    insertion_curves,
    masked_by_maps,
    perturbation_curves,
)
from mmelkit.metrics.perturbation import (
    as_map_tensor,
    check_fractions,
    even_fractions,
    gaussian_blur,
    perturbed_features,
    pixel_ranks,
    substrate_pixels,
    trapezoid_auc,
)
from mmelkit.metrics.retrieval import RETRIEVAL_FRACTIONS, retrieval_protocol, retrieval_recall
from mmelkit.metrics.scores import TextScore, text_targets

pytestmark = pytest.mark.usefixtures("one_thread")

SUBSTRATES = ["black", "mean", "blur", "noise"]
CANDIDATES = [*TEXTS, "a green triangle"]


@pytest.fixture(scope="module")
def model() -> mmelkit.ClipAdapter:
    return mmelkit.load_model(make_open_clip(seed=5), device="cpu")


@pytest.fixture
def pixels(model: mmelkit.ClipAdapter, images: torch.Tensor) -> torch.Tensor:
    return model.preprocess(images)


@pytest.fixture
def tied_maps() -> torch.Tensor:
    """Patch-grid maps (3, 4, 4) full of ties: three levels, and one constant map (0.3 is not a
    float32-exact value, so bilinear upsampling in float32 would break its ties by rounding)."""
    generator = torch.Generator().manual_seed(11)
    maps = torch.randint(0, 3, (3, 4, 4), generator=generator).float() / 3
    maps[2] = 0.3
    return maps


# ---------------------------------------------------------------------------------------------
# An oracle that sees one region, with closed-form curves
# ---------------------------------------------------------------------------------------------

HEIGHT, WIDTH = 24, 40  # not square, so a swapped height and width cannot go unnoticed
PIXELS = HEIGHT * WIDTH  # 960
SEEN = (slice(0, 12), slice(4, 24))  # R: 240 pixels, a quarter of the image
ELSEWHERE = (slice(12, 24), slice(18, 38))  # Q: 240 pixels, disjoint from R
AREA = 240


class RegionOracle:
    """Duck-typed model: identity normalisation, image embedding [s, sqrt(1 - s^2)] with s the
    mean (over channels and pixels) of the model input inside ``SEEN``; "target" -> [1, 0],
    "other" -> [0, 1]. Records the size of every image batch it encodes."""

    def __init__(self) -> None:
        self.backend = SimpleNamespace(image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
        self.batches: list[int] = []

    def as_pixels(self, images: Any) -> torch.Tensor:
        assert isinstance(images, torch.Tensor) and images.ndim == 4
        return images.float()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(pixels))
        s = pixels[:, :, SEEN[0], SEEN[1]].mean(dim=(1, 2, 3)).clamp(0, 1)
        return torch.stack([s, (1 - s**2).clamp_min(0).sqrt()], dim=1)

    def encode_text(self, texts: Any) -> torch.Tensor:
        table = {"target": [1.0, 0.0], "other": [0.0, 1.0]}
        return torch.tensor([table[t] for t in texts])


def region_map(region: tuple[slice, slice]) -> torch.Tensor:
    out = torch.zeros(HEIGHT, WIDTH)
    out[region] = 1
    return out


def oracle_images(count: int) -> torch.Tensor:
    """Random backgrounds (the oracle ignores them), white (1.0) inside R."""
    out = torch.rand(count, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(4))
    out[:, :, SEEN[0], SEEN[1]] = 1.0
    return out


def auc_tolerance(steps: int) -> float:
    """How far the discrete AUC of the oracle can sit from the continuous closed form.

    The curve is g(f) = max(0, 1 - a f) (deletion; insertion is 1 - g) with a = HW / |R|, sampled
    where c = round(f HW) pixels are gone: each sample is off by at most 0.5 / |R|, and the
    trapezoid weights sum to 1, so the AUC moves by at most 0.5 / |R|. The trapezoid rule is exact
    on the linear pieces; on the step h = 1 / steps that holds the kink it is off by
    a t (h - t) / 2 <= a h^2 / 8 (t: the kink's offset in the step). Plus float32 rounding."""
    h = 1 / steps
    return 0.5 / AREA + (PIXELS / AREA) * h * h / 8 + 1e-6


def test_oracle_curves_for_the_right_map_have_closed_forms() -> None:
    oracle, steps = RegionOracle(), 100
    images, maps = oracle_images(2), region_map(SEEN).expand(2, -1, -1)
    deletion = perturbation_curves(oracle, images, "target", maps, mode="deletion", steps=steps, substrate="black")
    insertion = perturbation_curves(oracle, images, "target", maps, mode="insertion", steps=steps, substrate="black")
    # Every pixel of R goes first: after c pixels, s = (|R| - min(c, |R|)) / |R| exactly.
    removed = torch.round(torch.linspace(0, 1, steps + 1, dtype=torch.float64) * PIXELS).clamp_max(AREA)
    torch.testing.assert_close(deletion.scores, (1 - removed / AREA).float().expand(2, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(insertion.scores, (removed / AREA).float().expand(2, -1), atol=1e-6, rtol=0)
    # Continuous closed forms: deletion |R| / (2 HW), insertion onto black 1 - |R| / (2 HW).
    tolerance = auc_tolerance(steps)
    assert (deletion.auc - AREA / (2 * PIXELS)).abs().max() <= tolerance, deletion.auc
    assert (insertion.auc - (1 - AREA / (2 * PIXELS))).abs().max() <= tolerance, insertion.auc
    # The batches mix samples and steps: 2 x 101 copies, 128 per forward pass (never one by one).
    assert oracle.batches == [128, 74, 128, 74]


def test_oracle_a_map_elsewhere_is_much_worse() -> None:
    oracle, steps = RegionOracle(), 100
    images = oracle_images(2)
    right = region_map(SEEN).expand(2, -1, -1)
    wrong = region_map(ELSEWHERE).expand(2, -1, -1)
    curves = {
        (mode, name): perturbation_curves(oracle, images, "target", maps, mode=mode, steps=steps, substrate="black")
        for mode in ("deletion", "insertion") for name, maps in (("right", right), ("wrong", wrong))
    }
    # Q (a quarter of the image) goes first and leaves s = 1; then the other 720 pixels go in the
    # fixed random order, R among them: E[AUC] = q + (1 - q) / 2 = 0.625 with q = 1/4. The AUC is
    # about q + (1 - q) * the mean of 240 positions drawn without replacement from 720 slots:
    # sd ~ 0.75 * sqrt(1/12 / 240 * 2/3) ~ 0.011, so 0.07 is > 5 sd plus the step error.
    deletion, insertion = curves["deletion", "wrong"].auc, curves["insertion", "wrong"].auc
    assert (deletion - 0.625).abs().max() < 0.07, deletion
    assert (insertion - 0.375).abs().max() < 0.07, insertion
    assert (deletion > curves["deletion", "right"].auc + 0.4).all()
    assert (insertion < curves["insertion", "right"].auc - 0.4).all()
    # The first quarter of the pixels removes none of R: the curve stays at exactly 1.
    assert (curves["deletion", "wrong"].scores[:, :26] == 1).all()


def test_oracle_a_constant_map_deletes_in_the_fixed_random_order() -> None:
    oracle, steps, seed = RegionOracle(), 100, 3
    images = oracle_images(1)
    # A constant map on a coarse grid: upsampled, it must stay one big tie (0.1 is not exact in
    # float32), so pixels go in the order of the seeded permutation.
    maps = torch.full((1, 6, 10), 0.1)
    curves = deletion_curves(oracle, images, "target", maps, steps=steps, seed=seed)
    assert curves.substrate == "black"
    order = torch.randperm(PIXELS, generator=torch.Generator().manual_seed(seed))
    inside = region_map(SEEN).flatten().bool()
    expected = []
    for fraction in torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist():
        count = round(fraction * PIXELS)
        expected.append(1 - inside[order[:count]].sum().item() / AREA)
    torch.testing.assert_close(curves.scores[0], torch.tensor(expected), atol=1e-6, rtol=0)
    # Random order is the chance baseline: E[curve] = 1 - f, AUC 1/2. The AUC is about the mean of
    # 240 of 960 uniform positions: sd ~ sqrt(1/12 / 240 * 3/4) ~ 0.016; raster order would give
    # (mean row 5.5 * 40 + mean column 13.5) / 960 ~ 0.24. 0.08 is 5 sd.
    assert abs(curves.auc.item() - 0.5) < 0.08, curves.auc


def test_oracle_confidence_drop_and_increase() -> None:
    oracle = RegionOracle()
    images = oracle_images(3)
    maps = torch.stack([region_map(SEEN), region_map(ELSEWHERE), region_map(ELSEWHERE)])
    texts = ["target", "target", "other"]
    change = confidence_change(oracle, images, texts, maps, candidates=["target", "other"], temperature=1.0)
    e = math.e
    # Full image: s = 1, cos = (1, 0). R's map keeps R: the same image, the same confidence.
    # A map elsewhere blackens R: s = 0, cos = (0, 1); "target" falls from e/(1+e) to 1/(1+e), a
    # drop of 100 (1 - 1/e); "other" rises from 1/(1+e) to e/(1+e): an increase, no drop.
    torch.testing.assert_close(change.original, torch.tensor([e / (1 + e), e / (1 + e), 1 / (1 + e)]))
    torch.testing.assert_close(change.explained, torch.tensor([e / (1 + e), 1 / (1 + e), e / (1 + e)]))
    assert change.drop[0] == 0 and change.increase[0] == 0
    torch.testing.assert_close(change.drop, torch.tensor([0.0, 100 * (1 - 1 / e), 0.0]))
    torch.testing.assert_close(change.increase, torch.tensor([0.0, 0.0, 100.0]))
    assert change.average_drop == pytest.approx(100 * (1 - 1 / e) / 3, rel=1e-5)
    assert change.average_increase == pytest.approx(100 / 3, rel=1e-6)
    # CLIP's temperature (100): the right map keeps the confidence, the wrong one loses it all.
    sharp = confidence_change(oracle, images[:2], "target", maps[:2], candidates=["target", "other"])
    assert sharp.drop[0] == 0
    assert sharp.drop[1] == pytest.approx(100, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Slow references on the tiny open_clip model
# ---------------------------------------------------------------------------------------------


def reference_order(map_: torch.Tensor, size: tuple[int, int], seed: int) -> list[int]:
    """Pixel positions from most to least important, from the docstring: the map upsampled
    (bilinear; computed in float64 and rounded to float32, so ties on the map's grid stay ties),
    sorted by value, ties in the order of the seeded permutation. Python's sort on (value, position
    in the permutation), not the module's shuffled stable sort."""
    up = F.interpolate(map_[None, None].double(), size=size, mode="bilinear", align_corners=False)
    values = up.float().flatten().tolist()
    permutation = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed)).tolist()
    place = {pixel: k for k, pixel in enumerate(permutation)}
    return sorted(range(len(values)), key=lambda p: (-values[p], place[p]))


def reference_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """One 2-D convolution with the normalised 2-D Gaussian, cut at 3 sigma, edges reflected."""
    radius = min(max(1, math.ceil(3 * sigma)), images.shape[-1] - 1, images.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    ys, xs = torch.meshgrid(offsets, offsets, indexing="ij")
    kernel = torch.exp(-(ys**2 + xs**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).float()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(padded, kernel.expand(channels, 1, -1, -1), groups=channels)


def reference_substrate(model: mmelkit.ClipAdapter, image: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """What removed pixels of one image (3, H, W) become, in the model's input space."""
    mean = torch.tensor(model.backend.image_mean)[:, None, None]
    std = torch.tensor(model.backend.image_std)[:, None, None]
    if kind == "black":
        return model.preprocess(torch.zeros(1, *image.shape))[0]
    if kind == "mean":
        return image.mean(dim=(1, 2), keepdim=True).expand_as(image)
    if kind == "blur":
        return reference_blur(image[None], 5 * image.shape[-2] / 224)[0]
    noise = torch.rand(image.shape, generator=torch.Generator().manual_seed(seed))
    return ((noise - mean) / std).expand_as(image)


def reference_features(
    model: mmelkit.ClipAdapter, pixels: torch.Tensor, maps: torch.Tensor, fractions: list[float], mode: str,
    substrate: str, seed: int,
) -> torch.Tensor:
    """(N, S, E): one perturbed image built and encoded at a time."""
    size = (pixels.shape[-2], pixels.shape[-1])
    out = []
    for image, map_ in zip(pixels, maps, strict=True):
        order = torch.tensor(reference_order(map_, size, seed))
        fill = reference_substrate(model, image, substrate, seed).flatten(1)
        rows = []
        for fraction in fractions:
            top = order[: round(fraction * size[0] * size[1])]
            if mode == "deletion":
                copy = image.flatten(1).clone()
                copy[:, top] = fill[:, top]
            else:
                copy = fill.clone()
                copy[:, top] = image.flatten(1)[:, top]
            with torch.no_grad():
                rows.append(model.encode_image(copy.view(1, 3, *size))[0])
        out.append(torch.stack(rows))
    return torch.stack(out)


def reference_scores(
    model: mmelkit.ClipAdapter, features: torch.Tensor, texts: list[str], candidates: list[str], kind: str,
    k: int = 1, temperature: float = 100.0,
) -> torch.Tensor:
    """(N, S) scores from the formulas, one text and one candidate at a time."""
    with torch.no_grad():
        embedded = {text: model.encode_text([text])[0] for text in {*texts, *candidates}}
    out = torch.zeros(features.shape[:2])
    for n, text in enumerate(texts):
        for s in range(features.shape[1]):
            feature = features[n, s]
            if kind == "cosine":
                out[n, s] = feature @ embedded[text]
                continue
            sims = [float(feature @ embedded[c]) for c in candidates]
            own = candidates.index(text)
            if kind == "softmax":
                logits = [temperature * x for x in sims]
                out[n, s] = math.exp(logits[own]) / sum(math.exp(x) for x in logits)
            else:  # recall@k: the others at least as similar as the own text count against it
                rivals = sum(1 for j, x in enumerate(sims) if j != own and x >= sims[own])
                out[n, s] = float(rivals < k)
    return out


# substrate -> (max_fraction, seed, batch_size): 3 samples x 5 steps split across samples
SETTINGS = {"black": (1.0, 0, 3), "mean": (0.5, 2, 4), "blur": (1.0, 1, 7), "noise": (0.75, 5, 3)}


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("substrate", SUBSTRATES)
def test_curves_match_a_slow_reference(
    model: mmelkit.ClipAdapter, pixels: torch.Tensor, tied_maps: torch.Tensor, mode: str, substrate: str,
) -> None:
    max_fraction, seed, batch_size = SETTINGS[substrate]
    steps = 4
    fractions = [max_fraction * k / steps for k in range(steps + 1)]
    texts = list(TEXTS)
    features = reference_features(model, pixels, tied_maps, fractions, mode, substrate, seed)
    options: dict[str, Any] = {"mode": mode, "steps": steps, "max_fraction": max_fraction,
                               "substrate": substrate, "batch_size": batch_size, "seed": seed}
    fast = perturbed_features(model, pixels, tied_maps, even_fractions(steps, max_fraction), mode, substrate,
                              batch_size, seed)
    assert fast.shape == (3, steps + 1, 16)
    torch.testing.assert_close(fast, features, atol=1e-5, rtol=0)
    cases: list[tuple[Any, list[str] | None, str, int]] = [
        ("cosine", None, "cosine", 1),
        (TextScore("softmax"), CANDIDATES, "softmax", 1),
        (TextScore("softmax", temperature=10.0), None, "softmax", 1),
        ("recall", CANDIDATES, "recall", 1),
        (TextScore("recall", k=3), CANDIDATES, "recall", 3),
    ]
    recalls = set()
    for score, candidates, kind, k in cases:
        temperature = score.temperature if isinstance(score, TextScore) else 100.0
        pool = candidates if candidates is not None else list(dict.fromkeys(texts))
        expected = reference_scores(model, features, texts, pool, kind, k, temperature)
        curves = perturbation_curves(model, pixels, texts, tied_maps, score=score, candidates=candidates, **options)
        torch.testing.assert_close(curves.scores, expected, atol=1e-5, rtol=0, msg=f"{score} {candidates}")
        if kind == "recall":
            recalls.update(expected.flatten().tolist())
        torch.testing.assert_close(curves.fractions, torch.tensor(fractions, dtype=torch.float64))
        assert curves.mode == mode and curves.substrate == substrate
    assert recalls == {0.0, 1.0}  # both hits and misses were compared


@pytest.mark.parametrize("substrate", ["black", "mean"])
def test_confidence_change_matches_a_slow_reference(
    model: mmelkit.ClipAdapter, pixels: torch.Tensor, substrate: str,
) -> None:
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(8))
    texts = list(TEXTS)
    with torch.no_grad():
        embedded = torch.stack([model.encode_text([c])[0] for c in CANDIDATES])
    mean = torch.tensor(model.backend.image_mean)[:, None, None]
    std = torch.tensor(model.backend.image_std)[:, None, None]
    original, explained = [], []
    for image, map_, text in zip(pixels, maps, texts, strict=True):
        weight = (map_ - map_.min()) / (map_.max() - map_.min())
        weight = F.interpolate(weight[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0]
        if substrate == "black":  # the raw image times the map, normalised again
            masked = (((image * std + mean) * weight) - mean) / std
        else:
            masked = weight * image + (1 - weight) * image.mean(dim=(1, 2), keepdim=True)
        for target, copy in ((original, image), (explained, masked)):
            with torch.no_grad():
                logits = 100 * model.encode_image(copy[None])[0] @ embedded.T
            target.append(torch.softmax(logits.double(), dim=0)[CANDIDATES.index(text)].item())
    y, o = torch.tensor(original), torch.tensor(explained)
    drop = (100 / 3) * sum(max(0.0, a - b) / a for a, b in zip(original, explained, strict=True))
    increase = (100 / 3) * sum(float(a < b) for a, b in zip(original, explained, strict=True))
    change = confidence_change(model, pixels, texts, maps, candidates=CANDIDATES, substrate=substrate, batch_size=2)
    torch.testing.assert_close(change.original.double(), y.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(change.explained.double(), o.double(), atol=1e-5, rtol=0)
    assert change.average_drop == pytest.approx(drop, abs=1e-3)
    assert change.average_increase == pytest.approx(increase)
    # masked_by_maps is the image times the map (black substrate: exactly raw image * map)
    if substrate == "black":
        weights = F.interpolate(((maps - maps.amin((1, 2), keepdim=True))
                                 / (maps.amax((1, 2), keepdim=True) - maps.amin((1, 2), keepdim=True)))[:, None],
                                size=(32, 32), mode="bilinear", align_corners=False)
        raw = (masked_by_maps(model, pixels, maps) * std + mean)
        torch.testing.assert_close(raw, (pixels * std + mean) * weights, atol=1e-5, rtol=0)


def reference_recall(
    features: torch.Tensor, texts: list[str], text_features: torch.Tensor, captions: list[str], k: int,
) -> tuple[list[float], list[float]]:
    """IR and TR Recall@k per step with explicit loops over queries; ties count against the query."""
    image_recall, text_recall = [], []
    for s in range(features.shape[1]):
        sims = [[float(features[n, s] @ text_features[c]) for c in range(len(captions))] for n in range(len(texts))]
        ir_hits = 0
        for c, caption in enumerate(captions):  # a caption queries the images
            best = max(sims[n][c] for n in range(len(texts)) if texts[n] == caption)
            rivals = sum(1 for n in range(len(texts)) if texts[n] != caption and sims[n][c] >= best)
            ir_hits += rivals < k
        tr_hits = 0
        for n, text in enumerate(texts):  # an image queries the captions
            own = captions.index(text)
            rivals = sum(1 for c in range(len(captions)) if c != own and sims[n][c] >= sims[n][own])
            tr_hits += rivals < k
        image_recall.append(ir_hits / len(captions))
        text_recall.append(tr_hits / len(texts))
    return image_recall, text_recall


@pytest.mark.parametrize("k", [1, 2, 3])
def test_retrieval_recall_matches_explicit_loops(k: int) -> None:
    generator = torch.Generator().manual_seed(6)
    texts = ["a", "b", "a", "c", "b", "d", "e"]  # duplicate captions share credit
    captions = ["a", "b", "c", "d", "e"]
    features = F.normalize(torch.randn(7, 6, 5, generator=generator), dim=-1)
    text_features = F.normalize(torch.randn(5, 5, generator=generator), dim=-1)
    image_recall, text_recall = retrieval_recall(features, texts, text_features, captions, k)
    expected_ir, expected_tr = reference_recall(features, texts, text_features, captions, k)
    torch.testing.assert_close(image_recall, torch.tensor(expected_ir))
    torch.testing.assert_close(text_recall, torch.tensor(expected_tr))
    assert len(set(expected_ir)) > 1 and len(set(expected_tr)) > 1  # recall varies across steps


def test_retrieval_recall_ties_count_against_the_query() -> None:
    # Identical images (a gallery of fully inserted-onto-black copies): no caption finds its image.
    features = F.normalize(torch.ones(4, 1, 3), dim=-1)
    text_features = F.normalize(torch.eye(4, 3) + 0.1, dim=-1)
    texts = ["a", "b", "c", "d"]
    image_recall, text_recall = retrieval_recall(features, texts, text_features, texts, k=1)
    assert image_recall.tolist() == [0.0]
    # Each image ranks the captions the same way: exactly the owner of the top caption hits.
    assert text_recall.tolist() == [0.25]
    assert retrieval_recall(features, texts, text_features, texts, k=4)[0].tolist() == [1.0]
    # Two captions with the same embedding: each image ties with the other caption and misses at k=1.
    features = F.normalize(torch.tensor([[[1.0, 0.0]], [[1.0, 0.1]]]), dim=-1)
    same = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=-1)
    assert retrieval_recall(features, ["x", "y"], same, ["x", "y"], k=1)[1].tolist() == [0.0]
    assert retrieval_recall(features, ["x", "y"], same, ["x", "y"], k=2)[1].tolist() == [1.0]
    # A caption no image carries is a query that cannot hit, whatever k.
    spare = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    assert retrieval_recall(features, ["x", "x"], spare, ["x", "y", "z"], k=5)[0].tolist() == [pytest.approx(1 / 3)]


def test_text_score_closed_forms() -> None:
    candidates = torch.eye(3)
    features = torch.tensor([[[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]], [[0.0, 0.6, 0.8], [0.0, 0.8, 0.6]]])
    targets = torch.tensor([0, 2])
    torch.testing.assert_close(TextScore("cosine")(features, candidates, targets), torch.tensor([[1.0, 0.6], [0.8, 0.6]]))
    e = math.exp
    expected = torch.tensor([[e(2) / (e(2) + 2), e(1.2) / (e(1.2) + e(1.6) + 1)],
                             [e(1.6) / (e(1.6) + e(1.2) + 1), e(1.2) / (e(1.2) + e(1.6) + 1)]])
    torch.testing.assert_close(TextScore("softmax", temperature=2.0)(features, candidates, targets), expected)
    torch.testing.assert_close(TextScore("recall")(features, candidates, targets), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(TextScore("recall", k=2)(features, candidates, targets), torch.ones(2, 2))
    # A tie with another candidate counts against the target.
    tie = F.normalize(torch.tensor([[1.0, 1.0, 0.0]]), dim=-1)
    assert TextScore("recall")(tie, candidates, torch.tensor([0])).tolist() == [0.0]
    assert TextScore("recall", k=2)(tie, candidates, torch.tensor([1])).tolist() == [1.0]
    torch.testing.assert_close(TextScore("cosine")(features[:, 0], candidates, targets), torch.tensor([1.0, 0.8]))
    assert TextScore("recall", k=5).label == "Recall@5"


@pytest.mark.parametrize(("mode", "k"), [("deletion", 2), ("insertion", 2)])
def test_retrieval_protocol_matches_a_slow_reference(
    model: mmelkit.ClipAdapter, pixels: torch.Tensor, tied_maps: torch.Tensor, mode: str, k: int,
) -> None:
    gallery = torch.cat([pixels, pixels[:1].flip(-1)])
    maps = torch.cat([tied_maps, torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(2))])
    texts = [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[0]]
    captions = list(dict.fromkeys(texts))
    substrate = "black" if mode == "deletion" else "blur"  # the defaults
    fractions = list(RETRIEVAL_FRACTIONS)
    assert fractions == pytest.approx([0.05 * j for j in range(11)])
    features = reference_features(model, gallery, maps, fractions, mode, substrate, seed=0)
    with torch.no_grad():
        text_features = torch.stack([model.encode_text([c])[0] for c in captions])
    expected_ir, expected_tr = reference_recall(features, texts, text_features, captions, k)
    curves = retrieval_protocol(model, gallery, texts, maps, mode=mode, k=k, batch_size=5)
    torch.testing.assert_close(curves.image_retrieval, torch.tensor(expected_ir))
    torch.testing.assert_close(curves.text_retrieval, torch.tensor(expected_tr))
    # AUC: the trapezoid rule over the fraction rescaled from [0, 0.5] to [0, 1].
    def area(values: list[float]) -> float:
        return sum((values[j] + values[j + 1]) / 2 * 0.1 for j in range(10))

    assert curves.image_retrieval_auc == pytest.approx(area(expected_ir), abs=1e-6)
    assert curves.text_retrieval_auc == pytest.approx(area(expected_tr), abs=1e-6)
    assert curves.k == k and curves.mode == mode
    assert len(set(expected_ir)) > 1 and len(set(expected_tr)) > 1  # the curves move


# ---------------------------------------------------------------------------------------------
# Substrates, blur, pixel order
# ---------------------------------------------------------------------------------------------


def test_substrates(model: mmelkit.ClipAdapter, pixels: torch.Tensor) -> None:
    black = substrate_pixels(model, pixels, "black")
    torch.testing.assert_close(black, model.preprocess(torch.zeros(3, 3, 32, 32)).expand_as(pixels))
    mean = substrate_pixels(model, pixels, "mean")
    torch.testing.assert_close(mean, pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels))
    assert not torch.allclose(mean[0], mean[1])  # each image its own colour
    constant = torch.full((2, 3, 32, 32), 0.37)
    torch.testing.assert_close(substrate_pixels(model, constant, "blur"), constant, atol=1e-6, rtol=0)
    noise = substrate_pixels(model, pixels, "noise", seed=4)
    torch.testing.assert_close(noise, substrate_pixels(model, pixels, "noise", seed=4), atol=0, rtol=0)
    assert not torch.allclose(noise, substrate_pixels(model, pixels, "noise", seed=5))
    torch.testing.assert_close(noise[0], noise[2], atol=0, rtol=0)  # one fixed image for all samples
    raw = noise * torch.tensor(model.backend.image_std)[:, None, None] + torch.tensor(model.backend.image_mean)[:, None, None]
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6 and raw.std() > 0.2  # uniform in [0, 1]
    for kind in SUBSTRATES:
        assert substrate_pixels(model, pixels, kind).shape == pixels.shape
    blurred = substrate_pixels(model, pixels, "blur", blur_sigma=1.5)
    torch.testing.assert_close(blurred, reference_blur(pixels, 1.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("sigma", "size"), [(0.7, (32, 32)), (1.5, (24, 40)), (3.0, (32, 20)), (20.0, (16, 16))])
def test_gaussian_blur_matches_a_2d_convolution(sigma: float, size: tuple[int, int]) -> None:
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(9))
    blurred = gaussian_blur(images, sigma)
    torch.testing.assert_close(blurred, reference_blur(images, sigma), atol=1e-5, rtol=0)
    assert blurred.std() < images.std()  # it does smooth
    torch.testing.assert_close(gaussian_blur(images, 0.0), images)


def test_pixel_ranks() -> None:
    generator = torch.Generator().manual_seed(12)
    maps = torch.rand(4, 6, 10, generator=generator)
    maps[1] = torch.randint(0, 2, (6, 10), generator=generator).float() * 0.7  # two levels, many ties
    maps[2] = 0.1  # one tie everywhere (not a float32-exact value)
    size, seed = (24, 40), 5
    ranks = pixel_ranks(maps, size, seed=seed)
    assert ranks.shape == (4, PIXELS) and ranks.dtype == torch.long
    assert (ranks.sort(dim=1).values == torch.arange(PIXELS)).all()  # a permutation per row
    up = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].flatten(1)
    order = ranks.argsort(dim=1)
    values = up.gather(1, order)
    # Higher value -> lower rank (up to float noise of the upsampling).
    assert (values[:, 1:] <= values[:, :-1] + 1e-6).all()
    for row in range(4):
        assert order[row].tolist() == reference_order(maps[row], size, seed)
    permutation = torch.randperm(PIXELS, generator=torch.Generator().manual_seed(seed))
    assert order[2].tolist() == permutation.tolist()  # a constant map: the fixed permutation
    # Two levels: the plateau at the top value (cells whose neighbours are all 0.7) goes first,
    # its pixels in the order of the permutation.
    plateau = F.interpolate(maps[1:2, None].double(), size=size, mode="bilinear",
                            align_corners=False).float().flatten() == maps[1].max()
    assert 50 < plateau.sum() < 400
    assert order[1, : int(plateau.sum())].tolist() == [p for p in permutation.tolist() if plateau[p]]
    assert torch.equal(pixel_ranks(maps, size, seed=seed), ranks)
    assert not torch.equal(pixel_ranks(maps[2:3], size, seed=seed + 1), ranks[2:3])
    # Same-size maps are not resampled: the ranks follow the values exactly.
    full = torch.rand(2, 24, 40, generator=generator)
    expected = full.flatten(1).argsort(dim=1, descending=True)
    assert torch.equal(pixel_ranks(full, size).argsort(dim=1), expected)


# ---------------------------------------------------------------------------------------------
# Batches, AUC, side effects
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "substrate"), [("deletion", "noise"), ("insertion", "blur"), ("deletion", "mean")])
def test_batch_equals_per_example(
    model: mmelkit.ClipAdapter, pixels: torch.Tensor, tied_maps: torch.Tensor, mode: str, substrate: str,
) -> None:
    options: dict[str, Any] = {"mode": mode, "steps": 4, "substrate": substrate, "seed": 1,
                               "score": "softmax", "candidates": CANDIDATES}
    together = perturbation_curves(model, pixels, TEXTS, tied_maps, batch_size=64, **options)
    one_by_one = perturbation_curves(model, pixels, TEXTS, tied_maps, batch_size=1, **options)
    torch.testing.assert_close(together.scores, one_by_one.scores, atol=1e-5, rtol=0)
    for n in range(3):
        alone = perturbation_curves(model, pixels[n : n + 1], TEXTS[n], tied_maps[n : n + 1], **options)
        torch.testing.assert_close(together.scores[n : n + 1], alone.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.auc, trapezoid_auc(together.fractions, together.scores))
    torch.testing.assert_close(together.mean_curve(), together.scores.mean(dim=0))
    # The scores do change along the curve (else the comparisons above would be empty).
    assert (together.scores[:, 0] - together.scores[:, -1]).abs().max() > 1e-4


def test_wrappers_explanations_and_defaults(model: mmelkit.ClipAdapter, pixels: torch.Tensor) -> None:
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(3))
    explanation = Explanation(maps, (32, 32), "test")
    deletion = deletion_curves(model, pixels, TEXTS, explanation, steps=4, progress=True)
    insertion = insertion_curves(model, pixels, TEXTS, maps, steps=4)
    assert (deletion.substrate, insertion.substrate) == ("black", "blur")
    explicit = perturbation_curves(model, pixels, TEXTS, maps, mode="deletion", steps=4, substrate="black")
    torch.testing.assert_close(deletion.scores, explicit.scores, atol=0, rtol=0)
    explicit = perturbation_curves(model, pixels, TEXTS, maps, mode="insertion", steps=4, substrate="blur")
    torch.testing.assert_close(insertion.scores, explicit.scores, atol=0, rtol=0)
    # At fraction 0 deletion sees the full image, at 1 insertion does: the cosine with the text.
    with torch.no_grad():
        full = (model.encode_image(pixels) * model.encode_text(TEXTS)).sum(-1)
    torch.testing.assert_close(deletion.scores[:, 0], full, atol=1e-5, rtol=0)
    torch.testing.assert_close(insertion.scores[:, -1], full, atol=1e-5, rtol=0)


def test_trapezoid_auc_closed_forms() -> None:
    fractions = even_fractions(10)
    assert trapezoid_auc(fractions, torch.full((10 + 1,), 0.3)).item() == pytest.approx(0.3)
    assert trapezoid_auc(fractions, 1 - fractions.float()).item() == pytest.approx(0.5)
    half = even_fractions(10, 0.5)
    assert half[-1].item() == 0.5
    assert trapezoid_auc(half, torch.ones(11)).item() == pytest.approx(1.0)  # rescaled to [0, 1]
    assert trapezoid_auc(half, 1 - 2 * half.float()).item() == pytest.approx(0.5)
    assert trapezoid_auc(half, half.float()).item() == pytest.approx(0.25)
    uneven = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    scores = uneven.float() ** 2
    by_hand = 0.1 * (0 + 0.01) / 2 + 0.4 * (0.01 + 0.25) / 2 + 0.5 * (0.25 + 1) / 2
    assert trapezoid_auc(uneven, scores).item() == pytest.approx(by_hand)
    batched = torch.stack([torch.full((11,), 0.2), 1 - fractions.float()]).expand(3, 2, 11)
    torch.testing.assert_close(trapezoid_auc(fractions, batched), torch.tensor([[0.2, 0.5]] * 3))


def test_model_is_unchanged_and_metrics_run_under_no_grad(images: torch.Tensor) -> None:
    model = mmelkit.load_model(make_open_clip(seed=5), device="cpu")
    pixels = model.preprocess(images)
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(5))
    before = {name: value.clone() for name, value in model.model.state_dict().items()}
    grads = {name: p.requires_grad for name, p in model.model.named_parameters()}
    training = model.model.training

    def run() -> tuple[torch.Tensor, ...]:
        curves = deletion_curves(model, pixels, TEXTS, maps, steps=3, batch_size=5)
        change = confidence_change(model, pixels, TEXTS, maps)
        retrieval = retrieval_protocol(model, pixels, TEXTS, maps, fractions=[0.0, 0.25, 0.5], mode="insertion")
        return curves.scores, change.original, change.explained, retrieval.image_retrieval, retrieval.text_retrieval

    plain = run()
    with torch.no_grad():
        quiet = run()
    for a, b in zip(plain, quiet, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert not a.requires_grad
    after = model.model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    assert grads == {name: p.requires_grad for name, p in model.model.named_parameters()}
    assert model.model.training == training
    assert all(p.grad is None for p in model.model.parameters())


# ---------------------------------------------------------------------------------------------
# Misuse
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_refused(model: mmelkit.ClipAdapter, pixels: torch.Tensor) -> None:
    maps = torch.rand(3, 4, 4)
    curves = {"steps": 2}

    def refused(error: type[Exception], message: str, call: Any, *args: Any, **kwargs: Any) -> None:
        with pytest.raises(error, match=message):
            call(*args, **kwargs)

    refused(ValueError, "got 2 maps for 3 images", perturbation_curves, model, pixels, TEXTS, maps[:2], **curves)
    refused(ValueError, r"shape \(N, h, w\)", perturbation_curves, model, pixels, TEXTS, maps[:, None], **curves)
    refused(TypeError, "Explanation or a tensor", perturbation_curves, model, pixels, TEXTS, maps.tolist(), **curves)
    nan = maps.clone()
    nan[1, 2, 2] = float("nan")
    refused(ValueError, r"maps \[1\] contain NaN", perturbation_curves, model, pixels, TEXTS, nan, **curves)
    refused(ValueError, "NaN", confidence_change, model, pixels, TEXTS, nan)
    refused(ValueError, "empty spatial size", as_map_tensor, torch.zeros(3, 0, 4), 3)
    refused(ValueError, "unknown substrate 'grey'", perturbation_curves, model, pixels, TEXTS, maps,
            substrate="grey", **curves)
    refused(ValueError, "unknown substrate", confidence_change, model, pixels, TEXTS, maps, substrate="grey")
    refused(ValueError, "mode must be", perturbation_curves, model, pixels, TEXTS, maps, mode="both", **curves)
    refused(ValueError, "mode must be", retrieval_protocol, model, pixels, TEXTS, maps, mode="both")
    refused(ValueError, "unknown score 'logit'", perturbation_curves, model, pixels, TEXTS, maps, score="logit")
    refused(ValueError, "k must be", TextScore, "recall", k=0)
    refused(ValueError, "temperature must be positive", TextScore, "softmax", temperature=0.0)
    refused(ValueError, "steps must be", perturbation_curves, model, pixels, TEXTS, maps, steps=0)
    refused(ValueError, "steps must be", even_fractions, 2.5)
    refused(ValueError, "max_fraction", perturbation_curves, model, pixels, TEXTS, maps, max_fraction=0.0)
    refused(ValueError, "max_fraction", perturbation_curves, model, pixels, TEXTS, maps, max_fraction=1.5)
    refused(ValueError, "strictly increasing", retrieval_protocol, model, pixels, TEXTS, maps, fractions=[0, 0.2, 0.1])
    refused(ValueError, "strictly increasing", check_fractions, [0.0, 0.0])
    refused(ValueError, "at least two", check_fractions, [0.5])
    refused(ValueError, r"lie in \[0, 1\]", check_fractions, [0.0, 1.2])
    refused(ValueError, "batch_size", perturbation_curves, model, pixels, TEXTS, maps, batch_size=0, **curves)
    refused(ValueError, "batch_size", confidence_change, model, pixels, TEXTS, maps, batch_size=0)
    refused(ValueError, "batch_size", retrieval_protocol, model, pixels, TEXTS, maps, batch_size=-1)
    refused(ValueError, "got 2 texts for 3 images", perturbation_curves, model, pixels, TEXTS[:2], maps, **curves)
    refused(ValueError, "got 2 texts for 3 images", confidence_change, model, pixels, TEXTS[:2], maps)
    refused(ValueError, "got 2 captions for 3 images", retrieval_protocol, model, pixels, TEXTS[:2], maps)
    refused(TypeError, "one caption per image", retrieval_protocol, model, pixels, TEXTS[0], maps)
    refused(ValueError, "not among the candidate", perturbation_curves, model, pixels, TEXTS, maps,
            score="softmax", candidates=TEXTS[:2], **curves)
    refused(ValueError, "not among the candidate", confidence_change, model, pixels, TEXTS, maps,
            candidates=TEXTS[1:])
    refused(ValueError, "at least two candidate", confidence_change, model, pixels, TEXTS[0], maps)
    refused(ValueError, "at least two distinct captions", retrieval_protocol, model, pixels, [TEXTS[0]] * 3, maps)
    empty = pixels[:0]  # an empty batch is refused where the images enter (ClipAdapter.as_pixels)
    refused(ValueError, "images are an empty batch", perturbation_curves, model, empty, [], maps[:0], **curves)
    refused(ValueError, "images are an empty batch", confidence_change, model, empty, "a text", maps[:0])
    refused(ValueError, "images are an empty batch", retrieval_protocol, model, empty, [], maps[:0])
    refused(ValueError, "images are an empty batch", perturbed_features, model, empty, maps[:0], [0.0, 1.0])
    refused(ValueError, "no texts given", text_targets, model, [])
    features = F.normalize(torch.randn(2, 3, 4), dim=-1)
    text_features = F.normalize(torch.randn(2, 4), dim=-1)
    refused(ValueError, "must be \\(N, S, E\\)", retrieval_recall, features[0], ["a", "b"], text_features, ["a", "b"])
    refused(ValueError, "k must be", retrieval_recall, features, ["a", "b"], text_features, ["a", "b"], k=0)
    refused(ValueError, "not among the captions", retrieval_recall, features, ["a", "z"], text_features, ["a", "b"])
    refused(ValueError, "2 caption embeddings for 3 captions", retrieval_recall, features, ["a", "b"],
            text_features, ["a", "b", "c"])
    refused(ValueError, "N = 3 targets", TextScore(), features, text_features, torch.tensor([0, 1, 1]))


def test_confidence_change_properties_match_their_formulas() -> None:
    change = ConfidenceChange(torch.tensor([0.5, 0.8, 0.2]), torch.tensor([0.25, 0.9, 0.2]))
    torch.testing.assert_close(change.drop, torch.tensor([50.0, 0.0, 0.0]))
    torch.testing.assert_close(change.increase, torch.tensor([0.0, 100.0, 0.0]))
    assert change.average_drop == pytest.approx(50 / 3)
    assert change.average_increase == pytest.approx(100 / 3)
