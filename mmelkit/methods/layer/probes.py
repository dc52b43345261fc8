"""Layer probes (SPEC §7): how linearly readable is a concept after each block of the image tower?

For each block l a linear classifier is fitted on the CLS token and on the mean patch token and
scored on held-out scenes. The classifier is closed-form ridge regression on one-hot targets
(standardised features, intercept by centring), solved on the device through one eigen-
decomposition of the feature covariance, so trying several ridge strengths costs nothing: the
strength is chosen on a validation share of the training set, then the probe is refitted on all of
it. Where accuracy jumps, the tower has made the concept linearly available; where it is high from
block 0, the patch embedding alone carries it (colour, for instance).

Reference: Alain & Bengio, "Understanding intermediate layers using linear classifier probes"
(2016).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmelkit._checks import did_you_mean, finite, positive_int
from mmelkit.datasets.concepts import PROBE_TASKS, ProbeData, probe_task
from mmelkit.methods.base import register_tool
from mmelkit.models.activations import Activations, collect_activations
from mmelkit.models.adapter import ClipAdapter
from mmelkit.models.tracing import BlockSelection

DEFAULT_ALPHAS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
PROBE_SITES: tuple[str, ...] = ("cls", "patch_mean")


@dataclass(eq=False)
class LinearProbe:
    """A fitted ridge probe: ``scores(x) = ((x - mean) / scale) @ weight + bias``; class = argmax."""

    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,)
    scale: torch.Tensor  # (D,)
    alpha: float

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(self.weight) - self.mean) / self.scale
        return x @ self.weight + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.scores(features).argmax(dim=-1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return self.predict(features).eq(labels.to(self.weight.device)).float().mean().item()


def _check_xy(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None) -> int:
    if features.dim() != 2 or labels.dim() != 1 or len(features) != len(labels):
        raise ValueError(f"features must be (N, D) and labels (N,); got {tuple(features.shape)} and {tuple(labels.shape)}")
    if len(features) < 2:
        raise ValueError("a probe needs at least 2 examples")
    finite("features", features)
    if labels.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or labels.min() < 0:
        raise ValueError("labels must be non-negative integer class indices")
    classes = int(labels.max()) + 1 if num_classes is None else positive_int("num_classes", num_classes)
    if int(labels.max()) >= classes:
        raise ValueError(f"a label {int(labels.max())} is outside num_classes={classes}")
    return classes


def _solve(eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, xty: torch.Tensor, alpha: float) -> torch.Tensor:
    # (X^T X + alpha I)^-1 X^T Y through X^T X = V diag(e) V^T
    return eigenvectors @ ((eigenvectors.T @ xty) / (eigenvalues + alpha)[:, None])


def fit_ridge_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float | Sequence[float] = DEFAULT_ALPHAS,
    num_classes: int | None = None,
    validation_share: float = 0.2,
    seed: int = 0,
) -> LinearProbe:
    """Closed-form ridge regression on one-hot labels (features standardised, intercept by centring).

    ``alpha``: the ridge strength on the standardised features, scaled by N (so it means the same at
    any dataset size); several values are tried and the best on a random ``validation_share`` of
    the data chosen, then the probe is refitted on all of it."""
    classes = _check_xy(features, labels, num_classes)
    alphas = [float(alpha)] if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    if not alphas or any(a < 0 for a in alphas):
        raise ValueError(f"alpha must be one or more non-negative numbers; got {alpha!r}")
    x = features.double()
    y = labels.to(x.device)
    if len(alphas) > 1:
        if not 0.0 < validation_share < 1.0:
            raise ValueError(f"validation_share must lie in (0, 1); got {validation_share!r}")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
        held = max(1, int(round(validation_share * len(x))))
        if held >= len(x):
            raise ValueError("too few examples to hold out a validation share")
        fitting = [_fit(x[order[held:]], y[order[held:]], classes, [a]) for a in alphas]
        scores = [probe.accuracy(x[order[:held]], y[order[:held]]) for probe in fitting]
        alphas = [alphas[max(range(len(alphas)), key=lambda i: (scores[i], -i))]]  # ties: the weakest ridge
    probe = _fit(x, y, classes, alphas)
    return LinearProbe(probe.weight.to(features.dtype), probe.bias.to(features.dtype), probe.mean.to(features.dtype),
                       probe.scale.to(features.dtype), probe.alpha)


def _fit(x: torch.Tensor, y: torch.Tensor, classes: int, alphas: list[float]) -> LinearProbe:
    mean = x.mean(dim=0)
    scale = x.std(dim=0).clamp_min(1e-8)
    z = (x - mean) / scale
    targets = torch.nn.functional.one_hot(y, classes).to(z)
    target_mean = targets.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(z.T @ z)
    xty = z.T @ (targets - target_mean)
    alpha = alphas[0]
    weight = _solve(eigenvalues.clamp_min(0), eigenvectors, xty, alpha * len(z))
    return LinearProbe(weight, target_mean, mean, scale, alpha)


@dataclass(eq=False)
class ProbeResult:
    """Held-out accuracy of one probe per (task, site, layer). ``accuracy[(task, site)]`` is a list over
    ``layers`` (block indices); ``chance`` the majority-class rate of each task's test set."""

    accuracy: dict[tuple[str, str], list[float]]
    layers: list[int]
    chance: dict[str, float]
    samples: dict[str, tuple[int, int]]  # task -> (train, test)

    def to_frame(self) -> Any:
        """Long pandas table: task, site, layer, accuracy, chance."""
        import pandas as pd

        rows = [
            {"task": task, "site": site, "layer": layer, "accuracy": value, "chance": self.chance[task]}
            for (task, site), values in self.accuracy.items()
            for layer, value in zip(self.layers, values, strict=True)
        ]
        return pd.DataFrame(rows)

    def last(self, task: str, site: str = "cls") -> float:
        """Accuracy after the last block."""
        return self.accuracy[(task, site)][-1]


