"""Scores of generative-VLM answer maps against the scene world's ground truth (SPEC §6;
``mmelkit bench --vlm``).

Items: held-out existence questions answered "yes" and attribute questions, each about one object
(``QAItem.objects == (k,)``). Each method explains the *true* answer (teacher forcing), so every
method explains the same thing whatever the model would have said. Scores per method:

* ``pointing``: the pointing game of the map (upsampled to the image) against the object's mask,
  with the protocol's tolerance (15 px at 224 px, scaled: 4 px at 64; SPEC §4, as the CLIP
  pointing game uses); ``pointing_strict``: the maximum must lie on the mask itself;
* ``iou``: IoU of the map binarised at half its range with the mask;
* ``deletion_auc``: visual tokens replaced by the image's mean token in map order (most salient
  first) at ``deletion_steps`` + 1 fractions 0..1; p(answer) relative to the intact image,
  trapezoid area over the fraction (lower = the map found what the answer needs);
* ``sanity_rho``: Spearman correlation between the maps of the model and of a copy whose decoder
  layers were all re-initialised (cascading randomisation, complete); a method whose maps do not
  change (rho near 1) does not explain the decoder;
* ``seconds``: wall time of the explanations.

The user's model is never modified (the randomised copy is a deep copy).

With an output folder each method's scores are cached (atomically) under ``OUT/vlm_cells/``, keyed
by the model's weights, the configuration and the method, so that an interrupted run (Ctrl-C stops
at once) resumes without computing a finished method again; an unusable cached file is computed
again with a warning naming it, as in :mod:`mmelkit.bench.runner`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mmelkit._checks import positive_int
from mmelkit._io import atomic_write_json, read_cached_record, remove_stale_temporaries
from mmelkit.datasets.vqa import QAItem, VqaConfig, held_out
from mmelkit.methods import explain
from mmelkit.methods.answers import (
    AnswerTarget,
    answer_target,
    chunked_rows,
    clean_visual_tokens,
    target_score,
)
from mmelkit.methods.base import image_methods
from mmelkit.methods.sanity import spearman
from mmelkit.metrics.localisation import check_tolerance, mask_iou, pointing_game, protocol_tolerance

# Held-out offsets (HELD_OUT_SEED + offset) of the bench's questions: apart from those of
# `mmelkit eval vlm` (100-111) and from the validation offsets below 100.
BENCH_SEED = 120
KINDS = ("existence", "attribute")
SCORES = ("pointing", "pointing_strict", "iou", "deletion_auc", "sanity_rho", "seconds")
CACHE_VERSION = 1
# Cheap enough on a CPU for the scene world, faithful to each method's definition.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {"answer_integrated_gradients": {"steps": 16}}


@dataclass
class VlmBenchConfig:
    methods: list[str] = field(default_factory=lambda: image_methods("vlm"))
    samples: int = 32  # questions per kind
    kinds: tuple[str, ...] = KINDS
    deletion_steps: int = 8
    sanity: bool = True
    batch_size: int = 16
    seed: int = BENCH_SEED
    params: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_PARAMS))
    tolerance: int | None = None  # pointing-game pixels around the mask; None: protocol_tolerance(input size)

    def __post_init__(self) -> None:
        known = image_methods("vlm")
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            raise ValueError(f"methods must be VLM answer-map methods from {known}; got {self.methods}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds must be among {KINDS} (questions about one object); got {list(self.kinds)}")
        for name in ("samples", "deletion_steps", "batch_size"):
            positive_int(name, getattr(self, name))
        if self.tolerance is not None:
            check_tolerance(self.tolerance)
        if self.seed < 100:
            raise ValueError("seed must be >= 100: held-out offsets below 100 are validation seeds")


@dataclass
class VlmBenchResult:
    table: pd.DataFrame  # methods x SCORES (means)
    per_item: pd.DataFrame  # one row per (method, item)
    curves: dict[str, np.ndarray]  # method -> mean deletion curve over the fractions
    tolerance: int = 0  # the pixels around the mask that ``pointing`` counted

    def to_markdown(self) -> str:
        lines = [f"| method | pointing (within {self.tolerance} px) | pointing (on the mask) | IoU | "
                 "deletion AUC (lower better) | sanity rho (lower better) | seconds |",
                 "|---|---|---|---|---|---|---|"]
        for method, row in self.table.iterrows():
            lines.append(f"| {method} | {row['pointing']:.3f} | {row['pointing_strict']:.3f} | {row['iou']:.3f} | "
                         f"{row['deletion_auc']:.3f} | {row['sanity_rho']:.3f} | {row['seconds']:.1f} |")
        return "\n".join(lines)


def bench_items(config: VlmBenchConfig, vqa: VqaConfig | None = None) -> list[QAItem]:
    """The held-out questions about one object: existence "yes" and attribute questions."""
    items: list[QAItem] = []
    for offset, kind in enumerate(config.kinds):
        source = held_out(vqa, seed=config.seed + offset, length=50 * config.samples, kind=kind)  # type: ignore[arg-type]
        chosen = [it for it in source if len(it.objects) == 1 and (kind != "existence" or it.answer == "yes")]
        items += chosen[: config.samples]
    return items


def deletion_curves(vlm: Any, target: AnswerTarget, maps: torch.Tensor, steps: int, batch_size: int = 64) -> torch.Tensor:
    """(N, steps + 1): p(answer) with the top fraction k / steps of visual tokens (in ``maps``' order,
    (N, V)) replaced by the image's mean visual token, divided by p(answer) of the intact image."""
    visual = clean_visual_tokens(vlm, target)
    n, count = visual.shape[:2]
    order = maps.flatten(1).to(visual.device).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(count, device=visual.device).expand(n, -1))
    filler = visual.mean(dim=1, keepdim=True)
    removed = [round(k * count / steps) for k in range(steps + 1)]
    cut = torch.tensor(removed, device=visual.device)
    scores = torch.empty(n * (steps + 1), device=visual.device)
    with torch.no_grad():
        for flat in chunked_rows(n * (steps + 1), batch_size, visual.device):
            row, step = flat // (steps + 1), flat % (steps + 1)
            hidden = rank[row] < cut[step][:, None]  # (B, V)
            copies = torch.where(hidden[..., None], filler[row], visual[row])
            scores[flat] = target_score(vlm, target.select(row), copies).exp()
    curves = scores.view(n, steps + 1)
    return curves / curves[:, :1].clamp_min(1e-30)


