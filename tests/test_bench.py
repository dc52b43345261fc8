"""The benchmark runner (mmelkit.bench) and the ``mmelkit bench`` command."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import make_open_clip

import mmelkit
from mmelkit.bench import (
    BenchConfig,
    BenchResult,
    load_bench_data,
    paper_table,
    preset_config,
    run_bench,
    runner,
)
from mmelkit.bench.distributed import gather, shard, world
from mmelkit.bench.presets import CLUTTER_COUNTS, PRESETS, clutter_table, relative_to_grad_eclip
from mmelkit.bench.runner import cell_key, model_fingerprint
from mmelkit.cli import main
from mmelkit.methods.base import REGISTRY, Explanation, Method, get_method, normalise_maps, register
from mmelkit.metrics.faithfulness import confidence_change, deletion_curves, insertion_curves
from mmelkit.metrics.localisation import energy_pointing_game, mask_auroc, mask_iou, pointing_game
from mmelkit.metrics.perturbation import upsample_maps
from mmelkit.metrics.registry import GROUPS, METRICS
from mmelkit.metrics.retrieval import retrieval_protocol

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
CHEAP = ["deletion_auc", "pointing_game", "insertion_ir"]  # one metric of each kind of scope


@pytest.fixture(scope="module")
def tiny() -> mmelkit.ClipAdapter:
    return mmelkit.load_model(make_open_clip(seed=5), device="cpu")


def close(a: Any, b: Any, atol: float = 1e-4) -> bool:
    return bool(np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), atol=atol, rtol=0, equal_nan=True))


# -------------------------------------------------------------------------------------------------
# Bad input: a ValueError that says what is wrong, and exit 2 from the command line
# -------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"methods": ["nope"]}, "unknown method 'nope'; methods: .*grad_eclip"),
    ({"methods": ["grad_eclip_text"]}, "grad_eclip_text explains texts"),
    ({"methods": []}, "no methods given"),
    ({"methods": ["grad_eclip", "grad_eclip"]}, "methods listed twice"),
    ({"metrics": ["bogus"]}, "unknown metric 'bogus'; metrics and groups: .*deletion_auc"),
    ({"metrics": []}, "no metrics given"),
    ({"datasets": []}, "no datasets given"),
    ({"datasets": ["scenes", "scenes"]}, "datasets listed twice"),
    ({"samples": 0}, r"samples must be an integer >= 1; got 0"),
    ({"samples": True}, r"samples must be an integer >= 1; got True"),
    ({"steps": 0}, r"steps must be an integer >= 1; got 0"),
    ({"batch_size": -2}, r"batch_size must be an integer >= 1; got -2"),
    ({"score": "bogus"}, "unknown score 'bogus'"),
    ({"deletion_substrate": "bogus"}, "deletion_substrate must be one of black, mean, blur, noise; got 'bogus'"),
    ({"tolerance": -1}, "tolerance must be None or an integer >= 0"),
    ({"method_params": {"raw_attention": {}}}, r"method_params for methods not being run: \['raw_attention'\]"),
    ({"method_params": {"grad_eclip": {"bogus": 1}}}, r"grad_eclip has no parameter\(s\) \['bogus'\]"),
    ({"datasets": ["nowhere"]}, "unknown dataset 'nowhere'; datasets: scenes"),
    ({"datasets": ["scenes:0"]}, "object counts must look like K or MIN-MAX .*got '0'"),
    ({"datasets": ["scenes:3-2"]}, "object counts must look like K or MIN-MAX .*got '3-2'"),
    ({"datasets": ["scenes:many"]}, "object counts must look like K or MIN-MAX .*got 'many'"),
    ({"datasets": ["scenes:17"]}, "object counts .*<= 16"),
    ({"datasets": ["photos:3"]}, "photos takes no argument"),
    ({"datasets": ["coco"]}, "coco needs a folder: coco:/path/to/coco"),
    ({"datasets": ["coco-captions"]}, "coco-captions needs a folder"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS, ids=[str(c[0]) for c in BAD_CONFIGS])
def test_config_rejects_bad_input(overrides: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**{"methods": ["grad_eclip"], **overrides})


def test_config_accepts_good_input():
    config = BenchConfig(methods=["grad_eclip", "raw_attention"], datasets=["scenes", "scenes:2-3", "scenes:5", "photos"],
                         metrics=["faithfulness", "iou"], method_params={"grad_eclip": {}})
    assert config.metrics == [*GROUPS["faithfulness"], "iou"]
    assert config.datasets == ["scenes", "scenes:2-3", "scenes:5", "photos"]


def test_missing_coco_folder_is_a_clear_error(tmp_path: Path, tiny: mmelkit.ClipAdapter):
    missing = tmp_path / "no-coco"
    with pytest.raises(ValueError, match=r"coco:.*no-coco.*missing; expected ROOT/val2017/"):
        BenchConfig(methods=["grad_eclip"], datasets=[f"coco:{missing}"])
    partial = tmp_path / "coco"
    (partial / "val2017").mkdir(parents=True)
    with pytest.raises(ValueError, match="instances_val2017.json") as caught:
        BenchConfig(methods=["grad_eclip"], datasets=[f"coco-captions:{partial}"])
    assert "val2017," not in str(caught.value)  # the folder that exists is not listed as missing
    with pytest.raises(ValueError, match="missing"):  # the loader checks as well
        load_bench_data(f"coco:{missing}", tiny, 2)
    with pytest.raises(ValueError, match="unknown dataset 'nowhere'"):
        load_bench_data("nowhere", tiny, 2)


BAD_ARGS = [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--methods", "grad_eclip_text"], "grad_eclip_text explains texts"),
    (["--methods", "grad_eclip", "--metrics", "deletion_auc,bogus"], "unknown metric 'bogus'"),
    (["--methods", "grad_eclip", "--samples", "0"], "samples must be an integer >= 1"),
    (["--methods", "grad_eclip", "--steps", "0"], "steps must be an integer >= 1"),
    (["--methods", "grad_eclip", "--datasets", "nowhere"], "unknown dataset 'nowhere'"),
    (["--methods", "grad_eclip", "--datasets", "scenes,scenes:0"], "object counts must look like"),
    (["--methods", "grad_eclip", "--datasets", "scenes:3-2"], "object counts must look like"),
    (["--methods", "grad_eclip", "--datasets", "coco"], "coco needs a folder"),
    (["--methods", "grad_eclip", "--datasets", "coco:{tmp}/absent"], "absent/val2017"),
    (["--methods", ","], "no methods given"),
    (["--datasets", "scenes"], "give --methods"),
    (["--preset", "clutter", "--methods", "nope"], "unknown method 'nope'"),
    (["--preset", "mmel-paper", "--samples", "0"], "samples must be an integer >= 1"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_cli_bad_arguments_exit_2(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["bench", *argv, "--device", "cpu", "--quiet", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("mmelkit bench: ")
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert not out.exists()  # nothing ran


# -------------------------------------------------------------------------------------------------
# A run: the table, the per-sample values against the metric functions, the files
# -------------------------------------------------------------------------------------------------


def test_run_matches_the_metric_functions(tiny: mmelkit.ClipAdapter, tmp_path: Path):
    seed, steps = 3, 4
    config = BenchConfig(methods=["grad_eclip", "raw_attention"], datasets=["scenes"],
                         metrics=["faithfulness", "retrieval", "localisation"], samples=5, steps=steps, batch_size=2,
                         seed=seed)
    result = run_bench(tiny, config, progress=False)
    table, samples = result.table, result.samples
    metrics = [*GROUPS["faithfulness"], *GROUPS["retrieval"], *GROUPS["localisation"]]
    assert list(zip(table["method"], table["metric"], strict=True)) == [
        (m, k) for m in config.methods for k in metrics]
    assert (table["dataset"] == "scenes").all()
    assert (table["n"] == 5).all() and (table["failed"] == 0).all()
    assert np.isfinite(table["value"]).all()
    assert (table["higher_is_better"] == [METRICS[k].higher_is_better for k in table["metric"]]).all()
    assert len(samples) == 10 and (samples["error"] == "").all()
    assert list(samples["sample"]) == [0, 1, 2, 3, 4] * 2

    # the same maps, explained in the runner's batches ([0, 1], [2, 3], [4]), scored directly
    data = load_bench_data("scenes", tiny, 5, seed)
    pixels = tiny.preprocess(data.images)
    size = tuple(pixels.shape[-2:])
    tolerance = round(15 * size[0] / 224)
    for name in config.methods:
        method = get_method(name)(tiny)
        maps = torch.cat([method.explain(pixels[k:k + 2], data.texts[k:k + 2]).maps for k in (0, 2, 4)]).detach()
        rows = samples[samples["method"] == name]
        assert list(rows["text"]) == data.texts
        deletion = deletion_curves(tiny, pixels, data.texts, maps, steps=steps, substrate="black", seed=seed)
        insertion = insertion_curves(tiny, pixels, data.texts, maps, steps=steps, substrate="blur", seed=seed)
        assert close(rows["deletion_auc"], deletion.auc, 1e-5)
        assert close(rows["insertion_auc"], insertion.auc, 1e-5)
        change = confidence_change(tiny, pixels, data.texts, maps, candidates=data.candidates, seed=seed)
        assert close(rows["confidence_drop"], change.drop, 1e-3)
        assert close(rows["confidence_increase"], change.increase, 1e-3)
        upsampled = upsample_maps(maps, size)
        assert close(rows["pointing_game"], pointing_game(upsampled, data.masks, tolerance), 1e-6)
        assert close(rows["energy_pointing_game"], energy_pointing_game(upsampled, data.masks), 1e-5)
        assert close(rows["iou"], mask_iou(upsampled, data.masks), 1e-5)
        assert close(rows["auroc"], mask_auroc(upsampled, data.masks), 1e-5)
        cell = table[table["method"] == name].set_index("metric")["value"]
        assert cell["deletion_auc"] == pytest.approx(float(deletion.auc.mean()), abs=1e-5)
        for mode in ("deletion", "insertion"):
            curves = retrieval_protocol(tiny, pixels, data.texts, maps, mode=mode,
                                        substrate="black" if mode == "deletion" else "blur", seed=seed)
            assert cell[f"{mode}_ir"] == pytest.approx(curves.image_retrieval_auc, abs=1e-6)
            assert cell[f"{mode}_tr"] == pytest.approx(curves.text_retrieval_auc, abs=1e-6)
            assert result.curves[f"scenes|{name}|{mode}_retrieval"]["image_retrieval"] == pytest.approx(
                curves.image_retrieval.tolist())
        assert result.curves[f"scenes|{name}|deletion_auc"]["mean"] == pytest.approx(
            deletion.mean_curve().tolist(), abs=1e-5)

    wide = result.wide()
    assert list(wide.index) == [("scenes", "grad_eclip"), ("scenes", "raw_attention")]
    assert list(wide.columns) == metrics
    markdown = result.to_markdown()
    header = markdown.splitlines()[0]
    for name in metrics:
        assert f"{name} {'↑' if METRICS[name].higher_is_better else '↓'}" in header
    assert "deletion_auc ↓" in header and "insertion_auc ↑" in header and header.endswith("failed |")
    assert "| scenes | grad_eclip |" in markdown and "| scenes | raw_attention |" in markdown
    assert "±" in markdown

    paths = result.save(tmp_path)
    assert sorted(p.name for p in paths.values()) == sorted(
        ["results.csv", "samples.csv", "table.md", "curves.json", "figures.html"])
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert "plotly" in paths["figures"].read_text().lower()
    assert paths["table"].read_text() == markdown + "\n"
    saved = pd.read_csv(paths["results"])
    assert list(saved["metric"]) == list(table["metric"]) and close(saved["value"], table["value"], 1e-9)
    assert set(json.loads(paths["curves"].read_text())) == set(result.curves)
    assert len(pd.read_csv(paths["samples"])) == 10


def test_randomisation_metric(tiny: mmelkit.ClipAdapter):
    config = BenchConfig(methods=["grad_eclip"], metrics=["sanity"], samples=3, sanity_samples=2, batch_size=3)
    table = run_bench(tiny, config, progress=False).table
    assert list(table["metric"]) == ["randomisation"]
    row = table.iloc[0]
    assert row["n"] == 2 and math.isfinite(row["value"]) and -1 <= row["value"] <= 1 and row["note"] == ""


# -------------------------------------------------------------------------------------------------
# Determinism, batching, the cache
# -------------------------------------------------------------------------------------------------


def test_same_seed_same_result_other_seed_other_samples(tiny: mmelkit.ClipAdapter, fake_methods: None):
    # RISE seeds itself; _GlobalNoise draws from the global RNG, which the runner seeds per batch
    config = BenchConfig(methods=["grad_eclip", "rise", _GlobalNoise.name], metrics=[*CHEAP, "confidence_drop"],
                         samples=4, steps=3, batch_size=3, method_params={"rise": {"masks": 40, "batch_size": 40}})
    first = run_bench(tiny, config, progress=False)
    torch.rand(7)  # whatever ran in between moved the global RNG
    second = run_bench(tiny, config, progress=False)
    pd.testing.assert_frame_equal(first.table, second.table)
    pd.testing.assert_frame_equal(first.samples, second.samples)
    assert first.curves == second.curves
    other = run_bench(tiny, replace(config, seed=1), progress=False)
    assert list(other.samples["text"]) != list(first.samples["text"])
    assert not close(other.samples["deletion_auc"], first.samples["deletion_auc"], 1e-6)


def test_batch_size_does_not_change_the_values(tiny: mmelkit.ClipAdapter):
    config = BenchConfig(methods=["grad_eclip", "raw_attention"], metrics=["faithfulness", "retrieval", "localisation"],
                         samples=5, steps=4, batch_size=1)
    one = run_bench(tiny, config, progress=False)
    five = run_bench(tiny, replace(config, batch_size=5), progress=False)
    numeric = [c for c in one.samples.columns if c in METRICS]
    assert len(numeric) == 8
    assert close(one.samples[numeric], five.samples[numeric], 1e-4)
    pd.testing.assert_frame_equal(one.samples.drop(columns=numeric), five.samples.drop(columns=numeric))
    assert close(one.table["value"], five.table["value"], 1e-4)
    assert list(one.table["n"]) == list(five.table["n"])


def test_resume_from_the_cache(tiny: mmelkit.ClipAdapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = BenchConfig(methods=["grad_eclip", "raw_attention"], metrics=CHEAP, samples=4, steps=3, batch_size=2)
    first = run_bench(tiny, config, out=tmp_path, progress=False)
    for name in ("results.csv", "samples.csv", "table.md", "curves.json", "figures.html"):
        assert (tmp_path / name).is_file()
    keys = {m: cell_key(model_fingerprint(tiny), "scenes", m, config) for m in config.methods}
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == sorted(f"{k}.json" for k in keys.values())

    real_run_cell = runner.run_cell
    calls: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("a cell was recomputed")

    monkeypatch.setattr(runner, "run_cell", refuse)
    again = run_bench(tiny, config, out=tmp_path, progress=False)
    pd.testing.assert_frame_equal(again.table, first.table)
    pd.testing.assert_frame_equal(again.samples, first.samples)
    assert again.curves == first.curves

    # any setting that changes the numbers changes the key: the cell is recomputed
    for changed in (replace(config, steps=4), replace(config, seed=1), replace(config, metrics=["deletion_auc"]),
                    replace(config, method_params={"grad_eclip": {"layers": 1}})):
        with pytest.raises(AssertionError, match="recomputed"):
            run_bench(tiny, changed, out=tmp_path, progress=False)
    other_model = mmelkit.load_model(make_open_clip(seed=6), device="cpu")
    assert model_fingerprint(other_model) != model_fingerprint(tiny)
    assert model_fingerprint(tiny) == model_fingerprint(mmelkit.load_model(make_open_clip(seed=5), device="cpu"))
    with pytest.raises(AssertionError, match="recomputed"):
        run_bench(other_model, config, out=tmp_path, progress=False)

    # a half-written .tmp (a run killed while writing) is not a cached cell
    def counting(model: Any, data: Any, method: str, cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
        calls.append(method)
        return real_run_cell(model, data, method, cfg, progress=progress)

    monkeypatch.setattr(runner, "run_cell", counting)
    cached = tmp_path / "cells" / f"{keys['raw_attention']}.json"
    text = cached.read_text()
    cached.unlink()
    cached.with_suffix(".tmp").write_text(text[: len(text) // 2])
    resumed = run_bench(tiny, config, out=tmp_path, progress=False)
    assert calls == ["raw_attention"]
    pd.testing.assert_frame_equal(resumed.table, first.table)
    assert json.loads(cached.read_text())["method"] == "raw_attention"
    assert not cached.with_suffix(".tmp").exists()  # replaced by the finished write

    calls.clear()
    run_bench(tiny, config, out=tmp_path, progress=False, use_cache=False)
    assert calls == ["grad_eclip", "raw_attention"]


# -------------------------------------------------------------------------------------------------
# Failures are rows, never dropped
# -------------------------------------------------------------------------------------------------


class _PooledImage(Method):
    """A deterministic map: the image's mean channel pooled to the patch grid."""

    name = "_pooled"
    family = "test"
    reference = "tests/test_bench.py"

    def maps(self, images: Any) -> torch.Tensor:
        pixels = self.model.as_pixels(images)
        return normalise_maps(F.avg_pool2d(pixels.mean(dim=1, keepdim=True), 8)[:, 0])

    def explain(self, images: Any, texts: Any) -> Explanation:
        return Explanation(self.maps(images), self.model.image_size, self.name)


