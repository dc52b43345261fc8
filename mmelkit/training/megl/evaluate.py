"""Scoring explanation-guided models, and the study that compares configurations over seeds.

:func:`evaluate_megl` measures one trained model on the shortcut task's biased test split (the
cue agrees with the label as often as in training) and its de-biased split (the cue is independent
of the label):

* ``acc``, ``f1`` (macro): right answers; ``shortcut``: the share of de-biased predictions that
  follow the cue instead (chance is 1/K).
* ``iou``, ``precision``, ``recall``, ``pointing``: the Grad-CAM of the *predicted* class against
  the target's mask (the model's own explanation of its decision), binarised at 0.5 of its range
  for the first three, strict pointing (no tolerance); ``cue_energy``: the share of that map's mass on the
  cue patch (0 for a tint cue, which has no place).
* ``bleu4``, ``rouge_l``, ``clip_score``: generated rationales (greedy, on the test split)
  against the reference rationales, and CLIPScore of (image, rationale) by the embedded CLIP.

:func:`megl_study` trains every (configuration, seed) pair it is given, or loads the finished run
from ``out_dir``, and returns a :class:`StudyResult`: one row per run, and mean and standard
deviation per configuration.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmelkit._checks import output_folder, positive_int
from mmelkit._io import atomic_write_text
from mmelkit.metrics.localisation import (
    energy_pointing_game,
    mask_iou,
    mask_precision,
    mask_recall,
    pointing_game,
)
from mmelkit.metrics.text import bleu, clip_score, rouge_l
from mmelkit.models.loading import resolve_device
from mmelkit.training.megl.data import MeglSplit, attach_pseudo_masks, build_split
from mmelkit.training.megl.models import grad_cam, highlight
from mmelkit.training.megl.trainer import PRESET_NOTES, MeglConfig, MeglModel, train_megl

# Columns of the results, in the order tables show them, with their direction.
METRICS: dict[str, str] = {
    "test_acc": "higher", "debiased_acc": "higher", "debiased_f1": "higher", "shortcut": "lower",
    "iou": "higher", "precision": "higher", "recall": "higher", "pointing": "higher", "cue_energy": "lower",
    "bleu4": "higher", "rouge_l": "higher", "clip_score": "higher",
}


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of F1 (a class never predicted nor present is skipped)."""
    scores = []
    for k in range(num_classes):
        tp = int(((predictions == k) & (labels == k)).sum())
        predicted, actual = int((predictions == k).sum()), int((labels == k).sum())
        if predicted + actual:
            scores.append(2 * tp / (predicted + actual))
    return sum(scores) / len(scores) if scores else 0.0


