"""CLIP-Dissect neuron labels, the AUROC behind their ground truth, and the label-match rate.

Planted data first (a synthetic layer whose neurons each copy one concept's presence, and a
similarity matrix that sees the concepts through noise), then the model-level pass on tiny models,
then bad input.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_model

import mmelkit
from mmelkit.methods.neuron.clip_dissect import (
    NeuronLabels,
    clip_dissect,
    cos_cubed,
    label_match_rate,
    label_neurons,
    soft_wpmi,
    true_neuron_concepts,
)
from mmelkit.metrics.concepts import auroc

NAMES = [f"concept {i}" for i in range(8)]


def planted(neurons: int = 24, images: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """Presence (N, C) of 8 concepts; neuron k = presence of concept k % 8 plus noise; similarity =
    a cosine-like level plus a small bump where the concept is present, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    presence = torch.rand(images, len(NAMES), generator=generator) < 0.3
    assigned = torch.arange(neurons) % len(NAMES)
    activations = presence[:, assigned].float() + 0.3 * torch.randn(images, neurons, generator=generator)
    similarity = 0.2 + 0.1 * presence.float() + 0.03 * torch.randn(images, len(NAMES), generator=generator)
    return activations, similarity, presence, assigned


def slow_auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    pos, neg = scores[positive].tolist(), scores[~positive].tolist()
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


# -- AUROC ----------------------------------------------------------------------------------------------


def test_auroc_matches_pairwise_reference_with_ties() -> None:
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (30, 5), generator=generator).float()  # few values: many ties
    scores[:, 4] = 1.0  # a constant unit
    positives = torch.rand(30, 3, generator=generator) < 0.4
    table = auroc(scores, positives)
    assert table.shape == (5, 3) and table.dtype == torch.float64
    for k, c in itertools.product(range(5), range(3)):
        assert table[k, c].item() == pytest.approx(slow_auroc(scores[:, k], positives[:, c]), abs=1e-12)
    assert torch.all(table[4] == 0.5)


def test_auroc_perfect_reversed_and_undefined_columns() -> None:
    positive = torch.tensor([True, True, False, False, False])
    scores = torch.tensor([[5.0, -5.0], [4.0, -4.0], [1.0, -1.0], [2.0, -2.0], [0.0, 0.0]])
    presence = torch.stack([positive, torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)], dim=1)
    table = auroc(scores, presence)
    assert table[0, 0] == 1.0 and table[1, 0] == 0.0
    assert torch.isnan(table[:, 1:]).all()
    with pytest.raises(ValueError, match="no positive or no negative"):
        auroc(scores, presence, strict=True)
    with pytest.raises(TypeError, match="bool"):
        auroc(scores, presence.float())
    with pytest.raises(ValueError, match="non-finite"):
        auroc(torch.tensor([[float("nan")], [1.0]]), torch.tensor([[True], [False]]))


# -- planted neurons ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["soft_wpmi", "cos3"])
def test_planted_neurons_get_their_concepts(method: str) -> None:
    activations, similarity, _, assigned = planted()
    labels = label_neurons(activations, similarity, NAMES, method)
    assert isinstance(labels, NeuronLabels) and labels.method == method
    assert labels.scores.shape == (24, 8)
    assert torch.equal(labels.label_index, assigned)
    assert labels.labels == [NAMES[i] for i in assigned.tolist()]
    frame = labels.to_frame()
    assert list(frame["label"]) == labels.labels and (frame["margin"] > 0).all()


def test_soft_wpmi_and_cos3_basic_properties() -> None:
    activations, similarity, _, _ = planted(neurons=8, images=120)
    cos3 = cos_cubed(activations, similarity)
    assert cos3.abs().max() <= 1 + 1e-12
    constant = torch.ones(120, 1)
    assert torch.all(cos_cubed(constant, similarity) == 0)
    # Scaling the activations changes neither measure (soft-WPMI uses only their order).
    assert torch.allclose(soft_wpmi(3 * activations + 1, similarity, top_k=20),
                          soft_wpmi(activations, similarity, top_k=20))
    assert torch.allclose(cos_cubed(3 * activations + 1, similarity), cos3)
    # lam = 0 is plain log p(c | neuron): a log-probability sum, never positive.
    assert (soft_wpmi(activations, similarity, top_k=20, lam=0.0) <= 0).all()


def test_true_concepts_and_degenerate_cases() -> None:
    activations, _, presence, assigned = planted()
    truth = true_neuron_concepts(activations, presence)
    assert torch.equal(truth, assigned)
    # A constant neuron and a neuron of pure noise respond to nothing clearly.
    extra = torch.cat([activations, torch.zeros(400, 1), torch.randn(400, 1, generator=torch.Generator().manual_seed(5))],
                      dim=1)
    truth = true_neuron_concepts(extra, presence)
    assert truth[-2:].tolist() == [-1, -1]
    # A concept every image holds has no AUROC and is never anyone's concept.
    everywhere = torch.cat([torch.ones(400, 1, dtype=torch.bool), presence], dim=1)
    assert torch.equal(true_neuron_concepts(activations, everywhere), assigned + 1)