class _RaisesOnWord(_PooledImage):
    name = "_test_raises_on_word"
    word = ""

    def explain(self, images: Any, texts: Any) -> Explanation:
        if any(self.word in text for text in texts):
            raise RuntimeError(f"cannot explain {self.word!r}")
        return super().explain(images, texts)


class _NanForOne(_PooledImage):
    name = "_test_nan_for_one"
    text = ""

    def explain(self, images: Any, texts: Any) -> Explanation:
        maps = self.maps(images)
        for k, text in enumerate(texts):
            if text == self.text:
                maps[k] = float("nan")
        return Explanation(maps, self.model.image_size, self.name)


class _AlwaysFails(_PooledImage):
    name = "_test_always_fails"

    def explain(self, images: Any, texts: Any) -> Explanation:
        raise RuntimeError("this method never works")


class _GlobalNoise(_PooledImage):
    name = "_test_global_noise"

    def maps(self, images: Any) -> torch.Tensor:
        maps = super().maps(images)
        return maps + torch.rand(maps.shape)


@pytest.fixture
def fake_methods() -> Iterator[None]:
    classes = [_RaisesOnWord, _NanForOne, _AlwaysFails, _GlobalNoise]
    try:
        for cls in classes:
            register(cls)
        yield
    finally:
        for cls in classes:
            REGISTRY.pop(cls.name, None)


