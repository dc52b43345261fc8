"""The speed benchmarks run end to end on tiny settings and print what they promise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import compare_cpu
        import explain_speed

        yield explain_speed, compare_cpu
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_explain_speed_prints_a_row_per_method_batch_and_dtype(scripts, capsys, tmp_path) -> None:
    explain_speed, _ = scripts
    csv_path, md_path = tmp_path / "speed.csv", tmp_path / "speed.md"
    rows = explain_speed.main([
        "--model", "scene-clip", "--methods", "grad_cam,rise", "--batch-sizes", "4", "--pairs", "4",
        "--repeats", "1", "--warmup", "1", "--dtypes", "fp32,fp16", "--device", "cpu",
        "--rise-masks", "16", "--rise-pairs", "1", "--param", "rise.batch_size=8",
        "--csv", str(csv_path), "--markdown", str(md_path),
    ])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("method "))
    for column in ("method", "model", "device", "dtype", "batch", "pairs", "median", "best", "peak MiB", "target",
                   "verdict"):
        assert column in header
    assert "fp16 skipped on the CPU" in out  # a dtype the device cannot run gets a note, not a row
    assert [(r.method, r.dtype, r.batch) for r in rows] == [("grad_cam", "fp32", 4), ("rise", "fp32", 1)]
    grad_cam, rise = rows
    assert grad_cam.rate and grad_cam.rate > 0 and grad_cam.unit == "pairs/s" and grad_cam.peak_mib is not None
    assert rise.rate and rise.unit == "maps/s" and rise.params == {"masks": 16, "batch_size": 8}
    # targets are quoted, but judged only for ViT-B/16 on CUDA in bf16
    assert grad_cam.target == ">=4,000 pairs/s" and grad_cam.verdict == "n/a"
    assert "pairs/s" in out and "maps/s" in out and "peak MiB:" in out
    assert csv_path.read_text().splitlines()[0].startswith("method,model,device,dtype,batch")
    assert md_path.read_text().startswith("| method | model |")


def test_explain_speed_rejects_text_side_methods(scripts) -> None:
    explain_speed, _ = scripts
    with pytest.raises(SystemExit):
        explain_speed.main(["--methods", "grad_eclip_text", "--device", "cpu"])


def test_compare_cpu_grad_cam_agrees_with_pytorch_grad_cam(scripts, capsys) -> None:
    pytest.importorskip("pytorch_grad_cam")
    _, compare_cpu = scripts
    (result,) = compare_cpu.main(["--pairs", "2", "--repeats", "1", "--warmup", "0", "--only", "grad_cam"])
    out = capsys.readouterr().out
    assert "speed-up" in out and "max|diff|" in out and "agree" in out
    assert result.agree == "yes" and result.spearman > 0.99
    assert result.ours_rate > 0 and result.baseline_rate > 0


def test_compare_cpu_captum_maps_agree(scripts, capsys) -> None:
    pytest.importorskip("captum")
    _, compare_cpu = scripts
    results = compare_cpu.main(["--pairs", "2", "--repeats", "1", "--warmup", "0", "--ig-steps", "4",
                                "--only", "integrated_gradients,occlusion"])
    out = capsys.readouterr().out
    assert [r.map_name for r in results] == ["Integrated Gradients", "Occlusion"]
    for result in results:
        assert result.agree == "yes", (result.map_name, result.max_diff)
        assert result.spearman > 0.99
        assert f"{result.speedup:.2f}x" in out


def test_compare_cpu_skips_missing_libraries_with_the_install_hint(scripts, capsys, monkeypatch) -> None:
    _, compare_cpu = scripts
    monkeypatch.setattr(compare_cpu, "have", lambda module: False)
    results = compare_cpu.main(["--pairs", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert all(r.skipped for r in results) and len(results) == 3
    assert 'pip install "mmelkit[bench]"' in out


def test_metric_speed_prints_maps_per_second(capsys, tmp_path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import metric_speed
    finally:
        sys.path.remove(str(BENCHMARKS))
    md_path = tmp_path / "metric.md"
    rows = metric_speed.main(["--model", "scene-clip", "--device", "cpu", "--maps", "2", "--steps", "3",
                              "--batches", "4", "--repeats", "1", "--markdown", str(md_path)])
    out = capsys.readouterr().out
    assert [(r.dtype, r.batch, r.steps) for r in rows] == [("fp32", 4, 3)]
    assert rows[0].median > 0 and rows[0].images_per_second == pytest.approx(rows[0].median * 8)
    # the target is quoted but judged only for ViT-B/16 on CUDA in bf16 with 100 steps
    assert rows[0].target == ">=50 maps/s" and rows[0].verdict == "n/a"
    assert "maps/s (median)" in out and "8 forward images" in out
    assert md_path.read_text().startswith("| model | device |")


def test_vlm_explain_cost_prints_a_ratio_per_method(capsys, tmp_path, monkeypatch) -> None:
    from conftest import tiny_llava

    from mmelkit.models.vlm import scene_llava

    folder = tmp_path / "tiny"
    tiny_llava().save_pretrained(folder)
    scene_llava.build_processor(image_size=48, patch_size=8).save_pretrained(folder)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import vlm_explain_cost

        monkeypatch.setattr(sys, "argv", ["vlm_explain_cost.py", "--model", str(folder), "--rows", "2",
                                          "--repeats", "1", "--device", "cpu"])
        vlm_explain_cost.main()
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = capsys.readouterr().out
    for method in ("answer_attention", "answer_gradient_x_input", "answer_relevancy", "answer_integrated_gradients",
                   "answer_occlusion", "attention_knockout", "causal_trace"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {method} |"))
        assert float(row.split("|")[4]) > 0
