"""Classification by description (Menon & Vondrick, ICLR 2023): texts as the classifier's rationale.

Zero-shot CLIP scores a class by one prompt ("a photo of a hen"). Classification by description
scores it by what the class looks like instead: each class c has descriptors D(c) ("has a red
comb", "has feathers", ...), each descriptor becomes a text ``template.format(cls=c, desc=d)``
("hen, which has a red comb"), and

    s(x, c) = 1/|D(c)| sum_{d in D(c)} cos(f_I(x), f_T(text(c, d)))

The prediction is argmax_c s(x, c). Because the score is a mean of per-descriptor terms, it
explains itself: the descriptors with the largest cosines are the reasons the model gives for a
class, and comparing them across classes says why one class won. The descriptor lists come from
the user (the paper asks a language model for them); nothing is generated here.

Every distinct text is encoded once, in batches, and all images are scored against all texts with
one matrix product per image batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmelkit._checks import positive_int
from mmelkit.methods.base import register_tool
from mmelkit.models.adapter import ClipAdapter

__all__ = ["DescriptionScores", "classify_by_description"]

DEFAULT_TEMPLATE = "{cls}, which {desc}"


@dataclass(eq=False)
class DescriptionScores:
    """Per-image class scores built from descriptors.

    ``scores`` (N, C): the mean descriptor cosine of each class; ``descriptor_scores``: one (N, D_c)
    tensor per class, the cosine of each descriptor's text; ``predicted`` (N,) the argmax class
    index. Tensors are on the model's device.
    """

    classes: list[str]
    descriptors: list[list[str]]
    texts: list[list[str]]
    scores: torch.Tensor
    descriptor_scores: list[torch.Tensor]

    @property
    def predicted(self) -> torch.Tensor:
        return self.scores.argmax(dim=-1)

    def accuracy(self, labels: torch.Tensor | Sequence[int]) -> float:
        """Share of images whose predicted class index equals ``labels`` (N,)."""
        labels_t = torch.as_tensor(labels, device=self.scores.device).flatten()
        if labels_t.numel() != self.scores.shape[0]:
            raise ValueError(f"labels must give one class per image ({self.scores.shape[0]}); got {labels_t.numel()}")
        return float((self.predicted == labels_t).float().mean())

    def rationale(self, image: int, top: int = 3, cls: int | None = None) -> list[tuple[str, float]]:
        """The ``top`` descriptors of class ``cls`` (default: the predicted one) with the largest
        cosines on image ``image``: the reasons the model gives for that class, best first."""
        if not 0 <= image < self.scores.shape[0]:
            raise IndexError(f"image {image} out of range for {self.scores.shape[0]} images")
        chosen = int(self.predicted[image]) if cls is None else int(cls)
        if not 0 <= chosen < len(self.classes):
            raise IndexError(f"class {chosen} out of range for {len(self.classes)} classes")
        values = self.descriptor_scores[chosen][image]
        order = values.argsort(descending=True)[: positive_int("top", top)]
        return [(self.descriptors[chosen][i], float(values[i])) for i in order.tolist()]

    def to_frame(self, image: int) -> Any:
        """A pandas DataFrame for one image: one row per (class, descriptor) with its cosine and
        the class's score, the predicted class first, then by cosine."""
        import pandas as pd

        predicted = int(self.predicted[image])
        rows = [
            {"class": self.classes[c], "descriptor": d, "cosine": float(self.descriptor_scores[c][image, j]),
             "class_score": float(self.scores[image, c]), "predicted": c == predicted}
            for c in range(len(self.classes))
            for j, d in enumerate(self.descriptors[c])
        ]
        frame = pd.DataFrame(rows, columns=["class", "descriptor", "cosine", "class_score", "predicted"])
        return frame.sort_values(["predicted", "class_score", "cosine"], ascending=False, ignore_index=True)


def _checked_descriptions(descriptions: Mapping[str, Sequence[str]], template: str) -> tuple[list[str], list[list[str]]]:
    if not isinstance(descriptions, Mapping) or not descriptions:
        raise ValueError("descriptions must be a non-empty mapping {class name: [descriptor, ...]}")
    classes, descriptors = [], []
    for cls, items in descriptions.items():
        if isinstance(items, str) or not isinstance(items, Sequence) or not list(items):
            raise ValueError(f"descriptions[{cls!r}] must be a non-empty list of descriptor strings")
        if not all(isinstance(d, str) and d.strip() for d in items):
            raise ValueError(f"descriptions[{cls!r}] holds an empty or non-string descriptor")
        classes.append(str(cls))
        descriptors.append(list(items))
    if "{desc}" not in template:
        raise ValueError(f"template must contain {{desc}} (and usually {{cls}}); got {template!r}")
    try:
        template.format(cls="x", desc="y")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"template {template!r} takes only {{cls}} and {{desc}}: {error}") from None
    return classes, descriptors


@register_tool("classify_by_description", level="inference", granularity="rationale", family="texts as rationales",
               reference="Menon & Vondrick, Visual Classification via Description from Large Language Models, "
                         "ICLR 2023; SPEC §5")
def classify_by_description(
    model: ClipAdapter,
    images: Any,
    descriptions: Mapping[str, Sequence[str]],
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 64,
) -> DescriptionScores:
    """Score every image against every class by the mean cosine of its descriptor texts.

    ``descriptions``: {class name: [descriptor, ...]}; each text is ``template.format(cls=class,
    desc=descriptor)`` (default ``"{cls}, which {desc}"``, so descriptors read "has a red comb").
    ``images``: anything :meth:`ClipAdapter.preprocess` takes. See the module doc for the score.
    """
    batch_size = positive_int("batch_size", batch_size)
    classes, descriptors = _checked_descriptions(descriptions, template)
    texts = [[template.format(cls=c, desc=d) for d in items] for c, items in zip(classes, descriptors, strict=True)]
    distinct = list(dict.fromkeys(t for row in texts for t in row))
    pixels = model.preprocess(images)
    with torch.no_grad():
        text_features = torch.cat([model.encode_text(distinct[i : i + batch_size])
                                   for i in range(0, len(distinct), batch_size)])  # (T, E), unit rows
        image_features = torch.cat([model.encode_image(pixels[i : i + batch_size])
                                    for i in range(0, len(pixels), batch_size)])  # (N, E), unit rows
        cosines = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    where = {text: i for i, text in enumerate(distinct)}
    per_class = [cosines[:, [where[t] for t in row]] for row in texts]  # one (N, D_c) per class
    scores = torch.stack([values.mean(dim=1) for values in per_class], dim=1)  # (N, C)
    return DescriptionScores(classes, descriptors, texts, scores, per_class)
