"""Data-level methods: counterfactual captions and nearest-training-pair attribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_open_clip

import mmelkit
from mmelkit.datasets import SceneConfig, SceneWorld
from mmelkit.methods.data import (
    TrainingBank,
    counterfactual_captions,
    nearest_training_pairs,
    score_counterfactuals,
)


@pytest.fixture(scope="module")
def world() -> SceneWorld:
    return SceneWorld(SceneConfig(image_size=32, min_objects=2, max_objects=3, sizes=(("small", 8), ("large", 12))), seed=5)


def test_counterfactuals_are_false_for_the_scene(world: SceneWorld) -> None:
    scene = next(s for s in (world[i] for i in range(50)) if s.captions_of("relation"))
    caption = scene.captions_of("relation")[0]
    edits = counterfactual_captions(scene, caption, world.config)
    present = {o.name for o in scene.objects}
    kinds = {e.edit for e in edits}
    assert kinds == {"colour", "shape", "relation"}
    for edit in edits:
        assert edit.edited != caption.text and edit.original == caption.text
        if edit.edit != "relation":
            first = edit.edited[2:].split(" left of ")[0].split(" right of ")[0].split(" above ")[0].split(" below ")[0]
            assert first not in present, "an edit must name an object the scene does not have"
    n_colours = sum(e.edit == "colour" for e in edits)
    assert n_colours <= len(world.config.colours) - 1


def test_counterfactual_scores_match_direct_scoring(world: SceneWorld) -> None:
    model = mmelkit.load_model(make_open_clip(seed=2), device="cpu")
    scene = world[3]
    caption = scene.captions_of("object")[0]
    edits = counterfactual_captions(scene, caption, world.config)
    deltas = score_counterfactuals(model, scene, edits)
    direct = model.score(scene.image, [caption.text] + [e.edited for e in edits])[0]
    torch.testing.assert_close(deltas, direct[1:] - direct[0])
    with pytest.raises(ValueError):
        score_counterfactuals(model, scene, [])


def test_nearest_pairs_against_brute_force(world: SceneWorld) -> None:
    model = mmelkit.load_model(make_open_clip(seed=3), device="cpu")
    bank = TrainingBank(model, lambda i: (world[i].image, world[i].captions[0].text), 20, batch=7)
    queries = [world[100].image, world[3].image]
    result = nearest_training_pairs(bank, queries, k=3)
    features = F.normalize(model.encode_image([world[i].image for i in range(20)]), dim=-1)
    query_features = model.encode_image(queries)
    expected = (query_features @ features.T).topk(3, dim=1)
    assert torch.equal(result.indices, expected.indices)
    torch.testing.assert_close(result.similarity, expected.values)
    assert result.indices[1, 0] == 3, "a training image is its own nearest neighbour"
    assert result.captions[1][0] == world[3].captions[0].text
    with pytest.raises(ValueError):
        nearest_training_pairs(bank, queries, k=21)
    with pytest.raises(ValueError):
        TrainingBank(model, lambda i: (np.zeros((8, 8, 3), np.uint8), ""), 0)