def probe_layers(
    train: Activations,
    train_labels: torch.Tensor,
    test: Activations,
    test_labels: torch.Tensor,
    *,
    task: str = "task",
    sites: Sequence[str] = PROBE_SITES,
    alpha: float | Sequence[float] = DEFAULT_ALPHAS,
) -> ProbeResult:
    """Fit and score a probe per (site, layer) on already collected activations."""
    if train.layers != test.layers:
        raise ValueError(f"train and test activations hold different layers: {train.layers} vs {test.layers}")
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    accuracy: dict[tuple[str, str], list[float]] = {}
    for site in sites:
        values = []
        for layer in train.layers:
            x_train = train[site, layer]
            device = x_train.device
            probe = fit_ridge_probe(x_train, train_labels.to(device), alpha=alpha, num_classes=classes)
            values.append(probe.accuracy(test[site, layer].to(device), test_labels))
        accuracy[(task, site)] = values
    chance = test_labels.bincount().max().item() / len(test_labels)
    return ProbeResult(accuracy, list(train.layers), {task: chance}, {task: (len(train_labels), len(test_labels))})


@register_tool("layer_probes", level="model", granularity="layer", family="probe",
               reference="Alain & Bengio 2016 (linear probes); SPEC §7")
def layer_probes(
    model: ClipAdapter,
    tasks: Sequence[str] = PROBE_TASKS,
    *,
    train_count: int = 2000,
    test_count: int = 1000,
    seed: int = 2_000_141,
    layers: BlockSelection = "all",
    sites: Sequence[str] = PROBE_SITES,
    alpha: float | Sequence[float] = DEFAULT_ALPHAS,
    batch_size: int = 128,
    cache: str | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Probe accuracy per layer for scene-world tasks (colour, shape, count, relation) on held-out scenes.

    Training scenes come from seed ``seed``, test scenes from ``seed + 1`` (never the same scenes),
    drawn at the model's image size; see :func:`mmelkit.datasets.concepts.probe_task` for each
    task's scenes and labels."""
    positive_int("train_count", train_count)
    positive_int("test_count", test_count)
    unknown = [t for t in tasks if t not in PROBE_TASKS]
    if unknown or not tasks:
        hints = "".join(did_you_mean(task, PROBE_TASKS) for task in unknown)
        raise ValueError(f"unknown or no probe tasks {list(tasks)};{hints} tasks: {', '.join(PROBE_TASKS)}")
    bad_sites = [s for s in sites if s not in PROBE_SITES]
    if bad_sites or not sites:
        raise ValueError(f"probe sites must be among {PROBE_SITES}; got {list(sites)}")
    size = model.image_size[0]
    merged: ProbeResult | None = None
    for offset, task in enumerate(tasks):
        # each task draws its own scenes: the tasks need different scene kinds
        train_data: ProbeData = probe_task(task, train_count, seed + 10 * offset, size)
        test_data: ProbeData = probe_task(task, test_count, seed + 10 * offset + 1, size)
        common = {"sites": list(sites), "layers": layers, "batch_size": batch_size, "cache": cache, "progress": progress}
        train_acts = collect_activations(model, train_data.images, **common)
        test_acts = collect_activations(model, test_data.images, **common)
        result = probe_layers(train_acts, train_data.labels, test_acts, test_data.labels, task=task, sites=sites,
                              alpha=alpha)
        if merged is None:
            merged = result
        else:
            merged.accuracy.update(result.accuracy)
            merged.chance.update(result.chance)
            merged.samples.update(result.samples)
    assert merged is not None
    return merged
