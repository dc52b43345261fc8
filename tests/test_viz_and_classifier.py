"""Figures build from tensors and scenes; the shortcut classifier learns the shortcut when it can."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from mmelkit.datasets import SceneConfig, SceneWorld
from mmelkit.datasets.shortcut import ShortcutConfig, ShortcutTask
from mmelkit.training.classifier import SmallCNN, accuracy, fit_classifier, task_batch
from mmelkit.viz import bar_chart, embedding_map, overlay_masks, scene_gallery


def test_overlay_marks_exactly_the_masks() -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    mask = np.zeros((1, 10, 10), bool)
    mask[0, 2:6, 3:8] = True
    out = overlay_masks(image, mask)
    assert (out[mask[0]] > 0).any(axis=-1).all() and (out[~mask[0]] == 0).all()


def test_figures() -> None:
    scenes = [SceneWorld(SceneConfig(image_size=32, sizes=(("small", 8), ("large", 12))), seed=1)[i] for i in range(5)]
    gallery = scene_gallery(scenes, columns=3)
    assert isinstance(gallery, go.Figure) and len(gallery.data) == 5
    assert [a.text for a in gallery.layout.annotations] == [s.captions[0].text for s in scenes]
    with pytest.raises(ValueError):
        scene_gallery([])
    images, texts = torch.randn(6, 8), torch.randn(3, 8)
    embedding = embedding_map(images, texts, list("abcdef"), list("xyz"))
    assert len(embedding.data[0].x) == 6 and len(embedding.data[1].x) == 3
    bars = bar_chart(torch.tensor([0.1, -0.2, 0.3]), ["p", "q", "r"], "t", colour_by=["u", "v", "u"])
    assert sorted(len(trace.x) for trace in bars.data) == [1, 2]


def test_classifier_learns_a_perfect_shortcut_and_fails_without_it() -> None:
    config = ShortcutConfig(spurious=1.0, scene=ShortcutConfig().scene.scaled(32))
    train = ShortcutTask(config, "train", seed=0, length=2000)
    model = fit_classifier(train, steps=60, batch_size=32, lr=3e-3, width=8, device="cpu", progress=False)
    assert isinstance(model, SmallCNN) and not model.training
    biased = accuracy(model, ShortcutTask(config, "test", 0, 200), 200)
    debiased = accuracy(model, ShortcutTask(config, "debiased", 0, 200), 200)
    assert biased > 0.9, "the tint predicts the label perfectly in training"
    assert debiased < biased - 0.3, "the shortcut breaks on the de-biased split"


def test_task_batch_layout() -> None:
    task = ShortcutTask(ShortcutConfig(scene=ShortcutConfig().scene.scaled(32)), "train", length=10)
    images, labels = task_batch(task, range(4), torch.device("cpu"))
    assert images.shape == (4, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert labels.tolist() == [task[i].label for i in range(4)]
