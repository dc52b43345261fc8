"""Benchmark datasets: image-text pairs with the mask of what each text refers to.

A dataset spec is a short string:

* ``scenes`` or ``scenes:MIN-MAX`` or ``scenes:K`` — the scene world at the model's input size with
  that many objects (default 1-4); each scene is paired with one object caption ("a red circle")
  drawn with the seed; candidate texts (for confidence): every colour-shape caption. Scenes come
  from the stream ``BENCH_SCENE_SEED + seed``, far from the small seeds training runs use, so the
  embedded model never saw them;
* ``photos`` — the real photographs shipped with scikit-image, one sample per annotated object;
  candidates: all their captions;
* ``coco:ROOT`` — a local COCO val2017 copy: each image with one category present ("a photo of a
  dog") and the union of that category's instance masks; candidates: the 80 category prompts;
* ``coco-captions:ROOT`` — the same images with their first human caption, which refers to every
  annotated instance (the retrieval protocol's usual setting); candidates: the gallery's captions.

Masks are brought to the model's input the way images are (resize the shorter side, centre crop)
and thresholded at one half.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmelkit._checks import did_you_mean, positive_int
from mmelkit.models.adapter import ClipAdapter
from mmelkit.models.images import resize_and_center_crop

BENCH_SCENE_SEED = 4_000_037  # scene streams of the benchmark: no training run uses these seeds


@dataclass
class BenchData:
    """``images`` raw (H, W, 3) uint8; ``texts`` one per image; ``masks`` (N, H, W) bool at the
    model's input size; ``objects`` objects per image; ``candidates`` the texts confidence is
    computed over; ``ids`` a stable id per sample."""

    name: str
    images: list[np.ndarray]
    texts: list[str]
    masks: torch.Tensor
    objects: list[int]
    candidates: list[str]
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def parse_objects(text: str) -> tuple[int, int]:
    """``"3"`` -> (3, 3); ``"1-4"`` -> (1, 4)."""
    try:
        parts = [int(p) for p in text.split("-")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1] <= 16:
        raise ValueError(f"object counts must look like K or MIN-MAX with 1 <= MIN <= MAX <= 16; got {text!r}")
    return parts[0], parts[1]


COCO_SPLIT = "val2017"


def check_dataset(spec: str) -> str:
    """``spec`` if it names a dataset :func:`load_bench_data` can load, else a ValueError saying why
    (unknown kind, bad object counts, a COCO folder that is missing or lacks val2017). Cheap: reads
    no images, so a config can be checked before anything runs."""
    if not isinstance(spec, str):
        raise ValueError(f"a dataset is a string like 'scenes' or 'coco:ROOT'; got {spec!r}")
    kind, _, argument = spec.partition(":")
    if kind == "scenes":
        if argument:
            parse_objects(argument)
        return spec
    if kind == "photos":
        if argument:
            raise ValueError(f"photos takes no argument; got {spec!r}")
        return spec
    if kind in ("coco", "coco-captions"):
        if not argument:
            raise ValueError(f"{kind} needs a folder: {kind}:/path/to/coco")
        root = Path(argument).expanduser()
        needed = [root / COCO_SPLIT, root / "annotations" / f"instances_{COCO_SPLIT}.json",
                  root / "annotations" / f"captions_{COCO_SPLIT}.json"]
        missing = [str(path) for path in needed if not path.exists()]
        if missing:
            raise ValueError(f"{spec}: {', '.join(missing)} missing; expected ROOT/{COCO_SPLIT}/ and "
                             f"ROOT/annotations/{{instances,captions}}_{COCO_SPLIT}.json (a local COCO copy)")
        return spec
    raise ValueError(f"unknown dataset {spec!r};{did_you_mean(kind, ('scenes', 'photos', 'coco', 'coco-captions'))} "
                     "datasets: scenes[:MIN-MAX], photos, coco:ROOT, coco-captions:ROOT")


def load_bench_data(spec: str, model: ClipAdapter, samples: int, seed: int = 0) -> BenchData:
    """The first ``samples`` pairs of the dataset ``spec`` (see the module docstring)."""
    positive_int("samples", samples)
    check_dataset(spec)
    kind, _, argument = spec.partition(":")
    if kind == "scenes":
        return _scenes(spec, model, samples, seed, parse_objects(argument) if argument else (1, 4))
    if kind == "photos":
        return _photos(spec, model, samples)
    return _coco(spec, model, samples, seed, str(Path(argument).expanduser()), human=kind == "coco-captions")


def _scenes(spec: str, model: ClipAdapter, samples: int, seed: int, objects: tuple[int, int]) -> BenchData:
    from mmelkit.datasets.scenes import SceneConfig, SceneWorld

    config = SceneConfig(min_objects=objects[0], max_objects=objects[1]).scaled(model.image_size[0])
    world = SceneWorld(config, seed=BENCH_SCENE_SEED + seed, length=max(samples, 1))
    rng = np.random.default_rng([seed, 1])
    images, texts, masks, counts, ids = [], [], [], [], []
    for index in range(samples):
        scene = world[index]
        caption = scene.captions_of("object")[int(rng.integers(0, len(scene.objects)))]
        images.append(scene.image)
        texts.append(caption.text)
        masks.append(scene.mask_of(caption))
        counts.append(len(scene.objects))
        ids.append(f"scene-{index}")
    candidates = [f"a {colour} {shape}" for colour in config.colours for shape in config.shapes]
    return BenchData(spec, images, texts, _fit_masks(masks, model), counts, candidates, ids)


def _photos(spec: str, model: ClipAdapter, samples: int) -> BenchData:
    from mmelkit.datasets.photos import RealPhotos

    photos = RealPhotos()
    images, texts, masks, counts, ids = [], [], [], [], []
    for index in range(len(photos)):
        scene = photos[index]
        for caption in scene.captions:
            images.append(scene.image)
            texts.append(caption.text)
            masks.append(scene.mask_of(caption))
            counts.append(len(scene.objects))
            ids.append(f"{scene.extras['id']}/{caption.text}")
    keep = slice(0, samples)
    return BenchData(spec, images[keep], texts[keep], _fit_masks(masks[keep], model), counts[keep],
                     list(dict.fromkeys(texts)), ids[keep])


def _coco(spec: str, model: ClipAdapter, samples: int, seed: int, root: str, human: bool) -> BenchData:
    from mmelkit.datasets.coco import CocoDataset

    coco = CocoDataset(root)
    rng = np.random.default_rng([seed, 2])
    images, texts, masks, counts, ids = [], [], [], [], []
    for index in range(len(coco)):
        if len(images) == samples:
            break
        scene = coco[index]
        if not len(scene.objects):
            continue  # nothing to localise
        if human:
            caption = scene.captions[0]
        else:
            per_category = [c for c in scene.captions if c.text.startswith("a photo of a ")]
            caption = per_category[int(rng.integers(0, len(per_category)))]
        mask = scene.mask_of(caption)
        images.append(scene.image)
        texts.append(caption.text)
        masks.append(mask)
        counts.append(len(scene.objects))
        ids.append(str(scene.extras["image_id"]))
    if not images:
        raise ValueError(f"{spec}: no image with annotated objects")
    candidates = list(dict.fromkeys(texts)) if human else [f"a photo of a {n}" for n in coco.categories.values()]
    return BenchData(spec, images, texts, _fit_masks(masks, model), counts, candidates, ids)


def _fit_masks(masks: list[np.ndarray], model: ClipAdapter) -> torch.Tensor:
    """Masks resized and centre-cropped like the images, (N, H, W) bool on the CPU."""
    fitted = []
    for mask in masks:
        tensor = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
        if tuple(mask.shape) != tuple(model.image_size):
            tensor = resize_and_center_crop(tensor, model.image_size)
        fitted.append(tensor[0, 0] >= 0.5)
    return torch.stack(fitted) if fitted else torch.zeros(0, *model.image_size, dtype=torch.bool)
