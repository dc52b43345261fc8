"""The benchmark runner: methods x datasets x metrics -> a tidy table, curves and figures.

:func:`run_bench` explains every sample of every dataset with every method (a *cell* is one
method on one dataset), scores the maps with the chosen metrics and collects:

* ``samples``: one row per (dataset, method, sample) with every per-sample metric and the error
  of a sample the method failed on (failures are rows, never silently dropped);
* ``table``: one row per (dataset, method, metric) with the mean, its standard error, the number
  of samples it rests on and the number of failed samples;
* ``curves``: the mean deletion/insertion curves and the retrieval Recall@1 curves per cell.

With an output folder each finished cell is cached as JSON under ``OUT/cells/`` keyed by
everything that determines it (model weights, dataset, samples, seed, metric settings, method
and its parameters); a rerun skips cached cells, so an interrupted run resumes where it stopped.
Under ``torchrun`` each rank takes a shard of the samples (see :mod:`mmelkit.bench.distributed`).

Interruptions: cells and result files are written atomically (:mod:`mmelkit._io`), so a Ctrl-C
(which stops the run at once), a SIGTERM or a killed ``torchrun`` worker leaves every finished
cell whole and no half-written file; the rerun computes only the missing cells. A cached cell that
cannot be used anyway (truncated or damaged on disk, or not the cell its name says) is computed
again, with a warning that names the file. Result files are rewritten from all cells at the end of
every run.

Seeds: ``seed`` draws the samples, fixes the metrics' tie-break order and noise, and seeds the
global RNG before each batch of a random method (RISE, SmoothGrad) from the batch's first sample,
so a single-process run repeats exactly; a sharded run of a random method batches differently.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from mmelkit._checks import output_folder, positive_int
from mmelkit._io import atomic_write_json, atomic_write_text, read_cached_record, remove_stale_temporaries
from mmelkit.bench.data import BenchData, check_dataset, load_bench_data
from mmelkit.bench.distributed import broadcast, gather, shard, world
from mmelkit.methods.base import get_method
from mmelkit.metrics.faithfulness import confidence_change
from mmelkit.metrics.localisation import (
    energy_pointing_game,
    mask_auroc,
    mask_iou,
    pointing_game,
    protocol_tolerance,
)
from mmelkit.metrics.perturbation import (
    SUBSTRATES,
    Substrate,
    as_map_tensor,
    even_fractions,
    perturbed_features,
    trapezoid_auc,
    upsample_maps,
)
from mmelkit.metrics.registry import GROUPS, METRICS, resolve_metrics
from mmelkit.metrics.retrieval import RETRIEVAL_FRACTIONS, retrieval_recall
from mmelkit.metrics.scores import ScoreKind, TextScore, text_targets
from mmelkit.models.adapter import ClipAdapter

CACHE_VERSION = 2  # 2: benchmark scenes moved off the training seeds
DEFAULT_METRICS: tuple[str, ...] = GROUPS["faithfulness"] + GROUPS["retrieval"] + GROUPS["localisation"]
# what a cached cell must hold to be used (besides its key)
CELL_FIELDS: tuple[str, ...] = ("method", "dataset", "samples", "curves", "dataset_metrics", "method_metrics", "valid")


@dataclass
class BenchConfig:
    """What to run. ``metrics`` accepts names and groups (see :mod:`mmelkit.metrics.registry`)."""

    methods: list[str]
    datasets: list[str] = field(default_factory=lambda: ["scenes"])
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    samples: int = 64
    batch_size: int = 16  # image-text pairs explained per batch
    perturbation_batch: int = 256  # perturbed images per forward pass
    steps: int = 100  # deletion / insertion steps
    deletion_substrate: Substrate = "black"
    insertion_substrate: Substrate = "blur"
    score: ScoreKind = "cosine"  # deletion / insertion score
    tolerance: int | None = None  # pointing game, pixels; default 15 px at 224 px scaled to the input
    sanity_samples: int = 8  # samples the randomisation check explains
    seed: int = 0
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.methods = list(self.methods)
        if not self.methods:
            raise ValueError("no methods given")
        for name in self.methods:
            get_method(name)  # raises with the list of known methods
            if get_method(name).modality != "image":
                raise ValueError(f"{name} explains texts; the benchmark scores image maps")
            if get_method(name).explains != "clip":
                raise ValueError(f"{name} explains generative VLMs; this benchmark scores CLIP-style models")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods listed twice: {self.methods}")
        self.datasets = list(self.datasets)
        if not self.datasets:
            raise ValueError("no datasets given")
        for spec in self.datasets:
            check_dataset(spec)  # a bad spec fails here, before any model runs (and the CLI exits 2)
        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"datasets listed twice: {self.datasets}")
        self.metrics = resolve_metrics(self.metrics)
        for name in ("samples", "batch_size", "perturbation_batch", "steps", "sanity_samples"):
            positive_int(name, getattr(self, name))
        if self.tolerance is not None and (isinstance(self.tolerance, bool) or not isinstance(self.tolerance, int)
                                           or self.tolerance < 0):
            raise ValueError(f"tolerance must be None or an integer >= 0 (pixels); got {self.tolerance!r}")
        TextScore(self.score)  # validates the kind
        for name in ("deletion_substrate", "insertion_substrate"):
            if getattr(self, name) not in SUBSTRATES:
                raise ValueError(f"{name} must be one of {', '.join(SUBSTRATES)}; got {getattr(self, name)!r}")
        # a copy: dataclasses.replace (preset_config) would otherwise share the preset's dict
        self.method_params = {name: dict(params) for name, params in self.method_params.items()}
        stray = sorted(set(self.method_params) - set(self.methods))
        if stray:
            raise ValueError(f"method_params for methods not being run: {stray}")
        for name, params in self.method_params.items():
            known = get_method(name).defaults
            unknown = sorted(set(params) - set(known))
            if unknown:  # else a TypeError from the method's constructor in the middle of the run
                raise ValueError(f"{name} has no parameter(s) {unknown}; parameters: {sorted(known)}")


@dataclass
class BenchResult:
    samples: pd.DataFrame
    table: pd.DataFrame
    curves: dict[str, dict[str, Any]]
    config: BenchConfig

    def wide(self, sem: bool = False) -> pd.DataFrame:
        """Means as a (dataset, method) x metric table, in the config's order."""
        value = self.table.pivot_table(index=["dataset", "method"], columns="metric", values="sem" if sem else "value",
                                       aggfunc="first", dropna=False)
        order = [m for m in self.config.metrics if m in value.columns]
        rows = [(d, m) for d in self.config.datasets for m in self.config.methods if (d, m) in value.index]
        return value.loc[rows, order]

    def to_markdown(self) -> str:
        """The wide table with mean +- standard error and each metric's direction."""
        return format_markdown(self.wide(), self.wide(sem=True), self.failures())

    def failures(self) -> pd.Series:
        """Failed samples per (dataset, method)."""
        failed = self.samples.assign(failed=self.samples["error"] != "")
        return failed.groupby(["dataset", "method"], sort=False)["failed"].sum()

    def save(self, out: str | Path) -> dict[str, Path]:
        """Write results.csv (tidy), samples.csv, table.md, curves.json and figures.html to ``out``,
        each atomically (a file is the old one or the new one, never a truncated one)."""
        from mmelkit.viz.metrics import bench_figures, write_figures

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"results": out / "results.csv", "samples": out / "samples.csv", "table": out / "table.md",
                 "curves": out / "curves.json", "figures": out / "figures.html"}
        atomic_write_text(paths["results"], self.table.to_csv(index=False))
        atomic_write_text(paths["samples"], self.samples.to_csv(index=False))
        atomic_write_text(paths["table"], self.to_markdown() + "\n")
        atomic_write_json(paths["curves"], self.curves, indent=1)
        write_figures(bench_figures(self), paths["figures"])
        return paths


