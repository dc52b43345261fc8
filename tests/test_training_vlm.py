"""scene-llava training: batches, determinism, resume, guarded checkpoints, the CLI."""

from __future__ import annotations

import pytest
import torch

import mmelkit  # noqa: F401  (applies the torchvision work-around before transformers loads)
from mmelkit.datasets.vqa import SceneQA
from mmelkit.models.vlm import scene_llava
from mmelkit.training.vlm_trainer import QuestionBatcher, VlmTrainConfig, load_checkpoint, train_vlm

TINY = {
    "text": {"hidden_size": 32, "intermediate_size": 64, "layers": 1, "heads": 2},
    "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "layers": 1, "heads": 2},
    "vision_from_scene_clip": False,
    "batch_size": 4,
    "steps": 4,
    "steps_per_epoch": 2,
    "warmup_steps": 2,
    "log_every": 1,
}


def tiny(**overrides: object) -> VlmTrainConfig:
    return VlmTrainConfig(**{**TINY, **overrides})  # type: ignore[arg-type]


def test_batcher_labels_only_the_answer_and_expands_the_image_token() -> None:
    tokenizer = scene_llava.build_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids(scene_llava.IMAGE)
    batcher = QuestionBatcher(tokenizer, num_visual_tokens=16, image_token_id=image_id, device=torch.device("cpu"))
    items = [SceneQA(tiny().vqa(), seed=3)[i] for i in range(6)]
    batch = batcher(items)
    for row, item in enumerate(items):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert int((ids == image_id).sum()) == 16
        answer = labels[labels != -100].tolist()
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]) == item.answer
        # the answer is the last real tokens of the row; padding (right) is never labelled
        length = int(mask.sum())
        assert ids[length - len(answer) : length].tolist() == answer
        assert (labels[length:] == -100).all()
        assert tokenizer.unk_token_id not in ids.tolist()
    assert batch["pixel_values"].shape == (6, 3, 32, 32)


def test_a_conversation_is_laid_out_as_the_chat_template_writes_it_and_every_answer_is_labelled() -> None:
    processor = scene_llava.build_processor()
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(scene_llava.IMAGE)
    batcher = QuestionBatcher(tokenizer, num_visual_tokens=16, image_token_id=image_id, device=torch.device("cpu"))
    qa = SceneQA(tiny().vqa(), seed=3)
    conversations = [qa.conversation(i, turns=1 + i % 4) for i in range(6)]
    batch = batcher(conversations)
    for row, turns in enumerate(conversations):
        messages = []
        for k, item in enumerate(turns):
            content = ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": item.question}]
            messages += [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": item.answer}]}]
        text = processor.apply_chat_template(messages, tokenize=False)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        at = expected.index(image_id)
        expected = expected[:at] + [image_id] * 16 + expected[at + 1 :]
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == expected
        # labelled: exactly each answer and its </s>, in order
        labels = batch["labels"][row]
        eos = tokenizer.eos_token_id
        said = tokenizer.decode([t for t in labels[labels != -100].tolist()]).split(tokenizer.eos_token)
        assert [a.strip() for a in said[:-1]] == [item.answer for item in turns] and said[-1] == ""
        assert int((labels == eos).sum()) == len(turns)
    # a single item and a one-turn conversation give the same row
    single = batcher([conversations[0][0]])
    one_turn = batcher([[conversations[0][0]]])
    assert all(torch.equal(single[k], one_turn[k]) for k in single)
    with pytest.raises(ValueError, match="first turn's scene"):
        batcher([[qa[0], qa[1]]])
    with pytest.raises(ValueError, match="at least one question"):
        batcher([[]])


def test_multi_turn_training_runs_and_resumes(tmp_path) -> None:
    config = tiny(turns=3, kind_weights={"count": 1.0, "relation": 1.0})
    whole = train_vlm(config, tmp_path / "whole", device="cpu", progress=False)
    train_vlm(config, tmp_path / "sliced", device="cpu", progress=False, max_seconds=0)
    sliced = train_vlm(config, tmp_path / "sliced", device="cpu", progress=False)
    a, b = torch.load(whole, weights_only=False), torch.load(sliced, weights_only=False)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=f"{key} differs after resume")
    # another number of turns is another run: refused, not mixed into this checkpoint
    with pytest.raises(ValueError, match="another config"):
        train_vlm(tiny(turns=2, kind_weights={"count": 1.0, "relation": 1.0}), tmp_path / "whole", device="cpu",
                  progress=False)


def test_training_is_deterministic_and_resumes_bit_identically(tmp_path) -> None:
    whole = train_vlm(tiny(), tmp_path / "whole", device="cpu", progress=False)
    # stop after the first step (max_seconds=0 checkpoints and stops), then resume to the end
    train_vlm(tiny(), tmp_path / "sliced", device="cpu", progress=False, max_seconds=0)
    assert torch.load(tmp_path / "sliced" / "last.pt", weights_only=False)["step"] == 1
    sliced = train_vlm(tiny(), tmp_path / "sliced", device="cpu", progress=False)
    a = torch.load(whole, weights_only=False)
    b = torch.load(sliced, weights_only=False)
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=f"{key} differs after resume")
    # and training moved the weights at all
    fresh = load_checkpoint(whole)[0].state_dict()
    init = scene_llava.build_model(0, False, scene_llava.build_config(TINY["text"], TINY["vision"])).state_dict()
    assert any(not torch.equal(fresh[k], init[k]) for k in init)


