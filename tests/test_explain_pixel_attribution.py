"""Integrated Gradients, SmoothGrad and RISE: slow references, pairing, an oracle model, misuse.

The references below run one pair, one path point / noisy copy / mask at a time, written from the
formulas (not from the batched code), so batching, chunking across pairs and image sharing are
what they check.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXTS, make_open_clip
from torch import nn

import mmelkit
from mmelkit.methods import explain, get_method
from mmelkit.methods.perturbation import RISE, Occlusion
from mmelkit.methods.perturbation.occlusion import window_drops
from mmelkit.methods.perturbation.rise import rise_masks, rise_saliency
from mmelkit.methods.token import IntegratedGradients, SmoothGrad
from mmelkit.methods.token.integrated_gradients import baseline_pixels, integrated_gradients
from mmelkit.methods.token.smoothgrad import smoothgrad

# Small settings that keep every test fast on a CPU while still exercising chunks that cross pairs.
FAST: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 5, "batch_size": 4},
    "smoothgrad": {"samples": 5, "batch_size": 4, "seed": 7},
    "rise": {"masks": 60, "cells": 4, "p": 0.5, "batch_size": 25, "seed": 3},
    "occlusion": {"window": 8, "stride": 8, "batch_size": 7},
}
PIXEL_METHODS = ["integrated_gradients", "smoothgrad", "rise"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> mmelkit.ClipAdapter:
    return mmelkit.load_model(make_open_clip(seed=5), device="cpu")


@pytest.fixture
def pixels(model: mmelkit.ClipAdapter, images: torch.Tensor) -> torch.Tensor:
    return model.preprocess(images)


def score(model: mmelkit.ClipAdapter, pixels: torch.Tensor, text: str) -> torch.Tensor:
    """S for one image (1, 3, H, W) and one text, as a 0-d tensor (differentiable in ``pixels``)."""
    image = F.normalize(model.encode_image(pixels, normalize=False), dim=-1)[0]
    with torch.no_grad():
        target = model.encode_text([text])[0]
    return (image * target).sum()


def grad_of_score(model: mmelkit.ClipAdapter, pixels: torch.Tensor, text: str) -> torch.Tensor:
    point = pixels.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(score(model, point, text), point)
    return grad


def expected_map(model: mmelkit.ClipAdapter, per_pixel: torch.Tensor) -> torch.Tensor:
    pooled = F.avg_pool2d(per_pixel[None, None], model.patch_size)[0, 0]
    return (pooled - pooled.min()) / (pooled.max() - pooled.min()).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# Integrated Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["black", "zero"])
def test_ig_completeness(model: mmelkit.ClipAdapter, pixels: torch.Tensor, baseline: str) -> None:
    targets = model.encode_text(TEXTS)
    base = baseline_pixels(model, baseline, pixels)
    with torch.no_grad():
        gap = (model.encode_image(pixels) * targets).sum(-1) - (model.encode_image(base) * targets).sum(-1)
    coarse = integrated_gradients(model, pixels, targets, steps=16, baseline=baseline, batch_size=64)
    fine = integrated_gradients(model, pixels, targets, steps=128, baseline=baseline, batch_size=64)
    error_coarse = (coarse.flatten(1).sum(1) - gap).abs()
    error_fine = (fine.flatten(1).sum(1) - gap).abs()
    # The midpoint rule's error is (curvature of S along the path) / (24 m^2): at m = 128 about
    # 2.5e-6 times that curvature, so 0.1% of the score gap (plus 1e-5 for float32 summation over
    # 3072 pixels) is generous. The error must also shrink with m (1/m^2: 64x from 16 to 128
    # steps; we ask for 4x so float32 noise at the fine end cannot trip it).
    assert (error_fine <= 1e-3 * gap.abs() + 1e-5).all(), (error_fine, gap)
    assert (error_fine < error_coarse / 4).all(), (error_fine, error_coarse)


def test_ig_black_baseline_is_black_pixels(model: mmelkit.ClipAdapter, pixels: torch.Tensor) -> None:
    black = model.preprocess(torch.zeros(1, 3, 32, 32))
    torch.testing.assert_close(baseline_pixels(model, "black", pixels), black.expand_as(pixels))
    assert (baseline_pixels(model, "zero", pixels) == 0).all()


def test_ig_matches_step_by_step_reference(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    steps = 6
    # batch_size 4 with 3 pairs x 6 steps: chunks straddle pairs.
    result = IntegratedGradients(adapter, steps=steps, batch_size=4).explain(pixels, TEXTS)
    attribution = integrated_gradients(adapter, pixels, adapter.encode_text(TEXTS), steps, "black", 4)
    black = adapter.preprocess(torch.zeros(1, 3, 32, 32))
    for n in range(3):
        x = pixels[n : n + 1]
        total = torch.zeros_like(x)
        for k in range(1, steps + 1):
            alpha = (k - 0.5) / steps  # midpoint rule
            total += grad_of_score(adapter, black + alpha * (x - black), TEXTS[n])
        expected = (x - black) * total / steps
        torch.testing.assert_close(attribution[n : n + 1], expected, atol=1e-4, rtol=1e-4)
        expected_n = expected_map(adapter, expected[0].abs().sum(0))
        torch.testing.assert_close(result.maps[n], expected_n, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# SmoothGrad
# ---------------------------------------------------------------------------------------------


def test_smoothgrad_matches_sample_by_sample_reference(model: mmelkit.ClipAdapter, pixels: torch.Tensor) -> None:
    samples, noise, seed = 5, 0.2, 11
    result = SmoothGrad(model, samples=samples, noise=noise, seed=seed, batch_size=3).explain(pixels, TEXTS)
    mean_grad = smoothgrad(model, pixels, model.encode_text(TEXTS), samples, noise, seed, batch_size=3)
    # The documented noise: N(0, 1) draws from a CPU generator seeded with `seed`, shared by all pairs.
    eps = torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    for n in range(3):
        x = pixels[n : n + 1]
        sigma = noise * (x.max() - x.min())
        total = sum(grad_of_score(model, x + sigma * eps[k], TEXTS[n]) for k in range(samples))
        expected = total / samples
        torch.testing.assert_close(mean_grad[n : n + 1], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(result.maps[n], expected_map(model, expected[0].abs().sum(0)), atol=1e-4, rtol=0)


def test_smoothgrad_is_reproducible_and_seeded(model: mmelkit.ClipAdapter, pixels: torch.Tensor) -> None:
    first = SmoothGrad(model, samples=4, seed=1).explain(pixels, TEXTS).maps
    again = SmoothGrad(model, samples=4, seed=1).explain(pixels, TEXTS).maps
    other = SmoothGrad(model, samples=4, seed=2).explain(pixels, TEXTS).maps
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


# ---------------------------------------------------------------------------------------------
# RISE
# ---------------------------------------------------------------------------------------------


def test_rise_matches_mask_by_mask_reference(model: mmelkit.ClipAdapter, pixels: torch.Tensor) -> None:
    count, p = 40, 0.4
    result = RISE(model, masks=count, cells=4, p=p, seed=5, batch_size=7).explain(pixels, TEXTS)
    masks = rise_masks(count, (32, 32), cells=4, p=p, seed=5)
    raw = rise_saliency(model, pixels, model.encode_text(TEXTS), masks, batch_size=7)
    for n in range(3):
        saliency = torch.zeros(32, 32)
        for k in range(count):
            mask = masks.render(k, k + 1)[0]
            with torch.no_grad():
                saliency += score(model, pixels[n : n + 1] * mask, TEXTS[n]) * mask
        saliency /= count * p
        torch.testing.assert_close(raw[n], saliency, atol=1e-4, rtol=1e-4)  # unnormalised: checks 1/(N p)
        torch.testing.assert_close(result.maps[n], expected_map(model, saliency), atol=1e-4, rtol=0)


def test_rise_masks_follow_the_recipe() -> None:
    masks = rise_masks(400, (32, 48), cells=8, p=0.3, seed=0)
    assert masks.cell == (4, 6)  # ceil(side / cells)
    rendered = masks.render()
    assert rendered.shape == (400, 32, 48)
    assert rendered.min() >= 0 and rendered.max() <= 1
    assert abs(rendered.mean().item() - 0.3) < 0.03  # bilinear weights sum to 1: mean stays p
    assert (masks.offsets[:, 0] < 4).all() and (masks.offsets[:, 1] < 6).all()
    # All cells kept: 1 everywhere, up to the interpolation weights' rounding.
    full = rise_masks(1, (32, 32), cells=4, p=0.999999, seed=0)
    assert full.grids.all()
    torch.testing.assert_close(full.render(), torch.ones(1, 32, 32), atol=1e-6, rtol=0)
    # Rendering in chunks is rendering all at once.
    torch.testing.assert_close(torch.cat([masks.render(0, 150), masks.render(150, 400)]), rendered)
    assert torch.equal(rise_masks(400, (32, 48), 8, 0.3, seed=0).grids, masks.grids)


# ---------------------------------------------------------------------------------------------
# Pairing: batches, one image with many texts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [*PIXEL_METHODS, "occlusion"])
def test_batch_equals_per_example(model: mmelkit.ClipAdapter, pixels: torch.Tensor, method: str) -> None:
    batch = explain(model, pixels, TEXTS, method=method, **FAST[method])
    for n in range(3):
        single = explain(model, pixels[n : n + 1], [TEXTS[n]], method=method, **FAST[method])
        torch.testing.assert_close(batch.maps[n], single.maps[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", PIXEL_METHODS)
def test_one_image_many_texts_equals_pairs(model: mmelkit.ClipAdapter, pixels: torch.Tensor, method: str) -> None:
    shared = explain(model, pixels[:1], TEXTS, method=method, **FAST[method])
    assert shared.texts == TEXTS and shared.maps.shape == (3, 4, 4)
    for n in range(3):
        pair = explain(model, pixels[:1], [TEXTS[n]], method=method, **FAST[method])
        torch.testing.assert_close(shared.maps[n], pair.maps[0], atol=1e-5, rtol=0)
    assert not torch.allclose(shared.maps[0], shared.maps[2]), "different texts should give different maps"


def test_rise_encodes_a_shared_image_once_per_mask(model: mmelkit.ClipAdapter, pixels: torch.Tensor) -> None:
    calls: list[int] = []
    encode = model.backend.encode_pixels

    def counting(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        return encode(batch)

    model.backend.encode_pixels = counting  # type: ignore[method-assign]
    try:
        RISE(model, masks=50, batch_size=20).explain(pixels[:1], TEXTS)
    finally:
        del model.backend.encode_pixels
    assert calls == [20, 20, 10], "one forward per chunk of masks, whatever the number of texts"


def test_maps_follow_the_input_grid(model: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = model.preprocess(images[:2], size=(32, 48))
    for method in PIXEL_METHODS:
        result = explain(model, pixels, TEXTS[:2], method=method, **FAST[method])
        assert result.maps.shape == (2, 4, 6) and result.image_size == (32, 48)
        assert result.maps.min() >= 0 and result.maps.max() <= 1


# ---------------------------------------------------------------------------------------------
# An oracle that only sees one region
# ---------------------------------------------------------------------------------------------


class RegionOnlyConv(nn.Module):
    """Patch embedding whose input is multiplied by a fixed pixel mask: the model sees one region."""

    def __init__(self, conv: nn.Module, region: torch.Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.weight = conv.weight  # the backend reads the dtype from here
        self.register_buffer("region", region)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv(pixels * self.region)


REGIONS = {  # pixel rows, pixel columns; patch aligned on the 32 x 32 input with 8 x 8 patches
    "top-left": (slice(0, 16), slice(0, 16)),
    "lower-middle": (slice(16, 32), slice(8, 24)),
}


def oracle(region: tuple[slice, slice]) -> tuple[mmelkit.ClipAdapter, torch.Tensor]:
    """A fresh tiny model (never a shared fixture) that sees only ``region``; and the region's patches."""
    model = make_open_clip(seed=21)
    keep = torch.zeros(32, 32)
    keep[region] = 1
    model.visual.conv1 = RegionOnlyConv(model.visual.conv1, keep)
    patches = F.avg_pool2d(keep[None, None], 8)[0, 0] > 0
    return mmelkit.load_model(model, device="cpu"), patches


