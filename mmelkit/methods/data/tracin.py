"""TracIn-CP: which training pairs pushed a CLIP model towards its behaviour on a test pair?

Pruthi, Liu, Kale & Sundararajan, "Estimating Training Data Influence by Tracing Gradient
Descent", NeurIPS 2020. A gradient step with learning rate lr on training pair z changes the loss
on test pair z' by about ``-lr * g(z) . g(z')`` (first order), ``g = grad_theta L``. Summed over
checkpoints c that training passed through (TracIn-CP):

    influence(z, z') = sum_c lr_c * grad_theta L(z; theta_c) . grad_theta L(z'; theta_c)

Positive influence: training on z lowered the loss on z' (a *proponent*); negative: it raised it
(an *opponent*). With the current model alone (the default: one checkpoint, lr 1) the score is
the similarity of the two pairs' loss gradients. The nearest-pairs baseline
(:mod:`.attribution`) asks which training images look like the query; TracIn asks which
training pairs the model's parameters would move in the same direction.

**Per-pair loss.** CLIP trains on a batch-level contrastive loss, which is no function of one
pair. ``loss="contrastive"`` (default) takes the pair's own part of it: the symmetric InfoNCE of
the pair against a fixed gallery (the image against the gallery's captions, the caption against
the gallery's images), the gallery's embeddings held constant at each checkpoint:

    L(x, t) = 1/2 [lse(s x.t, s x.T_g) + lse(s t.x, s t.I_g)] - s x.t     (unit x, t; lse = logsumexp)

Why this one: TracIn's first-order argument holds for the loss training descended, and the
contrastive gradient says how the pair competes with other captions (it separates "a red circle"
from "a blue circle"), where ``loss="cosine"`` (``-s cos(x, t)``, s the checkpoint's logit
scale) only pulls image and caption together and is blind to what they are confused with.
Holding the gallery fixed keeps L a function of the pair alone, so its gradient is a true
per-example gradient that does not depend on how the bank is batched (a live in-batch loss would
also send gradient through the negatives). The gallery is the first ``gallery`` bank pairs (all
by default); gallery pairs whose caption tokenises like the pair's own are left out, since they
are positives (scene-clip was trained with a multi-positive InfoNCE) and a pair never competes
with itself.

**Parameters.** Per-example gradients of a whole CLIP are costly (a backward pass per pair and P
numbers each), so theta is a chosen subset. ``parameters="projections"`` (default): the two
projection heads (open_clip ``visual.proj`` and ``text_projection``; Hugging Face
``visual_projection`` and ``text_projection``). A head maps the pooled feature h to u = h W
(+ b), so its per-example gradient is the outer product of h and delta = dL/du, and

    g(z) . g(z') = sum over heads (h . h' + [bias]) (delta . delta')

two Gram matrices multiplied elementwise: no per-example gradient is ever formed. h comes from
one no-grad pass per pair and checkpoint (the tower run with its head swapped for the identity);
delta from autograd over the tiny loss graph on u. Any other choice (names or name prefixes from
``model.model.named_parameters()``) takes the general path: per-example gradients from
``torch.func`` (vmap over grad of a functional call), flattened, dot products chunk by chunk:
one backward per pair and (batch_size x P) memory.

Reading the scores: a dot product rewards large gradients, so pairs the model finds hard
(high loss) can outrank even an exact duplicate of the query (Cauchy-Schwarz only bounds
g(z).g(z') by |g(z)| |g(z')|). On ``scene-clip`` (500 scene-world pairs, 20 held-out queries)
the top-5 proponents named the query's object 82% of the time (nearest pairs 44%, random 2.5%),
while an appended duplicate of the query ranked first for 10 of the 20 queries. ``TracIn.cosine``
divides by the two self-influences, which puts an exact duplicate first (cosine 1).

**Checkpoints** ``[(model or state_dict, lr), ...]`` are swapped in with
``torch.func.functional_call``: the user's model is never modified (weights, requires_grad flags and
train/eval mode stay as they were; active dropout in training mode is refused, since it would make
the gradients random).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmelkit._checks import choice, did_you_mean, positive_int, positive_number, refuse_active_dropout
from mmelkit.methods.base import pair_inputs, register_tool
from mmelkit.methods.data.attribution import TrainingBank
from mmelkit.models.adapter import ClipAdapter, TextLike
from mmelkit.models.backend import TextTokens

__all__ = ["TracIn", "tracin"]

Loss = Literal["contrastive", "cosine"]
Checkpoint = tuple[ClipAdapter | nn.Module | Mapping[str, torch.Tensor], float]
Bank = TrainingBank | Sequence[tuple[Any, str]]


@dataclass(eq=False)
class TracIn:
    """TracIn scores of Q query pairs against N training pairs, on the model's device.

    ``influence`` (Q, N): sum over checkpoints of lr * g(query) . g(training pair).
    ``proponents`` / ``opponents`` (Q, k): bank indices of the k highest / k lowest influences,
    strongest first (lowest first for opponents, which may still be positive when no pair
    opposes the query), with their ``*_scores`` and ``*_captions``.
    ``query_self_influence`` (Q,) and ``bank_self_influence`` (N,): sum_c lr_c |g|^2 (a large
    self-influence marks a pair the model finds hard or mislabelled). ``parameters``: the
    attributed parameter names; ``loss``: the per-pair loss.
    """

    influence: torch.Tensor
    proponents: torch.Tensor
    proponent_scores: torch.Tensor
    proponent_captions: list[list[str]]
    opponents: torch.Tensor
    opponent_scores: torch.Tensor
    opponent_captions: list[list[str]]
    query_self_influence: torch.Tensor
    bank_self_influence: torch.Tensor
    parameters: list[str]
    loss: str
    query_texts: list[str] | None = None

    def __len__(self) -> int:
        return self.influence.shape[0]

    @property
    def cosine(self) -> torch.Tensor:
        """(Q, N) influence / sqrt(query self-influence x bank self-influence), in [-1, 1].

        The gradients' cosine (over the checkpoints' weighted gradients stacked into one vector),
        so pairs with large gradients no longer win by size alone: an exact duplicate of a query
        scores 1, the most any pair can. Rank by it to ask "whose gradient points the same way"
        rather than "whose gradient moves this loss most"."""
        scale = (self.query_self_influence[:, None] * self.bank_self_influence[None, :]).clamp_min(1e-30).sqrt()
        return (self.influence / scale).clamp(-1.0, 1.0)

    def to_frame(self) -> Any:
        """A pandas DataFrame, one row per query, role (proponent, opponent) and rank: the bank
        index, its caption and its influence."""
        import pandas as pd

        rows = []
        for role, indices, scores, captions in (
            ("proponent", self.proponents, self.proponent_scores, self.proponent_captions),
            ("opponent", self.opponents, self.opponent_scores, self.opponent_captions),
        ):
            for query, (row, values) in enumerate(zip(indices.tolist(), scores.float().cpu().tolist(), strict=True)):
                text = self.query_texts[query] if self.query_texts is not None else None
                for rank, (index, value) in enumerate(zip(row, values, strict=True), start=1):
                    rows.append({"query": query, "query_text": text, "role": role, "rank": rank, "index": index,
                                 "caption": captions[query][rank - 1], "influence": value})
        frame = pd.DataFrame(rows, columns=["query", "query_text", "role", "rank", "index", "caption", "influence"])
        return frame.sort_values(["query", "role", "rank"], ascending=[True, False, True], ignore_index=True)


# -- the model as one function of its weights ------------------------------------------------------------
class _Towers(nn.Module):
    """The wrapped CLIP under one ``forward(kind, inputs)`` that ``functional_call`` can run with
    any checkpoint's weights: ``"image"`` (pixels -> unnormalised embeddings), ``"text"``
    (TextTokens -> embeddings) or ``"scale"`` (the logit scale). Parameter names get ``clip.``."""

    def __init__(self, model: ClipAdapter) -> None:
        super().__init__()
        self.clip = model.model
        self.backend = model.backend  # not a module: a plain attribute

    def forward(self, kind: str, inputs: Any = None) -> torch.Tensor:
        if kind == "image":
            return self.backend.encode_pixels(inputs)
        if kind == "text":
            return self.backend.encode_tokens(inputs)
        return self.backend.logit_scale


@contextlib.contextmanager
def _unfused_multihead_attention() -> Iterator[None]:
    """nn.MultiheadAttention's fused inference path off inside the block, the setting restored after."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@dataclass(frozen=True)
