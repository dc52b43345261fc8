"""What the text-side methods share."""

from __future__ import annotations

import torch

from mmelkit.models.adapter import ClipAdapter


def image_features(model: ClipAdapter, pixels: torch.Tensor) -> torch.Tensor:
    """Unnormalised image features (N, E) without a graph: text-side methods differentiate or
    perturb the text only. One image repeated over N texts is encoded once."""
    with torch.no_grad():
        if len(pixels) > 1 and pixels.stride(0) == 0:  # pair_inputs' expanded single image
            return model.encode_image(pixels[:1], normalize=False).expand(len(pixels), -1)
        return model.encode_image(pixels, normalize=False)

