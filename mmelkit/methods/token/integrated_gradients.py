"""Integrated Gradients on pixels (Sundararajan et al., 2017).

For a pair (image x, text t) with S(x) = cos(f_I(x), f_T(t)) and a baseline image x':

    IG(x) = (x - x') * mean_k dS/dx at x' + alpha_k (x - x'),   alpha_k = (k - 1/2) / m, k = 1..m

i.e. the path integral of the gradient along the straight line from x' to x, estimated with the
**midpoint** Riemann rule over m steps. The midpoint rule's error falls as 1/m^2 (the right rule's
as 1/m), so the completeness gap sum(IG) - (S(x) - S(x')) closes faster for the same cost.

Baselines, both in the model's normalised input space:

* ``"black"`` (default): black pixels, i.e. (0 - mean) / std per channel with the model's own
  preprocessing mean and std;
* ``"zero"``: 0 in normalised input, i.e. the dataset mean colour (the occlusion substrate).

The map is sum over channels of |IG|, average-pooled to the patch grid and min-max normalised.
:func:`integrated_gradients` returns the raw pixel attribution (N, 3, H, W) for those who need it.
All interpolation points of all pairs go through the model ``batch_size`` at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mmelkit._checks import positive_int
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

BASELINES = ("black", "zero")


def baseline_pixels(model: ClipAdapter, baseline: str | torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The baseline x' for ``pixels`` (N, 3, H, W), in normalised model input, same shape.

    ``"black"``: intensity 0 pushed through the model's normalisation, (0 - mean) / std.
    ``"zero"``: 0 in normalised input (the mean colour). A tensor is broadcast to ``pixels``.
    """
    if isinstance(baseline, torch.Tensor):
        try:
            return baseline.to(pixels.device, pixels.dtype).expand_as(pixels)
        except RuntimeError:
            raise ValueError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the input {tuple(pixels.shape)}"
            ) from None
    if baseline == "zero":
        return torch.zeros_like(pixels)
    if baseline == "black":
        mean = torch.tensor(model.backend.image_mean, device=pixels.device, dtype=torch.float32)
        std = torch.tensor(model.backend.image_std, device=pixels.device, dtype=torch.float32)
        return (-mean / std).to(pixels.dtype).view(1, 3, 1, 1).expand_as(pixels)
    raise ValueError(f"baseline must be one of {BASELINES} or a tensor; got {baseline!r}")


def averaged_input_gradients(
    model: ClipAdapter,
    targets: torch.Tensor,
    count: int,
    points: int,
    make_inputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int,
) -> torch.Tensor:
    """mean_k dS_n/dx at ``make_inputs(n, k)`` for pairs n < ``count`` and points k < ``points``.

    The count * points inputs are enumerated pair-major and sent through the model ``batch_size``
    at a time (so one chunk may mix pairs). ``make_inputs(n, k)`` gets two index vectors of the
    chunk's length and returns those inputs (B, 3, H, W). ``targets``: unit text features (count, E).
    Returns float32 (count, 3, H, W) on the model's device. Gradients go to the inputs only: the
    parameters' ``.grad`` is never touched.
    """
    total = None
    with torch.enable_grad():  # explanations work inside a caller's no_grad block too
        for start in range(0, count * points, batch_size):
            flat = torch.arange(start, min(start + batch_size, count * points), device=targets.device)
            pair, point = flat // points, flat % points
            inputs = make_inputs(pair, point).detach().requires_grad_(True)
            score = paired_cosine(model.encode_image(inputs, normalize=False), targets[pair])
            # Each score depends on its own input only (no cross-sample layers in a CLIP image
            # tower), so the gradient of the sum is every sample's own gradient.
            (grad,) = torch.autograd.grad(score.sum(), inputs)
            if total is None:
                total = torch.zeros(count, *grad.shape[1:], device=grad.device, dtype=torch.float32)
            total.index_add_(0, pair, grad.float())
    return total / points


def integrated_gradients(
    model: ClipAdapter,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 32,
    baseline: str | torch.Tensor = "black",
    batch_size: int = 64,
) -> torch.Tensor:
    """Pixel attribution (x - x') * mean_k dS/dx(x' + alpha_k (x - x')), float32 (N, 3, H, W).

    ``pixels``: normalised model input (N, 3, H, W); ``targets``: unit text features (N, E), one
    per pair. ``steps`` m with midpoints alpha_k = (k - 1/2) / m. ``baseline``: ``"black"``,
    ``"zero"`` or a tensor broadcastable to ``pixels`` (see :func:`baseline_pixels`). The sum of the
    attribution approximates S(x) - S(x') (completeness), up to the O(1/m^2) midpoint error.
    """
    steps = positive_int("steps", steps)
    batch_size = positive_int("batch_size", batch_size)
    if len(pixels) != len(targets):
        raise ValueError(f"got {len(pixels)} images and {len(targets)} targets; pass one target per image")
    pixels = pixels.detach()
    base = baseline_pixels(model, baseline, pixels)
    delta = pixels - base
    alphas = (torch.arange(steps, device=pixels.device, dtype=torch.float32) + 0.5) / steps

    def path_points(pair: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        alpha = alphas[step].to(pixels.dtype).view(-1, 1, 1, 1)
        return base[pair] + alpha * delta[pair]

    mean_grad = averaged_input_gradients(model, targets, len(pixels), steps, path_points, batch_size)
    return delta.float() * mean_grad


def pool_to_grid(model: ClipAdapter, per_pixel: torch.Tensor) -> torch.Tensor:
    """(N, H, W) pixel values -> (N, h, w) means over each patch of the model's grid."""
    model.grid(tuple(per_pixel.shape[-2:]))  # raises unless H, W are multiples of the patch size
    return F.avg_pool2d(per_pixel[:, None], kernel_size=model.patch_size)[:, 0]


@register
class IntegratedGradients(Method):
    name = "integrated_gradients"
    family = "gradient"
    reference = "Sundararajan et al., Axiomatic Attribution for Deep Networks, ICML 2017"
    defaults: dict[str, Any] = {"steps": 32, "baseline": "black", "batch_size": 64}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        model = self.model
        baseline = self.params["baseline"]
        if not isinstance(baseline, str) or baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}; got {baseline!r}")
        steps = positive_int("steps", self.params["steps"])
        batch_size = positive_int("batch_size", self.params["batch_size"])
        pixels, tokens = pair_inputs(model, images, texts)
        targets = text_features(model, tokens)
        attribution = integrated_gradients(model, pixels, targets, steps, baseline, batch_size)
        with torch.no_grad():
            maps = pool_to_grid(model, attribution.abs().sum(dim=1))
        return Explanation(normalise_maps(maps), tuple(pixels.shape[-2:]), self.name, dict(self.params), tokens.texts)
