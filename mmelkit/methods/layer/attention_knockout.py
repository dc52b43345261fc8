"""Attention knockout (Geva et al., EMNLP 2023; SPEC §6): for a window of w decoder layers
starting at l, the attention edges from the visual tokens (all of them, or one object's) to the
answer's query column are removed before the softmax (the logit set to -inf, nothing
re-normalised by hand), and the relative drop of p(answer), 1 - p_knocked / p_clean, is reported
per l. A large drop at l says the image reaches the answer position through attention there.

Every (row, window) copy is one row of a batched forward: a pre-hook on each decoder layer's
attention edits the mask of the copies whose window covers that layer. Eager attention is forced
while the hooks are in (sdpa receives no mask when no row is padded); an sdpa boolean mask would be
handled too. Hooks and the attention implementation are restored on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from mmelkit._checks import positive_int
from mmelkit.methods.answers import AnswerTarget, chunked_rows, target_score
from mmelkit.methods.base import register_tool
from mmelkit.models.vlm.adapter import VlmAdapter
from mmelkit.models.vlm.tracing import attention_implementation


@dataclass(eq=False)
class KnockoutResult:
    """``drops`` (N, windows): relative drop of p(answer) per window start ``starts``; ``clean``
    (N,) p(answer) without knockout; ``window`` the window width in layers. Plot with
    :func:`mmelkit.viz.vlm.knockout_figure`."""

    drops: torch.Tensor
    clean: torch.Tensor
    starts: list[int]
    window: int
    answers: list[str]


@contextmanager
def knocked_out(vlm: VlmAdapter, blocked: dict[int, torch.Tensor]) -> Iterator[None]:
    """While open, decoder layer l's attention ignores the (query, key) edges where
    ``blocked[l]`` (N, L, L) bool is True (for the N rows of the batch run inside)."""
    depth = vlm.num_decoder_layers
    outside = [layer for layer in blocked if not -depth <= int(layer) < depth]
    if outside:
        raise IndexError(f"blocked names decoder layer(s) {outside}; the decoder has {depth} layers")
    handles = []

    def hook_for(mask: torch.Tensor) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            attention_mask = kwargs.get("attention_mask")
            if attention_mask is None:
                raise RuntimeError("the decoder attention got no mask to edit: attention knockout needs eager or sdpa attention with a mask")
            if attention_mask.shape[-2:] != mask.shape[-2:] or attention_mask.shape[0] != mask.shape[0]:
                raise RuntimeError(f"knockout mask {tuple(mask.shape)} does not fit the attention mask {tuple(attention_mask.shape)}")
            edges = mask[:, None].to(attention_mask.device)
            if attention_mask.dtype == torch.bool:  # sdpa: True = may attend
                edited = attention_mask & ~edges
            else:  # eager: additive
                edited = attention_mask.masked_fill(edges, torch.finfo(attention_mask.dtype).min)
            return args, {**kwargs, "attention_mask": edited}

        return hook

    # sdpa may get no mask at all (is_causal, when no row is padded): eager always gets one
    with attention_implementation(vlm.model, "eager"):
        try:
            for layer, mask in blocked.items():
                attention = vlm.parts.decoder_layers[layer].self_attn
                handles.append(attention.register_forward_pre_hook(hook_for(mask), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()


@register_tool("attention_knockout", level="model", granularity="layer", family="causal intervention",
               explains="vlm", reference="Geva et al., EMNLP 2023 (attention knockout); SPEC §6")
def attention_knockout(
    vlm: VlmAdapter,
    target: AnswerTarget,
    window: int = 1,
    keys: torch.Tensor | None = None,
    batch_size: int = 32,
) -> KnockoutResult:
    """Relative drop of p(answer) for each window of ``window`` layers.

    ``keys`` (N, V) bool: the visual tokens whose edges are removed (default: all V). The queries
    are the target tokens' query columns. Windows start at 0 .. L - window."""
    depth = vlm.num_decoder_layers
    window = positive_int("window", window)
    if window > depth:
        raise ValueError(f"window {window} is wider than the decoder's {depth} layers")
    batch = target.batch
    n, length = batch.input_ids.shape
    visual = batch.visual_positions
    if keys is None:
        keys = torch.ones(visual.shape, dtype=torch.bool, device=visual.device)
    if keys.shape != visual.shape or keys.dtype != torch.bool:
        raise ValueError(f"keys must be an (N, V) = {tuple(visual.shape)} bool mask of visual tokens; got "
                         f"{tuple(keys.shape)} {keys.dtype}")
    rows = torch.arange(n, device=visual.device)[:, None]
    key_columns = torch.zeros(n, length, dtype=torch.bool, device=visual.device)
    key_columns[rows.expand_as(visual)[keys], visual[keys]] = True
    query_columns = torch.zeros(n, length, dtype=torch.bool, device=visual.device)
    query_columns[rows.expand_as(target.query_positions), target.query_positions] = target.weights > 0
    edges = query_columns[:, :, None] & key_columns[:, None, :]  # (N, L, L)

    starts = list(range(depth - window + 1))
    with torch.no_grad():
        with attention_implementation(vlm.model, "eager"):  # the knocked runs are eager: compare like with like
            clean = target_score(vlm, target).exp()
        knocked = torch.empty(n * len(starts), device=visual.device, dtype=torch.float32)
        for flat in chunked_rows(n * len(starts), positive_int("batch_size", batch_size), visual.device):
            row, start = flat // len(starts), flat % len(starts)
            blocked = {}
            for layer in range(depth):
                active = (start <= layer) & (layer < start + window)
                if bool(active.any()):
                    blocked[layer] = edges[row] & active[:, None, None]
            with knocked_out(vlm, blocked):
                knocked[flat] = target_score(vlm, target.select(row)).exp()
    knocked = knocked.view(n, len(starts))
    drops = 1 - knocked / clean[:, None].clamp_min(1e-30)
    return KnockoutResult(drops, clean, starts, window, list(target.answers))
