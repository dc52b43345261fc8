"""Localisation metrics: does a map point at the object it should?

Every metric takes a batch: ``maps`` (N, H, W), floating point, any finite real values, at image
resolution (upsample patch-grid maps first), and ``masks`` (N, H, W) bool, the ground-truth
region of each sample (for boxes, see :func:`box_masks`; to score several boxes or objects at once,
union their masks). Everything runs batched on the maps' device and returns one value per sample.

* :func:`pointing_game` -- does the maximum lie on the mask (within a tolerance)?
* :func:`energy_pointing_game` -- the share of the map's positive mass that lies on the mask.
* :func:`mask_iou` -- IoU of the binarised map with the mask.
* :func:`mask_precision`, :func:`mask_recall` -- the share of the binarised map on the mask, and of
  the mask the binarised map covers.
* :func:`mask_auroc` -- AUROC of the map's values as scores for "this pixel is on the mask".

On a constant map (no information) each metric gives its chance value: pointing and energy the
mask's area share, AUROC exactly 0.5; IoU, precision and recall give 0 (the binarised map is
empty).
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
import torch.nn.functional as F

from mmelkit._checks import did_you_mean, finite, non_negative_int
from mmelkit.methods.sanity import average_ranks

Ties = Literal["expected", "first"]
_TIES = ("expected", "first")


def _checked(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Validate a (maps, masks) batch (every mask non-empty); return the masks on the maps' device."""
    if not isinstance(maps, torch.Tensor) or not isinstance(masks, torch.Tensor):
        raise ValueError(
            f"maps and masks must be torch tensors; got {type(maps).__name__} and {type(masks).__name__}"
        )
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be (N, H, W) of the same shape"
        )
    if not maps.is_floating_point():
        raise ValueError(f"maps must be a floating-point tensor; got {maps.dtype}")
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor; got {masks.dtype}")
    finite("maps", maps)
    masks = masks.to(device=maps.device)
    if not masks.flatten(1).any(dim=1).all():
        empty = (~masks.flatten(1).any(dim=1)).nonzero()[:, 0].tolist()
        raise ValueError(f"every mask must contain at least one pixel; empty at batch index {empty[:10]}")
    return masks


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_tolerance(tolerance: int) -> int:
    """``tolerance`` as a non-negative integer of pixels, or a ValueError naming it."""
    return non_negative_int("tolerance", tolerance, unit="pixels")


def protocol_tolerance(image_size: int) -> int:
    """The pointing game's usual tolerance, 15 px at a 224 px input (Zhang et al., 2016; SPEC §4),
    scaled to an input of ``image_size`` pixels (4 px at 64): a patch-level map whose maximal patch
    covers a small object is not failed for peaking at the patch's centre, off the object's edge."""
    return round(15 * int(image_size) / 224)


def pointing_game(
    maps: torch.Tensor, masks: torch.Tensor, tolerance: int = 0, ties: Ties = "expected"
) -> torch.Tensor:
    """Hits of the pointing game (Zhang et al., 2016): whether each map's maximum lies on its mask.

    ``maps`` (N, H, W) at image resolution (upsample patch-grid maps first); ``masks`` (N, H, W)
    bool, the referred object(s). A maximum within ``tolerance`` pixels (Euclidean) of the mask
    counts as a hit (the usual protocol uses 15 px at about 224 px), i.e. the mask is grown by a
    disc of that radius (:func:`grow_masks`) before the lookup.

    Ties for the maximum (pixels exactly equal to it):

    * ``ties="expected"`` (default): the hit is the fraction of the tied maximal pixels that lie on
      the grown mask, the expected hit when the tie is broken uniformly at random. A map with a
      unique maximum scores 0 or 1; a constant map scores the grown mask's area share (chance).
    * ``ties="first"``: the first maximum in row-major order decides (0 or 1); a constant map
      points at pixel (0, 0). The pointing game as it was before ties were counted.

    Returns (N,) float32 in [0, 1] on the maps' device; the hit rate is its mean. An empty mask is
    an error (nothing to point at).
    """
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}; got {ties!r}." + did_you_mean(ties, _TIES))
    tolerance = check_tolerance(tolerance)
    masks = grow_masks(_checked(maps, masks), tolerance).flatten(1)
    flat = maps.flatten(1)
    if ties == "first":
        return masks.gather(1, flat.argmax(dim=1, keepdim=True))[:, 0].float()
    at_max = flat == flat.max(dim=1, keepdim=True).values
    return (at_max & masks).sum(dim=1).float() / at_max.sum(dim=1).float()


