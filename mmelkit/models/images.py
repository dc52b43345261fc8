"""Turn user images (PIL, numpy, torch; any size, any channel count) into model input tensors.

Everything after the conversion to a float tensor runs in torch on the target device, so a batch
of images on the GPU is resized and normalised there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SizeSpec = None | int | tuple[int, int] | Literal["native", "keep"]

# OpenAI CLIP's normalisation, which open_clip and Hugging Face use by default.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def to_float_image(image: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """One image -> float tensor (3, H, W) in [0, 1] on ``device``.

    Accepts a PIL image of any mode; a numpy array (H, W), (H, W, C) or (C, H, W) with C in
    {1, 3, 4}, uint8 in [0, 255] or float/bool in [0, 1]; a torch tensor (C, H, W) or (H, W), same
    value rules. Grayscale is repeated to RGB; alpha is dropped.
    """
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
        return _from_hwc(torch.from_numpy(array.copy()), device)
    if isinstance(image, np.ndarray):
        array = np.ascontiguousarray(image)
        if not array.flags.writeable:  # torch refuses to share read-only numpy memory
            array = array.copy()
        return _from_array(torch.from_numpy(array), device, channels_last_first=True)
    if isinstance(image, torch.Tensor):
        return _from_array(image, device, channels_last_first=False)
    raise TypeError(
        f"cannot use {type(image).__name__} as an image: pass a PIL.Image, a numpy array or a torch tensor"
    )


def _from_array(t: torch.Tensor, device: torch.device | str, channels_last_first: bool) -> torch.Tensor:
    if t.dim() == 2:
        t = t[None]
        return _finish(t, device)
    if t.dim() != 3:
        raise ValueError(f"an image must have 2 or 3 dimensions; got shape {tuple(t.shape)}")
    hwc = t.shape[-1] in (1, 3, 4)
    chw = t.shape[0] in (1, 3, 4)
    # numpy images are conventionally (H, W, C), torch images (C, H, W); follow the convention
    # of the input's library when the shape alone is ambiguous.
    if hwc and (channels_last_first or not chw):
        return _from_hwc(t, device)
    if chw:
        return _finish(t, device)
    raise ValueError(f"cannot tell the channel axis of an image of shape {tuple(t.shape)}: expected 1, 3 or 4 channels")


def _from_hwc(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return _finish(t.permute(2, 0, 1), device)


def _finish(chw: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    if chw.shape[-1] == 0 or chw.shape[-2] == 0:
        raise ValueError("an image must not be empty")
    chw = chw.to(device)
    if chw.dtype == torch.uint8:
        chw = chw.float() / 255.0
    elif chw.dtype == torch.bool:
        chw = chw.float()
    elif chw.is_floating_point():
        chw = chw.float()
        if not torch.isfinite(chw).all():
            raise ValueError("image contains NaN or infinite values")
        low, high = float(chw.min()), float(chw.max())
        if low < -1e-3 or high > 1.0 + 1e-3:
            raise ValueError(
                f"float images must hold values in [0, 1]; got [{low:.3g}, {high:.3g}] "
                "(pass uint8 for 0..255 data; pass already-normalised model input as a 4-D tensor)"
            )
    else:
        raise TypeError(f"unsupported image dtype {chw.dtype}: use uint8, bool or a float type")
    channels = chw.shape[0]
    if channels == 1:
        chw = chw.expand(3, -1, -1)
    elif channels == 4:
        chw = chw[:3]
    return chw.clamp(0.0, 1.0)


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of a (3, H, W) or (N, 3, H, W) float tensor."""
    batch = image if image.dim() == 4 else image[None]
    if tuple(batch.shape[-2:]) != tuple(size):
        batch = F.interpolate(batch, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return batch if image.dim() == 4 else batch[0]


def resize_and_center_crop(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CLIP's standard transform: scale the shorter side to fit, then crop the centre."""
    height, width = image.shape[-2:]
    scale = max(size[0] / height, size[1] / width)
    scaled = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
    image = resize(image, scaled)
    top = (scaled[0] - size[0]) // 2
    left = (scaled[1] - size[1]) // 2
    return image[..., top : top + size[0], left : left + size[1]]


def keep_size(height: int, width: int, patch: tuple[int, int]) -> tuple[int, int]:
    """The nearest size whose sides are multiples of the patch size (no crop; Grad-ECLIP style)."""
    return (max(patch[0], round(height / patch[0]) * patch[0]), max(patch[1], round(width / patch[1]) * patch[1]))


def as_image_list(images: Any) -> list[Any]:
    """A single image or a sequence of images -> list of images (never silently empty)."""
    if isinstance(images, (Image.Image, np.ndarray)) or (isinstance(images, torch.Tensor) and images.dim() <= 3):
        return [images]
    if isinstance(images, torch.Tensor):  # (N, C, H, W) raw images in [0, 1] / uint8
        items = list(images)
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        items = list(images)
    else:
        raise TypeError(
            f"expected an image or a list of images (PIL, numpy, torch); got {type(images).__name__}"
        )
    if not items:
        raise ValueError("no images given")
    return items


def preprocess_images(
    images: Any,
    *,
    native_size: tuple[int, int],
    patch_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    size: SizeSpec = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Convert, resize and normalise images into a model-input batch (N, 3, H, W).

    ``size``: ``None`` or ``"native"`` scales and centre-crops to the model's training size;
    ``"keep"`` keeps the aspect ratio, rounding each side to a multiple of the patch size (all
    images must then share one size); an int or (height, width) resizes to exactly that size,
    which must be a multiple of the patch size.
    """
    items = [to_float_image(image, device) for image in as_image_list(images)]
    if size is None or size == "native":
        batch = [resize_and_center_crop(image, native_size) for image in items]
    elif size == "keep":
        shapes = {tuple(image.shape[-2:]) for image in items}
        if len(shapes) > 1:
            raise ValueError(
                f"size='keep' needs images of one size; got {sorted(shapes)}. Explain them one at a time "
                "or pass an explicit size"
            )
        target = keep_size(*items[0].shape[-2:], patch_size)
        batch = [resize(image, target) for image in items]
    else:
        target = (size, size) if isinstance(size, int) else tuple(size)
        if len(target) != 2 or any(int(s) <= 0 for s in target):
            raise ValueError(f"size must be None, 'native', 'keep', an int or (height, width); got {size!r}")
        if target[0] % patch_size[0] or target[1] % patch_size[1]:
            raise ValueError(f"size {target} is not a multiple of the patch size {patch_size}")
        batch = [resize(image, target) for image in items]
    pixels = torch.stack(batch)
    mean_t = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels - mean_t) / std_t).to(dtype)
