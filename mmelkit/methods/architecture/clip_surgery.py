"""CLIP Surgery (Li et al., 2023): a value-value attention path plus feature surgery.

Two parts, both training-free, over tensors recorded by :meth:`ClipAdapter.trace` during one
forward pass of the image tower (the model itself is not edited; its output is unchanged).

**(a) Architecture surgery: the v-v path.** Let blocks s, ..., L-1 be the last ``layers`` blocks
(default 1: the last block only) and, for block b, let ``v_b`` (N, H, L, d) be the per-head values
its attention computed from the *original* residual stream. A second residual stream x' is run
beside the model's own:

* x'_s = the input tokens of block s (the original residual stream there, CLS included);
* for b = s, ..., L-1: per head h, A^h = softmax_j(v^h_i . v^h_j / sqrt(d)) over all tokens j
  (CLS included), o^h = A^h v^h; then the block's own attention output steps: per-head scale
  (open_clip ``head_scale``, if any), heads concatenated, inner norm (open_clip ``ln_inner``, if
  any), output projection W_o, b_o. x'_{b+1} = x'_b + that output. The MLP is skipped on this path;
* z_i = proj(LN_post(x'_L,i)) for every patch token i, then z_i / ||z_i||.

This follows the dual-path design of the authors' released code (the new path starts from the
block input, adds the v-v attention of each surgery block, feeds every block's v from the
original path and skips the FFN). The paper applies it to many blocks (roughly the last half of
ViT-B); mmelkit defaults to the last one, a parameter (``layers``) away from the paper's depth.

**(b) Feature surgery.** With t the unit text embedding of the pair and {t_r} a set of
"redundant" unit text embeddings:

    map_i = ReLU( sum_c [ z_ic t_c - mean_r z_ic t_rc ] ) = ReLU( z_i . (t - mean_r t_r) ),

then min-max normalised. ``redundant="background"`` (default) takes {t_r} from
``background_texts`` (neutral prompts: the empty prompt, "a photo", ...);
``redundant="texts"`` takes the distinct texts passed to :meth:`explain` (as the paper does with
all class names of a dataset). With one text only, the texts set *is* the target and every map
is zero (a warning says so). RECONSTRUCTION NOTE: the authors' code additionally weights each
class text by a softmax over the CLS-text similarities before averaging; that weighting is not
reproduced here (plain mean).

No gradients; one image forward per call (plus the text encoder for targets and redundant texts).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from mmelkit.methods.architecture.maskclip import attention_output
from mmelkit.methods.base import Explanation, Method, normalise_maps, pair_inputs, register, text_features
from mmelkit.models.adapter import TextLike
from mmelkit.models.backend import TextTokens

DEFAULT_BACKGROUND_TEXTS: tuple[str, ...] = ("", "a photo", "an image", "a picture of something")


def value_value_attention(values: torch.Tensor) -> torch.Tensor:
    """softmax_j(v_i . v_j / sqrt(d)) v per head; (N, H, L, d) -> (N, H, L, d). Softmax in fp32."""
    logits = torch.matmul(values, values.transpose(-1, -2)) * values.shape[-1] ** -0.5
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs, values)


@register
class CLIPSurgery(Method):
    name = "clip_surgery"
    granularity = "architecture"
    family = "value path"
    reference = (
        "Li et al., CLIP Surgery for Better Explainability with Enhancement in Open-Vocabulary Tasks, 2023"
    )
    defaults: dict[str, Any] = {
        "layers": 1,
        "redundant": "background",
        "background_texts": DEFAULT_BACKGROUND_TEXTS,
    }

    def _text_features(self, tokens: TextTokens, texts: TextLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit embeddings of the pairs' targets (N, E) and the mean of the redundant texts (E,).

        Targets and redundant texts are encoded together, each distinct text once, so a redundant
        text equal to a target has bit-identical features (and the surgery cancels it exactly).
        """
        model = self.model
        kind = self.params["redundant"]
        if kind == "background":
            background = self.params["background_texts"]
            background = [background] if isinstance(background, str) else list(background)
            if not background:
                raise ValueError("background_texts is empty: give at least one redundant text")
            redundant = model.tokenize(background)
        elif kind == "texts":
            redundant = model.as_tokens(texts)
        else:
            raise ValueError(f"redundant must be 'background' or 'texts'; got {kind!r}")
        ids = torch.cat([tokens.ids, redundant.ids.to(tokens.ids.device)])
        # encode each distinct token row once; ``inverse`` maps every row to its distinct row
        distinct, inverse = torch.unique(ids, dim=0, return_inverse=True)
        order = torch.arange(len(ids), device=ids.device)
        first = torch.full((len(distinct),), len(ids), device=ids.device).scatter_reduce(
            0, inverse, order, reduce="amin"
        )
        n = len(tokens)
        distinct_redundant = inverse[n:].unique()
        if kind == "texts" and len(distinct_redundant) < 2:
            warnings.warn(
                "clip_surgery with redundant='texts' and a single distinct text: the redundant set is the "
                "target itself, so every map is zero. Explain several texts at once or use "
                "redundant='background'.",
                stacklevel=3,
            )
        everything = TextTokens(
            ids,
            torch.cat([tokens.attention_mask, redundant.attention_mask.to(tokens.ids.device)]),
            torch.cat([tokens.eos_index, redundant.eos_index.to(tokens.ids.device)]),
        )
        features = text_features(model, everything.select(first))  # (distinct, E)
        return features[inverse[:n]], features[distinct_redundant].mean(dim=0)

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        model = self.model
        layers = int(self.params["layers"])
        if not 1 <= layers <= model.num_image_blocks:
            raise ValueError(f"layers must lie in 1..{model.num_image_blocks}; got {layers}")
        pixels, tokens = pair_inputs(model, images, texts)
        targets, redundant = self._text_features(tokens, texts)  # (N, E), (E,)
        attentions = model.backend.image_tower().attentions
        blocks = list(range(-layers, 0))
        with torch.no_grad():
            with model.trace(image_blocks=blocks, attention_probs=False) as trace:
                model.encode_image(pixels)
            records = [trace.image[b] for b in blocks]
            stream = records[0].tokens_in  # (N, L, D): the v-v path starts from the first block's input
            for record in records:
                stream = stream + attention_output(attentions[record.index], value_value_attention(record.v))
            prefix = records[0].num_prefix_tokens
            dense = F.normalize(model.project_image_tokens(stream)[:, prefix:], dim=-1)  # (N, P, E)
            # sum_c z_ic t_c - mean_r sum_c z_ic t_rc, written as one dot product.
            surgery = targets - redundant[None, :]
            maps = (dense * surgery[:, None, :]).sum(dim=-1).clamp_min(0).reshape(-1, *records[0].grid)
        params = dict(self.params)
        background = params["background_texts"]
        params["background_texts"] = [background] if isinstance(background, str) else list(background)
        return Explanation(normalise_maps(maps), tuple(pixels.shape[-2:]), self.name, params, tokens.texts)
