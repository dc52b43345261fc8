"""Mean-ablation of whole branches of a CLIP image tower (SPEC §5, Model / layer).

How much does zero-shot classification rely on block l's attention branch, its MLP branch, or
both? A pre-norm ViT block adds two branch outputs to the residual stream,

    x_mid = x + attention_l(x),        x_out = x_mid + mlp_l(x_mid)

(open_clip: ``ls_1(ln_attn(attn(ln_1(x))))`` and ``ls_2(mlp(ln_2(x_mid)))``; Hugging Face:
``self_attn(layer_norm1(x))`` and ``mlp(layer_norm2(x_mid))``). Mean-ablation replaces a branch
output, at every token position t, by its mean over a set of images,

    attention_l(x)[t]  ->  mean_{x'} attention_l(x')[t],

so what the branch says about *this* image is gone while the stream keeps its usual offset; the
rest of the forward pass runs as usual. Zero-shot accuracy (class = argmax cosine of the image
embedding with the unit class text embeddings) is measured with each (layer, part) ablated on its
own, and optionally with a set ablated together; ``drop = baseline - ablated``.

This is the *total* effect of a branch: later blocks read what it wrote, and the final norm
re-normalises. :mod:`mmelkit.methods.embedding.head_ablation` measures the *direct* effect of
single heads (their term in the linearised final norm only). The two agree on the last block's
attention when its MLP writes nothing and the final norm's denominator does not depend on the
image (tests/test_layer_ablation.py builds that case).

The replacement is a forward hook on the module that computes each branch's final output
(open_clip's ``ls_1`` / ``ls_2``, which wrap ``attn`` (+ ``ln_attn``) and ``mlp``; Hugging Face's
``self_attn`` / ``mlp``), installed by :func:`mean_ablated` and removed when it exits, also after
an exception. The means come from a first pass (:func:`branch_means`) over the same images or
over ``reference_images``.

Reference: mean-ablation as in Wang et al., "Interpretability in the Wild" (ICLR 2023) and
Gandelsman, Efros & Steinhardt (ICLR 2024), applied to whole branches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmelkit._checks import choice, class_labels, positive_int, refuse_active_dropout
from mmelkit.methods.base import register_tool
from mmelkit.models.adapter import ClipAdapter
from mmelkit.models.tracing import BlockSelection, resolve_blocks

__all__ = ["BranchMeans", "LayerAblation", "branch_means", "layer_ablation", "mean_ablated"]

BRANCHES = ("attention", "mlp")
PARTS = (*BRANCHES, "both")  # "both": the attention and the MLP branch of the block at once
BranchIndex = tuple[int, str]


@dataclass(eq=False)
class BranchMeans:
    """Per-position means of every block's branch outputs over ``num_images`` images.

    ``attention`` and ``mlp``: (B, L, D) float32 on the model's device, batch-first whatever layout
    the model runs in; row l is block l's branch output averaged over the images at each of the
    L token positions (CLS first)."""

    attention: torch.Tensor
    mlp: torch.Tensor
    num_images: int

    def of(self, branch: str) -> torch.Tensor:
        return self.attention if branch == "attention" else self.mlp


@dataclass(eq=False)
class LayerAblation:
    """Zero-shot accuracy with single branches mean-ablated.

    ``accuracy`` (len(layers), len(parts)) on the CPU: accuracy with ``parts[j]`` of block
    ``layers[i]`` replaced by its per-position mean; ``drop = baseline_accuracy - accuracy``.
    ``ablated`` / ``set_accuracy``: the branches ablated together when a set was asked for, as
    (block, "attention" | "mlp") pairs (negative layers resolved, "both" split in two), and the
    accuracy with all of them mean-ablated at once. ``num_reference`` images gave the means."""

    baseline_accuracy: float
    accuracy: torch.Tensor
    drop: torch.Tensor
    layers: list[int]
    parts: list[str]
    num_images: int
    num_reference: int
    ablated: list[BranchIndex] | None = None
    set_accuracy: float | None = None

    @property
    def set_drop(self) -> float | None:
        return None if self.set_accuracy is None else self.baseline_accuracy - self.set_accuracy

    def to_frame(self) -> Any:
        """A pandas DataFrame, one row per (layer, part): accuracy and drop, largest drop first."""
        import pandas as pd

        rows = [
            {"layer": layer, "part": part, "accuracy": float(self.accuracy[i, j]), "drop": float(self.drop[i, j])}
            for i, layer in enumerate(self.layers)
            for j, part in enumerate(self.parts)
        ]
        frame = pd.DataFrame(rows, columns=["layer", "part", "accuracy", "drop"])
        return frame.sort_values(["drop", "layer"], ascending=[False, True], kind="stable", ignore_index=True)


# -- where the branches are ---------------------------------------------------------------------------------
def _branch_modules(model: ClipAdapter) -> list[dict[str, nn.Module]]:
    """Per image block, the module whose output is exactly what each branch adds to the stream."""
    modules = []
    for index, block in enumerate(model.backend.image_tower().blocks):
        names = [("ls_1", "ls_2"), ("self_attn", "mlp")]  # open_clip (both block types), Hugging Face
        found = next((pair for pair in names if all(isinstance(getattr(block, n, None), nn.Module) for n in pair)),
                     None)
        if found is None:
            raise NotImplementedError(f"image block {index} ({type(block).__name__}) has neither ls_1/ls_2 "
                                      "(open_clip) nor self_attn/mlp (Hugging Face): cannot find its branch outputs")
        modules.append({"attention": getattr(block, found[0]), "mlp": getattr(block, found[1])})
    return modules


def _batch_first(model: ClipAdapter) -> bool:
    return model.backend.image_tower().batch_first


def _branch_tokens(output: Any) -> torch.Tensor:
    # Hugging Face attention returns (output, weights); the other branch modules a tensor.
    return output[0] if isinstance(output, tuple) else output


# -- the means --------------------------------------------------------------------------------------------
@contextmanager
def _recording(model: ClipAdapter) -> Iterator[dict[str, Any]]:
    """While open, every forward adds each branch's output, summed over the images, to ``sums``
    (float64, so that the mean of identical images is that image's output exactly)."""
    modules = _branch_modules(model)
    batch_first = _batch_first(model)
    sums: dict[str, Any] = {"attention": [None] * len(modules), "mlp": [None] * len(modules), "count": 0}
    handles = []

    def recorder(branch: str, layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tokens = _branch_tokens(output).detach().double()
            total = tokens.sum(dim=0 if batch_first else 1)  # (L, D)
            if branch == "attention" and layer == 0:
                sums["count"] += tokens.shape[0 if batch_first else 1]
            previous = sums[branch][layer]
            if previous is not None and previous.shape != total.shape:
                raise ValueError(f"images give {total.shape[0]} tokens and earlier ones {previous.shape[0]}: the "
                                 "mean per token position needs one image size")
            sums[branch][layer] = total if previous is None else previous + total

        return hook

    try:
        for layer, pair in enumerate(modules):
            for branch in BRANCHES:
                handles.append(pair[branch].register_forward_hook(recorder(branch, layer)))
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def _means_from(sums: dict[str, Any]) -> BranchMeans:
    count = sums["count"]
    stacked = {branch: (torch.stack(sums[branch]) / count).float() for branch in BRANCHES}
    return BranchMeans(stacked["attention"], stacked["mlp"], count)


def _embed(model: ClipAdapter, pixels: torch.Tensor, batch_size: int, bar: Any) -> torch.Tensor:
    """Unit image embeddings (N, E) in float32, ``batch_size`` images per forward."""
    out = []
    for start in range(0, len(pixels), batch_size):
        out.append(model.encode_image(pixels[start : start + batch_size]).float())
        bar.update(1)
    return torch.cat(out)


def branch_means(model: ClipAdapter, images: Any, *, batch_size: int = 64, progress: bool = False) -> BranchMeans:
    """Mean of every block's attention and MLP branch outputs over ``images``, per token position.

    ``images``: anything :meth:`ClipAdapter.as_pixels` takes (all of one size)."""
    batch_size = positive_int("batch_size", batch_size)
    refuse_active_dropout(model.model, "the mean pass and every ablated pass would see different random models")
    pixels = model.as_pixels(images)
    with torch.no_grad(), tqdm(total=math.ceil(len(pixels) / batch_size), disable=not progress,
                               desc="branch means", unit="batch") as bar, _recording(model) as sums:
        _embed(model, pixels, batch_size, bar)
    return _means_from(sums)


# -- the ablation -----------------------------------------------------------------------------------------
def _resolve_pairs(ablate: Iterable[BranchIndex], depth: int, name: str) -> list[BranchIndex]:
    """(layer, part) pairs -> (block, branch) pairs, negative layers resolved, "both" split, no repeats."""
    if isinstance(ablate, tuple) and len(ablate) == 2 and isinstance(ablate[1], str):
        ablate = [ablate]  # one pair given bare
    resolved: list[BranchIndex] = []
    for item in ablate:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], int)
                and not isinstance(item[0], bool)):
            raise TypeError(f"{name} must hold (layer, part) pairs with an int layer; got {item!r}")
        layer, part = item
        choice("part", part, PARTS)
        if not -depth <= layer < depth:
            raise IndexError(f"image tower has {depth} blocks; layer {layer} is out of range")
        for branch in (BRANCHES if part == "both" else (part,)):
            if (layer % depth, branch) not in resolved:
                resolved.append((layer % depth, branch))
    if not resolved:
        raise ValueError(f"{name} is empty: name at least one (layer, part)")
    return resolved


