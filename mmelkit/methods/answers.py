"""What every answer -> image method of a generative VLM shares (SPEC §6): which answer is
explained, the target score, and the map result.

A method explains N (image, question) rows. The answer of each row is the model's own greedy
answer (``answer=None``) or a given one (teacher forcing). Its *target* is log p of the answer's
tokens given the prefix, summed over the span, or one chosen token of it (``token=k``, negative
counts from the end). The answer's tokens never include the closing eos.

The decoder predicts answer token ``a_t`` at the column before it; that column is the *query
position* whose attention and hidden state the attention-based methods read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmelkit._checks import did_you_mean, positive_int
from mmelkit.methods.base import Explanation, Method, normalise_maps

if TYPE_CHECKING:
    from mmelkit.models.vlm.adapter import TextsLike, VlmAdapter
    from mmelkit.models.vlm.records import VlmBatch


@dataclass(eq=False)
class AnswerTarget:
    """Teacher-forced rows and the answer tokens whose log-probability is the target.

    ``batch`` holds prompt + answer (no eos) per row; ``weights`` (N, T) float is 1 on the target
    tokens of each row's answer span (all of them, or the chosen one) and 0 elsewhere, aligned with
    ``batch.answer_positions``; ``answers`` the answer texts; ``questions`` the questions asked.
    """

    batch: VlmBatch
    weights: torch.Tensor
    answers: list[str]
    questions: list[str]

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def query_positions(self) -> torch.Tensor:
        """(N, T) the columns whose next-token prediction is each answer token (0 where the answer
        is padding; those entries have weight 0)."""
        positions, mask = self.batch.require_answers()
        return torch.where(mask, positions - 1, torch.zeros_like(positions))

    def select(self, rows: torch.Tensor) -> AnswerTarget:
        """Rows ``rows`` (repeats allowed), for the copies a perturbation or path method runs."""
        listed = rows.tolist()
        return AnswerTarget(self.batch.select(rows), self.weights[rows.to(self.weights.device)],
                            [self.answers[i] for i in listed], [self.questions[i] for i in listed])


def answer_target(
    vlm: VlmAdapter,
    images: Any,
    questions: TextsLike,
    answer: TextsLike | None = None,
    token: int | None = None,
    max_new_tokens: int = 16,
) -> AnswerTarget:
    """The rows to explain and their target tokens.

    ``answer=None``: the model's own greedy answer per row (``max_new_tokens`` at most); otherwise
    one answer per row, or one for all rows. ``token=None`` targets the whole answer span; an int
    picks one token of each answer (0 the first, -1 the last). Images and questions pair as in
    :meth:`VlmAdapter.encode` (N and N, 1 and N, N and 1).
    """
    if token is not None and (isinstance(token, bool) or not isinstance(token, int)):
        raise ValueError(f"token must be None (the whole answer) or an int index into it; got {token!r}")
    listed = [questions] if isinstance(questions, str) else list(questions)
    if answer is None:
        generated = vlm.generate(images, questions, max_new_tokens=positive_int("max_new_tokens", max_new_tokens))
        answers = generated.texts
        empty = [row for row, text in enumerate(answers) if not text]
        if empty:
            raise ValueError(
                f"the model answered nothing (an immediate eos) for rows {empty}: there is no answer to explain; "
                "pass answer=... to explain a given answer"
            )
    else:
        answers = [answer] if isinstance(answer, str) else list(answer)
    batch = vlm.encode(images, questions, answers, eos=False)
    positions, mask = batch.require_answers()
    answers = answers * len(batch) if len(answers) == 1 else answers
    _check_vocabulary(vlm, batch, answers)
    weights = mask.float()
    if token is not None:
        lengths = mask.sum(dim=1)
        index = torch.full_like(lengths, token) + (lengths if token < 0 else 0)
        outside = (index < 0) | (index >= lengths)
        if bool(outside.any()):
            rows = outside.nonzero().flatten().tolist()
            raise ValueError(
                f"token={token} lies outside the answer span of rows {rows} (answers of "
                f"{[int(lengths[r]) for r in rows]} tokens)"
            )
        weights = torch.zeros_like(weights).scatter_(1, index[:, None], 1.0)
    questions_out = listed * len(batch) if len(listed) == 1 else listed
    return AnswerTarget(batch, weights, answers, questions_out)


def _check_vocabulary(vlm: VlmAdapter, batch: VlmBatch, answers: list[str]) -> None:
    """An answer the tokenizer cannot spell (``<unk>``) has no probability worth explaining."""
    unk = getattr(vlm.tokenizer, "unk_token_id", None)
    if unk is None:
        return
    positions, mask = batch.require_answers()
    tokens = batch.input_ids.gather(1, positions)
    bad = ((tokens == unk) & mask).any(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"answers {[answers[r] for r in rows]} (rows {rows}) hold words outside the tokenizer's vocabulary "
            f"(they encode to {vlm.tokenizer.unk_token!r}); explain an answer the model can say"
        )


def target_score(vlm: VlmAdapter, target: AnswerTarget, visual_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) float32: the weighted sum of the answer tokens' log-probabilities, differentiable
    (with gradients enabled) in ``visual_embeds`` (N, V, D) when given."""
    positions, _ = target.batch.require_answers()
    keep = target.batch.input_ids.shape[1] - int(positions.min()) + 1  # logits of the answer columns only
    logits = vlm.forward(target.batch, visual_embeds, logits_to_keep=keep).logits
    logprobs = vlm.answer_logprob_from_logits(logits, target.batch).token_logprobs
    return (logprobs * target.weights).sum(dim=1)