def test_failed_samples_are_reported(tiny: mmelkit.ClipAdapter, fake_methods: None, tmp_path: Path):
    samples, seed = 6, 0
    texts = load_bench_data("scenes", tiny, samples, seed).texts
    _RaisesOnWord.word = texts[1].split()[-1]  # a shape: every sample of that shape fails
    raises = {k for k, t in enumerate(texts) if _RaisesOnWord.word in t}
    unique = [k for k, t in enumerate(texts) if texts.count(t) == 1 and k not in raises]
    assert len(raises) < samples and unique, f"texts unsuited to the test: {texts}"
    _NanForOne.text = texts[unique[0]]
    names = [_RaisesOnWord.name, _NanForOne.name, _AlwaysFails.name]
    config = BenchConfig(methods=names, metrics=[*CHEAP, "confidence_drop", "insertion_tr"], samples=samples,
                         steps=3, batch_size=2, seed=seed)
    result = run_bench(tiny, config, progress=False)
    expected_failures = {_RaisesOnWord.name: raises, _NanForOne.name: {unique[0]}, _AlwaysFails.name: set(range(samples))}
    messages = {_RaisesOnWord.name: f"RuntimeError: cannot explain {_RaisesOnWord.word!r}",
                _NanForOne.name: "NaN", _AlwaysFails.name: "RuntimeError: this method never works"}
    for name, failing in expected_failures.items():
        rows = result.samples[result.samples["method"] == name].set_index("sample")
        assert len(rows) == samples  # failed samples are rows too
        for k in range(samples):
            if k in failing:
                assert messages[name] in rows.loc[k, "error"]
                assert rows.loc[k, ["deletion_auc", "pointing_game", "confidence_drop"]].isna().all()
            else:
                assert rows.loc[k, "error"] == ""
                assert rows.loc[k, ["deletion_auc", "pointing_game", "confidence_drop"]].notna().all()
        cell = result.table[result.table["method"] == name].set_index("metric")
        assert (cell["failed"] == len(failing)).all()
        valid = samples - len(failing)
        assert (cell.loc[["deletion_auc", "pointing_game", "confidence_drop"], "n"] == valid).all()
        assert (cell.loc[["insertion_ir", "insertion_tr"], "n"] == (valid if valid > 1 else 0)).all()
        if valid:
            assert np.isfinite(cell["value"]).all()
            ok = sorted(set(range(samples)) - failing)
            assert cell.loc["deletion_auc", "value"] == pytest.approx(rows.loc[ok, "deletion_auc"].mean())
        else:
            assert cell["value"].isna().all() and cell["sem"].isna().all()
    assert dict(result.failures()) == {("scenes", n): len(f) for n, f in expected_failures.items()}
    markdown = result.to_markdown()
    line = next(row for row in markdown.splitlines() if _AlwaysFails.name in row)
    assert line.count("—") == len(config.metrics) and line.endswith(f"| {samples} |")
    assert list(result.wide().index) == [("scenes", n) for n in names]
    result.save(tmp_path)  # figures and files despite a method with no values
    assert "plotly" in (tmp_path / "figures.html").read_text().lower()


