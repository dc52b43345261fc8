"""The pointing game: closed-form cases, the tolerance, and the scene-world study and command."""

from __future__ import annotations

import pytest
import torch

import mmelkit
from mmelkit.cli import main
from mmelkit.metrics import pointing_game, scene_pointing_game
from mmelkit.metrics.localisation import grow_masks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pointing_game_closed_form() -> None:
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[:, 2:4, 2:4] = True
    maps = torch.zeros(3, 10, 10)
    maps[0, 3, 3] = 1.0  # on the mask
    maps[1, 8, 8] = 1.0  # far away
    maps[2, 3, 6] = 1.0  # 3 px right of the mask's edge (column 3)
    hits = pointing_game(maps, masks)
    assert hits.dtype == torch.float32 and hits.tolist() == [1.0, 0.0, 0.0]
    assert pointing_game(maps, masks, tolerance=3).tolist() == [1.0, 0.0, 1.0]
    assert pointing_game(maps, masks, tolerance=2).tolist() == [1.0, 0.0, 0.0]
    # a constant map: with ties="first" it points at the first pixel (a hit only if the mask
    # covers it); by default every pixel ties, so it scores the mask's area share (4 of 100)
    assert pointing_game(torch.ones(3, 10, 10), masks, ties="first").tolist() == [0.0] * 3
    assert pointing_game(torch.ones(3, 10, 10), masks).tolist() == pytest.approx([0.04] * 3, abs=1e-7)


def test_grown_masks_are_discs() -> None:
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[0, 4, 4] = True
    grown = grow_masks(mask, 2)[0]
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    assert torch.equal(grown, (rows - 4) ** 2 + (cols - 4) ** 2 <= 4)


def test_bad_inputs() -> None:
    masks = torch.ones(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="must both be"):
        pointing_game(torch.zeros(2, 4, 5), masks)
    with pytest.raises(ValueError, match="NaN"):
        pointing_game(torch.full((2, 4, 4), float("nan")), masks)
    with pytest.raises(ValueError, match="at least one pixel"):
        pointing_game(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(torch.zeros(2, 4, 4), masks, tolerance=-1)


def test_scene_study_reports_methods_chance_and_failures() -> None:
    model = mmelkit.load_model("scene-clip", device="cpu")
    study = scene_pointing_game(model, ["grad_eclip", "rise"], num_scenes=12, objects=(1, 2), progress=False,
                                method_params={"rise": {"masks": 0}})
    table = study.table
    assert list(table.index) == ["grad_eclip", "rise", "random (chance)"]
    assert 0.0 <= table.loc["grad_eclip", "all"] <= 1.0
    assert "masks" in table.loc["rise", "error"]  # the failure is reported, not dropped
    assert table.loc["random (chance)", "all"] < 0.3
    hits = study.samples[study.samples["method"] == "grad_eclip"]
    assert len(hits) == 12 and set(hits["objects"]) <= {1, 2}


def test_pointing_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "pointing", "--methods", "raw_attention", "--scenes", "4", "--quiet",
                 "--device", "cpu"]) == 0
    assert "raw_attention" in capsys.readouterr().out
    assert main(["eval", "pointing", "--methods", "nope", "--quiet"]) == 2
    assert main(["eval", "pointing", "--objects", "x", "--quiet"]) == 2


@pytest.mark.parametrize("method", ["grad_eclip", "mmel", "generic_attention", "occlusion"])
def test_methods_point_at_the_named_object_on_scene_clip(method: str) -> None:
    # The oracle here is the scene world itself: the embedded model names single objects almost
    # perfectly, so a faithful map must peak on the one object there is. Measured on 200 scenes
    # (mmelkit eval pointing --objects 1-1): 86-98%; 40 scenes at 75% leave room for sampling.
    model = mmelkit.load_model("scene-clip", device="cpu")
    study = scene_pointing_game(model, [method], num_scenes=40, objects=(1, 1), progress=False)
    assert study.table.loc[method, "all"] >= 0.75
    assert study.table.loc["random (chance)", "all"] < 0.2
