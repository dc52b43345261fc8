"""Concept bottleneck (Label-free CBM, simplified): the proximal solver on planted problems with known
answers, the bottleneck's additive logits, batching, files, and the user's model left alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_open_clip

import mmelkit
from mmelkit.methods.architecture import ConceptBottleneck, concept_bottleneck, fit_sparse_linear
from mmelkit.methods.base import TOOLS

pytestmark = pytest.mark.usefixtures("one_thread")

CONCEPTS = ["a red object", "a blue object", "a circle", "a square", "a small object"]
CLASSES = ["circle", "square", "star"]


def planted(count: int = 300, width: int = 8, column: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian concept matrix; the label is the tercile of one column (a function of it alone)."""
    x = torch.randn(count, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    labels = torch.bucketize(x[:, column].contiguous(), torch.tensor([-0.43, 0.43], dtype=torch.float64))
    return x, labels


def smallest_subgradient(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lam: float,
                         alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The elastic-net optimality conditions, with the gradient from autograd (not the solver's)."""
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ w.T + b, labels) + lam * (1 - alpha) / 2 * (w**2).sum()
    grad_w, grad_b = torch.autograd.grad(loss, (w, b))
    on = weight != 0
    stationary = (grad_w + lam * alpha * weight.sign())[on]  # must be ~0
    slack = grad_w.abs()[~on] - lam * alpha  # must be <= ~0
    return stationary, slack, grad_b


# -- the solver -------------------------------------------------------------------------------------------------
def test_planted_concept_carries_all_the_weight() -> None:
    x, labels = planted()
    fit = fit_sparse_linear(x, labels, lam=0.1, alpha=1.0, tol=1e-9)
    assert fit.converged
    others = torch.cat([fit.weight[:, :3], fit.weight[:, 4:]], dim=1)
    assert (others == 0).all(), "soft-thresholding must zero the columns the labels do not depend on"
    assert fit.weight[0, 3] < 0 < fit.weight[2, 3]  # low tercile: negative weight, high: positive
    accuracy = ((x @ fit.weight.T + fit.bias).argmax(dim=1) == labels).double().mean()
    assert accuracy > 0.9  # the penalty shrinks the weights, so the class borders blur a little


def test_no_penalty_separates_separable_data() -> None:
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = (x[:, 0] + x[:, 1] > 0).long()
    with pytest.warns(RuntimeWarning, match="no optimum exists"):  # the weights grow without bound
        fit = fit_sparse_linear(x, labels, lam=0.0, max_iter=1000)
    assert ((x @ fit.weight.T + fit.bias).argmax(dim=1) == labels).all()


@pytest.mark.parametrize(("lam", "alpha"), [(0.05, 0.5), (0.02, 0.99), (0.03, 0.0)])
def test_solution_meets_the_elastic_net_optimality_conditions(lam: float, alpha: float) -> None:
    x, labels = planted(seed=2)
    x = x + 0.5 * x[:, 3:4] * torch.linspace(-1, 1, 8, dtype=torch.float64)  # correlated columns: a real L1 choice
    fit = fit_sparse_linear(x, labels, lam=lam, alpha=alpha, tol=1e-9, max_iter=20000)
    assert fit.converged and fit.residual <= 1e-9
    stationary, slack, grad_b = smallest_subgradient(x, labels, fit.weight, fit.bias, lam, alpha)
    assert stationary.numel() > 0
    assert stationary.abs().max() < 1e-7
    assert grad_b.abs().max() < 1e-7
    if alpha > 0:
        assert slack.numel() > 0, "this penalty should leave some weights at exactly zero"
        assert slack.max() <= 1e-7
    else:
        assert slack.numel() == 0  # pure ridge: nothing is thresholded


def test_the_bias_is_not_thresholded() -> None:
    """A penalty large enough to zero every weight leaves the bias at the class log-frequencies."""
    x, labels = planted(seed=3)
    labels = torch.where(torch.arange(len(labels)) % 5 == 0, 2, labels)  # unequal class shares
    fit = fit_sparse_linear(x, labels, lam=50.0, alpha=1.0, tol=1e-10)
    assert (fit.weight == 0).all()
    shares = torch.bincount(labels).double() / len(labels)
    torch.testing.assert_close(torch.softmax(fit.bias, dim=0), shares, atol=1e-8, rtol=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"labels": torch.zeros(5, dtype=torch.long)}, r"one class per image \(300\); got 5"),
    ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
    ({"lam": -1.0}, r"lam must be a finite number >= 0"),
    ({"num_classes": 4}, r"class 3 has no examples"),
    ({"labels": torch.zeros(300)}, r"integer class indices"),
])
def test_solver_refuses_bad_inputs(kwargs: dict, message: str) -> None:
    x, labels = planted()
    args = {"labels": labels, **kwargs}
    with pytest.raises(ValueError, match=message):
        fit_sparse_linear(x, **args)


