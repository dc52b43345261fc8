"""Localisation metrics: the batched torch functions against slow per-sample references written
with plain Python loops, closed-form cases, an oracle, batch == per-example, and bad inputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from mmelkit.metrics import (
    box_masks,
    energy_pointing_game,
    mask_auroc,
    mask_iou,
    mask_precision,
    mask_recall,
    pointing_game,
)
from mmelkit.metrics.localisation import grow_masks

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 9, 12  # not square, so a swapped axis shows


# -- slow references: one sample at a time, Python lists and loops -----------------------------------
def ref_grow(mask: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixel p is in the grown mask iff some mask pixel q has |p - q|^2 <= tolerance^2."""
    height, width = mask.shape
    points = [(y, x) for y in range(height) for x in range(width) if mask[y, x]]
    grown = np.zeros_like(mask)
    for y in range(height):
        for x in range(width):
            grown[y, x] = any((y - qy) ** 2 + (x - qx) ** 2 <= tolerance**2 for qy, qx in points)
    return grown


def ref_pointing(values: np.ndarray, mask: np.ndarray, tolerance: int, ties: str) -> float:
    flat = values.ravel().tolist()
    on = ref_grow(mask, tolerance).ravel().tolist()
    top = max(flat)
    tied = [i for i, v in enumerate(flat) if v == top]  # in row-major order
    if ties == "first":
        return float(on[tied[0]])
    return sum(on[i] for i in tied) / len(tied)


def ref_energy(values: np.ndarray, mask: np.ndarray) -> float:
    flat, on = values.ravel().tolist(), mask.ravel().tolist()
    total = sum(max(v, 0.0) for v in flat)
    if total == 0:
        return sum(on) / len(on)
    return sum(max(v, 0.0) for v, m in zip(flat, on, strict=True) if m) / total


def ref_kept(values: np.ndarray, threshold: float, top_fraction: float | None) -> list[bool]:
    """The binarised map, pixel by pixel, in plain Python."""
    flat = values.ravel().astype(np.float64).tolist()
    if top_fraction is None:
        low, high = min(flat), max(flat)
        normalised = [(v - low) / (high - low) if high > low else 0.0 for v in flat]
        return [v >= threshold for v in normalised]
    count = max(1, round(top_fraction * len(flat)))
    order = sorted(range(len(flat)), key=lambda i: -flat[i])  # stable: earlier pixel first
    chosen = set(order[:count])
    return [i in chosen for i in range(len(flat))]


def ref_iou(values: np.ndarray, mask: np.ndarray, threshold: float, top_fraction: float | None) -> float:
    kept, on = ref_kept(values, threshold, top_fraction), mask.ravel().tolist()
    intersection = sum(k and m for k, m in zip(kept, on, strict=True))
    union = sum(k or m for k, m in zip(kept, on, strict=True))
    return intersection / union


def ref_precision_recall(values: np.ndarray, mask: np.ndarray, threshold: float,
                         top_fraction: float | None) -> tuple[float, float]:
    kept, on = ref_kept(values, threshold, top_fraction), mask.ravel().tolist()
    hits = sum(k and m for k, m in zip(kept, on, strict=True))
    return (hits / sum(kept) if any(kept) else 0.0), hits / sum(on)


def ref_auroc(values: np.ndarray, mask: np.ndarray) -> float:
    """P(score_in > score_out) + 0.5 P(score_in == score_out), counting every pair."""
    flat, on = values.ravel().tolist(), mask.ravel().tolist()
    inside = [v for v, m in zip(flat, on, strict=True) if m]
    outside = [v for v, m in zip(flat, on, strict=True) if not m]
    wins = 0.0
    for a in inside:
        for b in outside:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(inside) * len(outside))


