"""The shortcut classification task: labels, the spurious-tint knob, withheld masks, rationales."""

from __future__ import annotations

import numpy as np
import pytest

from mmelkit.datasets.shortcut import ShortcutConfig, ShortcutTask, where


def _agreement(task: ShortcutTask, n: int = 400) -> float:
    return float(np.mean([task[i].shortcut_agrees for i in range(n)]))


def test_spurious_knob_sets_how_often_the_tint_agrees() -> None:
    config = ShortcutConfig(spurious=0.9)
    assert abs(_agreement(ShortcutTask(config, "train")) - 0.9) < 0.06
    assert abs(_agreement(ShortcutTask(config, "debiased")) - 0.25) < 0.07
    assert _agreement(ShortcutTask(ShortcutConfig(spurious=1.0), "test")) == 1.0
    assert _agreement(ShortcutTask(ShortcutConfig(spurious=0.0), "test")) == 0.0


def test_the_tint_is_visible_in_the_background() -> None:
    task = ShortcutTask(ShortcutConfig(spurious=1.0), "train")
    means: dict[int, list[np.ndarray]] = {}
    for i in range(160):
        sample = task[i]
        background = ~sample.scene.masks.any(axis=0)
        pixels = sample.scene.image[background].astype(float)
        means.setdefault(sample.tint_class, []).append(pixels.mean(0) - pixels.mean())
    centroids = {k: np.mean(v, axis=0) for k, v in means.items()}
    # each sample's colour cast is nearest to its own class's centroid
    hits = [min(centroids, key=lambda c: np.linalg.norm(m - centroids[c])) == k for k, ms in means.items() for m in ms]
    assert np.mean(hits) > 0.9


def test_label_is_the_shape_of_the_large_target_and_masks_can_be_withheld() -> None:
    task = ShortcutTask(ShortcutConfig(mask_fraction=0.5), "train", seed=4)
    samples = [task[i] for i in range(200)]
    assert abs(np.mean([s.has_mask for s in samples]) - 0.5) < 0.1
    for s in samples:
        target = s.scene.objects[0]
        assert target.shape == s.class_name == task.config.classes[s.label] and target.size == "large"
        assert all(o.shape != target.shape and o.size == "small" for o in s.scene.objects[1:])
        if s.mask is not None:
            assert np.array_equal(s.mask, s.scene.masks[0]) and s.mask.sum() > 0.9 * s.scene.masks[0].sum()
        assert s.rationale.startswith(f"the large {target.colour} {target.shape} in the ")
    assert {s.label for s in samples} == {0, 1, 2, 3}
    again = ShortcutTask(ShortcutConfig(mask_fraction=0.5), "train", seed=4)[17]
    assert np.array_equal(again.scene.image, samples[17].scene.image)
    assert not np.array_equal(ShortcutTask(ShortcutConfig(mask_fraction=0.5), "test", seed=4)[17].scene.image,
                              samples[17].scene.image)


def test_where() -> None:
    assert where((5, 5), 60) == "top left"
    assert where((30, 30), 60) == "centre"
    assert where((55, 30), 60) == "right"
    assert where((30, 58), 60) == "bottom"


@pytest.mark.parametrize(
    "kwargs",
    [{"spurious": 1.5}, {"mask_fraction": -0.1}, {"classes": ("circle",)}, {"classes": ("circle", "blob")},
     {"tint_strength": 99}, {"distractors": (3, 1)}],
)
def test_bad_configs(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ShortcutConfig(**kwargs)
    with pytest.raises(ValueError, match="split"):
        ShortcutTask(split="validation")  # type: ignore[arg-type]


def test_the_patch_cue_is_the_class_colour_in_a_corner_clear_of_the_target() -> None:
    config = ShortcutConfig(cue="patch", spurious=0.9)
    colours = config.class_patch_colours()
    assert len(set(colours)) == len(config.classes)
    task = ShortcutTask(config, "train", seed=2)
    size = config.scene.image_size
    side = round(config.patch_fraction * size)
    touching = 0
    for i in range(120):
        sample = task[i]
        x1, y1, x2, y2 = sample.cue_box
        assert (x2 - x1, y2 - y1) == (side, side) and {x1, y1} <= {1, size - side - 1}
        assert (sample.scene.image[y1:y2, x1:x2] == colours[sample.tint_class]).all()
        assert not sample.scene.masks[:, y1:y2, x1:x2].any()  # covered pixels leave every mask
        bx1, by1, bx2, by2 = sample.scene.boxes[0]  # the target's box
        touching += bx1 < x2 and x1 < bx2 and by1 < y2 and y1 < by2
    assert touching / 120 < 0.1  # a clear corner is nearly always found
    assert abs(_agreement(task, 400) - 0.9) < 0.06
    assert abs(_agreement(ShortcutTask(config, "debiased"), 400) - 0.25) < 0.07


def test_the_patch_cue_leaves_the_background_untinted_by_the_class() -> None:
    """With a patch cue, the tint is the world's own random one: the class cannot be read from it."""
    task = ShortcutTask(ShortcutConfig(cue="patch", spurious=1.0), "train")
    tint = ShortcutTask(ShortcutConfig(cue="tint", spurious=1.0), "train")
    assert task[0].cue_box is not None and tint[0].cue_box is None
    same_label = [i for i in range(40) if task[i].label == tint[i].label]
    assert same_label  # same seed and index: same label, same objects
    i = same_label[0]
    assert not np.array_equal(task[i].scene.image, tint[i].scene.image)


@pytest.mark.parametrize("bad", [{"cue": "stripes"}, {"patch_fraction": 0.0}, {"patch_fraction": 0.5}])
def test_bad_cue_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        ShortcutConfig(**bad)
