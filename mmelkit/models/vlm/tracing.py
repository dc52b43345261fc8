"""Tracing a LLaVA-style VLM: decoder attentions and hidden states, the vision tower's own layers, and
the projected visual tokens as a differentiable leaf.

Usage (``vlm`` is a :class:`~mmelkit.models.vlm.VlmAdapter`)::

    batch = vlm.encode(images, questions, answers)
    with vlm.trace() as trace:
        logits = vlm.forward(batch).logits
    target = vlm.answer_logprob_from_logits(logits, batch).total.sum()
    grad, = torch.autograd.grad(target, trace.visual_embeds)      # (N, V, D)
    attn = trace.decoder[-1].attn                                   # (N, H, L, L)

What is recorded, batch first:

================================ ================= ==============================================
field                            shape             meaning
================================ ================= ==============================================
``decoder[l].attn``              (N, H, Lq, Lk)    attention probabilities of decoder layer l
``decoder[l].hidden_in``         (N, Lq, D)        residual stream entering layer l
``decoder[l].hidden``            (N, Lq, D)        residual stream leaving layer l (before the
                                                   final norm for the last layer)
``vision[l].attn``               (N, Hv, P, P)     the vision tower's attention (P = patches + CLS)
``vision[l].hidden_in/hidden``   (N, P, Dv)        its residual stream around layer l
``visual_embeds``                (N, V, D)         projected visual tokens fed to the decoder
================================ ================= ==============================================

``Lq == Lk == L`` for a full forward pass; during cached decoding ``Lq`` is 1 and ``Lk`` grows.
Each record holds the most recent forward pass through its layer (``calls`` counts them).

While a trace is open the model runs eager attention (sdpa and flash kernels return no
probabilities); the previous implementation of every sub-model is restored when the ``with`` block
exits, also after an exception, and every hook is removed.

Gradients: with ``visual_leaf=True`` (default) the projector's output is replaced by a detached
copy that requires grad, so ``torch.autograd.grad(target, trace.visual_embeds)`` works on a frozen
model and nothing upstream of the visual tokens is differentiated. With ``visual_leaf=False`` the
graph is left whole: when the vision tower is traced, its first traced layer's input becomes the
leaf instead, so gradients flow from the decoder through the projector into the vision records
(LVLM-Interpret's relevancy "through the CLIP layers"). The vision records are differentiable in
both modes (with respect to their own leaf); under ``torch.no_grad()`` nothing becomes a leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from mmelkit.models.tracing import BlockSelection, resolve_blocks


@dataclass
class VlmParts:
    """The modules of a ``LlavaForConditionalGeneration`` that the adapter and the tracer use."""

    language_model: nn.Module
    decoder_layers: list[nn.Module]
    vision_tower: nn.Module
    vision_layers: list[nn.Module]
    projector: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module


def find_parts(model: nn.Module) -> VlmParts:
    """Locate the decoder, vision tower and projector of a LLaVA model (transformers 4.4x and 5.x)."""
    inner = getattr(model, "model", model)
    language_model = getattr(inner, "language_model", None)
    vision_tower = getattr(inner, "vision_tower", None)
    projector = getattr(inner, "multi_modal_projector", None)
    lm_head = getattr(model, "lm_head", None)
    if language_model is None or vision_tower is None or projector is None or lm_head is None:
        raise TypeError(
            f"{type(model).__name__} does not look like a LlavaForConditionalGeneration: expected "
            "model.model.language_model, .vision_tower, .multi_modal_projector and model.lm_head"
        )
    decoder = getattr(language_model, "layers", None)
    if decoder is None and hasattr(language_model, "model"):  # a *ForCausalLM language model (4.4x)
        decoder = getattr(language_model.model, "layers", None)
        final_norm = getattr(language_model.model, "norm", None)
    else:
        final_norm = getattr(language_model, "norm", None)
    vision_layers = None
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        module: Any = vision_tower
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is not None:
            vision_layers = module
            break
    if decoder is None or final_norm is None or vision_layers is None:
        raise TypeError(
            f"cannot find the decoder layers, final norm or vision encoder layers of {type(model).__name__}"
        )
    return VlmParts(
        language_model=language_model,
        decoder_layers=list(decoder),
        vision_tower=vision_tower,
        vision_layers=list(vision_layers),
        projector=projector,
        final_norm=final_norm,
        lm_head=lm_head,
    )


@dataclass(eq=False)
class LayerTrace:
    """What one decoder or vision layer computed in the most recent forward pass through it."""

    part: str  # "decoder" or "vision"
    index: int
    attn: torch.Tensor | None = None
    hidden_in: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    calls: int = 0

    def require(self, name: str) -> torch.Tensor:
        """The recorded field ``name``, or a clear error if nothing was recorded."""
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(
                f"{self.part} layer {self.index} recorded no '{name}': was it asked for, and did a forward "
                "pass run inside the trace?"
            )
        return value


class DecoderLayerTrace(LayerTrace):
    """A decoder layer's record (see the module docstring for the fields)."""


