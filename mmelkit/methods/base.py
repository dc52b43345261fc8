"""What every explanation method shares: input pairing, the result type and the registry.

A method is a class with taxonomy metadata (where it sits in the survey's taxonomy) and an
``explain(images, texts)`` that returns an :class:`Explanation`. Inputs are paired three ways:
N images with N texts (pairs), one image with N texts, or N images with one text; anything else
is an error, never a silent truncation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from mmelkit._checks import choice, did_you_mean
from mmelkit._checks import positive_int as positive_int  # re-exported: it lived here before _checks
from mmelkit.models.adapter import ClipAdapter, TextLike
from mmelkit.models.backend import TextTokens

Level = Literal["data", "model", "training", "inference"]
Granularity = Literal["token", "embedding", "neuron", "layer", "architecture", "input", "attribution", "rationale"]


@dataclass
class Explanation:
    """Maps over the patch grid, on the model's device.

    ``maps`` (N, h, w) non-negative, each normalised to [0, 1] (all-zero maps stay zero);
    ``image_size`` the (H, W) of the model input they explain; ``method`` and ``params`` say how
    they were made. ``upsample()`` brings them to the image.
    """

    maps: torch.Tensor
    image_size: tuple[int, int]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    texts: list[str] | None = None

    def __len__(self) -> int:
        return self.maps.shape[0]

    def upsample(self, size: tuple[int, int] | None = None, mode: str = "bilinear") -> torch.Tensor:
        """Maps resized to ``size`` (default: the model input's size), shape (N, H, W)."""
        size = size or self.image_size
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        return F.interpolate(self.maps[:, None].float(), size=size, mode=mode, **kwargs)[:, 0]


def normalise_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max each map of (N, ...) to [0, 1]; constant maps become zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(eps)).view_as(maps)