def test_randomisation_of_a_method_that_always_fails(tiny: mmelkit.ClipAdapter, fake_methods: None):
    config = BenchConfig(methods=[_AlwaysFails.name, "raw_attention"], metrics=["randomisation", "pointing_game"],
                         samples=2, sanity_samples=2)
    table = run_bench(tiny, config, progress=False).table.set_index(["method", "metric"])
    failed = table.loc[(_AlwaysFails.name, "randomisation")]
    assert math.isnan(failed["value"]) and failed["n"] == 0 and "no sample" in failed["note"]
    fine = table.loc[("raw_attention", "randomisation")]
    assert math.isfinite(fine["value"]) and fine["n"] == 2


# -------------------------------------------------------------------------------------------------
# Presets and the paper's layout
# -------------------------------------------------------------------------------------------------


def test_preset_config_overrides():
    config = preset_config("clutter", samples=3, methods=["grad_eclip"], seed=None)
    assert config.samples == 3 and config.methods == ["grad_eclip"] and config.seed == 0
    assert config.datasets == [f"scenes:{k}" for k in CLUTTER_COUNTS]
    assert config.metrics == PRESETS["clutter"].metrics
    assert PRESETS["clutter"].samples == 100 and "grad_eclip" in PRESETS["clutter"].methods
    assert len(PRESETS["clutter"].methods) > 1
    paper = preset_config("mmel-paper")
    paper.method_params["mmel"] = {"layers": 2}
    paper.methods.append("rise")
    assert PRESETS["mmel-paper"].method_params == {} and "rise" not in PRESETS["mmel-paper"].methods
    with pytest.raises(ValueError, match="unknown preset 'nope'; presets: mmel-paper, localisation, clutter"):
        preset_config("nope")
    with pytest.raises(ValueError, match="samples must be"):
        preset_config("localisation", samples=0)
    with pytest.raises(ValueError, match="unknown method"):
        preset_config("localisation", methods=["nope"])