def test_a_checkpoint_of_another_config_is_refused_and_kept(tmp_path) -> None:
    train_vlm(tiny(steps=2), tmp_path, device="cpu", progress=False)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(ValueError, match="another config"):
        train_vlm(tiny(steps=2, co_occurrence=0.5), tmp_path, device="cpu", progress=False)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_a_finished_run_is_not_retrained_and_a_longer_one_extends_it(tmp_path) -> None:
    path = train_vlm(tiny(steps=2), tmp_path, device="cpu", progress=False)
    before = path.read_bytes()
    assert train_vlm(tiny(steps=2), tmp_path, device="cpu", progress=False) == path
    assert path.read_bytes() == before
    train_vlm(tiny(steps=3), tmp_path, device="cpu", progress=False)
    assert torch.load(path, weights_only=False)["step"] == 3


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("steps", 0, "steps"), ("batch_size", -1, "batch_size"), ("co_occurrence", 1.5, "co_occurrence"),
     ("data_seed", 10**7, "held out"), ("precision", "fp8", "precision"),
     ("vision_feature_layer", 5, "vision_feature_layer"), ("warmup_steps", -1, "warmup_steps"),
     ("turns", 0, "turns"), ("turns", 9, "at most 8"), ("kind_weights", {"opinion": 1.0}, "question kinds"),
     ("kind_weights", {"count": -1.0}, "non-negative"), ("implied_partner", 1.5, "implied_partner"),
     ("attribute_styles", {"texture": 1.0}, "attribute_styles"), ("attribute_styles", {"colour": -1.0}, "attribute_styles")],
)
def test_bad_training_configs_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**{field: value})


@pytest.mark.parametrize(
    "argv",
    [["--steps", "0"], ["--co-occurrence", "2"], ["--batch-size", "-3"], ["--max-minutes", "0"],
     ["--data-seed", "5000000"], ["--warmup-steps", "-5"], ["--turns", "0"], ["--kind-weights", "relation=x"],
     ["--kind-weights", "opinion=1"], ["--vision-lr-scale", "-1"], ["--implied-partner", "2"],
     ["--attribute-styles", "colour"], ["--attribute-styles", "texture=1"]],
)
def test_train_vlm_cli_rejects_bad_arguments(argv: list[str], tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmelkit.cli import main

    assert main(["train", "vlm", "--out", str(tmp_path / "run"), "--quiet", *argv]) == 2
    assert "mmelkit train vlm:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing ran


def test_train_vlm_cli_never_exports_over_a_model_without_force(tmp_path, monkeypatch, capsys) -> None:
    from mmelkit import cli
    from mmelkit.training import vlm_export

    models = tmp_path / "models"
    (models / "scene-llava").mkdir(parents=True)
    (models / "scene-llava" / "model.safetensors").write_bytes(b"the user's weights")
    monkeypatch.setattr(vlm_export, "MODELS_DIR", models)
    assert cli.main(["train", "vlm", "--export", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (models / "scene-llava" / "model.safetensors").read_bytes() == b"the user's weights"
    assert not (tmp_path / "run").exists()


def test_export_refuses_to_overwrite_and_replaces_only_when_asked(tmp_path) -> None:
    from mmelkit.models.vlm.loading import sha256_file
    from mmelkit.training.vlm_export import META_FILE, WEIGHTS_FILE, export_vlm

    checkpoint = train_vlm(tiny(steps=1), tmp_path / "run", device="cpu", progress=False)
    folder = export_vlm(checkpoint, name="tiny", out_dir=tmp_path / "models")
    import json

    meta = json.loads((folder / META_FILE).read_text())
    assert meta["sha256"][WEIGHTS_FILE] == sha256_file(folder / WEIGHTS_FILE)
    assert (folder / "config.json").is_file() and (folder / "README.md").is_file()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_vlm(checkpoint, name="tiny", out_dir=tmp_path / "models")
    assert export_vlm(checkpoint, name="tiny", out_dir=tmp_path / "models", overwrite=True) == folder
    # the folder is a plain Hugging Face model: transformers opens it without mmelkit's help
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(folder)
    trained = load_checkpoint(checkpoint)[0].state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[key])
    processor = LlavaProcessor.from_pretrained(folder)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_continued_training_starts_from_the_given_weights(tmp_path) -> None:
    from mmelkit.training.vlm_export import export_vlm
    from mmelkit.training.vlm_trainer import load_weights, new_model

    checkpoint = train_vlm(tiny(steps=1), tmp_path / "first", device="cpu", progress=False)
    folder = export_vlm(checkpoint, name="tiny", out_dir=tmp_path / "models")
    trained = load_checkpoint(checkpoint)[0].state_dict()
    for source in (folder, checkpoint):
        started = new_model(tiny(init_from=str(source))).state_dict()
        for key, value in trained.items():
            torch.testing.assert_close(started[key], value, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_weights(tmp_path / "nowhere")
    # a second stage is its own run: it trains on from those weights
    second = train_vlm(tiny(steps=1, init_from=str(folder), co_occurrence=0.9), tmp_path / "second", device="cpu",
                       progress=False)
    assert torch.load(second, weights_only=False)["config"]["init_from"] == str(folder)


def test_attribute_styles_by_name_reach_the_question_distribution() -> None:
    assert tiny(attribute_styles={"colour": 0.7, "size": 0.3}).vqa().attribute_styles == (0.7, 0.0, 0.3)
    assert tiny().vqa().attribute_styles == (1.0, 1.0, 1.0)  # unset: the equal default
