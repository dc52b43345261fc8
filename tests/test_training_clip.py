"""The embedded-CLIP trainer: its loss, its data, resumption, export and the zoo entry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmelkit
from mmelkit.models import loading
from mmelkit.training.clip_data import SceneCaptionPairs, collate, default_world
from mmelkit.training.clip_eval import evaluate_scene_clip
from mmelkit.training.clip_trainer import ClipTrainConfig, multi_positive_info_nce, train_clip
from mmelkit.training.export import export_clip

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_loss_reduces_to_clip_loss_with_one_positive_each() -> None:
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * images @ texts.T
    labels = torch.arange(5)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    got = multi_positive_info_nce(images, texts, torch.eye(5, dtype=torch.bool), scale)
    torch.testing.assert_close(got, expected)


def test_loss_counts_every_true_match_as_positive() -> None:
    images = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    texts = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    positives = torch.tensor([[True, False], [True, False], [False, True]])
    scale = torch.tensor(5.0)
    logits = scale * images @ texts.T
    image_terms = [-torch.log_softmax(logits[i], 0)[positives[i]].logsumexp(0) for i in range(3)]
    text_terms = [-torch.log_softmax(logits[:, j], 0)[positives[:, j]].logsumexp(0) for j in range(2)]
    expected = 0.5 * (torch.stack(image_terms).mean() + torch.stack(text_terms).mean())
    torch.testing.assert_close(multi_positive_info_nce(images, texts, positives, scale), expected)
    # one-hot treatment would punish image 1 for matching text 0: the multi-positive loss is lower
    one_hot = multi_positive_info_nce(images[:2], texts, torch.tensor([[True, False], [False, True]]), scale)
    assert multi_positive_info_nce(images[:2], texts, positives[:2], scale) < one_hot


def test_training_pairs_name_objects_the_image_holds() -> None:
    pairs = SceneCaptionPairs(default_world(seed=2, image_size=32))
    batch = collate([pairs[i] for i in range(40)])
    assert batch["images"].shape == (40, 3, 32, 32) and batch["images"].dtype == torch.uint8
    for codes, caption_codes, text in zip(batch["codes"], batch["caption_codes"], batch["texts"], strict=True):
        assert codes[caption_codes].all()
        assert text.startswith("a ") and (" and a " in text) == (caption_codes[0] != caption_codes[1])
    assert {" and a " in t for t in batch["texts"]} == {True, False}


def _config(steps: int) -> ClipTrainConfig:
    return ClipTrainConfig(model=TINY, steps=steps, batch_size=8, warmup_steps=2, checkpoint_every=2, workers=0)


def test_resumed_training_equals_uninterrupted_training(tmp_path: Path) -> None:
    straight = torch.load(train_clip(_config(4), tmp_path / "a", device="cpu", progress=False), weights_only=False)
    train_clip(_config(4), tmp_path / "b", device="cpu", progress=False, max_seconds=0.0)  # stops after 1 step
    first = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert first["step"] == 1
    resumed = torch.load(train_clip(_config(4), tmp_path / "b", device="cpu", progress=False), weights_only=False)
    assert resumed["step"] == straight["step"] == 4
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, atol=0, rtol=0, msg=key)
    with pytest.raises(ValueError, match="another config"):
        train_clip(ClipTrainConfig(model=TINY, steps=4, batch_size=16, workers=0), tmp_path / "b", device="cpu")


def test_training_lowers_the_loss(tmp_path: Path) -> None:
    config = ClipTrainConfig(model=TINY, steps=40, batch_size=32, lr=2e-3, warmup_steps=3, checkpoint_every=40,
                             log_every=1, workers=0)
    train_clip(config, tmp_path, device="cpu", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1 and first < math.log(32) + 0.5


def test_export_and_load_through_the_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = train_clip(_config(2), tmp_path / "run", device="cpu", progress=False)
    quality = {"naming": 0.5, "i2t_r1": 0.25, "t2i_r1": 0.25, "relation": 0.5}
    weights = export_clip(checkpoint, out_dir=tmp_path / "models", quality=quality)
    card = (tmp_path / "models" / "scene-clip.md").read_text()
    assert "50.0%" in card and "patch 8" in card
    monkeypatch.setattr(loading, "DATA_DIR", tmp_path)
    model = mmelkit.load_model("scene-clip", device="cpu")
    trained = torch.load(checkpoint, weights_only=False)["model"]
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, trained[key].half().float(), atol=0, rtol=0)
    assert weights.stat().st_size < 25e6
    result = evaluate_scene_clip(model, num_single=16, num_multi=16, num_relation=8)
    assert 0 <= result.naming <= 1 and result.samples["relation"] == 8


def test_caption_mix_is_validated() -> None:
    from mmelkit.training.clip_data import CaptionMix

    with pytest.raises(ValueError):
        CaptionMix(object=-0.1)
    with pytest.raises(ValueError):
        CaptionMix(object=0.0, pair=0.0)


def test_continued_training_starts_from_the_weights_and_keeps_the_parent_card(tmp_path: Path) -> None:
    first = train_clip(_config(2), tmp_path / "first", device="cpu", progress=False)
    parent = export_clip(first, out_dir=tmp_path / "models", quality={"naming": 0.5, "i2t_r1": 0.2, "t2i_r1": 0.2,
                                                                       "relation": 0.5})
    config = ClipTrainConfig(model=TINY, steps=2, batch_size=8, warmup_steps=1, checkpoint_every=2, workers=0,
                             lr=0.0, data_seed=1, init_from=str(parent))
    second = train_clip(config, tmp_path / "second", device="cpu", progress=False)
    # lr 0: the weights are exactly the (fp16-rounded) parent's
    exported = torch.load(first, weights_only=False)["model"]
    for key, value in torch.load(second, weights_only=False)["model"].items():
        torch.testing.assert_close(value, exported[key].half().float(), atol=0, rtol=0, msg=key)
    assert (tmp_path / "second" / "parent.json").is_file()
    export_clip(second, out_dir=tmp_path / "models")  # overwrites the parent's files
    card = (tmp_path / "models" / "scene-clip.md").read_text()
    assert "Stage 1 (from scratch)" in card and "Stage 2" in card and "In all 32 images" in card
    with pytest.raises(FileNotFoundError):
        train_clip(ClipTrainConfig(model=TINY, steps=1, init_from=str(tmp_path / "missing.safetensors"), workers=0),
                   tmp_path / "third", device="cpu", progress=False)
