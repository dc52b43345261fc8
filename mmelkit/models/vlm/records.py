"""The records of VLM batches and decoding: what :class:`~mmelkit.models.vlm.VlmAdapter` builds and
returns (:class:`VlmBatch`, :class:`AnswerLogprob`, :class:`GenerateOutput`) and the token-by-token
decoding stream with its hook (:class:`DecodeStream`, :class:`DecodeStep`, ``LogitsHook``).

Batch layout: prompts are LEFT padded, so every prompt ends in the same column and the first
answer token (generated or teacher forced) sits in the column after it; answers are then right
padded (mask 0). Position ids are ``cumsum(attention_mask) - 1``, so padding changes no result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mmelkit.models.vlm.adapter import VlmAdapter

@dataclass(eq=False)
class VlmBatch:
    """Model input for N (image, prompt[, answer]) rows, on the model's device.

    ``visual_positions[i]`` are the V columns of row i that hold its visual tokens, in patch-grid
    order. With answers, ``answer_spans[i] = (start, end)``: the answer's tokens (and the eos, when
    appended) are ``input_ids[i, start:end]``; ``answer_positions``/``answer_mask`` hold the same
    columns as an (N, T) tensor padded with 0 / False.
    """

    input_ids: torch.Tensor  # (N, L) long
    attention_mask: torch.Tensor  # (N, L) long, 0 on padding
    pixel_values: torch.Tensor  # (N, 3, H, W)
    visual_positions: torch.Tensor  # (N, V) long
    prompts: list[str]
    answer_spans: list[tuple[int, int]] | None = None
    answer_positions: torch.Tensor | None = None  # (N, T) long
    answer_mask: torch.Tensor | None = None  # (N, T) bool

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def position_ids(self) -> torch.Tensor:
        """``cumsum(attention_mask) - 1`` (0 on left padding): padding shifts no position."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def require_answers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.answer_positions is None or self.answer_mask is None:
            raise ValueError("this batch has no answers: encode it with answers=...")
        return self.answer_positions, self.answer_mask

    def select(self, rows: torch.Tensor | list[int]) -> VlmBatch:
        """The batch of rows ``rows`` (repeats allowed: the copies a perturbation method runs)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        listed = index.tolist()
        spans = None if self.answer_spans is None else [self.answer_spans[i] for i in listed]
        positions = None if self.answer_positions is None else self.answer_positions[index]
        mask = None if self.answer_mask is None else self.answer_mask[index]
        return VlmBatch(self.input_ids[index], self.attention_mask[index],
                        self.pixel_values[index.to(self.pixel_values.device)], self.visual_positions[index],
                        [self.prompts[i] for i in listed], spans, positions, mask)


@dataclass(eq=False)
class AnswerLogprob:
    """Per-token log-probabilities of teacher-forced answers (float32, float64 for a float64 model; on the
    model's device)."""

    token_logprobs: torch.Tensor  # (N, T), 0 where mask is False
    token_ids: torch.Tensor  # (N, T) the scored tokens (pad where mask is False)
    mask: torch.Tensor  # (N, T) bool
    total: torch.Tensor  # (N,) sum over each row's answer tokens


@dataclass(eq=False)
class GenerateOutput:
    """Greedy answers of :meth:`VlmAdapter.generate`.

    ``token_ids[i]`` are row i's generated tokens, ending with the eos when the row stopped there
    (``finished[i]``); ``texts`` are them decoded with special tokens stripped. ``sequences`` and
    ``attention_mask`` (N, L) hold prompt and answer, left padded; ``answer_spans[i]`` are the
    columns of ``token_ids[i]`` in ``sequences``. :meth:`to_batch` turns this into a teacher-forced
    :class:`VlmBatch` of exactly these tokens (for explaining the answers).
    """

    texts: list[str]
    token_ids: list[torch.Tensor]
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    answer_spans: list[tuple[int, int]]
    visual_positions: torch.Tensor
    prompts: list[str]
    finished: torch.Tensor  # (N,) bool

    def to_batch(self, pixel_values: torch.Tensor) -> VlmBatch:
        """The generated sequences as a batch with answers; ``pixel_values`` (N, 3, H, W) from
        :meth:`VlmAdapter.preprocess` of the same images."""
        if pixel_values.dim() != 4 or pixel_values.shape[0] != len(self.texts):
            raise ValueError(
                f"pixel_values must be (N, 3, H, W) with N = {len(self.texts)}; got {tuple(pixel_values.shape)}"
            )
        positions, mask = span_tensors(self.answer_spans, self.sequences.device)
        return VlmBatch(self.sequences, self.attention_mask, pixel_values.to(self.sequences.device),
                        self.visual_positions, list(self.prompts), list(self.answer_spans), positions, mask)


@dataclass(eq=False)
class DecodeStep:
    """What a ``logits_hook`` sees at each decoding step.

    ``index`` 0 is the prediction after the prompt (``last_tokens`` is None), index t the one after
    t generated tokens; ``sequences`` (N, L0 + t) holds everything fed so far. A hook that runs a
    second model stream (contrastive decoding) starts it at index 0 with
    :meth:`VlmAdapter.decode_stream` and feeds it ``last_tokens`` afterwards.
    """

    index: int
    batch: VlmBatch
    last_tokens: torch.Tensor | None
    sequences: torch.Tensor
    finished: torch.Tensor


LogitsHook = Callable[[torch.Tensor, DecodeStep], torch.Tensor]


class DecodeStream:
    """One batch decoded token by token with its own KV cache.

    ``prefill()`` runs the prompt and returns the next-token logits (N, vocab); each
    ``step(tokens)`` feeds one token per row and returns the next logits. Positions continue from
    each row's own last position, so left padding changes nothing.
    """

    def __init__(self, adapter: VlmAdapter, batch: VlmBatch, visual_embeds: torch.Tensor | None = None) -> None:
        self.adapter = adapter
        self.batch = batch
        self.visual_embeds = visual_embeds
        self.attention_mask = batch.attention_mask
        self.cache: Any = None
        self._last_position: torch.Tensor | None = None

    def prefill(self) -> torch.Tensor:
        output = self.adapter.forward(self.batch, self.visual_embeds, use_cache=True, logits_to_keep=1)
        self.cache = getattr(output, self.adapter.cache_kwarg)
        self._last_position = self.batch.position_ids[:, -1]
        return output.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._last_position is None:
            raise RuntimeError("call prefill() before step()")
        tokens = tokens.to(self.attention_mask.device).view(-1, 1)
        ones = torch.ones_like(tokens, dtype=self.attention_mask.dtype)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        self._last_position = self._last_position + 1
        output = self.adapter.model(
            input_ids=tokens,
            attention_mask=self.attention_mask,
            position_ids=self._last_position[:, None],
            use_cache=True,
            **{self.adapter.cache_kwarg: self.cache},
        )
        self.cache = getattr(output, self.adapter.cache_kwarg)
        return output.logits[:, -1]


@dataclass(eq=False)
class Decoded:
    """One chunk's greedy decoding, before :meth:`VlmAdapter.generate` merges the chunks."""

    batch: VlmBatch
    generated: torch.Tensor  # (n, T) tokens, pad after each row's eos
    keep: torch.Tensor  # (n, T) bool: the row's answer tokens (eos included)
    finished: torch.Tensor  # (n,) bool


def span_tensors(spans: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) column spans -> (N, T) positions (0-padded) and mask."""
    width = max(end - start for start, end in spans)
    offsets = torch.arange(width)
    starts = torch.tensor([start for start, _ in spans])[:, None]
    lengths = torch.tensor([end - start for start, end in spans])[:, None]
    mask = offsets[None] < lengths
    positions = torch.where(mask, starts + offsets[None], torch.zeros_like(mask, dtype=torch.long))
    return positions.to(device), mask.to(device)


def cat_logprobs(parts: list[AnswerLogprob], pad: int) -> AnswerLogprob:
    """Chunks of :class:`AnswerLogprob` joined row-wise (padded to the widest answer)."""
    width = max(p.mask.shape[1] for p in parts)

    def padded(t: torch.Tensor, value: Any) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    return AnswerLogprob(
        torch.cat([padded(p.token_logprobs, 0.0) for p in parts]),
        torch.cat([padded(p.token_ids, pad) for p in parts]),
        torch.cat([padded(p.mask, False) for p in parts]),
        torch.cat([p.total for p in parts]),
    )
