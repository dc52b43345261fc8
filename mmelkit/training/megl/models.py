"""MEGL's two networks: a classifier whose Grad-CAM is differentiable, and a rationale generator.

The classifier ``f`` is a small CNN or a small ViT with one interface: ``features(images)`` is a
spatial map (N, C, h, w) and ``classify(features)`` the logits, so that :func:`grad_cam` can take
the gradient of a class score with respect to the features *with* ``create_graph=True``. The map
is then a differentiable function of the weights: a loss on the explanation trains the model.

The ViT computes attention explicitly (``softmax(q k^T / sqrt(d)) v``). The fused
``scaled_dot_product_attention`` kernels (flash, memory-efficient) have no double backward, and
explanation-guided losses differentiate through a gradient; the explicit path always has one.

The rationale generator ``g`` is a GRU decoder over a closed word vocabulary. It is conditioned on
the classifier's pooled image features; with Saliency-Driven Textual Grounding (SDTG) it is also
conditioned on the saliency-highlighted image ``I * up(A_hat)``, encoded on a coarse spatial grid,
so it can say *where* the evidence is.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmelkit._checks import image_batch, non_negative_int, positive_int
from mmelkit.training.classifier import conv_body

CamTarget = Literal["logit", "log_prob"]


class ExplainableClassifier(nn.Module):
    """Base class: ``forward(images) == classify(features(images))``."""

    feature_dim: int

    def features(self, images: torch.Tensor) -> torch.Tensor:  # (N, C, h, w)
        raise NotImplementedError

    def classify(self, features: torch.Tensor) -> torch.Tensor:  # (N, K)
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))


def _check_classes(num_classes: int) -> None:
    if positive_int("num_classes", num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2 (one class leaves nothing to tell apart); got {num_classes}")


class ConvClassifier(ExplainableClassifier):
    """Three conv blocks (two 2x2 poolings, so the map is 1/4 of the image) and a linear head on the
    global average; the same shape as the plain shortcut classifier of the data-level chapter."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        _check_classes(num_classes)
        positive_int("width", width)
        self.feature_dim = 2 * width
        self.body = conv_body(width)
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.mean(dim=(2, 3)))


class MathAttention(nn.Module):
    """Multi-head self-attention written out, so that it has a double backward."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, length, dim))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = MathAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTClassifier(ExplainableClassifier):
    """A small ViT: patch embedding, pre-norm blocks with explicit attention, mean-pooled patch
    tokens into a linear head. ``features`` are the final (normed) patch tokens on their grid, so
    Grad-CAM reads them exactly as it reads a CNN's last conv map."""

    def __init__(self, num_classes: int, image_size: int, width: int = 64, patch: int = 4,
                 depth: int = 3, heads: int = 4) -> None:
        super().__init__()
        _check_classes(num_classes)
        for name, value in (("image_size", image_size), ("width", width), ("patch", patch), ("heads", heads)):
            positive_int(name, value)
        non_negative_int("depth", depth)  # no blocks: each token sees its own patch only
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of the patch size {patch}")
        self.feature_dim = width
        self.grid = image_size // patch
        self.embed = nn.Conv2d(3, width, patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, self.grid * self.grid, width) * 0.02)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images).flatten(2).transpose(1, 2) + self.position
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return tokens.transpose(1, 2).reshape(len(images), -1, self.grid, self.grid)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.mean(dim=(2, 3)))


def build_classifier(arch: str, num_classes: int, image_size: int, width: int) -> ExplainableClassifier:
    """``"cnn"`` or ``"vit"``."""
    if arch == "cnn":
        return ConvClassifier(num_classes, width)
    if arch == "vit":
        return ViTClassifier(num_classes, image_size, width=2 * width)
    raise ValueError(f"arch must be 'cnn' or 'vit'; got {arch!r}")


