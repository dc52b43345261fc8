"""The shared core of the faithfulness metrics: rank pixels by a map, perturb them, re-embed.

Deletion, insertion, the retrieval protocol and the confidence metrics all do the same thing: build
copies of each image in which some pixels come from the image and the others from a *substrate*
(black, the image's mean colour, a blurred copy, fixed noise), embed the copies and score the
embeddings. Copies are built on the model's device, many images and steps per forward pass, never
one forward per perturbed image.

Pixel order: each map is upsampled (bilinear) to the model input and its pixels sorted from the
highest value down. Ties (a constant map, a flat background) are broken by one fixed random
permutation of the pixel positions drawn from ``seed``: a constant map then deletes pixels in a
random order, which is the chance baseline, instead of raster order, which is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmelkit._checks import did_you_mean, map_batch, positive_int
from mmelkit.methods.base import Explanation
from mmelkit.models.adapter import ClipAdapter

Substrate = Literal["black", "mean", "blur", "noise"]
Mode = Literal["deletion", "insertion"]
SUBSTRATES: tuple[str, ...] = ("black", "mean", "blur", "noise")
MODES: tuple[str, ...] = ("deletion", "insertion")


def as_map_tensor(maps: Explanation | torch.Tensor, count: int) -> torch.Tensor:
    """``maps`` as a float32 (N, h, w) tensor, checked: three dimensions, ``count`` maps, finite."""
    if isinstance(maps, Explanation):
        maps = maps.maps
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"maps must be an Explanation or a tensor (N, h, w); got {type(maps).__name__}")
    return map_batch(maps, count)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) maps resized to ``size`` with bilinear interpolation (no-op at the same size)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def check_fractions(fractions: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Fractions of pixels as a float64 CPU tensor: increasing, within [0, 1], at least two."""
    values = torch.as_tensor(fractions, dtype=torch.float64).flatten()
    if values.numel() < 2:
        raise ValueError("need at least two fractions to draw a curve")
    if not torch.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ValueError(f"fractions must lie in [0, 1]; got {values.tolist()}")
    if not (values[1:] > values[:-1]).all():
        raise ValueError("fractions must be strictly increasing")
    return values


def even_fractions(steps: int, max_fraction: float = 1.0) -> torch.Tensor:
    """``steps + 1`` evenly spaced fractions from 0 to ``max_fraction``."""
    positive_int("steps", steps)
    if not 0 < max_fraction <= 1:
        raise ValueError(f"max_fraction must lie in (0, 1]; got {max_fraction}")
    return torch.linspace(0.0, max_fraction, steps + 1, dtype=torch.float64)


