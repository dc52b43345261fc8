"""MMEL (reconstruction): a slow per-pair reference from the method's docstring, the relations to
Grad-ECLIP it must satisfy, and layer-weight calibration that saves and reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXTS

import mmelkit
from mmelkit.methods.token import MMEL, GradECLIP, LayerWeights
from mmelkit.methods.token.mmel import key_affinity, multi_scale

pytestmark = pytest.mark.usefixtures("one_thread")


def _minmax(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x - x.min()) / ((x.max() - x.min()) + eps)


def _reference(model: mmelkit.ClipAdapter, pixels: torch.Tensor, text: str, layers: int, theta: list[float],
               tau: float = 0.1, top_k: int = 16, gamma: float = 0.5, eta: float = 0.5) -> torch.Tensor:
    """One pair, every step written out with loops over layers, heads, patches and pooling cells."""
    target = model.encode_text([text]).detach()[0]
    blocks = list(range(-layers, 0))
    with model.trace(image_blocks=sorted(set(blocks) | {-1}), attention_probs=False) as trace:
        feature = model.encode_image(pixels[None], normalize=False)[0]
        score = torch.dot(feature / feature.norm(), target)
    records = [trace.image[b] for b in blocks]
    grads = torch.autograd.grad(score, [r.attn_out for r in records])
    h, w = records[0].grid
    patches = h * w
    alpha = torch.softmax(torch.tensor(theta), dim=0)
    combined = torch.zeros(h, w)
    for layer, (record, grad) in enumerate(zip(records, grads, strict=True)):
        heads, d = record.num_heads, record.head_dim
        raw = torch.zeros(patches)
        for head in range(heads):
            q_cls = record.q[0, head, 0]
            cos = torch.stack([F.cosine_similarity(q_cls, record.k[0, head, 1 + i], dim=0) for i in range(patches)])
            lam = _minmax(cos, 1e-8)
            for i in range(patches):
                raw[i] += lam[i] * torch.dot(grad[0, 0, head * d:(head + 1) * d], record.v[0, head, 1 + i])
        per_layer = _minmax(raw.clamp_min(0).detach(), 1e-12).reshape(h, w)
        # multi-scale: each cell of scale s averages the pixels it covers, then bilinear back
        scaled = torch.zeros(h, w)
        for s, beta in zip((1, 2, 4), (0.5, 0.3, 0.2), strict=True):
            rows, cols = -(-h // s), -(-w // s)
            pooled = torch.zeros(rows, cols)
            for r in range(rows):
                for c in range(cols):
                    pooled[r, c] = per_layer[r * s:(r + 1) * s, c * s:(c + 1) * s].mean()
            up = F.interpolate(pooled[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            scaled += beta * up
        # propagation: softmax over the top_k most similar keys of each patch
        keys = torch.cat([record.k[0, head, 1:] for head in range(heads)], dim=-1).detach()  # (P, D)
        flat = scaled.flatten()
        mixed = torch.zeros(patches)
        for i in range(patches):
            sims = torch.stack([F.cosine_similarity(keys[i], keys[j], dim=0) for j in range(patches)]) / tau
            top = sims.topk(min(top_k, patches)).indices
            weights = torch.softmax(sims[top], dim=0)
            mixed[i] = (weights * flat[top]).sum()
        combined += alpha[layer] * ((1 - gamma) * flat + gamma * mixed).reshape(h, w)
    # alignment from the last block's value path
    last = trace.image[-1]
    out_proj = model.backend.image_tower().attentions[-1].out_proj
    values = torch.cat([last.v[0, head, 1:] for head in range(last.num_heads)], dim=-1)
    z = model.project_image_tokens(out_proj(values)[None])[0]
    a = _minmax(F.cosine_similarity(z, target[None], dim=-1).clamp_min(0), 1e-8).reshape(h, w)
    return _minmax((combined * a**eta).detach(), 1e-12)


def test_batched_matches_slow_reference(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    theta = [0.3, -0.2]
    result = MMEL(adapter, layers=2, layer_weights=theta, top_k=5).explain(pixels, TEXTS)
    assert result.maps.shape == (3, 4, 4) and result.method == "mmel"
    for n in range(3):
        expected = _reference(adapter, pixels[n], TEXTS[n], 2, theta, top_k=5)
        torch.testing.assert_close(result.maps[n], expected, atol=1e-4, rtol=0)


def test_with_every_step_off_it_is_grad_eclip(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    off = {"multi_scale": False, "propagation": False, "alignment": False}
    one = MMEL(adapter, layers=1, **off).explain(images, TEXTS)
    torch.testing.assert_close(one.maps, GradECLIP(adapter, layers=1).explain(images, TEXTS).maps, atol=1e-5, rtol=0)
    # two layers, uniform weights: the normalised mean of the per-layer normalised maps
    steps = MMEL(adapter, layers=2, **off).explain_steps(images, TEXTS)
    mean = steps.per_layer.mean(dim=1)
    lo, hi = mean.flatten(1).min(1).values[:, None, None], mean.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(steps.final, (mean - lo) / (hi - lo), atol=1e-5, rtol=0)
    assert torch.equal(steps.alignment, torch.ones_like(steps.alignment))
    # gamma = 0 switches propagation off in effect
    torch.testing.assert_close(
        MMEL(adapter, layers=2, gamma=0.0).explain(images, TEXTS).maps,
        MMEL(adapter, layers=2, propagation=False).explain(images, TEXTS).maps, atol=1e-6, rtol=0)


def test_building_blocks() -> None:
    keys = torch.randn(2, 9, 6)
    affinity = key_affinity(keys, tau=0.1, top_k=4)
    torch.testing.assert_close(affinity.sum(-1), torch.ones(2, 9))
    assert ((affinity > 0).sum(-1) == 4).all()
    assert (affinity.diagonal(dim1=1, dim2=2) > 0).all(), "a patch is always among its own neighbours"
    dense = key_affinity(keys, tau=0.1, top_k=100)  # more than there are patches: a full softmax
    unit = F.normalize(keys, dim=-1)
    torch.testing.assert_close(dense, torch.softmax(unit @ unit.transpose(1, 2) / 0.1, dim=-1))
    maps = torch.rand(3, 5, 7)
    torch.testing.assert_close(multi_scale(maps, (1,), (1.0,)), maps)
    constant = torch.full((1, 5, 7), 0.4)
    torch.testing.assert_close(multi_scale(constant, (1, 2, 4), (0.5, 0.3, 0.2)), constant)
    with pytest.raises(ValueError):
        multi_scale(maps, (1, 2), (1.0,))
    with pytest.raises(ValueError):
        key_affinity(keys, tau=0.0, top_k=4)


def test_calibration_lowers_the_objective_and_round_trips(adapter: mmelkit.ClipAdapter, images: torch.Tensor,
                                                          tmp_path: Path) -> None:
    method = MMEL(adapter, layers=2)
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    fitted = method.calibrate(images, TEXTS, iterations=15, lr=0.3, progress=False)
    assert fitted.history[-1] < fitted.history[0]
    assert len(fitted.theta) == 2 and abs(sum(fitted.alpha) - 1) < 1e-6
    assert all(torch.equal(before[k], v) for k, v in adapter.model.state_dict().items()), "model untouched"
    path = fitted.save(tmp_path / "mmel-weights.json")
    reloaded = MMEL(adapter, layers=2, layer_weights=path).explain(images, TEXTS)
    torch.testing.assert_close(reloaded.maps, method.explain(images, TEXTS).maps, atol=1e-6, rtol=0)
    assert reloaded.params["layer_weights"] == pytest.approx(fitted.theta)
    uniform = MMEL(adapter, layers=2).explain(images, TEXTS)
    assert not torch.allclose(uniform.maps, reloaded.maps), "the fitted weights change the maps"
    with pytest.raises(ValueError, match="entries"):
        MMEL(adapter, layers=1, layer_weights=path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"alpha": [1.0]}))
    with pytest.raises(ValueError, match="layer-weights"):
        MMEL(adapter, layers=1, layer_weights=bad)
    assert LayerWeights.load(path).model == adapter.name


def test_batch_equals_single_and_model_untouched(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    method = MMEL(adapter, layers=2)
    before = adapter.score(pixels, TEXTS)
    with torch.no_grad():
        batch = method.explain(pixels, TEXTS)
    for n in range(3):
        torch.testing.assert_close(batch.maps[n], method.explain(pixels[n:n + 1], TEXTS[n]).maps[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter.score(pixels, TEXTS), before, atol=0, rtol=0)
    for block in adapter.backend.image_tower().blocks:
        assert not block._forward_hooks and not block._forward_pre_hooks


def test_bad_parameters(adapter: mmelkit.ClipAdapter) -> None:
    with pytest.raises(ValueError, match="layers"):
        MMEL(adapter, layers=9)
    with pytest.raises(ValueError, match="gamma"):
        MMEL(adapter, layers=1, gamma=2.0)
    with pytest.raises(ValueError, match="alignment_tokens"):
        MMEL(adapter, layers=1, alignment_tokens="cls")
    with pytest.raises(TypeError, match="no parameter"):
        MMEL(adapter, beta=1)
