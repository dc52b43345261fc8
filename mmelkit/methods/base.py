"""What every explanation method shares: input pairing, the result type and the registry.

A method is a class with taxonomy metadata (where it sits in the survey's taxonomy) and an
``explain(images, texts)`` that returns an :class:`Explanation`. Inputs are paired three ways:
N images with N texts (pairs), one image with N texts, or N images with one text; anything else
is an error, never a silent truncation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from mmelkit.models.adapter import ClipAdapter, TextLike
from mmelkit.models.backend import TextTokens

Level = Literal["data", "model", "training", "inference"]
Granularity = Literal["token", "embedding", "neuron", "layer", "architecture", "input"]


@dataclass
class Explanation:
    """Maps over the patch grid, on the model's device.

    ``maps`` (N, h, w) non-negative, each normalised to [0, 1] (all-zero maps stay zero);
    ``image_size`` the (H, W) of the model input they explain; ``method`` and ``params`` say how
    they were made. ``upsample()`` brings them to the image.
    """

    maps: torch.Tensor
    image_size: tuple[int, int]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    texts: list[str] | None = None

    def __len__(self) -> int:
        return self.maps.shape[0]

    def upsample(self, size: tuple[int, int] | None = None, mode: str = "bilinear") -> torch.Tensor:
        """Maps resized to ``size`` (default: the model input's size), shape (N, H, W)."""
        size = size or self.image_size
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        return F.interpolate(self.maps[:, None].float(), size=size, mode=mode, **kwargs)[:, 0]


def normalise_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max each map of (N, ...) to [0, 1]; constant maps become zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(eps)).view_as(maps)


def minmax_over(values: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Min-max along one dimension, with ``eps`` in the denominator (Grad-ECLIP's loosened attention)."""
    low = values.min(dim=dim, keepdim=True).values
    high = values.max(dim=dim, keepdim=True).values
    return (values - low) / (high - low + eps)


def pair_inputs(model: ClipAdapter, images: Any, texts: TextLike) -> tuple[torch.Tensor, TextTokens]:
    """Model input for N image-text pairs: N and N, 1 and N, or N and 1 (the single side repeated)."""
    pixels = model.as_pixels(images)
    tokens = model.as_tokens(texts)
    n_images, n_texts = len(pixels), len(tokens)
    if n_images == n_texts:
        return pixels, tokens
    if n_images == 1:
        return pixels.expand(n_texts, -1, -1, -1), tokens
    if n_texts == 1:
        return pixels, tokens.select([0] * n_images)
    raise ValueError(
        f"got {n_images} images and {n_texts} texts: pass pairs (as many of each), one image with many "
        "texts, or many images with one text"
    )


class Method:
    """Base class: taxonomy metadata as class attributes, parameters as keyword arguments."""

    name: ClassVar[str]
    level: ClassVar[Level] = "model"
    granularity: ClassVar[Granularity] = "token"
    family: ClassVar[str]  # "gradient", "attention", "perturbation", "value path", ...
    modality: ClassVar[Literal["image", "text"]] = "image"
    reference: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: ClipAdapter, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise TypeError(f"{self.name} has no parameter(s) {unknown}; parameters: {sorted(self.defaults)}")
        self.model = model
        self.params = {**self.defaults, **params}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        raise NotImplementedError


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method known to :func:`get_method` and ``list_methods``."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(sorted(REGISTRY))}") from None


def text_features(model: ClipAdapter, tokens: TextTokens) -> torch.Tensor:
    """Unit text embeddings without a graph (image-side methods differentiate the image side only)."""
    with torch.no_grad():
        return model.encode_text(tokens)


ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def paired_cosine(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """cos(f_I, f_T) per pair; ``image_features`` unnormalised, ``text_features`` unit length."""
    return (F.normalize(image_features, dim=-1) * text_features).sum(dim=-1)
