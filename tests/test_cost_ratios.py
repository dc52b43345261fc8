"""benchmarks/cost_ratios.py: every registered method declares its least work, and the script runs
end to end on tiny settings (no timing is asserted: speed is measured by the script, never here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mmelkit.methods.base import REGISTRY, Method

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def cost_ratios():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import cost_ratios

        yield cost_ratios
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_every_registered_method_has_a_bound(cost_ratios) -> None:
    missing = sorted(set(REGISTRY) - set(cost_ratios.BOUNDS))
    assert not missing, f"add a cost bound to BOUNDS in benchmarks/cost_ratios.py for: {missing}"
    stale = sorted(set(cost_ratios.BOUNDS) - set(REGISTRY))
    assert not stale, f"BOUNDS names methods that are not registered: {stale}"
    for name, bound in cost_ratios.BOUNDS.items():
        assert bound.tower == {"clip": "text" if REGISTRY[name].modality == "text" else "image",
                               "vlm": "vlm"}[REGISTRY[name].explains], name
    assert set(cost_ratios.EXPLANATIONS) | set(cost_ratios.BELOW_BOUND) <= set(REGISTRY)


def test_a_method_without_a_bound_stops_the_script(cost_ratios, monkeypatch) -> None:
    class Unbounded(Method):
        name = "unbounded_method"
        family = "test"
        reference = "-"

    monkeypatch.setitem(REGISTRY, Unbounded.name, Unbounded)
    with pytest.raises(SystemExit, match="unbounded_method"):
        cost_ratios.main(["--device", "cpu", "--methods", "raw_attention", "--batch-sizes", "1"])


def test_cost_ratios_runs_every_clip_method(cost_ratios, tmp_path, capsys) -> None:
    json_path, md_path = tmp_path / "ratios.json", tmp_path / "ratios.md"
    result = cost_ratios.main([
        "--device", "cpu", "--threads", "1", "--batch-sizes", "1,2", "--repeats", "1", "--warmup", "0",
        "--param", "rise.masks=4", "--param", "integrated_gradients.steps=2", "--param", "smoothgrad.samples=2",
        "--param", "integrated_gradients_text.steps=2", "--param", "occlusion.window=32",
        "--json", str(json_path), "--markdown", str(md_path),
    ])
    clip = sorted(name for name, cls in REGISTRY.items() if cls.explains == "clip")
    rows = result["rows"]
    assert sorted({row["method"] for row in rows}) == clip
    assert {(row["method"], row["batch"]) for row in rows} == {(m, b) for m in clip for b in (1, 2)}
    for row in rows:
        assert not row["error"], (row["method"], row["error"])
        assert row["ratio"] > 0 and row["bound"]
        assert row["verdict"] == "-"  # batch 1 and 2 carry no target
    grad_cam = next(r for r in rows if r["method"] == "grad_cam")
    assert grad_cam["grad_cam_ratio"] not in ("", "-")  # a ratio, or "not installed"
    assert all(t["verdict"] == "NOT RUN" for t in result["gpu_targets"])  # no CUDA here
    assert {t["method"] for t in result["gpu_targets"]} >= {"grad_eclip", "rise"}
    assert json.loads(json_path.read_text())["meta"]["reduced"]["rise"] == {"masks": 4}
    table = md_path.read_text()
    assert "| method | bound (least work) | batch |" in table and "NOT RUN" in table
    assert table in capsys.readouterr().out


def test_verdicts_and_explanations(cost_ratios, monkeypatch) -> None:
    monkeypatch.setitem(cost_ratios.EXPLANATIONS, "rise", "the masks' rendering")
    row = cost_ratios.Row("rise", "m", "cpu", "fp32", 8, ratio=2.0)
    cost_ratios.judge(row)
    assert (row.verdict, row.explanation) == ("MISSED", "the masks' rendering")
    row = cost_ratios.Row("rise", "m", "cpu", "fp32", 64, ratio=1.2)
    cost_ratios.judge(row)
    assert (row.verdict, row.explanation) == ("met", "")
    row = cost_ratios.Row("rise", "m", "cpu", "fp32", 1, ratio=3.0)
    cost_ratios.judge(row)
    assert row.verdict == "-" and row.explanation == "the masks' rendering"
    row = cost_ratios.Row("occlusion", "m", "cpu", "fp32", 64, ratio=0.7)
    cost_ratios.judge(row)
    assert row.verdict == "met" and row.explanation == cost_ratios.BELOW_BOUND["occlusion"]
    assert cost_ratios.paired_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0


def test_cost_ratios_runs_the_vlm_methods(cost_ratios, tmp_path) -> None:
    from conftest import tiny_llava

    from mmelkit.models.vlm import scene_llava

    folder = tmp_path / "tiny"
    tiny_llava().save_pretrained(folder)
    scene_llava.build_processor(image_size=48, patch_size=8).save_pretrained(folder)
    vlm = sorted(name for name, cls in REGISTRY.items() if cls.explains == "vlm")
    result = cost_ratios.main([
        "--device", "cpu", "--threads", "1", "--vlm", "--vlm-model", str(folder), "--methods", ",".join(vlm),
        "--vlm-batch-sizes", "2", "--repeats", "1", "--warmup", "0",
        "--param", "answer_integrated_gradients.steps=2", "--param", "answer_occlusion.window=3",
        "--param", "answer_occlusion.stride=3",
    ])
    rows = result["rows"]
    assert sorted(row["method"] for row in rows) == vlm
    for row in rows:
        assert not row["error"], (row["method"], row["error"])
        assert row["ratio"] > 0


def test_gpu_targets_are_measured_with_explain_speed(cost_ratios) -> None:
    """The CUDA branch's measurement, run on the CPU with scene-clip: rates come back, and a verdict
    only where the targets' set-up holds."""
    import argparse

    from mmelkit.models.loading import load_model

    model = load_model("scene-clip", device="cpu")
    args = argparse.Namespace(repeats=1, warmup=0)
    rows = [{"method": m, "target": "-", "rate": None, "unit": "", "verdict": "NOT RUN", "note": "", "batch": None}
            for m in ("grad_cam", "rise")]
    cost_ratios.measure_targets(rows, model, "scene-clip", "fp32", args, 2, 2, 4, applies=False)
    assert all(row["rate"] and row["rate"] > 0 for row in rows)
    assert all(row["verdict"] == "NOT RUN" and "not the targets' set-up" in row["note"] for row in rows)
    cost_ratios.measure_targets(rows, model, "scene-clip", "fp32", args, 2, 2, 4, applies=True)
    assert rows[0]["verdict"] in ("PASS", "MISS")
    assert rows[1]["verdict"] == "NOT RUN"  # RISE is judged only with the target's 2,000 masks


def test_rounds_in_doubt_get_more_rounds(cost_ratios) -> None:
    assert not cost_ratios.in_doubt([1.0, 3.0], [1.0, 1.0])  # too few rounds to tell
    assert not cost_ratios.in_doubt([1.0, 1.05, 1.1, 1.0, 1.02], [1.0] * 5)  # clearly met
    assert not cost_ratios.in_doubt([2.0, 2.5, 2.2, 3.0, 2.1], [1.0] * 5)  # clearly missed
    assert cost_ratios.in_doubt([1.0, 3.0, 0.5, 2.0, 1.0], [1.0] * 5)
    import torch

    calls = {"method": 0, "bound": 0}

    def side(name: str):
        def run() -> None:
            calls[name] += 1

        return run

    times, rounds = cost_ratios.measure({"method": side("method"), "bound": side("bound")}, torch.device("cpu"),
                                        repeats=3, warmup=1, budget=None, extra=4)
    assert rounds == len(times["method"]) == len(times["bound"]) >= 3
    assert calls == {"method": rounds + 1, "bound": rounds + 1}  # one warm-up call each, then the rounds
    assert rounds <= 3 + 4