def _hand_made(rows: list[tuple[str, str, str, float]], **config: Any) -> BenchResult:
    table = pd.DataFrame(rows, columns=["dataset", "method", "metric", "value"]).assign(sem=float("nan"), n=1, failed=0)
    return BenchResult(pd.DataFrame(), table, {}, BenchConfig(**config))


def test_paper_table_layout():
    paper_order = ["confidence_drop", "confidence_increase", "deletion_ir", "deletion_tr", "insertion_ir",
                   "insertion_tr"]
    rows, expected = [], {}
    for m, method in enumerate(["grad_cam", "grad_eclip", "mmel"]):
        for k, metric in enumerate(reversed(paper_order)):
            value = 10 * m + k + 0.5
            rows.append(("scenes", method, metric, value))
            expected[(method, metric)] = value
    rows.append(("scenes:4", "mmel", "deletion_ir", 99.0))  # another dataset: not shown
    result = _hand_made(rows, methods=["grad_eclip", "mmel", "grad_cam"], datasets=["scenes", "scenes:4"],
                        metrics=list(reversed(paper_order)))
    table = paper_table(result)
    assert list(table.columns) == ["Confidence Drop ↓", "Confidence Increase ↑", "Deletion AUC IR ↓",
                                   "Deletion AUC TR ↓", "Insertion AUC IR ↑", "Insertion AUC TR ↑"]
    assert list(table.index) == ["grad_eclip (scenes)", "mmel (scenes)", "grad_cam (scenes)",
                                 "grad_cam (paper, MSCOCO)", "mmel (paper, MSCOCO)"]
    for method in ("grad_eclip", "mmel", "grad_cam"):
        assert list(table.loc[f"{method} (scenes)"]) == [expected[(method, k)] for k in paper_order]
    mmel = table.loc["mmel (paper, MSCOCO)"]
    assert mmel["Confidence Drop ↓"] == 0.92 and mmel["Confidence Increase ↑"] == 42.13
    assert mmel["Deletion AUC IR ↓"] == 0.0992 and mmel["Insertion AUC TR ↑"] == 0.2560
    assert math.isnan(mmel["Deletion AUC TR ↓"])
    grad_cam = table.loc["grad_cam (paper, MSCOCO)"]
    assert grad_cam["Confidence Drop ↓"] == 4.96 and grad_cam["Confidence Increase ↑"] == 17.84
    assert grad_cam.iloc[2:].isna().all()
    other = paper_table(result, dataset="scenes:4")
    assert list(other.index)[0] == "mmel (scenes:4)" and list(other.columns) == ["Deletion AUC IR ↓"]
    assert other.iloc[0, 0] == 99.0 and other.loc["mmel (paper, MSCOCO)"].iloc[0] == 0.0992


