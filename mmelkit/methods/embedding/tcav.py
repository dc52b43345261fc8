"""TCAV for CLIP image towers: does a human concept push a class score up?

Kim et al., "Interpretability Beyond Feature Attribution: Quantitative Testing with Concept
Activation Vectors (TCAV)", ICML 2018.

* Concept activation vector (CAV): the normal of a linear classifier that separates the
  activations of concept images from those of random images at one layer (:func:`concept_direction`).
* Conceptual sensitivity of an input: the directional derivative of the class score along the
  CAV, i.e. the dot product of the score's gradient w.r.t. the layer activation with the CAV.
* TCAV score: the share of class images whose sensitivity is positive (:func:`tcav_score`).
* Significance: CAVs from several random splits give several TCAV scores; CAVs that separate one
  random set from another give a null distribution; a two-sided t-test compares the two.

For a CLIP image tower (:func:`tcav`) the layer activation is the CLS token after image block
``layer``, and the class score is the cosine similarity of the image embedding with the embedding
of a class text ("a red circle"), so no classifier head is needed. On the scene world concept
and class images come with exact concepts, e.g. the concept "red" for the class "a red circle".
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmelkit._checks import positive_int
from mmelkit.methods.base import register_tool
from mmelkit.models.adapter import ClipAdapter

__all__ = [
    "TcavResult",
    "class_score_gradients",
    "concept_direction",
    "tcav",
    "tcav_from_gradients",
    "tcav_score",
]

DEFAULT_RIDGE = 1e-2


# --------------------------------------------------------------------------------------------------
# Tensor level
# --------------------------------------------------------------------------------------------------


def concept_direction(
    concept_acts: torch.Tensor,
    random_acts: torch.Tensor,
    *,
    ridge: float = DEFAULT_RIDGE,
    concept: str = "concept",
) -> torch.Tensor:
    """Unit concept activation vector (D,) from (P, D) concept and (Q, D) random activations.

    The classifier is closed-form ridge regression of the targets +1 (concept) / -1 (random) on the
    activations with an intercept (fitted by centring), solved on the activations' device in
    float64: w = (X^T X + lam I)^-1 X^T y, in its dual form X^T (X X^T + lam I)^-1 y when there are
    fewer images than dimensions. ``ridge`` is relative: lam = ``ridge`` * trace(X^T X) / D, so
    the result does not depend on the activations' scale. A least-squares classifier rather than
    the paper's SGD/logistic one, so the CAV is deterministic and needs no iterations; with balanced
    classes it is Fisher's discriminant direction shrunk towards the mean difference.

    The CAV is w / |w|; it points from the random towards the concept activations (the projection of
    the mean difference on it is positive). Errors: no concept images ("concept 'x' has no
    positive images"), no random images, mismatched widths.
    """
    if concept_acts.ndim != 2 or random_acts.ndim != 2:
        raise ValueError(f"activations must be (P, D) and (Q, D); got {tuple(concept_acts.shape)} and "
                         f"{tuple(random_acts.shape)}")
    if concept_acts.shape[0] == 0:
        raise ValueError(f"concept {concept!r} has no positive images")
    if random_acts.shape[0] == 0:
        raise ValueError(f"concept {concept!r}: no random (negative) images to contrast it with")
    if concept_acts.shape[1] != random_acts.shape[1]:
        raise ValueError(f"concept and random activations differ in width: {concept_acts.shape[1]} and "
                         f"{random_acts.shape[1]}")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0; got {ridge}")
    device = concept_acts.device
    features = torch.cat([concept_acts.detach().to(device), random_acts.detach().to(device)]).double()
    if not torch.isfinite(features).all():
        raise ValueError(f"concept {concept!r}: activations hold non-finite values")
    targets = torch.cat([features.new_ones(concept_acts.shape[0]), -features.new_ones(random_acts.shape[0])])
    features = features - features.mean(dim=0, keepdim=True)
    targets = targets - targets.mean()
    count, width = features.shape
    strength = ridge * max(float(features.square().sum()) / width, 1e-300)
    if count < width:
        gram = features @ features.T + strength * torch.eye(count, dtype=features.dtype, device=device)
        weights = features.T @ torch.linalg.solve(gram, targets)
    else:
        scatter = features.T @ features + strength * torch.eye(width, dtype=features.dtype, device=device)
        weights = torch.linalg.solve(scatter, features.T @ targets)
    norm = weights.norm()
    if not norm > 0:
        raise ValueError(f"concept {concept!r}: concept and random activations are identical; no direction "
                         "separates them")
    return (weights / norm).to(concept_acts.dtype if concept_acts.is_floating_point() else torch.float32)


def tcav_score(gradients: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Share of inputs whose directional derivative along ``direction`` is positive.

    ``gradients`` (N, D): the class score's gradient w.r.t. the layer activation per input;
    ``direction`` (D,) or (R, D) for R directions at once. Returns a 0-d tensor or (R,), float64.
    A derivative of exactly zero does not count as positive.
    """
    if gradients.ndim != 2 or gradients.shape[0] == 0:
        raise ValueError(f"gradients must be (N, D) with N >= 1; got {tuple(gradients.shape)}")
    if direction.shape[-1] != gradients.shape[1] or direction.ndim not in (1, 2):
        raise ValueError(f"direction must be (D,) or (R, D) with D = {gradients.shape[1]}; got {tuple(direction.shape)}")
    direction = direction.to(gradients.device).double()
    derivative = gradients.double() @ (direction.T if direction.ndim == 2 else direction)  # (N, R) or (N,)
    return (derivative > 0).double().mean(dim=0)


@dataclass(eq=False)
class TcavResult:
    """TCAV of one concept for one class at one layer.

    ``scores`` (runs,) the TCAV score of each concept CAV (one per random split), ``random_scores``
    (runs,) those of random-vs-random CAVs (the null); ``mean`` / ``random_mean`` their means;
    ``p_value`` of the two-sided Student (pooled-variance) t-test between them; ``significant``
    whether ``p_value < alpha / num_tests`` (Bonferroni over ``num_tests`` concept-class tests; 1 =
    uncorrected). ``cavs`` (runs, D) and ``random_cavs`` (runs, D) the directions; ``derivatives``
    (N_class, runs) the concept CAVs' directional derivatives per class image.
    """

    concept: str
    class_text: str | None
    layer: int | None
    scores: torch.Tensor
    random_scores: torch.Tensor
    mean: float
    random_mean: float
    p_value: float
    significant: bool
    alpha: float = 0.05
    num_tests: int = 1
    cavs: torch.Tensor | None = None
    random_cavs: torch.Tensor | None = None
    derivatives: torch.Tensor | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> Any:
        """A pandas DataFrame, one row per run and kind (``"concept"`` or ``"random"``), with the
        concept, class text, layer, TCAV score, the test's p-value and the verdict."""
        import pandas as pd

        rows = []
        for kind, values in (("concept", self.scores), ("random", self.random_scores)):
            for run, score in enumerate(values.tolist()):
                rows.append({"concept": self.concept, "class_text": self.class_text, "layer": self.layer,
                             "kind": kind, "run": run, "score": score, "p_value": self.p_value,
                             "significant": self.significant})
        return pd.DataFrame(rows)


def _t_test(scores: np.ndarray, null: np.ndarray) -> float:
    """Two-sided pooled-variance t-test p-value; defined also where both samples are constant."""
    import scipy.stats

    if len(scores) < 2 or len(null) < 2:
        raise ValueError("the t-test needs at least 2 runs of each kind; use runs >= 2")
    if np.ptp(scores) == 0 and np.ptp(null) == 0:
        # No spread on either side: the t statistic is 0/0 or x/0. Equal constants cannot be told
        # apart (p = 1); different constants differ beyond any doubt (p = 0).
        return 1.0 if scores[0] == null[0] else 0.0
    with warnings.catch_warnings():
        # One constant side (every class image positive along every concept CAV is common) makes
        # scipy warn about precision loss in that side's variance; the test is still well defined.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(scipy.stats.ttest_ind(scores, null, equal_var=True).pvalue)


def _random_splits(count: int, runs: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``runs`` random halvings of ``count`` random images (CPU generator: independent of device)."""
    generator = torch.Generator().manual_seed(seed)
    half = count // 2
    splits = []
    for _ in range(runs):
        order = torch.randperm(count, generator=generator)
        splits.append((order[:half], order[half : 2 * half]))
    return splits


def tcav_from_gradients(
    gradients: torch.Tensor,
    concept_acts: torch.Tensor,
    random_acts: torch.Tensor,
    *,
    concept: str = "concept",
    runs: int = 10,
    seed: int = 0,
    ridge: float = DEFAULT_RIDGE,
    alpha: float = 0.05,
    num_tests: int = 1,
    class_text: str | None = None,
    layer: int | None = None,
) -> TcavResult:
    """TCAV from precomputed class-score gradients (N, D) and concept / random activations (P, D), (Q, D).

    Run r halves the random images at random into A_r and B_r: the concept CAV_r separates the
    concept images from A_r, the random CAV_r separates B_r from A_r (a "concept" of random images,
    the null). Each CAV's TCAV score is :func:`tcav_score` of the gradients along it; the concept's
    scores are compared with the null's by a two-sided t-test. Needs at least 2 random images and
    ``runs`` >= 2.
    """
    runs = positive_int("runs", runs)
    num_tests = positive_int("num_tests", num_tests)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1); got {alpha}")
    if concept_acts.ndim == 2 and concept_acts.shape[0] == 0:
        raise ValueError(f"concept {concept!r} has no positive images")
    if random_acts.ndim != 2 or random_acts.shape[0] < 2:
        raise ValueError(f"TCAV needs at least 2 random images (two random sets per run); got "
                         f"{0 if random_acts.ndim != 2 else random_acts.shape[0]}")
    if runs < 2:
        raise ValueError("the t-test needs at least 2 runs; use runs >= 2")
    device = gradients.device
    cavs, random_cavs = [], []
    for negatives, pseudo_concept in _random_splits(random_acts.shape[0], runs, seed):
        negatives, pseudo_concept = negatives.to(random_acts.device), pseudo_concept.to(random_acts.device)
        cavs.append(concept_direction(concept_acts, random_acts[negatives], ridge=ridge, concept=concept))
        random_cavs.append(concept_direction(random_acts[pseudo_concept], random_acts[negatives], ridge=ridge,
                                             concept=f"random split of {concept!r}"))
    cav_matrix = torch.stack(cavs).to(device)
    random_matrix = torch.stack(random_cavs).to(device)
    scores = tcav_score(gradients, cav_matrix)
    random_scores = tcav_score(gradients, random_matrix)
    p_value = _t_test(scores.cpu().numpy(), random_scores.cpu().numpy())
    derivatives = gradients.double() @ cav_matrix.double().T
    return TcavResult(
        concept=concept, class_text=class_text, layer=layer, scores=scores, random_scores=random_scores,
        mean=float(scores.mean()), random_mean=float(random_scores.mean()), p_value=p_value,
        significant=bool(p_value < alpha / num_tests), alpha=alpha, num_tests=num_tests, cavs=cav_matrix,
        random_cavs=random_matrix, derivatives=derivatives,
        params={"runs": runs, "seed": seed, "ridge": ridge},
    )


# --------------------------------------------------------------------------------------------------
# Model level
# --------------------------------------------------------------------------------------------------


def _count(images: torch.Tensor | Sequence[Any]) -> int:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"a tensor of images must be model input (N, 3, H, W); got shape {tuple(images.shape)}")
        return images.shape[0]
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a model-input tensor (N, 3, H, W) or a sequence of images; got "
                        f"{type(images).__name__}")
    return len(images)


def class_score_gradients(
    model: ClipAdapter,
    images: torch.Tensor | Sequence[Any],
    class_text: str,
    layer: int,
    *,
    batch_size: int = 64,
) -> torch.Tensor:
    """Gradient of cos(image embedding, ``class_text`` embedding) w.r.t. the CLS token after image
    block ``layer``, per image: (N, D) on the model's device.

    The text embedding is computed without a graph; the trace makes the traced block's input a leaf
    for a frozen model, so nothing before block ``layer`` is differentiated. Images are processed in
    chunks of ``batch_size``; each image's gradient depends on that image only.
    """
    from mmelkit.models.tracing import resolve_blocks

    batch_size = positive_int("batch_size", batch_size)
    if not isinstance(class_text, str) or not class_text:
        raise ValueError(f"class_text must be a non-empty string; got {class_text!r}")
    (block,) = resolve_blocks(layer, model.num_image_blocks, "image")
    count = _count(images)
    if count == 0:
        raise ValueError("no class images given")
    with torch.no_grad():
        text = model.encode_text(class_text)  # (1, E), unit length
    parts = []
    for start in range(0, count, batch_size):
        pixels = model.as_pixels(images[start : start + batch_size])
        with torch.enable_grad(), model.trace(image_blocks=[block], attention_probs=False) as trace:
            score = (model.encode_image(pixels) * text).sum()  # sum of per-image cosines
            cls_tokens = trace.image[block].tokens_out
            (gradient,) = torch.autograd.grad(score, cls_tokens)
        parts.append(gradient[:, 0].detach())
    return torch.cat(parts)


@register_tool("tcav", level="model", granularity="embedding", family="concept direction",
               reference="Kim et al., ICML 2018 (TCAV); SPEC §7")
def tcav(
    model: ClipAdapter,
    class_images: torch.Tensor | Sequence[Any],
    class_text: str,
    concept_images: torch.Tensor | Sequence[Any],
    random_images: torch.Tensor | Sequence[Any],
    layer: int,
    *,
    concept: str | None = None,
    runs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    ridge: float = DEFAULT_RIDGE,
    alpha: float = 0.05,
    num_tests: int = 1,
    progress: bool = False,
) -> TcavResult:
    """TCAV of a concept (given by example images) for a CLIP class text at image block ``layer``.

    Activations: the CLS token after block ``layer`` for the concept and the random images.
    Class score: cosine similarity of a class image's embedding with ``class_text``'s embedding;
    its gradient w.r.t. the same CLS token (:func:`class_score_gradients`). Then
    :func:`tcav_from_gradients`: ``runs`` concept CAVs against random halves of ``random_images``,
    ``runs`` random-vs-random CAVs, TCAV scores and a two-sided t-test; ``significant`` is
    p < ``alpha`` / ``num_tests`` (pass the number of concept-class pairs tested for Bonferroni).
    ``concept`` names the concept in errors and results (default ``"concept"``).
    Errors: a ``layer`` outside the tower (IndexError), no concept images (ValueError naming the
    concept), fewer than 2 random images.
    """
    from mmelkit.models.activations import collect_activations
    from mmelkit.models.tracing import resolve_blocks

    name = concept if concept is not None else "concept"
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int block index; got {layer!r}")
    (block,) = resolve_blocks(layer, model.num_image_blocks, "image")  # IndexError outside the tower
    batch_size = positive_int("batch_size", batch_size)
    if _count(concept_images) == 0:
        raise ValueError(f"concept {name!r} has no positive images")
    if _count(random_images) < 2:
        raise ValueError(f"TCAV needs at least 2 random images; got {_count(random_images)}")
    if _count(class_images) == 0:
        raise ValueError(f"class {class_text!r} has no images")

    def cls_activations(images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        acts = collect_activations(model, images, sites=("cls",), layers=block, batch_size=batch_size,
                                   progress=progress)
        return acts["cls", block].to(model.device)

    concept_acts = cls_activations(concept_images)
    random_acts = cls_activations(random_images)
    gradients = class_score_gradients(model, class_images, class_text, block, batch_size=batch_size)
    result = tcav_from_gradients(gradients, concept_acts, random_acts, concept=name, runs=runs, seed=seed,
                                 ridge=ridge, alpha=alpha, num_tests=num_tests, class_text=class_text, layer=block)
    result.params["batch_size"] = batch_size
    return result

