"""Raw attention, rollout, generic attention and Grad-CAM: slow per-example references against the
batched implementations, on every attention implementation."""

from __future__ import annotations

import torch
from conftest import TEXTS

import mmelkit
from mmelkit.methods.token import AttentionRollout, GenericAttention, GradCAM, RawAttention


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    return (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)


def _score_and_trace(model: mmelkit.ClipAdapter, pixels: torch.Tensor, text: str, **trace_kwargs):  # type: ignore[no-untyped-def]
    target = model.encode_text([text]).detach()[0]
    context = model.trace(**trace_kwargs)
    trace = context.__enter__()
    try:
        feature = model.encode_image(pixels[None], normalize=False)[0]
        score = torch.dot(feature / feature.norm(), target)
    finally:
        context.__exit__(None, None, None)
    return score, trace


def _rollout_reference(model: mmelkit.ClipAdapter, pixels: torch.Tensor, start: int) -> torch.Tensor:
    _, trace = _score_and_trace(model, pixels, "x", image_blocks="all")
    length = trace.image[0].attn.shape[-1]
    rollout = torch.eye(length)
    for index in range(start, model.num_image_blocks):
        attention = trace.image[index].attn[0].detach()
        mean = sum(attention[h] for h in range(attention.shape[0])) / attention.shape[0]
        mean = mean + torch.eye(length)
        mean = torch.stack([row / row.sum() for row in mean])
        rollout = mean @ rollout
    grid = trace.image[-1].grid
    return _normalise(rollout[0, 1:].reshape(grid))


def _generic_reference(model: mmelkit.ClipAdapter, pixels: torch.Tensor, text: str, start: int) -> torch.Tensor:
    score, trace = _score_and_trace(model, pixels, text, image_blocks="all")
    length = trace.image[0].attn.shape[-1]
    relevance = torch.eye(length)
    for index in range(start, model.num_image_blocks):
        attention = trace.image[index].attn
        grad, = torch.autograd.grad(score, attention, retain_graph=True)  # one call per block: the slow way
        cam = (grad[0] * attention[0]).detach().clamp_min(0).mean(dim=0)
        relevance = relevance + cam @ relevance
    return _normalise(relevance[0, 1:].reshape(trace.image[-1].grid))


def _grad_cam_reference(model: mmelkit.ClipAdapter, pixels: torch.Tensor, text: str) -> torch.Tensor:
    score, trace = _score_and_trace(model, pixels, text, image_blocks=[-1])
    tokens = trace.image[-1].tokens_in
    grad, = torch.autograd.grad(score, tokens)
    patches, patch_grads = tokens[0, 1:].detach(), grad[0, 1:]
    channels = patches.shape[-1]
    weights = [patch_grads[:, c].mean() for c in range(channels)]
    cam = torch.stack([sum(weights[c] * patches[i, c] for c in range(channels)) for i in range(len(patches))])
    return _normalise(cam.clamp_min(0).reshape(trace.image[-1].grid))


def test_raw_attention(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    result = RawAttention(adapter).explain(pixels, TEXTS)
    for n in range(3):
        _, trace = _score_and_trace(adapter, pixels[n], "x", image_blocks=[-1])
        attention = trace.image[-1].attn[0, :, 0, 1:].detach()
        expected = _normalise((sum(attention) / len(attention)).reshape(trace.image[-1].grid))
        torch.testing.assert_close(result.maps[n], expected, atol=1e-5, rtol=0)


def test_rollout(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    for start in (0, 1):
        result = AttentionRollout(adapter, start_layer=start).explain(pixels, TEXTS)
        for n in range(3):
            torch.testing.assert_close(result.maps[n], _rollout_reference(adapter, pixels[n], start), atol=1e-4, rtol=0)


def test_generic_attention(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    for start in (0, 1):
        result = GenericAttention(adapter, start_layer=start).explain(pixels, TEXTS)
        for n in range(3):
            expected = _generic_reference(adapter, pixels[n], TEXTS[n], start)
            torch.testing.assert_close(result.maps[n], expected, atol=1e-4, rtol=0)


def test_grad_cam(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    result = GradCAM(adapter).explain(pixels, TEXTS)
    for n in range(3):
        torch.testing.assert_close(result.maps[n], _grad_cam_reference(adapter, pixels[n], TEXTS[n]), atol=1e-4, rtol=0)
