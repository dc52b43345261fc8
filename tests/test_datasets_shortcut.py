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
