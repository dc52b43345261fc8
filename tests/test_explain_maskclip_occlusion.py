"""MaskCLIP and occlusion: per-example references, and an oracle model that sees one patch only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXTS, make_open_clip
from torch import nn

import mmelkit
from mmelkit.methods.architecture import MaskCLIP
from mmelkit.methods.architecture.maskclip import value_path_embeddings
from mmelkit.methods.perturbation import Occlusion
from mmelkit.methods.perturbation.occlusion import window_drops


class OnePatchConv(nn.Module):
    """Patch embedding that lets the content of a single grid cell through (an oracle's eye)."""

    def __init__(self, conv: nn.Conv2d, cell: tuple[int, int]) -> None:
        super().__init__()
        self.conv, self.cell = conv, cell
        self.weight = conv.weight  # the backend reads the dtype from here

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.conv(pixels)
        keep = torch.zeros_like(out[:1, :1])
        keep[..., self.cell[0], self.cell[1]] = 1
        return out * keep


def oracle(cell: tuple[int, int]) -> mmelkit.ClipAdapter:
    model = make_open_clip(seed=21)
    model.visual.conv1 = OnePatchConv(model.visual.conv1, cell)
    return mmelkit.load_model(model, device="cpu")


def test_maskclip_matches_reference(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    pixels = adapter.preprocess(images)
    result = MaskCLIP(adapter).explain(pixels, TEXTS)
    attention = adapter.backend.image_tower().attentions[-1]
    for n in range(3):
        with adapter.trace(image_blocks=[-1]) as trace:
            adapter.encode_image(pixels[n : n + 1])
        record = trace.image[-1]
        target = adapter.encode_text([TEXTS[n]])[0]
        values = []
        for i in range(1, record.v.shape[2]):
            v_i = torch.cat([record.v[0, h, i] for h in range(record.num_heads)])  # heads concatenated
            z = adapter.project_image_tokens(attention.out_proj(v_i)[None, None])[0, 0]
            values.append(F.cosine_similarity(z, target, dim=0).clamp_min(0))
        expected = torch.stack(values).detach().reshape(record.grid)
        expected = (expected - expected.min()) / (expected.max() - expected.min()).clamp_min(1e-12)
        torch.testing.assert_close(result.maps[n], expected, atol=1e-4, rtol=0)


def test_occlusion_matches_a_window_by_window_reference(images: torch.Tensor) -> None:
    model = mmelkit.load_model(make_open_clip(seed=5), device="cpu")
    pixels = model.preprocess(images)
    result = Occlusion(model, window=16, stride=8, batch_size=3).explain(pixels, TEXTS)
    for n in range(3):
        base = model.score(pixels[n : n + 1], [TEXTS[n]])[0, 0]
        total, count = torch.zeros(32, 32), torch.zeros(32, 32)
        for top in (0, 8, 16):
            for left in (0, 8, 16):
                occluded = pixels[n : n + 1].clone()
                occluded[..., top : top + 16, left : left + 16] = 0
                total[top : top + 16, left : left + 16] += base - model.score(occluded, [TEXTS[n]])[0, 0]
                count[top : top + 16, left : left + 16] += 1
        pooled = F.avg_pool2d((total / count)[None, None], 8)[0, 0].clamp_min(0)
        expected = (pooled - pooled.min()) / (pooled.max() - pooled.min()).clamp_min(1e-12)
        torch.testing.assert_close(result.maps[n], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cell", [(0, 3), (2, 1)])
def test_occlusion_sees_only_the_patch_an_oracle_sees(images: torch.Tensor, cell: tuple[int, int]) -> None:
    model = oracle(cell)
    pixels = model.preprocess(images)
    windows = torch.zeros(16, 32, 32)
    for k in range(16):
        windows[k, (k // 4) * 8 : (k // 4) * 8 + 8, (k % 4) * 8 : (k % 4) * 8 + 8] = 1
    drops = window_drops(model, pixels, model.encode_text(TEXTS), windows, batch_size=5)
    seen = cell[0] * 4 + cell[1]
    assert (drops[:, seen].abs() > 1e-4).all(), "hiding the one visible patch must change the score"
    others = torch.cat([drops[:, :seen], drops[:, seen + 1 :]], dim=1)
    assert others.abs().max() < 1e-6, "hiding what the model cannot see must change nothing"


def test_occlusion_rejects_bad_windows(images: torch.Tensor) -> None:
    model = mmelkit.load_model(make_open_clip(seed=5), device="cpu")
    with pytest.raises(ValueError, match="window"):
        Occlusion(model, window=99).explain(images, TEXTS)


@pytest.mark.parametrize("inner_norm", [False, True])
def test_value_path_equals_the_attention_of_a_token_that_sees_only_itself(
    images: torch.Tensor, inner_norm: bool
) -> None:
    """Oracle: a sequence of one token attends only to itself, so open_clip's own attention module,
    run on each patch token alone, must give the value path (head scale and inner norm included)."""
    model = make_open_clip("custom", seed=3)
    visual = model.visual.transformer.resblocks
    with torch.no_grad():
        for block in visual:
            block.attn.head_scale.copy_(torch.linspace(0.3, 2.0, block.attn.head_scale.numel()).view_as(block.attn.head_scale))
            if inner_norm:  # open_clip's scale_attn_inner: a LayerNorm over the concatenated heads
                width = block.attn.out_proj.in_features
                block.attn.ln_inner = nn.LayerNorm(width)
                block.attn.ln_inner.weight.copy_(torch.linspace(0.5, 1.5, width))
                block.attn.ln_inner.bias.copy_(torch.linspace(-0.2, 0.2, width))
    adapter = mmelkit.load_model(model, device="cpu")
    pixels = adapter.preprocess(images)
    with torch.no_grad():
        with adapter.trace(image_blocks=[-1]) as trace:
            adapter.encode_image(pixels)
        record = trace.image[-1]
        fast = value_path_embeddings(adapter, record)  # (N, P, E)
        last = visual[-1]
        patches = record.tokens_in[:, record.num_prefix_tokens :]  # (N, P, D)
        alone = last.attn(last.ln_1(patches.reshape(-1, 1, patches.shape[-1])))  # each token its own sequence
        expected = adapter.project_image_tokens(alone.reshape(patches.shape))
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-4)
    # The old path (out_proj of the concatenated values alone) misses the head scale: it must differ.
    plain = adapter.project_image_tokens(last.attn.out_proj(record.v[:, :, record.num_prefix_tokens :].transpose(1, 2).flatten(2)))
    assert (plain - expected).abs().max() > 1e-3