def minmax_over(values: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Min-max along one dimension, with ``eps`` in the denominator (Grad-ECLIP's loosened attention)."""
    low = values.min(dim=dim, keepdim=True).values
    high = values.max(dim=dim, keepdim=True).values
    return (values - low) / (high - low + eps)


def pair_inputs(model: ClipAdapter, images: Any, texts: TextLike) -> tuple[torch.Tensor, TextTokens]:
    """Model input for N image-text pairs: N and N, 1 and N, or N and 1 (the single side repeated)."""
    pixels = model.as_pixels(images)
    tokens = model.as_tokens(texts)
    n_images, n_texts = len(pixels), len(tokens)
    if n_images == n_texts:
        return pixels, tokens
    if n_images == 1:
        return pixels.expand(n_texts, -1, -1, -1), tokens
    if n_texts == 1:
        return pixels, tokens.select([0] * n_images)
    raise ValueError(
        f"got {n_images} images and {n_texts} texts: pass pairs (as many of each), one image with many "
        "texts, or many images with one text"
    )


class Method:
    """Base class: taxonomy metadata as class attributes, parameters as keyword arguments."""

    name: ClassVar[str]
    level: ClassVar[Level] = "model"
    granularity: ClassVar[Granularity] = "token"
    family: ClassVar[str]  # "gradient", "attention", "perturbation", "value path", ...
    modality: ClassVar[Literal["image", "text"]] = "image"
    explains: ClassVar[str] = "clip"  # the kind of model: "clip" (dual encoders) or "vlm" (generative)
    reference: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: ClipAdapter, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            hints = "".join(did_you_mean(name, self.defaults) for name in unknown)
            raise TypeError(f"{self.name} has no parameter(s) {unknown};{hints} parameters: {sorted(self.defaults)}")
        self.model = model
        self.params = {**self.defaults, **params}

    def explain(self, images: Any, texts: TextLike) -> Explanation:
        raise NotImplementedError


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method known to :func:`get_method` and ``list_methods``."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Tool:
    """A registered analysis tool that is not a map over one image: a layer probe, a neuron labeller,
    a decomposition. Listed by ``list_methods()`` beside the map methods, with its taxonomy place."""

    name: str
    function: Callable[..., Any]
    level: Level
    granularity: Granularity
    family: str
    explains: str
    reference: str

    @property
    def defaults(self) -> dict[str, Any]:
        """The tool's keyword parameters and their defaults (what ``list_methods`` shows)."""
        import inspect

        return {
            name: p.default
            for name, p in inspect.signature(self.function).parameters.items()
            if p.default is not inspect.Parameter.empty
        }


TOOLS: dict[str, Tool] = {}


def register_tool(
    name: str, *, level: Level, granularity: Granularity, family: str, explains: str = "clip", reference: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Function decorator: list a tool in ``list_methods`` (its name must not clash with a method's)."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        if name in TOOLS or name in REGISTRY:
            raise ValueError(f"{name!r} is registered twice")
        TOOLS[name] = Tool(name, function, level, granularity, family, explains, reference)
        return function

    return decorate


def image_methods(explains: str = "clip") -> list[str]:
    """The registered methods that map the image side of a model kind (``"clip"`` or ``"vlm"``),
    sorted: what "all methods" means for a bench, a sanity check or a benchmark of that kind."""
    return sorted(name for name, cls in REGISTRY.items() if cls.modality == "image" and cls.explains == explains)


def get_method(name: str) -> type[Method]:
    """The registered method class called ``name``; a ValueError suggests the closest names."""
    return REGISTRY[choice("method", name, sorted(REGISTRY))]


def text_features(model: ClipAdapter, tokens: TextTokens) -> torch.Tensor:
    """Unit text embeddings without a graph (image-side methods differentiate the image side only)."""
    with torch.no_grad():
        return model.encode_text(tokens)


ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def paired_cosine(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """cos(f_I, f_T) per pair; ``image_features`` unnormalised, ``text_features`` unit length."""
    return (F.normalize(image_features, dim=-1) * text_features).sum(dim=-1)


# -- text side --------------------------------------------------------------------------------------
# CLIP's BPE (open_clip's SimpleTokenizer and Hugging Face's CLIPTokenizer alike) closes every word
# with "</w>"; SentencePiece and GPT-2 style vocabularies mark a word's first piece instead.
END_OF_WORD = "</w>"
_START_OF_WORD = ("\u2581", "\u0120")  # SentencePiece's "▁", GPT-2's "Ġ"
_START_OF_TEXT = frozenset({"<start_of_text>", "<|startoftext|>", "<s>", "[CLS]"})


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Character -> byte of the table byte-level BPE vocabularies use: printable Latin-1 bytes stand
    for themselves, the other bytes get the characters from U+0100 on, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table: dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(0x100 + shifted)] = byte
            shifted += 1
    return table


def readable_token(piece: str) -> str:
    """A vocabulary string made readable: byte-level characters decoded, ``</w>`` stripped."""
    piece = piece.removesuffix(END_OF_WORD)
    decoder = _byte_decoder()
    if piece and all(c in decoder for c in piece):
        piece = bytes(decoder[c] for c in piece).decode("utf-8", errors="replace")
    return piece.replace("\u2581", " ").strip() or piece


@dataclass
class TextLayout:
    """Which token positions of each text are explained, and how they group into words.

    ``pieces`` per text the vocabulary strings of positions 0..EOS (inclusive); ``content`` (N, L)
    bool on the tokens' device, True at the explained positions: the tokens strictly between
    start-of-text and end-of-text (padding and the special tokens are never explained);
    ``words`` per text the readable words; ``word_positions`` per text and word the positions of its
    BPE pieces.
    """

    pieces: list[list[str]]
    content: torch.Tensor
    words: list[list[str]]
    word_positions: list[list[list[int]]]


def _group_words(pieces: list[str], positions: list[int]) -> tuple[list[str], list[list[int]]]:
    words: list[str] = []
    groups: list[list[int]] = []
    current: list[int] = []

    def close() -> None:
        if current:
            groups.append(list(current))
            words.append(readable_token("".join(pieces[p].removesuffix(END_OF_WORD) for p in current)))
            current.clear()

    for position in positions:
        piece = pieces[position]
        if piece.startswith(_START_OF_WORD):
            close()
        current.append(position)
        if piece.endswith(END_OF_WORD):
            close()
    close()
    return words, groups


def text_layout(model: ClipAdapter, tokens: TextTokens) -> TextLayout:
    """The explained positions and the words of tokenised texts (see :class:`TextLayout`)."""
    strings = model.token_strings(tokens)
    eos = tokens.eos_index.tolist()
    mask = tokens.attention_mask.tolist()
    content = torch.zeros(tokens.ids.shape, dtype=torch.bool)
    pieces, words, word_positions = [], [], []
    for row, (row_strings, end, row_mask) in enumerate(zip(strings, eos, mask, strict=True)):
        start = 1 if row_strings and row_strings[0] in _START_OF_TEXT else 0
        positions = [j for j in range(start, end) if row_mask[j]]
        content[row, positions] = True
        row_words, row_groups = _group_words(row_strings, positions)
        pieces.append(row_strings[: end + 1])
        words.append(row_words)
        word_positions.append(row_groups)
    return TextLayout(pieces, content.to(tokens.ids.device), words, word_positions)


@dataclass
class TextExplanation:
    """Scores over the tokens of each text (the text side of a pair), on the model's device.

    ``scores`` (N, L): one score per token position, zero outside the explained tokens (the ones
    strictly between start- and end-of-text; see :class:`TextLayout`). Whether scores are signed or
    normalised depends on the method (its docstring says). ``tokens`` per pair the readable token
    strings of positions 0..EOS; ``word_strings`` / ``word_scores`` per pair the words and their
    scores, a word's score being the sum of its BPE pieces' scores; ``word_positions`` the pieces'
    positions. ``method``, ``params`` and ``texts`` say what was explained and how.
    """

    scores: torch.Tensor
    tokens: list[list[str]]
    word_strings: list[list[str]]
    word_scores: list[torch.Tensor]
    word_positions: list[list[list[int]]]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    texts: list[str] | None = None

    @classmethod
    def from_scores(
        cls, layout: TextLayout, scores: torch.Tensor, method: str, params: dict[str, Any], texts: list[str] | None
    ) -> TextExplanation:
        """Wrap token scores (N, L): zero them outside the explained tokens and sum words' pieces."""
        scores = torch.where(layout.content, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
        word_scores = []
        for row, groups in enumerate(layout.word_positions):
            if not groups:
                word_scores.append(scores.new_zeros(0))
                continue
            index = torch.tensor([w for w, group in enumerate(groups) for _ in group], device=scores.device)
            positions = torch.tensor([p for group in groups for p in group], device=scores.device)
            word_scores.append(scores.new_zeros(len(groups)).index_add_(0, index, scores[row, positions]))
        tokens = [[readable_token(piece) for piece in row] for row in layout.pieces]
        return cls(scores, tokens, layout.words, word_scores, layout.word_positions, method, params, texts)

    def __len__(self) -> int:
        return self.scores.shape[0]

    def words(self, n: int = 0) -> list[tuple[str, float]]:
        """Pair ``n``'s words with their scores, in text order."""
        return list(zip(self.word_strings[n], self.word_scores[n].tolist(), strict=True))

    def to_frame(self) -> Any:
        """A pandas DataFrame, one row per token position 0..EOS of each pair: pair, position, token,
        word (``None`` for start/end/padding tokens, which are not explained) and score."""
        import pandas as pd

        scores = self.scores.detach().float().cpu().tolist()
        rows = []
        for pair, tokens in enumerate(self.tokens):
            groups = self.word_positions[pair]
            word_of = {p: self.word_strings[pair][w] for w, group in enumerate(groups) for p in group}
            for position, token in enumerate(tokens):
                rows.append({"pair": pair, "position": position, "token": token, "word": word_of.get(position),
                             "score": scores[pair][position]})
        return pd.DataFrame(rows, columns=["pair", "position", "token", "word", "score"])
