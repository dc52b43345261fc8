"""``VlmAdapter``: one interface over a Hugging Face ``LlavaForConditionalGeneration``.

It builds batches (prompt template, ``<image>`` expanded to the V visual tokens, left padding),
decodes greedily with its own KV-cache loop (:class:`DecodeStream`, with a ``logits_hook`` for
decoding strategies that combine the logits of a second forward pass), scores answers by teacher
forcing, runs the model on given visual tokens, and traces (:mod:`mmelkit.models.vlm.tracing`).

The records it returns and the decoding stream live in :mod:`mmelkit.models.vlm.records`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmelkit._checks import positive_int
from mmelkit.models.images import OPENAI_MEAN, OPENAI_STD, as_image_list, preprocess_images
from mmelkit.models.tracing import BlockSelection
from mmelkit.models.vlm.records import (
    AnswerLogprob,
    Decoded,
    DecodeStep,
    DecodeStream,
    GenerateOutput,
    LogitsHook,
    VlmBatch,
    cat_logprobs,
    span_tensors,
)
from mmelkit.models.vlm.tracing import (
    VlmParts,
    VlmTrace,
    VlmTracer,
    attention_implementation,
    find_parts,
    resolve_layers,
)

TextsLike = str | Sequence[str]


# -- the adapter ------------------------------------------------------------------------------------
class VlmAdapter:
    """A LLaVA-style generative VLM behind one interface. Created by :func:`mmelkit.load_vlm`.

    Images are PIL images, numpy arrays or torch tensors, one or a list, any size or mode; a 4-D
    float tensor (N, 3, H, W) is taken to be output of :meth:`preprocess`. Texts are questions
    (wrapped in the prompt template) or whole prompts (strings that contain the image token).
    Pairing: N images with N texts, one image with N texts, or N images with one text.
    Tensors returned live on ``self.device``.
    """

    def __init__(self, model: nn.Module, processor: Any, *, name: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.processor = processor
        self.name = name
        self.device = device
        self.dtype = dtype
        self.parts: VlmParts = find_parts(model)
        self._traces: list[VlmTrace] = []
        self._cache_kwarg: str | None = None
        self._check_image_token()

    # -- facts ------------------------------------------------------------------------------------
    @property
    def cache_kwarg(self) -> str:
        """The model's name for the KV cache: ``cache`` (transformers 5) or ``past_key_values``."""
        if self._cache_kwarg is None:
            parameters = inspect.signature(self.model.forward).parameters
            self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        return self._cache_kwarg

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def image_token(self) -> str:
        token = getattr(self.processor, "image_token", None) or getattr(self.tokenizer, "image_token", None)
        return token or "<image>"

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.config.vision_config.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def patch_size(self) -> tuple[int, int]:
        size = self.config.vision_config.patch_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (rows, columns) of the visual tokens."""
        (h, w), (p_h, p_w) = self.image_size, self.patch_size
        return (h // p_h, w // p_w)

    @property
    def vision_feature_select_strategy(self) -> str:
        return str(getattr(self.config, "vision_feature_select_strategy", "default"))

    @property
    def vision_feature_layer(self) -> int | list[int]:
        return self.config.vision_feature_layer

    @property
    def num_prefix_visual_tokens(self) -> int:
        """Visual tokens before the patch tokens: 1 (CLS) for the ``"full"`` strategy, else 0."""
        return 1 if self.vision_feature_select_strategy == "full" else 0

    @property
    def num_visual_tokens(self) -> int:
        """V: visual tokens per image in the prompt (patches, plus CLS for the ``"full"`` strategy)."""
        rows, cols = self.grid
        return rows * cols + self.num_prefix_visual_tokens

    @property
    def num_decoder_layers(self) -> int:
        return len(self.parts.decoder_layers)

    @property
    def num_decoder_heads(self) -> int:
        return int(self.config.text_config.num_attention_heads)

    @property
    def num_vision_layers(self) -> int:
        return len(self.parts.vision_layers)

    @property
    def num_vision_heads(self) -> int:
        return int(self.config.vision_config.num_attention_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.config.text_config.hidden_size)

    @property
    def max_positions(self) -> int:
        """The decoder's context length (``text_config.max_position_embeddings``)."""
        return int(self.config.text_config.max_position_embeddings)

    @property
    def pad_token_id(self) -> int:
        for value in (getattr(self.tokenizer, "pad_token_id", None), getattr(self.config.text_config, "pad_token_id", None)):
            if value is not None:
                return int(value)
        return self.eos_token_ids[0]

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end an answer: the tokenizer's eos and the generation config's."""
        found: list[int] = []
        candidates: list[Any] = [getattr(self.tokenizer, "eos_token_id", None)]
        generation = getattr(self.model, "generation_config", None)
        for source in (getattr(generation, "eos_token_id", None), getattr(self.config.text_config, "eos_token_id", None)):
            candidates.extend(source if isinstance(source, (list, tuple)) else [source])
        for value in candidates:
            if value is not None and int(value) not in found:
                found.append(int(value))
        if not found:
            raise ValueError("neither the tokenizer nor the model config names an eos token")
        return found

    def __repr__(self) -> str:
        return (
            f"VlmAdapter(name={self.name!r}, image_size={self.image_size}, patch_size={self.patch_size}, "
            f"visual_tokens={self.num_visual_tokens}, decoder_layers={self.num_decoder_layers}, "
            f"device={self.device}, dtype={self.dtype})"
        )

    def _check_image_token(self) -> None:
        ids = self.tokenizer.encode(self.image_token, add_special_tokens=False)
        if list(ids) != [self.image_token_id]:
            raise ValueError(
                f"the tokenizer has no {self.image_token!r} token (it encodes it as {list(ids)}, the model's "
                f"config.image_token_id is {self.image_token_id}); use the tokenizer the model was trained with"
            )

    # -- inputs -----------------------------------------------------------------------------------
    def prompt(self, question: str | Sequence[str]) -> str | list[str]:
        """The prompt for ``question``: the chat template (a user turn with an image part and the
        question, generation prompt added) when the processor or tokenizer has one, else
        ``scene_llava.PLAIN_TEMPLATE``. A list gives a list."""
        if not isinstance(question, str):
            return [self._prompt_one(q) for q in _strings(question, "questions")]
        return self._prompt_one(question)

    def _prompt_one(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        for owner in (self.processor, self.tokenizer):
            if getattr(owner, "chat_template", None):
                return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        from mmelkit.models.vlm.scene_llava import PLAIN_TEMPLATE

        return PLAIN_TEMPLATE.replace("<image>", self.image_token).format(question=question)

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images (PIL, numpy, torch; any size; grayscale/RGBA converted) -> normalised pixels
        (N, 3, H, W) at the vision tower's size, on the model's device and dtype."""
        image_processor = getattr(self.processor, "image_processor", None)
        return preprocess_images(
            images,
            native_size=self.image_size,
            patch_size=self.patch_size,
            mean=getattr(image_processor, "image_mean", None) or OPENAI_MEAN,
            std=getattr(image_processor, "image_std", None) or OPENAI_STD,
            device=self.device,
            dtype=self.dtype,
        )

    def as_pixels(self, images: Any) -> torch.Tensor:
        """4-D float tensors pass through (checked, moved to the model); the rest is preprocessed."""
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
            if images.shape[1] != 3 or tuple(images.shape[-2:]) != self.image_size:
                raise ValueError(
                    f"pixel values must be (N, 3, {self.image_size[0]}, {self.image_size[1]}); got {tuple(images.shape)}"
                )
            return images.to(self.device, self.dtype)
        return self.preprocess(images)

    def encode(
        self,
        images: Any,
        questions: TextsLike,
        answers: TextsLike | None = None,
        *,
        template: bool | None = None,
        eos: bool = True,
    ) -> VlmBatch:
        """Build the model input for (image, question[, answer]) rows.

        ``template``: ``None`` wraps each text without the image token in :meth:`prompt` and uses
        texts with it as they are; ``True`` wraps every text; ``False`` uses every text as a prompt.
        With ``answers`` (one per row, or one for all), each row is ``prompt + " " + answer`` with
        the eos appended (``eos=False``: not), for teacher forcing.
        """
        source, prompts = self._pairs(images, questions, template)
        answer_list = self._answers(answers, len(prompts))
        return self._encode_rows(source.take(range(len(prompts))), prompts, answer_list, eos)

    def _pairs(self, images: Any, questions: TextsLike, template: bool | None) -> tuple[_ImageSource, list[str]]:
        texts = [questions] if isinstance(questions, str) else _strings(questions, "questions")
        source = _ImageSource(self, images)
        n_images, n_texts = len(source), len(texts)
        if n_images != n_texts and n_images != 1 and n_texts != 1:
            raise ValueError(
                f"got {n_images} images and {n_texts} questions: pass as many of each, one image with many "
                "questions, or many images with one question"
            )
        rows = max(n_images, n_texts)
        texts = texts * rows if n_texts == 1 else texts
        if template not in (None, True, False):
            raise ValueError(f"template must be None, True or False; got {template!r}")
        prompts = []
        for text in texts:
            wrap = template if template is not None else self.image_token not in text
            prompts.append(self._prompt_one(text) if wrap else text)
        return source, prompts

    def _answers(self, answers: TextsLike | None, rows: int) -> list[str] | None:
        if answers is None:
            return None
        listed = [answers] if isinstance(answers, str) else _strings(answers, "answers")
        if len(listed) == 1:
            listed = listed * rows
        if len(listed) != rows:
            raise ValueError(f"got {len(listed)} answers for {rows} rows: pass one answer per row or one for all")
        return listed

    def _encode_rows(self, pixels: torch.Tensor, prompts: list[str], answers: list[str] | None, eos: bool) -> VlmBatch:
        V, token = self.num_visual_tokens, self.image_token
        for index, prompt in enumerate(prompts):
            if token not in prompt:
                raise ValueError(
                    f"prompt {index} has no image token {token!r}: {prompt!r}. Each prompt takes one image; "
                    "pass a question (template=None) or put the image token in the prompt"
                )
        expanded = [prompt.replace(token, token * V) for prompt in prompts]
        prompt_ids = self._tokenize(expanded)
        answer_ids: list[list[int]] = [[] for _ in prompts]
        if answers is not None:
            full = self._tokenize([p + " " + a for p, a in zip(expanded, answers, strict=True)])
            eos_id = self.eos_token_ids[0]
            for row, (ids, whole) in enumerate(zip(prompt_ids, full, strict=True)):
                common = _common_prefix(ids, whole)
                prompt_ids[row] = whole[:common]
                answer_ids[row] = whole[common:] + ([eos_id] if eos else [])
                if not answer_ids[row]:
                    raise ValueError(f"answer {row} ({answers[row]!r}) gives no tokens to score")
        for row, (ids, extra) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
            count = sum(1 for i in ids if i == self.image_token_id)
            if count != V:
                raise ValueError(
                    f"prompt {row} holds {count} image tokens after expansion, but its one image gives {V} visual "
                    f"tokens (features): use exactly one {token!r} per prompt"
                )
            if len(ids) + len(extra) > self.max_positions:
                what = "prompt" if not extra else "prompt and answer"
                raise ValueError(
                    f"row {row}: the {what} take {len(ids) + len(extra)} tokens ({V} of them visual), more than the "
                    f"model's context of {self.max_positions} (text_config.max_position_embeddings); shorten the question"
                )
        width_p = max(len(ids) for ids in prompt_ids)
        width_a = max(len(ids) for ids in answer_ids)
        n = len(prompts)
        pad = self.pad_token_id
        input_ids = torch.full((n, width_p + width_a), pad, dtype=torch.long)
        mask = torch.zeros((n, width_p + width_a), dtype=torch.long)
        for row, (ids, extra) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
            start = width_p - len(ids)
            input_ids[row, start:width_p] = torch.tensor(ids, dtype=torch.long)
            mask[row, start:width_p] = 1
            if extra:
                input_ids[row, width_p : width_p + len(extra)] = torch.tensor(extra, dtype=torch.long)
                mask[row, width_p : width_p + len(extra)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        batch = VlmBatch(input_ids, mask, pixels, self._visual_positions(input_ids), list(prompts))
        if answers is not None:
            batch.answer_spans = [(width_p, width_p + len(extra)) for extra in answer_ids]
            batch.answer_positions, batch.answer_mask = span_tensors(batch.answer_spans, self.device)
        return batch

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def _visual_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(-1)
        V = self.num_visual_tokens
        if bool((counts != V).any()):
            row = int((counts != V).nonzero()[0, 0])
            raise ValueError(
                f"row {row} holds {int(counts[row])} image tokens but an image gives {V} visual tokens (features)"
            )
        return is_image.nonzero()[:, 1].view(input_ids.shape[0], V)

    # -- model runs -------------------------------------------------------------------------------
    def visual_features(self, images: Any) -> torch.Tensor:
        """Projected visual tokens (N, V, D), the decoder's input at the visual positions."""
        pixels = self.as_pixels(images)
        output = self.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
        )
        features = getattr(output, "pooler_output", output)
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        if features.dim() != 3 or features.shape[1] != self.num_visual_tokens:
            raise ValueError(
                f"the model gives visual features of shape {tuple(features.shape)}, expected (N, {self.num_visual_tokens}, D)"
            )
        return features

    def forward(
        self,
        batch: VlmBatch,
        visual_embeds: torch.Tensor | None = None,
        *,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        **model_kwargs: Any,
    ) -> Any:
        """Run the model on an encoded batch; returns the model's output (``.logits`` (N, L, vocab)).

        ``visual_embeds`` (N, V, D): visual tokens to use instead of the image's own (perturbed,
        replaced, interpolated); they are recorded by an open trace. ``logits_to_keep``: only the
        last k positions' logits (0 = all)."""
        if not isinstance(batch, VlmBatch):
            raise TypeError(f"forward takes a VlmBatch from encode(); got {type(batch).__name__}")
        if visual_embeds is None:
            visual = self.visual_features(batch.pixel_values)
        else:
            expected = (len(batch), self.num_visual_tokens, self.hidden_size)
            if tuple(visual_embeds.shape) != expected:
                raise ValueError(f"visual_embeds must have shape {expected}; got {tuple(visual_embeds.shape)}")
            visual = visual_embeds.to(self.device, self.dtype)
            for trace in self._traces:
                visual = trace.take_visual(visual, from_projector=False)
        embeds = self.parts.language_model.get_input_embeddings()(batch.input_ids)
        embeds = self.merge_visual(batch, embeds, visual)
        return self.model(
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **model_kwargs,
        )

    def merge_visual(self, batch: VlmBatch, embeds: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Token embeddings (N, L, D) with the visual tokens (N, V, D) put at the visual positions."""
        positions = batch.visual_positions.to(embeds.device)
        rows = torch.arange(len(batch), device=embeds.device)[:, None].expand_as(positions)
        return embeds.index_put((rows, positions), visual.to(embeds.dtype))  # out of place: differentiable

    def project_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder hidden states (..., D) -> logits (..., vocab) through the final norm and LM head
        (the logit lens; for the last layer's output this gives the model's logits)."""
        return self.parts.lm_head(self.parts.final_norm(hidden))

    def decode_stream(self, batch: VlmBatch, visual_embeds: torch.Tensor | None = None) -> DecodeStream:
        """A :class:`DecodeStream` over ``batch`` (for a ``logits_hook`` that needs a second stream)."""
        return DecodeStream(self, batch, visual_embeds)

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self,
        images: Any,
        questions: TextsLike,
        max_new_tokens: int = 16,
        *,
        batch_size: int = 32,
        stop_at_eos: bool = True,
        logits_hook: LogitsHook | None = None,
        template: bool | None = None,
        progress: bool = False,
    ) -> GenerateOutput:
        """Greedy answers, batched (``batch_size`` rows per forward) with the KV cache.

        Each row stops at its eos; ``stop_at_eos=False`` runs all ``max_new_tokens`` steps (for
        timing). ``logits_hook(logits, step)`` may replace the next-token logits (N, vocab) before
        the argmax (contrastive decoding; see :class:`DecodeStep`)."""
        max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
        size = positive_int("batch_size", batch_size)
        source, prompts = self._pairs(images, questions, template)
        chunks = [range(start, min(start + size, len(prompts))) for start in range(0, len(prompts), size)]
        parts: list[Decoded] = []
        with torch.no_grad():
            for rows in tqdm(chunks, disable=not progress or len(chunks) == 1, desc="generate", unit="batch"):
                batch = self._encode_rows(source.take(rows), [prompts[i] for i in rows], None, True)
                width = batch.input_ids.shape[1]
                if width + max_new_tokens > self.max_positions:
                    raise ValueError(
                        f"prompts of {width} tokens plus max_new_tokens={max_new_tokens} exceed the model's context "
                        f"of {self.max_positions} (text_config.max_position_embeddings); ask for fewer tokens"
                    )
                parts.append(self._greedy(batch, max_new_tokens, stop_at_eos, logits_hook))
        return self._merge(parts)

    def _greedy(self, batch: VlmBatch, max_new_tokens: int, stop_at_eos: bool, hook: LogitsHook | None) -> Decoded:
        stream = self.decode_stream(batch)
        logits = stream.prefill()
        n = len(batch)
        eos = torch.tensor(self.eos_token_ids, device=self.device)
        finished = torch.zeros(n, dtype=torch.bool, device=self.device)
        lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=self.device)
        sequences = batch.input_ids
        new_tokens: list[torch.Tensor] = []
        last: torch.Tensor | None = None
        for index in range(max_new_tokens):
            if hook is not None:
                logits = hook(logits, DecodeStep(index, batch, last, sequences, finished.clone()))
            last = torch.where(finished, torch.full_like(finished, self.pad_token_id, dtype=torch.long),
                               logits.argmax(-1))
            new_tokens.append(last)
            sequences = torch.cat([sequences, last[:, None]], dim=1)
            if stop_at_eos:
                ended = torch.isin(last, eos) & ~finished
                lengths = torch.where(ended, torch.full_like(lengths, index + 1), lengths)
                finished = finished | ended
                if bool(finished.all()):
                    break
            if index + 1 < max_new_tokens:
                logits = stream.step(last)
        generated = torch.stack(new_tokens, dim=1)
        keep = torch.arange(generated.shape[1], device=self.device)[None] < lengths[:, None].clamp(max=generated.shape[1])
        return Decoded(batch, generated, keep, finished)

    def _merge(self, parts: list[Decoded]) -> GenerateOutput:
        width = max(p.batch.input_ids.shape[1] + p.generated.shape[1] for p in parts)
        sequences, masks, positions = [], [], []
        texts, token_ids, spans, prompts, finished = [], [], [], [], []
        for part in parts:
            prompt_width = part.batch.input_ids.shape[1]
            shift = width - prompt_width - part.generated.shape[1]
            generated = part.generated.masked_fill(~part.keep, self.pad_token_id)
            sequence = torch.cat([part.batch.input_ids, generated], dim=1)
            mask = torch.cat([part.batch.attention_mask, part.keep.long()], dim=1)
            sequences.append(F.pad(sequence, (shift, 0), value=self.pad_token_id))
            masks.append(F.pad(mask, (shift, 0), value=0))
            positions.append(part.batch.visual_positions + shift)
            for row in range(len(part.batch)):
                ids = part.generated[row][part.keep[row]]
                token_ids.append(ids)
                texts.append(self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip())
                start = shift + prompt_width
                spans.append((start, start + ids.numel()))
            prompts.extend(part.batch.prompts)
            finished.append(part.finished)
        return GenerateOutput(texts, token_ids, torch.cat(sequences), torch.cat(masks), spans, torch.cat(positions),
                              prompts, torch.cat(finished))

    # -- scoring ----------------------------------------------------------------------------------
    def answer_logprob(
        self,
        images: Any,
        prompts_or_questions: TextsLike,
        answers: TextsLike,
        *,
        batch_size: int = 32,
        eos: bool = True,
        template: bool | None = None,
    ) -> AnswerLogprob:
        """log p(answer token | image, prompt, earlier answer tokens) for every answer token (the eos
        included unless ``eos=False``), by teacher forcing, ``batch_size`` rows per forward pass.
        Differentiable when called with gradients enabled."""
        size = positive_int("batch_size", batch_size)
        source, prompts = self._pairs(images, prompts_or_questions, template)
        answer_list = self._answers(answers, len(prompts))
        assert answer_list is not None
        results = []
        for start in range(0, len(prompts), size):
            rows = range(start, min(start + size, len(prompts)))
            batch = self._encode_rows(source.take(rows), [prompts[i] for i in rows], [answer_list[i] for i in rows], eos)
            positions, _ = batch.require_answers()
            keep = batch.input_ids.shape[1] - int(positions.min()) + 1
            logits = self.forward(batch, logits_to_keep=keep).logits
            results.append(self.answer_logprob_from_logits(logits, batch))
        return cat_logprobs(results, self.pad_token_id)

    def answer_logprob_from_logits(self, logits: torch.Tensor, batch: VlmBatch) -> AnswerLogprob:
        """Answer log-probabilities from a forward pass's logits on ``batch`` (which has answers).

        ``logits`` (N, L', vocab) may be the last L' positions only (``logits_to_keep``)."""
        positions, mask = batch.require_answers()
        offset = batch.input_ids.shape[1] - logits.shape[1]
        predict_from = positions - 1 - offset
        if bool(((predict_from < 0) & mask).any()):
            raise ValueError("the logits do not cover every answer position: keep more positions")
        predict_from = predict_from.clamp(min=0)
        rows = torch.arange(len(batch), device=logits.device)[:, None]
        wide = torch.promote_types(logits.dtype, torch.float32)  # half precision scored in fp32, fp64 kept
        picked = logits[rows, predict_from].to(wide).log_softmax(-1)  # (N, T, vocab)
        token_ids = batch.input_ids.gather(1, positions)
        token_logprobs = picked.gather(-1, token_ids[..., None])[..., 0] * mask
        return AnswerLogprob(token_logprobs, token_ids.masked_fill(~mask, self.pad_token_id), mask,
                             token_logprobs.sum(-1))

    # -- tracing ----------------------------------------------------------------------------------
    @contextmanager
    def trace(
        self,
        decoder_attentions: bool = True,
        decoder_hidden: bool = True,
        vision: bool | BlockSelection = True,
        visual_leaf: bool = True,
        layers: BlockSelection = None,
    ) -> Iterator[VlmTrace]:
        """Record the model's insides during the forward passes run inside the ``with`` block.

        ``layers``: decoder layers to trace (``None`` = all; an index or indices, negatives count
        from the last). ``vision``: ``True`` (every vision layer), ``False``, or indices.
        ``visual_leaf``: make the projected visual tokens a leaf (see
        :mod:`mmelkit.models.vlm.tracing`). Eager attention is forced while attentions are
        recorded and restored afterwards; every hook is removed on exit, also after an exception.
        """
        trace = VlmTrace(
            num_decoder_layers=self.num_decoder_layers,
            num_vision_layers=self.num_vision_layers,
            visual_leaf=bool(visual_leaf),
            grid=self.grid,
            num_prefix_visual_tokens=self.num_prefix_visual_tokens,
        )
        decoder_indices = resolve_layers("all" if layers is None else layers, self.num_decoder_layers, "decoder")
        if not (decoder_attentions or decoder_hidden):
            decoder_indices = []
        vision_indices = resolve_layers(vision, self.num_vision_layers, "vision")
        eager = bool(decoder_indices and decoder_attentions) or bool(vision_indices)
        tracer = VlmTracer(trace)
        with attention_implementation(self.model, "eager") if eager else _nothing():
            try:
                tracer.install(
                    self.model,
                    self.parts,
                    decoder_indices=decoder_indices,
                    decoder_attentions=decoder_attentions,
                    decoder_hidden=decoder_hidden,
                    vision_indices=vision_indices,
                )
                self._traces.append(trace)
                yield trace
            finally:
                tracer.close()
                if trace in self._traces:
                    self._traces.remove(trace)


