"""Causal tracing / activation patching (Meng et al., NeurIPS 2022; Basu et al. 2024 for
multimodal LLMs; SPEC §6).

The image is corrupted in one of SPEC §6's two ways: Gaussian noise of ``noise_scale`` times
their standard deviation on the visual tokens (all, or one object's), or a second image (the named
object painted over with the background: :meth:`mmelkit.datasets.Scene.erased`) whose
visual tokens replace the clean ones. Then, for each decoder layer l and sequence position j, the
clean run's output hidden state of layer l at j is restored in the corrupted run, and
p(answer) is read. Where restoring one state brings the answer back, that state carries what the
image told the model. ``effect`` normalises: 0 = as corrupted, 1 = as clean.

Every (row, layer, position) copy is one row of a batched forward; a forward hook on each decoder
layer writes the clean state into the copies that restore there. The noise is one seeded pattern
shared by all rows, so a row's trace does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from mmelkit._checks import positive_int
from mmelkit.methods.answers import AnswerTarget, chunked_rows, clean_visual_tokens, target_score
from mmelkit.methods.base import register_tool
from mmelkit.models.vlm.adapter import VlmAdapter


@dataclass(eq=False)
class CausalTrace:
    """``recovered`` (N, layers, L): p(answer) with layer l's clean state restored at position j
    (NaN where j is padding or after the last query column); ``clean`` and ``corrupted`` (N,)
    p(answer) of the two runs; ``visual_positions`` (N, V) to mark the image's columns in a plot
    (:func:`mmelkit.viz.vlm.causal_trace_figure`)."""

    recovered: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor
    visual_positions: torch.Tensor
    answers: list[str]

    @property
    def effect(self) -> torch.Tensor:
        """(recovered - corrupted) / (clean - corrupted): 1 where restoring one state is enough."""
        gap = (self.clean - self.corrupted)[:, None, None]
        return (self.recovered - self.corrupted[:, None, None]) / torch.where(gap.abs() < 1e-12, torch.ones_like(gap), gap)


@contextmanager
def restored(vlm: VlmAdapter, layer_of_row: torch.Tensor, position_of_row: torch.Tensor,
             states: torch.Tensor) -> Iterator[None]:
    """While open, decoder layer l's output at ``position_of_row[i]`` becomes ``states[i]`` for the
    rows i with ``layer_of_row[i] == l`` (a batched activation patch)."""
    handles = []

    def hook_for(layer: int) -> Any:
        rows = (layer_of_row == layer).nonzero().flatten()

        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            patched = hidden.index_put((rows, position_of_row[rows]), states[rows].to(hidden.dtype))
            return (patched, *output[1:]) if isinstance(output, tuple) else patched

        return hook

    try:
        for layer in sorted(set(layer_of_row.tolist())):
            handles.append(vlm.parts.decoder_layers[layer].register_forward_hook(hook_for(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def corrupt_visual_tokens(visual: torch.Tensor, tokens: torch.Tensor, noise_scale: float, seed: int) -> torch.Tensor:
    """``visual`` (N, V, D) with noise_scale * std(row) * eps added on ``tokens`` (N, V) bool; eps is
    one seeded (V, D) pattern for every row."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    eps = torch.randn(visual.shape[1:], generator=generator, dtype=torch.float32).to(visual.device, visual.dtype)
    scale = noise_scale * visual.std(dim=(1, 2), keepdim=True)
    return torch.where(tokens[..., None], visual + scale * eps[None], visual)


def _visual_tokens_of(vlm: VlmAdapter, images: Any, clean: torch.Tensor) -> torch.Tensor:
    """The corrupted images' visual tokens, (N, V, D) like ``clean``, or a ValueError naming them."""
    with torch.no_grad():
        corrupted = vlm.visual_features(images)
    if corrupted.shape != clean.shape:
        raise ValueError(f"corrupted_images must give one image per row, of the clean images' size: visual tokens "
                         f"{tuple(corrupted.shape)} against the clean {tuple(clean.shape)}")
    return corrupted.to(clean.dtype)


@register_tool("causal_trace", level="model", granularity="layer", family="causal intervention", explains="vlm",
               reference="Meng et al., NeurIPS 2022 (causal tracing); SPEC §6")
def causal_trace(
    vlm: VlmAdapter,
    target: AnswerTarget,
    tokens: torch.Tensor | None = None,
    noise_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
    corrupted_images: Any | None = None,
) -> CausalTrace:
    """Restore each (decoder layer, position) clean state into the corrupted run; see the module doc.

    ``tokens`` (N, V) bool: the visual tokens to corrupt with noise (default: all).
    ``corrupted_images``: instead of noise, one corrupted image per row (any form
    :meth:`VlmAdapter.visual_features` takes, the clean images' size), e.g. the scene with the named
    object painted over; ``tokens``, ``noise_scale`` and ``seed`` then do not apply. Positions run
    over every real column up to the row's last target query column (later columns cannot affect
    the answer)."""
    if noise_scale <= 0:
        raise ValueError(f"noise_scale must be positive; got {noise_scale}")
    batch = target.batch
    n, length = batch.input_ids.shape
    visual = clean_visual_tokens(vlm, target)
    if corrupted_images is not None:
        if tokens is not None:
            raise ValueError("give tokens (noise on those visual tokens) or corrupted_images, not both")
        corrupted_visual = _visual_tokens_of(vlm, corrupted_images, visual)
    else:
        if tokens is None:
            tokens = torch.ones(visual.shape[:2], dtype=torch.bool, device=visual.device)
        if tokens.shape != visual.shape[:2] or tokens.dtype != torch.bool:
            raise ValueError(f"tokens must be an (N, V) = {tuple(visual.shape[:2])} bool mask; got {tuple(tokens.shape)} {tokens.dtype}")
        corrupted_visual = corrupt_visual_tokens(visual, tokens, noise_scale, seed)
    depth = vlm.num_decoder_layers
    with torch.no_grad():
        with vlm.trace(decoder_attentions=False, decoder_hidden=True, vision=False, visual_leaf=False) as trace:
            clean = target_score(vlm, target, visual).exp()
            states = trace.decoder_hidden()  # (layers, N, L, D)
        corrupted = target_score(vlm, target, corrupted_visual).exp()
        last_query = torch.where(target.weights > 0, target.query_positions, torch.zeros_like(target.query_positions)).amax(1)
        columns = torch.arange(length, device=visual.device)
        valid = (batch.attention_mask > 0) & (columns[None] <= last_query[:, None])  # (N, L)
        row, layer, position = torch.meshgrid(torch.arange(n, device=visual.device), torch.arange(depth, device=visual.device),
                                              columns, indexing="ij")
        keep = valid[:, None, :].expand(n, depth, length)
        row, layer, position = row[keep], layer[keep], position[keep]
        recovered = torch.full((n, depth, length), float("nan"), device=visual.device)
        for chunk in chunked_rows(len(row), positive_int("batch_size", batch_size), visual.device):
            rows, layers, columns_ = row[chunk], layer[chunk], position[chunk]
            with restored(vlm, layers, columns_, states[layers, rows, columns_]):
                recovered[rows, layers, columns_] = target_score(vlm, target.select(rows), corrupted_visual[rows]).exp()
    return CausalTrace(recovered, clean, corrupted, batch.visual_positions, list(target.answers))
