"""Explanation methods, organised by the survey's taxonomy (data, model, training, inference).

* ``mmelkit.methods.data``: data-level interpretability (counterfactual captions, nearest
  training pairs).
* ``mmelkit.methods.perturbation``: data-level input perturbation maps (occlusion, RISE).
* ``mmelkit.methods.token``: model-level, token-granularity maps (Grad-ECLIP, MMEL, raw
  attention, attention rollout, generic attention, Grad-CAM, Integrated Gradients, SmoothGrad).
* ``mmelkit.methods.architecture``: model-level, architecture-granularity value-path maps
  (MaskCLIP, CLIP Surgery).
* ``mmelkit.methods.text``: the text side of a pair, scores over its tokens and words
  (Grad-ECLIP text side, Integrated Gradients over token embeddings, leave-one-word-out); they
  return a :class:`~mmelkit.methods.base.TextExplanation`.

``explain(model, images, texts, method=...)`` runs any registered method; ``list_methods()``
tabulates them with their place in the taxonomy; :mod:`mmelkit.methods.sanity` runs the
model-randomisation sanity check on any of them.
"""

from __future__ import annotations

from typing import Any

from mmelkit.methods import architecture, perturbation, text, token  # noqa: F401  (importing registers the methods)
from mmelkit.methods.base import REGISTRY, Explanation, Method, TextExplanation, get_method
from mmelkit.models.adapter import ClipAdapter, TextLike


def explain(
    model: ClipAdapter, images: Any, texts: TextLike, method: str = "grad_eclip", **params: Any
) -> Explanation | TextExplanation:
    """Explain image-text pairs with a registered method (see :func:`list_methods`).

    ``images``/``texts``: N and N (pairs), 1 and N, or N and 1. ``params`` are the method's own.
    Image-side methods return an :class:`Explanation` (maps), text-side ones a
    :class:`TextExplanation` (token and word scores).
    """
    return get_method(method)(model, **params).explain(images, texts)


def list_methods() -> Any:
    """A pandas DataFrame: one row per method with its taxonomy place, reference and parameters."""
    import pandas as pd

    rows = [
        {
            "method": cls.name,
            "level": cls.level,
            "granularity": cls.granularity,
            "family": cls.family,
            "modality": cls.modality,
            "reference": cls.reference,
            "parameters": dict(cls.defaults),
        }
        for cls in sorted(REGISTRY.values(), key=lambda c: c.name)
    ]
    return pd.DataFrame(rows).set_index("method")


__all__ = ["Explanation", "Method", "explain", "get_method", "list_methods"]