class _Head:
    """A projection head: ``weight`` (and ``bias``) names in ``model.model``; ``linear``: an
    nn.Linear (u = h W^T + b), else a matrix parameter (u = h W)."""

    side: str
    weight: str
    bias: str | None
    linear: bool


def _projection_heads(model: ClipAdapter) -> list[_Head]:
    clip = model.model
    if model.family == "hf_clip":
        modules: dict[str, Any] = {"image": clip.visual_projection, "text": clip.text_projection}
    elif model.family == "open_clip":
        text = clip if hasattr(clip, "text_projection") else getattr(clip, "text", None)
        modules = {"image": clip.visual.proj, "text": getattr(text, "text_projection", None)}
    else:  # pragma: no cover - every backend is one of the two
        raise NotImplementedError(f"no projection heads known for a {model.family} model; pass parameters=[...]")
    names = {id(p): n for n, p in clip.named_parameters()}
    heads = []
    for side, head in modules.items():
        if isinstance(head, nn.Linear):
            bias = names[id(head.bias)] if head.bias is not None else None
            heads.append(_Head(side, names[id(head.weight)], bias, True))
        elif isinstance(head, torch.Tensor) and head.dim() == 2 and id(head) in names:
            heads.append(_Head(side, names[id(head)], None, False))
        else:
            raise ValueError(f"this model has no {side} projection matrix (found {type(head).__name__}); pass "
                             "parameters=[names] to attribute over other weights")
    return heads


