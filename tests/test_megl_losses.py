"""MEGL's losses (SPEC section 3): closed forms on hand-made tensors, ideal cases, slow references.

Every loss is checked three ways where it applies: its value on a 2x2 / 3x3 example worked out by
hand (the arithmetic is in the comments), its ideal case (0 or minimal) against perturbed inputs,
and batch == per-example. Missing masks are checked per sample: a withheld sample's placeholder is
never allowed to change a value or receive a gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmelkit.training.megl import losses
from mmelkit.training.megl.models import ExplainableClassifier, input_gradients

pytestmark = pytest.mark.usefixtures("one_thread")

PAIR_LOSSES = {
    "l1": losses.l1_attention,
    "gradia": losses.gradia_attention,
    "haics": losses.haics_attention,
    "tsv": losses.textual_supervision,
}


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _binary_masks(n: int = 3, size: int = 4, seed: int = 0) -> torch.Tensor:
    masks = (torch.rand(n, size, size, generator=_generator(seed)) > 0.5).float()
    masks[:, 0, 0] = 1.0  # no empty mask
    masks[:, -1, -1] = 0.0  # and no full one
    return masks


# -- the attention losses: closed forms ----------------------------------------------------------
# One 2x2 example for all of them:
#   map  = [[0.5, 1.0],      mask = [[1, 1],
#           [0.0, 0.25]]             [0, 0]]
MAP_2x2 = torch.tensor([[[0.5, 1.0], [0.0, 0.25]]], dtype=torch.float64)
MASK_2x2 = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)


def test_l1_closed_form() -> None:
    # |0.5 - 1| + |1 - 1| + |0 - 0| + |0.25 - 0| = 0.5 + 0 + 0 + 0.25 = 0.75; / 4 pixels = 0.1875
    assert losses.l1_attention(MAP_2x2, MASK_2x2).item() == pytest.approx(0.1875, abs=1e-12)
    assert losses.textual_supervision(MAP_2x2, MASK_2x2).item() == pytest.approx(0.1875, abs=1e-12)


def test_gradia_closed_form() -> None:
    # only the mask's positive part: (|0.5 - 1| * 1 + |1 - 1| * 1) / (1 + 1) = 0.5 / 2 = 0.25
    assert losses.gradia_attention(MAP_2x2, MASK_2x2).item() == pytest.approx(0.25, abs=1e-12)
    # a soft mask weights the pixels: mask [[0.5, 0], [0, 0]], map [[0, 1], [1, 1]]
    # -> |0 - 0.5| * 0.5 / 0.5 = 0.5 (the wrong pixels outside the mask are not counted)
    soft = torch.tensor([[[0.5, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    wrong = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    assert losses.gradia_attention(wrong, soft).item() == pytest.approx(0.5, abs=1e-12)


def test_haics_closed_form() -> None:
    eps = 1e-4
    # BCE per pixel of the clamped map p against y: -(y log p + (1 - y) log(1 - p))
    #   p = 0.5,  y = 1: -log 0.5 = log 2
    #   p = 1 -> 1 - eps, y = 1: -log(1 - eps)
    #   p = 0 -> eps,     y = 0: -log(1 - eps)
    #   p = 0.25, y = 0: -log 0.75 = log(4 / 3)
    expected = (math.log(2) - 2 * math.log(1 - eps) + math.log(4 / 3)) / 4
    assert losses.haics_attention(MAP_2x2, MASK_2x2, eps=eps).item() == pytest.approx(expected, rel=1e-10)


def test_rrr_closed_form() -> None:
    # input gradients (N=1, C=2, 2, 2); outside the mask = the bottom row
    grads = torch.tensor([[[[1.0, 2.0], [3.0, -4.0]], [[5.0, 6.0], [0.5, 0.0]]]], dtype=torch.float64)
    # bottom row of each channel: 3^2 + (-4)^2 + 0.5^2 + 0^2 = 9 + 16 + 0.25 = 25.25
    assert losses.rrr_attention(grads, MASK_2x2).item() == pytest.approx(25.25, abs=1e-12)
    # a soft mask weights by (1 - mask) before squaring: mask 0.5 everywhere -> sum (g / 2)^2
    half = torch.full((1, 2, 2), 0.5, dtype=torch.float64)
    assert losses.rrr_attention(grads, half).item() == pytest.approx(float(grads.square().sum()) / 4, rel=1e-12)


def test_rrr_is_zero_when_gradients_vanish_outside_the_mask() -> None:
    masks = _binary_masks(2, 4)
    grads = torch.randn(2, 3, 4, 4, generator=_generator(1)) * masks[:, None]
    assert torch.equal(losses.rrr_attention(grads, masks), torch.zeros(2))
    leaked = grads.clone()
    leaked[1, 2, -1, -1] = 0.3  # one pixel outside sample 1's mask
    values = losses.rrr_attention(leaked, masks)
    assert values[0].item() == 0.0 and values[1].item() == pytest.approx(0.09, rel=1e-6)


@pytest.mark.parametrize(
    ("grads_shape", "mask_shape"),
    [((2, 3, 4, 4), (2, 4, 5)), ((2, 3, 4, 4), (3, 4, 4)), ((2, 4, 4), (2, 4, 4)), ((2, 3, 4, 4), (2, 3, 4, 4))],
)
def test_rrr_refuses_disagreeing_shapes(grads_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="disagree"):
        losses.rrr_attention(torch.zeros(grads_shape), torch.zeros(mask_shape))


# -- ideal cases, perturbations, shapes, batch == per-example ------------------------------------
@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_pair_losses_are_zero_at_the_mask_and_larger_when_perturbed(name: str) -> None:
    loss = PAIR_LOSSES[name]
    masks = _binary_masks(3, 4)
    ideal = loss(masks.clone(), masks)
    assert ideal.shape == (3,)
    floor = 1.01e-4 if name == "haics" else 0.0  # HAICS' clamp: -log(1 - eps), about eps
    assert (ideal >= 0).all() and (ideal <= floor).all()
    # perturb inside the mask (so that GRADIA, which only reads the positive part, sees it too)
    perturbed = masks - 0.3 * masks * torch.rand(masks.shape, generator=_generator(2))
    worse = loss(perturbed, masks)
    assert (worse > ideal + 1e-3).all()


@pytest.mark.parametrize("name", ["l1", "haics", "tsv"])
def test_pair_losses_see_errors_outside_the_mask(name: str) -> None:
    masks = _binary_masks(2, 4)
    spilled = masks + 0.5 * (1 - masks)  # the map also lights up the background
    assert (PAIR_LOSSES[name](spilled, masks) > PAIR_LOSSES[name](masks, masks) + 1e-3).all()


def test_gradia_ignores_the_background_by_design() -> None:
    masks = _binary_masks(2, 4)
    spilled = masks + 0.5 * (1 - masks)
    assert torch.equal(losses.gradia_attention(spilled, masks), torch.zeros(2))
    # an empty mask has nothing to cover: 0, not NaN
    assert losses.gradia_attention(torch.rand(1, 3, 3), torch.zeros(1, 3, 3)).item() == 0.0


def test_haics_is_minimal_at_a_soft_mask() -> None:
    # for a soft mask BCE is not 0 at map == mask (it is the mask's entropy), but that is its minimum
    masks = torch.rand(1, 3, 3, generator=_generator(3), dtype=torch.float64) * 0.8 + 0.1
    maps = masks.clone().requires_grad_(True)
    at_mask = losses.haics_attention(maps, masks)
    (grad,) = torch.autograd.grad(at_mask.sum(), maps)
    assert grad.abs().max().item() < 1e-10  # stationary
    for sign in (-1, 1):
        moved = (masks + sign * 0.05).clamp(0, 1)
        assert losses.haics_attention(moved, masks).item() > at_mask.item()


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_pair_losses_batch_equals_per_example(name: str) -> None:
    maps = torch.rand(4, 5, 5, generator=_generator(4))
    masks = torch.rand(4, 5, 5, generator=_generator(5)).round()
    batched = PAIR_LOSSES[name](maps, masks)
    single = torch.cat([PAIR_LOSSES[name](maps[i : i + 1], masks[i : i + 1]) for i in range(4)])
    assert batched.shape == (4,)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", list(PAIR_LOSSES) + ["dc"])
@pytest.mark.parametrize(("map_shape", "mask_shape"), [((2, 4, 4), (2, 4, 3)), ((2, 4, 4), (3, 4, 4)), ((4, 4), (4, 4))])
def test_pair_losses_refuse_bad_shapes(name: str, map_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> None:
    loss = PAIR_LOSSES.get(name, losses.distribution_consistency)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        loss(torch.rand(map_shape), torch.rand(mask_shape))


# -- masked_mean: missing masks per sample -------------------------------------------------------
def test_masked_mean_closed_form() -> None:
    values = torch.tensor([1.0, 2.0, 30.0, 5.0])
    keep = torch.tensor([True, False, True, True])
    # (1 + 30 + 5) / 3 = 12
    assert losses.masked_mean(values, keep).item() == pytest.approx(12.0)
    assert losses.masked_mean(values, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(9.5)


def test_withheld_placeholders_do_not_change_the_loss() -> None:
    masks = _binary_masks(4, 4)
    has_mask = torch.tensor([True, False, True, False])
    maps = torch.rand(4, 4, 4, generator=_generator(6))
    garbage = masks.clone()
    garbage[~has_mask] = torch.rand(2, 4, 4, generator=_generator(7)) * 7 - 3  # any finite junk
    for loss in PAIR_LOSSES.values():
        clean = losses.masked_mean(loss(maps, masks), has_mask)
        # (haics needs a target in [0, 1]: its garbage stays in range)
        junk = garbage.clamp(0, 1) if loss is losses.haics_attention else garbage
        assert losses.masked_mean(loss(maps, junk), has_mask).item() == pytest.approx(clean.item(), abs=1e-7)
        # and the value is the mean over the kept samples only
        expected = loss(maps[has_mask], masks[has_mask]).mean()
        assert clean.item() == pytest.approx(expected.item(), abs=1e-7)
    grads = torch.randn(4, 3, 4, 4, generator=_generator(8))
    clean = losses.masked_mean(losses.rrr_attention(grads, masks), has_mask)
    assert losses.masked_mean(losses.rrr_attention(grads, garbage), has_mask).item() == pytest.approx(clean.item())


def test_a_nan_placeholder_is_never_read() -> None:
    masks = _binary_masks(3, 4)
    has_mask = torch.tensor([True, False, True])
    maps = torch.rand(3, 4, 4, generator=_generator(9))
    clean = losses.masked_mean(losses.l1_attention(maps, masks), has_mask)
    withheld = masks.clone()
    withheld[1] = float("nan")
    value = losses.masked_mean(losses.l1_attention(maps, withheld), has_mask)
    assert value.item() == pytest.approx(clean.item())


def test_gradients_reach_only_the_samples_with_a_mask() -> None:
    masks = _binary_masks(3, 4)
    has_mask = torch.tensor([False, True, False])
    maps = torch.rand(3, 4, 4, generator=_generator(10)).requires_grad_(True)
    for loss in PAIR_LOSSES.values():
        (grad,) = torch.autograd.grad(losses.masked_mean(loss(maps, masks), has_mask), maps)
        assert torch.count_nonzero(grad[~has_mask]) == 0
        assert torch.count_nonzero(grad[has_mask]) > 0


def test_a_batch_without_any_mask_gives_zero_with_a_graph() -> None:
    maps = torch.rand(3, 4, 4, generator=_generator(11)).requires_grad_(True)
    value = losses.masked_mean(losses.l1_attention(maps, torch.rand(3, 4, 4)), torch.zeros(3, dtype=torch.bool))
    assert value.item() == 0.0 and not torch.isnan(value)
    assert value.requires_grad
    (grad,) = torch.autograd.grad(value, maps)
    assert torch.equal(grad, torch.zeros_like(maps))


# -- rationale NLL -------------------------------------------------------------------------------
def _slow_nll(logits: torch.Tensor, targets: torch.Tensor, pad: int) -> torch.Tensor:
    out = []
    for n in range(logits.shape[0]):
        total, count = 0.0, 0
        for t in range(logits.shape[1]):
            token = int(targets[n, t])
            if token == pad:
                continue
            row = [float(v) for v in logits[n, t]]
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            total += log_z - row[token]
            count += 1
        out.append(total / count if count else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def test_rationale_nll_equals_a_per_token_reference() -> None:
    pad = 0
    logits = torch.randn(3, 5, 6, generator=_generator(12), dtype=torch.float64) * 2
    targets = torch.tensor([[3, 4, 1, 0, 0], [2, 2, 2, 2, 5], [0, 0, 0, 0, 0]])  # last: all pads
    fast = losses.rationale_nll(logits, targets, pad)
    assert fast.shape == (3,)
    torch.testing.assert_close(fast, _slow_nll(logits, targets, pad), rtol=1e-12, atol=1e-12)
    assert fast[2].item() == 0.0
    # the logits at pad positions are never read
    changed = logits.clone()
    changed[0, 3:] = 100 * torch.randn(2, 6, generator=_generator(13), dtype=torch.float64)
    torch.testing.assert_close(losses.rationale_nll(changed, targets, pad), fast)


def test_rationale_nll_of_perfect_logits_is_about_zero() -> None:
    targets = torch.tensor([[1, 2, 3, 9], [4, 9, 9, 9]])
    perfect = 50.0 * F.one_hot(targets, 10).double()
    values = losses.rationale_nll(perfect, targets, pad=9)
    assert values.max().item() < 1e-12
    # a hand value: uniform logits over 10 words -> log 10 per real token
    uniform = losses.rationale_nll(torch.zeros(2, 4, 10), targets, pad=9)
    torch.testing.assert_close(uniform, torch.full((2,), math.log(10)))


def test_rationale_nll_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="disagree"):
        losses.rationale_nll(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long), pad=0)


# -- distribution consistency --------------------------------------------------------------------
def _slow_kl(maps: torch.Tensor, priors: torch.Tensor, eps: float) -> torch.Tensor:
    out = []
    for m, p in zip(maps.double().tolist(), priors.double().tolist(), strict=True):
        flat_m = [v for row in m for v in row]
        flat_p = [v for row in p for v in row]
        total = sum(flat_m)
        predicted = [(v / total if total > 0 else 0.0) + eps for v in flat_m]
        out.append(sum(q * math.log(q / r) for q, r in zip(flat_p, predicted, strict=True) if q > 0))
    return torch.tensor(out, dtype=torch.float64)


def test_distribution_consistency_closed_form() -> None:
    eps = 1e-6
    # prior [[0.5, 0.5], [0, 0]]; map of ones -> P_hat = 0.25 everywhere
    # KL = 2 * 0.5 * log(0.5 / (0.25 + eps)) (the zero prior pixels add nothing) ~ log 2
    prior = torch.tensor([[[0.5, 0.5], [0.0, 0.0]]], dtype=torch.float64)
    value = losses.distribution_consistency(torch.ones(1, 2, 2, dtype=torch.float64), prior, eps=eps)
    assert value.item() == pytest.approx(math.log(0.5 / (0.25 + eps)), rel=1e-12)


def test_distribution_consistency_equals_a_slow_reference() -> None:
    maps = torch.rand(4, 3, 3, generator=_generator(14), dtype=torch.float64)
    maps[1] = 0.0  # an all-zero map: P_hat = 0, the KL only sees eps
    maps[2, 0] = 0.0
    priors = losses.as_distribution(torch.rand(4, 3, 3, generator=_generator(15), dtype=torch.float64).round())
    priors[3] = 1.0 / 9
    fast = losses.distribution_consistency(maps, priors)
    assert fast.shape == (4,) and torch.isfinite(fast).all()
    torch.testing.assert_close(fast, _slow_kl(maps, priors, 1e-6), rtol=1e-10, atol=1e-12)
    batched_vs_single = torch.cat([losses.distribution_consistency(maps[i : i + 1], priors[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(fast, batched_vs_single, rtol=0, atol=1e-12)


def test_distribution_consistency_is_minimal_when_the_map_matches_the_prior() -> None:
    priors = losses.as_distribution(_binary_masks(3, 4).double())
    # any positive multiple of the prior is the same distribution
    scale = torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64)[:, None, None]
    ideal = losses.distribution_consistency(priors * scale, priors)
    # sum_i p_i log(p_i / (p_i + eps)) ~ -eps * (number of positive pixels): about 0, a hair below
    assert ideal.abs().max().item() < 1e-4
    for seed in range(3):
        noise = torch.rand(priors.shape, generator=_generator(16 + seed), dtype=torch.float64)
        assert (losses.distribution_consistency(priors * scale + 0.05 * noise, priors) > ideal + 1e-4).all()


def test_as_distribution_sums_to_one_and_keeps_zero_maps_zero() -> None:
    maps = torch.rand(3, 4, 4, generator=_generator(19))
    maps[1] = 0.0
    dist = losses.as_distribution(maps)
    torch.testing.assert_close(dist.flatten(1).sum(1), torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(dist[1], torch.zeros(4, 4))


# -- class mean masks ----------------------------------------------------------------------------
def test_class_mean_masks_hand_example() -> None:
    # 3x3 masks; class 0 has two masks, class 1 has one withheld sample only, class 2 has one mask
    a = torch.zeros(3, 3)
    a[0, 0] = 1.0  # -> distribution: 1 at (0, 0)
    b = torch.zeros(3, 3)
    b[0, 0] = b[0, 1] = 1.0  # -> 0.5 at (0, 0) and (0, 1)
    c = torch.zeros(3, 3)
    c[2, :] = 1.0  # -> 1/3 on the bottom row
    junk = torch.full((3, 3), 5.0)  # withheld: never read
    masks = torch.stack([a, b, junk, c])
    labels = torch.tensor([0, 0, 1, 2])
    has_mask = torch.tensor([True, True, False, True])
    priors = losses.class_mean_masks(masks, labels, has_mask, num_classes=3)
    assert priors.shape == (3, 3, 3)
    # class 0: mean of [1 at (0,0)] and [0.5 at (0,0), 0.5 at (0,1)] = 0.75 at (0,0), 0.25 at (0,1)
    expected0 = torch.zeros(3, 3)
    expected0[0, 0], expected0[0, 1] = 0.75, 0.25
    torch.testing.assert_close(priors[0], expected0)
    # class 2: its one mask, 1/3 on the bottom row
    torch.testing.assert_close(priors[2], c / 3)
    # class 1 (no mask): the global mean over the three masked samples:
    # (0,0): (1 + 0.5 + 0) / 3 = 0.5; (0,1): 0.5 / 3 = 1/6; bottom row: (1/3) / 3 = 1/9 each
    expected1 = torch.zeros(3, 3)
    expected1[0, 0], expected1[0, 1] = 0.5, 1 / 6
    expected1[2, :] = 1 / 9
    torch.testing.assert_close(priors[1], expected1)
    torch.testing.assert_close(priors.flatten(1).sum(1), torch.ones(3))
    # the withheld sample's placeholder does not matter
    other = masks.clone()
    other[2] = torch.rand(3, 3, generator=_generator(20))
    torch.testing.assert_close(losses.class_mean_masks(other, labels, has_mask, 3), priors)


def test_class_mean_masks_without_any_mask_are_uniform() -> None:
    masks = torch.rand(2, 3, 4, generator=_generator(21))
    priors = losses.class_mean_masks(masks, torch.tensor([0, 1]), torch.zeros(2, dtype=torch.bool), num_classes=3)
    torch.testing.assert_close(priors, torch.full((3, 3, 4), 1 / 12))


# -- RRR with real input gradients on an oracle model --------------------------------------------
class WindowReader(ExplainableClassifier):
    """An oracle: its prediction reads only the pixels in rows/columns 4..8 of a 16 px image."""

    WINDOW = (slice(4, 8), slice(4, 8))

    def __init__(self) -> None:
        super().__init__()
        self.feature_dim = 4
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(images[:, :, self.WINDOW[0], self.WINDOW[1]]))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.mean(dim=(2, 3)))


def test_rrr_of_an_oracle_is_zero_with_the_right_mask_only() -> None:
    torch.manual_seed(0)
    model = WindowReader()
    images = torch.rand(3, 3, 16, 16, generator=_generator(22)) * 2 - 1
    grads = input_gradients(model, images)
    window = torch.zeros(3, 16, 16)
    window[:, 4:8, 4:8] = 1.0
    assert torch.count_nonzero(grads[:, :, 4:8, 4:8]) > 0  # the model does read the window
    assert losses.rrr_attention(grads, window).abs().max().item() == 0.0
    elsewhere = torch.zeros(3, 16, 16)
    elsewhere[:, 8:, 8:] = 1.0  # the right reasons are somewhere else
    assert (losses.rrr_attention(grads, elsewhere) > 1e-6).all()
    # a larger mask that contains the window is also "right"
    bigger = torch.zeros(3, 16, 16)
    bigger[:, 2:10, 3:12] = 1.0
    assert losses.rrr_attention(grads, bigger).abs().max().item() == 0.0
