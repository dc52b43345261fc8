"""Integrated Gradients (Sundararajan et al., ICML 2017) over the token embeddings of the text.

With ``e`` the input embeddings of the tokens (before position embeddings), ``e'`` a baseline and
S = cos(f_I, f_T(e)):

    attribution = (e - e') * mean_{k=1..m} dS/de at e' + (k/m) (e - e')

(right Riemann sum, m = ``steps``, default 32). The baseline replaces only the explained tokens (the
ones strictly between start- and end-of-text); start, end and padding keep their embeddings, so
their attribution is exactly 0 and the token attributions add up to about S(e) - S(e')
(completeness). ``baseline``:

* ``"zero"`` (default): the zero vector, the usual choice;
* ``"pad"``: the embedding of the tokenizer's padding token (``"!"`` for open_clip's BPE, end-of-text
  for Hugging Face CLIP's tokenizer).

Token score (signed, not normalised): the sum over embedding dimensions of the attribution
(default), or of its absolute value with ``absolute=True``. A word's score is the sum of its BPE
pieces'. All interpolation points of all pairs go through the text tower in chunks of
``batch_size`` sequences, one forward and one backward per chunk.
"""

from __future__ import annotations

from typing import Any

import torch

from mmelkit._checks import did_you_mean, positive_int
from mmelkit.methods.base import (
    Method,
    TextExplanation,
    pair_inputs,
    paired_cosine,
    register,
    text_layout,
)
from mmelkit.methods.text._common import image_features
from mmelkit.models.adapter import ClipAdapter, TextLike
from mmelkit.models.backend import TextTokens


def baseline_embeddings(model: ClipAdapter, tokens: TextTokens, content: torch.Tensor, kind: str) -> torch.Tensor:
    """The tokens' embeddings (N, L, D) with the explained positions (``content``) replaced by the
    baseline ``kind`` ("zero" or "pad")."""
    with torch.no_grad():
        embeddings = model.token_embeddings(tokens)
        if kind == "zero":
            replacement = torch.zeros_like(embeddings)
        elif kind == "pad":
            pad = torch.full_like(tokens.ids, model.pad_token_id)
            replacement = model.token_embeddings(TextTokens(pad, tokens.attention_mask, tokens.eos_index))
        else:
            raise ValueError(f"baseline must be 'zero' or 'pad'; got {kind!r}." + did_you_mean(kind, ("zero", "pad")))
        return torch.where(content[:, :, None], replacement, embeddings)


@register
class IntegratedGradientsText(Method):
    name = "integrated_gradients_text"
    family = "gradient"
    modality = "text"
    reference = "Sundararajan et al., Axiomatic Attribution for Deep Networks, ICML 2017"
    defaults: dict[str, Any] = {"steps": 32, "baseline": "zero", "absolute": False, "batch_size": 64}

    def explain(self, images: Any, texts: TextLike) -> TextExplanation:
        model = self.model
        steps = positive_int("steps", self.params["steps"])
        batch_size = positive_int("batch_size", self.params["batch_size"])
        pixels, tokens = pair_inputs(model, images, texts)
        layout = text_layout(model, tokens)
        baseline = baseline_embeddings(model, tokens, layout.content, self.params["baseline"])
        with torch.no_grad():
            embeddings = model.token_embeddings(tokens)
        image = image_features(model, pixels)
        difference = embeddings - baseline
        device = embeddings.device
        alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps
        gradient_sum = torch.zeros(embeddings.shape, device=device, dtype=torch.float32)
        total = len(tokens) * steps
        for start in range(0, total, batch_size):
            rows = torch.arange(start, min(start + batch_size, total), device=device)
            pair, alpha = rows // steps, alphas[rows % steps]
            points = baseline[pair] + alpha[:, None, None].to(baseline.dtype) * difference[pair]
            points = points.detach().requires_grad_(True)
            with torch.enable_grad():
                score = paired_cosine(image[pair], model.encode_text_from_embeddings(points, tokens.select(pair)))
                (gradient,) = torch.autograd.grad(score.sum(), points)
            gradient_sum.index_add_(0, pair, gradient.float())
        attribution = difference.float() * gradient_sum / steps
        scores = attribution.abs().sum(dim=-1) if self.params["absolute"] else attribution.sum(dim=-1)
        return TextExplanation.from_scores(layout, scores, self.name, dict(self.params), tokens.texts)