def pixel_ranks(maps: torch.Tensor, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Rank of every pixel (0 = most important) for maps (N, h, w) upsampled to ``size``: (N, H*W).

    Ties are broken by a fixed random permutation of the positions (seeded), the same for all maps.
    The upsampling runs in float64 and is rounded back to float32: in float32, interpolating a flat
    region (w * c + (1 - w) * c) scatters it over neighbouring floats in a periodic pattern, which
    would break its ties by position instead of by the permutation.
    """
    flat = upsample_maps(maps.double(), size).float().flatten(1)
    generator = torch.Generator().manual_seed(seed)
    shuffle = torch.randperm(flat.shape[1], generator=generator).to(flat.device)
    # A stable descending sort of the shuffled values keeps tied pixels in shuffled order.
    order = shuffle[torch.sort(flat[:, shuffle], dim=1, descending=True, stable=True).indices]
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def substrate_pixels(
    model: ClipAdapter,
    pixels: torch.Tensor,
    kind: Substrate,
    seed: int = 0,
    blur_sigma: float | None = None,
) -> torch.Tensor:
    """What removed pixels become, as model input (N, 3, H, W) like ``pixels``.

    * ``black``: pixel value 0 (before the model's normalisation);
    * ``mean``: each image's mean colour;
    * ``blur``: a Gaussian blur of the image, ``blur_sigma`` pixels (default 5 px at 224 px, as in
      Petsiuk et al., scaled to the input), kernel cut at 3 sigma, edges reflected;
    * ``noise``: uniform noise in [0, 1] per pixel and channel, one fixed image drawn from ``seed``
      (the same for every sample, so that shards and batches agree).
    """
    if kind not in SUBSTRATES:
        raise ValueError(f"unknown substrate {kind!r};{did_you_mean(kind, SUBSTRATES)} substrates: {', '.join(SUBSTRATES)}")
    mean = torch.tensor(model.backend.image_mean, device=pixels.device, dtype=torch.float32)[:, None, None]
    std = torch.tensor(model.backend.image_std, device=pixels.device, dtype=torch.float32)[:, None, None]
    height, width = pixels.shape[-2:]
    if kind == "black":
        out = ((0.0 - mean) / std).expand_as(pixels)
    elif kind == "mean":
        out = pixels.float().mean(dim=(-2, -1), keepdim=True).expand_as(pixels)
    elif kind == "noise":
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand((3, height, width), generator=generator).to(pixels.device)
        out = ((noise - mean) / std).expand_as(pixels)
    else:
        sigma = blur_sigma if blur_sigma is not None else 5.0 * height / 224
        out = gaussian_blur(pixels.float(), sigma)
    return out.to(pixels.dtype)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with standard deviation ``sigma`` pixels."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)  # reflect padding needs < size
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), horizontal, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), vertical, groups=channels)


class _Perturbation(NamedTuple):
    """Everything a perturbation path needs: copy (sample, step) keeps ``start`` where the pixel's
    rank is below ``counts[step]`` and ``end`` elsewhere."""

    ranks: torch.Tensor  # (N, H*W)
    counts: torch.Tensor  # (S,) pixels taken from ``start`` at each step
    start: torch.Tensor  # (N, 3, H, W)
    end: torch.Tensor  # (N, 3, H, W)
    size: tuple[int, int]


def _prepare(model: ClipAdapter, images: Any, maps: Explanation | torch.Tensor, fractions: Sequence[float] | torch.Tensor,
             mode: Mode, substrate: Substrate, seed: int) -> _Perturbation:
    if mode not in MODES:
        raise ValueError(f"mode must be 'deletion' or 'insertion'; got {mode!r}." + did_you_mean(mode, MODES))
    pixels = model.as_pixels(images)
    if len(pixels) == 0:
        raise ValueError("no images given")
    maps = as_map_tensor(maps, len(pixels)).to(pixels.device)
    steps = check_fractions(fractions)
    size = (pixels.shape[-2], pixels.shape[-1])
    counts = torch.round(steps * size[0] * size[1]).long().to(pixels.device)
    fill = substrate_pixels(model, pixels, substrate, seed)
    # deletion: the top pixels come from the substrate; insertion: the top pixels are the image's
    start, end = (pixels, fill) if mode == "insertion" else (fill, pixels)
    return _Perturbation(pixel_ranks(maps, size, seed), counts, start, end, size)


def perturbed_features(
    model: ClipAdapter,
    images: Any,
    maps: Explanation | torch.Tensor,
    fractions: Sequence[float] | torch.Tensor,
    mode: Mode = "deletion",
    substrate: Substrate = "black",
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Unit image embeddings of every image at every fraction: (N, S, E) float32 on the model's device.

    ``deletion``: the top ``fraction`` of each image's pixels (by its map) is replaced by the
    substrate. ``insertion``: the image starts as the substrate and its top pixels are put back.
    ``batch_size`` perturbed copies go through the model per forward pass.
    """
    positive_int("batch_size", batch_size)
    path = _prepare(model, images, maps, fractions, mode, substrate, seed)
    count, num_steps = len(path.start), len(path.counts)
    total = count * num_steps
    features: list[torch.Tensor] = []
    with torch.no_grad(), tqdm(total=total, disable=not progress, desc=mode, unit="img", leave=False) as bar:
        for first in range(0, total, batch_size):
            pair = torch.arange(first, min(first + batch_size, total), device=path.start.device)
            sample, step = pair // num_steps, pair % num_steps
            top = (path.ranks[sample] < path.counts[step][:, None]).view(-1, 1, *path.size)
            batch = torch.where(top, path.start[sample], path.end[sample])
            features.append(model.encode_image(batch).float())
            bar.update(len(pair))
    return torch.cat(features).view(count, num_steps, -1)


def perturbed_images(
    model: ClipAdapter,
    images: Any,
    maps: Explanation | torch.Tensor,
    fractions: Sequence[float] | torch.Tensor,
    mode: Mode = "deletion",
    substrate: Substrate = "black",
    seed: int = 0,
) -> torch.Tensor:
    """The perturbed copies themselves, (N, S, 3, H, W) model input: what
    :func:`perturbed_features` embeds, for looking at (keep N and S small)."""
    path = _prepare(model, images, maps, fractions, mode, substrate, seed)
    top = (path.ranks[:, None, :] < path.counts[None, :, None]).view(len(path.start), len(path.counts), 1, *path.size)
    return torch.where(top, path.start[:, None], path.end[:, None])


def trapezoid_auc(fractions: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Area under score curves (..., S) by the trapezoid rule over the fractions rescaled to [0, 1]
    (divided by the last fraction), so a curve at 1 everywhere has area 1 whatever the range."""
    x = fractions.to(device=scores.device, dtype=torch.float64)
    x = (x - x[0]) / (x[-1] - x[0])
    return torch.trapezoid(scores.double(), x, dim=-1).to(scores.dtype)