# -- helpers ----------------------------------------------------------------------------------------
class _ImageSource:
    """The images of a call, preprocessed chunk by chunk (one image for many rows: once)."""

    def __init__(self, adapter: VlmAdapter, images: Any) -> None:
        self.adapter = adapter
        self._single: torch.Tensor | None = None
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
            self.pixels: torch.Tensor | None = adapter.as_pixels(images)
            self.items: list[Any] = []
            self.count = self.pixels.shape[0]
        else:
            self.pixels = None
            self.items = as_image_list(images)
            self.count = len(self.items)
        if self.count == 0:
            raise ValueError("no images given")

    def __len__(self) -> int:
        return self.count

    def take(self, rows: range) -> torch.Tensor:
        if self.count == 1:
            if self._single is None:
                self._single = self.pixels if self.pixels is not None else self.adapter.preprocess(self.items)
            return self._single.expand(len(rows), *self._single.shape[1:])
        if self.pixels is not None:
            return self.pixels[rows.start : rows.stop]
        return self.adapter.preprocess([self.items[i] for i in rows])


def _strings(texts: Any, what: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{what} must be a string or a list of strings; got {type(texts).__name__}")
    listed = list(texts)
    if not listed:
        raise ValueError(f"no {what} given")
    bad = [t for t in listed if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{what} must be strings; got {type(bad[0]).__name__}")
    return listed


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@contextmanager
def _nothing() -> Iterator[None]:
    yield
