"""Tracing: record what happens inside chosen transformer blocks, with gradients available.

Usage (``model`` is a :class:`~mmelkit.models.adapter.ClipAdapter`)::

    with model.trace(image_blocks=[-1], text_blocks=None) as trace:
        score = model.score(pixels, tokens, pairing="paired")
    last = trace.image[-1]
    grad_o, = torch.autograd.grad(score.sum(), last.attn_out)

For every traced block a :class:`BlockTrace` holds, in batch-first ``(N, L, ...)`` layout whatever
layout the model uses internally:

========== ===================== ===============================================================
field      shape                 meaning
========== ===================== ===============================================================
tokens_in  (N, L, D)             block input (residual stream before the block)
q, k, v    (N, H, L, d)          per-head queries, keys, values as used by the attention
attn       (N, H, L, L)          attention probabilities (``None`` if ``attention_probs=False``)
attn_out   (N, L, D)             attention output, heads concatenated, before the output proj.
tokens_out (N, L, D)             block output
========== ===================== ===============================================================

All of them are nodes of the autograd graph that produced the model's output, so
``torch.autograd.grad(output, trace.image[i].attn_out)`` differentiates through the model. When
the model's parameters and inputs do not require gradients (a frozen model), the input of the
first traced block is turned into a leaf that does, so gradients to the traced tensors are still
available; nothing upstream of that block is differentiated.

How: forward pre-hooks and hooks on each block record (and, for sequence-first models, re-layout)
the residual stream; the block's attention module's ``forward`` is swapped for an explicit
re-implementation (:mod:`mmelkit.models.attention`) that computes the same values in recordable
steps. Everything is undone when the ``with`` block exits, also after an exception. A block can
be traced by one trace at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from mmelkit.models import attention as explicit

BlockSelection = None | int | Sequence[int] | Literal["all"]
AttentionKind = Literal["torch_mha", "open_clip", "hf_clip"]

_EXPLICIT_FORWARDS: dict[str, Callable[..., Callable[..., Any]]] = {
    "torch_mha": explicit.mha_forward,
    "open_clip": explicit.open_clip_attention_forward,
    "hf_clip": explicit.hf_clip_attention_forward,
}


@dataclass
class TowerInfo:
    """How to find and read the blocks of one tower (filled in by a model backend)."""

    name: Literal["image", "text"]
    blocks: list[nn.Module]
    attentions: list[nn.Module]
    attention_kind: AttentionKind
    batch_first: bool
    num_prefix_tokens: int  # tokens before the patch tokens (CLS): 1 for ViT image towers, 0 for text


@dataclass(eq=False)
class BlockTrace:
    """What one block computed in the most recent forward pass through it."""

    tower: Literal["image", "text"]
    index: int
    num_prefix_tokens: int
    tokens_in: torch.Tensor | None = None
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None
    tokens_out: torch.Tensor | None = None
    grid: tuple[int, int] | None = None  # patch grid of the images (image tower only)
    calls: int = 0  # forward passes seen; fields hold the last one
    # Ran the attention as ONE head over the full width instead of the model's heads. This changes
    # the model's output; only Grad-ECLIP's "official" reproduction mode asks for it.
    single_head: bool = False

    @property
    def num_heads(self) -> int:
        return self._require("q").shape[1]

    @property
    def head_dim(self) -> int:
        return self._require("q").shape[-1]

    def patch_part(self, tokens: torch.Tensor) -> torch.Tensor:
        """Drop the prefix (CLS) positions along the token axis (dim 1 for (N, L, ...) tensors,
        the last two axes for attention maps are left to the caller)."""
        return tokens[:, self.num_prefix_tokens :]

    def _require(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(
                f"{self.tower} block {self.index} recorded no '{name}': did a forward pass run inside the trace?"
            )
        return value


@dataclass(eq=False)
class ModelTrace:
    """Block records of both towers, keyed by block index (negative indices work for reading)."""

    image_blocks: dict[int, BlockTrace] = field(default_factory=dict)
    text_blocks: dict[int, BlockTrace] = field(default_factory=dict)
    num_image_blocks: int = 0
    num_text_blocks: int = 0
    attention_probs: bool = True
    math_attention: bool = False

    @property
    def image(self) -> _TowerView:
        return _TowerView(self.image_blocks, self.num_image_blocks, "image")

    @property
    def text(self) -> _TowerView:
        return _TowerView(self.text_blocks, self.num_text_blocks, "text")

    # read by the explicit attention forwards
    @property
    def need_probs(self) -> bool:
        return self.attention_probs


class _TowerView:
    def __init__(self, blocks: dict[int, BlockTrace], depth: int, name: str) -> None:
        self._blocks, self._depth, self._name = blocks, depth, name

    def __getitem__(self, index: int) -> BlockTrace:
        key = index + self._depth if index < 0 else index
        if key not in self._blocks:
            raise KeyError(f"{self._name} block {index} was not traced (traced: {sorted(self._blocks)})")
        return self._blocks[key]

    def __iter__(self) -> Iterator[BlockTrace]:
        return iter(self._blocks[k] for k in sorted(self._blocks))

    def __len__(self) -> int:
        return len(self._blocks)

    def indices(self) -> list[int]:
        return sorted(self._blocks)


def resolve_blocks(selection: BlockSelection, depth: int, tower: str) -> list[int]:
    """Turn a block selection (None, 'all', an int or ints, negatives allowed) into sorted indices."""
    if selection is None:
        return []
    if isinstance(selection, str):
        if selection != "all":
            raise ValueError(f"{tower}_blocks must be None, 'all', an int or a list of ints; got {selection!r}")
        return list(range(depth))
    items = [selection] if isinstance(selection, int) else list(selection)
    out = set()
    for item in items:
        if not isinstance(item, int) or isinstance(item, bool):
            raise TypeError(f"{tower} block indices must be ints; got {item!r}")
        if not -depth <= item < depth:
            raise IndexError(f"{tower} tower has {depth} blocks; index {item} is out of range")
        out.add(item % depth)
    return sorted(out)


_TRACED_ATTR = "_mmelkit_traced"


class Tracer:
    """Installs hooks and explicit attention on selected blocks; :meth:`close` undoes all of it."""

    def __init__(self, trace: ModelTrace) -> None:
        self.trace = trace
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._patched: list[tuple[nn.Module, Any]] = []
        self._marked: list[nn.Module] = []

    def install(self, tower: TowerInfo, indices: list[int], single_head: frozenset[int] = frozenset()) -> None:
        target = self.trace.image_blocks if tower.name == "image" else self.trace.text_blocks
        for index in indices:
            block, attention = tower.blocks[index], tower.attentions[index]
            if getattr(block, _TRACED_ATTR, False):
                raise RuntimeError(f"{tower.name} block {index} is already being traced by another open trace")
            record = BlockTrace(tower=tower.name, index=index, num_prefix_tokens=tower.num_prefix_tokens,
                                single_head=index in single_head)
            target[index] = record
            setattr(block, _TRACED_ATTR, True)
            self._marked.append(block)
            self._handles.append(
                block.register_forward_pre_hook(_pre_hook(record, tower.batch_first), with_kwargs=True)
            )
            self._handles.append(block.register_forward_hook(_post_hook(record, tower.batch_first)))
            previous = attention.__dict__.get("forward", _MISSING)
            self._patched.append((attention, previous))
            attention.forward = _EXPLICIT_FORWARDS[tower.attention_kind](attention, record, self.trace)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, previous in reversed(self._patched):
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._patched.clear()
        for block in self._marked:
            block.__dict__.pop(_TRACED_ATTR, None)
        self._marked.clear()


_MISSING = object()


def _ensure_grad(x: torch.Tensor) -> torch.Tensor:
    # A frozen model gives activations without a graph; make this block's input a leaf that
    # requires grad so that every traced tensor downstream can be differentiated.
    if torch.is_grad_enabled() and not x.requires_grad and x.is_floating_point():
        return x.detach().requires_grad_(True)
    return x


def _pre_hook(record: BlockTrace, batch_first: bool) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            x, where = args[0], "args"
        else:
            name = next((n for n in ("hidden_states", "q_x", "x") if n in kwargs), None)
            if name is None:
                raise RuntimeError("mmelkit could not find the token tensor among the block's inputs")
            x, where = kwargs[name], name
        x = _ensure_grad(x)
        if batch_first:
            record.tokens_in = x
        else:
            record.tokens_in = x.transpose(0, 1)
            x = record.tokens_in.transpose(0, 1)
        record.calls += 1
        if where == "args":
            return (x, *args[1:]), kwargs
        return args, {**kwargs, where: x}

    return hook


def _post_hook(record: BlockTrace, batch_first: bool) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        y = output[0] if isinstance(output, tuple) else output
        if batch_first:
            record.tokens_out = y
            return None
        record.tokens_out = y.transpose(0, 1)
        y = record.tokens_out.transpose(0, 1)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    return hook
