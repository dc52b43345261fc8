"""``ClipAdapter``: one interface over open_clip and Hugging Face CLIP models."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmelkit._checks import image_batch
from mmelkit.models.backend import ClipBackend, TextTokens
from mmelkit.models.images import SizeSpec, preprocess_images
from mmelkit.models.tracing import BlockSelection, ModelTrace, Tracer, resolve_blocks

TextLike = str | Sequence[str] | TextTokens | torch.Tensor
Pairing = Literal["paired", "all"]


class ClipAdapter:
    """A CLIP-style model behind one interface, whatever library it comes from.

    Created by :func:`mmelkit.load_model`. Tensors it returns live on ``self.device``.

    Images are accepted as PIL images, numpy arrays or torch tensors, one or a list, of any size
    (see :meth:`preprocess`). A 4-D float tensor ``(N, 3, H, W)`` is taken to be model input that
    :meth:`preprocess` already produced. Texts are a string, a list of strings, or
    :class:`~mmelkit.models.backend.TextTokens` from :meth:`tokenize`.
    """

    def __init__(self, backend: ClipBackend, *, name: str, device: torch.device, dtype: torch.dtype) -> None:
        self.backend = backend
        self.name = name
        self.device = device
        self.dtype = dtype
        self._traces: list[ModelTrace] = []

    # -- basic facts --------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The wrapped library model (open_clip ``CLIP`` or transformers ``CLIPModel``)."""
        return self.backend.model

    @property
    def family(self) -> str:
        return self.backend.family

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.backend.patch_size

    @property
    def image_size(self) -> tuple[int, int]:
        """The image size the model was trained at."""
        return self.backend.image_size

    @property
    def num_image_blocks(self) -> int:
        return len(self.backend.image_tower().blocks)

    @property
    def num_text_blocks(self) -> int:
        return len(self.backend.text_tower().blocks)

    def __repr__(self) -> str:
        return (
            f"ClipAdapter(name={self.name!r}, family={self.family!r}, image_size={self.image_size}, "
            f"patch_size={self.patch_size}, device={self.device}, dtype={self.dtype})"
        )

    def grid(self, pixels_or_size: torch.Tensor | tuple[int, int]) -> tuple[int, int]:
        """Patch grid (rows, columns) for model input pixels (N, 3, H, W) or an (H, W) size."""
        if isinstance(pixels_or_size, torch.Tensor):
            height, width = pixels_or_size.shape[-2:]
        else:
            height, width = pixels_or_size
        p_h, p_w = self.patch_size
        if height % p_h or width % p_w:
            raise ValueError(f"image size {(height, width)} is not a multiple of the patch size {(p_h, p_w)}")
        return (height // p_h, width // p_w)

    # -- inputs -------------------------------------------------------------------------------------
    def preprocess(self, images: Any, size: SizeSpec = None) -> torch.Tensor:
        """Images -> normalised model input ``(N, 3, H, W)`` on the model's device and dtype.

        ``size=None`` (default) resizes and centre-crops to the training size, as CLIP does;
        ``"keep"`` keeps the aspect ratio with each side rounded to a multiple of the patch size;
        an int or ``(height, width)`` resizes to exactly that (multiples of the patch size).
        """
        return preprocess_images(
            images,
            native_size=self.image_size,
            patch_size=self.patch_size,
            mean=self.backend.image_mean,
            std=self.backend.image_std,
            size=size,
            device=self.device,
            dtype=self.dtype,
        )

    def tokenize(self, texts: str | Sequence[str]) -> TextTokens:
        """Texts -> :class:`TextTokens` on the model's device."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("no texts given")
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings; got {type(bad[0]).__name__}")
        return self.backend.tokenize(texts, self.device)

    def as_pixels(self, images: Any) -> torch.Tensor:
        """Model input for ``images``: 4-D float tensors pass through (moved to the model, cast to its
        dtype), the rest is preprocessed at the default size.

        Model input is checked where it enters: an empty batch, a channel count other than 3 and NaN
        or infinite values are errors naming ``images`` (a NaN pixel would turn every map and score
        computed from it into NaN without a word). Raw images get the same refusal in
        :func:`~mmelkit.models.images.to_float_image`."""
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
            image_batch(images, name="images")
            self.grid(images)
            return images.to(self.device, self.dtype)
        return self.preprocess(images)

    def as_tokens(self, texts: TextLike) -> TextTokens:
        if isinstance(texts, TextTokens):
            return texts.to(self.device)
        if isinstance(texts, torch.Tensor):
            raise TypeError("pass texts as strings or as TextTokens from model.tokenize(), not a bare id tensor")
        return self.tokenize(texts)

    # -- encoders -----------------------------------------------------------------------------------
    def encode_image(self, images: Any, normalize: bool = True) -> torch.Tensor:
        """Image embeddings ``(N, E)``; unit length unless ``normalize=False``."""
        pixels = self.as_pixels(images)
        grid = self.grid(pixels)
        for trace in self._traces:
            for record in trace.image_blocks.values():
                record.grid = grid
        features = self.backend.encode_pixels(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, texts: TextLike, normalize: bool = True) -> torch.Tensor:
        """Text embeddings ``(N, E)``; unit length unless ``normalize=False``."""
        features = self.backend.encode_tokens(self.as_tokens(texts))
        return F.normalize(features, dim=-1) if normalize else features

    def score(self, images: Any, texts: TextLike, pairing: Pairing = "all") -> torch.Tensor:
        """Cosine similarity of images and texts.

        ``pairing="all"``: every image against every text, ``(N_images, N_texts)``.
        ``pairing="paired"``: image i against text i, ``(N,)``; the counts must match.
        """
        if pairing not in ("all", "paired"):
            raise ValueError(f"pairing must be 'all' or 'paired'; got {pairing!r}")
        pixels = self.as_pixels(images)
        tokens = self.as_tokens(texts)
        if pairing == "paired" and len(pixels) != len(tokens):
            raise ValueError(
                f"pairing='paired' needs as many texts as images; got {len(pixels)} images and {len(tokens)} texts"
            )
        image_features = self.encode_image(pixels)
        text_features = self.encode_text(tokens)
        if pairing == "paired":
            return (image_features * text_features).sum(dim=-1)
        return image_features @ text_features.T

    # -- tracing ------------------------------------------------------------------------------------
    @contextmanager
    def trace(
        self,
        image_blocks: BlockSelection = "all",
        text_blocks: BlockSelection = None,
        *,
        attention_probs: bool = True,
        math_attention: bool = False,
        single_head_blocks: BlockSelection = None,
    ) -> Iterator[ModelTrace]:
        """Record the insides of the chosen blocks during forward passes run inside the ``with``.

        ``image_blocks`` / ``text_blocks``: ``None``, ``"all"``, an index or a list of indices
        (negative indices count from the last block). ``attention_probs``: materialise the
        attention probabilities (otherwise the fused kernel runs and ``attn`` stays ``None``).
        ``math_attention``: never use the fused kernel (needed for double backward).
        ``single_head_blocks``: image blocks (among those traced) whose attention runs as one head
        over the full width; this CHANGES the model's output and exists for Grad-ECLIP's
        ``official`` reproduction mode. See :mod:`mmelkit.models.tracing` for what is recorded.
        """
        image_tower = self.backend.image_tower()
        text_tower = self.backend.text_tower() if text_blocks is not None else None
        trace = ModelTrace(
            num_image_blocks=len(image_tower.blocks),
            num_text_blocks=len(text_tower.blocks) if text_tower else 0,
            attention_probs=attention_probs,
            math_attention=math_attention,
        )
        tracer = Tracer(trace)
        image_indices = resolve_blocks(image_blocks, len(image_tower.blocks), "image")
        single = frozenset(resolve_blocks(single_head_blocks, len(image_tower.blocks), "image"))
        if not single <= set(image_indices):
            raise ValueError("single_head_blocks must be among the traced image_blocks")
        try:
            tracer.install(image_tower, image_indices, single)
            if text_tower is not None:
                tracer.install(text_tower, resolve_blocks(text_blocks, len(text_tower.blocks), "text"))
            self._traces.append(trace)
            yield trace
        finally:
            tracer.close()
            if trace in self._traces:
                self._traces.remove(trace)

    # -- helpers for explanation methods ----------------------------------------------------------
    def project_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm + projection applied to every image token: (N, L, D) -> (N, L, E)."""
        return self.backend.image_head(tokens)

    def project_text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm + projection applied to every text token: (N, L, D) -> (N, L, E)."""
        return self.backend.text_head(tokens)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.backend.logit_scale

    # -- text tokens as strings and as embeddings (text-side explanations) ---------------------------
    def token_strings(self, texts: TextLike) -> list[list[str]]:
        """Each text's tokens as vocabulary strings, all L positions (padding included).

        CLIP's BPE gives byte-level characters with ``</w>`` closing each word, for both families;
        :func:`mmelkit.methods.base.readable_token` turns them into display text."""
        return self.backend.token_strings(self.as_tokens(texts).ids)

    @property
    def pad_token_id(self) -> int:
        """The id the tokenizer pads with."""
        return self.backend.pad_token_id

    def token_embeddings(self, texts: TextLike) -> torch.Tensor:
        """Input embeddings of the texts' tokens (N, L, D), before position embeddings."""
        return self.backend.token_embeddings(self.as_tokens(texts))

    def encode_text_from_embeddings(
        self, embeddings: torch.Tensor, texts: TextLike, normalize: bool = True
    ) -> torch.Tensor:
        """Text embeddings (N, E) from token embeddings (N, L, D) in place of the ids' own.

        ``texts`` (their token ids) still decide pooling and the padding mask; with
        ``embeddings = token_embeddings(texts)`` this equals :meth:`encode_text`. Differentiable
        with respect to ``embeddings`` (Integrated Gradients over tokens uses this)."""
        tokens = self.as_tokens(texts)
        if embeddings.dim() != 3 or tuple(embeddings.shape[:2]) != tuple(tokens.ids.shape):
            raise ValueError(
                f"embeddings must be (N, L, D) with (N, L) = {tuple(tokens.ids.shape)}; got {tuple(embeddings.shape)}"
            )
        features = self.backend.encode_text_from_embeddings(embeddings.to(self.device), tokens)
        return F.normalize(features, dim=-1) if normalize else features
