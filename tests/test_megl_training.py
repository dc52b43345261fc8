"""MEGL data, trainer, evaluation, study and command line on tiny configurations."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_open_clip

import mmelkit
from mmelkit.cli import main
from mmelkit.datasets.shortcut import ShortcutConfig, ShortcutTask
from mmelkit.methods import explain
from mmelkit.training.megl import (
    MeglConfig,
    RationaleVocab,
    StudyResult,
    attach_pseudo_masks,
    build_split,
    evaluate_megl,
    load_megl,
    megl_study,
    preset,
    train_megl,
)
from mmelkit.training.megl.evaluate import METRICS, macro_f1
from mmelkit.training.megl.models import ExplainableClassifier
from mmelkit.training.megl.trainer import megl_loss, new_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"image_size": 16, "width": 4, "train_size": 48, "steps": 4, "batch_size": 8, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def clip() -> mmelkit.ClipAdapter:
    return mmelkit.load_model(make_open_clip(), device="cpu")


@pytest.fixture(scope="module")
def train_split(clip: mmelkit.ClipAdapter):
    config = preset("megl", **TINY)
    return attach_pseudo_masks(build_split(config.task(), "train", config.train_size), clip)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# -- configurations ------------------------------------------------------------------------------
def test_presets_switch_the_losses_they_name() -> None:
    assert preset("plain").attention == () and not preset("plain").uses_generator and not preset("plain").needs_maps
    assert preset("megl").uses_generator and preset("megl").uses_pseudo_masks and preset("megl").grounded
    assert not preset("megl-no-sdtg").grounded and preset("megl-no-sdtg").uses_generator
    assert preset("rrr").attention == ("rrr",) and not preset("rrr").needs_maps
    assert preset("megl", steps=7, name="mine").steps == 7 and preset("megl", name="mine").name == "mine"


@pytest.mark.parametrize("bad", [
    {"attention": ("nope",)}, {"cam_target": "softmax"}, {"arch": "mlp"}, {"visual_weight": -1.0},
    {"steps": 0}, {"image_size": 30}, {"spurious": 1.5}, {"cue": "stripes"}, {"text_weight": math.nan},
])
def test_bad_configurations_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        MeglConfig(**bad)


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="plain"):
        preset("nope")


# -- data ----------------------------------------------------------------------------------------
def test_split_matches_the_task_sample_by_sample() -> None:
    config = ShortcutConfig(mask_fraction=0.5, cue="patch", scene=ShortcutConfig().scene.scaled(16))
    split = build_split(config, "train", 12, seed=3)
    task = ShortcutTask(config, "train", 3, 12)
    for i in range(12):
        sample = task[i]
        assert split.labels[i] == sample.label and split.cue_classes[i] == sample.tint_class
        assert bool(split.has_mask[i]) == sample.has_mask
        assert torch.equal(split.true_masks[i], torch.from_numpy(sample.scene.masks[0]))
        expected = sample.scene.masks[0] if sample.has_mask else np.zeros_like(sample.scene.masks[0])
        assert torch.equal(split.masks[i], torch.from_numpy(expected).float())
        assert torch.allclose(split.images[i], torch.from_numpy(sample.scene.image).permute(2, 0, 1).float() / 127.5 - 1)
        x1, y1, x2, y2 = sample.cue_box
        assert split.cue_masks[i].sum() == (x2 - x1) * (y2 - y1) and split.cue_masks[i, y1:y2, x1:x2].all()
    assert RationaleVocab.for_task(config).decode(split.tokens) == split.rationales
    picked = split.take(torch.tensor([5, 2]))
    assert picked.rationales == [split.rationales[5], split.rationales[2]] and torch.equal(picked.labels, split.labels[[5, 2]])
    assert np.array_equal(picked.raw_images, split.raw_images[[5, 2]])
    device_only = split.take(torch.tensor([5, 2]), host_fields=False)
    assert torch.equal(device_only.images, picked.images) and torch.equal(device_only.tokens, picked.tokens)
    assert device_only.rationales == [] and len(device_only.raw_images) == 0


def test_vocabulary_round_trip_and_limits() -> None:
    vocab = RationaleVocab.for_task(ShortcutConfig())
    ids = vocab.encode(["the large red star in the top left", "the blue circle"], 10)
    assert ids[0, 0] == vocab.BOS and ids[1, 4] == vocab.EOS and (ids[1, 5:] == vocab.PAD).all()
    assert vocab.decode(ids) == ["the large red star in the top left", "the blue circle"]
    assert vocab.decode(vocab.encode(["a zebra"], 4)) == ["<unk> <unk>"]
    with pytest.raises(ValueError, match="limit"):
        vocab.encode(["one two three"], 2)


def test_pseudo_masks_are_grad_eclip_of_the_rationale_for_unmasked_samples_only(clip, train_split) -> None:
    missing = (~train_split.has_mask).nonzero().flatten()
    assert 0 < len(missing) < len(train_split)
    assert (train_split.pseudo_masks[train_split.has_mask] == 0).all()
    i = int(missing[0])
    direct = explain(clip, [train_split.raw_images[i]], [train_split.rationales[i]], method="grad_eclip").upsample((16, 16))
    assert torch.allclose(train_split.pseudo_masks[i], direct[0].clamp(0, 1), atol=1e-5)
    assert 0 <= float(train_split.pseudo_masks.min()) and float(train_split.pseudo_masks.max()) <= 1


# -- the loss ------------------------------------------------------------------------------------
def test_loss_parts_follow_the_configuration(train_split) -> None:
    batch = train_split.take(torch.arange(8))
    for name, expected in [("plain", {"cls"}), ("rrr", {"cls", "att"}), ("megl-no-text", {"cls", "att", "tsv", "dc"}),
                           ("megl", {"cls", "att", "tsv", "dc", "txt"})]:
        config = preset(name, **TINY)
        model = new_model(config, torch.device("cpu"))
        priors = torch.full((4, 16, 16), 1 / 256)
        total, parts = megl_loss(model, batch, priors)
        assert set(parts) == expected
        weights = {"cls": 1.0, "att": config.visual_weight, "tsv": config.tsv_weight, "dc": config.dc_weight,
                   "txt": config.text_weight}
        assert math.isclose(float(total.detach()), sum(weights[k] * v for k, v in parts.items()), rel_tol=1e-5)


def test_a_batch_without_masks_has_no_attention_loss_but_still_trains(train_split) -> None:
    unmasked = (~train_split.has_mask).nonzero().flatten()[:6]
    batch = train_split.take(unmasked)
    model = new_model(preset("megl", **TINY), torch.device("cpu"))
    total, parts = megl_loss(model, batch, torch.full((4, 16, 16), 1 / 256))
    assert parts["att"] == 0.0 and parts["tsv"] > 0
    total.backward()
    assert model.classifier.body[0].weight.grad.abs().sum() > 0


def test_explanation_losses_alone_train_the_classifier(train_split) -> None:
    """With cross-entropy switched off (zero gradient from it), the attention term alone moves weights."""
    config = preset("haics", **TINY)
    model = new_model(config, torch.device("cpu"))
    batch = train_split.take(train_split.has_mask.nonzero().flatten()[:6])
    _, parts = megl_loss(model, batch, None)
    from mmelkit.training.megl import grad_cam, losses

    _, cams, _ = grad_cam(model.classifier, batch.images, batch.labels, create_graph=True)
    maps = torch.nn.functional.interpolate(cams[:, None], size=(16, 16), mode="bilinear")[:, 0]
    attention = losses.l1_attention(maps, batch.masks).mean() + losses.haics_attention(maps, batch.masks).mean()
    assert math.isclose(float(attention), parts["att"], rel_tol=1e-5)
    grads = torch.autograd.grad(attention, [model.classifier.body[0].weight, model.classifier.head.weight])
    assert all(float(g.abs().sum()) > 0 for g in grads)


# -- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["plain", "rrr", "gradia", "megl", "megl-no-sdtg"])
def test_every_preset_trains_and_changes_the_weights(name: str, train_split) -> None:
    config = preset(name, **TINY)
    before = new_model(config, torch.device("cpu"))
    after = train_megl(config, train_split, device="cpu", progress=False)
    assert not _same_weights(before.classifier, after.classifier)
    assert len(after.history) >= 1 and all(math.isfinite(v) for row in after.history for v in row.values())
    assert not after.classifier.training


def test_the_vit_trains_through_double_backward(train_split) -> None:
    config = preset("megl", arch="vit", **TINY)
    model = train_megl(config, train_split, device="cpu", progress=False)
    assert all(torch.isfinite(p).all() for p in model.classifier.parameters())


def test_training_is_seeded(train_split) -> None:
    a = train_megl(preset("megl", **TINY), train_split, device="cpu", progress=False)
    b = train_megl(preset("megl", **TINY), train_split, device="cpu", progress=False)
    c = train_megl(preset("megl", **TINY, seed=1), train_split, device="cpu", progress=False)
    assert _same_weights(a.classifier, b.classifier) and not _same_weights(a.classifier, c.classifier)


def test_an_interrupted_run_resumes_to_the_same_weights(train_split, tmp_path: Path, monkeypatch) -> None:
    config = preset("megl", **TINY)
    straight = train_megl(config, train_split, device="cpu", progress=False)
    calls = {"n": 0}
    original = torch.optim.Adam.step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        train_megl(config, train_split, tmp_path, device="cpu", progress=False)
    monkeypatch.setattr(torch.optim.Adam, "step", original)
    assert (tmp_path / "last.pt").exists() and not (tmp_path / "model.pt").exists()
    resumed = train_megl(config, train_split, tmp_path, device="cpu", progress=False)
    assert _same_weights(straight.classifier, resumed.classifier)
    assert _same_weights(straight.generator, resumed.generator)
    assert (tmp_path / "model.pt").exists() and not (tmp_path / "last.pt").exists()


def test_finished_runs_load_extend_and_refuse_other_configurations(train_split, tmp_path: Path, monkeypatch) -> None:
    config = preset("megl", **TINY)
    first = train_megl(config, train_split, tmp_path, device="cpu", progress=False)
    loaded = load_megl(tmp_path / "model.pt", device="cpu")
    assert _same_weights(first.classifier, loaded.classifier) and loaded.config == config
    monkeypatch.setattr("mmelkit.training.megl.trainer.megl_loss", lambda *a: pytest.fail("retrained a finished run"))
    again = train_megl(config, train_split, tmp_path, device="cpu", progress=False)
    assert _same_weights(first.classifier, again.classifier)
    monkeypatch.undo()
    longer = replace(config, steps=6)
    extended = train_megl(longer, train_split, tmp_path, device="cpu", progress=False)
    assert _same_weights(extended.classifier, train_megl(longer, train_split, device="cpu", progress=False).classifier)
    with pytest.raises(ValueError, match="another configuration"):
        train_megl(replace(longer, lr=1e-3), train_split, tmp_path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="more than"):
        train_megl(config, train_split, tmp_path, device="cpu", progress=False)


def test_textual_supervision_needs_pseudo_masks() -> None:
    config = preset("megl", **TINY)
    bare = build_split(config.task(), "train", 16)
    with pytest.raises(ValueError, match="pseudo-masks"):
        train_megl(config, bare, device="cpu", progress=False)


# -- evaluation ----------------------------------------------------------------------------------
class CueReader(ExplainableClassifier):
    """An oracle cheat: its features are, per pixel, how close the colour is to each class's patch
    colour, so it predicts the cue's class and its evidence sits on the patch."""

    def __init__(self, config: ShortcutConfig) -> None:
        super().__init__()
        colours = torch.tensor(config.class_patch_colours(), dtype=torch.float32) / 127.5 - 1
        self.register_buffer("colours", colours)
        self.feature_dim = len(colours)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        distance = (images[:, None] - self.colours[None, :, :, None, None]).square().sum(dim=2)
        return self.scale * torch.exp(-20 * distance)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return 500 * features.mean(dim=(2, 3))