def format_markdown(values: pd.DataFrame, sems: pd.DataFrame, failures: pd.Series | None = None) -> str:
    arrows = {name: ("↑" if METRICS[name].higher_is_better else "↓") for name in values.columns if name in METRICS}
    header = ["dataset", "method", *[f"{c} {arrows.get(c, '')}".strip() for c in values.columns]]
    if failures is not None:
        header.append("failed")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (dataset, method), row in values.iterrows():
        cells = [str(dataset), str(method)]
        for column, value in row.items():
            sem = sems.loc[(dataset, method), column]
            cells.append("—" if pd.isna(value) else (f"{value:.3f} ± {sem:.3f}" if not pd.isna(sem) else f"{value:.3f}"))
        if failures is not None:
            cells.append(str(int(failures.get((dataset, method), 0))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# Running
# -------------------------------------------------------------------------------------------------


def run_bench(model: ClipAdapter, config: BenchConfig, out: str | Path | None = None, progress: bool = True,
              use_cache: bool = True) -> BenchResult:
    """Run every (dataset, method) cell of ``config`` on ``model``; see the module docstring.

    ``out``: folder for the cache (``OUT/cells``) and, on rank 0, the result files. Returns the
    merged result on every rank. ``use_cache=False`` recomputes (and rewrites) every cell.
    """
    if not isinstance(config, BenchConfig):
        raise TypeError(f"config must be a BenchConfig (e.g. BenchConfig(methods=[...]) or preset_config(name)); "
                        f"got {type(config).__name__}")
    if out is not None:
        out = output_folder("out", out)
    rank, _ = world()
    cache = Path(out) / "cells" if out is not None else None
    if cache is not None and rank == 0:
        _remove_leftovers(cache)
    fingerprint = model_fingerprint(model)
    cells: list[dict[str, Any]] = []
    for dataset in config.datasets:
        data: BenchData | None = None
        for method in config.methods:
            key = cell_key(fingerprint, dataset, method, config)
            path = cache / f"{key}.json" if cache is not None else None
            if use_cache and path is not None:
                # rank 0 reads, every rank follows: all skip the cell or all compute it
                cached = broadcast(load_cached_cell(path, key) if rank == 0 else None)
                if cached is not None:
                    cells.append(cached)
                    continue
            if data is None:
                data = load_bench_data(dataset, model, config.samples, config.seed)
                if not len(data):
                    raise ValueError(f"dataset {dataset!r} has no samples")
            cell = run_cell(model, data, method, config, progress=progress and rank == 0)
            cell["key"] = key
            if path is not None and rank == 0:
                atomic_write_json(path, cell)  # a killed run never leaves a half-written cell
            cells.append(cell)
    result = assemble(cells, config)
    if out is not None and rank == 0:
        result.save(out)
    return result


def load_cached_cell(path: Path, key: str) -> dict[str, Any] | None:
    """The cell cached at ``path``; None when there is none or it cannot be used, which is then
    reported (a warning naming the file) so that the caller computes it again."""
    return read_cached_record(path, key, CELL_FIELDS, "cached bench cell")


def _remove_leftovers(cache: Path) -> None:
    """Temporaries of cell writes that a SIGKILL cut short, and the fixed-name ``<key>.tmp`` files
    of earlier versions: never read as cells, removed so they do not pile up."""
    remove_stale_temporaries(cache)
    if cache.is_dir():
        for leftover in cache.glob("*.tmp"):
            if not leftover.name.startswith("."):
                leftover.unlink(missing_ok=True)


def model_fingerprint(model: ClipAdapter) -> str:
    """A short hash of the model's name, parameter shapes and per-tensor sums (cheap, stable)."""
    digest = hashlib.sha1(model.name.encode())
    with torch.no_grad():
        for name, parameter in model.model.named_parameters():
            digest.update(f"{name}{tuple(parameter.shape)}{float(parameter.double().sum()):.10e}".encode())
    return digest.hexdigest()[:16]


def cell_key(fingerprint: str, dataset: str, method: str, config: BenchConfig) -> str:
    settings = {k: v for k, v in asdict(config).items() if k not in ("methods", "datasets", "method_params")}
    settings.update(version=CACHE_VERSION, model=fingerprint, dataset=dataset, method=method,
                    params=config.method_params.get(method, {}))
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{_slug(dataset)}--{method}--{digest}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[-60:]


def run_cell(model: ClipAdapter, data: BenchData, method_name: str, config: BenchConfig,
             progress: bool = True) -> dict[str, Any]:
    """One method on one dataset: per-sample metrics (sharded), then the dataset-level ones."""
    started = time.perf_counter()
    rank, size = world()
    metrics = config.metrics
    wanted = set(metrics)
    method = get_method(method_name)(model, **config.method_params.get(method_name, {}))
    tolerance = config.tolerance if config.tolerance is not None else protocol_tolerance(model.image_size[0])
    # every text embedded once per cell; the candidate set matters only for a softmax / recall score
    targets = text_targets(model, data.texts, data.candidates if config.score != "cosine" else None)
    fractions = even_fractions(config.steps)
    scorer = TextScore(config.score)
    needs_retrieval = bool(wanted & set(GROUPS["retrieval"]))
    retrieval_fractions = torch.tensor(RETRIEVAL_FRACTIONS, dtype=torch.float64)

    def evaluate(indices: list[int]) -> dict[int, dict[str, Any]]:
        pixels = model.preprocess([data.images[i] for i in indices])
        texts = [data.texts[i] for i in indices]
        rng_devices = [pixels.device] if pixels.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(config.seed * 1_000_003 + indices[0])
            maps = as_map_tensor(method.explain(pixels, texts), len(indices)).detach()
        records: dict[int, dict[str, Any]] = {i: {} for i in indices}

        def put(name: str, values: torch.Tensor) -> None:
            for i, v in zip(indices, values.detach().float().cpu().tolist(), strict=True):
                records[i][name] = v

        if wanted & set(GROUPS["localisation"]):
            masks = data.masks[indices].to(pixels.device)
            upsampled = upsample_maps(maps, tuple(masks.shape[-2:]))
            has_mask = masks.flatten(1).any(dim=1)
            full = masks.flatten(1).all(dim=1)
            nan = torch.full((len(indices),), float("nan"), device=pixels.device)
            for name, fn in (("pointing_game", lambda m, k: pointing_game(m, k, tolerance)),
                             ("energy_pointing_game", energy_pointing_game), ("iou", mask_iou), ("auroc", mask_auroc)):
                if name in wanted:
                    valid = has_mask & ~full if name == "auroc" else has_mask
                    values = nan.clone()
                    if valid.any():
                        values[valid] = fn(upsampled[valid], masks[valid]).float()
                    put(name, values)
        for mode in ("deletion", "insertion"):
            if f"{mode}_auc" in wanted:
                substrate = config.deletion_substrate if mode == "deletion" else config.insertion_substrate
                features = perturbed_features(model, pixels, maps, fractions, mode, substrate,
                                              config.perturbation_batch, config.seed)
                scores = scorer(features, targets.embeddings, targets.targets[indices])
                put(f"{mode}_auc", trapezoid_auc(fractions, scores))
                for i, row in zip(indices, _host_rows(scores), strict=True):
                    records[i][f"{mode}_curve"] = row
            if needs_retrieval:
                substrate = config.deletion_substrate if mode == "deletion" else config.insertion_substrate
                features = perturbed_features(model, pixels, maps, retrieval_fractions, mode, substrate,
                                              config.perturbation_batch, config.seed)
                for i, row in zip(indices, _host_rows(features), strict=True):
                    records[i][f"{mode}_features"] = row
        if wanted & {"confidence_drop", "confidence_increase"}:
            change = confidence_change(model, pixels, texts, maps, candidates=data.candidates,
                                       batch_size=config.perturbation_batch, seed=config.seed)
            put("confidence_drop", change.drop)
            put("confidence_increase", change.increase)
        return records

    def evaluate_safely(indices: list[int]) -> dict[int, dict[str, Any]]:
        try:
            return evaluate(indices)
        except Exception as error:  # isolate the failing samples; report them, keep the rest
            if len(indices) > 1:
                records: dict[int, dict[str, Any]] = {}
                for i in indices:
                    records.update(evaluate_safely([i]))
                return records
            return {indices[0]: {"error": f"{type(error).__name__}: {error}"}}

    mine = list(shard(len(data), rank, size))
    part: dict[int, dict[str, Any]] = {}
    batches = [mine[k:k + config.batch_size] for k in range(0, len(mine), config.batch_size)]
    for batch in tqdm(batches, disable=not progress, desc=f"{method_name} on {data.name}", unit="batch"):
        part.update(evaluate_safely(batch))
    merged: dict[int, dict[str, Any]] = {}
    for piece in gather(part):
        merged.update(piece)
    ordered = [merged[i] for i in range(len(data))]
    return _summarise_cell(model, data, method_name, config, ordered, fractions, retrieval_fractions,
                           time.perf_counter() - started)


def _host_rows(values: torch.Tensor) -> list[torch.Tensor]:
    """One host copy of a batch, split into compact per-sample tensors (a row view would carry
    the whole batch's storage into the gather and the pickle)."""
    return [row.clone() for row in values.detach().cpu()]


def _summarise_cell(model: ClipAdapter, data: BenchData, method_name: str, config: BenchConfig,
                    records: list[dict[str, Any]], fractions: torch.Tensor, retrieval_fractions: torch.Tensor,
                    seconds: float) -> dict[str, Any]:
    wanted = set(config.metrics)
    valid = [k for k, r in enumerate(records) if "error" not in r]
    rows = []
    for k, record in enumerate(records):
        row: dict[str, Any] = {"sample": k, "id": data.ids[k] if data.ids else str(k), "objects": data.objects[k],
                               "text": data.texts[k], "error": record.get("error", "")}
        for name in config.metrics:
            if METRICS[name].scope == "sample":
                row[name] = record.get(name, float("nan"))
        rows.append(row)
    curves: dict[str, Any] = {}
    dataset_metrics: dict[str, float] = {}
    texts = [data.texts[k] for k in valid]
    # the caption gallery of the retrieval protocol, embedded once for both modes
    captions = text_targets(model, texts) if wanted & set(GROUPS["retrieval"]) and len(valid) > 1 else None
    for mode in ("deletion", "insertion"):
        if f"{mode}_auc" in wanted and valid:
            mean = torch.stack([records[k][f"{mode}_curve"] for k in valid]).mean(dim=0)
            curves[f"{mode}_auc"] = {"fractions": fractions.tolist(), "score": config.score, "mean": mean.tolist()}
        if wanted & {f"{mode}_ir", f"{mode}_tr"} and captions is not None and len(captions.texts) > 1:
            features = torch.stack([records[k][f"{mode}_features"] for k in valid]).to(captions.embeddings.device)
            image_recall, text_recall = retrieval_recall(features, texts, captions.embeddings, captions.texts)
            curves[f"{mode}_retrieval"] = {"fractions": retrieval_fractions.tolist(),
                                           "image_retrieval": image_recall.tolist(),
                                           "text_retrieval": text_recall.tolist()}
            dataset_metrics[f"{mode}_ir"] = float(trapezoid_auc(retrieval_fractions, image_recall))
            dataset_metrics[f"{mode}_tr"] = float(trapezoid_auc(retrieval_fractions, text_recall))
    method_metrics: dict[str, Any] = {}
    if "randomisation" in wanted:
        method_metrics = _randomisation(model, data, method_name, config, valid)
    return {"method": method_name, "dataset": data.name, "samples": rows, "curves": curves,
            "dataset_metrics": dataset_metrics, "method_metrics": method_metrics,
            "valid": len(valid), "seconds": seconds}


def _randomisation(model: ClipAdapter, data: BenchData, method_name: str, config: BenchConfig,
                   valid: Sequence[int]) -> dict[str, Any]:
    """Cascading randomisation on the first valid samples; computed on rank 0 and shared."""
    from mmelkit.methods.sanity import randomisation_check, summarise_randomisation

    rank, _ = world()
    value: dict[str, Any] = {}
    if rank == 0:
        chosen = list(valid)[: config.sanity_samples]
        try:
            if not chosen:
                raise ValueError("no sample the method could explain")
            table = randomisation_check(
                model, model.preprocess([data.images[k] for k in chosen]), [data.texts[k] for k in chosen],
                methods=[method_name], method_params={method_name: config.method_params.get(method_name, {})},
                seed=config.seed)
            summary = summarise_randomisation(table).loc[method_name]
            value = {"randomisation": summary["final_spearman"], "randomisation_n": len(chosen),
                     "randomisation_verdict": summary["verdict"], "randomisation_error": summary["error"] or ""}
        except Exception as error:
            value = {"randomisation": float("nan"), "randomisation_n": 0, "randomisation_verdict": "error",
                     "randomisation_error": f"{type(error).__name__}: {error}"}
    return gather(value)[0]


def assemble(cells: list[dict[str, Any]], config: BenchConfig) -> BenchResult:
    """Merge cells into the per-sample frame, the tidy table and the curves."""
    sample_frames, rows, curves = [], [], {}
    for cell in cells:
        frame = pd.DataFrame(cell["samples"])
        frame.insert(0, "method", cell["method"])
        frame.insert(0, "dataset", cell["dataset"])
        sample_frames.append(frame)
        failed = int((frame["error"] != "").sum())
        for name in config.metrics:
            info = METRICS[name]
            value, sem, count, note = float("nan"), float("nan"), 0, ""
            if info.scope == "sample":
                values = frame[name].astype(float).dropna() if name in frame else pd.Series(dtype=float)
                count = len(values)
                if count:
                    value = float(values.mean())
                    sem = float(values.std(ddof=1) / math.sqrt(count)) if count > 1 else float("nan")
            elif info.scope == "dataset":
                value = cell["dataset_metrics"].get(name, float("nan"))
                count = cell["valid"] if not math.isnan(value) else 0
            else:
                value = float(cell["method_metrics"].get(name, float("nan")))
                count = int(cell["method_metrics"].get(f"{name}_n", 0))
                note = str(cell["method_metrics"].get(f"{name}_error", ""))
            rows.append({"dataset": cell["dataset"], "method": cell["method"], "metric": name, "value": value,
                         "sem": sem, "n": count, "failed": failed, "category": info.category,
                         "higher_is_better": info.higher_is_better, "note": note})
        for curve, data in cell["curves"].items():
            curves[f"{cell['dataset']}|{cell['method']}|{curve}"] = data
    samples = pd.concat(sample_frames, ignore_index=True) if sample_frames else pd.DataFrame()
    return BenchResult(samples, pd.DataFrame(rows), curves, config)
