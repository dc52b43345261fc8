"""A classification task on the scene world with a controllable shortcut, for training-level XAI.

Each sample shows one *large* target object and a few small distractors; the label is the target's
shape. Ground truth for "the right reason" is the target's mask. Two knobs model real-world data
problems:

* ``spurious``: the probability that the shortcut cue is the cue of the sample's class (else the
  cue of another class, chosen at random). The cue (``cue``) is either a background ``"tint"``
  (diffuse: everywhere, right up to the object's edge) or a ``"patch"``, a small square of the
  class's colour in a corner away from the target (local: a watermark, the "Clever Hans" case). At 1.0 the tint alone predicts the label, a
  shortcut a model can learn instead of shapes; the ``"debiased"`` split draws the cue
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
from typing import Literal, cast

import numpy as np

from mmelkit._checks import did_you_mean
from mmelkit.datasets.scenes import SHAPES, Scene, SceneConfig, SceneWorld

Split = Literal["train", "test", "debiased"]
Cue = Literal["tint", "patch"]
_SPLIT_OFFSET = {"train": 0, "test": 1, "debiased": 2}


def _default_scene() -> SceneConfig:
    return SceneConfig(min_objects=1, max_objects=3, sizes=(("small", 11), ("large", 24)), max_overlap=0.05)


@dataclass(frozen=True)
class ShortcutConfig:
    classes: tuple[str, ...] = ("circle", "square", "triangle", "star")
    spurious: float = 0.9
    mask_fraction: float = 1.0
    tint_strength: int = 24  # how far (per channel) a class tint moves the background colour
    cue: Cue = "tint"  # the shortcut: a background "tint" or a corner "patch" of the class's colour
    patch_fraction: float = 0.125  # the patch's side as a share of the image side
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
        if self.cue not in ("tint", "patch"):
            raise ValueError(f"cue must be 'tint' or 'patch'; got {self.cue!r}")
        if not 0.0 < self.patch_fraction <= 0.25:
            raise ValueError(f"patch_fraction must lie in (0, 0.25]; got {self.patch_fraction}")
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

    def class_patch_colours(self) -> list[tuple[int, int, int]]:
        """One saturated colour per class (evenly spaced hues) for the ``"patch"`` cue."""
        return [cast(tuple[int, int, int], tuple(int(round(255 * v)) for v in colorsys.hsv_to_rgb(k / len(self.classes), 1.0, 1.0)))
                for k in range(len(self.classes))]


@dataclass
class ShortcutSample:
    scene: Scene
    label: int
    class_name: str
    mask: np.ndarray | None  # (H, W) bool mask of the target, or None when withheld
    rationale: str
    tint_class: int  # the class whose cue (tint or patch) the image carries
    target: int = 0  # index of the target in scene.objects
    cue_box: tuple[int, int, int, int] | None = None  # the patch (x1, y1, x2, y2), exclusive; None for a tint

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
            raise ValueError(f"split must be one of {list(_SPLIT_OFFSET)}; got {split!r}." + did_you_mean(split, _SPLIT_OFFSET))
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
        tint = self._tints[tint_class] if cfg.cue == "tint" else None  # None: the world's own random tint
        scene = self.world.draw(index, rng, objects=objects, tint=tint)
        target = scene.objects[0]
        keep_mask = rng.random() < cfg.mask_fraction
        cue_box = self._paint_patch(scene, tint_class, rng) if cfg.cue == "patch" else None
        return ShortcutSample(
            scene=scene,
            label=label,
            class_name=cfg.classes[label],
            mask=scene.masks[0] if keep_mask else None,
            rationale=f"the large {target.colour} {target.shape} in the {where(target.center, scene_cfg.image_size)}",
            tint_class=tint_class,
            cue_box=cue_box,
        )

    def _paint_patch(self, scene: Scene, cue_class: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Paint the class patch into a corner (in random order) clear of the target; where every
        corner touches it, the least-touching one, and the covered pixels leave the masks."""
        size = self.config.scene.image_size
        side = max(2, round(self.config.patch_fraction * size))
        corners = [(1, 1), (size - side - 1, 1), (1, size - side - 1), (size - side - 1, size - side - 1)]
        boxes = [(x, y, x + side, y + side) for x, y in (corners[int(k)] for k in rng.permutation(4))]
        overlap = [int(scene.masks[0][y1:y2, x1:x2].sum()) for x1, y1, x2, y2 in boxes]
        x1, y1, x2, y2 = boxes[int(np.argmin(overlap))]  # the first clear corner, if any
        scene.image[y1:y2, x1:x2] = self.config.class_patch_colours()[cue_class]
        scene.masks[:, y1:y2, x1:x2] = False
        return (x1, y1, x2, y2)
