"""The visual attention share of an answer (SPEC §6, inference level), a hallucination signal.

Per decoder layer: the attention mass (mean over heads) that the answer's query column puts on
the V visual tokens. Answers the model makes up from its language prior or from co-occurrence
habits tend to look at the image less; :func:`mmelkit.metrics.hallucination.detector_auroc`
measures, per layer, how well a low share tells hallucinated answers from correct ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mmelkit.methods.answers import answer_target
from mmelkit.methods.token.answer_attention import answer_attention_per_layer

if TYPE_CHECKING:
    from mmelkit.models.vlm.adapter import TextsLike, VlmAdapter


def visual_attention_share(
    vlm: VlmAdapter, images: Any, questions: TextsLike, answer: TextsLike | None = None, token: int | None = 0
) -> torch.Tensor:
    """(N, layers) in [0, 1]: per layer, the share of the answer's attention on visual tokens.

    ``answer=None`` scores the model's own answer; ``token`` which answer token's query column
    (default 0: the first, where a yes/no answer is decided; None averages the whole answer)."""
    target = answer_target(vlm, images, questions, answer, token)
    return answer_attention_per_layer(vlm, target).sum(dim=-1)
