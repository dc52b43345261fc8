"""Explanation methods, organised by the survey's taxonomy (data, model, training, inference).

* ``mmelkit.methods.data``: data-level interpretability (counterfactual captions, nearest
  training pairs, TracIn training-data attribution).
* ``mmelkit.methods.perturbation``: data-level input perturbation maps (occlusion, RISE).
* ``mmelkit.methods.token``: model-level, token-granularity maps (Grad-ECLIP, MMEL, raw
  attention, attention rollout, generic attention, Grad-CAM, Integrated Gradients, SmoothGrad;
  for generative VLMs the ``answer_*`` maps: attention, relevancy, gradient x input, IG).
* ``mmelkit.methods.architecture``: model-level, architecture-granularity value-path maps
  (MaskCLIP, CLIP Surgery).
* ``mmelkit.methods.inference``: inference-level tools for generative VLMs (Visual Contrastive
  Decoding, the visual attention share as a hallucination signal).
* ``mmelkit.methods.text``: the text side of a pair, scores over its tokens and words
  (Grad-ECLIP text side, Integrated Gradients over token embeddings, leave-one-word-out); they
  return a :class:`~mmelkit.methods.base.TextExplanation`.

``explain(model, images, texts, method=...)`` runs any registered method; ``list_methods()``
tabulates them with their place in the taxonomy; :mod:`mmelkit.methods.sanity` runs the
model-randomisation sanity check on any of them.
"""

from __future__ import annotations

from typing import Any

from mmelkit._checks import did_you_mean
from mmelkit.methods import architecture, data, embedding, inference, layer, neuron, perturbation, text  # noqa: F401  (importing registers the methods)
from mmelkit.methods import token as _token_methods  # noqa: F401
from mmelkit.methods.base import REGISTRY, TOOLS, Explanation, Method, TextExplanation, get_method
from mmelkit.models.adapter import ClipAdapter, TextLike
from mmelkit.models.vlm.adapter import VlmAdapter


def explain(
    model: ClipAdapter | VlmAdapter,
    images: Any,
    texts: TextLike,
    method: str | None = None,
    *,
    answer: str | list[str] | None = None,
    token: int | None = None,
    **params: Any,
) -> Explanation | TextExplanation:
    """Explain image-text pairs with a registered method (see :func:`list_methods`).

    ``images``/``texts``: N and N (pairs), 1 and N, or N and 1; any other pairing, an empty batch,
    images holding NaN or infinite values and tensors on the ``meta`` device are ValueErrors naming
    ``images`` or ``texts`` (inputs on another device are moved to the model's). ``params`` are the
    method's own; a misspelt name or method gets a "did you mean" suggestion.
    Image-side methods return an :class:`Explanation` (maps), text-side ones a
    :class:`TextExplanation` (token and word scores).

    For a generative VLM (a :class:`~mmelkit.models.vlm.VlmAdapter`), ``texts`` are questions and
    the map explains the model's own greedy answer (``answer=None``) or the given one; ``token``
    picks one token of the answer (default: the whole answer). ``method`` defaults to
    ``"grad_eclip"`` for CLIP models and ``"answer_relevancy"`` for VLMs.
    """
    is_vlm = isinstance(model, VlmAdapter)
    name = method or ("answer_relevancy" if is_vlm else "grad_eclip")
    cls = get_method(name)
    wanted = "vlm" if is_vlm else "clip"
    if cls.explains != wanted:
        fitting = sorted(n for n, c in REGISTRY.items() if c.explains == wanted)
        kind = "generative VLMs" if cls.explains == "vlm" else "CLIP-style models"
        raise ValueError(f"method {name!r} explains {kind}, not a {type(model).__name__}; methods for this model: "
                         f"{', '.join(fitting)}")
    if is_vlm:
        return cls(model, **params).explain(images, texts, answer=answer, token=token)  # type: ignore[call-arg]
    if answer is not None or token is not None:
        raise ValueError("answer= and token= apply to generative VLMs; a CLIP model explains its image-text pairs")
    return cls(model, **params).explain(images, texts)


def list_methods(kind: str = "all") -> Any:
    """A pandas DataFrame: one row per method or tool with its taxonomy place, reference and parameters.

    ``kind``: ``"map"`` the explanation methods that :func:`explain` runs (maps or token scores),
    ``"tool"`` the analysis tools called as functions (layer probes, logit lenses, residual
    decomposition, neuron labels, TCAV, sparse autoencoders, causal tracing), ``"all"`` both; the
    ``kind`` and ``call`` columns say which and how to run it."""
    import pandas as pd

    if kind not in ("all", "map", "tool"):
        raise ValueError(f"kind must be 'all', 'map' or 'tool'; got {kind!r}."
                         + did_you_mean(kind, ("all", "map", "tool")))
    rows = [
        {
            "method": cls.name,
            "kind": "map",
            "level": cls.level,
            "granularity": cls.granularity,
            "family": cls.family,
            "modality": cls.modality,
            "explains": cls.explains,
            "reference": cls.reference,
            "parameters": dict(cls.defaults),
            "call": f"mmelkit.explain(model, images, texts, method={cls.name!r})",
        }
        for cls in REGISTRY.values()
    ]
    rows += [
        {
            "method": tool.name,
            "kind": "tool",
            "level": tool.level,
            "granularity": tool.granularity,
            "family": tool.family,
            "modality": "image",
            "explains": tool.explains,
            "reference": tool.reference,
            "parameters": tool.defaults,
            "call": f"{tool.function.__module__}.{tool.function.__name__}",
        }
        for tool in TOOLS.values()
    ]
    rows = [row for row in rows if kind in ("all", row["kind"])]
    return pd.DataFrame(rows).sort_values("method").set_index("method")


__all__ = ["Explanation", "Method", "explain", "get_method", "list_methods"]