@pytest.mark.parametrize("region", list(REGIONS))
@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_gradient_maps_are_zero_where_the_oracle_is_blind(images: torch.Tensor, method: str, region: str) -> None:
    model, inside = oracle(REGIONS[region])
    maps = explain(model, model.preprocess(images), TEXTS, method=method, **FAST[method]).maps
    # dS/dx is exactly 0 outside the region (the mask multiplies the input), so the map is too.
    assert (maps[:, ~inside] == 0).all()
    assert (maps[:, inside] > 0).all()


@pytest.mark.parametrize("region", list(REGIONS))
def test_occlusion_map_is_zero_where_the_oracle_is_blind(images: torch.Tensor, region: str) -> None:
    model, inside = oracle(REGIONS[region])
    pixels = model.preprocess(images)
    windows = torch.zeros(16, 32, 32)  # the method's default: one window per 8 x 8 patch
    for k in range(16):
        windows[k, (k // 4) * 8 : (k // 4) * 8 + 8, (k % 4) * 8 : (k % 4) * 8 + 8] = 1
    drops = window_drops(model, pixels, model.encode_text(TEXTS), windows, batch_size=7).view(3, 4, 4)
    # Occluding unseen pixels changes the score only by float noise between batch shapes.
    assert drops[:, ~inside].abs().max() < 1e-6
    assert (drops[:, inside].abs() > 1e-5).all()
    maps = Occlusion(model, batch_size=7).explain(pixels, TEXTS).maps
    # The map is the clamped drop, min-max normalised. A pair whose drops inside are all <= 0 has
    # nothing to show, and normalising would blow its float noise up to 1; so the zero-outside
    # check applies to pairs with a clearly positive drop inside (the fixture images have some).
    shown = drops[:, inside].amax(dim=1) > 1e-4
    assert shown.any()
    assert maps[shown][:, ~inside].max() < 1e-4
    assert (maps[shown][:, inside].amax(dim=1) == 1).all()


@pytest.mark.parametrize("region", list(REGIONS))
def test_rise_ignores_what_the_oracle_cannot_see(images: torch.Tensor, region: str) -> None:
    model, _ = oracle(REGIONS[region])
    pixels = model.preprocess(images)
    changed = pixels.clone()
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[REGIONS[region]] = False
    changed[:, :, outside] = torch.randn_like(changed[:, :, outside])
    # Every masked copy scores the same when only unseen pixels differ, and the RISE map is a
    # score-weighted sum of the same masks: the maps are identical by construction.
    params = FAST["rise"]
    torch.testing.assert_close(
        RISE(model, **params).explain(changed, TEXTS).maps, RISE(model, **params).explain(pixels, TEXTS).maps,
        atol=1e-6, rtol=0,
    )


def test_rise_saliency_concentrates_on_the_region_the_oracle_sees(images: torch.Tensor) -> None:
    model, _ = oracle(REGIONS["top-left"])
    pixels = model.preprocess(images[:1])
    count, p = 500, 0.5
    masks = rise_masks(count, (32, 32), cells=8, p=p, seed=0)
    # Target: the oracle's own embedding of the unmasked image, so S(I * M) = 1 exactly when the
    # region is fully visible and masking the region moves the embedding away (lower S).
    target = model.encode_image(pixels)
    saliency = rise_saliency(model, pixels, target, masks, batch_size=100)[0]
    rendered = masks.render()
    with torch.no_grad():
        scores = model.encode_image(pixels * rendered[:, None]) @ target[0]
    # RISE is linear in S; removing the mean score's share, mean(S) * sum_k M_k / (N p), leaves
    # sum_k (S_k - mean S) M_k(u) / (N p): the covariance of score and mask at u, over p.
    centred = saliency - scores.mean() * rendered.sum(0) / (count * p)
    # By construction, a pixel u in rows or columns 28..31 depends (bilinear from the 9 x 9 grid
    # of 4-pixel cells) only on grid nodes that never touch the region's pixels, whatever the
    # offset, and has mean p given the offset; so its covariance with S is 0 in expectation and
    # only sampling noise (about sd(S) sd(M) / (p sqrt N)) remains. In the region, keeping a pixel
    # keeps part of what the oracle sees, which raises S: a positive covariance.
    far = torch.zeros(32, 32, dtype=torch.bool)
    far[28:, :] = True
    far[:, 28:] = True
    inside = centred[:16, :16].mean()
    assert inside > 0
    assert inside > 4 * centred[far].mean().abs(), (inside, centred[far].mean())


# ---------------------------------------------------------------------------------------------
# Misuse, side effects, registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("integrated_gradients", {"steps": 0}, "steps"),
        ("integrated_gradients", {"steps": 2.5}, "steps"),
        ("integrated_gradients", {"baseline": "grey"}, "baseline"),
        ("integrated_gradients", {"batch_size": 0}, "batch_size"),
        ("smoothgrad", {"samples": 0}, "samples"),
        ("smoothgrad", {"noise": -0.1}, "noise"),
        ("smoothgrad", {"seed": "one"}, "seed"),
        ("smoothgrad", {"batch_size": -1}, "batch_size"),
        ("rise", {"p": 0.0}, "strictly between 0 and 1"),
        ("rise", {"p": 1.0}, "strictly between 0 and 1"),
        ("rise", {"masks": 0}, "masks"),
        ("rise", {"cells": 0}, "cells"),
        ("rise", {"batch_size": 0}, "batch_size"),
        ("rise", {"seed": 1.5}, "seed"),
    ],
)
def test_bad_parameters_raise(model: mmelkit.ClipAdapter, pixels: torch.Tensor, method: str,
                              params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        explain(model, pixels, TEXTS, method=method, **params)


@pytest.mark.parametrize("method", PIXEL_METHODS)
def test_unpairable_inputs_raise(model: mmelkit.ClipAdapter, pixels: torch.Tensor, method: str) -> None:
    with pytest.raises(ValueError, match="images and 3 texts"):
        explain(model, pixels[:2], TEXTS, method=method, **FAST[method])


def test_functions_check_their_inputs(model: mmelkit.ClipAdapter, pixels: torch.Tensor) -> None:
    targets = model.encode_text(TEXTS)
    with pytest.raises(ValueError, match="one target per image"):
        integrated_gradients(model, pixels, targets[:2])
    with pytest.raises(ValueError, match="broadcast"):
        integrated_gradients(model, pixels, targets, baseline=torch.zeros(2, 3, 1, 1))
    with pytest.raises(ValueError, match="one target per image"):
        smoothgrad(model, pixels[:1], targets)
    with pytest.raises(ValueError, match="masks are for images of size"):
        rise_saliency(model, pixels, targets, rise_masks(4, (16, 16)))


@pytest.mark.parametrize("method", PIXEL_METHODS)
def test_explaining_changes_nothing_and_works_under_no_grad(
    model: mmelkit.ClipAdapter, pixels: torch.Tensor, method: str
) -> None:
    before = {name: p.detach().clone() for name, p in model.model.named_parameters()}
    scores = model.score(pixels, TEXTS)
    inputs = pixels.clone()
    result = explain(model, pixels, TEXTS, method=method, **FAST[method])
    with torch.no_grad():
        quiet = explain(model, pixels, TEXTS, method=method, **FAST[method])
    torch.testing.assert_close(quiet.maps, result.maps, atol=1e-6, rtol=0)
    for name, p in model.model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None, f"{name} got a .grad"
    assert torch.equal(pixels, inputs)
    torch.testing.assert_close(model.score(pixels, TEXTS), scores, atol=0, rtol=0)
    assert result.method == method and result.params == {**get_method(method).defaults, **FAST[method]}


def test_registry_places_the_methods_in_the_taxonomy() -> None:
    for name, cls, level, granularity, family in [
        ("integrated_gradients", IntegratedGradients, "model", "token", "gradient"),
        ("smoothgrad", SmoothGrad, "model", "token", "gradient"),
        ("rise", RISE, "data", "input", "perturbation"),
    ]:
        assert get_method(name) is cls
        assert (cls.level, cls.granularity, cls.family, cls.modality) == (level, granularity, family, "image")
