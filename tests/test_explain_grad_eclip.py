"""Grad-ECLIP (faithful mode): a slow per-example reference against the batched implementation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXTS

import mmelkit
from mmelkit.methods.base import get_method, pair_inputs
from mmelkit.methods.token import GradECLIP


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


def _official_reference(model: mmelkit.ClipAdapter, pixels: torch.Tensor, text: str) -> torch.Tensor:
    """The authors' recipe by hand for an open_clip ViT: rerun the last block as ONE head over the
    full width, differentiate the score w.r.t. that block's attention output, compare q and k after
    the output projection."""
    visual = model.model.visual
    block = visual.transformer.resblocks[-1]
    target = model.encode_text([text]).detach()[0]
    with model.trace(image_blocks=[-1]) as trace:
        model.encode_image(pixels[None])
    x = trace.image[-1].tokens_in.detach()[0]  # (L, D): input of the last block, unaffected by it
    width = x.shape[-1]
    q, k, v = torch.nn.functional.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, -1)
    o = (torch.softmax(q @ k.T / width**0.5, dim=-1) @ v).detach().requires_grad_(True)
    y = x + block.attn.out_proj(o)
    y = y + block.mlp(block.ln_2(y))
    feature = visual.ln_post(y[0]) @ visual.proj
    score = torch.dot(feature / feature.norm(), target)
    g, = torch.autograd.grad(score, o)
    projected_q, projected_k = block.attn.out_proj(q), block.attn.out_proj(k)
    cosines = torch.nn.functional.cosine_similarity(projected_q[0:1], projected_k[1:], dim=-1)
    lam = (cosines - cosines.min()) / (cosines.max() - cosines.min() + 1e-8)
    raw = (lam * (v[1:] * g[0]).sum(-1)).clamp_min(0).detach()
    return ((raw - raw.min()) / (raw.max() - raw.min())).reshape(trace.image[-1].grid)


def test_official_mode_matches_the_authors_recipe(images: torch.Tensor) -> None:
    from conftest import make_model

    adapter = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    pixels = adapter.preprocess(images)
    result = GradECLIP(adapter, mode="official").explain(pixels, TEXTS)
    for n in range(3):
        torch.testing.assert_close(result.maps[n], _official_reference(adapter, pixels[n], TEXTS[n]), atol=1e-4, rtol=0)
    faithful = GradECLIP(adapter).explain(pixels, TEXTS)
    assert not torch.allclose(result.maps, faithful.maps, atol=1e-3)
    with pytest.raises(ValueError, match="mode"):
        GradECLIP(adapter, mode="paper").explain(pixels, TEXTS)


def test_official_mode_runs_on_every_family(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    if adapter.family == "open_clip" and adapter.backend.image_tower().attention_kind == "open_clip":
        with pytest.raises(NotImplementedError, match="per-head"):
            GradECLIP(adapter, mode="official").explain(images, TEXTS)
        return
    result = GradECLIP(adapter, mode="official", layers=2).explain(images, TEXTS)
    assert torch.isfinite(result.maps).all() and (result.maps.amax(dim=(1, 2)) > 0).all()


def test_two_line_api_and_method_table(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    direct = GradECLIP(adapter, layers=2).explain(images, TEXTS)
    via_api = mmelkit.explain(adapter, images, TEXTS, method="grad_eclip", layers=2)
    torch.testing.assert_close(via_api.maps, direct.maps)
    assert via_api.method == "grad_eclip" and via_api.params["layers"] == 2 and via_api.texts == TEXTS
    table = mmelkit.list_methods()
    row = table.loc["grad_eclip"]
    assert row["level"] == "model" and row["granularity"] == "token" and "ICML 2024" in row["reference"]
    assert set(row["parameters"]) == {"layers", "key_similarity", "mode"}