def test_relative_to_grad_eclip():
    rows = [("scenes", "grad_eclip", "deletion_ir", 0.2), ("scenes", "mmel", "deletion_ir", 0.15),
            ("scenes", "grad_eclip", "insertion_tr", 0.4), ("scenes", "mmel", "insertion_tr", 0.5),
            ("scenes", "grad_eclip", "deletion_tr", 0.0), ("scenes", "mmel", "deletion_tr", 0.1),
            ("scenes", "grad_eclip", "confidence_drop", 3.0), ("scenes", "mmel", "confidence_drop", 1.0)]
    result = _hand_made(rows, methods=["grad_eclip", "mmel"],
                        metrics=["deletion_ir", "deletion_tr", "insertion_tr", "confidence_drop"])
    relative = relative_to_grad_eclip(result)
    assert list(relative.index) == ["deletion_ir", "deletion_tr", "insertion_tr"]
    assert relative.loc["deletion_ir", "measured change"] == pytest.approx(-0.25)
    assert relative.loc["insertion_tr", "measured change"] == pytest.approx(0.25)
    assert math.isnan(relative.loc["deletion_tr", "measured change"])  # no baseline to divide by
    assert relative.loc["deletion_ir", "paper's claim"] == -0.172
    assert relative.loc["insertion_tr", "paper's claim"] == 0.215
    assert relative.loc["insertion_tr", "grad_eclip"] == 0.4 and relative.loc["insertion_tr", "mmel"] == 0.5
    only_one = [row for row in rows if row[1] == "grad_eclip"]  # nothing to compare with
    assert relative_to_grad_eclip(_hand_made(only_one, methods=["grad_eclip"], metrics=["deletion_ir"])).empty


