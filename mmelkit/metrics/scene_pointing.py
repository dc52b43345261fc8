"""The pointing game on the scene world: each method, one object caption per scene, exact masks.

For every scene a caption naming one object ("a red circle") is explained; a method hits when
the maximum of its map, upsampled to the image, lies on that object's visible mask. When several
pixels tie for the maximum (flat or upsampled maps), the hit is the share of those pixels on the
mask: the expected hit under a random tie-break, so a constant map scores chance. Scenes are
generated with a seed no training run uses, so nothing here was seen in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mmelkit._checks import positive_int
from mmelkit.datasets.scenes import SceneConfig, SceneWorld
from mmelkit.methods import get_method
from mmelkit.metrics.localisation import grow_masks, pointing_game, protocol_tolerance
from mmelkit.models.adapter import ClipAdapter

POINTING_SEED = 3_000_017


@dataclass
class PointingStudy:
    """Per-sample hits (``samples``: method, scene, objects, caption, hit) and the summary table
    (hit rate per method, overall and per object count, with the random baseline). ``hit`` is a
    float in [0, 1]: 0 or 1 for a unique maximum, the share of tied maxima on the mask otherwise."""

    samples: pd.DataFrame
    table: pd.DataFrame

    def __str__(self) -> str:
        return self.table.to_string(float_format=lambda v: f"{v:.1%}")


def scene_pointing_game(
    model: ClipAdapter,
    methods: Sequence[str] = ("grad_eclip", "mmel"),
    num_scenes: int = 200,
    objects: tuple[int, int] = (1, 4),
    seed: int = POINTING_SEED,
    batch_size: int = 32,
    method_params: dict[str, dict[str, Any]] | None = None,
    tolerance: int | None = None,
    progress: bool = True,
) -> PointingStudy:
    """Run the pointing game for ``methods`` on ``num_scenes`` scenes of ``objects`` (min, max)
    objects each, at the model's input size. A method that fails is reported with an error row.

    ``tolerance``: pixels around the mask that still count as a hit. Default: the usual 15 px at
    224 px scaled to the model's input (4 px at 64 px), so that a patch-level map whose maximum
    patch covers a small object is not failed for landing at the patch's centre."""
    for name in methods:  # a misspelt name fails here, not as a failed row after the others ran
        get_method(name)
    positive_int("num_scenes", num_scenes)
    positive_int("batch_size", batch_size)
    if tolerance is None:
        tolerance = protocol_tolerance(model.image_size[0])
    low, high = objects
    config = SceneConfig(min_objects=low, max_objects=high).scaled(model.image_size[0])
    world = SceneWorld(config, seed=seed)
    rng = np.random.default_rng([seed, 1])
    scenes = [world[i] for i in range(num_scenes)]
    picks = [int(rng.integers(0, len(s.objects))) for s in scenes]
    captions = [s.captions_of("object")[k] for s, k in zip(scenes, picks, strict=True)]
    masks = torch.from_numpy(np.stack([s.mask_of(c) for s, c in zip(scenes, captions, strict=True)]))
    # the chance a uniformly random pixel lands on the object (grown by the tolerance): the baseline
    chance = grow_masks(masks, tolerance).flatten(1).float().mean(dim=1)
    rows: list[dict[str, Any]] = []
    params = method_params or {}
    for name in tqdm(methods, disable=not progress, desc="pointing game", unit="method"):
        hits = torch.zeros(num_scenes, dtype=torch.float32)
        error = ""
        try:
            method = get_method(name)(model, **params.get(name, {}))
            for start in range(0, num_scenes, batch_size):
                batch = slice(start, start + batch_size)
                result = method.explain([s.image for s in scenes[batch]], [c.text for c in captions[batch]])
                maps = result.upsample(tuple(masks.shape[-2:]))
                hits[batch] = pointing_game(maps, masks[batch].to(maps.device), tolerance).cpu()
        except Exception as exc:  # reported in the table, never hidden
            error = f"{type(exc).__name__}: {exc}"
        for n, (scene, caption) in enumerate(zip(scenes, captions, strict=True)):
            rows.append({"method": name, "scene": scene.index, "objects": len(scene.objects),
                         "caption": caption.text, "hit": float(hits[n]) if not error else None, "error": error})
    for n, scene in enumerate(scenes):
        rows.append({"method": "random (chance)", "scene": scene.index, "objects": len(scene.objects),
                     "caption": captions[n].text, "hit": float(chance[n]), "error": ""})
    samples = pd.DataFrame(rows)
    valid = samples[samples["error"] == ""]
    table = valid.pivot_table(index="method", columns="objects", values="hit", aggfunc="mean")
    table.columns = [f"{c} object{'s' if c > 1 else ''}" for c in table.columns]
    table.insert(0, "all", valid.groupby("method")["hit"].mean())
    failed = samples.loc[samples["error"] != "", ["method", "error"]].drop_duplicates()
    for _, row in failed.iterrows():
        table.loc[row["method"], "all"] = float("nan")
        table.loc[row["method"], "error"] = row["error"]
    return PointingStudy(samples, table.loc[[*methods, "random (chance)"]])