def _randomised(vlm: Any, seed: int) -> Any:
    from mmelkit.models.vlm.loading import load_vlm
    from mmelkit.models.vlm.tracing import find_parts

    model = copy.deepcopy(vlm.model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for layer in find_parts(model).decoder_layers:
            for parameter in layer.parameters():
                fresh = torch.randn(parameter.shape, generator=generator) * float(parameter.float().std().clamp_min(1e-3))
                parameter.copy_(fresh.to(parameter.device, parameter.dtype))
    return load_vlm(model, device=vlm.device, dtype=vlm.dtype, processor=vlm.processor)


def vlm_cell_key(fingerprint: str, method: str, config: VlmBenchConfig) -> str:
    """The cache name of one method's scores: everything that determines them."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("methods", "params")}
    settings.update(version=CACHE_VERSION, model=fingerprint, method=method, params=config.params.get(method, {}))
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{method}--{digest}"


def _cached(path: Path, key: str) -> dict[str, Any] | None:
    return read_cached_record(path, key, ("rows", "curve", "summary"), "cached VLM bench scores")


def run_vlm_bench(vlm: Any, config: VlmBenchConfig | None = None, progress: bool = True,
                  out: str | Path | None = None, use_cache: bool = True) -> VlmBenchResult:
    """Score every configured method on the held-out questions (see the module docstring).

    ``out``: folder for the per-method cache (``OUT/vlm_cells``); ``use_cache=False`` recomputes
    (and rewrites) every method."""
    from mmelkit.bench.runner import model_fingerprint

    config = config or VlmBenchConfig()
    cache = Path(out) / "vlm_cells" if out is not None else None
    fingerprint = model_fingerprint(vlm) if cache is not None else ""
    if cache is not None:
        remove_stale_temporaries(cache)
    items = bench_items(config)
    masks = torch.from_numpy(np.stack([it.mask() for it in items]))
    if tuple(masks.shape[-2:]) != vlm.image_size:
        masks = torch.nn.functional.interpolate(masks[:, None].float(), size=vlm.image_size, mode="nearest")[:, 0] > 0.5
    masks = masks.to(vlm.device)
    tolerance = config.tolerance if config.tolerance is not None else protocol_tolerance(vlm.image_size[0])
    other: Any = None  # the randomised copy, made when a method is computed (not for a fully cached run)
    rows, curves, summary = [], {}, []
    for method in tqdm(config.methods, disable=not progress, desc="vlm bench", unit="method"):
        key = vlm_cell_key(fingerprint, method, config)
        path = cache / f"{key}.json" if cache is not None else None
        cell = _cached(path, key) if use_cache and path is not None else None
        if cell is None:
            if config.sanity and other is None:
                other = _randomised(vlm, config.seed)
            cell = _score_method(vlm, other, method, config, items, masks, tolerance)
            cell["key"] = key
            if path is not None:
                atomic_write_json(path, cell)
        rows += cell["rows"]
        curves[method] = np.asarray(cell["curve"], dtype=np.float32)
        summary.append(cell["summary"])
    return VlmBenchResult(pd.DataFrame(summary).set_index("method"), pd.DataFrame(rows), curves, tolerance)


def _score_method(vlm: Any, other: Any, method: str, config: VlmBenchConfig, items: list[QAItem],
                  masks: torch.Tensor, tolerance: int) -> dict[str, Any]:
    """One method's per-item rows, mean deletion curve and summary, as plain JSON-able values."""
    images = [it.scene.image for it in items]
    questions = [it.question for it in items]
    answers = [it.answer for it in items]
    rows: list[dict[str, Any]] = []
    params = config.params.get(method, {})
    maps_list, seconds = [], 0.0
    for start in range(0, len(items), config.batch_size):
        chunk = slice(start, start + config.batch_size)
        began = time.perf_counter()
        maps_list.append(explain(vlm, images[chunk], questions[chunk], method=method, answer=answers[chunk], **params).maps)
        seconds += time.perf_counter() - began
    maps = torch.cat(maps_list)
    upsampled = torch.nn.functional.interpolate(maps[:, None], size=vlm.image_size, mode="bilinear",
                                                align_corners=False)[:, 0]
    pointing = pointing_game(upsampled, masks, tolerance=tolerance)
    strict = pointing_game(upsampled, masks)
    iou = mask_iou(upsampled, masks)
    target = answer_target(vlm, images, questions, answers)
    curve = deletion_curves(vlm, target, maps, config.deletion_steps, batch_size=4 * config.batch_size)
    auc = torch.trapezoid(curve, dx=1.0 / config.deletion_steps, dim=1)
    if other is not None:
        shuffled = torch.cat([explain(other, images[s : s + config.batch_size], questions[s : s + config.batch_size],
                                      method=method, answer=answers[s : s + config.batch_size], **params).maps
                              for s in range(0, len(items), config.batch_size)])
        rho = spearman(maps, shuffled)
    else:
        rho = torch.full((len(items),), float("nan"), device=maps.device)
    mean_curve = [float(v) for v in curve.mean(0).float().cpu()]
    for index, item in enumerate(items):
        rows.append({"method": method, "kind": item.kind, "question": item.question, "answer": item.answer,
                     "pointing": float(pointing[index]), "pointing_strict": float(strict[index]),
                     "iou": float(iou[index]),
                     "deletion_auc": float(auc[index]), "sanity_rho": float(rho[index])})
    summary = {"method": method, "pointing": float(pointing.mean()),
               "pointing_strict": float(strict.mean()), "iou": float(iou.mean()),
               "deletion_auc": float(auc.mean()), "sanity_rho": float(rho.nanmean()),
               "seconds": seconds}
    return {"rows": rows, "curve": mean_curve, "summary": summary}