def test_clutter_table_orders_object_counts():
    datasets = [f"scenes:{k}" for k in CLUTTER_COUNTS]
    rows = [(d, m, "pointing_game", CLUTTER_COUNTS[i] + (0.5 if m == "mmel" else 0.0))
            for i, d in reversed(list(enumerate(datasets))) for m in ("mmel", "grad_eclip")]
    rows += [(d, m, "iou", -1.0) for d in datasets for m in ("mmel", "grad_eclip")]
    result = _hand_made(rows, methods=["grad_eclip", "mmel"], datasets=datasets, metrics=["pointing_game", "iou"])
    table = clutter_table(result)
    assert list(table.columns) == [str(k) for k in CLUTTER_COUNTS]  # 1, 2, 4, ... not "1", "12", "16", "2"
    assert table.columns.name == "objects"
    assert list(table.index) == ["grad_eclip", "mmel"]
    assert list(table.loc["grad_eclip"]) == [float(k) for k in CLUTTER_COUNTS]
    assert list(table.loc["mmel"]) == [k + 0.5 for k in CLUTTER_COUNTS]
    assert (clutter_table(result, "iou") == -1.0).all().all()


def test_cli_paper_preset_prints_the_paper_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code = main(["bench", "--preset", "mmel-paper", "--methods", "grad_eclip,mmel", "--samples", "3",
                 "--batch-size", "3", "--device", "cpu", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| scenes | grad_eclip |" in out and "| scenes | mmel |" in out
    assert "mmel (paper, MSCOCO)" in out and "grad_cam (paper, MSCOCO)" in out and "42.13" in out
    assert "MMEL against Grad-ECLIP" in out and "-17.2%" in out
    table = pd.read_csv(tmp_path / "results.csv")
    assert list(table["metric"].unique()) == PRESETS["mmel-paper"].metrics
    assert (table["n"] == 3).all()


# -------------------------------------------------------------------------------------------------
# Sharding over processes
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2, 5, 7, 16, 33])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_shard_covers_every_sample_once(count: int, size: int):
    shards = [shard(count, rank, size) for rank in range(size)]
    assert [i for s in shards for i in s] == list(range(count))  # contiguous, in order, each once
    assert all(s.step == 1 for s in shards)
    lengths = [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_shard_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        shard(5, 2, 2)
    with pytest.raises(ValueError, match="rank -1"):
        shard(5, -1, 2)


def test_gather_without_a_process_group():
    assert world() == (0, 1)
    value = {"a": torch.ones(2)}
    gathered = gather(value)
    assert len(gathered) == 1 and gathered[0] is value


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_torchrun_two_processes_match_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """7 samples on 2 ranks: uneven shards (4 + 3), gathered, must equal the single-process run."""
    assert [len(shard(7, r, 2)) for r in (0, 1)] == [4, 3]
    args = ["bench", "--model", "scene-clip", "--methods", "grad_eclip,raw_attention", "--datasets", "scenes",
            "--metrics", "deletion_auc,insertion_ir,insertion_tr,pointing_game,confidence_drop", "--samples", "7",
            "--steps", "5", "--batch-size", "2", "--device", "cpu", "--quiet"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    sharded, single = tmp_path / "two", tmp_path / "one"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "mmelkit", *args, "--out", str(sharded)]
    process = subprocess.Popen(launch, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        assert main([*args, "--out", str(single)]) == 0  # meanwhile, the same command in this process
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, stderr[-4000:]
    assert stdout.count("| scenes | grad_eclip |") == 1  # only rank 0 prints
    capsys.readouterr()

    one, two = pd.read_csv(single / "results.csv"), pd.read_csv(sharded / "results.csv")
    assert list(one.columns) == list(two.columns) and len(one) == 10
    for column in ("dataset", "method", "metric", "n", "failed"):
        assert list(one[column]) == list(two[column]), column
    assert (one["n"] == 7).all() and (one["failed"] == 0).all()
    assert close(one["value"], two["value"]) and close(one["sem"], two["sem"])
    one, two = pd.read_csv(single / "samples.csv"), pd.read_csv(sharded / "samples.csv")
    assert list(one.columns) == list(two.columns) and len(one) == 14
    numeric = [c for c in one.columns if c in METRICS]
    pd.testing.assert_frame_equal(one.drop(columns=numeric), two.drop(columns=numeric))
    assert close(one[numeric], two[numeric])
    assert len(list((sharded / "cells").glob("*.json"))) == 2


def test_benchmark_scenes_are_not_the_training_scenes() -> None:
    from mmelkit.bench.data import BENCH_SCENE_SEED
    from mmelkit.datasets.scenes import SceneConfig, SceneWorld

    model = mmelkit.load_model("scene-clip", device="cpu")
    data = load_bench_data("scenes", model, 3, seed=0)
    for training_seed in (0, 1):  # the embedded model's two training stages
        training = SceneWorld(SceneConfig().scaled(64), seed=training_seed)
        assert not any(np.array_equal(image, training[k].image) for k, image in enumerate(data.images))
    expected = SceneWorld(SceneConfig().scaled(64), seed=BENCH_SCENE_SEED)
    assert np.array_equal(data.images[0], expected[0].image)


def test_coco_specs_on_a_fixture(tmp_path: Path, tiny: mmelkit.ClipAdapter) -> None:
    from test_datasets_real import _write_coco

    _write_coco(tmp_path)
    categories = load_bench_data(f"coco:{tmp_path}", tiny, 5, seed=0)
    assert len(categories) == 2 and categories.ids == ["1", "2"]
    assert categories.candidates == ["a photo of a cat", "a photo of a dog"]
    assert categories.texts[1] == "a photo of a cat"  # image 2 holds only a cat (its crowd dog is dropped)
    assert categories.masks.shape == (2, *tiny.image_size) and categories.masks.flatten(1).any(dim=1).all()
    # 60 x 40 -> 48 x 32, centre crop 32 x 32 from column 8: the cat square (x 10-30, y 5-25) lands at
    # x 0-16, y 4-20 in the model input; its centre is inside, the far right is not
    cat = categories.masks[1]
    assert cat[12, 8] and not cat[12, 28]
    human = load_bench_data(f"coco-captions:{tmp_path}", tiny, 5, seed=0)
    assert human.texts == ["A cat next to a dog.", "A lonely cat."]
    assert human.candidates == human.texts
    # a human caption refers to every annotated instance: image 1's mask holds the cat and the dog
    assert human.masks[0].sum() > categories.masks[1].sum()
    config = BenchConfig(methods=["raw_attention"], datasets=[f"coco-captions:{tmp_path}"],
                         metrics=["localisation", "retrieval", "confidence_drop"], samples=5, steps=2)
    table = run_bench(tiny, config, progress=False).table
    assert (table["n"] == 2).all() and (table["failed"] == 0).all()
    assert table["value"].notna().all()