# -- the bottleneck over a model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip() -> mmelkit.ClipAdapter:
    return mmelkit.load_model(make_open_clip(), device="cpu")


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    images[:4, 0] += 0.6  # three groups with some colour difference, so there is something to fit
    images[4:8, 2] += 0.6
    return images.clamp(0, 1), torch.tensor([0] * 4 + [1] * 4 + [2] * 4)


@pytest.fixture(scope="module")
def fitted(clip: mmelkit.ClipAdapter, data: tuple[torch.Tensor, torch.Tensor]) -> ConceptBottleneck:
    images, labels = data
    return concept_bottleneck(clip, images, labels, CONCEPTS, CLASSES, lam=0.02, tol=1e-8, batch_size=5)


def test_logits_are_the_sum_of_contributions_plus_bias(clip, data, fitted) -> None:
    images, labels = data
    parts = fitted.contributions(clip, images)
    assert parts.shape == (12, 3, 5)
    logits = fitted.logits(clip, images)
    torch.testing.assert_close(parts.sum(dim=2) + fitted.bias, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(fitted.predict(clip, images), logits.argmax(dim=1))
    # the concept layer is the plain cosine, standardised (slow reference: the adapter's own score)
    z = fitted.concept_activations(clip, images)
    torch.testing.assert_close(z * fitted.std + fitted.mean, clip.score(images, CONCEPTS).float(), atol=1e-5, rtol=0)
    assert fitted.accuracy(clip, images, labels) == (logits.argmax(dim=1) == labels).float().mean().item()
    assert 0 < fitted.sparsity < 1 and len(fitted.to_frame()) == int((fitted.weight != 0).sum())


def test_explain_names_the_largest_contributions_to_the_predicted_class(clip, data, fitted) -> None:
    images, _ = data
    parts, predicted = fitted.contributions(clip, images), fitted.predict(clip, images)
    for rationale in fitted.explain(clip, images, top=2):
        c = int(predicted[rationale.image])
        assert rationale.predicted == CLASSES[c]
        kept = [k for k in range(len(CONCEPTS)) if fitted.weight[c, k] != 0]
        best = sorted(kept, key=lambda k: -float(parts[rationale.image, c, k]))[:2]
        assert [name for name, _ in rationale.concepts] == [CONCEPTS[k] for k in best]
        for name, value in rationale.concepts:
            assert math.isclose(value, float(parts[rationale.image, c, CONCEPTS.index(name)]), abs_tol=1e-6)


def test_batch_size_does_not_change_the_fit(clip, data, fitted) -> None:
    images, labels = data
    whole = concept_bottleneck(clip, images, labels, CONCEPTS, CLASSES, lam=0.02, tol=1e-8, batch_size=64)
    torch.testing.assert_close(whole.weight, fitted.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(whole.concept_activations(clip, images), fitted.concept_activations(clip, images),
                               atol=1e-5, rtol=1e-5)
    one_by_one = torch.cat([fitted.logits(clip, images[i : i + 1]) for i in range(len(images))])
    # float32 cosines divided by a small std (~0.01): agreement to ~1e-4 is what the precision allows
    torch.testing.assert_close(one_by_one, fitted.logits(clip, images), atol=1e-4, rtol=1e-4)


def test_the_users_model_is_unchanged(data) -> None:
    model = make_open_clip()
    model.train()
    model.visual.proj.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    images, labels = data
    with pytest.warns(UserWarning, match="training mode"):  # mmelkit says so, and leaves the mode alone
        concept_bottleneck(mmelkit.load_model(model, device="cpu"), images, labels, CONCEPTS, CLASSES)
    assert model.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


def test_save_and_load_round_trip(clip, data, fitted, tmp_path) -> None:
    images, _ = data
    path = fitted.save(tmp_path / "cbm.json")
    loaded = ConceptBottleneck.load(path, concepts=CONCEPTS, classes=CLASSES)
    assert torch.equal(loaded.weight, fitted.weight) and torch.equal(loaded.mean, fitted.mean)
    assert torch.equal(loaded.logits(clip, images), fitted.logits(clip, images))
    with pytest.raises(ValueError, match=r"fitted for other concepts .*'a green object'.*refit"):
        ConceptBottleneck.load(path, concepts=[*CONCEPTS[:-1], "a green object"])
    with pytest.raises(ValueError, match=r"fitted for other classes .*another order"):
        ConceptBottleneck.load(path, classes=list(reversed(CLASSES)))
    (tmp_path / "other.json").write_text(json.dumps({"theta": [0.0]}))
    with pytest.raises(ValueError, match="not a concept-bottleneck file"):
        ConceptBottleneck.load(tmp_path / "other.json")


def test_registered_in_its_place() -> None:
    tool = TOOLS["concept_bottleneck"]
    assert (tool.level, tool.granularity) == ("model", "architecture")
    assert tool.function is concept_bottleneck
