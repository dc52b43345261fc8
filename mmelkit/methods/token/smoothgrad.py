"""SmoothGrad (Smilkov et al., 2017): the input gradient averaged over noisy copies of the image.

For a pair (x, t) with S(x) = cos(f_I(x), f_T(t)):

    g(x) = mean_k dS/dx at x + sigma * eps_k,   eps_k ~ N(0, I),   sigma = noise * (max x - min x)

with the range taken over the pair's own normalised model input (the paper's "noise level" times
the input's value range). The map is sum over channels of |g|, average-pooled to the patch grid
and min-max normalised.

Reproducibility: eps_1..eps_m are drawn on the CPU from a generator seeded with ``seed`` (the same
numbers on every device) and are shared by all pairs, so a pair's result does not depend on what
else is in the batch, on ``batch_size`` or on the device's random stream. All noisy copies go
through the model ``batch_size`` at a time.
"""

from __future__ import annotations

from typing import Any

import torch

from mmelkit._checks import positive_int
from mmelkit.methods.base import (
    Explanation,
    Method,
    normalise_maps,
    pair_inputs,
    register,
    text_features,
)
from mmelkit.methods.token.integrated_gradients import averaged_input_gradients, pool_to_grid
from mmelkit.models.adapter import ClipAdapter, TextLike


def unit_noise(samples: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """eps_1..eps_samples ~ N(0, I) of ``shape`` each, float32 on the CPU, fixed by ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(samples, *shape, generator=generator)


def check_params(samples: Any, noise: Any, seed: Any, batch_size: Any) -> None:
    """ValueError naming the first bad SmoothGrad parameter, if any."""
    positive_int("samples", samples)
    positive_int("batch_size", batch_size)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a number >= 0 (a fraction of the input's range); got {noise!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")


def smoothgrad(
    model: ClipAdapter,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    samples: int = 32,
    noise: float = 0.15,
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Mean gradient of S over ``samples`` noisy copies of each image, float32 (N, 3, H, W).

    ``pixels``: normalised model input (N, 3, H, W); ``targets``: unit text features (N, E).
    ``noise``: noise std as a fraction of each image's value range (0 gives the plain gradient).
    The noise (samples, 3, H, W) is drawn on the CPU (the same on every device) and moved to the
    device once.
    """
    check_params(samples, noise, seed, batch_size)
    if len(pixels) != len(targets):
        raise ValueError(f"got {len(pixels)} images and {len(targets)} targets; pass one target per image")
    pixels = pixels.detach()
    flat = pixels.flatten(1)
    sigma = noise * (flat.max(dim=1).values - flat.min(dim=1).values)  # (N,), per image
    eps = unit_noise(samples, tuple(pixels.shape[1:]), seed).to(pixels.device, pixels.dtype)

    def noisy_copies(pair: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return pixels[pair] + sigma[pair].view(-1, 1, 1, 1) * eps[sample]

    return averaged_input_gradients(model, targets, len(pixels), samples, noisy_copies, batch_size)


@register
class SmoothGrad(Method):
    name = "smoothgrad"
    family = "gradient"
    reference = "Smilkov et al., SmoothGrad: removing noise by adding noise, arXiv 1706.03825, 2017"
    defaults: dict[str, Any] = {"samples": 32, "noise": 0.15, "seed": 0, "batch_size": 64}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        model = self.model
        params = self.params
        check_params(params["samples"], params["noise"], params["seed"], params["batch_size"])  # fail fast
        pixels, tokens = pair_inputs(model, images, texts)
        targets = text_features(model, tokens)
        grads = smoothgrad(
            model, pixels, targets, params["samples"], params["noise"], params["seed"], params["batch_size"]
        )
        with torch.no_grad():
            maps = pool_to_grid(model, grads.abs().sum(dim=1))
        return Explanation(normalise_maps(maps), tuple(pixels.shape[-2:]), self.name, dict(self.params), tokens.texts)