def _select_parameters(model: ClipAdapter, parameters: str | Sequence[str]) -> tuple[list[str], list[_Head] | None]:
    """The attributed parameter names (of ``model.model``) and, for ``"projections"``, the heads."""
    if isinstance(parameters, str) and parameters == "projections":
        heads = _projection_heads(model)
        return [name for head in heads for name in (head.weight, head.bias) if name is not None], heads
    items = [parameters] if isinstance(parameters, str) else list(parameters)
    names = [name for name, _ in model.model.named_parameters()]
    known = names + [name for name, _ in model.model.named_modules() if name]
    chosen: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"parameters must be 'projections' or parameter names (strings); got {item!r}")
        hits = [name for name in names if name == item or name.startswith(item + ".")]
        if not hits:
            raise ValueError(f"unknown parameter {item!r};{did_you_mean(item, known)} parameters takes 'projections' "
                             "or names (or prefixes of names) from model.model.named_parameters()")
        chosen += [name for name in hits if name not in chosen]
    if not chosen:
        raise ValueError("parameters is empty: name at least one parameter, or pass 'projections'")
    return chosen, None


def _checkpoint_states(model: ClipAdapter, checkpoints: Sequence[Checkpoint] | None) -> list[tuple[dict, float]]:
    """Each checkpoint as (``clip.``-prefixed tensors for functional_call, lr), checked against the
    model's own weights (names, shapes) and moved to its device and dtypes."""
    if checkpoints is None:
        checkpoints = [(model, 1.0)]
    if isinstance(checkpoints, tuple) and len(checkpoints) == 2 and isinstance(checkpoints[1], numbers.Real):
        raise TypeError("checkpoints must be a list of (model or state_dict, lr) pairs; got one pair: wrap it in "
                        "a list")
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("checkpoints is empty: give at least one (model or state_dict, lr) pair")
    reference = model.model.state_dict()
    required = [name for name, _ in model.model.named_parameters()]
    states = []
    for i, item in enumerate(checkpoints):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"checkpoints[{i}] must be a (model or state_dict, lr) pair; got {type(item).__name__}")
        source, lr = item
        lr = positive_number(f"checkpoints[{i}] learning rate", lr)
        if isinstance(source, ClipAdapter):
            state = source.model.state_dict()
        elif isinstance(source, nn.Module):
            state = source.state_dict()
        elif isinstance(source, Mapping):
            state = dict(source)
        else:
            raise TypeError(f"checkpoints[{i}] must hold a model or a state_dict; got {type(source).__name__}")
        unknown = sorted(set(state) - set(reference))
        if unknown:
            raise ValueError(f"checkpoints[{i}] has weights the model does not: {unknown[:3]};"
                             f"{did_you_mean(unknown[0], reference)} is it a checkpoint of this model?")
        missing = [name for name in required if name not in state]
        if missing:
            raise ValueError(f"checkpoints[{i}] lacks {len(missing)} of the model's weights, e.g. {missing[:3]}")
        tensors = {}
        for name, value in state.items():
            own = reference[name]
            if not isinstance(value, torch.Tensor) or value.shape != own.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"checkpoints[{i}] weight {name!r} has shape {shape}; the model's is "
                                 f"{tuple(own.shape)}")
            tensors["clip." + name] = value.detach().to(own.device, own.dtype)
        states.append((tensors, lr))
    return states


