"""Real photos shipped by scikit-image, and the local-COCO loader on a fixture written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmelkit.datasets.coco import CocoDataset
from mmelkit.datasets.photos import RealPhotos


def test_real_photos_have_credited_boxes_and_captions() -> None:
    photos = RealPhotos()
    assert len(photos) >= 4
    for index in range(len(photos)):
        scene = photos[index]
        assert scene.image.ndim == 3 and scene.image.shape[-1] == 3 and scene.image.dtype == np.uint8
        assert len(scene.objects) == len(scene.captions) == len(scene.boxes) == len(scene.masks)
        for caption, (x1, y1, x2, y2), mask in zip(scene.captions, scene.boxes, scene.masks, strict=True):
            assert caption.text and len(caption.objects) == 1
            assert mask.sum() == (x2 - x1) * (y2 - y1) and mask[y1:y2, x1:x2].all()
        assert scene.extras["licence"] and scene.extras["credit"]
    assert photos["cat"].captions[0].text == "a tabby cat"


def test_bad_photo_annotations(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        RealPhotos(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{\"pictures\": []}")
    with pytest.raises(ValueError, match="not a photo annotation file"):
        RealPhotos(tmp_path / "bad.json")
    record = {"id": "x", "loader": "coffee", "credit": "c", "licence": "l",
              "objects": [{"label": "y", "caption": "z", "box": [0, 0, 9999, 10]}]}
    (tmp_path / "outside.json").write_text(json.dumps({"images": [record]}))
    with pytest.raises(ValueError, match="outside"):
        RealPhotos(tmp_path / "outside.json")[0]


def _write_coco(root: Path) -> None:
    """Two 40x60 images; image 1 holds a square 'cat' and a triangle 'dog', image 2 one 'cat'."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 60},
              {"id": 2, "file_name": "b.png", "height": 40, "width": 60}]
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(root / "val2017" / "a.jpg")
    Image.fromarray(np.full((40, 60), 30, np.uint8)).save(root / "val2017" / "b.png")  # grayscale file
    categories = [{"id": 17, "name": "cat", "supercategory": "animal"}, {"id": 18, "name": "dog", "supercategory": "animal"}]
    square = [10.0, 5.0, 30.0, 5.0, 30.0, 25.0, 10.0, 25.0]
    triangle = [40.0, 10.0, 55.0, 35.0, 40.0, 35.0]
    annotations = [
        {"id": 101, "image_id": 1, "category_id": 17, "segmentation": [square], "area": 400.0,
         "bbox": [10.0, 5.0, 20.0, 20.0], "iscrowd": 0},
        {"id": 102, "image_id": 1, "category_id": 18, "segmentation": [triangle], "area": 187.5,
         "bbox": [40.0, 10.0, 15.0, 25.0], "iscrowd": 0},
        {"id": 103, "image_id": 2, "category_id": 17, "segmentation": [square], "area": 400.0,
         "bbox": [10.0, 5.0, 20.0, 20.0], "iscrowd": 0},
        {"id": 104, "image_id": 2, "category_id": 18,
         "segmentation": {"counts": [2400], "size": [40, 60]}, "area": 0.0, "bbox": [0, 0, 0, 0], "iscrowd": 1},
    ]
    captions = [{"id": 1, "image_id": 1, "caption": "A cat next to a dog. "},
                {"id": 2, "image_id": 1, "caption": "Two pets on grey."},
                {"id": 3, "image_id": 2, "caption": "A lonely cat."}]
    base = {"info": {}, "licenses": [], "images": images}  # as in COCO, only instances list categories
    instances = {**base, "categories": categories, "annotations": annotations}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(instances))
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({**base, "annotations": captions}))


def test_coco_loader_on_a_fixture(tmp_path: Path) -> None:
    _write_coco(tmp_path)
    coco = CocoDataset(tmp_path)
    assert len(coco) == 2
    first = coco[0]
    assert first.image.shape == (40, 60, 3)
    assert [o.category for o in first.objects] == ["cat", "dog"]
    cat_mask = first.masks[0]
    assert cat_mask[10, 15] and not cat_mask[2, 2] and abs(int(cat_mask.sum()) - 400) <= 60
    assert first.masks[1][30, 45] and not first.masks[1][12, 52]
    assert first.boxes.tolist() == [[10, 5, 30, 25], [40, 10, 55, 35]]
    texts = [c.text for c in first.captions]
    assert texts[:2] == ["A cat next to a dog.", "Two pets on grey."]
    dog = next(c for c in first.captions if c.text == "a photo of a dog")
    assert dog.objects == (1,)
    second = coco[1]
    assert second.image.shape == (40, 60, 3), "grayscale files become RGB"
    assert [o.category for o in second.objects] == ["cat"], "crowd annotations are dropped by default"
    assert len(CocoDataset(tmp_path, include_crowd=True)[1].objects) == 2
    assert len(CocoDataset(tmp_path, image_ids=[2])) == 1


def test_coco_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        CocoDataset(tmp_path / "nowhere")
    _write_coco(tmp_path)
    with pytest.raises(ValueError, match="image ids"):
        CocoDataset(tmp_path, image_ids=[99])
    (tmp_path / "annotations" / "captions_val2017.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDataset(tmp_path)
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps({"annotations": [{"image_id": 1}]}))
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        CocoDataset(tmp_path)
