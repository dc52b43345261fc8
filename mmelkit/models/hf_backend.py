"""Hugging Face ``transformers`` CLIP models (``CLIPModel``), any attention backend."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmelkit.models.backend import ClipBackend, TextTokens
from mmelkit.models.images import OPENAI_MEAN, OPENAI_STD
from mmelkit.models.tracing import TowerInfo


def is_hf_clip_model(model: Any) -> bool:
    try:
        from transformers import CLIPModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, CLIPModel)


def _pooled(output: Any) -> torch.Tensor:
    # transformers < 5 returns the projected features as a tensor, >= 5 a ModelOutput.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFClipBackend(ClipBackend):
    family = "hf_clip"

    def __init__(self, model: nn.Module, tokenizer: Any = None, image_processor: Any = None) -> None:
        if not is_hf_clip_model(model):
            raise TypeError(f"expected a transformers CLIPModel; got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self._bpe = None
        if tokenizer is None:
            # Hugging Face CLIP checkpoints use OpenAI's BPE, which open_clip ships offline.
            from mmelkit.models.open_clip_backend import open_clip

            self._bpe = open_clip.SimpleTokenizer(context_length=self.context_length)
        mean = getattr(image_processor, "image_mean", None) or OPENAI_MEAN
        std = getattr(image_processor, "image_std", None) or OPENAI_STD
        self.image_mean, self.image_std = tuple(mean), tuple(std)

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def patch_size(self) -> tuple[int, int]:
        p = int(self.model.config.vision_config.patch_size)
        return (p, p)

    @property
    def image_size(self) -> tuple[int, int]:
        s = int(self.model.config.vision_config.image_size)
        return (s, s)

    def image_tower(self) -> TowerInfo:
        layers = list(self.model.vision_model.encoder.layers)
        return TowerInfo("image", layers, [layer.self_attn for layer in layers], "hf_clip", True, 1)

    def text_tower(self) -> TowerInfo:
        layers = list(self.model.text_model.encoder.layers)
        return TowerInfo("text", layers, [layer.self_attn for layer in layers], "hf_clip", True, 0)

    def tokenize(self, texts: list[str], device: torch.device) -> TextTokens:
        if self._bpe is not None:
            ids = self._bpe(texts).to(device)
            mask = (ids != 0).long()
        else:
            encoded = self.tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
            )
            ids = encoded["input_ids"].to(device)
            mask = encoded["attention_mask"].to(device)
        eos_token_id = self.model.config.text_config.eos_token_id
        if eos_token_id == 2:  # legacy configs: pool at the largest id, as transformers does
            eos_index = ids.argmax(dim=-1)
        else:
            eos_index = (ids == eos_token_id).int().argmax(dim=-1)
        return TextTokens(ids, mask, eos_index, list(texts))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = self.model.visual_projection.weight.dtype
        return _pooled(self.model.get_image_features(pixel_values=pixels.to(dtype), interpolate_pos_encoding=True))

    def encode_tokens(self, tokens: TextTokens) -> torch.Tensor:
        return _pooled(self.model.get_text_features(input_ids=tokens.ids, attention_mask=tokens.attention_mask))

    def image_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(self.model.vision_model.post_layernorm(tokens))

    def text_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.text_projection(self.model.text_model.final_layer_norm(tokens))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    # -- text tokens as strings and as embeddings ----------------------------------------------
    def token_strings(self, ids: torch.Tensor) -> list[list[str]]:
        """Vocabulary strings of token ids (N, L), as the tokenizer stores them (CLIP BPE: byte-level
        characters, ``</w>`` closing a word)."""
        rows = ids.tolist()
        if self._bpe is not None:
            return [[self._bpe.decoder.get(i, f"<{i}>") for i in row] for row in rows]
        return [list(self.tokenizer.convert_ids_to_tokens(row)) for row in rows]

    @property
    def pad_token_id(self) -> int:
        """The id the tokenizer pads with."""
        if self._bpe is not None:
            return 0  # open_clip's SimpleTokenizer pads with 0
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = self.model.config.text_config.pad_token_id
        return int(pad or 0)

    def _token_embedding(self) -> nn.Module:
        return self.model.text_model.embeddings.token_embedding
