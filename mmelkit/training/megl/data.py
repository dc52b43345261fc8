"""MEGL's data: (image, label, {mask or nothing, rationale}) triples from the shortcut task, as tensors.

:func:`build_split` draws a split of :class:`~mmelkit.datasets.shortcut.ShortcutTask` once into
tensors (images in [-1, 1], labels, masks with a ``has_mask`` flag, rationale token ids), so
training steps are index lookups. :func:`pseudo_masks` makes the textual supervision's A_T: a
Grad-ECLIP explanation, by the embedded scene-world CLIP, of each sample's rationale on its image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from mmelkit._checks import positive_int
from mmelkit.datasets.shortcut import ShortcutConfig, ShortcutTask, Split


class RationaleVocab:
    """A closed word vocabulary for rationales ("the large red star in the top left").

    Ids 0-3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; the words follow in a fixed order, so
    the ids depend only on the task's configuration."""

    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, words: Sequence[str]) -> None:
        unique = list(dict.fromkeys(words))
        self.words = list(self.SPECIALS) + [w for w in unique if w not in self.SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def for_task(cls, config: ShortcutConfig) -> RationaleVocab:
        template = ["the", "large", "in", "top", "bottom", "left", "right", "centre"]
        return cls(template + list(config.scene.colours) + list(config.scene.shapes))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, texts: Sequence[str], length: int) -> torch.Tensor:
        """(N, length + 2) ids: ``<bos>`` words ``<eos>`` then pads; longer texts are an error."""
        rows = torch.full((len(texts), length + 2), self.PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.index.get(w, self.UNK) for w in text.lower().split()]
            if len(ids) > length:
                raise ValueError(f"rationale {text!r} has {len(ids)} words; the limit is {length}")
            rows[i, : len(ids) + 2] = torch.tensor([self.BOS, *ids, self.EOS])
        return rows

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Texts of (N, L) ids, stopping at the first ``<eos>``, skipping ``<bos>``/``<pad>``."""
        texts = []
        for row in ids.tolist():
            words = []
            for i in row:
                if i == self.EOS:
                    break
                if i not in (self.PAD, self.BOS):
                    words.append(self.words[i] if 0 <= i < len(self.words) else "<unk>")
            texts.append(" ".join(words))
        return texts


MAX_RATIONALE_WORDS = 10


@dataclass
class MeglSplit:
    """One split as tensors. ``masks`` hold zeros where ``has_mask`` is False; ``true_masks`` are
    every target's mask (for evaluation only: training reads ``masks``). ``pseudo_masks`` exist
    once :func:`attach_pseudo_masks` ran."""

    images: torch.Tensor  # (N, 3, H, W) float in [-1, 1]
    labels: torch.Tensor  # (N,) long
    masks: torch.Tensor  # (N, H, W) float, zeros where withheld
    has_mask: torch.Tensor  # (N,) bool
    true_masks: torch.Tensor  # (N, H, W) bool
    cue_classes: torch.Tensor  # (N,) long: the class the shortcut cue points to
    cue_masks: torch.Tensor  # (N, H, W) bool: the patch (all False for a tint cue)
    tokens: torch.Tensor  # (N, MAX_RATIONALE_WORDS + 2) long
    rationales: list[str]
    raw_images: np.ndarray  # (N, H, W, 3) uint8, for CLIP and for plots
    pseudo_masks: torch.Tensor | None = None  # (N, H, W) float in [0, 1]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> MeglSplit:
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return MeglSplit(**moved)

    def take(self, index: torch.Tensor, host_fields: bool = True) -> MeglSplit:
        """The rows ``index`` (a long tensor) of every field. ``host_fields=False`` (the training
        step) leaves the host-side ``raw_images`` and ``rationales`` empty, so a batch on the GPU
        never waits for its indices to come back to the host."""
        picked: dict[str, Any] = {}
        if not host_fields:
            picked.update(raw_images=self.raw_images[:0], rationales=[])
        host = index.cpu().numpy() if host_fields else None
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in picked:
                continue
            if isinstance(value, torch.Tensor):
                picked[f.name] = value[index.to(value.device)]
            elif isinstance(value, np.ndarray):
                picked[f.name] = value[host]
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in host.tolist()]  # type: ignore[union-attr]
            else:
                picked[f.name] = value
        return replace(self, **picked)


def build_split(config: ShortcutConfig, split: Split, size: int, seed: int = 0) -> MeglSplit:
    """Draw samples 0..size-1 of ``ShortcutTask(config, split, seed)`` into tensors (on the CPU)."""
    size = positive_int("size", size)
    task = ShortcutTask(config, split, seed, size)
    samples = [task[i] for i in range(size)]
    raw = np.stack([s.scene.image for s in samples])
    height, width = raw.shape[1:3]
    cue_masks = np.zeros((size, height, width), bool)
    for i, s in enumerate(samples):
        if s.cue_box is not None:
            x1, y1, x2, y2 = s.cue_box
            cue_masks[i, y1:y2, x1:x2] = True
    true_masks = torch.from_numpy(np.stack([s.scene.masks[s.target] for s in samples]))
    has_mask = torch.tensor([s.has_mask for s in samples])
    vocab = RationaleVocab.for_task(config)
    return MeglSplit(
        images=torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 127.5 - 1.0,
        labels=torch.tensor([s.label for s in samples]),
        masks=true_masks.float() * has_mask[:, None, None],
        has_mask=has_mask,
        true_masks=true_masks,
        cue_classes=torch.tensor([s.tint_class for s in samples]),
        cue_masks=torch.from_numpy(cue_masks),
        tokens=vocab.encode([s.rationale for s in samples], MAX_RATIONALE_WORDS),
        rationales=[s.rationale for s in samples],
        raw_images=raw,
    )


def pseudo_masks(clip: Any, images: Sequence[np.ndarray] | np.ndarray, rationales: Sequence[str],
                 size: tuple[int, int], batch_size: int = 128) -> torch.Tensor:
    """A_T: Grad-ECLIP maps of ``clip`` (a ClipAdapter) for each (image, rationale) pair, upsampled
    to ``size`` and clamped to [0, 1] (the maps are min-max normalised before upsampling, so a
    maximum can end slightly below 1); (N, H, W) on the CLIP's device."""
    from mmelkit.methods import explain

    if len(images) != len(rationales):
        raise ValueError(f"{len(images)} images but {len(rationales)} rationales")
    positive_int("batch_size", batch_size)
    maps = []
    for start in range(0, len(images), batch_size):
        chunk = [np.asarray(image) for image in images[start : start + batch_size]]
        explanation = explain(clip, chunk, list(rationales[start : start + batch_size]), method="grad_eclip")
        maps.append(explanation.upsample(size))
    return torch.cat(maps).clamp(0.0, 1.0)


def attach_pseudo_masks(split: MeglSplit, clip: Any, batch_size: int = 128) -> MeglSplit:
    """The split with ``pseudo_masks`` for its samples without a mask (zeros elsewhere: unused)."""
    missing = (~split.has_mask).nonzero().flatten()
    result = torch.zeros(split.masks.shape, dtype=torch.float32)
    if len(missing):
        made = pseudo_masks(clip, split.raw_images[missing.numpy()], [split.rationales[i] for i in missing.tolist()],
                            tuple(split.masks.shape[-2:]), batch_size)
        result[missing] = made.float().cpu()
    return replace(split, pseudo_masks=result)

