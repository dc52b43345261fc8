"""Tracing: parity with the untraced model, what is recorded, gradients, and hook cleanup.

Runs for every supported attention implementation: open_clip nn.MultiheadAttention (batch-first
and sequence-first), open_clip's custom Attention (qk-norm, head scale; scaled cosine), and
Hugging Face CLIPAttention (eager and sdpa backends).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TEXTS, make_model

import mmelkit

PARITY = dict(atol=1e-5, rtol=0)


def _library_scores(adapter: mmelkit.ClipAdapter, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Cosine scores computed by the wrapped library's own public API, not by the adapter."""
    model = adapter.model
    tokens = adapter.tokenize(texts)
    if adapter.family == "open_clip":
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(tokens.ids, normalize=True)
    else:
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(input_ids=tokens.ids, attention_mask=tokens.attention_mask).pooler_output
        image, text = torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)
    return image @ text.T


def _assert_clean(adapter: mmelkit.ClipAdapter) -> None:
    for tower in (adapter.backend.image_tower(), adapter.backend.text_tower()):
        for block, attention in zip(tower.blocks, tower.attentions, strict=True):
            assert not block._forward_hooks and not block._forward_pre_hooks
            assert "forward" not in attention.__dict__
            assert not hasattr(block, "_mmelkit_traced")
    assert adapter._traces == []


