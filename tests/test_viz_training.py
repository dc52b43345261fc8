"""Figures of chapter 04 (mmelkit.viz.training): each builds, has its traces and panels, shows its inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmelkit.training.megl import StudyResult
from mmelkit.viz.training import cam_gallery, loss_curves, rationale_table, sample_gallery, study_bars


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)


def _study() -> StudyResult:
    rows = []
    for config, accs, ious in (("plain", (0.6, 0.8), (0.2, 0.3)), ("megl", (0.85, 0.75), (0.3, 0.4))):
        for seed, (acc, iou) in enumerate(zip(accs, ious, strict=True)):
            rows.append({"config": config, "seed": seed, "debiased_acc": acc, "iou": iou,
                         "bleu4": math.nan if config == "plain" else 0.9,
                         **{m: 0.5 for m in ("test_acc", "debiased_f1", "shortcut", "pointing", "cue_energy",
                                             "rouge_l", "clip_score")}})
    return StudyResult(rows)


# -- sample_gallery ----------------------------------------------------------------------------
def test_sample_gallery_tints_given_masks_and_leaves_withheld_ones_bare(images: np.ndarray) -> None:
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    figure = sample_gallery(images, ["a", "b", "c"], masks=[torch.from_numpy(mask), None, mask], columns=2)
    assert len(figure.data) == 3
    assert [a.text for a in figure.layout.annotations] == ["a", "b", "c"]
    assert np.array_equal(np.asarray(figure.data[1].z), images[1])  # withheld: the image itself
    shown = np.asarray(figure.data[0].z)
    assert np.array_equal(shown[~mask], images[0][~mask]) and not np.array_equal(shown[mask], images[0][mask])
    assert figure.layout.xaxis3 is not None  # 2 columns -> a second row
    assert np.array_equal(np.asarray(sample_gallery(images, ["a", "b", "c"]).data[2].z), images[2])


def test_sample_gallery_refuses_bad_input(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="titles"):
        sample_gallery(images, ["a"])
    with pytest.raises(ValueError, match="masks"):
        sample_gallery(images, ["a", "b", "c"], masks=[None])
    with pytest.raises(ValueError, match="shape"):
        sample_gallery(images, ["a", "b", "c"], masks=[np.zeros((8, 8), bool), None, None])
    with pytest.raises(ValueError, match="uint8"):
        sample_gallery(images.astype(np.float32), ["a", "b", "c"])


# -- cam_gallery -------------------------------------------------------------------------------
def test_cam_gallery_has_a_row_per_image_and_a_column_per_map(images: np.ndarray) -> None:
    maps = {"plain": torch.rand(3, 4, 4), "megl": np.random.default_rng(1).random((3, 16, 16))}
    figure = cam_gallery(images, maps, titles=["x", "y", "z"])
    heat = [t for t in figure.data if t.type == "heatmap"]
    assert len(heat) == 3 * 2 and len([t for t in figure.data if t.type == "image"]) == 3 * 3
    assert {"image", "plain", "megl", "x", "y", "z"} <= {a.text for a in figure.layout.annotations}
    assert np.allclose(np.asarray(heat[1].z), maps["megl"][0])  # row 1, column megl (same size: unchanged)
    assert (figure.layout.coloraxis.cmin, figure.layout.coloraxis.cmax) == (0.0, 1.0)
    assert cam_gallery(images, maps, ["x", "y", "z"], value_range=None).layout.coloraxis.cmax is None


def test_cam_gallery_refuses_bad_input(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="no maps"):
        cam_gallery(images, {}, ["x", "y", "z"])
    with pytest.raises(ValueError, match="N = 3"):
        cam_gallery(images, {"a": torch.rand(2, 4, 4)}, ["x", "y", "z"])
    with pytest.raises(ValueError, match="titles"):
        cam_gallery(images, {"a": torch.rand(3, 4, 4)}, ["x"])


# -- loss_curves -------------------------------------------------------------------------------
def test_loss_curves_draw_a_panel_per_part_and_a_line_per_run_that_logged_it() -> None:
    histories = {
        "plain": [{"step": 0, "cls": 1.4}, {"step": 50, "cls": 0.9}],
        "megl": [{"step": 0, "cls": 1.3, "att": 0.5, "txt": 3.0}, {"step": 50, "cls": 0.8, "att": 0.4, "txt": 2.0}],
    }
    figure = loss_curves(histories)
    assert [a.text for a in figure.layout.annotations] == ["L_cls", "L_att", "L_txt"]
    assert len(figure.data) == 2 + 1 + 1
    megl_att = next(t for t in figure.data if t.name == "megl" and t.xaxis == "x2")
    assert list(megl_att.x) == [0, 50] and list(megl_att.y) == [0.5, 0.4]
    assert sum(bool(t.showlegend) for t in figure.data) == 2  # one legend entry per run
    assert len(loss_curves(histories, parts=["att"]).data) == 1


def test_loss_curves_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="no runs"):
        loss_curves({})
    with pytest.raises(ValueError, match="empty history"):
        loss_curves({"a": []})
    with pytest.raises(ValueError, match="step"):
        loss_curves({"a": [{"cls": 1.0}]})
    with pytest.raises(ValueError, match="dc"):
        loss_curves({"a": [{"step": 0, "cls": 1.0}]}, parts=["dc"])


# -- study_bars --------------------------------------------------------------------------------
def test_study_bars_show_means_and_stds_per_configuration() -> None:
    result = _study()
    figure = study_bars(result, metrics=("debiased_acc", "iou", "bleu4"), chance={"debiased_acc": 0.25})
    assert len(figure.data) == 3
    assert [a.text for a in figure.layout.annotations if a.text != "chance"] == ["debiased_acc ↑", "iou ↑", "bleu4 ↑"]
    summary = {row["config"]: row for row in result.summary()}
    acc = figure.data[0]
    assert list(acc.x) == ["plain", "megl"]
    assert np.allclose(acc.y, [summary["plain"]["debiased_acc"], summary["megl"]["debiased_acc"]])
    assert np.allclose(acc.error_y.array, [summary["plain"]["debiased_acc_std"], summary["megl"]["debiased_acc_std"]])
    assert math.isnan(figure.data[2].y[0]) and figure.data[2].y[1] == pytest.approx(0.9)
    lines = [s for s in figure.layout.shapes if s.type == "line"]
    assert len(lines) == 1 and lines[0].y0 == 0.25 and lines[0].line.dash == "dash"
    # a summary list works as well as the result; one seed: no error bars shown
    single = study_bars([{"config": "a", "seeds": 1, "iou": 0.3, "iou_std": 0.0}], metrics=["iou"])
    assert list(single.data[0].y) == [0.3] and single.data[0].error_y.visible is False


def test_study_bars_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="not in the summary"):
        study_bars(_study(), metrics=["accuracy"])
    with pytest.raises(ValueError, match="empty"):
        study_bars([])
    with pytest.raises(ValueError, match="at least one metric"):
        study_bars(_study(), metrics=[])
    with pytest.raises(ValueError, match="not plotted"):
        study_bars(_study(), metrics=["iou"], chance={"debiased_acc": 0.25})


# -- rationale_table ---------------------------------------------------------------------------
def test_rationale_table_lists_texts_and_bolds_words_that_differ_from_the_reference() -> None:
    columns = {"reference": ["the large red star in the top left", "the large blue circle in the centre"],
               "megl": ["the large red star in the top left", "the large blue square in the centre"]}
    figure = rationale_table(columns, row_labels=["0", "1"])
    (table,) = figure.data
    assert list(table.header.values) == ["<b></b>", "<b>reference</b>", "<b>megl</b>"]
    labels, reference, generated = (list(c) for c in table.cells.values)
    assert labels == ["0", "1"] and reference == columns["reference"]
    assert generated == ["the large red star in the top left", "the large blue <b>square</b> in the centre"]
    plain = rationale_table(columns, reference=None)
    assert [list(c) for c in plain.data[0].cells.values] == [columns["reference"], columns["megl"]]
    longer = rationale_table({"reference": ["a b"], "g": ["a b c"]})
    assert list(longer.data[0].cells.values[1]) == ["a b <b>c</b>"]


def test_rationale_table_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="no rationales"):
        rationale_table({})
    with pytest.raises(ValueError, match="same number"):
        rationale_table({"reference": ["a"], "megl": ["a", "b"]})
    with pytest.raises(ValueError, match="reference"):
        rationale_table({"megl": ["a"]})
    with pytest.raises(ValueError, match="row labels"):
        rationale_table({"reference": ["a"]}, row_labels=["0", "1"])