class VisionLayerTrace(LayerTrace):
    """A vision tower layer's record (see the module docstring for the fields)."""


T = TypeVar("T", bound=LayerTrace)


class LayerView(Generic[T]):
    """Records keyed by layer index; negative indices count from the model's last layer."""

    def __init__(self, records: dict[int, T], depth: int, name: str) -> None:
        self._records, self._depth, self._name = records, depth, name

    def __getitem__(self, index: int) -> T:
        key = index + self._depth if index < 0 else index
        if key not in self._records:
            raise KeyError(f"{self._name} layer {index} was not traced (traced: {sorted(self._records)})")
        return self._records[key]

    def __iter__(self) -> Iterator[T]:
        return iter(self._records[k] for k in sorted(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def indices(self) -> list[int]:
        return sorted(self._records)


@dataclass(eq=False)
class VlmTrace:
    """Everything a trace recorded; see :mod:`mmelkit.models.vlm.tracing`."""

    decoder_layers: dict[int, DecoderLayerTrace] = field(default_factory=dict)
    vision_layers: dict[int, VisionLayerTrace] = field(default_factory=dict)
    num_decoder_layers: int = 0
    num_vision_layers: int = 0
    visual_embeds: torch.Tensor | None = None
    visual_leaf: bool = True
    grid: tuple[int, int] | None = None
    num_prefix_visual_tokens: int = 0  # 1 when the visual tokens start with CLS ("full" strategy)

    @property
    def decoder(self) -> LayerView[DecoderLayerTrace]:
        return LayerView(self.decoder_layers, self.num_decoder_layers, "decoder")

    @property
    def vision(self) -> LayerView[VisionLayerTrace]:
        return LayerView(self.vision_layers, self.num_vision_layers, "vision")

    def decoder_attentions(self) -> torch.Tensor:
        """The traced decoder layers' attentions stacked: (layers, N, H, Lq, Lk)."""
        return torch.stack([record.require("attn") for record in self.decoder])

    def decoder_hidden(self) -> torch.Tensor:
        """The traced decoder layers' output hidden states stacked: (layers, N, L, D)."""
        return torch.stack([record.require("hidden") for record in self.decoder])

    def require_visual_embeds(self) -> torch.Tensor:
        if self.visual_embeds is None:
            raise RuntimeError("the trace recorded no visual tokens: did a forward pass with an image run inside it?")
        return self.visual_embeds

    def take_visual(self, embeds: torch.Tensor, from_projector: bool) -> torch.Tensor:
        """Record visual tokens entering the decoder; return the tensor to use in their place.

        Projector output under ``visual_leaf`` becomes a detached leaf that requires grad; tokens a
        caller passes in are kept when they already require grad (their graph is the caller's)."""
        if torch.is_grad_enabled() and embeds.is_floating_point():
            if (from_projector and self.visual_leaf) or not embeds.requires_grad:
                embeds = embeds.detach().requires_grad_(True)
        self.visual_embeds = embeds
        return embeds


_TRACED_ATTR = "_mmelkit_vlm_traced"


def attention_configs(model: nn.Module) -> list[Any]:
    """Every config object of ``model`` and its sub-models (deduplicated) that names an attention
    implementation."""
    found: dict[int, Any] = {}
    pending = [getattr(model, "config", None)]
    pending += [getattr(module, "config", None) for module in model.modules()]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found or not hasattr(config, "_attn_implementation_internal"):
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            pending.append(getattr(config, key, None))
    return list(found.values())


@contextmanager
def attention_implementation(model: nn.Module, implementation: str) -> Iterator[None]:
    """Run ``model`` (every sub-model) with ``implementation`` inside the block; restore each
    config's previous setting afterwards, also after an exception."""
    configs = attention_configs(model)
    saved = [(config, config._attn_implementation_internal) for config in configs]
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(implementation)
        for config in configs:  # sub-configs set_attn_implementation did not reach
            config._attn_implementation_internal = implementation
        yield
    finally:
        for config, previous in saved:
            config._attn_implementation_internal = previous


class VlmTracer:
    """Installs the recording hooks of one :class:`VlmTrace`; :meth:`close` removes all of them."""

    def __init__(self, trace: VlmTrace) -> None:
        self.trace = trace
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._marked: nn.Module | None = None

    def install(
        self,
        model: nn.Module,
        parts: VlmParts,
        *,
        decoder_indices: list[int],
        decoder_attentions: bool,
        decoder_hidden: bool,
        vision_indices: list[int],
    ) -> None:
        if getattr(model, _TRACED_ATTR, False):
            raise RuntimeError("this model is already being traced by another open trace; close it first")
        setattr(model, _TRACED_ATTR, True)
        self._marked = model
        trace = self.trace
        for index in decoder_indices:
            record = DecoderLayerTrace("decoder", index)
            trace.decoder_layers[index] = record
            layer = parts.decoder_layers[index]
            self._handles.append(layer.register_forward_pre_hook(_input_hook(record, decoder_hidden, False),
                                                                 with_kwargs=True))
            if decoder_hidden:
                self._handles.append(layer.register_forward_hook(_output_hook(record)))
            if decoder_attentions:
                self._handles.append(_attention_module(layer).register_forward_hook(_attention_hook(record)))
        for position, index in enumerate(vision_indices):
            record = VisionLayerTrace("vision", index)
            trace.vision_layers[index] = record
            layer = parts.vision_layers[index]
            # The first traced vision layer's input becomes a leaf, so that the vision records are
            # differentiable on a frozen model.
            self._handles.append(layer.register_forward_pre_hook(_input_hook(record, True, position == 0),
                                                                 with_kwargs=True))
            self._handles.append(layer.register_forward_hook(_output_hook(record)))
            self._handles.append(_attention_module(layer).register_forward_hook(_attention_hook(record)))
        self._handles.append(parts.projector.register_forward_hook(_projector_hook(trace)))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._marked is not None:
            self._marked.__dict__.pop(_TRACED_ATTR, None)
            self._marked = None


def _attention_module(layer: nn.Module) -> nn.Module:
    attention = getattr(layer, "self_attn", None)
    if attention is None:
        raise TypeError(f"{type(layer).__name__} has no self_attn module to record attention from")
    return attention


def _input_hook(record: LayerTrace, keep: bool, make_leaf: bool) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        record.calls += 1
        if args:
            x, where = args[0], None
        elif "hidden_states" in kwargs:
            x, where = kwargs["hidden_states"], "hidden_states"
        else:
            raise RuntimeError(f"mmelkit could not find the hidden states among the inputs of {type(module).__name__}")
        if make_leaf and torch.is_grad_enabled() and not x.requires_grad and x.is_floating_point():
            x = x.detach().requires_grad_(True)
        if keep:
            record.hidden_in = x
        if not make_leaf:
            return None
        if where is None:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, where: x}

    return hook


def _output_hook(record: LayerTrace) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        record.hidden = output[0] if isinstance(output, tuple) else output

    return hook


def _attention_hook(record: LayerTrace) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(
                f"{record.part} layer {record.index} returned no attention probabilities: the attention "
                "implementation was changed inside the trace (it must stay 'eager')"
            )
        record.attn = weights

    return hook


def _projector_hook(trace: VlmTrace) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return trace.take_visual(output, from_projector=True)

    return hook


def resolve_layers(selection: BlockSelection | bool, depth: int, name: str) -> list[int]:
    """``True``/``"all"`` -> every layer, ``False``/``None`` -> none, else indices (negatives allowed)."""
    if selection is True:
        selection = "all"
    elif selection is False:
        selection = None
    return resolve_blocks(selection, depth, name)