def test_adapter_matches_library(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    expected = _library_scores(adapter, pixels, TEXTS)
    torch.testing.assert_close(adapter.score(pixels, TEXTS), expected, **PARITY)


@pytest.mark.parametrize("attention_probs", [True, False])
def test_tracing_never_changes_scores(
    adapter: mmelkit.ClipAdapter, images: torch.Tensor, attention_probs: bool
) -> None:
    pixels = adapter.preprocess(images)
    before = adapter.score(pixels, TEXTS)
    with adapter.trace(image_blocks="all", text_blocks="all", attention_probs=attention_probs):
        during = adapter.score(pixels, TEXTS)
    after = adapter.score(pixels, TEXTS)
    torch.testing.assert_close(during, before, **PARITY)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    _assert_clean(adapter)


def test_recorded_tensors_are_consistent(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    n = len(pixels)
    with adapter.trace(image_blocks="all", text_blocks="all") as trace:
        adapter.score(pixels, TEXTS)
    grid = adapter.grid(pixels)
    tokens = 1 + grid[0] * grid[1]
    blocks = list(trace.image)
    assert len(blocks) == adapter.num_image_blocks
    for block in blocks:
        heads, head_dim = block.num_heads, block.head_dim
        width = heads * head_dim
        assert block.grid == grid
        assert block.tokens_in.shape == block.tokens_out.shape == block.attn_out.shape == (n, tokens, width)
        assert block.q.shape == block.k.shape == block.v.shape == (n, heads, tokens, head_dim)
        assert block.attn.shape == (n, heads, tokens, tokens)
        torch.testing.assert_close(block.attn.sum(-1), torch.ones(n, heads, tokens), atol=1e-5, rtol=0)
        # attention output is the probabilities applied to the values, heads concatenated
        recombined = (block.attn @ block.v).transpose(1, 2).reshape(n, tokens, width)
        torch.testing.assert_close(block.attn_out, recombined, atol=1e-5, rtol=0)
    for earlier, later in zip(blocks, blocks[1:], strict=False):
        torch.testing.assert_close(later.tokens_in, earlier.tokens_out, atol=0, rtol=0)

    text_block = trace.text[0]
    length = text_block.attn.shape[-1]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    assert text_block.attn[..., future].abs().max() == 0, "text attention must be causal"
    assert trace.text[-1] is trace.text[adapter.num_text_blocks - 1]


def test_probabilities_match_a_recomputation_from_q_and_k(variant: str, images: torch.Tensor) -> None:
    adapter = mmelkit.load_model(make_model(variant), device="cpu")
    pixels = adapter.preprocess(images)
    with adapter.trace(image_blocks="all") as trace:
        adapter.encode_image(pixels)
    for block in trace.image:
        logits = block.q @ block.k.transpose(-1, -2) / block.head_dim**0.5
        torch.testing.assert_close(block.attn, logits.softmax(-1), atol=1e-5, rtol=0)


def test_gradients_reach_traced_tensors_of_a_frozen_model(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    adapter.model.requires_grad_(False)
    pixels = adapter.preprocess(images)
    with adapter.trace(image_blocks=[0, -1], text_blocks=[-1]) as trace:
        score = adapter.score(pixels, TEXTS, pairing="paired")
    last, first, text = trace.image[-1], trace.image[0], trace.text[-1]
    wanted = [last.attn_out, last.q, last.k, last.v, last.attn, first.tokens_in, first.tokens_out, text.attn_out]
    grads = torch.autograd.grad(score.sum(), wanted)
    for grad in grads:
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradient_through_trace_matches_a_direct_computation(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    """dS/d(last block output) via the trace equals the gradient of the closed-form head."""
    pixels = adapter.preprocess(images)
    text_features = adapter.encode_text(TEXTS).detach()
    with adapter.trace(image_blocks=[-1]) as trace:
        image_features = adapter.encode_image(pixels)
        score = (image_features * text_features).sum()
    traced, = torch.autograd.grad(score, trace.image[-1].tokens_out)

    leaf = trace.image[-1].tokens_out.detach().requires_grad_(True)
    direct_features = torch.nn.functional.normalize(adapter.project_image_tokens(leaf)[:, 0], dim=-1)
    direct, = torch.autograd.grad((direct_features * text_features).sum(), leaf)
    torch.testing.assert_close(traced, direct, atol=1e-6, rtol=1e-5)


def test_hooks_removed_after_exception(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    before = adapter.score(pixels, TEXTS)
    with pytest.raises(ZeroDivisionError):
        with adapter.trace(image_blocks="all", text_blocks="all"):
            adapter.score(pixels, TEXTS)
            raise ZeroDivisionError
    _assert_clean(adapter)
    torch.testing.assert_close(adapter.score(pixels, TEXTS), before, atol=0, rtol=0)


def test_hooks_removed_when_a_traced_block_fails_mid_forward(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    last_block = adapter.backend.image_tower().blocks[-1]

    def explode(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        raise RuntimeError("boom inside the block")

    # The block's attention has already run through the explicit path when this hook fails.
    user_handle = last_block.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with adapter.trace(image_blocks="all"):
                adapter.encode_image(adapter.preprocess(images))
    finally:
        user_handle.remove()
    _assert_clean(adapter)


def test_a_block_cannot_be_traced_twice_at_once(adapter: mmelkit.ClipAdapter) -> None:
    with adapter.trace(image_blocks=[-1]):
        with pytest.raises(RuntimeError, match="already being traced"):
            with adapter.trace(image_blocks="all"):
                pass
        # the outer trace is intact
        assert "forward" in adapter.backend.image_tower().attentions[-1].__dict__
    _assert_clean(adapter)


def test_tracing_restores_a_user_forward_override(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    attention = adapter.backend.image_tower().attentions[0]
    original = type(attention).forward.__get__(attention)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    attention.forward = spy
    with adapter.trace(image_blocks=[0]):
        adapter.encode_image(adapter.preprocess(images))
    assert not calls  # the explicit path ran instead while tracing
    assert attention.__dict__["forward"] is spy
    adapter.encode_image(adapter.preprocess(images))
    assert calls


def test_block_selection(adapter: mmelkit.ClipAdapter) -> None:
    depth = adapter.num_image_blocks
    with adapter.trace(image_blocks=-1, text_blocks=None) as trace:
        pass
    assert trace.image.indices() == [depth - 1] and len(trace.text) == 0
    with pytest.raises(IndexError):
        with adapter.trace(image_blocks=[depth]):
            pass
    with pytest.raises(ValueError):
        with adapter.trace(image_blocks="last"):
            pass
    with pytest.raises(KeyError, match="not traced"):
        with adapter.trace(image_blocks=[0]) as trace:
            trace.image[1]
    _assert_clean(adapter)


def test_sequence_first_model_records_batch_first(images: torch.Tensor) -> None:
    nld = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    lnd = mmelkit.load_model(make_model("open_clip-lnd"), device="cpu")
    assert not lnd.backend.image_tower().batch_first
    pixels = nld.preprocess(images)
    with nld.trace(image_blocks="all", text_blocks="all") as a, lnd.trace(image_blocks="all", text_blocks="all") as b:
        torch.testing.assert_close(nld.score(pixels, TEXTS), lnd.score(pixels, TEXTS), **PARITY)
    for x, y in zip(list(a.image) + list(a.text), list(b.image) + list(b.text), strict=True):
        for name in ("tokens_in", "q", "attn", "attn_out", "tokens_out"):
            torch.testing.assert_close(getattr(x, name), getattr(y, name), **PARITY)


@pytest.mark.parametrize("size", [(48, 40), (24, 32)])
def test_other_image_sizes(adapter: mmelkit.ClipAdapter, images: torch.Tensor, size: tuple[int, int]) -> None:
    pixels = adapter.preprocess(images, size=size)
    assert pixels.shape[-2:] == size
    with adapter.trace(image_blocks=[-1]) as trace:
        features = adapter.encode_image(pixels)
    grid = (size[0] // 8, size[1] // 8)
    assert trace.image[-1].grid == grid
    assert trace.image[-1].tokens_out.shape[1] == 1 + grid[0] * grid[1]
    assert torch.isfinite(features).all()


def test_batch_equals_per_example(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    with adapter.trace(image_blocks=[-1]) as trace:
        adapter.encode_image(pixels)
    batched = trace.image[-1].attn
    for i in range(len(pixels)):
        with adapter.trace(image_blocks=[-1]) as single:
            adapter.encode_image(pixels[i : i + 1])
        torch.testing.assert_close(single.image[-1].attn[0], batched[i], **PARITY)


def test_math_attention_supports_double_backward(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images).requires_grad_(True)
    with adapter.trace(image_blocks="all", attention_probs=False, math_attention=True) as trace:
        score = adapter.score(pixels, TEXTS, pairing="paired").sum()
    grad, = torch.autograd.grad(score, trace.image[-1].attn_out, create_graph=True)
    second, = torch.autograd.grad(grad.square().sum(), pixels)
    assert torch.isfinite(second).all() and second.abs().sum() > 0
