"""A local MSCOCO copy (captions and instance masks) through pycocotools. Nothing is downloaded.

Expected layout (the official one)::

    root/
      val2017/000000000139.jpg ...
      annotations/instances_val2017.json
      annotations/captions_val2017.json

Items are :class:`~mmelkit.datasets.scenes.Scene` records: the image, one instance mask and box
per annotated object, and captions. COCO's human captions describe the whole image, so they refer
to every instance; mmelkit adds one "a photo of a {category}" caption per category present, which
refers to that category's instances and so has a mask to localise.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from mmelkit.datasets.scenes import Caption, Scene


class CocoObject(NamedTuple):
    category: str
    annotation_id: int
    area: float
    iscrowd: bool


class CocoDataset:
    """Images of one COCO split with instance masks and captions.

    ``image_ids`` restricts and orders the images (e.g. the 5k Karpathy test split); by default
    all images that have captions, in id order. ``include_crowd`` keeps crowd annotations.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val2017",
        image_ids: Sequence[int] | None = None,
        include_crowd: bool = False,
    ) -> None:
        self.root = Path(root)
        instances = self.root / "annotations" / f"instances_{split}.json"
        captions = self.root / "annotations" / f"captions_{split}.json"
        self.image_dir = self.root / split
        for path in (instances, captions, self.image_dir):
            if not path.exists():
                raise FileNotFoundError(
                    f"COCO {split}: {path} is missing; expected root/{split}/ and "
                    f"root/annotations/{{instances,captions}}_{split}.json under {self.root}"
                )
        self.instances = _load_coco(instances)
        self.captions = _load_coco(captions)
        self.include_crowd = include_crowd
        self.categories = {c["id"]: c["name"] for c in self.instances.loadCats(self.instances.getCatIds())}
        available = sorted(set(self.captions.getImgIds()))
        if image_ids is None:
            self.image_ids = available
        else:
            missing = sorted(set(image_ids) - set(available))
            if missing:
                raise ValueError(f"image ids not in COCO {split} captions: {missing[:10]}")
            self.image_ids = list(image_ids)
        if not self.image_ids:
            raise ValueError(f"COCO {split} under {self.root} has no captioned images")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Scene:
        image_id = self.image_ids[index]
        info = self.instances.loadImgs(image_id)[0] if image_id in self.instances.imgs else self.captions.loadImgs(image_id)[0]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"COCO image {path} is missing")
        image = np.asarray(Image.open(path).convert("RGB"))
        height, width = image.shape[:2]
        annotations = self.instances.loadAnns(self.instances.getAnnIds(imgIds=image_id, iscrowd=None))
        if not self.include_crowd:
            annotations = [a for a in annotations if not a.get("iscrowd", 0)]
        objects, masks, boxes = [], [], []
        for a in annotations:
            objects.append(CocoObject(self.categories[a["category_id"]], a["id"], float(a["area"]), bool(a.get("iscrowd", 0))))
            masks.append(self.instances.annToMask(a).astype(bool))
            x, y, w, h = a["bbox"]
            boxes.append((int(np.floor(x)), int(np.floor(y)), int(np.ceil(x + w)), int(np.ceil(y + h))))
        mask_array = np.stack(masks) if masks else np.zeros((0, height, width), bool)
        everything = tuple(range(len(objects)))
        texts = [c["caption"].strip() for c in self.captions.loadAnns(self.captions.getAnnIds(imgIds=image_id))]
        captions = [Caption(t, "object", everything) for t in texts]
        by_category: dict[str, list[int]] = {}
        for k, o in enumerate(objects):
            by_category.setdefault(o.category, []).append(k)
        captions += [Caption(f"a photo of a {name}", "object", tuple(ks)) for name, ks in by_category.items()]
        return Scene(index, image, objects, mask_array, np.array(boxes, dtype=np.int64).reshape(-1, 4), captions,
                     "coco", extras={"image_id": image_id, "file_name": info["file_name"], "captions": texts})


def _load_coco(path: Path):  # type: ignore[no-untyped-def]
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints timing chatter
        try:
            return COCO(str(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        except (KeyError, AssertionError, TypeError) as error:
            raise ValueError(f"{path} is not a COCO annotation file: {error!r}") from error