# -- random batches ------------------------------------------------------------------------------------
def random_batch(kind: str, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps of a given kind and masks (random blobs, never empty or full)."""
    rng = np.random.default_rng(seed)
    if kind == "continuous":
        maps = rng.normal(size=(n, H, W))
    elif kind == "few levels":  # many ties, at the maximum and elsewhere
        maps = rng.integers(0, 3, size=(n, H, W)).astype(np.float64)
    elif kind == "signed levels":  # ties, and negative values (mass is only the positive part)
        maps = rng.integers(-3, 2, size=(n, H, W)).astype(np.float64) * 0.25
    else:
        raise AssertionError(kind)
    masks = rng.random((n, H, W)) < rng.uniform(0.1, 0.6, size=(n, 1, 1))
    masks[:, 0, 0] = True
    masks[:, -1, -1] = False
    return torch.from_numpy(maps).float(), torch.from_numpy(masks)


KINDS = ["continuous", "few levels", "signed levels"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ties", ["expected", "first"])
@pytest.mark.parametrize("tolerance", [0, 2])
def test_pointing_matches_reference(kind: str, ties: str, tolerance: int) -> None:
    maps, masks = random_batch(kind, seed=1)
    got = pointing_game(maps, masks, tolerance=tolerance, ties=ties)
    want = [ref_pointing(m.numpy(), k.numpy(), tolerance, ties) for m, k in zip(maps, masks, strict=True)]
    assert got.dtype == torch.float32 and got.shape == (len(maps),)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    if ties == "expected" and kind == "few levels" and tolerance == 0:
        assert any(0 < v < 1 for v in want)  # the batch does exercise fractional (tied) hits


@pytest.mark.parametrize("kind", KINDS)
def test_energy_matches_reference(kind: str) -> None:
    maps, masks = random_batch(kind, seed=2)
    want = [ref_energy(m.numpy(), k.numpy()) for m, k in zip(maps, masks, strict=True)]
    got = energy_pointing_game(maps, masks)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("threshold", "top_fraction"), [(0.5, None), (0.25, None), (1.0, None),
                                                         (0.5, 0.2), (0.5, 0.55), (0.5, 1.0)])
def test_iou_matches_reference(kind: str, threshold: float, top_fraction: float | None) -> None:
    maps, masks = random_batch(kind, seed=3)
    want = [ref_iou(m.numpy(), k.numpy(), threshold, top_fraction) for m, k in zip(maps, masks, strict=True)]
    got = mask_iou(maps, masks, threshold=threshold, top_fraction=top_fraction)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("threshold", "top_fraction"), [(0.5, None), (0.25, None), (1.0, None), (0.5, 0.2), (0.5, 1.0)])
def test_precision_and_recall_match_reference(kind: str, threshold: float, top_fraction: float | None) -> None:
    maps, masks = random_batch(kind, seed=8)
    want = [ref_precision_recall(m.numpy(), k.numpy(), threshold, top_fraction)
            for m, k in zip(maps, masks, strict=True)]
    precision = mask_precision(maps, masks, threshold=threshold, top_fraction=top_fraction)
    recall = mask_recall(maps, masks, threshold=threshold, top_fraction=top_fraction)
    assert precision.dtype == recall.dtype == torch.float32
    assert precision.tolist() == pytest.approx([p for p, _ in want], abs=1e-6)
    assert recall.tolist() == pytest.approx([r for _, r in want], abs=1e-6)


def test_precision_recall_and_iou_agree_in_closed_form() -> None:
    """Keeping the mask plus k outside pixels: precision m/(m+k), recall 1, IoU m/(m+k); keeping half
    the mask and nothing else: precision 1, recall 1/2, IoU 1/2."""
    masks = box_mask(2)  # 18 pixels each
    on = masks[0].flatten().nonzero().flatten()
    off = (~masks[0]).flatten().nonzero().flatten()
    wide = masks[0].flatten().float().clone()
    wide[off[:6]] = 1.0  # 6 extra pixels
    half = torch.zeros(H * W)
    half[on[:9]] = 1.0
    maps = torch.stack([wide, half]).reshape(2, H, W)
    assert mask_precision(maps, masks).tolist() == pytest.approx([18 / 24, 1.0])
    assert mask_recall(maps, masks).tolist() == pytest.approx([1.0, 0.5])
    assert mask_iou(maps, masks).tolist() == pytest.approx([18 / 24, 0.5])


@pytest.mark.parametrize("kind", KINDS)
def test_auroc_matches_reference(kind: str) -> None:
    maps, masks = random_batch(kind, seed=4)
    want = [ref_auroc(m.numpy(), k.numpy()) for m, k in zip(maps, masks, strict=True)]
    got = mask_auroc(maps, masks)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_grow_masks_matches_reference() -> None:
    _, masks = random_batch("continuous", n=3, seed=5)
    masks &= torch.rand(masks.shape, generator=torch.Generator().manual_seed(0)) < 0.15  # sparse
    masks[:, 0, 0] = True
    for tolerance in (1, 2, 3):
        want = np.stack([ref_grow(m.numpy(), tolerance) for m in masks])
        assert np.array_equal(grow_masks(masks, tolerance).numpy(), want)


# -- closed forms ------------------------------------------------------------------------------------
def box_mask(n: int = 3) -> torch.Tensor:
    masks = torch.zeros(n, H, W, dtype=torch.bool)
    masks[:, 2:5, 3:9] = True  # 18 of 108 pixels
    return masks


def test_map_equal_to_mask_is_perfect_and_inverted_is_worst() -> None:
    masks = box_mask()
    perfect = masks.float() * torch.tensor([1.0, 3.0, 0.01])[:, None, None]  # the scale must not matter
    assert pointing_game(perfect, masks).tolist() == [1.0] * 3
    assert pointing_game(perfect, masks, ties="first").tolist() == [1.0] * 3
    assert energy_pointing_game(perfect, masks).tolist() == [1.0] * 3
    assert mask_iou(perfect, masks).tolist() == [1.0] * 3
    assert mask_iou(perfect, masks, top_fraction=18 / 108).tolist() == [1.0] * 3
    assert mask_precision(perfect, masks).tolist() == mask_recall(perfect, masks).tolist() == [1.0] * 3
    assert mask_auroc(perfect, masks).tolist() == [1.0] * 3
    inverted = 1.0 - masks.float()
    assert pointing_game(inverted, masks).tolist() == [0.0] * 3
    assert energy_pointing_game(inverted, masks).tolist() == [0.0] * 3
    assert mask_iou(inverted, masks).tolist() == [0.0] * 3
    assert mask_precision(inverted, masks).tolist() == mask_recall(inverted, masks).tolist() == [0.0] * 3
    assert mask_auroc(inverted, masks).tolist() == [0.0] * 3
    assert mask_auroc(-perfect, masks).tolist() == [0.0] * 3


@pytest.mark.parametrize("value", [0.0, 2.5, -1.0])
def test_constant_map_scores_chance(value: float) -> None:
    masks = box_mask()
    masks[1] = False
    masks[1, 0, :5] = True  # 5 pixels, on the first row: ties="first" lands on it
    share = masks.flatten(1).sum(dim=1) / (H * W)  # 18/108, 5/108, 18/108
    constant = torch.full((3, H, W), value)
    assert pointing_game(constant, masks).tolist() == pytest.approx(share.tolist(), abs=1e-7)
    assert pointing_game(constant, masks, ties="first").tolist() == [0.0, 1.0, 0.0]  # pixel (0, 0)
    grown = grow_masks(masks, 2).flatten(1).sum(dim=1) / (H * W)
    assert pointing_game(constant, masks, tolerance=2).tolist() == pytest.approx(grown.tolist(), abs=1e-7)
    assert energy_pointing_game(constant, masks).tolist() == pytest.approx(share.tolist(), abs=1e-7)
    assert mask_auroc(constant, masks).tolist() == [0.5, 0.5, 0.5]  # exactly
    assert mask_iou(constant, masks).tolist() == [0.0] * 3  # nothing survives the threshold
    assert mask_precision(constant, masks).tolist() == mask_recall(constant, masks).tolist() == [0.0] * 3


def test_energy_counts_only_positive_mass() -> None:
    masks = box_mask(2)
    maps = torch.zeros(2, H, W)
    maps[:, 3, 4] = 3.0  # inside
    maps[:, 0, 0] = 1.0  # outside
    maps[1, 8, 11] = -100.0  # negative: no mass, no effect
    assert energy_pointing_game(maps, masks).tolist() == [0.75, 0.75]
    negative = -torch.rand(2, H, W) - 0.1  # no positive mass at all -> chance
    assert energy_pointing_game(negative, masks).tolist() == pytest.approx([18 / 108] * 2, abs=1e-7)


def test_tolerance_with_tied_maxima() -> None:
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, 4, 6] = True
    maps = torch.zeros(1, H, W)
    maps[0, 0, 0] = 1.0  # far away (distance^2 52), first in row-major order
    maps[0, 4, 8] = 1.0  # 2 px right of the mask
    assert pointing_game(maps, mask).item() == 0.0
    assert pointing_game(maps, mask, tolerance=1).item() == 0.0
    assert pointing_game(maps, mask, tolerance=2).item() == 0.5  # one of the two tied maxima is close
    assert pointing_game(maps, mask, tolerance=8).item() == 1.0  # both are
    # the first maximum in row-major order, (0, 0), decides under ties="first"
    assert pointing_game(maps, mask, tolerance=2, ties="first").item() == 0.0
    assert pointing_game(maps, mask, tolerance=8, ties="first").item() == 1.0
    maps[0, 4, 6] = 1.0  # a third tie, on the mask itself
    assert pointing_game(maps, mask).item() == pytest.approx(1 / 3)
    assert pointing_game(maps, mask, tolerance=2).item() == pytest.approx(2 / 3)


def old_pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: int) -> torch.Tensor:
    """The pointing game before ties were counted: argmax (first maximum), bool hits."""
    masks = grow_masks(masks, tolerance)
    return masks.flatten(1).gather(1, maps.flatten(1).argmax(dim=1)[:, None])[:, 0]


@pytest.mark.parametrize("tolerance", [0, 1, 3])
def test_ties_first_is_the_old_pointing_game(tolerance: int) -> None:
    maps, masks = random_batch("few levels", n=16, seed=6)
    old = old_pointing_game(maps, masks, tolerance)
    assert torch.equal(pointing_game(maps, masks, tolerance, ties="first"), old.float())
    # and the new default differs on this batch (ties at the maximum are common here)
    assert not torch.equal(pointing_game(maps, masks, tolerance), old.float())


# -- oracle --------------------------------------------------------------------------------------------
def test_map_peaked_on_the_object_beats_a_map_peaked_elsewhere() -> None:
    masks = box_mask(1)  # rows 2-4, columns 3-8: centre (3, 5.5)
    rows, cols = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")

    def bump(y: float, x: float) -> torch.Tensor:
        return torch.exp(-((rows - y) ** 2 + (cols - x) ** 2) / 4)[None]

    right, wrong = bump(3, 5.5), bump(7, 1)
    metrics: dict[str, Callable[[torch.Tensor], float]] = {
        "pointing": lambda m: pointing_game(m, masks).item(),
        "energy": lambda m: energy_pointing_game(m, masks).item(),
        "iou": lambda m: mask_iou(m, masks).item(),
        "iou top": lambda m: mask_iou(m, masks, top_fraction=18 / 108).item(),
        "auroc": lambda m: mask_auroc(m, masks).item(),
    }
    for name, metric in metrics.items():
        assert metric(right) > metric(wrong), name
    assert pointing_game(right, masks).item() == 1.0 and pointing_game(wrong, masks).item() == 0.0
    assert mask_auroc(right, masks).item() > 0.95 and mask_auroc(wrong, masks).item() < 0.6


# -- batch == per example ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_per_example(kind: str) -> None:
    maps, masks = random_batch(kind, n=5, seed=7)
    metrics: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
        pointing_game,
        lambda a, b: pointing_game(a, b, tolerance=2),
        lambda a, b: pointing_game(a, b, ties="first"),
        mask_iou,
        lambda a, b: mask_iou(a, b, top_fraction=0.3),
        mask_precision,
        lambda a, b: mask_recall(a, b, top_fraction=0.3),
        mask_auroc,
    ]
    for metric in metrics:
        batched = metric(maps, masks)
        single = torch.cat([metric(maps[i : i + 1], masks[i : i + 1]) for i in range(len(maps))])
        assert torch.equal(batched, single)
    single = torch.cat([energy_pointing_game(maps[i : i + 1], masks[i : i + 1]) for i in range(len(maps))])
    torch.testing.assert_close(energy_pointing_game(maps, masks), single, rtol=1e-6, atol=0)


def test_empty_batch() -> None:
    maps, masks = torch.zeros(0, H, W), torch.zeros(0, H, W, dtype=torch.bool)
    for metric in (pointing_game, energy_pointing_game, mask_iou, mask_auroc):
        assert metric(maps, masks).shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    maps, masks = random_batch("few levels", seed=8)
    for metric in (pointing_game, energy_pointing_game, mask_iou, mask_auroc):
        on_gpu = metric(maps.cuda(), masks.cuda())
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), metric(maps, masks))
    assert torch.equal(box_masks(torch.tensor([[1, 2, 5, 7]]).cuda(), (H, W)).cpu(),
                       box_masks(torch.tensor([[1, 2, 5, 7]]), (H, W)))


# -- boxes ---------------------------------------------------------------------------------------------
def test_box_masks_match_slicing() -> None:
    rng = np.random.default_rng(9)
    x1 = rng.integers(0, W, 20)
    y1 = rng.integers(0, H, 20)
    x2 = x1 + 1 + (rng.integers(0, W, 20) % (W - x1))
    y2 = y1 + 1 + (rng.integers(0, H, 20) % (H - y1))
    boxes = np.stack([x1, y1, x2, y2], axis=1)
    boxes = np.concatenate([boxes, [[0, 0, W, H], [W - 1, H - 1, W, H], [3, 0, 4, H]]])
    want = np.zeros((len(boxes), H, W), bool)
    for n, (a, b, c, d) in enumerate(boxes.tolist()):
        want[n, b:d, a:c] = True
    got = box_masks(torch.from_numpy(boxes), (H, W))
    assert got.dtype == torch.bool and got.shape == (len(boxes), H, W)
    assert np.array_equal(got.numpy(), want)
    assert box_masks(torch.tensor([[2, 1, 5, 3]], dtype=torch.int32), (H, W)).sum().item() == 6
    # energy pointing game "inside the box": half of the mass is in box 0, none in box 1
    maps = torch.zeros(2, H, W)
    maps[:, 1, 2] = maps[:, 8, 11] = 1.0
    boxed = box_masks(torch.tensor([[2, 1, 5, 3], [0, 4, 3, 6]]), (H, W))
    assert energy_pointing_game(maps, boxed).tolist() == [0.5, 0.0]


# -- bad inputs ----------------------------------------------------------------------------------------
METRICS = [pointing_game, energy_pointing_game, mask_iou, mask_precision, mask_recall, mask_auroc]


@pytest.mark.parametrize("metric", METRICS)
def test_bad_maps_and_masks(metric: Callable[..., torch.Tensor]) -> None:
    masks = box_mask(2)
    maps = torch.rand(2, H, W)
    with pytest.raises(ValueError, match="must both be"):
        metric(maps[0], masks[0])  # (H, W): no batch dimension
    with pytest.raises(ValueError, match="must both be"):
        metric(maps, masks[:, :, :-1])
    with pytest.raises(ValueError, match="must both be"):
        metric(maps[:1], masks)
    with pytest.raises(ValueError, match="NaN or infinite"):
        metric(torch.where(masks, float("nan"), maps), masks)
    with pytest.raises(ValueError, match="NaN or infinite"):
        metric(torch.where(masks, float("inf"), maps), masks)
    with pytest.raises(ValueError, match="floating-point"):
        metric(maps.long(), masks)
    with pytest.raises(ValueError, match="bool"):
        metric(maps, masks.float())
    empty = masks.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"at least one pixel.*\[1\]"):
        metric(maps, empty)
    with pytest.raises(ValueError, match="torch tensors"):
        metric(maps.numpy(), masks)


def test_bad_parameters() -> None:
    masks = box_mask(2)
    maps = torch.rand(2, H, W)
    full = torch.ones(2, H, W, dtype=torch.bool)
    with pytest.raises(ValueError, match="whole image"):
        mask_auroc(maps, full)
    with pytest.raises(ValueError, match="ties must be one of"):
        pointing_game(maps, masks, ties="random")  # type: ignore[arg-type]
    for tolerance in (-1, 1.5, True):
        with pytest.raises(ValueError, match="tolerance"):
            pointing_game(maps, masks, tolerance=tolerance)  # type: ignore[arg-type]
    for threshold in (0.0, -0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="threshold"):
            mask_iou(maps, masks, threshold=threshold)  # type: ignore[arg-type]
    for fraction in (0.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="top_fraction"):
            mask_iou(maps, masks, top_fraction=fraction)


def test_bad_boxes() -> None:
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        box_masks(torch.tensor([1, 2, 3, 4]), (H, W))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        box_masks(torch.tensor([[1, 2, 3, 4, 5]]), (H, W))
    with pytest.raises(ValueError, match="integer"):
        box_masks(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), (H, W))
    with pytest.raises(ValueError, match="torch tensor"):
        box_masks(np.array([[1, 2, 3, 4]]), (H, W))  # type: ignore[arg-type]
    for box in ([-1, 0, 3, 3], [0, 0, W + 1, 3], [0, 0, 3, H + 1], [3, 0, 3, 4], [0, 4, 3, 2]):
        with pytest.raises(ValueError, match=r"box 1 .*non-empty and inside the 9x12 image"):
            box_masks(torch.tensor([[0, 0, 1, 1], box]), (H, W))
    for size in ((H,), (0, W), (H, 2.5), (True, W)):
        with pytest.raises(ValueError, match="size"):
            box_masks(torch.tensor([[0, 0, 1, 1]]), size)  # type: ignore[arg-type]
