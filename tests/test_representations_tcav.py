"""TCAV: concept directions, TCAV scores against a planted oracle, and the CLIP-level pass.

The oracle: when the class score's gradient is (up to noise) a known direction u, a CAV equal to
u must score ~1 and random directions ~0.5 on average; a concept whose activations are shifted
along u must give CAVs near u, scores near 1 and a significant t-test against random CAVs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

import mmelkit
from mmelkit.methods.embedding.tcav import (
    TcavResult,
    class_score_gradients,
    concept_direction,
    tcav,
    tcav_from_gradients,
    tcav_score,
)

WIDTH = 32


def unit(seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(WIDTH, generator=torch.Generator().manual_seed(seed)), dim=0)


def gradients_along(direction: torch.Tensor, count: int = 400, noise: float = 0.3, seed: int = 1) -> torch.Tensor:
    """Per-input gradients: the direction plus isotropic noise (large next to a random direction's
    overlap with it, small next to the direction itself)."""
    generator = torch.Generator().manual_seed(seed)
    return direction + noise * torch.randn(count, WIDTH, generator=generator)


# -- tensor level ---------------------------------------------------------------------------------------


def test_planted_direction_scores_one_random_directions_half() -> None:
    u = unit(0)
    gradients = gradients_along(u)
    assert tcav_score(gradients, u).item() > 0.99
    assert tcav_score(gradients, -u).item() < 0.01
    randoms = F.normalize(torch.randn(200, WIDTH, generator=torch.Generator().manual_seed(2)), dim=1)
    scores = tcav_score(gradients, randoms)
    assert scores.shape == (200,)
    assert scores.mean().item() == pytest.approx(0.5, abs=0.05)
    # Exact: the share of positive dot products, zero not counted as positive.
    exact = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert tcav_score(exact, torch.tensor([1.0, 0.0])).item() == pytest.approx(1 / 3)


def test_concept_direction_recovers_the_shift() -> None:
    u = unit(0)
    generator = torch.Generator().manual_seed(3)
    random_acts = torch.randn(300, WIDTH, generator=generator)
    concept_acts = torch.randn(150, WIDTH, generator=generator) + 2.0 * u
    cav = concept_direction(concept_acts, random_acts)
    assert cav.shape == (WIDTH,) and cav.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.dot(cav, u).item() > 0.9  # sampling noise of 450 images in 32 dimensions: ~0.95
    # Scale of the activations does not matter (relative ridge); fewer images than dimensions
    # (the dual solve) still points the right way.
    assert torch.allclose(concept_direction(10 * concept_acts, 10 * random_acts), cav, atol=1e-5)
    dual = concept_direction(concept_acts[:8], random_acts[:8])
    assert torch.dot(dual, concept_acts[:8].mean(0) - random_acts[:8].mean(0)).item() > 0


def test_tcav_from_planted_gradients_is_significant() -> None:
    u = unit(0)
    generator = torch.Generator().manual_seed(4)
    random_acts = torch.randn(400, WIDTH, generator=generator)
    concept_acts = torch.randn(200, WIDTH, generator=generator) + 2.0 * u
    result = tcav_from_gradients(gradients_along(u), concept_acts, random_acts, concept="u", runs=10)
    assert isinstance(result, TcavResult)
    assert result.scores.shape == (10,) and result.random_scores.shape == (10,)
    assert result.mean > 0.95
    assert abs(result.random_mean - 0.5) < 0.2
    assert result.p_value < 1e-4 and result.significant
    frame = result.to_frame()
    assert len(frame) == 20 and set(frame["kind"]) == {"concept", "random"}
    # Bonferroni over a huge number of tests takes significance away.
    strict = tcav_from_gradients(gradients_along(u), concept_acts, random_acts, runs=10, num_tests=10**9)
    assert strict.p_value == result.p_value and not strict.significant


def test_tcav_without_any_spread_is_not_significant() -> None:
    generator = torch.Generator().manual_seed(5)
    result = tcav_from_gradients(torch.zeros(20, WIDTH), torch.randn(10, WIDTH, generator=generator),
                                 torch.randn(10, WIDTH, generator=generator), runs=3)
    assert result.mean == 0.0 and result.random_mean == 0.0
    assert result.p_value == 1.0 and not result.significant


def test_tensor_level_bad_inputs_name_their_cause() -> None:
    acts = torch.randn(10, WIDTH)
    with pytest.raises(ValueError, match="concept 'red' has no positive images"):
        concept_direction(acts[:0], acts, concept="red")
    with pytest.raises(ValueError, match="concept 'red' has no positive images"):
        tcav_from_gradients(torch.randn(5, WIDTH), acts[:0], acts, concept="red")
    with pytest.raises(ValueError, match="no random"):
        concept_direction(acts, acts[:0])
    with pytest.raises(ValueError, match="at least 2 random images"):
        tcav_from_gradients(torch.randn(5, WIDTH), acts, acts[:1])
    with pytest.raises(ValueError, match="runs >= 2"):
        tcav_from_gradients(torch.randn(5, WIDTH), acts, acts, runs=1)
    with pytest.raises(ValueError, match="identical"):
        concept_direction(torch.ones(3, WIDTH), torch.ones(3, WIDTH))


# -- model level ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant", ["open_clip-lnd", "hf-eager"])
@pytest.mark.parametrize("layer", [0, -1])
def test_class_score_gradient_matches_finite_differences(variant: str, layer: int) -> None:
    model = mmelkit.load_model(make_model(variant), device="cpu", dtype=torch.float64)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    gradients = class_score_gradients(model, images, "a red circle", layer, batch_size=2)
    assert gradients.shape == (3, 32)  # both tiny towers are 32 wide
    direction = torch.randn(gradients.shape[1], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    block = model.backend.image_tower().blocks[layer]
    batch_first = model.backend.image_tower().batch_first
    text = model.encode_text("a red circle")

    def scores_with_cls_shift(step: float) -> torch.Tensor:
        def shift(module: torch.nn.Module, args: object, output: object) -> object:
            tokens = output[0] if isinstance(output, tuple) else output
            tokens = tokens.clone()
            if batch_first:
                tokens[:, 0] += step * direction
            else:
                tokens[0] += step * direction
            return (tokens, *output[1:]) if isinstance(output, tuple) else tokens

        handle = block.register_forward_hook(shift)
        try:
            with torch.no_grad():
                return (model.encode_image(images) * text).sum(dim=-1)
        finally:
            handle.remove()

    # Hugging Face's attention takes its softmax in float32 even in a float64 model, so the step
    # must be large enough for float32 rounding to vanish next to it.
    step = 1e-3
    numeric = (scores_with_cls_shift(step) - scores_with_cls_shift(-step)) / (2 * step)
    assert torch.allclose(gradients @ direction, numeric, rtol=1e-3, atol=1e-6)


def _hook_state(model: mmelkit.ClipAdapter) -> list[tuple[int, int, bool, bool]]:
    tower = model.backend.image_tower()
    pairs = zip(tower.blocks, tower.attentions, strict=True)
    return [(len(block._forward_hooks), len(block._forward_pre_hooks), "forward" in attention.__dict__,
             hasattr(block, "_mmelkit_traced")) for block, attention in pairs]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant", ["open_clip-default", "hf-sdpa"])
def test_tcav_on_tiny_model_is_batch_size_invariant(variant: str) -> None:
    model = mmelkit.load_model(make_model(variant), device="cpu")
    generator = torch.Generator().manual_seed(8)
    images = torch.rand(16, 3, 32, 32, generator=generator)
    args = (model, images[:5], "a red circle", images[5:9], images[9:], -1)
    small = tcav(*args, concept="red", runs=3, batch_size=2)
    large = tcav(*args, concept="red", runs=3, batch_size=5)
    assert small.concept == "red" and small.layer == model.num_image_blocks - 1
    assert small.scores.shape == (3,) and 0 <= small.mean <= 1 and 0 <= small.p_value <= 1
    assert torch.allclose(small.derivatives, large.derivatives, rtol=1e-4, atol=1e-7)
    assert torch.equal(small.scores, large.scores) and torch.equal(small.random_scores, large.random_scores)
    # The same seed gives the same random splits; another seed other ones.
    again = tcav(*args, concept="red", runs=3, batch_size=5, seed=0)
    assert torch.equal(again.cavs, large.cavs)
    assert not torch.equal(tcav(*args, concept="red", runs=3, seed=1).cavs, large.cavs)


@pytest.mark.usefixtures("one_thread")
def test_tcav_leaves_no_hooks_after_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    before = _hook_state(model)
    encode_image = model.encode_image
    traced_calls = []

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        # Fail only inside the gradient trace (the activation passes before it run untraced).
        if model._traces:
            traced_calls.append(_hook_state(model))
            raise RuntimeError("boom inside the trace")
        return encode_image(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(model, "encode_image", broken)
        with pytest.raises(RuntimeError, match="boom inside the trace"):
            tcav(model, images[:3], "a red circle", images[3:5], images[5:], 0, runs=2)
    assert traced_calls and traced_calls[0] != before  # the trace was in place when it failed
    assert _hook_state(model) == before and not model._traces
    assert tcav(model, images[:3], "a red circle", images[3:5], images[5:], 0, runs=2).scores.shape == (2,)


def test_tcav_bad_inputs_name_their_cause() -> None:
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    images = torch.rand(6, 3, 32, 32)
    with pytest.raises(ValueError, match="concept 'red' has no positive images"):
        tcav(model, images[:2], "a red circle", [], images[2:], 0, concept="red")
    with pytest.raises(ValueError, match="concept 'red' has no positive images"):
        tcav(model, images[:2], "a red circle", images[:0], images[2:], 0, concept="red")
    with pytest.raises(IndexError, match="2 blocks; index 5 is out of range"):
        tcav(model, images[:2], "a red circle", images[2:4], images[2:], 5, concept="red")
    with pytest.raises(ValueError, match="at least 2 random images"):
        tcav(model, images[:2], "a red circle", images[2:4], images[5:], 0)
    with pytest.raises(ValueError, match="class_text"):
        class_score_gradients(model, images, "", 0)