def predict_and_explain(model: MeglModel, split: MeglSplit, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes (N,) and the Grad-CAM of each prediction at the image's size (N, H, W)."""
    classifier, device = model.classifier, model.device
    predictions, maps = [], []
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(device)
        # one forward: the prediction and its Grad-CAM come from the same pass
        logits, cams, _ = grad_cam(classifier, images, None, create_graph=False, target=model.config.cam_target)  # type: ignore[arg-type]
        predictions.append(logits.detach().argmax(dim=1))
        maps.append(F.interpolate(cams[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    return torch.cat(predictions), torch.cat(maps)


def generate_rationales(model: MeglModel, split: MeglSplit, batch_size: int = 256) -> list[str]:
    """Greedy rationales for every image (grounded generators see the image times its Grad-CAM)."""
    positive_int("batch_size", batch_size)
    if model.generator is None:
        raise ValueError(f"configuration {model.config.name!r} has no rationale generator (text_weight is 0)")
    texts: list[str] = []
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(model.device)
        highlighted = None
        if model.generator.grounded:  # one forward gives the features and the predicted class's map
            _, cams, features = grad_cam(model.classifier, images, None, create_graph=False,
                                         target=model.config.cam_target)  # type: ignore[arg-type]
            highlighted = highlight(images, cams)
        else:
            with torch.no_grad():
                features = model.classifier.features(images)
        ids = model.generator.generate(features.detach().mean(dim=(2, 3)), highlighted, model.vocab.BOS, model.vocab.EOS,
                                       max_length=split.tokens.shape[1])
        texts.extend(model.vocab.decode(ids))
    return texts


def evaluate_megl(model: MeglModel, test: MeglSplit, debiased: MeglSplit, clip: Any | None = None,
                  batch_size: int = 256) -> dict[str, float]:
    """All :data:`METRICS` of one model (rationale metrics NaN without a generator; CLIPScore NaN without ``clip``)."""
    positive_int("batch_size", batch_size)
    model.eval()
    num_classes = len(model.config.task().classes)
    results: dict[str, float] = {}
    for name, split in (("test", test), ("debiased", debiased)):
        predictions, maps = predict_and_explain(model, split, batch_size)
        labels = split.labels.to(predictions.device)
        results[f"{name}_acc"] = float((predictions == labels).float().mean())
        results[f"{name}_f1"] = macro_f1(predictions, labels, num_classes)
        if name == "debiased":
            results["shortcut"] = float((predictions == split.cue_classes.to(predictions.device)).float().mean())
            masks = split.true_masks.to(maps.device)
            results["iou"] = float(mask_iou(maps, masks).mean())
            results["precision"] = float(mask_precision(maps, masks).mean())
            results["recall"] = float(mask_recall(maps, masks).mean())
            results["pointing"] = float(pointing_game(maps, masks).mean())
            cue = split.cue_masks.to(maps.device)
            results["cue_energy"] = float(energy_pointing_game(maps, cue).mean()) if cue.any() else 0.0
    if model.generator is not None:
        texts = generate_rationales(model, test, batch_size)
        results["bleu4"] = bleu(texts, test.rationales)
        results["rouge_l"] = rouge_l(texts, test.rationales)
        results["clip_score"] = float(clip_score(clip, list(test.raw_images), texts).mean()) if clip is not None else math.nan
    else:
        results.update(bleu4=math.nan, rouge_l=math.nan, clip_score=math.nan)
    return results


@dataclass
class StudyResult:
    """One row per (configuration, seed) run and the per-configuration summary."""

    rows: list[dict[str, Any]]

    def configs(self) -> list[str]:
        return list(dict.fromkeys(row["config"] for row in self.rows))

    def summary(self) -> list[dict[str, Any]]:
        """Per configuration: ``seeds`` and, per metric, ``<metric>`` (mean) and ``<metric>_std``.

        A metric that rows lack (rows of an older study, before the metric existed) counts as NaN."""
        out = []
        for name in self.configs():
            rows = [r for r in self.rows if r["config"] == name]
            entry: dict[str, Any] = {"config": name, "seeds": len(rows)}
            for metric in METRICS:
                values = [float(r[metric]) for r in rows if not math.isnan(float(r.get(metric, math.nan)))]
                mean = sum(values) / len(values) if values else math.nan
                spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                entry[metric], entry[f"{metric}_std"] = mean, (spread if values else math.nan)
            out.append(entry)
        return out

    def table(self, metrics: Sequence[str] = tuple(METRICS)) -> str:
        """A markdown table, mean ± std over seeds (std = sample standard deviation), "—" where n/a."""
        header = ["config", "seeds", *metrics]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for entry in self.summary():
            cells = [entry["config"], str(entry["seeds"])]
            for metric in metrics:
                mean, std = entry[metric], entry[f"{metric}_std"]
                cells.append("—" if math.isnan(mean) else (f"{mean:.3f} ± {std:.3f}" if entry["seeds"] > 1 else f"{mean:.3f}"))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write(self, out_dir: str | Path) -> Path:
        """``runs.csv`` (per run), ``summary.json`` and ``table.md`` under ``out_dir``, each atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        runs = io.StringIO(newline="")
        writer = csv.DictWriter(runs, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(out / "runs.csv", runs.getvalue())
        atomic_write_text(out / "summary.json", json.dumps(self.summary(), indent=2) + "\n")
        notes = "\n".join(f"- `{name}`: {PRESET_NOTES.get(name, 'custom configuration')}" for name in self.configs())
        atomic_write_text(out / "table.md", self.table() + "\n\n" + notes + "\n")
        return out


class StudyData:
    """Splits drawn once and shared by every configuration with the same data settings."""

    def __init__(self, eval_size: int, clip: Any | None) -> None:
        self.eval_size, self.clip = eval_size, clip
        self._cache: dict[tuple[Any, ...], tuple[MeglSplit, MeglSplit, MeglSplit]] = {}

    def splits(self, config: MeglConfig) -> tuple[MeglSplit, MeglSplit, MeglSplit]:
        key = config.data_key()
        if key not in self._cache:
            task = config.task()
            train = build_split(task, "train", config.train_size, config.data_seed)
            if self.clip is not None:  # made once for every configuration of this data
                train = attach_pseudo_masks(train, self.clip)
            test = build_split(task, "test", self.eval_size, config.data_seed)
            debiased = build_split(task, "debiased", self.eval_size, config.data_seed)
            self._cache[key] = (train, test, debiased)
        train, test, debiased = self._cache[key]
        if config.uses_pseudo_masks and train.pseudo_masks is None:
            raise ValueError(f"configuration {config.name!r} uses textual supervision, which needs the embedded CLIP")
        return train, test, debiased


def megl_study(
    configs: Sequence[MeglConfig],
    seeds: Sequence[int] = (0, 1, 2),
    out_dir: str | Path | None = None,
    eval_size: int = 500,
    device: str | torch.device = "auto",
    progress: bool = True,
    clip: Any | None = "scene-clip",
) -> StudyResult:
    """Train (or load) and evaluate every configuration for every seed.

    ``clip`` is the CLIP for pseudo-masks and CLIPScore: a ClipAdapter, a name for
    :func:`mmelkit.load_model` (default: the embedded ``"scene-clip"``), or None (then no
    configuration may use textual supervision, and CLIPScore is NaN). Runs go to
    ``out_dir/<config>/seed-<s>/``; the results are written to ``out_dir`` too."""
    if not configs:
        raise ValueError("give at least one configuration")
    if not seeds:
        raise ValueError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {list(seeds)}")
    positive_int("eval_size", eval_size)
    if out_dir is not None:
        output_folder("out_dir", out_dir)
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique; got {names}")
    target = resolve_device(device)
    if isinstance(clip, str):
        from mmelkit.models import load_model

        clip = load_model(clip, device=target)
    data = StudyData(eval_size, clip)
    rows = []
    runs = [(config, seed) for config in configs for seed in seeds]
    for config, seed in tqdm(runs, disable=not progress or len(runs) == 1, desc="MEGL study"):
        run = replace(config, seed=seed)
        train, test, debiased = data.splits(run)
        folder = Path(out_dir) / config.name / f"seed-{seed}" if out_dir is not None else None
        model = train_megl(run, train, folder, target, progress=progress)
        rows.append({"config": config.name, "seed": seed, "train_seconds": round(model.seconds, 2),
                     **evaluate_megl(model, test, debiased, clip)})
    result = StudyResult(rows)
    if out_dir is not None:
        result.write(out_dir)
    return result
