"""Logit lens on visual tokens (Neo et al., arXiv 2410.07149; SPEC §6): the hidden state of
visual token i after decoder layer l (and, as "layer" 0, the projected token entering the
decoder) read through the final norm and the LM head, as the top-k words it would predict.

The localisation score: of an object's visual tokens, the share whose top-1 word names the
object's colour or shape, per layer. Where it rises, the decoder has turned what the vision tower
saw there into words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmelkit._checks import positive_int
from mmelkit.methods.answers import AnswerTarget
from mmelkit.methods.base import register_tool
from mmelkit.models.vlm.adapter import VlmAdapter


@dataclass(eq=False)
class LogitLens:
    """``top_ids`` / ``top_probs`` (N, layers + 1, V, k): per row, layer (0 = the decoder's input,
    l = after decoder layer l) and visual token, the k most likely next words; ``vocabulary`` maps
    ids to words; ``grid`` the visual tokens' (rows, cols)."""

    top_ids: torch.Tensor
    top_probs: torch.Tensor
    vocabulary: list[str]
    grid: tuple[int, int]

    def words(self, row: int, layer: int, rank: int = 0) -> list[list[str]]:
        """The rank-th word of every visual token of one row at one layer, as the patch grid."""
        rows, cols = self.grid
        ids = self.top_ids[row, layer, :, rank].tolist()[-rows * cols :]  # the patches (a leading CLS has no cell)
        return [[self.vocabulary[i] for i in ids[r * cols : (r + 1) * cols]] for r in range(rows)]

    def localisation(self, tokens: torch.Tensor, names: Sequence[Sequence[str]]) -> torch.Tensor:
        """(N, layers + 1): share of each row's object tokens (``tokens`` (N, V) bool) whose top-1
        word is one of that row's ``names`` (e.g. ["red", "circle"]); NaN for a row without tokens."""
        if tokens.shape != (self.top_ids.shape[0], self.top_ids.shape[2]) or tokens.dtype != torch.bool:
            raise ValueError(f"tokens must be (N, V) = {(self.top_ids.shape[0], self.top_ids.shape[2])} bool; got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        if len(names) != len(tokens):
            raise ValueError(f"got {len(names)} name lists for {len(tokens)} rows")
        index = {word: i for i, word in enumerate(self.vocabulary)}
        scores = []
        for row, words in enumerate(names):
            unknown = [w for w in words if w not in index]
            if unknown:
                raise ValueError(f"row {row}: {unknown} are not words of the model's vocabulary")
            wanted = torch.tensor([index[w] for w in words], device=self.top_ids.device)
            top1 = self.top_ids[row, :, :, 0]  # (layers + 1, V)
            named = torch.isin(top1, wanted) & tokens[row].to(top1.device)[None]
            count = int(tokens[row].sum())
            scores.append(named.sum(dim=1).float() / count if count else torch.full((top1.shape[0],), float("nan")))
        return torch.stack(scores)


@register_tool("logit_lens", level="model", granularity="layer", family="logit lens", explains="vlm",
               reference="Neo et al., arXiv 2410.07149; SPEC §6")
def logit_lens(vlm: VlmAdapter, target: AnswerTarget | Any, k: int = 5) -> LogitLens:
    """The top-k words of every visual token at every decoder layer (one traced forward).

    ``target`` is an :class:`AnswerTarget` or any encoded :class:`~mmelkit.models.vlm.VlmBatch`."""
    k = positive_int("k", k)
    batch = target.batch if isinstance(target, AnswerTarget) else target
    with torch.no_grad(), vlm.trace(decoder_attentions=False, decoder_hidden=True, vision=False, visual_leaf=False) as trace:
        vlm.forward(batch, logits_to_keep=1)
        hidden = trace.decoder_hidden()  # (layers, N, L, D)
        entering = trace.require_visual_embeds()  # (N, V, D)
    visual = batch.visual_positions
    index = visual[None, :, :, None].expand(hidden.shape[0], -1, -1, hidden.shape[-1])
    states = torch.cat([entering[None].to(hidden.dtype), hidden.gather(2, index)])  # (layers + 1, N, V, D)
    with torch.no_grad():
        probs = vlm.project_hidden(states).float().softmax(dim=-1)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    vocabulary = vlm.tokenizer.convert_ids_to_tokens(list(range(probs.shape[-1])))
    return LogitLens(top.indices.transpose(0, 1), top.values.transpose(0, 1), list(vocabulary), vlm.grid)