def visual_maps_explanation(
    vlm: VlmAdapter, values: torch.Tensor, method: str, params: dict[str, Any], target: AnswerTarget
) -> Explanation:
    """Per-visual-token values (N, V) -> an :class:`Explanation` on the patch grid, min-max
    normalised; ``texts`` are the explained answers, ``params`` record the questions too.

    With the ``"full"`` feature strategy the visual tokens start with the vision tower's CLS token,
    which has no place on the grid: its value is dropped (values of the patches alone are taken too)."""
    rows, cols = vlm.grid
    prefix = vlm.num_prefix_visual_tokens
    if prefix and values.shape == (len(target), prefix + rows * cols):
        values = values[:, prefix:]
    if values.shape != (len(target), rows * cols):
        raise ValueError(f"expected (N, V) = ({len(target)}, {rows * cols}) values; got {tuple(values.shape)}")
    maps = normalise_maps(values.detach().float().reshape(-1, rows, cols))
    recorded = {**params, "questions": list(target.questions)}
    return Explanation(maps, vlm.image_size, method, recorded, list(target.answers))


class VlmMethod(Method):
    """A method that explains a generative VLM's answer (``explains == "vlm"``).

    ``explain(images, questions, answer=None, token=None)`` returns an :class:`Explanation` over the
    V visual tokens' patch grid."""

    explains: ClassVar[str] = "vlm"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: VlmAdapter, **params: Any) -> None:  # type: ignore[override]
        from mmelkit.models.vlm.adapter import VlmAdapter

        if not isinstance(model, VlmAdapter):
            raise TypeError(
                f"{self.name} explains generative VLMs (a VlmAdapter from mmelkit.load_vlm); got {type(model).__name__}"
            )
        super().__init__(model, **params)  # type: ignore[arg-type]
        self.vlm: VlmAdapter = model

    def explain(  # type: ignore[override]
        self, images: Any, questions: TextsLike, answer: TextsLike | None = None, token: int | None = None
    ) -> Explanation:
        target = answer_target(self.vlm, images, questions, answer, token)
        return visual_maps_explanation(self.vlm, self.visual_values(target), self.name, dict(self.params), target)

    def visual_values(self, target: AnswerTarget) -> torch.Tensor:
        """(N, V) the method's raw value per visual token (before normalisation)."""
        raise NotImplementedError


SIGNS = ("absolute", "positive")


def signed(values: torch.Tensor, sign: str) -> torch.Tensor:
    """Signed attributions made a non-negative map: ``"absolute"`` keeps evidence against the answer
    too, ``"positive"`` keeps only evidence for it."""
    if sign == "absolute":
        return values.abs()
    if sign == "positive":
        return values.clamp(min=0)
    raise ValueError(f"sign must be one of {SIGNS}; got {sign!r}." + did_you_mean(sign, SIGNS))


def clean_visual_tokens(vlm: VlmAdapter, target: AnswerTarget) -> torch.Tensor:
    """(N, V, D) the projected visual tokens of the target's images, without a graph."""
    with torch.no_grad():
        return vlm.visual_features(target.batch.pixel_values)


def chunked_rows(count: int, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """Indices 0..count-1 in chunks of ``batch_size`` (the copies of a batched method)."""
    return [torch.arange(start, min(start + batch_size, count), device=device) for start in range(0, count, batch_size)]


def visual_tokens_of_masks(vlm: VlmAdapter, masks: Any, min_share: float = 0.3) -> torch.Tensor:
    """(N, V) bool: the visual tokens whose patch is at least ``min_share`` covered by each row's
    mask (an object's visual tokens; a leading CLS token of the ``"full"`` strategy is never one). ``masks`` (N, H, W) bool, numpy or torch, any size: resized
    to the model input first."""
    import torch.nn.functional as F

    tensor = torch.as_tensor(masks)
    if tensor.ndim != 3 or tensor.dtype != torch.bool:
        raise ValueError(f"masks must be (N, H, W) bool; got {tuple(tensor.shape)} {tensor.dtype}")
    if not 0.0 < min_share <= 1.0:
        raise ValueError(f"min_share must lie in (0, 1]; got {min_share}")
    covered = F.interpolate(tensor[:, None].float(), size=vlm.image_size, mode="bilinear", align_corners=False)
    share = F.avg_pool2d(covered, kernel_size=vlm.patch_size)[:, 0]  # (N, rows, cols)
    patches = (share >= min_share).flatten(1)
    return F.pad(patches, (vlm.num_prefix_visual_tokens, 0), value=False).to(vlm.device)  # a CLS token covers nothing
