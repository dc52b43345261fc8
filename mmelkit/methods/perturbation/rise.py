"""RISE (Petsiuk et al., BMVC 2018): score randomly masked copies, average the masks by score.

With masks M_1..M_N and S = cos(f_I, f_T) (the raw cosine, no softmax):

    saliency(u) = sum_k S(I * M_k) M_k(u) / (N p)

The masks follow the paper's recipe: a binary s x s grid with cells kept with probability p,
bilinearly upsampled to (s + 1) * cell pixels per side (cell = ceil(side / s)) and cropped to the
image at a random offset in [0, cell) per axis, which gives soft edges at random sub-cell
positions. Masking happens in normalised model input, so a masked-out pixel becomes 0 there: the
dataset mean colour, the substrate occlusion uses too.

Masks are rendered on the model's device ``batch_size`` at a time from small (N, s, s) grids and
(N, 2) offsets drawn on the CPU from ``seed`` (the same masks on every device, for every pair and
any ``batch_size``). Pairs that share an image (one image with many texts) encode each masked
copy once and score all their texts against those features.

The pixel saliency is average-pooled to the patch grid and min-max normalised. It is not clamped
first: with a raw cosine the sum can be negative everywhere, and clamping would erase the map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmelkit._checks import positive_int
from mmelkit.methods.base import (
    Explanation,
    Method,
    normalise_maps,
    pair_inputs,
    register,
    text_features,
)
from mmelkit.models.adapter import ClipAdapter, TextLike


@dataclass
class RiseMasks:
    """N RISE masks for one image size, stored compactly and rendered on demand.

    ``grids`` (N, s, s) of 0/1 and ``offsets`` (N, 2) crop offsets (top, left), both on ``device``;
    ``cell`` the (height, width) of one grid cell in pixels; ``size`` the image (H, W); ``p`` the
    keep probability the grids were drawn with.
    """

    grids: torch.Tensor
    offsets: torch.Tensor
    cell: tuple[int, int]
    size: tuple[int, int]
    p: float

    def __len__(self) -> int:
        return len(self.grids)

    def render(self, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Masks ``start`` to ``stop`` (exclusive) as (B, H, W) values in [0, 1]."""
        grids = self.grids[start:stop]
        s_h, s_w = grids.shape[-2:]
        upsized = (s_h + 1) * self.cell[0], (s_w + 1) * self.cell[1]
        # Bilinear with half-pixel centres, in float32; the clamp removes rounding just above 1.
        smooth = F.interpolate(grids[:, None].float(), size=upsized, mode="bilinear", align_corners=False)[:, 0]
        smooth = smooth.clamp_(0, 1)
        height, width = self.size
        # every mask's crop in one gather, on the device (no per-mask loop, no host round trip)
        offsets = self.offsets[start:stop]
        rows = offsets[:, 0, None] + torch.arange(height, device=offsets.device)  # (B, H)
        cols = offsets[:, 1, None] + torch.arange(width, device=offsets.device)  # (B, W)
        batch = torch.arange(len(offsets), device=offsets.device)[:, None, None]
        return smooth[batch, rows[:, :, None], cols[:, None, :]].to(dtype)


def rise_masks(
    count: int,
    size: tuple[int, int],
    cells: int = 8,
    p: float = 0.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> RiseMasks:
    """Draw ``count`` RISE masks for images of ``size`` (H, W) on a ``cells`` x ``cells`` grid.

    Each grid cell is kept (1) with probability ``p``; the crop offset is uniform in [0, cell)
    per axis. The random numbers come from a CPU generator seeded with ``seed``.
    """
    count = positive_int("masks", count)
    cells = positive_int("cells", cells)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
        raise ValueError(f"p (the probability of keeping a cell) must lie strictly between 0 and 1; got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    height, width = size
    cell = (math.ceil(height / cells), math.ceil(width / cells))
    generator = torch.Generator().manual_seed(seed)
    grids = (torch.rand(count, cells, cells, generator=generator) < p).to(torch.uint8)
    tops = torch.randint(0, cell[0], (count,), generator=generator)
    lefts = torch.randint(0, cell[1], (count,), generator=generator)
    offsets = torch.stack([tops, lefts], dim=1)
    return RiseMasks(grids.to(device), offsets.to(device), cell, (height, width), float(p))


def rise_saliency(
    model: ClipAdapter, pixels: torch.Tensor, targets: torch.Tensor, masks: RiseMasks, batch_size: int = 250
) -> torch.Tensor:
    """Pixel saliency sum_k S(I_n * M_k) M_k / (N p) per pair n, float32 (N_pairs, H, W).

    ``pixels``: normalised model input (N_pairs, 3, H, W); ``targets``: unit text features
    (N_pairs, E). Identical images are encoded once per mask and scored against all their texts.
    """
    batch_size = positive_int("batch_size", batch_size)
    if len(pixels) != len(targets):
        raise ValueError(f"got {len(pixels)} images and {len(targets)} targets; pass one target per image")
    if tuple(pixels.shape[-2:]) != masks.size:
        raise ValueError(f"masks are for images of size {masks.size}; got {tuple(pixels.shape[-2:])}")
    with torch.no_grad():
        # Group the pairs by image: exact duplicates (e.g. one image expanded over many texts) share
        # one forward per masked copy.
        images, which = torch.unique(pixels.flatten(1), dim=0, return_inverse=True)
        images = images.view(-1, *pixels.shape[1:])
        groups = [torch.nonzero(which == u).flatten() for u in range(len(images))]
        saliency = torch.zeros(len(pixels), *masks.size, device=pixels.device, dtype=torch.float32)
        for start in range(0, len(masks), batch_size):
            chunk = masks.render(start, start + batch_size)  # (B, H, W) float32
            chunk_in = chunk.to(pixels.dtype)[:, None]
            for image, pairs in zip(images, groups, strict=True):
                features = F.normalize(model.encode_image(image[None] * chunk_in, normalize=False), dim=-1)
                scores = features.float() @ targets[pairs].float().T  # (B, pairs): raw cosines
                saliency[pairs] += torch.einsum("bn,bhw->nhw", scores, chunk)
    return saliency / (len(masks) * masks.p)


@register
class RISE(Method):
    name = "rise"
    level = "data"
    granularity = "input"
    family = "perturbation"
    reference = "Petsiuk et al., RISE: Randomized Input Sampling for Explanation of Black-box Models, BMVC 2018"
    defaults: dict[str, Any] = {"masks": 2000, "cells": 8, "p": 0.5, "seed": 0, "batch_size": 250}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        model = self.model
        params = self.params
        batch_size = positive_int("batch_size", params["batch_size"])
        pixels, tokens = pair_inputs(model, images, texts)
        size = tuple(pixels.shape[-2:])
        masks = rise_masks(params["masks"], size, params["cells"], params["p"], params["seed"], pixels.device)
        targets = text_features(model, tokens)
        saliency = rise_saliency(model, pixels, targets, masks, batch_size)
        with torch.no_grad():
            maps = F.avg_pool2d(saliency[:, None], kernel_size=model.patch_size)[:, 0]
        return Explanation(normalise_maps(maps), size, self.name, dict(self.params), tokens.texts)