def grow_masks(masks: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Masks (N, H, W) grown by a disc of ``tolerance`` pixels (Euclidean), as bool."""
    radius = check_tolerance(tolerance)
    masks = masks.to(torch.bool)
    if not radius:
        return masks
    offsets = torch.arange(-radius, radius + 1, device=masks.device)
    disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).float()
    return F.conv2d(masks[:, None].float(), disc[None, None], padding=radius)[:, 0] > 0


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game (Wang et al., Score-CAM, 2020): the share of each map's mass on its mask.

    Only the non-negative part of the map is mass: ``sum(relu(map) * mask) / sum(relu(map))``.
    For a box, pass ``box_masks(boxes, (H, W))``. A map with no positive mass at all (all values
    <= 0, e.g. constant zero) carries no localisation: it scores the mask's area share, the value
    of a uniform map (chance). Values at the maximum need no tie rule (mass is additive).

    Returns (N,) float32 in [0, 1] on the maps' device. An empty mask is an error.
    """
    masks = _checked(maps, masks).flatten(1)
    mass = maps.flatten(1).double().clamp_min(0)  # sums in float64: no cancellation, no overflow
    total = mass.sum(dim=1)
    inside = (mass * masks).sum(dim=1)
    share = masks.double().mean(dim=1)
    has_mass = total > 0
    energy = torch.where(has_mass, inside / torch.where(has_mass, total, 1.0), share)
    return energy.clamp(0.0, 1.0).float()


def box_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boxes (N, 4) integer ``(x1, y1, x2, y2)`` -> masks (N, H, W) bool, ``size = (H, W)``.

    The far edges are exclusive: box n covers ``mask[n, y1:y2, x1:x2]``. Each box must be non-empty
    and lie inside the image (``0 <= x1 < x2 <= W``, ``0 <= y1 < y2 <= H``). One box per sample;
    for several, union the masks (``box_masks(a, s) | box_masks(b, s)``). On the boxes' device.
    """
    if not isinstance(boxes, torch.Tensor):
        raise ValueError(f"boxes must be a torch tensor; got {type(boxes).__name__}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) as (x1, y1, x2, y2); got shape {tuple(boxes.shape)}")
    if boxes.is_floating_point() or boxes.is_complex() or boxes.dtype == torch.bool:
        raise ValueError(f"boxes must be an integer tensor (pixel indices); got {boxes.dtype}")
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) for s in size) or min(size) <= 0:
        raise ValueError(f"size must be two positive integers (H, W); got {size!r}")
    height, width = size
    x1, y1, x2, y2 = boxes.long().unbind(dim=1)
    bad = (x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height) | (x2 <= x1) | (y2 <= y1)
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"box {index} {boxes[index].tolist()} must be non-empty and inside the {height}x{width} image "
            f"(0 <= x1 < x2 <= {width}, 0 <= y1 < y2 <= {height})"
        )
    rows = torch.arange(height, device=boxes.device)[None, :, None]
    cols = torch.arange(width, device=boxes.device)[None, None, :]
    inside_rows = (rows >= y1[:, None, None]) & (rows < y2[:, None, None])
    inside_cols = (cols >= x1[:, None, None]) & (cols < x2[:, None, None])
    return inside_rows & inside_cols


def binarise(maps: torch.Tensor, threshold: float = 0.5, top_fraction: float | None = None) -> torch.Tensor:
    """The binarised maps (N, H, W) bool that :func:`mask_iou` compares with the masks.

    Default: min-max normalise each map to [0, 1], ``(map - min) / (max - min)`` (in float64), and
    keep the pixels ``>= threshold``, ``0 < threshold <= 1``; pixels tied with a kept value are kept
    too. A constant map normalises to all zeros and keeps nothing.

    ``top_fraction`` (0 < f <= 1): keep the ``max(1, round(f * H * W))`` highest pixels of each
    map instead (Python's ``round``, halves to even; ``threshold`` is then ignored). Ties at the cut
    are broken by position: among equal values, the earlier pixel in row-major order is kept. A
    constant map keeps its first pixels.
    """
    if maps.ndim != 3 or not maps.is_floating_point():
        raise ValueError(
            f"maps must be a floating-point (N, H, W) tensor; got {maps.dtype} {tuple(maps.shape)}"
        )
    flat = maps.flatten(1)
    if top_fraction is not None:
        if not _is_number(top_fraction) or not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be a number in (0, 1]; got {top_fraction!r}")
        keep = max(1, round(top_fraction * flat.shape[1]))
        order = flat.sort(dim=1, descending=True, stable=True).indices[:, :keep]
        kept = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)
        return kept.view_as(maps)
    if not _is_number(threshold) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1]; got {threshold!r}")
    values = flat.double()
    low = values.min(dim=1, keepdim=True).values
    spread = values.max(dim=1, keepdim=True).values - low
    normalised = torch.where(spread > 0, (values - low) / torch.where(spread > 0, spread, 1.0), 0.0)
    return (normalised >= threshold).view_as(maps)


def mask_iou(
    maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5, top_fraction: float | None = None
) -> torch.Tensor:
    """Intersection over union of each binarised map with its mask.

    Binarisation (see :func:`binarise`): by default min-max normalise each map to [0, 1] and keep
    the pixels ``>= threshold`` (``0 < threshold <= 1``; ties with kept values are kept); with
    ``top_fraction`` keep that share of the highest pixels instead (``max(1, round(f * H * W))``
    of them; ties at the cut go to the earlier pixel in row-major order; ``threshold`` ignored).
    A constant map normalises to all zeros, keeps no pixel and scores IoU 0.

    Returns (N,) float32 in [0, 1] on the maps' device. An empty mask is an error (the union could
    be empty).
    """
    masks = _checked(maps, masks)
    predicted = binarise(maps, threshold, top_fraction)
    intersection = (predicted & masks).flatten(1).sum(dim=1)
    union = (predicted | masks).flatten(1).sum(dim=1)
    return intersection.float() / union.float()


def mask_precision(
    maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5, top_fraction: float | None = None
) -> torch.Tensor:
    """Precision of each binarised map against its mask: the share of kept pixels on the mask.

    Binarised as in :func:`mask_iou` (``threshold`` on the min-max normalised map, or the
    ``top_fraction`` highest pixels). A map that keeps no pixel (a constant one) scores 0, not NaN,
    so a batch mean stays defined. Returns (N,) float32 in [0, 1] on the maps' device.
    """
    masks = _checked(maps, masks)
    predicted = binarise(maps, threshold, top_fraction)
    hits = (predicted & masks).flatten(1).sum(dim=1).float()
    return hits / predicted.flatten(1).sum(dim=1).clamp_min(1).float()


def mask_recall(
    maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5, top_fraction: float | None = None
) -> torch.Tensor:
    """Recall of each binarised map against its mask: the share of the mask's pixels it keeps.

    Binarised as in :func:`mask_iou`. Returns (N,) float32 in [0, 1] on the maps' device; an empty
    mask is an error (there would be nothing to recall).
    """
    masks = _checked(maps, masks)
    predicted = binarise(maps, threshold, top_fraction)
    hits = (predicted & masks).flatten(1).sum(dim=1).float()
    return hits / masks.flatten(1).sum(dim=1).float()


def mask_auroc(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of the map's values as scores for "this pixel lies on the mask".

    Exact, via the Mann-Whitney U statistic: AUROC = P(s_in > s_out) + 0.5 * P(s_in == s_out) for a
    uniformly random pixel pair, one on the mask and one off it. Tied values share their average
    rank, so ties count one half: a constant map scores exactly 0.5, a map that is higher on every
    mask pixel than on every other pixel 1.0, its negation 0.0. Only the order of values matters.

    Returns (N,) float64 on the maps' device. A mask that is empty or covers the whole image is an
    error (no pairs, the AUROC is undefined).
    """
    masks = _checked(maps, masks).flatten(1)
    positives = masks.sum(dim=1)
    negatives = masks.shape[1] - positives
    if not (negatives > 0).all():
        full = (negatives == 0).nonzero()[:, 0].tolist()
        raise ValueError(
            f"a mask covering the whole image leaves no negatives (AUROC undefined); at batch index {full[:10]}"
        )
    ranks = average_ranks(maps.flatten(1))  # 0-based, float64
    positives = positives.double()
    u = (ranks * masks).sum(dim=1) - positives * (positives - 1) / 2
    return u / (positives * negatives.double())
