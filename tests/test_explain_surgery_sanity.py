"""CLIP Surgery against a per-example loop reference, and the model-randomisation sanity check."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import TEXTS, make_model

import mmelkit
from mmelkit.methods.architecture import CLIPSurgery
from mmelkit.methods.architecture.clip_surgery import DEFAULT_BACKGROUND_TEXTS
from mmelkit.methods.base import REGISTRY, Explanation, Method, pair_inputs, register
from mmelkit.methods.sanity import (
    copy_adapter,
    image_tower_components,
    randomisation_check,
    reinitialise,
    spearman,
    summarise_randomisation,
)
from mmelkit.viz.sanity import randomisation_figure

# -------------------------------------------------------------------------------------------------
# CLIP Surgery
# -------------------------------------------------------------------------------------------------


def _surgery_reference(model: mmelkit.ClipAdapter, pixels: torch.Tensor, text: str, layers: int,
                       redundant_texts: list[str]) -> torch.Tensor:
    """One image, explicit loops over blocks, heads, query and key tokens, written from the docstring."""
    attentions = model.backend.image_tower().attentions
    blocks = list(range(-layers, 0))
    with torch.no_grad(), model.trace(image_blocks=blocks, attention_probs=False) as trace:
        model.encode_image(pixels[None])
    records = [trace.image[b] for b in blocks]
    stream = records[0].tokens_in[0].clone()  # (L, D)
    length = stream.shape[0]
    with torch.no_grad():
        for record in records:
            attention = attentions[record.index]
            heads, d = record.num_heads, record.head_dim
            per_head = []
            for h in range(heads):
                v = record.v[0, h]
                out = torch.zeros(length, d)
                for i in range(length):
                    logits = torch.stack([torch.dot(v[i], v[j]) / math.sqrt(d) for j in range(length)])
                    weights = torch.softmax(logits, dim=0)
                    out[i] = sum(weights[j] * v[j] for j in range(length))
                if getattr(attention, "head_scale", None) is not None:
                    out = out * attention.head_scale[h]
                per_head.append(out)
            merged = torch.cat(per_head, dim=-1)  # (L, D): heads concatenated
            if getattr(attention, "ln_inner", None) is not None:
                merged = attention.ln_inner(merged)
            stream = stream + attention.out_proj(merged)
        target = model.encode_text([text])[0]
        others = [model.encode_text([r])[0] for r in redundant_texts]
        projected = model.project_image_tokens(stream[None])[0]
        values = []
        for i in range(1, length):
            z = projected[i] / projected[i].norm()
            surgery = z * target - sum(z * t_r for t_r in others) / len(others)
            values.append(surgery.sum().clamp_min(0))
    expected = torch.stack(values).reshape(records[0].grid)
    return (expected - expected.min()) / (expected.max() - expected.min()).clamp_min(1e-12)


@pytest.mark.parametrize("layers", [1, 2])
def test_clip_surgery_matches_loop_reference(adapter: mmelkit.ClipAdapter, images: torch.Tensor, layers: int) -> None:
    pixels = adapter.preprocess(images)
    result = CLIPSurgery(adapter, layers=layers).explain(pixels, TEXTS)
    assert result.maps.shape == (3, 4, 4) and result.method == "clip_surgery"
    for n in range(3):
        expected = _surgery_reference(adapter, pixels[n], TEXTS[n], layers, list(DEFAULT_BACKGROUND_TEXTS))
        torch.testing.assert_close(result.maps[n], expected, atol=1e-4, rtol=0)


def test_clip_surgery_redundant_batch_texts_matches_reference(images: torch.Tensor) -> None:
    model = mmelkit.load_model(make_model("open_clip-custom"), device="cpu")
    pixels = model.preprocess(images)
    texts = [TEXTS[0], TEXTS[1], TEXTS[0]]  # a repeated text counts once in the redundant set
    result = CLIPSurgery(model, redundant="texts").explain(pixels, texts)
    for n in range(3):
        expected = _surgery_reference(model, pixels[n], texts[n], 1, [TEXTS[0], TEXTS[1]])
        torch.testing.assert_close(result.maps[n], expected, atol=1e-4, rtol=0)


def test_feature_surgery_with_the_target_as_redundant_set_is_zero(images: torch.Tensor) -> None:
    model = mmelkit.load_model(make_model("hf-eager"), device="cpu")
    result = CLIPSurgery(model, background_texts=[TEXTS[0]]).explain(images, TEXTS[0])
    assert result.maps.shape == (3, 4, 4)
    assert torch.count_nonzero(result.maps) == 0
    with pytest.warns(UserWarning, match="single distinct text"):
        same = CLIPSurgery(model, redundant="texts").explain(images, TEXTS[1])
    assert torch.count_nonzero(same.maps) == 0


def test_clip_surgery_batch_equals_single_and_leaves_the_model_alone(images: torch.Tensor) -> None:
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    pixels = model.preprocess(images)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    features = model.encode_image(pixels)
    method = CLIPSurgery(model, layers=2)
    batch = method.explain(pixels, TEXTS)
    for n in range(3):
        single = method.explain(pixels[n : n + 1], [TEXTS[n]])
        torch.testing.assert_close(batch.maps[n], single.maps[0], atol=1e-5, rtol=0)
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(model.encode_image(pixels), features, atol=0, rtol=0)
    for block in model.backend.image_tower().blocks:
        assert not block._forward_hooks and not block._forward_pre_hooks
    assert all("forward" not in vars(a) for a in model.backend.image_tower().attentions)


def test_clip_surgery_rejects_bad_parameters(images: torch.Tensor) -> None:
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    with pytest.raises(ValueError, match="layers"):
        CLIPSurgery(model, layers=3).explain(images, TEXTS)
    with pytest.raises(ValueError, match="redundant"):
        CLIPSurgery(model, redundant="nope").explain(images, TEXTS)
    assert "clip_surgery" in mmelkit.list_methods().index and "maskclip" in mmelkit.list_methods().index


# -------------------------------------------------------------------------------------------------
# Spearman
# -------------------------------------------------------------------------------------------------


def test_spearman_closed_forms() -> None:
    x = torch.tensor([0.1, 0.5, 0.7, 2.0, 3.0])
    assert spearman(x, x.exp()).item() == pytest.approx(1.0)
    assert spearman(x, -x).item() == pytest.approx(-1.0)
    generator = torch.Generator().manual_seed(0)
    a = torch.stack([torch.randperm(9, generator=generator) for _ in range(6)]).float()
    b = torch.stack([torch.randperm(9, generator=generator) for _ in range(6)]).float()
    n = 9
    closed = 1 - 6 * (a - b).double().square().sum(dim=1) / (n * (n * n - 1))  # no ties
    torch.testing.assert_close(spearman(a, b), closed, atol=1e-12, rtol=0)
    # Ties share their average rank: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3).
    tied = spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])).item()
    assert tied == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    assert math.isnan(spearman(torch.zeros(4), torch.arange(4.0)).item())  # constant map: undefined
    maps = torch.rand(3, 4, 4, generator=generator)
    torch.testing.assert_close(spearman(maps, maps), torch.ones(3, dtype=torch.float64))


# -------------------------------------------------------------------------------------------------
# Randomisation sanity check
# -------------------------------------------------------------------------------------------------


class _FixedMap(Method):
    """Ignores the model: the same map for every pair."""

    name = "test_fixed_map"
    family = "test"
    reference = "a test double"

    def explain(self, images: Any, texts: Any) -> Explanation:
        pixels, tokens = pair_inputs(self.model, images, texts)
        grid = self.model.grid(pixels)
        maps = torch.arange(grid[0] * grid[1], dtype=torch.float32).reshape(1, *grid).expand(len(pixels), -1, -1)
        return Explanation(maps / maps.max(), tuple(pixels.shape[-2:]), self.name)


class _Broken(Method):
    name = "test_broken"
    family = "test"
    reference = "a test double"

    def explain(self, images: Any, texts: Any) -> Explanation:
        raise RuntimeError("this method cannot explain anything")


@pytest.fixture
def test_methods() -> Iterator[None]:
    register(_FixedMap)
    register(_Broken)
    try:
        yield
    finally:
        REGISTRY.pop(_FixedMap.name, None)
        REGISTRY.pop(_Broken.name, None)


@pytest.mark.parametrize("variant", ["open_clip-default", "hf-eager"])
def test_randomisation_check(variant: str, images: torch.Tensor, test_methods: None) -> None:
    model = mmelkit.load_model(make_model(variant), device="cpu")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    table = randomisation_check(model, images, TEXTS, methods=["grad_eclip", "test_fixed_map", "test_broken"])
    # The user's model is untouched, bit for bit.
    after = model.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    steps = model.num_image_blocks + 3  # trained, head, each block, embedding
    assert len(table) == 3 * steps and set(table["step"]) == set(range(steps))
    trained = table[table["step"] == 0].set_index("method")
    assert trained.loc["grad_eclip", "spearman_mean"] == pytest.approx(1.0)
    fixed = table[table["method"] == "test_fixed_map"]
    assert (fixed["spearman_mean"] - 1).abs().max() < 1e-12 and fixed["error"].isna().all()
    broken = table[table["method"] == "test_broken"]
    assert len(broken) == steps and broken["error"].str.contains("cannot explain").all()
    assert table["randomised"].iloc[-1] == "whole image tower"

    summary = summarise_randomisation(table)
    assert summary.loc["test_fixed_map", "verdict"] == "fails"
    assert summary.loc["test_broken", "verdict"] == "error"
    grad_eclip = table[table["method"] == "grad_eclip"].sort_values("step")
    final = grad_eclip["spearman_mean"].iloc[-1]
    assert final < 0.5, "randomising the whole image tower must scramble Grad-ECLIP's maps"
    assert summary.loc["grad_eclip", "verdict"] == "passes"

    figure = randomisation_figure(table)
    assert len(figure.data) == 3 and list(figure.data[0].x)[0] == "trained"


def test_independent_matches_cascading_at_the_first_step(images: torch.Tensor) -> None:
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    cascading = randomisation_check(model, images, TEXTS, methods=["maskclip"], seed=3)
    independent = randomisation_check(model, images, TEXTS, methods=["maskclip"], blocks="independent", seed=3)
    assert list(independent["randomised"]) == ["nothing", "head", "block 1", "block 0", "embedding"]
    # Step 1 randomises the head alone in both modes, with the same seeded draws.
    torch.testing.assert_close(
        torch.tensor(cascading["spearman_mean"].iloc[:2].to_numpy()),
        torch.tensor(independent["spearman_mean"].iloc[:2].to_numpy()), equal_nan=True)
    with pytest.raises(ValueError, match="cascading"):
        summarise_randomisation(independent)


def test_components_cover_the_tower_and_reinit_is_deterministic() -> None:
    model = mmelkit.load_model(make_model("open_clip-custom"), device="cpu")
    components = image_tower_components(model)
    listed = [id(p) for _, group in components for _, p in group]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in model.model.visual.parameters()}

    copy = copy_adapter(model)
    assert copy.backend.visual is copy.model.visual and copy.model is not model.model
    first = image_tower_components(copy)[1][1]  # the last block
    original = [p.detach().clone() for _, p in first]
    reinitialise(first, seed=7)
    drawn = [p.detach().clone() for _, p in first]
    assert any(not torch.equal(a, b) for a, b in zip(original, drawn, strict=True))
    again = copy_adapter(model)
    second = image_tower_components(again)[1][1]
    reinitialise(second, seed=7)
    assert all(torch.equal(a, p) for a, (_, p) in zip(drawn, second, strict=True))
    # The user's model still has its own weights.
    assert all(torch.equal(a, p) for a, (_, p) in zip(original, image_tower_components(model)[1][1], strict=True))
