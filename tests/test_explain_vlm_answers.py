"""Answer -> image maps of generative VLMs (SPEC §6, token level) on tiny random LLaVA models:
each method against a slow reference, batch == one by one, IG completeness, target selection,
hooks removed after an exception, and the dispatch of ``mmelkit.explain``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import TEXT, VISION, tiny_llava

import mmelkit
from mmelkit.methods.answers import AnswerTarget, answer_target, target_score
from mmelkit.methods.perturbation.answer_occlusion import occlusion_drops, token_windows
from mmelkit.methods.token.answer_attention import answer_attention_per_layer, layer_range
from mmelkit.methods.token.answer_integrated_gradients import answer_integrated_gradients, visual_baseline
from mmelkit.models.vlm import VlmAdapter, load_vlm
from mmelkit.models.vlm.tracing import attention_implementation

pytestmark = pytest.mark.usefixtures("one_thread")

VLM_METHODS = ["answer_attention", "answer_relevancy", "answer_gradient_x_input", "answer_integrated_gradients",
               "answer_occlusion"]
QUESTIONS = ["what colour is the star ?", "how many circles are there ?", "is there a red circle ?",
             "what is left of the blue cross ?", "describe the image .", "what shape is the red object ?",
             "is there a green square in the image ?", "how many objects are there ?"]
ANSWERS = ["red", "two", "yes", "blue cross", "red circle , blue star", "square", "no", "four"]
FAST = {"answer_integrated_gradients": {"steps": 4}}  # keep the tiny runs quick; IG itself is checked below
# Occlusion's map is a difference of two float32 targets (log-probabilities summed over up to 7
# tokens, |score| ~ 10) whose rounding depends on the GEMM shape, i.e. on the batch: ~3e-6 raw, and
# a row whose drops span only 0.04 turns that into ~7e-5 after min-max normalisation (seen on one CPU).
MAP_ATOL = {"answer_occlusion": 3e-4}
VISION_3 = {**VISION, "layers": 3}  # a vision tower of which two layers feed the visual tokens


@pytest.fixture(scope="module")
def vlm() -> VlmAdapter:
    return load_vlm(tiny_llava(), device="cpu")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(8):
        image = (rng.random((48, 48, 3)) * 80).astype(np.uint8)
        image[4 + 4 * i % 30 : 16 + 4 * i % 30, 6:22] = (220, 40, 40)
        out.append(image)
    return out


def target_of(vlm: VlmAdapter, images: list[Any], rows: slice = slice(None), **kwargs: Any) -> AnswerTarget:
    return answer_target(vlm, images[rows], QUESTIONS[rows], kwargs.pop("answer", ANSWERS[rows]), **kwargs)


# -- every method --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", VLM_METHODS)
def test_maps_are_on_the_grid_and_batch_equals_one_by_one(vlm: VlmAdapter, images: list[Any], method: str) -> None:
    params = FAST.get(method, {})
    batched = mmelkit.explain(vlm, images, QUESTIONS, method=method, answer=ANSWERS, **params)
    assert batched.maps.shape == (8, *vlm.grid) and batched.method == method
    assert torch.isfinite(batched.maps).all() and batched.maps.min() >= 0 and batched.maps.max() <= 1
    assert batched.texts == ANSWERS and batched.params["questions"] == QUESTIONS
    assert batched.upsample().shape == (8, *vlm.image_size)
    for row in (0, 4, 7):  # different answer lengths: padding must change nothing
        single = mmelkit.explain(vlm, images[row], QUESTIONS[row], method=method, answer=ANSWERS[row], **params)
        torch.testing.assert_close(single.maps[0], batched.maps[row], atol=MAP_ATOL.get(method, 2e-5), rtol=1e-4)
    assert len({tuple(m.flatten().tolist()) for m in batched.maps}) > 1  # maps differ between rows


@pytest.mark.parametrize("method", VLM_METHODS)
def test_maps_change_when_the_decoder_is_randomised(images: list[Any], method: str) -> None:
    trained, other = load_vlm(tiny_llava(seed=0), device="cpu"), load_vlm(tiny_llava(seed=0), device="cpu")
    with torch.no_grad():  # cascading randomisation of the decoder (the vision side kept)
        for layer in other.parts.decoder_layers:
            for parameter in layer.parameters():
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    params = FAST.get(method, {})
    a = mmelkit.explain(trained, images[:4], QUESTIONS[:4], method=method, answer=ANSWERS[:4], **params).maps
    b = mmelkit.explain(other, images[:4], QUESTIONS[:4], method=method, answer=ANSWERS[:4], **params).maps
    assert (a - b).abs().mean() > 0.02


# -- references -----------------------------------------------------------------------------------------
def test_answer_attention_equals_hugging_faces_own_attentions(vlm: VlmAdapter, images: list[Any]) -> None:
    target = target_of(vlm, images)
    ours = answer_attention_per_layer(vlm, target)  # (N, layers, V)
    batch = target.batch
    with torch.no_grad():
        embeds = vlm.merge_visual(batch, vlm.parts.language_model.get_input_embeddings()(batch.input_ids),
                                  vlm.visual_features(batch.pixel_values))
        with attention_implementation(vlm.model, "eager"):
            out = vlm.model(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                            output_attentions=True)
    for row in range(len(target)):
        (columns,) = target.weights[row].nonzero(as_tuple=True)
        queries = target.query_positions[row, columns]
        for layer, attention in enumerate(out.attentions):
            expected = attention[row].mean(0)[queries][:, batch.visual_positions[row]].mean(0)
            torch.testing.assert_close(ours[row, layer], expected, atol=1e-6, rtol=1e-5)


def test_layer_ranges(vlm: VlmAdapter) -> None:
    depth = vlm.num_decoder_layers
    assert layer_range(vlm, None) == list(range(depth)) and layer_range(vlm, (0, 1)) == [0]
    assert layer_range(vlm, (-1, depth)) == [depth - 1] and layer_range(vlm, [1]) == [1]
    for bad in ((1, 1), (0, depth + 1), (0,), (0.0, 1)):
        with pytest.raises(ValueError, match="layer range"):
            layer_range(vlm, bad)
    with pytest.raises(ValueError):
        layer_range(vlm, 7)


def _naive_relevancy(vlm: VlmAdapter, target: AnswerTarget) -> torch.Tensor:
    """One forward and one autograd call per layer, and the full L x L products in layer order."""
    depth = vlm.num_decoder_layers
    grads, attentions = [], []
    for layer in range(depth):
        with torch.enable_grad(), vlm.trace(decoder_hidden=False, vision=False, visual_leaf=False) as trace:
            score = target_score(vlm, target)
            attention = trace.decoder[layer].require("attn")
            (grad,) = torch.autograd.grad(score.sum(), attention)
        grads.append(grad)
        attentions.append(attention.detach())
    n, _, length, _ = attentions[0].shape
    maps = []
    for row in range(n):
        relevance = torch.eye(length)
        for attention, grad in zip(attentions, grads, strict=True):
            mixed = (grad[row] * attention[row]).clamp(min=0).mean(0)
            relevance = relevance + mixed @ relevance
        (columns,) = target.weights[row].nonzero(as_tuple=True)
        queries = target.query_positions[row, columns]
        maps.append(relevance[queries][:, target.batch.visual_positions[row]].mean(0))
    return torch.stack(maps)


def test_relevancy_equals_a_naive_per_layer_reference(vlm: VlmAdapter, images: list[Any]) -> None:
    from mmelkit.methods.token.answer_relevancy import AnswerRelevancy

    for token in (None, -1):
        target = target_of(vlm, images, token=token)
        fast = AnswerRelevancy(vlm).visual_values(target)
        torch.testing.assert_close(fast, _naive_relevancy(vlm, target), atol=1e-6, rtol=1e-4)


def test_gradient_x_input_matches_a_directional_derivative(vlm: VlmAdapter, images: list[Any]) -> None:
    from mmelkit.methods.token.answer_gradient_x_input import visual_gradient

    double = load_vlm(tiny_llava(), device="cpu", dtype=torch.float64)
    target = target_of(double, images, slice(0, 3))
    visual = double.visual_features(target.batch.pixel_values)
    grad = visual_gradient(double, target, visual).double()
    direction = torch.randn(visual.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-3  # central differences: O(eps^2) error; smaller eps meets the fp32 parts of HF's forward (RoPE)
    with torch.no_grad():
        up = target_score(double, target, visual + eps * direction)
        down = target_score(double, target, visual - eps * direction)
    assert up.dtype == torch.float64
    torch.testing.assert_close((grad * direction).sum(dim=(1, 2)), (up - down) / (2 * eps), atol=1e-4, rtol=1e-3)


def _ig_gap(vlm: VlmAdapter, target: AnswerTarget, baseline: str) -> torch.Tensor:
    with torch.no_grad():
        visual = vlm.visual_features(target.batch.pixel_values)
        return target_score(vlm, target, visual) - target_score(vlm, target, visual_baseline(visual, baseline))


def test_integrated_gradients_is_complete(vlm: VlmAdapter, images: list[Any]) -> None:
    target = target_of(vlm, images, slice(0, 4))
    attribution = answer_integrated_gradients(vlm, target, steps=64, baseline="mean", batch_size=48)
    gap = _ig_gap(vlm, target, "mean")
    assert (gap.abs() > 1e-2).all()  # a test of completeness needs something to complete
    torch.testing.assert_close(attribution.sum(dim=(1, 2)), gap, rtol=0.01, atol=1e-4)
    # the chunking of interpolation points changes nothing
    other = answer_integrated_gradients(vlm, target, steps=64, baseline="mean", batch_size=7)
    torch.testing.assert_close(other, attribution, atol=1e-6, rtol=1e-4)


def test_a_zero_baseline_is_incomplete_on_a_pre_norm_decoder(vlm: VlmAdapter, images: list[Any]) -> None:
    # what the module docstring says: the score jumps next to e = 0, where no midpoint lands
    target = target_of(vlm, images, slice(0, 4))
    attribution = answer_integrated_gradients(vlm, target, steps=64, baseline="zero", batch_size=64)
    gap = _ig_gap(vlm, target, "zero")
    assert ((attribution.sum(dim=(1, 2)) - gap).abs() > 0.05 * gap.abs()).any()
    with torch.no_grad():  # and the jump is there: a hundredth of the way from zero is far from zero
        visual = vlm.visual_features(target.batch.pixel_values)
        near = target_score(vlm, target, 0.01 * visual) - target_score(vlm, target, torch.zeros_like(visual))
    assert (near.abs() > 0.2 * gap.abs()).any()


def test_occlusion_equals_an_unbatched_loop(vlm: VlmAdapter, images: list[Any]) -> None:
    target = target_of(vlm, images, slice(0, 3))
    windows = token_windows(vlm.grid, 3, 2)
    fast = occlusion_drops(vlm, target, windows, batch_size=5)
    with torch.no_grad():
        visual = vlm.visual_features(target.batch.pixel_values)
        for row in range(3):
            one = target.select(torch.tensor([row]))
            clean = target_score(vlm, one, visual[row : row + 1])
            for w, window in enumerate(windows):
                copy = visual[row : row + 1].clone()
                copy[0, window] = visual[row].mean(0)
                drop = clean - target_score(vlm, one, copy)
                torch.testing.assert_close(fast[row, w], drop[0], atol=1e-5, rtol=1e-4)


def test_token_windows_cover_the_grid() -> None:
    windows = token_windows((6, 6), 4, 3)  # starts 0 and 2: the last edge is covered too
    assert windows.shape == (4, 36) and windows.any(dim=0).all() and (windows.sum(dim=1) == 16).all()
    assert token_windows((5, 7), 1, 1).shape == (35, 35)
    with pytest.raises(ValueError, match="larger than"):
        token_windows((6, 6), 7, 1)
    with pytest.raises(ValueError, match="stride"):
        token_windows((6, 6), 2, 0)


# -- targets ----------------------------------------------------------------------------------------------
def test_the_models_own_answer_is_explained_by_default(vlm: VlmAdapter, images: list[Any]) -> None:
    said = vlm.generate(images[:4], QUESTIONS[:4], max_new_tokens=16).texts
    own = mmelkit.explain(vlm, images[:4], QUESTIONS[:4], method="answer_gradient_x_input")
    given = mmelkit.explain(vlm, images[:4], QUESTIONS[:4], method="answer_gradient_x_input", answer=said)
    assert own.texts == said
    torch.testing.assert_close(own.maps, given.maps)


def test_target_tokens(vlm: VlmAdapter, images: list[Any]) -> None:
    whole = target_of(vlm, images)
    lengths = whole.weights.sum(dim=1)
    assert lengths.tolist() == [len(vlm.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in ANSWERS]
    # the eos is never a target, and the target tokens are the answer's
    positions, mask = whole.batch.require_answers()
    said = whole.batch.input_ids.gather(1, positions)
    assert not ((said == vlm.eos_token_ids[0]) & mask).any()
    first, last = target_of(vlm, images, token=0), target_of(vlm, images, token=-1)
    assert (first.weights.sum(1) == 1).all() and (first.weights[:, 0] == 1).all()
    assert (last.weights.argmax(1) == lengths.long() - 1).all()
    score = target_score(vlm, whole)
    torch.testing.assert_close(score, vlm.answer_logprob(images, QUESTIONS, ANSWERS, eos=False).total)
    # one image with many questions broadcasts
    broadcast = answer_target(vlm, images[0], QUESTIONS[:3], ANSWERS[:3])
    assert len(broadcast) == 3 and broadcast.questions == QUESTIONS[:3]


def test_bad_targets_are_clear_errors(vlm: VlmAdapter, images: list[Any]) -> None:
    with pytest.raises(ValueError, match="outside the answer span"):
        target_of(vlm, images, token=3)  # "red" has one token
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        answer_target(vlm, images[:2], QUESTIONS[:2], ["red", "purplish"])
    with pytest.raises(ValueError, match="token must be"):
        target_of(vlm, images, token=1.0)
    with pytest.raises(ValueError, match="sign"):
        mmelkit.explain(vlm, images[:1], QUESTIONS[:1], method="answer_gradient_x_input", answer="red", sign="both")
    with pytest.raises(ValueError, match="baseline"):
        mmelkit.explain(vlm, images[:1], QUESTIONS[:1], method="answer_integrated_gradients", answer="red",
                        baseline="black")
    with pytest.raises(TypeError, match="no parameter"):
        mmelkit.explain(vlm, images[:1], QUESTIONS[:1], method="answer_relevancy", answer="red", steps=3)


def test_an_empty_answer_has_nothing_to_explain(images: list[Any]) -> None:
    model = tiny_llava()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy picks id 0, the pad token, decoded as ""
    silent = load_vlm(model, device="cpu")
    assert silent.generate(images[:2], QUESTIONS[:2], max_new_tokens=3).texts == ["", ""]
    with pytest.raises(ValueError, match="answered nothing"):
        mmelkit.explain(silent, images[:2], QUESTIONS[:2], method="answer_attention")


# -- hooks, dispatch --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["answer_attention", "answer_relevancy"])
def test_hooks_are_removed_and_attention_restored_after_an_exception(
    vlm: VlmAdapter, images: list[Any], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vlm.model.modules())
    implementation = vlm.model.config.text_config._attn_implementation

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(vlm.parts.lm_head, "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        mmelkit.explain(vlm, images[:2], QUESTIONS[:2], method=method, answer=ANSWERS[:2])
    monkeypatch.undo()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vlm.model.modules()) == before
    assert vlm.model.config.text_config._attn_implementation == implementation
    assert all(p.grad is None for p in vlm.model.parameters())  # no hidden side effects


def test_explain_dispatches_by_model_kind(vlm: VlmAdapter, images: list[Any]) -> None:
    table = mmelkit.list_methods("map")
    assert set(table.index[table["explains"] == "vlm"]) == set(VLM_METHODS)
    assert (table.loc[["grad_eclip", "occlusion"], "explains"] == "clip").all()
    with pytest.raises(ValueError, match="explains CLIP-style models"):
        mmelkit.explain(vlm, images[:1], QUESTIONS[:1], method="grad_eclip")
    default = mmelkit.explain(vlm, images[:2], QUESTIONS[:2], answer=ANSWERS[:2])
    assert default.method == "answer_relevancy"
    clip = mmelkit.load_model("scene-clip", device="cpu")
    with pytest.raises(ValueError, match="explains generative VLMs"):
        mmelkit.explain(clip, images[:1], ["a red square"], method="answer_relevancy")
    with pytest.raises(ValueError, match="apply to generative VLMs"):
        mmelkit.explain(clip, images[:1], ["a red square"], answer="red")


def test_tensors_stay_on_the_model_device_and_dtype(images: list[Any]) -> None:
    double = load_vlm(tiny_llava(), device="cpu", dtype=torch.float64)
    out = mmelkit.explain(double, images[:2], QUESTIONS[:2], method="answer_gradient_x_input", answer=ANSWERS[:2])
    assert out.maps.device == double.device and out.maps.dtype == torch.float32
    assert len(out.maps) == 2 and double.num_decoder_layers == TEXT["layers"]


# -- relevancy chained into the vision tower ------------------------------------------------------------
def _naive_vision_relevancy(vlm: VlmAdapter, target: AnswerTarget) -> torch.Tensor:
    """The decoder's naive relevancy of the visual tokens, then the vision layers' full P x P
    products, one forward and one autograd call per vision layer."""
    from mmelkit.methods.token.answer_relevancy import vision_layers_feeding_the_decoder

    visual = _naive_relevancy(vlm, target)  # (N, V)
    used = vision_layers_feeding_the_decoder(vlm)
    grads, attentions = [], []
    for layer in range(used):
        with torch.enable_grad(), vlm.trace(decoder_hidden=False, vision=[layer], visual_leaf=False) as trace:
            score = target_score(vlm, target)
            attention = trace.vision[layer].require("attn")
            (grad,) = torch.autograd.grad(score.sum(), attention)
        grads.append(grad)
        attentions.append(attention.detach())
    tokens = attentions[0].shape[-1]
    maps = []
    for row in range(len(visual)):
        relevance = torch.eye(tokens)
        for attention, grad in zip(attentions, grads, strict=True):
            relevance = relevance + (grad[row] * attention[row]).clamp(min=0).mean(0) @ relevance
        start = tokens - visual.shape[1]
        maps.append(visual[row] @ relevance[start:, 1:])  # visual tokens' rows, patch columns
    return torch.stack(maps)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_relevancy_through_vision_equals_a_naive_reference(images: list[Any], strategy: str) -> None:
    from mmelkit.methods.token.answer_relevancy import AnswerRelevancy, vision_layers_feeding_the_decoder

    deeper = load_vlm(tiny_llava(vision={**VISION_3, "image_size": 48}, strategy=strategy), device="cpu")
    assert vision_layers_feeding_the_decoder(deeper) == 2  # 3 layers, features from layer -2
    target = target_of(deeper, images)
    chained = AnswerRelevancy(deeper, through_vision=True).visual_values(target)
    assert chained.shape == (8, 36)
    torch.testing.assert_close(chained, _naive_vision_relevancy(deeper, target), atol=1e-6, rtol=1e-4)
    # R_v = I + (non-negative terms): each patch keeps at least its own token's decoder relevancy
    plain = AnswerRelevancy(deeper).visual_values(target)[:, deeper.num_prefix_visual_tokens :]
    assert (chained >= plain - 1e-7).all() and (chained > plain + 1e-6).any()


def test_relevancy_through_vision_batched_and_randomised(vlm: VlmAdapter, images: list[Any]) -> None:
    batched = mmelkit.explain(vlm, images, QUESTIONS, method="answer_relevancy", answer=ANSWERS, through_vision=True)
    assert batched.maps.shape == (8, *vlm.grid) and batched.params["through_vision"] is True
    for row in (0, 5):
        single = mmelkit.explain(vlm, images[row], QUESTIONS[row], method="answer_relevancy", answer=ANSWERS[row],
                                 through_vision=True)
        torch.testing.assert_close(single.maps[0], batched.maps[row], atol=2e-5, rtol=1e-4)
    plain = mmelkit.explain(vlm, images, QUESTIONS, method="answer_relevancy", answer=ANSWERS)
    assert (plain.maps - batched.maps).abs().mean() > 1e-3  # the vision tower spreads the relevancy
    other = load_vlm(tiny_llava(seed=0), device="cpu")
    with torch.no_grad():  # randomise the vision tower: the chained map must move
        for layer in other.parts.vision_layers:
            for parameter in layer.parameters():
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    moved = mmelkit.explain(other, images, QUESTIONS, method="answer_relevancy", answer=ANSWERS, through_vision=True)
    assert (moved.maps - batched.maps).abs().mean() > 0.02
    with pytest.raises(ValueError, match="through_vision"):
        mmelkit.explain(vlm, images[:1], QUESTIONS[:1], method="answer_relevancy", answer="red", through_vision="yes")


def test_relevancy_through_vision_leaves_no_hooks_or_grads(vlm: VlmAdapter, images: list[Any]) -> None:
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vlm.model.modules())
    mmelkit.explain(vlm, images[:2], QUESTIONS[:2], method="answer_relevancy", answer=ANSWERS[:2], through_vision=True)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vlm.model.modules()) == before
    assert all(p.grad is None for p in vlm.model.parameters())


@pytest.mark.parametrize("method", VLM_METHODS)
def test_the_full_strategy_cls_token_has_no_cell_on_the_grid(images: list[Any], method: str) -> None:
    # "full" keeps the vision tower's CLS as the first visual token: V = 37 tokens, a 6 x 6 grid
    full = load_vlm(tiny_llava(strategy="full"), device="cpu")
    assert full.num_visual_tokens == 37 and full.grid == (6, 6)
    out = mmelkit.explain(full, images[:2], QUESTIONS[:2], method=method, answer=ANSWERS[:2], **FAST.get(method, {}))
    assert out.maps.shape == (2, 6, 6) and torch.isfinite(out.maps).all()
