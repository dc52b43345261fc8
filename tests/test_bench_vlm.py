"""The VLM answer-map bench (``mmelkit bench --vlm``) on a tiny random LLaVA: items, deletion
curves against a loop, scores in range, the user's model untouched, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llava

from mmelkit.bench.vlm import VlmBenchConfig, bench_items, deletion_curves, run_vlm_bench
from mmelkit.methods.answers import answer_target, target_score
from mmelkit.models.vlm import VlmAdapter, load_vlm, scene_llava

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm() -> VlmAdapter:
    return load_vlm(tiny_llava(seed=3), device="cpu")


def test_items_are_held_out_questions_about_one_object() -> None:
    items = bench_items(VlmBenchConfig(samples=5))
    assert [it.kind for it in items] == ["existence"] * 5 + ["attribute"] * 5
    assert all(len(it.objects) == 1 and it.mask().any() for it in items)
    assert all(it.answer == "yes" for it in items[:5])


def test_deletion_curves_equal_a_loop(vlm: VlmAdapter) -> None:
    items = bench_items(VlmBenchConfig(samples=2))
    target = answer_target(vlm, [i.scene.image for i in items], [i.question for i in items], [i.answer for i in items])
    maps = torch.rand(len(items), vlm.num_visual_tokens, generator=torch.Generator().manual_seed(0))
    curves = deletion_curves(vlm, target, maps, steps=3, batch_size=5)
    assert curves.shape == (4, 4)
    torch.testing.assert_close(curves[:, 0], torch.ones(4))
    with torch.no_grad():
        visual = vlm.visual_features(target.batch.pixel_values)
        for row in range(4):
            one = target.select(torch.tensor([row]))
            base = target_score(vlm, one, visual[row : row + 1]).exp()
            order = maps[row].argsort(descending=True)
            for step, removed in enumerate([0, 12, 24, 36]):
                copy = visual[row : row + 1].clone()
                copy[0, order[:removed]] = visual[row].mean(0)
                expected = target_score(vlm, one, copy).exp() / base
                torch.testing.assert_close(curves[row, step], expected[0], atol=1e-5, rtol=1e-4)


def test_the_bench_scores_every_method_and_leaves_the_model_alone(vlm: VlmAdapter) -> None:
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    config = VlmBenchConfig(methods=["answer_attention", "answer_occlusion"], samples=2, deletion_steps=2, batch_size=3)
    result = run_vlm_bench(vlm, config, progress=False)
    assert list(result.table.index) == ["answer_attention", "answer_occlusion"]
    for score in ("pointing", "pointing_strict", "iou"):
        assert result.table[score].between(0, 1).all()
    # the protocol's tolerance (15 px at 224, 48 px input: 3 px) only adds hits to the strict game
    assert result.tolerance == 3
    assert (result.per_item["pointing"] >= result.per_item["pointing_strict"]).all()
    assert (result.table["deletion_auc"] > 0).all() and result.table["sanity_rho"].between(-1, 1).all()
    assert len(result.per_item) == 2 * 4 and set(result.per_item["kind"]) == {"existence", "attribute"}
    assert result.curves["answer_attention"].shape == (3,)
    assert "| answer_occlusion |" in result.to_markdown() and "within 3 px" in result.to_markdown()
    for key, value in vlm.model.state_dict().items():
        assert torch.equal(value, before[key]), f"the bench changed {key}"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"methods": ["grad_eclip"]}, "VLM answer-map methods"), ({"kinds": ("count",)}, "kinds"),
    ({"samples": 0}, "samples"), ({"seed": 5}, "validation"), ({"tolerance": -1}, "tolerance"),
    ({"tolerance": 2.5}, "tolerance"),
])
def test_bad_bench_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VlmBenchConfig(**kwargs)


def test_bench_cli_for_a_vlm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmelkit.cli import main

    folder = tmp_path / "tiny"
    tiny_llava(seed=3).save_pretrained(folder)
    scene_llava.build_processor(image_size=48, patch_size=8).save_pretrained(folder)
    out = tmp_path / "out"
    code = main(["bench", "--vlm", str(folder), "--methods", "answer_gradient_x_input", "--samples", "1",
                 "--steps", "2", "--out", str(out), "--quiet"])
    assert code == 0
    assert "| answer_gradient_x_input |" in capsys.readouterr().out
    assert (out / "vlm_table.md").is_file() and (out / "vlm_items.csv").is_file()
    assert main(["bench", "--vlm", str(folder), "--preset", "clutter", "--quiet"]) == 2
    assert main(["bench", "--vlm", str(folder), "--methods", "rise", "--quiet"]) == 2
    assert "VLM answer-map methods" in capsys.readouterr().err


def test_the_pointing_tolerance_counts_a_maximum_next_to_the_object(vlm: VlmAdapter, monkeypatch) -> None:
    """A map peaking on a visual token beside the object: a miss on the mask, a hit once the mask is
    grown by the distance from the peak to the object."""
    import mmelkit.bench.vlm as bench
    from mmelkit.metrics.localisation import pointing_game

    config = VlmBenchConfig(methods=["answer_attention"], samples=1, kinds=("existence",), sanity=False)
    (item,) = bench_items(config)
    mask = torch.from_numpy(item.mask())  # at the model's input size, as the bench resizes it
    mask = torch.nn.functional.interpolate(mask[None, None].float(), size=vlm.image_size, mode="nearest")[0, 0] > 0.5
    rows, cols = vlm.grid
    ys, xs = mask.nonzero(as_tuple=True)
    y = int(ys.float().mean()) * rows // mask.shape[0]
    for x in range(cols):  # the first token of the object's row whose upsampled peak is off the mask
        peak = torch.zeros(1, rows, cols)
        peak[0, y, x] = 1.0
        up = torch.nn.functional.interpolate(peak[:, None], size=vlm.image_size, mode="bilinear", align_corners=False)[:, 0]
        if pointing_game(up, mask[None]) == 0:
            break
    top = (up[0] == up[0].max()).nonzero().float()
    distance = torch.cdist(top, torch.stack([ys, xs], 1).float()).min(dim=1).values.max()  # every tied maximum
    assert pointing_game(up, mask[None]) == 0

    class Peak:
        maps = peak

    monkeypatch.setattr(bench, "explain", lambda *a, **k: Peak)
    for tolerance, hit in ((0, 0.0), (int(distance) + 1, 1.0)):
        table = run_vlm_bench(vlm, VlmBenchConfig(**{**config.__dict__, "tolerance": tolerance}), progress=False).table
        assert table.loc["answer_attention", "pointing"] == hit
        assert table.loc["answer_attention", "pointing_strict"] == 0.0