@contextmanager
def mean_ablated(model: ClipAdapter, means: BranchMeans, ablate: Iterable[BranchIndex]) -> Iterator[None]:
    """While open, the branches in ``ablate`` output their mean from ``means`` in every forward.

    ``ablate``: (layer, part) pairs, part one of ``"attention"``, ``"mlp"``, ``"both"``; negative
    layers count from the last block. Images must give as many tokens as the ones the means came
    from. The hooks are removed when the ``with`` block exits, also after an exception."""
    modules = _branch_modules(model)
    pairs = _resolve_pairs(ablate, len(modules), "ablate")
    if not isinstance(means, BranchMeans):
        raise TypeError(f"means must be BranchMeans from branch_means(); got {type(means).__name__}")
    expected = (len(modules), means.attention.shape[-1])
    for branch in BRANCHES:
        table = means.of(branch)
        if table.dim() != 3 or (table.shape[0], table.shape[2]) != expected:
            raise ValueError(f"means.{branch} must be (blocks, L, D) with blocks, D = {expected}; got "
                             f"{tuple(table.shape)}: were the means computed on another model?")
    batch_first = _batch_first(model)

    def replacer(mean: torch.Tensor, layer: int, branch: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            tokens = _branch_tokens(output)
            length = tokens.shape[1 if batch_first else 0]
            if length != mean.shape[0]:
                raise ValueError(f"block {layer}'s {branch} branch sees {length} tokens; the means were computed "
                                 f"on images with {mean.shape[0]}: use images of one size")
            value = mean.to(tokens.device, tokens.dtype)
            replaced = (value[None] if batch_first else value[:, None]).expand_as(tokens)
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

        return hook

    handles = []
    try:
        for layer, branch in pairs:
            hook = replacer(means.of(branch)[layer], layer, branch)
            handles.append(modules[layer][branch].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@register_tool("layer_ablation", level="model", granularity="layer", family="causal intervention",
               reference="mean-ablation (Wang et al., ICLR 2023; Gandelsman et al., ICLR 2024) of whole branches; "
                         "SPEC §5")
def layer_ablation(
    model: ClipAdapter,
    images: Any,
    class_texts: Sequence[str],
    labels: torch.Tensor | Sequence[int],
    *,
    layers: BlockSelection = "all",
    parts: str | Sequence[str] = ("attention", "mlp"),
    ablate: Sequence[BranchIndex] | None = None,
    reference_images: Any | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> LayerAblation:
    """Zero-shot accuracy with each (layer, part) of the image tower mean-ablated; see the module doc.

    ``class_texts``: one text per class; ``labels`` (N,): each image's class index.
    ``layers``: the blocks to ablate one at a time (``"all"``, an int or ints, negatives allowed).
    ``parts``: which branches, each ``"attention"``, ``"mlp"`` or ``"both"`` (the block's two
    branches at once). ``ablate``: (layer, part) pairs to ablate all together, reported as
    ``set_accuracy``. ``reference_images``: the images whose per-position means replace the
    branches (default: ``images`` themselves; same size as ``images``). One forward pass per
    (layer, part) over all images, ``batch_size`` images at a time."""
    batch_size = positive_int("batch_size", batch_size)
    depth = model.num_image_blocks
    layer_list = resolve_blocks(layers, depth, "image")
    if not layer_list:
        raise ValueError("layers is empty: name at least one block")
    part_list = [parts] if isinstance(parts, str) else list(parts)
    if not part_list:
        raise ValueError(f"parts is empty: name at least one of {', '.join(PARTS)}")
    part_list = list(dict.fromkeys(choice("part", part, PARTS) for part in part_list))
    chosen = _resolve_pairs(ablate, depth, "ablate") if ablate is not None else None
    if isinstance(class_texts, str) or not list(class_texts):
        raise ValueError("class_texts must be a non-empty list of strings, one per class")
    texts = list(class_texts)
    refuse_active_dropout(model.model, "the mean pass and every ablated pass would see different random models")
    pixels = model.as_pixels(images)
    labels_t = class_labels(labels, len(pixels), len(texts), pixels.device)
    reference = None if reference_images is None else model.as_pixels(reference_images)
    if reference is not None and model.grid(reference) != model.grid(pixels):
        raise ValueError(f"reference_images give a {model.grid(reference)} patch grid and images "
                         f"{model.grid(pixels)}: the mean per token position needs one size")

    with torch.no_grad():
        unit_classes = torch.cat([model.encode_text(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])
        unit_classes = F.normalize(unit_classes.float(), dim=-1)

        def accuracy(embeddings: torch.Tensor) -> float:
            return float(((embeddings @ unit_classes.T).argmax(dim=-1) == labels_t).float().mean())

        per_pass = math.ceil(len(pixels) / batch_size)
        passes = 1 + len(layer_list) * len(part_list) + (chosen is not None)
        extra = 0 if reference is None else math.ceil(len(reference) / batch_size)
        with tqdm(total=passes * per_pass + extra, disable=not progress, desc="layer ablation", unit="batch") as bar:
            # The baseline pass records the means too, unless they come from other images.
            with _recording(model) as sums:
                baseline = _embed(model, pixels if reference is None else reference, batch_size, bar)
            means = _means_from(sums)
            if reference is not None:
                baseline = _embed(model, pixels, batch_size, bar)
            baseline_accuracy = accuracy(baseline)

            table = torch.zeros(len(layer_list), len(part_list))
            for i, layer in enumerate(layer_list):
                for j, part in enumerate(part_list):
                    with mean_ablated(model, means, [(layer, part)]):
                        table[i, j] = accuracy(_embed(model, pixels, batch_size, bar))
            set_accuracy = None
            if chosen is not None:
                with mean_ablated(model, means, chosen):
                    set_accuracy = accuracy(_embed(model, pixels, batch_size, bar))

    return LayerAblation(baseline_accuracy, table, baseline_accuracy - table, layer_list, part_list, len(pixels),
                         means.num_images, chosen, set_accuracy)
