"""Localisation metrics: does a map point at the object it should?"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """Hits of the pointing game (Zhang et al., 2016): whether each map's maximum lies on its mask.

    ``maps`` (N, H, W) at image resolution (upsample patch-grid maps first); ``masks`` (N, H, W)
    bool, the referred object(s). A hit within ``tolerance`` pixels of the mask counts (the usual
    protocol uses 15 px at about 224 px). Ties for the maximum: the first in row-major order.
    Returns (N,) bool on the maps' device. An empty mask is an error (nothing to point at); a
    constant map points at pixel (0, 0).
    """
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be (N, H, W)")
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")
    masks = masks.to(device=maps.device, dtype=torch.bool)
    if not masks.flatten(1).any(dim=1).all():
        raise ValueError("every mask must contain at least one pixel")
    masks = grow_masks(masks, tolerance)
    flat = maps.flatten(1).argmax(dim=1)
    return masks.flatten(1).gather(1, flat[:, None])[:, 0]


def grow_masks(masks: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Masks (N, H, W) grown by a disc of ``tolerance`` pixels (Euclidean), as bool."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be non-negative; got {tolerance}")
    masks = masks.to(torch.bool)
    if not tolerance:
        return masks
    radius = int(tolerance)
    offsets = torch.arange(-radius, radius + 1, device=masks.device)
    disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).float()
    return F.conv2d(masks[:, None].float(), disc[None, None], padding=radius)[:, 0] > 0