def test_a_model_that_reads_the_cue_is_caught_by_every_shortcut_measure() -> None:
    config = preset("plain", image_size=32)
    task = config.task()
    test, debiased = build_split(task, "test", 80), build_split(task, "debiased", 80)
    model = new_model(config, torch.device("cpu"))
    model.classifier = CueReader(task)
    result = evaluate_megl(model, test, debiased)
    assert set(result) == set(METRICS) | {"test_f1"}
    assert result["shortcut"] == 1.0
    assert result["debiased_acc"] == pytest.approx(float((debiased.cue_classes == debiased.labels).float().mean()))
    assert result["test_acc"] == pytest.approx(float((test.cue_classes == test.labels).float().mean()))
    assert result["cue_energy"] > 0.9 and result["pointing"] < 0.2
    assert math.isnan(result["bleu4"]) and math.isnan(result["clip_score"])


def test_grad_cam_without_classes_explains_the_prediction() -> None:
    from mmelkit.training.megl import grad_cam

    config = preset("plain", **TINY)
    classifier = new_model(config, torch.device("cpu")).classifier
    images = build_split(config.task(), "test", 6).images
    logits, maps, _ = grad_cam(classifier, images, None, create_graph=False)
    _, expected, _ = grad_cam(classifier, images, logits.argmax(dim=1), create_graph=False)
    assert torch.equal(maps, expected)


