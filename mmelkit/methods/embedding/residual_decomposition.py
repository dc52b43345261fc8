"""Residual decomposition of a CLIP image embedding (Gandelsman, Efros & Steinhardt, ICLR 2024).

A ViT image tower adds every block's attention and MLP output to one residual stream, and CLIP
reads the embedding off that stream at the CLS position: ``f = proj(LN_post(x_CLS))``. The final
LayerNorm is the only thing that is not linear. Fixing its mean and standard deviation at the
values it actually sees for that image ("linearising" it) makes the embedding an exact sum:

    f = embedding_term + sum_l attention_bias_l + sum_l mlp_l + sum_{l, h, t} head_token_{l, h, t}

where a residual component ``c`` (a vector of width D) maps to the joint space as

    head(c) = (gamma * (c - mean(c)) / std(x_CLS)) @ proj,

``std(x_CLS) = sqrt(var(x_CLS) + eps)`` being the final norm's own denominator for this image.
Centring and scaling are linear, so the parts add up to ``proj(LN_post(x_CLS))`` exactly; the
norm's shift ``beta @ proj`` (and a projection bias, when a model has one) belongs to no
component and is put into ``embedding_term``.

The head terms use what attention does at the CLS row: head h of block l moves
``A_h[CLS, t] * v_h[t]`` from token t into the CLS position, and the output projection's columns
of that head carry it into the stream: ``W_o[:, h] (A_h[CLS, t] v_h[t])`` (times a LayerScale
gain and open_clip's per-head scale, when present). The output projection's bias belongs to no
head and is reported per block as ``attention_bias``. The MLP term of block l is the block's MLP
(with its norm and LayerScale) evaluated on the CLS row of the stream after the block's
attention, that stream being rebuilt from the traced block input and the head terms, so a wrong
head term would show up as a mismatch of the sum (:meth:`ResidualDecomposition.relative_error`).

Only CLS-pooled ViT towers decompose this way: open_clip's ``VisionTransformer`` with
``pool_type="tok"`` and no attention pooler, and every Hugging Face ``CLIPModel``. Attention
variants that mix heads after the attention (open_clip's ``inner_norm`` / ``scale_attn``
LayerNorms) have no per-head linear terms and are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mmelkit._checks import positive_int, refuse_active_dropout
from mmelkit.methods.base import register_tool
from mmelkit.models.adapter import ClipAdapter
from mmelkit.models.tracing import BlockSelection, BlockTrace, resolve_blocks

__all__ = ["ResidualDecomposition", "decompose_image", "linearised_head"]


@dataclass(eq=False)
class ResidualDecomposition:
    """Direct contributions to unnormalised image embeddings, all ``float32`` on the model's device.

    With N images, B blocks, H heads per block, T tokens (CLS first, then the patches row by row)
    and E the embedding width:

    ================ ====================== ==============================================================
    field            shape                  what
    ================ ====================== ==============================================================
    embedding_term   (N, E)                 the stream entering block 0 at CLS (after the pre-norm), plus
                                            the final norm's shift ``beta @ proj`` and any projection bias
    heads            (N, B, H, E)           each head's direct contribution, summed over the tokens
    attention_bias   (N, B, E)              each block's attention output-projection bias (LayerScale'd)
    mlp              (N, B, E)              each block's MLP output at CLS
    head_tokens      (N, B_sel, H, T, E)    per-token head contributions for ``layer_indices`` (or None)
    embedding        (N, E)                 the model's own unnormalised image embedding
    ================ ====================== ==============================================================

    ``heads`` and ``mlp`` always cover every block (index = block index); ``head_tokens`` only the
    blocks in ``layer_indices`` (empty, and ``head_tokens`` None, unless decomposed with
    ``tokens=True``; :meth:`token_layer` finds a block's row). ``grid`` is the patch grid, so ``head_tokens[..., 1:, :]``
    reshapes to ``(..., *grid, E)``. ``final_std`` (N,) is the final norm's denominator that the
    linearisation fixes.
    """

    embedding_term: torch.Tensor
    heads: torch.Tensor
    attention_bias: torch.Tensor
    mlp: torch.Tensor
    embedding: torch.Tensor
    final_std: torch.Tensor
    grid: tuple[int, int]
    num_heads: int
    layer_indices: list[int]
    head_tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embedding.shape[0]

    @property
    def num_layers(self) -> int:
        """Blocks of the image tower (the second axis of ``heads`` and ``mlp``)."""
        return self.heads.shape[1]

    def total(self) -> torch.Tensor:
        """Sum of all terms, (N, E): equals ``embedding`` up to rounding."""
        return (
            self.embedding_term
            + self.heads.sum(dim=(1, 2))
            + self.attention_bias.sum(dim=1)
            + self.mlp.sum(dim=1)
        )

    def relative_error(self) -> torch.Tensor:
        """Per image ``|total() - embedding| / |embedding|``, (N,)."""
        gap = torch.linalg.vector_norm(self.total() - self.embedding, dim=-1)
        return gap / torch.linalg.vector_norm(self.embedding, dim=-1).clamp_min(1e-12)

    def token_layer(self, layer: int) -> int:
        """Row of ``head_tokens`` that holds block ``layer`` (negative indices count from the end)."""
        if self.head_tokens is None:
            raise ValueError("this decomposition has no token terms; decompose with tokens=True")
        block = layer + self.num_layers if layer < 0 else layer
        if block not in self.layer_indices:
            raise KeyError(f"block {layer} has no token terms (token terms of blocks {self.layer_indices})")
        return self.layer_indices.index(block)


# -------------------------------------------------------------------------------------------------
# What the decomposition needs to know about a model
# -------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _ImageHead:
    """The final norm and projection: ``LN(x) @ projection + projection_bias``."""

    norm_weight: torch.Tensor | None  # (D,)
    norm_bias: torch.Tensor | None  # (D,)
    eps: float
    projection: torch.Tensor | None  # (D, E); None: the embedding is the normed stream itself
    projection_bias: torch.Tensor | None  # (E,)


@dataclass(eq=False)
class _BlockParts:
    """One block, as far as its CLS-row residual contributions go."""

    out_weight: torch.Tensor  # (D, H*d): the attention's output projection
    out_bias: torch.Tensor | None  # (D,)
    head_scale: torch.Tensor | None  # (H,): open_clip's per-head output scale
    attention_gain: torch.Tensor | None  # (D,): LayerScale on the attention branch
    mlp_branch: Callable[[torch.Tensor], torch.Tensor]  # stream after attention -> MLP residual


def _as_float(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().float()


def _layer_scale_gain(module: nn.Module, width: int, where: str) -> torch.Tensor | None:
    if isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if isinstance(gamma, torch.Tensor) and tuple(gamma.shape) in ((width,), (1,)):
        return gamma.detach().float()
    raise NotImplementedError(f"{where}: a {type(module).__name__} on the residual branch is not an elementwise "
                              "gain; the residual decomposition needs LayerScale or nothing there")


def _layer_norm_parts(norm: nn.Module, where: str) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    if not isinstance(norm, nn.LayerNorm):
        raise NotImplementedError(f"{where} is a {type(norm).__name__}; the residual decomposition linearises a "
                                  "LayerNorm only")
    return _as_float(norm.weight), _as_float(norm.bias), float(norm.eps)


def _open_clip_parts(model: ClipAdapter) -> tuple[_ImageHead, list[_BlockParts]]:
    from open_clip.transformer import Attention as OpenClipAttention

    visual = model.backend.visual
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("this open_clip image tower pools with an attention pooler; the residual "
                                  "decomposition needs CLS-token pooling")
    pool = getattr(visual, "pool_type", None)
    if pool is None:  # open_clip before pool_type existed: a flag for average pooling
        pool = "avg" if getattr(visual, "global_average_pool", False) else "tok"
    if pool != "tok":
        raise NotImplementedError(f"this open_clip image tower pools with pool_type={pool!r}; the residual "
                                  "decomposition needs CLS-token pooling ('tok')")
    weight, bias, eps = _layer_norm_parts(visual.ln_post, "the image tower's ln_post")
    head = _ImageHead(weight, bias, eps, _as_float(visual.proj), None)

    parts = []
    for index, block in enumerate(visual.transformer.resblocks):
        where = f"image block {index}"
        attention = block.attn
        head_scale = None
        if isinstance(attention, OpenClipAttention):
            if not isinstance(attention.ln_inner, nn.Identity):
                raise NotImplementedError(f"{where} normalises the concatenated heads (inner_norm), which mixes "
                                          "heads: there are no separate per-head terms")
            if attention.head_scale is not None:
                head_scale = attention.head_scale.detach().float().reshape(-1)
        elif not isinstance(attention, nn.MultiheadAttention):
            raise NotImplementedError(f"{where}: cannot decompose attention of type {type(attention).__name__}")
        if not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity):
            raise NotImplementedError(f"{where} normalises the attention output (scale_attn), which mixes heads: "
                                      "there are no separate per-head terms")
        width = attention.out_proj.weight.shape[0]
        mlp_gain = block.ls_2

        def mlp_branch(stream: torch.Tensor, block: nn.Module = block, mlp_gain: nn.Module = mlp_gain) -> torch.Tensor:
            return mlp_gain(block.mlp(block.ln_2(stream)))

        parts.append(_BlockParts(
            out_weight=attention.out_proj.weight.detach().float(),
            out_bias=_as_float(attention.out_proj.bias),
            head_scale=head_scale,
            attention_gain=_layer_scale_gain(block.ls_1, width, f"{where} ls_1"),
            mlp_branch=mlp_branch,
        ))
        _layer_scale_gain(block.ls_2, width, f"{where} ls_2")  # the same check; applied as a module above
    return head, parts


def _hf_parts(model: ClipAdapter) -> tuple[_ImageHead, list[_BlockParts]]:
    clip = model.model
    weight, bias, eps = _layer_norm_parts(clip.vision_model.post_layernorm, "the image tower's post_layernorm")
    projection = clip.visual_projection
    head = _ImageHead(weight, bias, eps, projection.weight.detach().float().T, _as_float(projection.bias))

    parts = []
    for layer in clip.vision_model.encoder.layers:

        def mlp_branch(stream: torch.Tensor, layer: nn.Module = layer) -> torch.Tensor:
            return layer.mlp(layer.layer_norm2(stream))

        out_proj = layer.self_attn.out_proj
        parts.append(_BlockParts(out_proj.weight.detach().float(), _as_float(out_proj.bias), None, None, mlp_branch))
    return head, parts


def _model_parts(model: ClipAdapter) -> tuple[_ImageHead, list[_BlockParts]]:
    if model.family == "open_clip":
        return _open_clip_parts(model)
    if model.family == "hf_clip":
        return _hf_parts(model)
    raise NotImplementedError(f"the residual decomposition knows open_clip and Hugging Face CLIP models, not "
                              f"{model.family!r}")


def _image_tower_module(model: ClipAdapter) -> nn.Module:
    return model.backend.visual if model.family == "open_clip" else model.model.vision_model


def _refuse_active_dropout(model: ClipAdapter) -> None:
    # Dropout makes the traced attention probabilities differ from the ones that were applied
    # (and patch dropout drops tokens), so the terms would not add up to the embedding.
    refuse_active_dropout(_image_tower_module(model), "the terms would not add up to the embedding", "image tower")


# -------------------------------------------------------------------------------------------------
# The decomposition
# -------------------------------------------------------------------------------------------------


def linearised_head(
    components: torch.Tensor, std: torch.Tensor, norm_weight: torch.Tensor | None, projection: torch.Tensor | None
) -> torch.Tensor:
    """Residual components ``(N, ..., D)`` through the final norm linearised at per-image ``std``
    ``(N,)``: ``((c - mean(c)) * norm_weight / std) @ projection`` -> ``(N, ..., E)``."""
    if std.shape != components.shape[:1]:
        raise ValueError(f"std must hold one value per image, shape ({components.shape[0]},); got {tuple(std.shape)}")
    width = components.shape[-1]
    if norm_weight is not None and norm_weight.shape != (width,):
        raise ValueError(f"norm_weight must be ({width},) like the components' last axis; got {tuple(norm_weight.shape)}")
    if projection is not None and (projection.ndim != 2 or projection.shape[0] != width):
        raise ValueError(f"projection must be ({width}, E); got {tuple(projection.shape)}")
    centred = components - components.mean(dim=-1, keepdim=True)
    scaled = centred / std.reshape(-1, *([1] * (components.dim() - 1)))
    if norm_weight is not None:
        scaled = scaled * norm_weight
    return scaled @ projection if projection is not None else scaled


def _decompose_batch(
    model: ClipAdapter,
    pixels: torch.Tensor,
    head: _ImageHead,
    parts: list[_BlockParts],
    token_layers: list[int],
) -> dict[str, torch.Tensor]:
    with model.trace(image_blocks="all", attention_probs=True) as trace:
        embedding = model.encode_image(pixels, normalize=False).float()
    records: list[BlockTrace] = [trace.image[index] for index in range(len(parts))]

    final = records[-1].tokens_out[:, 0].float()  # (n, D): what LN_post reads
    std = torch.sqrt(final.var(dim=-1, unbiased=False) + head.eps)

    def to_joint(components: torch.Tensor) -> torch.Tensor:
        return linearised_head(components, std, head.norm_weight, head.projection)

    constant = head.norm_bias if head.norm_bias is not None else final.new_zeros(final.shape[-1])
    constant = constant @ head.projection if head.projection is not None else constant
    if head.projection_bias is not None:
        constant = constant + head.projection_bias
    embedding_term = to_joint(records[0].tokens_in[:, 0].float()) + constant

    heads, biases, mlps, tokens = [], [], [], []
    for index, (record, block) in enumerate(zip(records, parts, strict=True)):
        probs, values = record.attn, record.v
        if probs is None or values is None:
            raise RuntimeError(f"image block {index} recorded no attention; was the forward pass traced?")
        n, num_heads, length, head_dim = values.shape
        width = block.out_weight.shape[0]
        per_head_weight = block.out_weight.reshape(width, num_heads, head_dim)  # columns of head h
        # What head h moves from token t into the CLS row, in the head's value space.
        moved = probs[:, :, 0, :].float()[..., None] * values.float()  # (n, H, T, d)
        if block.head_scale is not None:
            moved = moved * block.head_scale[None, :, None, None]
        head_sum = torch.einsum("nhd,Dhd->nhD", moved.sum(dim=2), per_head_weight)  # (n, H, D)
        bias = block.out_bias if block.out_bias is not None else head_sum.new_zeros(width)
        bias = bias.expand(n, width)
        if block.attention_gain is not None:
            head_sum, bias = head_sum * block.attention_gain, bias * block.attention_gain

        # The MLP reads the stream after this block's attention: the traced input plus the head
        # terms just computed (not the model's own value), so head errors surface in the sum.
        after_attention = record.tokens_in[:, 0].float() + head_sum.sum(dim=1) + bias
        branch_dtype = record.tokens_in.dtype
        mlp = block.mlp_branch(after_attention.to(branch_dtype)).float()

        heads.append(to_joint(head_sum))
        biases.append(to_joint(bias))
        mlps.append(to_joint(mlp))
        if index in token_layers:
            per_token = torch.einsum("nhtd,Dhd->nhtD", moved, per_head_weight)  # (n, H, T, D)
            if block.attention_gain is not None:
                per_token = per_token * block.attention_gain
            tokens.append(to_joint(per_token))

    out = {
        "embedding_term": embedding_term,
        "heads": torch.stack(heads, dim=1),
        "attention_bias": torch.stack(biases, dim=1),
        "mlp": torch.stack(mlps, dim=1),
        "embedding": embedding,
        "final_std": std,
    }
    if token_layers:
        out["head_tokens"] = torch.stack(tokens, dim=1)
    return out


@register_tool("residual_decomposition", level="model", granularity="embedding", family="decomposition",
               reference="Gandelsman, Efros & Steinhardt, ICLR 2024; SPEC §7")
def decompose_image(
    model: ClipAdapter,
    images: Any,
    *,
    tokens: bool = False,
    layers: BlockSelection = None,
    batch_size: int = 64,
    progress: bool = False,
) -> ResidualDecomposition:
    """Decompose the unnormalised image embeddings of ``images`` into direct contributions.

    ``images``: anything :meth:`ClipAdapter.as_pixels` takes. ``tokens=True`` also keeps every
    head's per-token terms (``head_tokens``, N x B_sel x H x T x E floats: mind the memory) for
    the blocks in ``layers`` (``None`` or ``"all"``: every block; an int or ints, negative ones
    counting from the last block). ``batch_size`` images go through the model at a time.

    See the module docstring for the terms and where biases go. Everything is computed in
    float32 on the model's device; no gradients are kept. Raises ``IndexError`` for a block index
    outside the tower, ``NotImplementedError`` for towers without a per-head linear structure or
    without CLS pooling, ``RuntimeError`` for a tower in training mode with active dropout.
    """
    batch_size = positive_int("batch_size", batch_size)
    depth = model.num_image_blocks
    token_layers = resolve_blocks("all" if layers is None else layers, depth, "image") if tokens else []
    if not tokens and layers is not None:
        resolve_blocks(layers, depth, "image")  # a bad selection is an error even when it is not used
    head, parts = _model_parts(model)
    _refuse_active_dropout(model)
    pixels = model.as_pixels(images)
    if len(pixels) == 0:
        raise ValueError("no images to decompose")
    grid = model.grid(pixels)

    chunks: list[dict[str, torch.Tensor]] = []
    starts = range(0, len(pixels), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, disable=not progress, desc="decompose", unit="batch"):
            chunks.append(_decompose_batch(model, pixels[start : start + batch_size], head, parts, token_layers))
    joined = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
    num_heads = joined["heads"].shape[2]
    return ResidualDecomposition(
        embedding_term=joined["embedding_term"],
        heads=joined["heads"],
        attention_bias=joined["attention_bias"],
        mlp=joined["mlp"],
        embedding=joined["embedding"],
        final_std=joined["final_std"],
        grid=grid,
        num_heads=num_heads,
        layer_indices=token_layers,
        head_tokens=joined.get("head_tokens"),
    )