def _bank_pairs(bank: Bank) -> tuple[list[Any], list[str]]:
    if isinstance(bank, TrainingBank):
        return list(bank.images), list(bank.captions)
    if isinstance(bank, (str, bytes)) or not isinstance(bank, Sequence):
        raise TypeError(f"bank must be a TrainingBank or a list of (image, caption) pairs; got {type(bank).__name__}")
    pairs = list(bank)
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], str)):
            raise TypeError(f"bank[{i}] must be an (image, caption) pair with a string caption; got {pair!r:.80}")
    if not pairs:
        raise ValueError("the training bank is empty: give at least one (image, caption) pair")
    return [image for image, _ in pairs], [caption for _, caption in pairs]


# -- the per-pair loss -------------------------------------------------------------------------------------
def _pair_loss(image: torch.Tensor, text: torch.Tensor, gallery_images: torch.Tensor, gallery_texts: torch.Tensor,
               excluded: torch.Tensor, scale: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-row loss (R,) of unnormalised embeddings ``image``, ``text`` (R, E) against the fixed unit
    gallery embeddings (M, E); ``excluded`` (R, M) is True where a gallery pair shares the row's
    caption (a positive, not a negative)."""
    x = F.normalize(image.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    positive = scale * (x * t).sum(dim=-1)
    if loss == "cosine":
        return -positive
    image_to_texts = (scale * x @ gallery_texts.T).masked_fill(excluded, float("-inf"))
    text_to_images = (scale * t @ gallery_images.T).masked_fill(excluded, float("-inf"))
    image_side = torch.logsumexp(torch.cat([positive[:, None], image_to_texts], dim=1), dim=1)
    text_side = torch.logsumexp(torch.cat([positive[:, None], text_to_images], dim=1), dim=1)
    return (image_side + text_side) / 2 - positive


# -- inputs in chunks ---------------------------------------------------------------------------------------
@dataclass
class _Rows:
    """The Q query pairs followed by the N bank pairs, handed out in chunks of model input."""

    model: ClipAdapter
    query_pixels: torch.Tensor
    query_tokens: TextTokens
    bank_images: list[Any]
    bank_tokens: TextTokens
    batch: int

    def chunks(self, side: str) -> Iterator[tuple[slice, Any, Any]]:
        """(rows, pixels, tokens) of the queries (``side="query"``) or the bank, ``batch`` at a time."""
        count = len(self.query_tokens) if side == "query" else len(self.bank_tokens)
        for start in range(0, count, self.batch):
            rows = slice(start, min(start + self.batch, count))
            index = list(range(rows.start, rows.stop))
            if side == "query":
                yield rows, self.query_pixels[rows], self.query_tokens.select(index)
            else:
                yield rows, self.model.as_pixels(self.bank_images[rows]), self.bank_tokens.select(index)


def _caption_ids(query: TextTokens, bank: TextTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """One integer per distinct tokenised caption, for the queries and the bank."""
    width = max(query.ids.shape[1], bank.ids.shape[1])
    rows = torch.cat([F.pad(t.ids, (0, width - t.ids.shape[1]), value=-1) for t in (query, bank)])
    _, ids = torch.unique(rows, dim=0, return_inverse=True)
    return ids[: len(query)], ids[len(query) :]


def _encode(towers: _Towers, state: dict, kind: str, rows: _Rows, side: str) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([functional_call(towers, state, (kind, pixels if kind == "image" else tokens))
                          for _, pixels, tokens in rows.chunks(side)])


# -- the projection heads' closed form -------------------------------------------------------------------------
def _head_factors(
    towers: _Towers, state: dict, heads: list[_Head], rows: _Rows, gallery: int, excluded: torch.Tensor, loss: str,
    check: bool,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, float]], torch.Tensor]:
    """Per head (h (Q+N, D), delta (Q+N, E), 1 if it has a bias else 0) at one checkpoint.

    h: the tower's output with its head swapped for the identity (the head is its last step);
    u = h W (+ b) the embedding; delta = dL/du from autograd over the loss alone, exact per row
    because the gallery is held fixed. ``check``: compare u with the tower's own output on the
    queries first (a head that is not the last step would make the closed form wrong)."""
    embeddings, pooled = {}, {}
    for head in heads:
        weight = state["clip." + head.weight]
        width = weight.shape[1] if head.linear else weight.shape[0]
        identity = {**state, "clip." + head.weight: torch.eye(width, dtype=weight.dtype, device=weight.device)}
        if head.bias is not None:
            identity["clip." + head.bias] = torch.zeros(width, dtype=weight.dtype, device=weight.device)
        h = torch.cat([_encode(towers, identity, head.side, rows, side) for side in ("query", "bank")]).float()
        u = h @ (weight.float().T if head.linear else weight.float())
        if head.bias is not None:
            u = u + state["clip." + head.bias].float()
        if check:
            _, pixels, tokens = next(rows.chunks("query"))
            with torch.no_grad():
                own = functional_call(towers, state, (head.side, pixels if head.side == "image" else tokens)).float()
            tolerance = max(1e-4, 50 * torch.finfo(weight.dtype).eps) * float(own.abs().max())
            if not torch.allclose(u[: len(own)], own, rtol=0, atol=tolerance):
                raise NotImplementedError(f"the {head.side} projection {head.weight!r} is not the last step of its "
                                          "tower, so its closed form does not apply; pass parameters=[names]")
        pooled[head.side], embeddings[head.side] = h, u
    with torch.no_grad():
        scale = functional_call(towers, state, ("scale",)).float()
    queries = len(rows.query_tokens)
    gallery_images = F.normalize(embeddings["image"][queries : queries + gallery], dim=-1)
    gallery_texts = F.normalize(embeddings["text"][queries : queries + gallery], dim=-1)
    deltas: dict[str, list[torch.Tensor]] = {"image": [], "text": []}
    for start in range(0, len(excluded), rows.batch):  # chunks bound the (rows, gallery) logits
        part = slice(start, start + rows.batch)
        image = embeddings["image"][part].detach().requires_grad_(True)
        text = embeddings["text"][part].detach().requires_grad_(True)
        with torch.enable_grad():
            total = _pair_loss(image, text, gallery_images, gallery_texts, excluded[part], scale, loss).sum()
            d_image, d_text = torch.autograd.grad(total, (image, text))
        deltas["image"].append(d_image)
        deltas["text"].append(d_text)
    return [(pooled[head.side], torch.cat(deltas[head.side]), float(head.bias is not None)) for head in heads], scale


def _closed_form(
    towers: _Towers, state: dict, heads: list[_Head], rows: _Rows, gallery: int, excluded: torch.Tensor, loss: str,
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, N) gradient dot products and (Q+N,) squared norms over the heads at one checkpoint."""
    factors, _ = _head_factors(towers, state, heads, rows, gallery, excluded, loss, check)
    queries = len(rows.query_tokens)
    dots = torch.zeros(queries, len(excluded) - queries, device=excluded.device)
    norms = torch.zeros(len(excluded), device=excluded.device)
    for h, delta, bias in factors:
        # per-example gradient = outer(h, delta) (+ delta for the bias): <g_a, g_b> factorises
        dots += (h[:queries] @ h[queries:].T + bias) * (delta[:queries] @ delta[queries:].T)
        norms += ((h * h).sum(dim=1) + bias) * (delta * delta).sum(dim=1)
    return dots, norms


# -- the general path: per-example gradients with torch.func -----------------------------------------------------
def _general(
    towers: _Towers, state: dict, chosen: list[str], rows: _Rows, gallery: int, excluded: torch.Tensor, loss: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, N) dot products and (Q+N,) squared norms of flattened per-example gradients."""
    names = ["clip." + name for name in chosen]
    trained = {name: state[name] for name in names}
    frozen = {name: value for name, value in state.items() if name not in trained}
    with torch.no_grad():
        scale = functional_call(towers, state, ("scale",)).float()
        gallery_rows = _Rows(rows.model, rows.query_pixels[:0], rows.query_tokens.select([]),
                             rows.bank_images[:gallery], rows.bank_tokens.select(list(range(gallery))), rows.batch)
        gallery_images = F.normalize(_encode(towers, state, "image", gallery_rows, "bank").float(), dim=-1)
        gallery_texts = F.normalize(_encode(towers, state, "text", gallery_rows, "bank").float(), dim=-1)
    # A batched attention mask would hit transformers' data-dependent mask checks under vmap. CLIP's
    # text tower is causal and pools at EOS, which never attends to the padding after it, so an
    # unbatched all-ones mask gives the same embedding (open_clip ignores the mask altogether).
    ones = torch.ones_like(rows.bank_tokens.attention_mask[:1])

    def example_loss(weights: dict, pixels: torch.Tensor, ids: torch.Tensor, eos: torch.Tensor,
                     skip: torch.Tensor) -> torch.Tensor:
        full = {**frozen, **weights}
        image = functional_call(towers, full, ("image", pixels[None]))
        text = functional_call(towers, full, ("text", TextTokens(ids[None], ones, eos[None])))
        return _pair_loss(image, text, gallery_images, gallery_texts, skip[None], scale, loss)[0]

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0, 0, 0))

    def gradients(side: str, offset: int) -> Iterator[tuple[slice, torch.Tensor]]:
        for part, pixels, tokens in rows.chunks(side):
            skip = excluded[offset + part.start : offset + part.stop]
            g = per_example(trained, pixels, tokens.ids, tokens.eos_index, skip)
            yield part, torch.cat([g[name].reshape(len(skip), -1).float() for name in names], dim=1)

    queries = len(rows.query_tokens)
    # Unfused attention: the fused kernels have no vmap rule (torch would loop over the examples).
    with sdpa_kernel(SDPBackend.MATH), _unfused_multihead_attention():
        query_gradients = torch.cat([g for _, g in gradients("query", 0)])
        dots = torch.zeros(queries, len(excluded) - queries, device=excluded.device)
        norms = torch.zeros(len(excluded), device=excluded.device)
        norms[:queries] = (query_gradients * query_gradients).sum(dim=1)
        for part, g in gradients("bank", queries):
            dots[:, part] = query_gradients @ g.T
            norms[queries + part.start : queries + part.stop] = (g * g).sum(dim=1)
    return dots, norms


@register_tool("tracin", level="data", granularity="attribution", family="training-data attribution",
               reference="Pruthi et al., NeurIPS 2020 (TracIn-CP); SPEC §5")
def tracin(
    model: ClipAdapter,
    bank: Bank,
    images: Any,
    texts: TextLike,
    *,
    checkpoints: Sequence[Checkpoint] | None = None,
    parameters: str | Sequence[str] = "projections",
    loss: Loss = "contrastive",
    gallery: int | None = None,
    k: int = 5,
    batch_size: int = 64,
) -> TracIn:
    """TracIn-CP influence of every pair of ``bank`` on each query pair ``(images, texts)``.

    ``bank``: a :class:`~mmelkit.methods.data.attribution.TrainingBank` or a list of (image,
    caption) pairs. ``images`` / ``texts``: the Q query pairs (N and N, or one side repeated).
    ``checkpoints``: (model, ClipAdapter or state_dict; lr) pairs, default ``[(model, 1.0)]``.
    ``parameters``: ``"projections"`` (closed form, cheap) or parameter names / prefixes of
    ``model.model`` (per-example gradients via torch.func; memory grows with ``batch_size`` times
    the number of weights). ``loss``: ``"contrastive"`` or ``"cosine"`` (see the module
    docstring). ``gallery``: how many leading bank pairs are the contrastive loss's fixed
    negatives (default all). ``k``: proponents and opponents per query. ``batch_size``: pairs per
    forward pass (results do not depend on it).
    """
    loss = choice("loss", loss, ("contrastive", "cosine"))  # type: ignore[assignment]
    batch_size = positive_int("batch_size", batch_size)
    k = positive_int("k", k)
    bank_images, captions = _bank_pairs(bank)
    count = len(captions)
    if k > count:
        raise ValueError(f"k must lie in 1..{count} (the bank's size); got {k}")
    gallery = count if gallery is None else positive_int("gallery", gallery)
    if gallery > count:
        raise ValueError(f"gallery must lie in 1..{count} (the bank's size); got {gallery}")
    refuse_active_dropout(model.model, "TracIn's gradients would be random")
    chosen, heads = _select_parameters(model, parameters)
    states = _checkpoint_states(model, checkpoints)
    query_pixels, query_tokens = pair_inputs(model, images, texts)
    bank_tokens = model.tokenize(captions)
    query_ids, bank_ids = _caption_ids(query_tokens, bank_tokens)
    excluded = torch.cat([query_ids, bank_ids])[:, None] == bank_ids[None, :gallery]  # (Q+N, gallery)
    rows = _Rows(model, query_pixels, query_tokens, bank_images, bank_tokens, batch_size)
    towers = _Towers(model)
    queries = len(query_tokens)
    influence = torch.zeros(queries, count, device=model.device)
    self_influence = torch.zeros(queries + count, device=model.device)
    for i, (state, lr) in enumerate(states):
        if heads is not None:
            dots, norms = _closed_form(towers, state, heads, rows, gallery, excluded, loss, check=i == 0)
        else:
            dots, norms = _general(towers, state, chosen, rows, gallery, excluded, loss)
        influence += lr * dots
        self_influence += lr * norms
    proponent_scores, proponents = influence.topk(k, dim=1)
    negated, opponents = (-influence).topk(k, dim=1)
    return TracIn(
        influence, proponents, proponent_scores, [[captions[j] for j in row] for row in proponents.tolist()],
        opponents, -negated, [[captions[j] for j in row] for row in opponents.tolist()],
        self_influence[:queries], self_influence[queries:], chosen, loss, query_tokens.texts,
    )