def test_macro_f1_closed_form() -> None:
    predictions, labels = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1])
    # class 0: tp 1, predicted 2, actual 1 -> 2/3; class 1: tp 1, 1, 3 -> 1/2; class 2: tp 0 -> 0
    assert macro_f1(predictions, labels, 3) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert macro_f1(labels, labels, 5) == 1.0  # classes 2-4 absent and never predicted: skipped


def test_study_summary_is_mean_and_sample_std() -> None:
    rows = [{"config": "a", "seed": s, **{m: float(v) for m in METRICS}} for s, v in enumerate([0.2, 0.4, 0.9])]
    rows.append({"config": "b", "seed": 0, **{m: math.nan for m in METRICS}})
    result = StudyResult(rows)
    a, b = result.summary()
    assert a["seeds"] == 3 and a["iou"] == pytest.approx(0.5) and a["iou_std"] == pytest.approx(math.sqrt(0.13))
    assert math.isnan(b["iou"])
    table = result.table(["iou"])
    assert "0.500 ± 0.361" in table and "| b | 1 | — |" in table
    # rows of an older study lack the metrics added since: those read as NaN, the rest as before
    old = StudyResult([{k: v for k, v in row.items() if k not in ("precision", "recall")} for row in rows[:3]])
    (summary,) = old.summary()
    assert math.isnan(summary["precision"]) and math.isnan(summary["recall"]) and summary["iou"] == pytest.approx(0.5)


