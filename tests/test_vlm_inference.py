"""Inference-level tools for generative VLMs: Visual Contrastive Decoding against its formula and
against plain decoding where it must agree, the visual attention share, and the detector AUROC."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_llava

from mmelkit.methods.answers import answer_target
from mmelkit.methods.inference import (
    VisualContrastiveDecoding,
    distort_pixels,
    vcd_logits,
    visual_attention_share,
)
from mmelkit.methods.token.answer_attention import answer_attention_per_layer
from mmelkit.metrics import binary_auroc, detector_auroc
from mmelkit.models.vlm import VlmAdapter, load_vlm

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["is there a red circle ?", "what colour is the star ?", "how many objects are there ?",
             "describe the image .", "is there a blue cross in the image ?"]


@pytest.fixture(scope="module")
def vlm() -> VlmAdapter:
    return load_vlm(tiny_llava(seed=2), device="cpu")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [(rng.random((48, 48, 3)) * 255).astype(np.uint8) for _ in QUESTIONS]


def test_vcd_logits_follow_the_formula() -> None:
    clean = torch.tensor([[2.0, 1.0, -1.0, 0.0]])
    distorted = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    out = vcd_logits(clean, distorted, alpha=1.0, beta=0.1)
    probs = clean.softmax(-1)[0]
    keep = probs >= 0.1 * probs.max()  # p = 0.644, 0.237, 0.032, 0.087 against a cut-off of 0.064
    assert keep.tolist() == [True, True, False, True]
    assert out[0, 0] == 3.0 and out[0, 1] == 0.0 and out[0, 3] == 0.0  # 2 * 2 - 1, 2 * 1 - 2, 2 * 0 - 0
    assert torch.isinf(out[0, 2]) and out[0, 2] < 0
    # alpha = 0 is the clean logits where plausible; beta = 0 keeps every token
    torch.testing.assert_close(vcd_logits(clean, distorted, alpha=0.0, beta=0.0), clean)
    torch.testing.assert_close(vcd_logits(clean, distorted, alpha=0.5, beta=0.0), 1.5 * clean - 0.5 * distorted)
    with pytest.raises(ValueError, match="differ in shape"):
        vcd_logits(clean, distorted[:, :3])


def test_distortion_is_a_diffusion_step_with_one_noise_pattern() -> None:
    pixels = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(distort_pixels(pixels, noise=0.0), pixels)
    pure = distort_pixels(pixels, noise=1.0, seed=4)
    torch.testing.assert_close(pure[0], pure[2])  # the same eps for every row
    half = distort_pixels(pixels, noise=0.5, seed=4)
    torch.testing.assert_close(half, 0.5**0.5 * pixels + 0.5**0.5 * pure)
    assert not torch.equal(distort_pixels(pixels, 1.0, seed=5), pure)
    with pytest.raises(ValueError, match="noise"):
        distort_pixels(pixels, noise=1.5)


def test_vcd_reduces_to_plain_decoding_without_contrast(vlm: VlmAdapter, images: list[Any]) -> None:
    plain = vlm.generate(images, QUESTIONS, max_new_tokens=6)
    for hook in (VisualContrastiveDecoding(vlm, alpha=0.0), VisualContrastiveDecoding(vlm, alpha=1.0, noise=0.0)):
        assert vlm.generate(images, QUESTIONS, max_new_tokens=6, logits_hook=hook).texts == plain.texts


def test_vcd_first_step_is_the_formula_on_both_streams(vlm: VlmAdapter, images: list[Any]) -> None:
    hook = VisualContrastiveDecoding(vlm, alpha=1.0, beta=0.1, noise=0.5, seed=3)
    seen: list[torch.Tensor] = []

    def watched(logits: torch.Tensor, step: Any) -> torch.Tensor:
        out = hook(logits, step)
        if step.index == 0:
            seen.append(out)
        return out

    vlm.generate(images, QUESTIONS, max_new_tokens=3, logits_hook=watched)
    batch = vlm.encode(images, QUESTIONS)
    with torch.no_grad():
        clean = vlm.forward(batch).logits[:, -1]
        noised = batch.pixel_values * 0.5**0.5 + 0.5**0.5 * distort_pixels(torch.zeros_like(batch.pixel_values), 1.0, 3)
        from dataclasses import replace

        distorted = vlm.forward(replace(batch, pixel_values=noised)).logits[:, -1]
    torch.testing.assert_close(seen[0], vcd_logits(clean, distorted, 1.0, 0.1), atol=1e-5, rtol=1e-5)


def test_vcd_answers_do_not_depend_on_the_batch(vlm: VlmAdapter, images: list[Any]) -> None:
    hook = VisualContrastiveDecoding(vlm, alpha=2.0, noise=0.7)
    whole = vlm.generate(images, QUESTIONS, max_new_tokens=6, logits_hook=hook, batch_size=2).texts
    alone = [vlm.generate(images[i], QUESTIONS[i], max_new_tokens=6, logits_hook=hook).texts[0] for i in range(5)]
    assert whole == alone


@pytest.mark.parametrize(("kwargs", "message"), [({"alpha": -1.0}, "alpha"), ({"beta": 2.0}, "beta"),
                                                  ({"noise": -0.1}, "noise")])
def test_vcd_checks_its_arguments(vlm: VlmAdapter, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VisualContrastiveDecoding(vlm, **kwargs)


def test_visual_attention_share(vlm: VlmAdapter, images: list[Any]) -> None:
    answers = ["yes", "red", "two", "red circle", "no"]
    shares = visual_attention_share(vlm, images, QUESTIONS, answers)
    assert shares.shape == (5, vlm.num_decoder_layers)
    assert (shares > 0).all() and (shares < 1).all()
    target = answer_target(vlm, images, QUESTIONS, answers, token=0)
    torch.testing.assert_close(shares, answer_attention_per_layer(vlm, target).sum(-1))
    # the model's own answer by default
    own = visual_attention_share(vlm, images, QUESTIONS)
    said = vlm.generate(images, QUESTIONS).texts
    torch.testing.assert_close(own, visual_attention_share(vlm, images, QUESTIONS, said))


def _brute_auroc(scores: list[float], positive: list[bool]) -> float:
    pairs = [(p, n) for p, n in itertools.product(
        [s for s, y in zip(scores, positive, strict=True) if y], [s for s, y in zip(scores, positive, strict=True) if not y])]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_binary_auroc_equals_counting_pairs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, size=12).astype(float)  # many ties
        positive = rng.random(12) < 0.4
        if positive.all() or not positive.any():
            continue
        got = float(binary_auroc(torch.tensor(scores), torch.tensor(positive)))
        assert got == pytest.approx(_brute_auroc(scores.tolist(), positive.tolist()))
    assert float(binary_auroc(torch.tensor([0.1, 0.9]), torch.tensor([False, True]))) == 1.0
    assert float(binary_auroc(torch.ones(4), torch.tensor([True, False, True, False]))) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        binary_auroc(torch.ones(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        binary_auroc(torch.ones(3), torch.ones(3))


def test_detector_auroc_per_layer() -> None:
    hallucinated = torch.tensor([True, True, False, False])
    signal = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.7, 0.1], [0.9, 0.3]])  # layer 0 separates, layer 1 inverts
    torch.testing.assert_close(detector_auroc(signal, hallucinated), torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(detector_auroc(signal, hallucinated, lower_means_hallucinated=False),
                               torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="signal must be"):
        detector_auroc(signal[:, 0], hallucinated)