def test_match_rate_perfect_and_shuffled() -> None:
    activations, similarity, presence, assigned = planted(neurons=200)
    labels = label_neurons(activations, similarity, NAMES, "cos3")
    truth = true_neuron_concepts(activations, presence)
    perfect = label_match_rate(labels, truth)
    assert perfect.rate == 1.0 and perfect.ci == (1.0, 1.0) and perfect.kept == 200
    assert perfect.baseline == pytest.approx(1 / 8) and perfect.uniform_baseline == pytest.approx(1 / 8)
    assert perfect.p_value < 0.01
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    shuffled = NeuronLabels([labels.labels[i] for i in order.tolist()], labels.label_index[order], labels.scores[order],
                            labels.method, labels.concepts)
    chance = label_match_rate(shuffled, truth)
    assert abs(chance.rate - chance.baseline) < 0.08
    assert chance.baseline_ci[0] <= chance.rate <= chance.baseline_ci[1]
    assert chance.ci[0] < chance.baseline < chance.ci[1]
    assert chance.p_value > 0.05
    row = chance.to_frame()
    assert row.loc[0, "kept"] == 200 and row.loc[0, "method"] == "cos3"


def test_match_rate_keeps_only_clear_neurons_and_maps_names() -> None:
    activations, similarity, presence, _ = planted()
    labels = label_neurons(activations, similarity, NAMES, "soft_wpmi")
    truth = true_neuron_concepts(activations, presence)
    truth[:4] = -1
    rate = label_match_rate(labels, truth)
    assert rate.kept == 20 and rate.total == 24 and rate.rate == 1.0
    assert not rate.matched[:4].any() and rate.matched[4:].all()
    # Truth given over a different concept list: matched by name; a label outside it never matches.
    reordered = list(reversed(NAMES))[:-1]  # drops "concept 0"
    where = torch.tensor([reordered.index(NAMES[i]) if NAMES[i] in reordered else -1 for i in range(8)])
    truth_by_name = torch.where(truth >= 0, where[truth.clamp_min(0)], truth)
    renamed = label_match_rate(labels, truth_by_name, reordered)
    assert renamed.kept == int((truth_by_name >= 0).sum()) and renamed.rate == 1.0


# -- model level ----------------------------------------------------------------------------------------


def _hidden_width(model: mmelkit.ClipAdapter, layer: int) -> int:
    block = model.backend.image_tower().blocks[layer]
    projection = getattr(block.mlp, "c_proj", None) or block.mlp.fc2
    return projection.in_features


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant", ["open_clip-default", "hf-eager"])
def test_clip_dissect_labels_every_mlp_neuron_batch_size_invariant(variant: str) -> None:
    model = mmelkit.load_model(make_model(variant), device="cpu")
    images = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    concepts = ["a red object", "a circle", "two objects", "a small object"]
    for method in ("soft_wpmi", "cos3"):
        small = clip_dissect(model, images, -1, concepts, method=method, batch_size=2, progress=False)
        large = clip_dissect(model, images, -1, concepts, method=method, batch_size=5, progress=False)
        assert len(small) == _hidden_width(model, -1) and small.layer == model.num_image_blocks - 1
        assert set(small.labels) <= set(concepts) and small.scores.shape == (len(small), 4)
        assert torch.allclose(small.scores, large.scores, atol=1e-5)
        assert small.labels == large.labels
    default_pool = clip_dissect(model, images, 0, progress=False)  # the scene world's concepts by default
    assert len(default_pool.concepts) == 20 and default_pool.layer == 0


@pytest.mark.usefixtures("one_thread")
def test_clip_dissect_on_scene_images() -> None:
    from mmelkit.datasets.concepts import scene_concepts
    from mmelkit.datasets.scenes import SceneConfig, SceneWorld

    world = SceneWorld(SceneConfig().scaled(32), seed=7)
    scenes = [world[i] for i in range(12)]
    table = scene_concepts(scenes)
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    labels = clip_dissect(model, [s.image for s in scenes], 1, table.texts, method="cos3", progress=False)
    assert labels.concepts == table.texts and len(labels) == _hidden_width(model, 1)


# -- bad input ------------------------------------------------------------------------------------------


def test_bad_inputs_name_their_cause() -> None:
    activations, similarity, presence, _ = planted(neurons=4, images=30)
    with pytest.raises(ValueError, match="empty concept pool"):
        label_neurons(activations, similarity[:, :0], [], "cos3")
    with pytest.raises(ValueError, match="empty concept pool"):
        soft_wpmi(activations, similarity[:, :0], top_k=5)
    with pytest.raises(ValueError, match="8 concept columns but 2"):
        label_neurons(activations, similarity, NAMES[:2])
    with pytest.raises(ValueError, match="unknown labelling method"):
        label_neurons(activations, similarity, NAMES, "wpmi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k=31 exceeds the 30 probe images"):
        soft_wpmi(activations, similarity, top_k=31)
    with pytest.raises(ValueError, match="same N"):
        cos_cubed(activations, similarity[:10])
    with pytest.raises(ValueError, match="empty concept pool"):
        true_neuron_concepts(activations, presence[:, :0])
    labels = label_neurons(activations, similarity, NAMES, "cos3")
    with pytest.raises(ValueError, match="no neuron responds clearly"):
        label_match_rate(labels, torch.full((4,), -1))
    with pytest.raises(ValueError, match="4 labelled neurons"):
        label_match_rate(labels, torch.zeros(3, dtype=torch.long))


def test_model_level_bad_inputs() -> None:
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    images = torch.rand(4, 3, 32, 32)
    with pytest.raises(ValueError, match="empty concept pool"):
        clip_dissect(model, images, 0, [], progress=False)
    with pytest.raises(IndexError, match="2 blocks; index 2 is out of range"):
        clip_dissect(model, images, 2, ["a circle"], progress=False)
    with pytest.raises(IndexError, match="out of range"):
        clip_dissect(model, images, -3, ["a circle"], progress=False)