def test_study_end_to_end_writes_its_tables(clip, tmp_path: Path) -> None:
    configs = [preset("plain", **TINY), preset("megl", **TINY)]
    result = megl_study(configs, seeds=[0, 1], out_dir=tmp_path, eval_size=12, device="cpu", progress=False, clip=clip)
    assert [(r["config"], r["seed"]) for r in result.rows] == [("plain", 0), ("plain", 1), ("megl", 0), ("megl", 1)]
    assert math.isnan(result.rows[0]["bleu4"]) and 0 <= result.rows[2]["bleu4"] <= 1
    assert result.rows[2]["clip_score"] >= 0
    for name in ("runs.csv", "summary.json", "table.md"):
        assert (tmp_path / name).exists()
    assert (tmp_path / "megl" / "seed-1" / "model.pt").exists()
    with pytest.raises(ValueError, match="unique"):
        megl_study([configs[0], configs[0]], seeds=[0], clip=clip)
    with pytest.raises(ValueError, match="CLIP"):
        megl_study([configs[1]], seeds=[0], eval_size=4, device="cpu", progress=False, clip=None)


# -- command line --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--configs", "nope"], ["--seeds", "0", "0"], ["--steps", "0"], ["--eval-size", "0"],
                                  ["--cue", "stripes"]])
def test_cli_refuses_bad_arguments(argv: list[str], capsys) -> None:
    assert main(["train", "megl", *argv]) == 2
    assert "mmelkit train megl:" in capsys.readouterr().err


def test_cli_trains_and_prints_the_table(tmp_path: Path, capsys) -> None:
    argv = ["train", "megl", "--configs", "plain", "rrr", "--seeds", "0", "--steps", "2", "--image-size", "16",
            "--width", "4", "--train-size", "16", "--batch-size", "4", "--eval-size", "8", "--device", "cpu",
            "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| plain | 1 |" in out and "| rrr | 1 |" in out and (tmp_path / "table.md").exists()
