"""Counterfactual captions: change one word (a colour, a shape, a relation) and watch the score.

A model that really reads a caption should lose score when the caption stops describing the
image. Which edits it is sensitive to says what it attends to: scene-world CLIPs react strongly to
colour and shape swaps and barely to swapped relations (a known CLIP weakness).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mmelkit.datasets.scenes import Caption, Scene, SceneConfig, swapped_relation
from mmelkit.models.adapter import ClipAdapter

Edit = Literal["colour", "shape", "relation"]


@dataclass(frozen=True)
class Counterfactual:
    original: str
    edited: str
    edit: Edit
    detail: str  # what changed, e.g. "red -> blue"


def counterfactual_captions(scene: Scene, caption: Caption, config: SceneConfig) -> list[Counterfactual]:
    """Every single-word edit of ``caption`` that makes it false for ``scene``.

    Colour and shape edits replace the attribute of the first named object with each value that
    no object in the scene has in that combination; relation captions also get their swap.
    """
    if not caption.objects:
        raise ValueError("the caption names no object")
    target = scene.objects[caption.objects[0]]
    present = {(o.colour, o.shape) for o in scene.objects}
    edits: list[Counterfactual] = []
    for colour in config.colours:
        if colour != target.colour and (colour, target.shape) not in present:
            edited = caption.text.replace(f"{target.colour} {target.shape}", f"{colour} {target.shape}", 1)
            edits.append(Counterfactual(caption.text, edited, "colour", f"{target.colour} -> {colour}"))
    for shape in config.shapes:
        if shape != target.shape and (target.colour, shape) not in present:
            edited = caption.text.replace(f"{target.colour} {target.shape}", f"{target.colour} {shape}", 1)
            edits.append(Counterfactual(caption.text, edited, "shape", f"{target.shape} -> {shape}"))
    if caption.kind == "relation":
        edits.append(Counterfactual(caption.text, swapped_relation(caption, scene), "relation", "objects swapped"))
    return edits


@torch.no_grad()
def score_counterfactuals(model: ClipAdapter, scene: Scene, counterfactuals: list[Counterfactual]) -> torch.Tensor:
    """Score change (edited minus original cosine) for each counterfactual, on the model's device."""
    if not counterfactuals:
        raise ValueError("no counterfactuals to score")
    texts = [counterfactuals[0].original] + [c.edited for c in counterfactuals]
    scores = model.score(scene.image, texts)[0]
    return scores[1:] - scores[0]
