"""A classification task on the scene world with a controllable shortcut, for training-level XAI.

Each sample shows one *large* target object and a few small distractors; the label is the target's
shape. Ground truth for "the right reason" is the target's mask. Two knobs model real-world data
problems:

* ``spurious``: the probability that the background tint is the tint of the sample's class (else
  the tint of another class, chosen at random). At 1.0 the tint alone predicts the label, a
  shortcut a model can learn instead of shapes; the ``"debiased"`` split draws the tint
  independently of the class (probability ``1 / num_classes`` of agreeing), so a model that learnt
  the shortcut fails there.
* ``mask_fraction``: the share of samples that keep their target mask; the rest have ``mask=None``
  (incomplete annotation, as in real explanation-guided datasets).

Every sample also carries a textual rationale naming the evidence and where it is
("the large red star in the top left").
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mmelkit.datasets.scenes import SHAPES, Scene, SceneConfig, SceneWorld

Split = Literal["train", "test", "debiased"]
_SPLIT_OFFSET = {"train": 0, "test": 1, "debiased": 2}


def _default_scene() -> SceneConfig:
    return SceneConfig(min_objects=1, max_objects=3, sizes=(("small", 11), ("large", 24)), max_overlap=0.05)


@dataclass(frozen=True)
class ShortcutConfig:
    classes: tuple[str, ...] = ("circle", "square", "triangle", "star")
    spurious: float = 0.9
    mask_fraction: float = 1.0
    tint_strength: int = 24  # how far (per channel) a class tint moves the background colour
    distractors: tuple[int, int] = (0, 2)  # fewest and most small distractor objects
    scene: SceneConfig = field(default_factory=_default_scene)

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown or len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be two or more distinct shapes from {list(SHAPES)}; got {self.classes}")
        for name in ("spurious", "mask_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability and must lie in [0, 1]; got {value}")
        if not 0 <= self.tint_strength <= 30:
            raise ValueError("tint_strength must lie in [0, 30]")
        low, high = self.distractors
        if not 0 <= low <= high <= 8:
            raise ValueError("distractors must be (low, high) with 0 <= low <= high <= 8")

    def class_tints(self) -> list[tuple[int, int, int]]:
        """One background tint per class: evenly spaced hues, scaled to ``tint_strength``."""
        tints = []
        for k in range(len(self.classes)):
            r, g, b = colorsys.hsv_to_rgb(k / len(self.classes), 1.0, 1.0)
            centred = np.array([r, g, b]) - np.mean([r, g, b])
            scaled = centred / (np.abs(centred).max() or 1.0) * self.tint_strength
            tints.append(tuple(int(round(v)) for v in scaled))
        return tints


@dataclass
class ShortcutSample:
    scene: Scene
    label: int
    class_name: str
    mask: np.ndarray | None  # (H, W) bool mask of the target, or None when withheld
    rationale: str
    tint_class: int  # the class whose tint the background carries
    target: int = 0  # index of the target in scene.objects

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    @property
    def shortcut_agrees(self) -> bool:
        return self.tint_class == self.label


def where(center: tuple[float, float], size: int) -> str:
    """Coarse position words for a point: "top left", "centre", "bottom", ..."""
    x, y = center
    col = "left" if x < size / 3 else ("right" if x > 2 * size / 3 else "")
    row = "top" if y < size / 3 else ("bottom" if y > 2 * size / 3 else "")
    return " ".join(part for part in (row, col) if part) or "centre"


class ShortcutTask:
    """``ShortcutTask(config, "train")[i]`` -> :class:`ShortcutSample`, deterministic per (seed, split, i)."""

    def __init__(self, config: ShortcutConfig | None = None, split: Split = "train", seed: int = 0, length: int = 2000):
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be one of {list(_SPLIT_OFFSET)}; got {split!r}")
        self.config = config or ShortcutConfig()
        self.split = split
        self.length = length
        self.world = SceneWorld(self.config.scene, seed=seed * 3 + _SPLIT_OFFSET[split], length=length)
        self._tints = self.config.class_tints()
        self.agreement = 1.0 / len(self.config.classes) if split == "debiased" else self.config.spurious

    @property
    def num_classes(self) -> int:
        return len(self.config.classes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ShortcutSample:
        cfg = self.config
        rng = np.random.default_rng([self.world.seed, int(index), 11])
        label = int(rng.integers(0, self.num_classes))
        if rng.random() < self.agreement:
            tint_class = label
        else:
            others = [k for k in range(self.num_classes) if k != label]
            tint_class = others[int(rng.integers(0, len(others)))]
        scene_cfg = cfg.scene
        colours = scene_cfg.colours
        (large_name, large_px), (small_name, small_px) = scene_cfg.sizes[-1], scene_cfg.sizes[0]
        objects = [(cfg.classes[label], colours[int(rng.integers(0, len(colours)))], (large_name, large_px))]
        other_shapes = [s for s in scene_cfg.shapes if s != cfg.classes[label]]
        for _ in range(int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))):
            objects.append((other_shapes[int(rng.integers(0, len(other_shapes)))],
                            colours[int(rng.integers(0, len(colours)))], (small_name, small_px)))
        scene = self.world.draw(index, rng, objects=objects, tint=self._tints[tint_class])
        target = scene.objects[0]
        keep_mask = rng.random() < cfg.mask_fraction
        return ShortcutSample(
            scene=scene,
            label=label,
            class_name=cfg.classes[label],
            mask=scene.masks[0] if keep_mask else None,
            rationale=f"the large {target.colour} {target.shape} in the {where(target.center, scene_cfg.image_size)}",
            tint_class=tint_class,
        )
