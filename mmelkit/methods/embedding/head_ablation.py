"""Per-head mean-ablation of a CLIP image tower (Gandelsman, Efros & Steinhardt, ICLR 2024).

How much does zero-shot classification rely on attention head h of block l? Replace that head's
direct contribution to every image embedding by its mean over the data set (so what the head
says about *this* image is gone, but the embedding keeps its usual offset) and measure the
accuracy again. The residual decomposition (:mod:`.residual_decomposition`) makes this a sum:

    f_ablated(x) = f(x) - head_{l,h}(x) + mean_x' head_{l,h}(x')

Only direct effects are removed: what the head writes into the stream and later blocks read is
still there (the paper's point is that direct effects of late heads carry most of the signal).

Zero-shot prediction is the class whose unit text embedding has the largest cosine with the
(re-normalised) image embedding. Dividing an image embedding by its norm scales all of its
cosines by the same positive number, so the argmax is that of the plain dot products; the
computation below uses that and needs no loop over images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmelkit._checks import class_labels, positive_int
from mmelkit.methods.base import register_tool
from mmelkit.methods.embedding.residual_decomposition import ResidualDecomposition, decompose_image
from mmelkit.models.adapter import ClipAdapter

__all__ = ["HeadAblation", "head_ablation", "mean_ablate_heads"]

HeadIndex = tuple[int, int]


@dataclass(eq=False)
class HeadAblation:
    """Zero-shot accuracy with single heads mean-ablated.

    ``baseline_accuracy``: accuracy of the decomposition's total (the model's embedding).
    ``accuracy`` (B, H) on the CPU: accuracy with head h of block l replaced by its data-set mean;
    ``drop = baseline_accuracy - accuracy``. ``ablated`` / ``set_accuracy``: the heads ablated
    together when a set was asked for, and the accuracy with all of them mean-ablated at once.
    """

    baseline_accuracy: float
    accuracy: torch.Tensor
    drop: torch.Tensor
    num_images: int
    ablated: list[HeadIndex] | None = None
    set_accuracy: float | None = None

    @property
    def set_drop(self) -> float | None:
        return None if self.set_accuracy is None else self.baseline_accuracy - self.set_accuracy

    def to_frame(self) -> Any:
        """A pandas DataFrame, one row per (layer, head): accuracy and drop, largest drop first."""
        import pandas as pd

        layers, heads = self.accuracy.shape
        rows = [
            {"layer": layer, "head": head, "accuracy": float(self.accuracy[layer, head]),
             "drop": float(self.drop[layer, head])}
            for layer in range(layers)
            for head in range(heads)
        ]
        frame = pd.DataFrame(rows, columns=["layer", "head", "accuracy", "drop"])
        return frame.sort_values(["drop", "layer", "head"], ascending=[False, True, True], ignore_index=True)


def _check_inputs(
    decomposition: ResidualDecomposition, class_text_features: torch.Tensor, labels: torch.Tensor | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    device = decomposition.heads.device
    if not isinstance(class_text_features, torch.Tensor) or class_text_features.dim() != 2:
        shape = tuple(class_text_features.shape) if isinstance(class_text_features, torch.Tensor) else None
        raise ValueError(f"class_text_features must be a (classes, E) tensor; got shape {shape}")
    width = decomposition.heads.shape[-1]
    if class_text_features.shape[1] != width:
        raise ValueError(f"class_text_features have width {class_text_features.shape[1]}; the image embeddings "
                         f"have {width}")
    if class_text_features.shape[0] < 1:
        raise ValueError("no class text features given")
    labels_t = class_labels(labels, len(decomposition), class_text_features.shape[0], device)
    unit_classes = F.normalize(class_text_features.detach().to(device, torch.float32), dim=-1)
    return unit_classes, labels_t


def _resolve_heads(ablate: Sequence[HeadIndex], layers: int, heads: int) -> list[HeadIndex]:
    resolved = []
    for item in ablate:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(i, int) for i in item)):
            raise TypeError(f"ablate must hold (layer, head) pairs of ints; got {item!r}")
        layer, head = item
        if not -layers <= layer < layers:
            raise IndexError(f"image tower has {layers} blocks; layer {layer} is out of range")
        if not -heads <= head < heads:
            raise IndexError(f"blocks have {heads} heads; head {head} is out of range")
        pair = (layer % layers, head % heads)
        if pair not in resolved:
            resolved.append(pair)
    if not resolved:
        raise ValueError("ablate is empty: name at least one (layer, head)")
    return resolved


def mean_ablate_heads(
    decomposition: ResidualDecomposition,
    class_text_features: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    *,
    ablate: Sequence[HeadIndex] | None = None,
) -> HeadAblation:
    """Zero-shot accuracy with each (layer, head) mean-ablated on its own, and optionally a set.

    ``class_text_features`` (C, E): one text embedding per class (normalised here);
    ``labels`` (N,): the class of each decomposed image. ``ablate``: (layer, head) pairs
    (negative indices allowed) to mean-ablate all together, reported as ``set_accuracy``.
    """
    unit_classes, labels_t = _check_inputs(decomposition, class_text_features, labels)
    with torch.no_grad():
        heads = decomposition.heads  # (N, B, H, E)
        num_images, num_layers, num_heads, _ = heads.shape
        # Ablating (l, h) moves the embedding by mean(head) - head, so each class logit by that
        # difference dotted with the class's text embedding: linear, hence cheap for all heads.
        mean_heads = heads.mean(dim=0)  # (B, H, E)
        logits = decomposition.total() @ unit_classes.T  # (N, C)
        baseline = (logits.argmax(dim=-1) == labels_t).float().mean()
        correct = torch.zeros(num_layers, num_heads, device=heads.device)
        # Images in chunks so that (chunk, H, C) logits stay small for big data sets and class lists.
        chunk = max(1, 2**22 // (num_heads * unit_classes.shape[0]))
        for layer in range(num_layers):
            for start in range(0, num_images, chunk):
                rows = slice(start, start + chunk)
                shift = (mean_heads[layer] - heads[rows, layer]) @ unit_classes.T  # (n, H, C)
                predicted = (logits[rows, None, :] + shift).argmax(dim=-1)  # (n, H)
                correct[layer] += (predicted == labels_t[rows, None]).float().sum(dim=0)
        accuracy = correct / num_images

        chosen, set_accuracy = None, None
        if ablate is not None:
            chosen = _resolve_heads(ablate, num_layers, num_heads)
            together = logits + sum((mean_heads[layer, head] - heads[:, layer, head]) @ unit_classes.T
                                    for layer, head in chosen)
            set_accuracy = float((together.argmax(dim=-1) == labels_t).float().mean())

    baseline_accuracy = float(baseline)
    accuracy = accuracy.cpu()
    return HeadAblation(baseline_accuracy, accuracy, baseline_accuracy - accuracy, len(decomposition), chosen,
                        set_accuracy)


@register_tool("head_ablation", level="model", granularity="embedding", family="decomposition",
               reference="Gandelsman, Efros & Steinhardt, ICLR 2024 (mean-ablation of heads); SPEC §7")
def head_ablation(
    model: ClipAdapter,
    images: Any,
    class_texts: Sequence[str],
    labels: torch.Tensor | Sequence[int],
    *,
    ablate: Sequence[HeadIndex] | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> HeadAblation:
    """Decompose ``images``, embed ``class_texts`` (one per class) and run :func:`mean_ablate_heads`."""
    batch_size = positive_int("batch_size", batch_size)
    if isinstance(class_texts, str) or not list(class_texts):
        raise ValueError("class_texts must be a non-empty list of strings, one per class")
    decomposition = decompose_image(model, images, batch_size=batch_size, progress=progress)
    with torch.no_grad():
        class_features = torch.cat([model.encode_text(list(class_texts[i : i + batch_size]))
                                    for i in range(0, len(class_texts), batch_size)])
    return mean_ablate_heads(decomposition, class_features, labels, ablate=ablate)
