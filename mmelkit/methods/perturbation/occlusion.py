"""Occlusion (Zeiler & Fergus, 2014): slide a grey window over the image, record the score drop.

For window size w and stride s, every window position gives S(I) - S(I with the window replaced
by the substrate); each pixel gets the mean drop of the windows covering it, and the map is that
averaged over each patch of the model's grid (with w = s = patch size: one window per patch).
The substrate is the dataset mean colour (zero in normalised model input). All occluded copies
go through the model in batches of ``batch_size``: never one forward per window.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmelkit.methods.base import (
    Explanation,
    Method,
    normalise_maps,
    pair_inputs,
    paired_cosine,
    register,
    text_features,
)
from mmelkit.models.adapter import ClipAdapter, TextLike


def window_drops(
    model: ClipAdapter, pixels: torch.Tensor, targets: torch.Tensor, windows: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """S(I) - S(I with window k set to the substrate) for every pair n and window k: (N, K).

    ``windows`` (K, H, W) holds 1 inside each window. The substrate is 0 in normalised model
    input, i.e. the dataset mean colour. Occluded copies go through the model ``batch_size`` at a time.
    """
    with torch.no_grad():
        base = paired_cosine(model.encode_image(pixels, normalize=False), targets)
        drops = torch.empty(len(pixels), len(windows), device=pixels.device)
        for n in range(len(pixels)):
            for start in range(0, len(windows), batch_size):
                occluded = pixels[n] * (1 - windows[start : start + batch_size, None])
                scores = paired_cosine(model.encode_image(occluded, normalize=False), targets[n : n + 1])
                drops[n, start : start + batch_size] = base[n] - scores
    return drops


@register
class Occlusion(Method):
    name = "occlusion"
    level = "data"
    granularity = "input"
    family = "perturbation"
    reference = "Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014"
    defaults: dict[str, Any] = {"window": None, "stride": None, "batch_size": 256}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        model = self.model
        pixels, tokens = pair_inputs(model, images, texts)
        targets = text_features(model, tokens)
        patch = model.patch_size[0]
        window = int(self.params["window"] or patch)
        stride = int(self.params["stride"] or window)
        height, width = pixels.shape[-2:]
        if not (1 <= window <= min(height, width) and stride >= 1):
            raise ValueError(f"window must lie in 1..{min(height, width)} and stride be positive")
        tops = list(range(0, height - window + 1, stride))
        lefts = list(range(0, width - window + 1, stride))
        windows = torch.zeros(len(tops) * len(lefts), height, width, device=pixels.device, dtype=pixels.dtype)
        for k, (top, left) in enumerate((t, lft) for t in tops for lft in lefts):
            windows[k, top : top + window, left : left + window] = 1
        drops = window_drops(model, pixels, targets, windows, int(self.params["batch_size"]))
        with torch.no_grad():
            coverage = windows.sum(dim=0).clamp_min(1)  # windows covering each pixel
            per_pixel = torch.einsum("nk,khw->nhw", drops, windows.float()) / coverage.float()
            maps = F.avg_pool2d(per_pixel[:, None], kernel_size=model.patch_size)[:, 0].clamp_min(0)
        return Explanation(normalise_maps(maps), (height, width), self.name, dict(self.params), tokens.texts)
