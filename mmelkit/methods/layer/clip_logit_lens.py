"""The logit lens for CLIP's image tower (SPEC §7): zero-shot accuracy read out after every block.

The CLS token after block l is sent through the tower's final norm and projection, as if the
tower stopped there, and compared (cosine) with the class texts' embeddings. After the last block
this is exactly the model's zero-shot prediction; earlier, it shows from which block on the
residual stream already points where the text tower expects. A probe (:mod:`.probes`) asks whether
a concept is linearly readable at all; the lens asks whether it is readable *in the final
embedding's own coordinates*, which is a stronger claim.

Reference: nostalgebraist, "interpreting GPT: the logit lens" (2020), carried to CLIP's image tower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmelkit._checks import class_labels
from mmelkit.methods.base import register_tool
from mmelkit.models.activations import Activations, collect_activations
from mmelkit.models.adapter import ClipAdapter
from mmelkit.models.tracing import BlockSelection


@dataclass(eq=False)
class ClipLogitLens:
    """``predictions`` (layers, N) class index per layer; ``accuracy`` (layers,) against ``labels``;
    ``layers`` the block indices; ``classes`` the class texts."""

    predictions: torch.Tensor
    accuracy: torch.Tensor
    layers: list[int]
    classes: list[str]

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "accuracy": self.accuracy.tolist()})


def lens_predictions(model: ClipAdapter, cls_tokens: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """Class index per row of CLS tokens (N, D) read through the final norm and projection."""
    with torch.no_grad():
        embedded = model.project_image_tokens(cls_tokens.to(model.device, model.dtype)[:, None])[:, 0]
        return (F.normalize(embedded.float(), dim=-1) @ class_features.float().T).argmax(dim=-1)


@register_tool("clip_logit_lens", level="model", granularity="layer", family="logit lens",
               reference="nostalgebraist 2020 (logit lens), for CLIP's image tower; SPEC §7")
def clip_logit_lens(
    model: ClipAdapter,
    images: Any,
    class_texts: Sequence[str],
    labels: torch.Tensor | Sequence[int],
    *,
    layers: BlockSelection = "all",
    batch_size: int = 128,
    activations: Activations | None = None,
    cache: str | None = None,
    progress: bool = True,
) -> ClipLogitLens:
    """Zero-shot accuracy per block: CLS after block l -> final norm -> projection -> nearest class text.

    ``labels`` index ``class_texts``. Pass ``activations`` holding ``"cls"`` at the wanted layers to
    skip the pass (e.g. the ones a probe already collected)."""
    texts = list(class_texts)
    if not texts:
        raise ValueError("no class texts given")
    if activations is None:
        activations = collect_activations(model, images, sites=["cls"], layers=layers, batch_size=batch_size,
                                          cache=cache, progress=progress)
    labels_t = class_labels(labels, len(activations), len(texts))
    with torch.no_grad():
        class_features = model.encode_text(texts)
    predictions = torch.stack([lens_predictions(model, activations["cls", layer], class_features)
                               for layer in activations.layers])
    accuracy = predictions.eq(labels_t.to(predictions.device)[None]).float().mean(dim=1)
    return ClipLogitLens(predictions, accuracy, list(activations.layers), texts)
