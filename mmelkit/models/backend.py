"""The small interface every model family implements, and what it returns for text."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmelkit.models.tracing import TowerInfo


@dataclass(eq=False)
class TextTokens:
    """A tokenised batch of texts.

    ``ids`` (N, L) token ids; ``attention_mask`` (N, L) 1 for real tokens; ``eos_index`` (N,) the
    position the text tower pools (EOS); ``texts`` the strings, when known.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    eos_index: torch.Tensor
    texts: list[str] | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device: torch.device | str) -> TextTokens:
        return TextTokens(self.ids.to(device), self.attention_mask.to(device), self.eos_index.to(device), self.texts)

    def select(self, index: torch.Tensor | Sequence[int]) -> TextTokens:
        """Rows ``index`` of the batch (repeats allowed), e.g. to pair one text with many images."""
        index_t = torch.as_tensor(index, device=self.ids.device, dtype=torch.long)
        texts = [self.texts[i] for i in index_t.tolist()] if self.texts is not None else None
        return TextTokens(self.ids[index_t], self.attention_mask[index_t], self.eos_index[index_t], texts)


class ClipBackend(ABC):
    """What mmelkit needs from a CLIP implementation. One subclass per model family."""

    family: str
    model: nn.Module

    # -- geometry and normalisation -------------------------------------------------------------
    @property
    @abstractmethod
    def patch_size(self) -> tuple[int, int]: ...

    @property
    @abstractmethod
    def image_size(self) -> tuple[int, int]:
        """The size the image tower was trained at (its position embeddings' grid times patch)."""

    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    # -- towers -----------------------------------------------------------------------------------
    @abstractmethod
    def image_tower(self) -> TowerInfo: ...

    @abstractmethod
    def text_tower(self) -> TowerInfo: ...

    @abstractmethod
    def tokenize(self, texts: list[str], device: torch.device) -> TextTokens: ...

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) model input of any size (multiple of the patch) -> (N, E), unnormalised."""

    @abstractmethod
    def encode_tokens(self, tokens: TextTokens) -> torch.Tensor:
        """Tokenised texts -> (N, E), unnormalised."""

    @abstractmethod
    def image_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm and projection of the image tower applied to every token: (N, L, D) -> (N, L, E).

        Used by dense methods (MaskCLIP, cross-modal alignment, logit lens)."""

    @abstractmethod
    def text_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm and projection of the text tower applied to every token: (N, L, D) -> (N, L, E)."""

    @property
    @abstractmethod
    def logit_scale(self) -> torch.Tensor: ...

    @abstractmethod
    def _token_embedding(self) -> nn.Module:
        """The text tower's token embedding table."""

    # -- shared: text-side methods that differentiate through the token embeddings ------------------
    def token_embeddings(self, tokens: TextTokens) -> torch.Tensor:
        """Input embeddings of the tokens (N, L, D), before position embeddings."""
        return self._token_embedding()(tokens.ids)

    def encode_text_from_embeddings(self, embeddings: torch.Tensor, tokens: TextTokens) -> torch.Tensor:
        """The text tower run on given token embeddings (N, L, D) instead of the table's rows for
        ``tokens.ids``; ``tokens`` still decides pooling and masks. (N, E), unnormalised.

        The model's own forward runs with the embedding table's output replaced for this call, so
        position embeddings, the causal and padding masks and pooling are exactly the usual ones."""
        with _replaced_output(self._token_embedding(), embeddings):
            return self.encode_tokens(tokens)


@contextmanager
def _replaced_output(module: nn.Module, replacement: torch.Tensor) -> Iterator[None]:
    """Within the block, ``module`` returns ``replacement`` (same shape) instead of its output."""

    def replace(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if output.shape != replacement.shape:
            raise ValueError(f"embeddings of shape {tuple(replacement.shape)} do not fit token ids giving "
                             f"{tuple(output.shape)}")
        return replacement.to(output.dtype)

    handle = module.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def interpolate_position_embedding(
    table: torch.Tensor, trained_grid: tuple[int, int], grid: tuple[int, int], num_prefix: int = 1
) -> torch.Tensor:
    """Bicubically resize a ViT position table (prefix + h*w, D) to another patch grid.

    Returns the table unchanged at the trained grid, so default-size inputs see the exact weights.
    Same convention as transformers' ``interpolate_pos_encoding`` (bicubic, align_corners=False).
    """
    if tuple(grid) == tuple(trained_grid):
        return table
    prefix, patches = table[:num_prefix], table[num_prefix:]
    width = table.shape[-1]
    patches = patches.reshape(1, trained_grid[0], trained_grid[1], width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False).to(table.dtype)
    patches = patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)
    return torch.cat([prefix, patches], dim=0)
