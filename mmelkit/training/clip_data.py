"""Image-caption pairs from the scene world for contrastive training.

Each scene contributes its image, the set of colour-shape codes it contains, and one caption drawn
(deterministically from the scene index) from the configured templates. A caption names one or two
objects; it is a positive for *every* image in a batch that holds all the objects it names, which is
why the loss is multi-positive (plain one-hot InfoNCE would punish those true matches).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from mmelkit.datasets.scenes import SceneConfig, SceneWorld


@dataclass(frozen=True)
class CaptionMix:
    """Probabilities of the caption templates used for training."""

    object: float = 0.5  # "a red circle"
    pair: float = 0.5  # "a red circle and a blue square"

    def __post_init__(self) -> None:
        if self.object < 0 or self.pair < 0 or self.object + self.pair <= 0:
            raise ValueError(f"caption weights must be non-negative and not both zero; got {self}")

    def choose(self, rng: np.random.Generator, num_objects: int) -> str:
        if num_objects < 2:
            return "object"
        return "object" if rng.random() < self.object / (self.object + self.pair) else "pair"


class SceneCaptionPairs(Dataset):
    """``pairs[i]`` -> (image uint8 (3, H, W), codes multi-hot (S*C,), caption, caption codes (2,)).

    Codes number the colour-shape pairs as ``shape_index * len(colours) + colour_index``; a one-object
    caption repeats its code in both slots.
    """

    def __init__(self, world: SceneWorld, mix: CaptionMix | None = None, length: int | None = None) -> None:
        self.world = world
        self.mix = mix or CaptionMix()
        self.length = length if length is not None else len(world)
        cfg = world.config
        self._shape_index = {s: i for i, s in enumerate(cfg.shapes)}
        self._colour_index = {c: i for i, c in enumerate(cfg.colours)}
        self.num_codes = len(cfg.shapes) * len(cfg.colours)

    def __len__(self) -> int:
        return self.length

    def code(self, shape: str, colour: str) -> int:
        return self._shape_index[shape] * len(self._colour_index) + self._colour_index[colour]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, torch.Tensor]:
        scene = self.world[index]
        codes = torch.zeros(self.num_codes, dtype=torch.bool)
        object_codes = [self.code(o.shape, o.colour) for o in scene.objects]
        codes[object_codes] = True
        rng = np.random.default_rng([self.world.seed, index, 7])
        kind = self.mix.choose(rng, len(scene.objects))
        if kind == "object":
            k = int(rng.integers(0, len(scene.objects)))
            named = (k, k)
            text = f"a {scene.objects[k].name}"
        else:
            i, j = (int(x) for x in rng.choice(len(scene.objects), size=2, replace=False))
            named = (i, j)
            text = f"a {scene.objects[i].name} and a {scene.objects[j].name}"
        caption_codes = torch.tensor([object_codes[named[0]], object_codes[named[1]]])
        image = torch.from_numpy(scene.image).permute(2, 0, 1).contiguous()
        return image, codes, text, caption_codes


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, str, torch.Tensor]]) -> dict[str, object]:
    images, codes, texts, caption_codes = zip(*batch, strict=True)
    return {
        "images": torch.stack(images),
        "codes": torch.stack(codes),
        "texts": list(texts),
        "caption_codes": torch.stack(caption_codes),
    }


def default_world(seed: int, image_size: int = 64) -> SceneWorld:
    """The training distribution of the embedded model: 1 to 4 objects, 6 shapes x 8 colours."""
    return SceneWorld(SceneConfig(image_size=image_size, min_objects=1, max_objects=4), seed=seed, length=10**9)
