"""Explicit, recordable re-implementations of the attention modules mmelkit can trace.

While a trace is open, the ``forward`` of each traced attention module is replaced by one of the
functions built here. They compute exactly what the original computes (checked by the parity
tests to 1e-5 in fp32) but split the work into named steps, so that the tracer can keep, *inside
the autograd graph*, the tensors that explanation methods differentiate with respect to:

* ``q``, ``k``, ``v`` per head, shape ``(N, H, L, d)``, after any per-head norm the model applies;
* ``attn``: the attention probabilities ``(N, H, L, L)``. Fast fused kernels
  (``scaled_dot_product_attention``) never materialise them, so when they are asked for the
  softmax is computed explicitly ("math path"); when they are not, the fused kernel is kept;
* ``attn_out``: the attention output with heads concatenated, before the output projection,
  ``(N, L, D)``.

Three module families are covered: ``torch.nn.MultiheadAttention`` (open_clip's default blocks,
batch-first or sequence-first), open_clip's own ``Attention`` (custom blocks: qk-norm, scaled
head scaling, inner norm) and Hugging Face ``CLIPAttention`` (eager, sdpa and
any other backend, since the explicit path ignores the configured backend).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class AttentionRecord(Protocol):
    """Where an explicit attention forward stores what it computed (a BlockTrace)."""

    q: torch.Tensor | None
    k: torch.Tensor | None
    v: torch.Tensor | None
    attn: torch.Tensor | None
    attn_out: torch.Tensor | None
    single_head: bool  # run this block's attention as one head over the full width


class AttentionOptions(Protocol):
    """What the tracer asks of the explicit forward."""

    need_probs: bool
    math_attention: bool


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    additive_mask: torch.Tensor | None,
    scale: float | torch.Tensor,
    dropout_p: float,
    record: AttentionRecord,
    options: AttentionOptions,
) -> torch.Tensor:
    """Scaled dot-product attention over ``(N, H, L, d)`` tensors, recording what was asked.

    ``additive_mask`` broadcasts against ``(N, H, L, S)`` and holds 0 or -inf (or large negative)
    entries. Returns ``(N, H, L, d)``.
    """
    record.q, record.k, record.v = q, k, v
    if not (options.need_probs or options.math_attention):
        record.attn = None
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=additive_mask, dropout_p=dropout_p, scale=float(scale)
        )
    logits = torch.matmul(q * scale, k.transpose(-1, -2))
    if additive_mask is not None:
        logits = logits + additive_mask
    # Softmax in fp32 like the fused kernels do, so bf16/fp16 traces stay close to the model.
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    record.attn = probs
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def _merge_heads(out: torch.Tensor, record: AttentionRecord) -> torch.Tensor:
    """(N, H, L, d) -> (N, L, H*d), recorded as the pre-projection attention output."""
    n, h, length, d = out.shape
    merged = out.transpose(1, 2).reshape(n, length, h * d)
    record.attn_out = merged
    return merged


def _float_mask(mask: torch.Tensor, dtype: torch.dtype, true_means_blocked: bool) -> torch.Tensor:
    if mask.dtype == torch.bool:
        blocked = mask if true_means_blocked else ~mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(blocked, float("-inf"))
    return mask.to(dtype)


# ----------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention (open_clip ResidualAttentionBlock)
# ----------------------------------------------------------------------------------------------


def mha_forward(
    module: nn.MultiheadAttention, record: AttentionRecord, options: AttentionOptions
) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """Build an explicit replacement for ``module.forward`` (self-attention only)."""
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        raise NotImplementedError(
            "mmelkit traces self-attention nn.MultiheadAttention without bias_k/add_zero_attn; "
            "this module uses a variant it cannot reproduce exactly"
        )

    def forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key is not query or value is not query:
            raise NotImplementedError("mmelkit traces self-attention only (query, key, value must be one tensor)")
        x = query if module.batch_first else query.transpose(0, 1)  # -> (N, L, D)
        n, length, width = x.shape
        heads = 1 if record.single_head else module.num_heads
        head_dim = width // heads
        qkv = F.linear(x, module.in_proj_weight, module.in_proj_bias)
        q, k, v = (t.reshape(n, length, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))

        mask = None
        if attn_mask is not None:
            mask = _float_mask(attn_mask, q.dtype, true_means_blocked=True)
            if mask.dim() == 3:  # (N*H, L, S)
                mask = mask.reshape(n, heads, length, -1)
        elif is_causal:
            mask = torch.full((length, length), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        if key_padding_mask is not None:
            pad = _float_mask(key_padding_mask, q.dtype, true_means_blocked=True)[:, None, None, :]
            mask = pad if mask is None else mask + pad

        drop = module.dropout if module.training else 0.0
        local = _NeedProbs(options, need_weights)
        out = attend(q, k, v, additive_mask=mask, scale=head_dim**-0.5, dropout_p=drop, record=record, options=local)
        merged = _merge_heads(out, record)
        y = module.out_proj(merged)
        if not module.batch_first:
            y = y.transpose(0, 1)
        weights = None
        if need_weights:
            weights = record.attn.mean(dim=1) if average_attn_weights else record.attn
        return y, weights

    return forward


class _NeedProbs:
    """Options with ``need_probs`` forced on when the caller itself asked for the weights."""

    def __init__(self, options: AttentionOptions, caller_needs: bool) -> None:
        self.need_probs = options.need_probs or caller_needs
        self.math_attention = options.math_attention


# ----------------------------------------------------------------------------------------------
# open_clip.transformer.Attention (CustomResidualAttentionBlock)
# ----------------------------------------------------------------------------------------------


def open_clip_attention_forward(
    module: nn.Module, record: AttentionRecord, options: AttentionOptions
) -> Callable[..., torch.Tensor]:
    """Explicit replacement for open_clip's custom ``Attention.forward`` (batch-first).

    Scaled cosine attention is refused: open_clip's own forward for it fails on 4-D tensors, so
    there is no reference to stay faithful to.
    """
    if module.logit_scale is not None:
        raise NotImplementedError("mmelkit cannot trace open_clip's scaled cosine attention")
    per_head_parts = not isinstance(module.ln_q, nn.Identity) or module.head_scale is not None
    if record.single_head and per_head_parts:
        raise NotImplementedError("single-head tracing needs attention without per-head norms or scales")

    def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, length, width = x.shape
        heads = 1 if record.single_head else module.num_heads
        scale = width**-0.5 if record.single_head else module.scale
        q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, heads, -1).transpose(1, 2) for t in (q, k, v))

        mask = None
        if attn_mask is not None:
            if attn_mask.ndim == 3:
                attn_mask = attn_mask.reshape(n, heads, length, length)
            mask = _float_mask(attn_mask, q.dtype, true_means_blocked=True)

        drop = module.attn_drop.p if module.training else 0.0
        q, k = module.ln_q(q), module.ln_k(k)
        out = attend(q, k, v, additive_mask=mask, scale=scale, dropout_p=drop, record=record, options=options)
        if module.head_scale is not None:
            out = out * module.head_scale
        merged = _merge_heads(out, record)
        merged = module.ln_inner(merged)
        return module.out_drop(module.out_proj(merged))

    return forward


# ----------------------------------------------------------------------------------------------
# transformers CLIPAttention
# ----------------------------------------------------------------------------------------------


def hf_clip_attention_forward(
    module: nn.Module, record: AttentionRecord, options: AttentionOptions
) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """Explicit replacement for Hugging Face ``CLIPAttention.forward`` (any attention backend).

    Masks follow transformers' conventions: a float mask is additive; a boolean mask marks the
    positions that may be attended (True = keep); ``attention_mask=None`` with ``is_causal=True``
    (what the sdpa backend receives for unpadded text) means a plain causal mask. Older
    transformers pass the causal mask separately as ``causal_attention_mask``.
    """

    def forward(
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        causal_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, length, width = hidden_states.shape
        heads = 1 if record.single_head else module.num_heads
        head_dim = width // heads
        q, k, v = (
            proj(hidden_states).reshape(n, length, heads, head_dim).transpose(1, 2)
            for proj in (module.q_proj, module.k_proj, module.v_proj)
        )
        mask = None
        for part in (attention_mask, causal_attention_mask):
            if part is not None:
                part = _float_mask(part, q.dtype, true_means_blocked=False)
                mask = part if mask is None else mask + part
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", False)
        if mask is None and is_causal and length > 1:
            mask = torch.full((length, length), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        drop = module.dropout if module.training else 0.0
        local = _NeedProbs(options, bool(output_attentions))
        scale = head_dim**-0.5 if record.single_head else module.scale
        out = attend(q, k, v, additive_mask=mask, scale=scale, dropout_p=drop, record=record, options=local)
        merged = _merge_heads(out, record)
        return module.out_proj(merged), (record.attn if output_attentions else None)

    return forward
