"""Grad-ECLIP (faithful mode): a slow per-example reference against the batched implementation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXTS

import mmelkit
from mmelkit.explain.base import get_method, pair_inputs
from mmelkit.explain.token import GradECLIP


def _reference(model: mmelkit.ClipAdapter, pixels: torch.Tensor, text: str, layers: int, key_similarity: bool) -> torch.Tensor:
    """One pair, explicit loops over layers, heads and patches, straight from the method reference."""
    target = model.encode_text([text]).detach()[0]
    blocks = list(range(-layers, 0))
    with model.trace(image_blocks=blocks, attention_probs=False) as trace:
        feature = model.encode_image(pixels[None], normalize=False)[0]
        score = torch.dot(feature / feature.norm(), target)
    records = [trace.image[b] for b in blocks]
    grads = torch.autograd.grad(score, [r.attn_out for r in records])
    grid = records[0].grid
    patches = grid[0] * grid[1]
    total = torch.zeros(patches)
    for record, grad in zip(records, grads, strict=True):
        heads, d = record.num_heads, record.head_dim
        layer_map = torch.zeros(patches)
        for h in range(heads):
            q_cls = record.q[0, h, 0]
            cosines = torch.stack([F.cosine_similarity(q_cls, record.k[0, h, 1 + i], dim=0) for i in range(patches)])
            lam = (cosines - cosines.min()) / (cosines.max() - cosines.min() + 1e-8) if key_similarity else torch.ones(patches)
            for i in range(patches):
                contribution = sum(grad[0, 0, h * d + c] * record.v[0, h, 1 + i, c] for c in range(d))
                layer_map[i] += lam[i] * contribution
        total += layer_map.clamp_min(0)
    total = total.detach()
    total = (total - total.min()) / (total.max() - total.min()).clamp_min(1e-12)
    return total.reshape(grid)


@pytest.mark.parametrize("layers, key_similarity", [(1, True), (2, True), (1, False)])
def test_batched_matches_slow_reference(adapter: mmelkit.ClipAdapter, images: torch.Tensor, layers: int,
                                         key_similarity: bool) -> None:
    pixels = adapter.preprocess(images)
    result = GradECLIP(adapter, layers=layers, key_similarity=key_similarity).explain(pixels, TEXTS)
    assert result.maps.shape == (3, 4, 4) and result.image_size == (32, 32)
    for n in range(3):
        expected = _reference(adapter, pixels[n], TEXTS[n], layers, key_similarity)
        torch.testing.assert_close(result.maps[n], expected, atol=1e-4, rtol=0)


def test_pairings_and_batch_equals_single(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    method = GradECLIP(adapter)
    images = adapter.preprocess(images)  # model input, so that single rows mean the same as the batch
    one_image_many_texts = method.explain(images[0:1], TEXTS)
    for n, text in enumerate(TEXTS):
        torch.testing.assert_close(one_image_many_texts.maps[n], method.explain(images[0:1], [text]).maps[0], atol=1e-5, rtol=0)
    many_images_one_text = method.explain(images, TEXTS[0])
    torch.testing.assert_close(many_images_one_text.maps[1], method.explain(images[1:2], TEXTS[0]).maps[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3 images and 2 texts"):
        method.explain(images, TEXTS[:2])


def test_model_untouched_and_hooks_gone(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    before = adapter.score(images, TEXTS)
    with torch.no_grad():  # works inside no_grad too
        GradECLIP(adapter, layers=2).explain(images, TEXTS)
    torch.testing.assert_close(adapter.score(images, TEXTS), before, atol=0, rtol=0)
    for block in adapter.backend.image_tower().blocks:
        assert not block._forward_hooks and not block._forward_pre_hooks


def test_parameters_are_checked(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="no parameter"):
        GradECLIP(adapter, layer=1)
    with pytest.raises(ValueError, match="layers"):
        GradECLIP(adapter, layers=99).explain(images, TEXTS)
    assert get_method("grad_eclip") is GradECLIP
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")
    pixels, tokens = pair_inputs(adapter, images[0], TEXTS)
    assert pixels.shape[0] == len(tokens) == 3
