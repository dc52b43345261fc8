"""A small image classifier for the scene world's shortcut task, and plain training for it.

The baseline of training-level interpretability: trained on data where a spurious cue (the
background tint) predicts the label, it can be right for the wrong reason, which the de-biased
split exposes. Explanation-guided training (MEGL, RRR, GRADIA) builds on this model later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmelkit.datasets.shortcut import ShortcutConfig, ShortcutTask
from mmelkit.models.loading import resolve_device


def conv_body(width: int) -> nn.Sequential:
    """Three conv blocks, two 2x2 poolings: a (N, 2 * width, H / 4, W / 4) map."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; ``features`` is the last conv map (for Grad-CAM)."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = conv_body(width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


def task_batch(task: ShortcutTask, indices: range | list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images scaled to [-1, 1] (N, 3, H, W) and labels (N,) of the given samples."""
    samples = [task[i] for i in indices]
    images = torch.from_numpy(np.stack([s.scene.image for s in samples])).to(device)
    images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    labels = torch.tensor([s.label for s in samples], device=device)
    return images, labels


def fit_classifier(
    task: ShortcutTask,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    width: int = 32,
) -> SmallCNN:
    """Plain cross-entropy training on ``task`` (samples drawn in order, cycling)."""
    target = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(task.num_classes, width).to(target)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in tqdm(range(steps), disable=not progress, desc="train classifier"):
        start = (step * batch_size) % max(1, len(task) - batch_size)
        images, labels = task_batch(task, range(start, start + batch_size), target)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, task: ShortcutTask, count: int = 400, batch_size: int = 200) -> float:
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, count, batch_size):
        images, labels = task_batch(task, range(start, min(count, start + batch_size)), device)
        correct += int((model(images).argmax(dim=1) == labels).sum())
    return correct / count


@dataclass
class ShortcutResult:
    spurious: float
    test_accuracy: float  # same distribution as training (the shortcut holds)
    debiased_accuracy: float  # tint independent of the class (the shortcut fails)


def shortcut_study(
    spurious_values: list[float],
    steps: int = 300,
    train_size: int = 4000,
    eval_size: int = 400,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    image_size: int = 64,
    width: int = 32,
) -> list[ShortcutResult]:
    """Train one classifier per spurious-correlation strength; report biased and de-biased accuracy.

    ``image_size`` rescales the scenes (32 px is four times cheaper than 64 px and shows the same)."""
    results = []
    for spurious in spurious_values:
        config = ShortcutConfig(spurious=spurious, scene=ShortcutConfig().scene.scaled(image_size))
        model = fit_classifier(ShortcutTask(config, "train", seed, train_size), steps=steps, seed=seed,
                               device=device, progress=progress, width=width)
        results.append(
            ShortcutResult(
                spurious,
                accuracy(model, ShortcutTask(config, "test", seed, eval_size), eval_size),
                accuracy(model, ShortcutTask(config, "debiased", seed, eval_size), eval_size),
            )
        )
    return results
