"""open_clip models (``CLIP`` and ``CustomTextCLIP`` with a ViT image tower)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmelkit import _compat

_compat.apply()

import open_clip  # noqa: E402
from open_clip.transformer import Attention as OpenClipAttention  # noqa: E402
from open_clip.transformer import TextTransformer, VisionTransformer  # noqa: E402

from mmelkit.models.backend import ClipBackend, TextTokens, interpolate_position_embedding  # noqa: E402
from mmelkit.models.images import OPENAI_MEAN, OPENAI_STD  # noqa: E402
from mmelkit.models.tracing import TowerInfo  # noqa: E402

Tokenizer = Callable[[list[str]], torch.Tensor]


def is_open_clip_model(model: Any) -> bool:
    return isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP))


def _tower_info(name: str, transformer: nn.Module, num_prefix: int) -> TowerInfo:
    blocks = list(transformer.resblocks)
    attentions = [block.attn for block in blocks]
    kinds = {type(a) for a in attentions}
    if kinds <= {nn.MultiheadAttention}:
        kind = "torch_mha"
    elif kinds <= {OpenClipAttention}:
        kind = "open_clip"
    else:
        raise NotImplementedError(f"mmelkit cannot trace {name} attention of type(s) {sorted(k.__name__ for k in kinds)}")
    # open_clip >= 2.24 runs blocks batch-first (NLD); older checkpoints' code and some forks
    # run them sequence-first (LND). nn.MultiheadAttention carries its own flag too.
    batch_first = bool(getattr(transformer, "batch_first", False))
    return TowerInfo(name, blocks, attentions, kind, batch_first, num_prefix)


class OpenClipBackend(ClipBackend):
    family = "open_clip"

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, name: str | None = None) -> None:
        if not is_open_clip_model(model):
            raise TypeError(f"expected an open_clip CLIP or CustomTextCLIP model; got {type(model).__name__}")
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise NotImplementedError(
                f"mmelkit explains ViT image towers; this model's image tower is {type(visual).__name__}"
            )
        self.model = model
        self.visual: VisionTransformer = visual
        if tokenizer is None:
            context = getattr(model, "context_length", None) or getattr(getattr(model, "text", None), "context_length", 77)
            tokenizer = open_clip.get_tokenizer(name) if name else open_clip.SimpleTokenizer(context_length=context)
        self.tokenizer = tokenizer
        self.image_mean = tuple(getattr(visual, "image_mean", None) or OPENAI_MEAN)
        self.image_std = tuple(getattr(visual, "image_std", None) or OPENAI_STD)

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.visual.patch_size)

    @property
    def image_size(self) -> tuple[int, int]:
        grid = self.visual.grid_size
        return (grid[0] * self.patch_size[0], grid[1] * self.patch_size[1])

    # -- towers -----------------------------------------------------------------------------------
    def image_tower(self) -> TowerInfo:
        return _tower_info("image", self.visual.transformer, num_prefix=1)

    def _text_transformer(self) -> nn.Module:
        if isinstance(self.model, open_clip.CLIP):
            return self.model.transformer
        text = self.model.text
        if isinstance(text, TextTransformer):
            return text.transformer
        raise NotImplementedError(f"mmelkit cannot trace a text tower of type {type(text).__name__}")

    def text_tower(self) -> TowerInfo:
        return _tower_info("text", self._text_transformer(), num_prefix=0)

    def tokenize(self, texts: list[str], device: torch.device) -> TextTokens:
        ids = self.tokenizer(texts).to(device)
        pad_id = getattr(self._text_module(), "pad_id", 0)
        eos_id = getattr(self._text_module(), "text_eos_id", None) or getattr(self._text_module(), "eos_id", None)
        pool = getattr(self._text_module(), "text_pool_type", None) or getattr(self._text_module(), "pool_type", "argmax")
        if pool == "eos" and eos_id is not None:
            eos_index = (ids == eos_id).int().argmax(dim=-1)
        elif pool == "last":
            eos_index = torch.full((ids.shape[0],), ids.shape[1] - 1, device=device)
        else:  # OpenAI BPE: the end-of-text token has the largest id
            eos_index = ids.argmax(dim=-1)
        return TextTokens(ids, (ids != pad_id).long(), eos_index, list(texts))

    def _text_module(self) -> nn.Module:
        return self.model if isinstance(self.model, open_clip.CLIP) else self.model.text

    # -- forward ----------------------------------------------------------------------------------
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(pixels.to(v.conv1.weight.dtype))  # (N, D, h, w)
        n, width, h, w = x.shape
        x = x.reshape(n, width, h * w).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)
        position = interpolate_position_embedding(v.positional_embedding, tuple(v.grid_size), (h, w))
        x = x + position.to(x.dtype)
        x = v.patch_dropout(x)
        x = v.ln_pre(x)
        x = v.transformer(x)
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled

    def encode_tokens(self, tokens: TextTokens) -> torch.Tensor:
        return self.model.encode_text(tokens.ids)

    def image_head(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.visual
        out = v.ln_post(tokens)
        return out @ v.proj if v.proj is not None else out

    def text_head(self, tokens: torch.Tensor) -> torch.Tensor:
        module = self._text_module()
        out = module.ln_final(tokens)
        projection = module.text_projection
        if projection is None:
            return out
        return projection(out) if isinstance(projection, nn.Linear) else out @ projection

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    # -- text tokens as strings and as embeddings ----------------------------------------------
    def token_strings(self, ids: torch.Tensor) -> list[list[str]]:
        """Vocabulary strings of token ids (N, L), as the tokenizer stores them (CLIP BPE: byte-level
        characters, ``</w>`` closing a word)."""
        rows = ids.tolist()
        decoder = getattr(self.tokenizer, "decoder", None)
        if isinstance(decoder, dict):  # open_clip's SimpleTokenizer
            return [[decoder.get(i, f"<{i}>") for i in row] for row in rows]
        inner = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # open_clip's HFTokenizer wraps one
        if hasattr(inner, "convert_ids_to_tokens"):
            return [list(inner.convert_ids_to_tokens(row)) for row in rows]
        raise NotImplementedError(f"cannot turn ids back into strings with a {type(self.tokenizer).__name__}")

    @property
    def pad_token_id(self) -> int:
        """The id the tokenizer pads with."""
        return int(getattr(self._text_module(), "pad_id", 0) or 0)

    def _token_embedding(self) -> nn.Module:
        module = getattr(self._text_module(), "token_embedding", None)
        if module is None:
            raise NotImplementedError("this open_clip text tower has no token embedding table")
        return module
