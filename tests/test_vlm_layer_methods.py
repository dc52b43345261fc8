"""Layer- and embedding-level tools for generative VLMs on tiny random LLaVA models: attention
knockout, causal tracing and the logit lens, each against what must hold exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llava

from mmelkit.methods.answers import AnswerTarget, answer_target, target_score, visual_tokens_of_masks
from mmelkit.methods.layer import attention_knockout, causal_trace, knocked_out, logit_lens
from mmelkit.methods.layer.logit_lens import LogitLens
from mmelkit.models.vlm import VlmAdapter, load_vlm
from mmelkit.models.vlm.tracing import attention_implementation

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["is there a red circle ?", "what colour is the star ?", "how many objects are there in the image ?",
             "describe the image ."]
ANSWERS = ["yes", "red", "two", "red circle , blue star"]


@pytest.fixture(scope="module")
def vlm() -> VlmAdapter:
    adapter = load_vlm(tiny_llava(seed=1), device="cpu")
    with torch.no_grad():
        adapter.forward(adapter.encode(np.zeros((48, 48, 3), np.uint8), "describe the image ."))
    AT_LOAD[id(adapter.model)] = all_hooks(adapter.model)
    return adapter


@pytest.fixture(scope="module")
def target(vlm: VlmAdapter) -> AnswerTarget:
    rng = np.random.default_rng(7)
    images = [(rng.random((48, 48, 3)) * 255).astype(np.uint8) for _ in QUESTIONS]
    return answer_target(vlm, images, QUESTIONS, ANSWERS)


def all_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


AT_LOAD: dict[int, int] = {}  # hooks transformers installs itself on a first forward (output capturing)


def hooks(model: torch.nn.Module) -> int:
    """Hooks beyond the ones the model has after one plain forward."""
    return all_hooks(model) - AT_LOAD[id(model)]


# -- attention knockout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_knocked_out_edges_get_no_attention_and_the_rest_renormalises(
    vlm: VlmAdapter, target: AnswerTarget, implementation: str
) -> None:
    n, length = target.batch.input_ids.shape
    query = target.query_positions[:, 0]
    rows = torch.arange(n)
    edges = torch.zeros(n, length, length, dtype=torch.bool)
    edges[rows[:, None], query[:, None], target.batch.visual_positions] = True
    with torch.no_grad(), vlm.trace(decoder_hidden=False, vision=False) as clean:
        vlm.forward(target.batch)
    with torch.no_grad(), attention_implementation(vlm.model, implementation), knocked_out(vlm, {1: edges}):
        with vlm.trace(decoder_hidden=False, vision=False) as knocked:
            vlm.forward(target.batch)
    torch.testing.assert_close(knocked.decoder[0].attn, clean.decoder[0].attn)  # before the knocked layer: nothing
    attention = knocked.decoder[1].attn[rows, :, query]  # (N, H, L)
    visual = attention.gather(2, target.batch.visual_positions[:, None].expand(-1, attention.shape[1], -1))
    assert visual.abs().max() == 0
    torch.testing.assert_close(attention.sum(-1), torch.ones_like(attention.sum(-1)))
    assert hooks(vlm.model) == 0


def test_knockout_batched_equals_one_window_one_row_at_a_time(vlm: VlmAdapter, target: AnswerTarget) -> None:
    result = attention_knockout(vlm, target, window=1, batch_size=3)
    depth = vlm.num_decoder_layers
    assert result.drops.shape == (4, depth) and result.starts == list(range(depth))
    for row in range(4):
        one = target.select(torch.tensor([row]))
        n, length = one.batch.input_ids.shape
        edges = torch.zeros(1, length, length, dtype=torch.bool)
        queries = one.query_positions[0][one.weights[0] > 0]
        edges[0, queries[:, None], one.batch.visual_positions[0][None]] = True
        with torch.no_grad():
            clean = target_score(vlm, one).exp()
            torch.testing.assert_close(result.clean[row], clean[0])
            for layer in range(depth):
                with knocked_out(vlm, {layer: edges}):
                    p = target_score(vlm, one).exp()
                torch.testing.assert_close(result.drops[row, layer], 1 - p[0] / clean[0], atol=1e-5, rtol=1e-4)
    assert result.drops.abs().max() > 1e-4  # the image mattered somewhere


def test_knockout_of_no_edges_changes_nothing_and_a_wide_window(vlm: VlmAdapter, target: AnswerTarget) -> None:
    none = attention_knockout(vlm, target, keys=torch.zeros(4, vlm.num_visual_tokens, dtype=torch.bool))
    assert none.drops.abs().max() < 1e-6
    whole = attention_knockout(vlm, target, window=vlm.num_decoder_layers)
    assert whole.drops.shape == (4, 1)
    with pytest.raises(ValueError, match="wider"):
        attention_knockout(vlm, target, window=vlm.num_decoder_layers + 1)
    with pytest.raises(ValueError, match="keys must be"):
        attention_knockout(vlm, target, keys=torch.ones(4, 3, dtype=torch.bool))


def test_knockout_hooks_are_removed_after_an_exception(vlm: VlmAdapter, target: AnswerTarget) -> None:
    edges = torch.ones(4, *target.batch.input_ids.shape[1:], target.batch.input_ids.shape[1], dtype=torch.bool)
    with pytest.raises(RuntimeError, match="boom"), knocked_out(vlm, {0: edges, 1: edges}):
        assert hooks(vlm.model) == 2
        raise RuntimeError("boom")
    assert hooks(vlm.model) == 0


# -- causal tracing ---------------------------------------------------------------------------------------
def test_causal_trace_restoring_the_last_state_recovers_the_clean_answer(vlm: VlmAdapter, target: AnswerTarget) -> None:
    single = target.select(torch.tensor([0, 1, 2]))  # one-token answers: the last query column decides
    trace = causal_trace(vlm, single, batch_size=50)
    depth, length = vlm.num_decoder_layers, single.batch.input_ids.shape[1]
    assert trace.recovered.shape == (3, depth, length)
    assert (trace.clean - trace.corrupted).abs().max() > 1e-4  # the corruption did something
    for row in range(3):
        query = int(single.query_positions[row, 0])
        torch.testing.assert_close(trace.recovered[row, depth - 1, query], trace.clean[row], atol=1e-6, rtol=1e-5)
        assert torch.isnan(trace.recovered[row, :, query + 1 :]).all()  # later columns cannot matter
        padding = single.batch.attention_mask[row] == 0
        assert torch.isnan(trace.recovered[row][:, padding]).all()
        assert torch.isfinite(trace.recovered[row][:, ~padding][:, : query + 1 - int(padding.sum())]).all()
    effect = trace.effect
    torch.testing.assert_close(effect[torch.arange(3), depth - 1, single.query_positions[:, 0]], torch.ones(3))


def test_causal_trace_equals_patching_one_state_at_a_time(vlm: VlmAdapter, target: AnswerTarget) -> None:
    from mmelkit.methods.layer.causal_trace import corrupt_visual_tokens, restored

    one = target.select(torch.tensor([3]))
    trace = causal_trace(vlm, one, noise_scale=2.0, seed=4, batch_size=17)
    with torch.no_grad():
        visual = vlm.visual_features(one.batch.pixel_values)
        corrupted = corrupt_visual_tokens(visual, torch.ones(visual.shape[:2], dtype=torch.bool), 2.0, 4)
        with vlm.trace(decoder_attentions=False, vision=False, visual_leaf=False) as clean:
            vlm.forward(one.batch, visual)
        for layer, position in [(0, int(one.batch.visual_positions[0, 5])), (1, int(one.query_positions[0, 0]))]:
            state = clean.decoder[layer].hidden[0, position]
            with restored(vlm, torch.tensor([layer]), torch.tensor([position]), state[None]):
                p = target_score(vlm, one, corrupted).exp()
            torch.testing.assert_close(trace.recovered[0, layer, position], p[0], atol=1e-6, rtol=1e-5)
    assert hooks(vlm.model) == 0


def test_corrupting_no_tokens_leaves_everything_clean(vlm: VlmAdapter, target: AnswerTarget) -> None:
    one = target.select(torch.tensor([1]))
    trace = causal_trace(vlm, one, tokens=torch.zeros(1, vlm.num_visual_tokens, dtype=torch.bool))
    torch.testing.assert_close(trace.corrupted, trace.clean)
    finite = torch.isfinite(trace.recovered)
    torch.testing.assert_close(trace.recovered[finite], trace.clean.expand(int(finite.sum())))
    with pytest.raises(ValueError, match="noise_scale"):
        causal_trace(vlm, one, noise_scale=0.0)


def test_causal_trace_with_a_corrupted_image(vlm: VlmAdapter, target: AnswerTarget) -> None:
    """SPEC §6's other corruption: a second image (here a block of the scene painted grey). Its
    visual tokens are the corrupted run's; restoring the last state brings the clean answer back,
    and each recovered value equals patching that one state by hand."""
    from mmelkit.methods.layer.causal_trace import restored

    single = target.select(torch.tensor([0, 1]))
    pixels = single.batch.pixel_values.clone()
    pixels[..., :24, :24] = 0.0  # the corrupted images, in the model's own pixel space
    trace = causal_trace(vlm, single, corrupted_images=pixels, batch_size=23)
    assert (trace.clean - trace.corrupted).abs().max() > 1e-4
    depth = vlm.num_decoder_layers
    for row in range(2):
        query = int(single.query_positions[row, 0])
        torch.testing.assert_close(trace.recovered[row, depth - 1, query], trace.clean[row], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        corrupted = vlm.visual_features(pixels)
        torch.testing.assert_close(trace.corrupted, target_score(vlm, single, corrupted).exp())
        with vlm.trace(decoder_attentions=False, vision=False, visual_leaf=False) as clean:
            vlm.forward(single.batch, vlm.visual_features(single.batch.pixel_values))
        one = single.select(torch.tensor([1]))
        position = int(one.batch.visual_positions[0, 3])
        with restored(vlm, torch.tensor([0]), torch.tensor([position]), clean.decoder[0].hidden[1, position][None]):
            p = target_score(vlm, one, corrupted[1:]).exp()
    torch.testing.assert_close(trace.recovered[1, 0, position], p[0], atol=1e-6, rtol=1e-5)
    # the clean images as the "corrupted" ones: nothing to recover
    same = causal_trace(vlm, single, corrupted_images=single.batch.pixel_values)
    torch.testing.assert_close(same.corrupted, same.clean)
    assert hooks(vlm.model) == 0
    with pytest.raises(ValueError, match="not both"):
        causal_trace(vlm, single, tokens=torch.ones(2, vlm.num_visual_tokens, dtype=torch.bool), corrupted_images=pixels)
    with pytest.raises(ValueError, match="one image per row"):
        causal_trace(vlm, single, corrupted_images=pixels[:1])


# -- logit lens -------------------------------------------------------------------------------------------
def test_logit_lens_ends_at_the_models_own_predictions(vlm: VlmAdapter, target: AnswerTarget) -> None:
    lens = logit_lens(vlm, target, k=3)
    depth, v = vlm.num_decoder_layers, vlm.num_visual_tokens
    assert lens.top_ids.shape == (4, depth + 1, v, 3)
    with torch.no_grad():
        logits = vlm.forward(target.batch).logits  # (N, L, vocab)
        rows = torch.arange(4)[:, None]
        expected = logits[rows, target.batch.visual_positions].float().softmax(-1).topk(3, dim=-1)
        torch.testing.assert_close(lens.top_probs[:, -1], expected.values, atol=1e-5, rtol=1e-4)
        first = vlm.project_hidden(vlm.visual_features(target.batch.pixel_values)).float().softmax(-1).topk(3, dim=-1)
        torch.testing.assert_close(lens.top_probs[:, 0], first.values, atol=1e-5, rtol=1e-4)
    words = lens.words(0, depth)
    assert len(words) == vlm.grid[0] and all(len(line) == vlm.grid[1] for line in words)
    assert words[0][0] == lens.vocabulary[int(lens.top_ids[0, depth, 0, 0])]


def test_logit_lens_localisation_counts_named_tokens() -> None:
    vocabulary = ["<pad>", "red", "circle", "blue", "star"]
    top = torch.tensor([[[1, 2, 3, 0]], [[1, 1, 4, 4]]])  # (layers + 1 = 2, V = 4) of one row, top-1 only
    lens = LogitLens(top.reshape(1, 2, 4, 1), torch.ones(1, 2, 4, 1), vocabulary, (2, 2))
    tokens = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(lens.localisation(tokens, [["red", "circle"]]), torch.tensor([[2 / 3, 2 / 3]]))
    torch.testing.assert_close(lens.localisation(tokens, [["blue", "star"]]), torch.tensor([[1 / 3, 1 / 3]]))
    with pytest.raises(ValueError, match="not words"):
        lens.localisation(tokens, [["green"]])
    assert torch.isnan(lens.localisation(torch.zeros(1, 4, dtype=torch.bool), [["red"]])).all()


def test_visual_tokens_of_masks(vlm: VlmAdapter) -> None:
    masks = np.zeros((2, 48, 48), bool)
    masks[0, :8, :8] = True  # exactly the first patch
    masks[1, 8:24, 40:48] = True  # two patches of the last column, given at another size below
    tokens = visual_tokens_of_masks(vlm, masks)
    assert tokens[0].nonzero().flatten().tolist() == [0]
    assert tokens[1].nonzero().flatten().tolist() == [11, 17]
    bigger = np.repeat(np.repeat(masks, 2, axis=1), 2, axis=2)
    assert torch.equal(visual_tokens_of_masks(vlm, bigger), tokens)
    with pytest.raises(ValueError, match="bool"):
        visual_tokens_of_masks(vlm, masks.astype(np.uint8))


# -- figures ----------------------------------------------------------------------------------------------
def test_figures_of_the_layer_tools(vlm: VlmAdapter, target: AnswerTarget) -> None:
    from mmelkit.viz.vlm import causal_trace_figure, knockout_figure, logit_lens_figure

    knockout = attention_knockout(vlm, target)
    figure = knockout_figure(knockout, rows=[0, 2])
    assert len(figure.data) == 2 and list(figure.data[0].y) == knockout.drops[0].tolist()
    trace = causal_trace(vlm, target.select(torch.tensor([0])))
    heat = causal_trace_figure(trace).data[0]
    assert np.asarray(heat.z, dtype=float).shape == (vlm.num_decoder_layers, target.batch.input_ids.shape[1])
    lens = logit_lens(vlm, target)
    panels = logit_lens_figure(lens, row=1, layers=[0, vlm.num_decoder_layers])
    assert len(panels.data) == 2 and np.asarray(panels.data[1].text).shape == vlm.grid
