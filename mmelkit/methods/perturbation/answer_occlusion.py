"""Visual-token occlusion of a generative VLM's answer (SPEC §6): windows of k x k visual tokens
(stride s over the patch grid) are replaced by the image's mean visual token, and the map of a
token is the mean drop of the target over the windows that cover it, its positive part.

Every (row, window) copy goes through the decoder ``batch_size`` copies at a time; the vision
tower and projector run once per image.
"""

from __future__ import annotations

from typing import Any

import torch

from mmelkit._checks import positive_int
from mmelkit.methods.answers import AnswerTarget, VlmMethod, chunked_rows, clean_visual_tokens, target_score
from mmelkit.methods.base import register
from mmelkit.models.vlm.adapter import VlmAdapter


def token_windows(grid: tuple[int, int], window: int, stride: int) -> torch.Tensor:
    """(W, V) bool: which visual tokens each k x k window (stride s, covering the grid's edges) holds."""
    rows, cols = grid
    window, stride = positive_int("window", window), positive_int("stride", stride)
    if window > min(rows, cols):
        raise ValueError(f"window {window} is larger than the {rows} x {cols} grid of visual tokens")

    def starts(size: int) -> list[int]:
        found = list(range(0, size - window + 1, stride))
        return found if found[-1] == size - window else [*found, size - window]  # the last edge too

    masks = []
    for top in starts(rows):
        for left in starts(cols):
            mask = torch.zeros(rows, cols, dtype=torch.bool)
            mask[top : top + window, left : left + window] = True
            masks.append(mask.flatten())
    return torch.stack(masks)


def occlusion_drops(
    vlm: VlmAdapter, target: AnswerTarget, windows: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """(N, W) float32: Target(clean) - Target(window w replaced by the mean visual token)."""
    batch_size = positive_int("batch_size", batch_size)
    visual = clean_visual_tokens(vlm, target)
    filler = visual.mean(dim=1, keepdim=True)  # (N, 1, D)
    # windows lie on the patch grid; a leading CLS token ("full" strategy) is never occluded
    windows = torch.nn.functional.pad(windows.to(visual.device), (visual.shape[1] - windows.shape[1], 0), value=False)
    count = len(windows)
    with torch.no_grad():
        clean = target_score(vlm, target, visual)
        occluded = torch.empty(len(target) * count, device=visual.device, dtype=torch.float32)
        for flat in chunked_rows(len(target) * count, batch_size, visual.device):
            row, window = flat // count, flat % count
            hidden = windows[window][..., None]  # (B, V, 1)
            copies = torch.where(hidden, filler[row], visual[row])
            occluded[flat] = target_score(vlm, target.select(row), copies)
    return clean[:, None] - occluded.view(len(target), count)


@register
class AnswerOcclusion(VlmMethod):
    name = "answer_occlusion"
    level = "data"
    granularity = "input"
    family = "perturbation"
    reference = "Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014 (on visual tokens)"
    defaults: dict[str, Any] = {"window": 2, "stride": 1, "batch_size": 64}

    def visual_values(self, target: AnswerTarget) -> torch.Tensor:
        windows = token_windows(self.vlm.grid, self.params["window"], self.params["stride"])
        drops = occlusion_drops(self.vlm, target, windows, self.params["batch_size"])
        cover = windows.to(drops.device).float()  # (W, V)
        return (drops @ cover / cover.sum(dim=0).clamp(min=1)).clamp(min=0)
