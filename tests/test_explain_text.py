"""Text-side methods: Grad-ECLIP (text), Integrated Gradients over token embeddings, leave-one-word-out.

Slow per-example references written from the method descriptions, against the batched code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXTS, make_hf_clip, make_model, save_hf_clip

import mmelkit
from mmelkit.methods.base import TextExplanation, get_method, readable_token, text_layout
from mmelkit.methods.text import GradECLIPText, IntegratedGradientsText, LeaveOneWordOut
from mmelkit.methods.text.integrated_gradients_text import baseline_embeddings

LONG = "an antidisestablishmentarianism cat"  # the long word is split into several BPE pieces
METHODS = [GradECLIPText, IntegratedGradientsText, LeaveOneWordOut]
FAST = {GradECLIPText: {}, IntegratedGradientsText: {"steps": 4}, LeaveOneWordOut: {}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _cos(model: mmelkit.ClipAdapter, pixels: torch.Tensor, text: str) -> torch.Tensor:
    with torch.no_grad():
        return (model.encode_image(pixels[None]) * model.encode_text([text])).sum()


# -- Grad-ECLIP, text side ------------------------------------------------------------------------


def _grad_eclip_reference(model: mmelkit.ClipAdapter, pixels: torch.Tensor, text: str, layers: int,
                          key_similarity: bool) -> torch.Tensor:
    """One pair, explicit loops over layers, heads, positions and channels."""
    tokens = model.tokenize([text])
    eos = int(tokens.eos_index[0])
    with torch.no_grad():
        image = model.encode_image(pixels[None], normalize=False)[0]
    blocks = list(range(-layers, 0))
    with model.trace(image_blocks=None, text_blocks=blocks, attention_probs=False) as trace:
        text_feature = model.encode_text(tokens, normalize=False)[0]
        score = torch.dot(image / image.norm(), text_feature / text_feature.norm())
    records = [trace.text[b] for b in blocks]
    grads = torch.autograd.grad(score, [r.attn_out for r in records])
    length = tokens.ids.shape[1]
    total = torch.zeros(length)
    for record, grad in zip(records, grads, strict=True):
        heads, d = record.num_heads, record.head_dim
        for h in range(heads):
            q_eos = record.q[0, h, eos]
            cosines = torch.stack([F.cosine_similarity(q_eos, record.k[0, h, j], dim=0) for j in range(eos + 1)])
            if key_similarity:
                lam = (cosines - cosines.min()) / (cosines.max() - cosines.min() + 1e-8)
            else:
                lam = torch.ones(eos + 1)
            for j in range(eos + 1):
                contribution = sum(grad[0, eos, h * d + c] * record.v[0, h, j, c] for c in range(d))
                total[j] += lam[j] * contribution
    weights = total.detach().clamp_min(0)
    weights[0] = 0  # start of text
    weights[eos:] = 0  # end of text and padding
    return weights / weights.sum() if weights.sum() > 0 else weights


@pytest.mark.parametrize("layers, key_similarity", [(None, True), (1, True), (2, False)])
def test_grad_eclip_text_matches_slow_reference(adapter: mmelkit.ClipAdapter, images: torch.Tensor,
                                                layers: int | None, key_similarity: bool) -> None:
    pixels = adapter.preprocess(images)
    texts = [TEXTS[0], LONG, TEXTS[1]]
    result = GradECLIPText(adapter, layers=layers, key_similarity=key_similarity).explain(pixels, texts)
    assert isinstance(result, TextExplanation) and result.scores.shape == (3, 16)
    assert result.params["layers"] == (layers or 2)  # None: min(8, depth) = 2 for the tiny models
    for n in range(3):
        expected = _grad_eclip_reference(adapter, pixels[n], texts[n], layers or 2, key_similarity)
        torch.testing.assert_close(result.scores[n], expected, atol=1e-4, rtol=0)
    sums = result.scores.sum(dim=1)
    assert all(abs(s - 1) < 1e-5 or s == 0 for s in sums.tolist())


# -- Integrated Gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["zero", "pad"])
def test_integrated_gradients_completeness(adapter: mmelkit.ClipAdapter, images: torch.Tensor, baseline: str) -> None:
    pixels = adapter.preprocess(images)
    texts = [TEXTS[0], LONG, TEXTS[2]]
    result = IntegratedGradientsText(adapter, steps=256, baseline=baseline, batch_size=256).explain(pixels, texts)
    tokens = adapter.tokenize(texts)
    layout = text_layout(adapter, tokens)
    with torch.no_grad():
        image = adapter.encode_image(pixels)
        full = (image * adapter.encode_text(tokens)).sum(-1)
        base = baseline_embeddings(adapter, tokens, layout.content, baseline)
        reference = (image * adapter.encode_text_from_embeddings(base, tokens)).sum(-1)
    torch.testing.assert_close(result.scores.sum(dim=1), full - reference, atol=2e-3, rtol=0)
    assert (result.scores[~layout.content] == 0).all()


def _ig_slow(model: mmelkit.ClipAdapter, pixels: torch.Tensor, text: str, steps: int, baseline: str,
             absolute: bool) -> torch.Tensor:
    tokens = model.tokenize([text])
    layout = text_layout(model, tokens)
    with torch.no_grad():
        image = model.encode_image(pixels[None])
        embeddings = model.token_embeddings(tokens)
        base = baseline_embeddings(model, tokens, layout.content, baseline)
    total = torch.zeros_like(embeddings)
    for k in range(1, steps + 1):
        point = (base + k / steps * (embeddings - base)).requires_grad_(True)
        score = (image * model.encode_text_from_embeddings(point, tokens)).sum()
        (grad,) = torch.autograd.grad(score, point)
        total += grad
    attribution = (embeddings - base) * total / steps
    scores = attribution.abs().sum(-1) if absolute else attribution.sum(-1)
    return (scores * layout.content)[0]


@pytest.mark.parametrize("baseline, absolute", [("zero", False), ("pad", True)])
def test_integrated_gradients_batched_equals_per_step_loop(adapter: mmelkit.ClipAdapter, images: torch.Tensor,
                                                          baseline: str, absolute: bool) -> None:
    pixels = adapter.preprocess(images)
    texts = [TEXTS[1], LONG, TEXTS[0]]
    # chunks of 4 rows cut across pairs (5 steps each)
    result = IntegratedGradientsText(adapter, steps=5, baseline=baseline, absolute=absolute,
                                     batch_size=4).explain(pixels, texts)
    for n in range(3):
        expected = _ig_slow(adapter, pixels[n], texts[n], 5, baseline, absolute)
        torch.testing.assert_close(result.scores[n], expected, atol=1e-6, rtol=1e-4)
    if absolute:
        assert (result.scores >= 0).all()


def test_encode_text_from_embeddings_matches_encode_text(adapter: mmelkit.ClipAdapter) -> None:
    tokens = adapter.tokenize([*TEXTS, LONG])
    embeddings = adapter.token_embeddings(tokens)
    assert embeddings.shape[:2] == tokens.ids.shape
    torch.testing.assert_close(adapter.encode_text_from_embeddings(embeddings, tokens), adapter.encode_text(tokens),
                               atol=1e-5, rtol=0)
    # the embeddings are really used, and positions still matter
    changed = embeddings.clone()
    changed[:, 1] = 0
    assert not torch.allclose(adapter.encode_text_from_embeddings(changed, tokens), adapter.encode_text(tokens))
    with pytest.raises(ValueError, match=r"\(N, L, D\)"):
        adapter.encode_text_from_embeddings(embeddings[:, :5], tokens)
    table = adapter.backend._token_embedding()
    assert not table._forward_hooks


# -- leave-one-word-out ---------------------------------------------------------------------------


def test_leave_one_word_out_equals_recomputation(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    texts = [TEXTS[0], LONG, TEXTS[1]]
    result = LeaveOneWordOut(adapter, batch_size=3).explain(pixels, texts)
    for n, text in enumerate(texts):
        words = text.split()
        assert result.word_strings[n] == words
        full = _cos(adapter, pixels[n], text)
        for w, (word, score) in enumerate(result.words(n)):
            without = " ".join(words[:w] + words[w + 1:])
            assert abs(score - float(full - _cos(adapter, pixels[n], without))) < 1e-5, (text, word)
    # the long word's drop is shared evenly by its pieces
    pieces = result.word_positions[1][1]
    assert len(pieces) > 1
    share = result.scores[1, pieces]
    torch.testing.assert_close(share, share[:1].expand_as(share))


# -- shared behaviour -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", METHODS)
def test_word_scores_are_sums_of_pieces(adapter: mmelkit.ClipAdapter, images: torch.Tensor, cls: type) -> None:
    result = cls(adapter, **FAST[cls]).explain(images[0:1], [LONG, "a red square, on the left!"])
    assert result.word_strings[0] == ["an", "antidisestablishmentarianism", "cat"]
    assert result.word_strings[1] == ["a", "red", "square", ",", "on", "the", "left", "!"]
    assert len(result.word_positions[0][1]) > 1  # several pieces
    assert result.tokens[0][0] in ("<start_of_text>", "<|startoftext|>")
    for n in range(2):
        for group, score in zip(result.word_positions[n], result.word_scores[n], strict=True):
            torch.testing.assert_close(score, result.scores[n, group].sum())
        covered = sorted(p for group in result.word_positions[n] for p in group)
        eos = len(result.tokens[n]) - 1
        assert covered == list(range(1, eos))  # every token strictly between start and end
        assert (result.scores[n, [0, *range(eos, 16)]] == 0).all()
    frame = result.to_frame()
    assert list(frame.columns) == ["pair", "position", "token", "word", "score"]
    assert len(frame) == sum(len(t) for t in result.tokens)
    long_rows = frame[(frame.pair == 0) & (frame.word == "antidisestablishmentarianism")]
    assert len(long_rows) == len(result.word_positions[0][1])
    assert abs(long_rows.score.sum() - result.words(0)[1][1]) < 1e-6


@pytest.mark.parametrize("cls", METHODS)
def test_batch_equals_single_and_pairings(adapter: mmelkit.ClipAdapter, images: torch.Tensor, cls: type) -> None:
    method = cls(adapter, **FAST[cls])
    pixels = adapter.preprocess(images)
    one_image_many_texts = method.explain(pixels[0:1], TEXTS)
    assert len(one_image_many_texts) == 3 and one_image_many_texts.texts == TEXTS
    for n, text in enumerate(TEXTS):
        single = method.explain(pixels[0:1], [text])
        torch.testing.assert_close(one_image_many_texts.scores[n], single.scores[0], atol=1e-5, rtol=0)
    many_images_one_text = method.explain(pixels, TEXTS[1])
    torch.testing.assert_close(many_images_one_text.scores[2], method.explain(pixels[2:3], TEXTS[1]).scores[0],
                               atol=1e-5, rtol=0)
    paired = method.explain(pixels, TEXTS)
    torch.testing.assert_close(paired.scores[1], method.explain(pixels[1:2], TEXTS[1:2]).scores[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3 images and 2 texts"):
        method.explain(pixels, TEXTS[:2])


def test_bad_inputs_give_clear_errors(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="no parameter"):
        GradECLIPText(adapter, layer=1)
    for layers in (0, 99, 1.5):
        with pytest.raises(ValueError, match="layers"):
            GradECLIPText(adapter, layers=layers).explain(images, TEXTS)
    with pytest.raises(ValueError, match="baseline"):
        IntegratedGradientsText(adapter, baseline="mean").explain(images, TEXTS)
    with pytest.raises(ValueError, match="steps"):
        IntegratedGradientsText(adapter, steps=0).explain(images, TEXTS)
    with pytest.raises(ValueError, match="batch_size"):
        LeaveOneWordOut(adapter, batch_size=0).explain(images, TEXTS)
    with pytest.raises(TypeError, match="TextTokens"):
        GradECLIPText(adapter).explain(images, torch.zeros(3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="no texts"):
        LeaveOneWordOut(adapter).explain(images, [])


@pytest.mark.parametrize("cls", METHODS)
def test_empty_text_explains_to_nothing(adapter: mmelkit.ClipAdapter, images: torch.Tensor, cls: type) -> None:
    result = cls(adapter, **FAST[cls]).explain(images[0:1], ["", "red"])
    assert result.word_strings == [[], ["red"]] and result.words(0) == []
    assert (result.scores[0] == 0).all() and torch.isfinite(result.scores).all()


def test_model_untouched(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    before = adapter.score(images, TEXTS)
    state = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in adapter.model.named_parameters()}
    with torch.no_grad():  # works inside no_grad too
        for cls in METHODS:
            result = cls(adapter, **FAST[cls]).explain(images, TEXTS)
            assert torch.isfinite(result.scores).all()
    for key, value in adapter.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert flags == {k: p.requires_grad for k, p in adapter.model.named_parameters()}
    assert all(p.grad is None for p in adapter.model.parameters())
    torch.testing.assert_close(adapter.score(images, TEXTS), before, atol=0, rtol=0)


def _assert_clean(adapter: mmelkit.ClipAdapter) -> None:
    for tower in (adapter.backend.image_tower(), adapter.backend.text_tower()):
        for block, attention in zip(tower.blocks, tower.attentions, strict=True):
            assert not block._forward_hooks and not block._forward_pre_hooks
            assert "forward" not in attention.__dict__
            assert not hasattr(block, "_mmelkit_traced")
    assert not adapter.backend._token_embedding()._forward_hooks
    assert adapter._traces == []


@pytest.mark.parametrize("cls", METHODS)
def test_hooks_gone_after_an_exception(adapter: mmelkit.ClipAdapter, images: torch.Tensor, cls: type) -> None:
    before = adapter.score(images, TEXTS)
    last_block = adapter.backend.text_tower().blocks[-1]

    def explode(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        raise RuntimeError("boom inside the text tower")

    handle = last_block.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            cls(adapter, **FAST[cls]).explain(images, TEXTS)
    finally:
        handle.remove()
    _assert_clean(adapter)
    torch.testing.assert_close(adapter.score(images, TEXTS), before, atol=0, rtol=0)


def test_registry_table_and_api(images: torch.Tensor) -> None:
    adapter = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    table = mmelkit.list_methods()
    for name, cls in [("grad_eclip_text", GradECLIPText), ("integrated_gradients_text", IntegratedGradientsText),
                      ("leave_one_word_out", LeaveOneWordOut)]:
        assert get_method(name) is cls and table.loc[name, "modality"] == "text"
    row = table.loc["leave_one_word_out"]
    assert row["level"] == "data" and row["granularity"] == "input" and row["family"] == "perturbation"
    assert table.loc["grad_eclip_text", "family"] == "gradient x attention"
    via_api = mmelkit.explain(adapter, images, TEXTS, method="grad_eclip_text", layers=1)
    direct = GradECLIPText(adapter, layers=1).explain(images, TEXTS)
    torch.testing.assert_close(via_api.scores, direct.scores)
    assert via_api.method == "grad_eclip_text" and via_api.texts == TEXTS


def test_readable_tokens_and_hf_tokenizer_path(tmp_path: Path, images: torch.Tensor) -> None:
    assert readable_token("caf\u00c3\u00a9</w>") == "café"
    assert readable_token("<start_of_text>") == "<start_of_text>"
    hf = mmelkit.load_model(str(save_hf_clip(make_hf_clip(), tmp_path)), device="cpu")  # real CLIPTokenizer
    bare = mmelkit.load_model(make_hf_clip(), device="cpu")  # open_clip's BPE
    texts = ["a café, antidisestablishmentarianism!", TEXTS[1]]
    assert hf.token_strings(texts)[0][:4] == ["<|startoftext|>", "a</w>", "caf\u00c3\u00a9</w>", ",</w>"]
    a = LeaveOneWordOut(hf).explain(images[0:1], texts)
    b = LeaveOneWordOut(bare).explain(images[0:1], texts)
    assert a.word_strings == b.word_strings and a.word_strings[0][:3] == ["a", "café", ","]
    torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=0)
    ig = IntegratedGradientsText(hf, steps=4, baseline="pad").explain(images[0:1], texts)
    assert torch.isfinite(ig.scores).all()