def grad_cam(
    model: ExplainableClassifier,
    images: torch.Tensor,
    classes: torch.Tensor | None,
    create_graph: bool = True,
    target: CamTarget = "log_prob",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM of ``classes`` (one per image; None: each image's predicted class, from the same
    forward pass): ``(logits, maps, features)``.

    ``maps`` (N, h, w) is ReLU(sum_c alpha_c F_c) / (max + eps) with alpha_c the spatial mean of the
    gradient of the score with respect to the features F. With ``create_graph`` the maps carry a
    graph back to every weight (one more ``autograd.grad``, no ``backward``: nothing accumulates in
    ``.grad``). ``target="log_prob"`` (default) explains log p(class): evidence *against* the other
    classes then counts as evidence, so a model cannot hide a shortcut from the map by using it
    only to push the other classes down (which the logit's map, ``target="logit"``, does not show).
    """
    if classes is not None and classes.shape != (len(images),):
        raise ValueError(f"need one class per image: {len(images)} images, classes of shape {tuple(classes.shape)}")
    with torch.enable_grad():
        features = model.features(images)
        if not features.requires_grad:  # a frozen model still has a graph from its features onward
            features = features.detach().requires_grad_(True)
        logits = model.classify(features)
        if classes is None:
            classes = logits.detach().argmax(dim=1)
        scores = F.log_softmax(logits, dim=1) if target == "log_prob" else logits
        if target not in ("logit", "log_prob"):
            raise ValueError(f"target must be 'logit' or 'log_prob'; got {target!r}")
        (grads,) = torch.autograd.grad(scores.gather(1, classes[:, None]).sum(), features, create_graph=create_graph)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1))
    maps = cam / (cam.flatten(1).amax(dim=1)[:, None, None] + eps)
    if not create_graph:
        maps = maps.detach()
    return logits, maps, features


def input_gradients(model: ExplainableClassifier, images: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """d(sum_k log p_k)/d(images), the quantity Right-for-the-Right-Reasons penalises (Ross et al. 2017)."""
    image_batch(images)  # NaN pixels would train on NaN gradients without a word
    with torch.enable_grad():
        inputs = images if images.requires_grad else images.detach().requires_grad_(True)
        log_probs = F.log_softmax(model(inputs), dim=1)
        (grads,) = torch.autograd.grad(log_probs.sum(), inputs, create_graph=create_graph)
    return grads


def highlight(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """SDTG's saliency-highlighted image I * up(A_hat) (images in [-1, 1] are dimmed toward -1, black)."""
    up = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
    return (images + 1.0) * up - 1.0


class RationaleGenerator(nn.Module):
    """A GRU decoder of rationales.

    Its start state comes from the classifier's pooled features; with ``grounded`` (SDTG) a small
    conv encoder of the saliency-highlighted image, pooled to a ``grid`` x ``grid`` layout and
    flattened (so position survives), is added to it. The condition is also fed at every step.
    """

    def __init__(self, vocab_size: int, feature_dim: int, grounded: bool, hidden: int = 128, grid: int = 4) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("feature_dim", feature_dim), ("hidden", hidden),
                            ("grid", grid)):
            positive_int(name, value)
        self.grounded = grounded
        self.vocab_size = vocab_size
        self.from_features = nn.Linear(feature_dim, hidden)
        if grounded:
            self.saliency_encoder = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(grid),
                nn.Flatten(), nn.Linear(16 * grid * grid, hidden),
            )
        self.embed = nn.Embedding(vocab_size, hidden)
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def condition(self, pooled: torch.Tensor, highlighted: torch.Tensor | None) -> torch.Tensor:
        context = self.from_features(pooled)
        if self.grounded:
            if highlighted is None:
                raise ValueError("a grounded (SDTG) generator needs the saliency-highlighted images")
            context = context + self.saliency_encoder(highlighted)
        return torch.tanh(context)

    def forward(self, pooled: torch.Tensor, highlighted: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: next-token logits (N, L, V) for input tokens (N, L) (BOS first)."""
        context = self.condition(pooled, highlighted)
        steps = torch.cat([self.embed(inputs), context[:, None].expand(-1, inputs.shape[1], -1)], dim=2)
        hidden, _ = self.gru(steps, context[None].contiguous())
        return self.out(hidden)

    @torch.no_grad()
    def generate(self, pooled: torch.Tensor, highlighted: torch.Tensor | None, bos: int, eos: int,
                 max_length: int) -> torch.Tensor:
        """Greedy decoding: token ids (N, max_length), padded with ``eos`` after the first ``eos``."""
        context = self.condition(pooled, highlighted)
        state = context[None].contiguous()
        token = torch.full((len(pooled),), bos, dtype=torch.long, device=pooled.device)
        finished = torch.zeros(len(pooled), dtype=torch.bool, device=pooled.device)
        out = []
        for _ in range(max_length):
            step = torch.cat([self.embed(token), context], dim=1)[:, None]
            hidden, state = self.gru(step, state)
            token = self.out(hidden[:, 0]).argmax(dim=1)
            token = torch.where(finished, torch.full_like(token, eos), token)
            finished |= token == eos
            out.append(token)
        return torch.stack(out, dim=1)
