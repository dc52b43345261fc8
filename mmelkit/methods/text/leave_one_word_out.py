"""Leave-one-word-out: how much the image-text score drops without each word.

For every word of each text (a word as CLIP's BPE splits text: its pieces up to the one closing
with ``</w>``; punctuation marks are words of their own), score = S(I, T) - S(I, T without the
word), with S the cosine similarity. The word is removed at the token level (its pieces dropped,
the rest moved up, padding appended), which is what tokenising the text without the word gives.
Positive: the word supports the match. Scores are raw drops, not normalised. Each piece of a word
carries an equal share of its drop, so that word scores stay the sums of their pieces' scores like
for the other text methods. All ablated texts of all pairs are encoded in chunks of ``batch_size``.
"""

from __future__ import annotations

from typing import Any

import torch

from mmelkit._checks import positive_int
from mmelkit.methods.base import (
    Method,
    TextExplanation,
    TextLayout,
    pair_inputs,
    paired_cosine,
    register,
    text_layout,
)
from mmelkit.methods.text._common import image_features
from mmelkit.models.adapter import TextLike
from mmelkit.models.backend import TextTokens


def ablated_tokens(tokens: TextTokens, layout: TextLayout, pad_id: int) -> tuple[TextTokens, torch.Tensor]:
    """One text per (pair, word) with that word's pieces removed, and the pair of each, in pair-major
    word order."""
    ids, mask = tokens.ids.cpu(), tokens.attention_mask.cpu()
    eos = tokens.eos_index.cpu()
    new_ids, new_mask, new_eos, pairs = [], [], [], []
    length = ids.shape[1]
    for row, groups in enumerate(layout.word_positions):
        for group in groups:
            keep = torch.ones(length, dtype=torch.bool)
            keep[group] = False
            removed = len(group)
            new_ids.append(torch.cat([ids[row][keep], torch.full((removed,), pad_id, dtype=ids.dtype)]))
            new_mask.append(torch.cat([mask[row][keep], torch.zeros(removed, dtype=mask.dtype)]))
            new_eos.append(eos[row] - removed)
            pairs.append(row)
    device = tokens.ids.device
    if not pairs:
        empty = tokens.ids.new_zeros((0, length))
        no_pairs = torch.zeros(0, dtype=torch.long, device=device)
        return TextTokens(empty, empty.clone(), tokens.eos_index.new_zeros(0)), no_pairs
    ablated = TextTokens(torch.stack(new_ids), torch.stack(new_mask), torch.stack(new_eos).to(eos.dtype)).to(device)
    return ablated, torch.tensor(pairs, device=device)


@register
class LeaveOneWordOut(Method):
    name = "leave_one_word_out"
    level = "data"
    granularity = "input"
    family = "perturbation"
    modality = "text"
    reference = (
        "word erasure, as in Li, Monroe & Jurafsky, Understanding Neural Networks through Representation "
        "Erasure, 2016"
    )
    defaults: dict[str, Any] = {"batch_size": 256}

    def explain(self, images: Any, texts: TextLike) -> TextExplanation:
        model = self.model
        batch_size = positive_int("batch_size", self.params["batch_size"])
        pixels, tokens = pair_inputs(model, images, texts)
        layout = text_layout(model, tokens)
        image = image_features(model, pixels)
        ablated, pairs = ablated_tokens(tokens, layout, model.pad_token_id)
        with torch.no_grad():
            full = paired_cosine(image, model.encode_text(tokens))
            drops = []
            for start in range(0, len(ablated), batch_size):
                chunk = torch.arange(start, min(start + batch_size, len(ablated)), device=pairs.device)
                features = model.encode_text(ablated.select(chunk))
                drops.append(full[pairs[chunk]] - paired_cosine(image[pairs[chunk]], features))
            drops = torch.cat(drops) if drops else full.new_zeros(0)
        # spread each word's drop evenly over its pieces
        rows, positions, words, shares = [], [], [], []
        word = 0
        for row, groups in enumerate(layout.word_positions):
            for group in groups:
                rows += [row] * len(group)
                positions += group
                words += [word] * len(group)
                shares += [1.0 / len(group)] * len(group)
                word += 1
        scores = torch.zeros(tokens.ids.shape, dtype=full.dtype, device=full.device)
        if words:
            device = full.device
            share = torch.tensor(shares, dtype=full.dtype, device=device)
            scores[torch.tensor(rows, device=device), torch.tensor(positions, device=device)] = (
                drops[torch.tensor(words, device=device)] * share
            )
        return TextExplanation.from_scores(layout, scores, self.name, dict(self.params), tokens.texts)
