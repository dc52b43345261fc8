"""A handful of real photographs with hand-made boxes and captions, for real CLIP weights.

The photos are the ones scikit-image ships inside its wheel (no download); the annotations live
in ``data/annotations/real_photos.json`` with each photo's credit and licence. Items are
:class:`~mmelkit.datasets.scenes.Scene` records, like the scene world's, with box-shaped masks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mmelkit.datasets.scenes import Caption, Scene

ANNOTATIONS = Path(os.environ.get("MMELKIT_DATA", Path(__file__).resolve().parents[2] / "data")) / "annotations"


class PhotoObject(NamedTuple):
    label: str
    caption: str


class RealPhotos:
    """``RealPhotos()[i]`` -> Scene with the photo, box masks, boxes and one caption per object."""

    def __init__(self, annotations: str | Path | None = None) -> None:
        path = Path(annotations) if annotations is not None else ANNOTATIONS / "real_photos.json"
        if not path.is_file():
            raise FileNotFoundError(f"annotation file {path} does not exist")
        try:
            records = json.loads(path.read_text())["images"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a photo annotation file (expected {{'images': [...]}}): {error}") from error
        self.records: list[dict[str, Any]] = records
        self.path = path

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]

    def credits(self) -> list[dict[str, str]]:
        """Credit and licence of every photo."""
        return [{"id": r["id"], "credit": r["credit"], "licence": r["licence"]} for r in self.records]

    def __getitem__(self, index: int | str) -> Scene:
        if isinstance(index, str):
            index = self.ids.index(index)
        record = self.records[index]
        image = _load(record["loader"])
        height, width = image.shape[:2]
        objects, boxes = [], []
        for item in record["objects"]:
            x1, y1, x2, y2 = (int(v) for v in item["box"])
            if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
                raise ValueError(f"{self.path}: box {item['box']} of {record['id']}/{item['label']} lies outside "
                                 f"the {width}x{height} image")
            objects.append(PhotoObject(item["label"], item["caption"]))
            boxes.append((x1, y1, x2, y2))
        masks = np.zeros((len(boxes), height, width), bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes):
            masks[k, y1:y2, x1:x2] = True
        captions = [Caption(o.caption, "object", (k,)) for k, o in enumerate(objects)]
        return Scene(index, image, objects, masks, np.array(boxes, dtype=np.int64), captions, "photo",
                     extras={"id": record["id"], "credit": record["credit"], "licence": record["licence"]})


def _load(loader: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, loader)()
    if isinstance(image, tuple):  # stereo pairs: the left view
        image = image[0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])
