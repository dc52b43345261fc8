"""load_model: every kind of spec, local checkpoint files written here, devices, dtypes, errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, TINY_OPEN_CLIP, make_hf_clip, make_open_clip, save_hf_clip
from safetensors.torch import save_file

import mmelkit
from mmelkit.models.backend import interpolate_position_embedding
from mmelkit.models.open_clip_backend import open_clip


def _same_scores(a: mmelkit.ClipAdapter, b: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    torch.testing.assert_close(a.score(images, TEXTS), b.score(images, TEXTS), atol=1e-6, rtol=0)


def test_zoo_toy_model_is_deterministic_and_frozen(images: torch.Tensor) -> None:
    state = torch.random.get_rng_state()
    first, second = mmelkit.load_model("toy-random"), mmelkit.load_model("toy-random")
    assert torch.equal(torch.random.get_rng_state(), state), "loading must not move the global RNG"
    _same_scores(first, second, images)
    assert not first.model.training
    assert not any(p.requires_grad for p in first.model.parameters())
    assert "toy-random" in mmelkit.list_zoo()
    assert first.patch_size == (8, 8) and first.image_size == (64, 64)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_config_with_local_checkpoint(tmp_path: Path, images: torch.Tensor, suffix: str) -> None:
    reference = make_open_clip(seed=3)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = mmelkit.load_model(TINY_OPEN_CLIP, pretrained=path, device="cpu")
    _same_scores(loaded, mmelkit.load_model(reference, device="cpu"), images)


def test_open_clip_architecture_name_with_local_checkpoint(tmp_path: Path, images: torch.Tensor) -> None:
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "mmelkit-test-tiny.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config_dir)
    reference = make_open_clip(seed=4)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(reference.state_dict(), checkpoint)
    for spec in ("mmelkit-test-tiny", "open_clip:mmelkit-test-tiny"):
        loaded = mmelkit.load_model(spec, pretrained=checkpoint, device="cpu")
        assert loaded.family == "open_clip"
        _same_scores(loaded, mmelkit.load_model(reference, device="cpu"), images)
    with pytest.warns(UserWarning, match="randomly initialised"):
        mmelkit.load_model("mmelkit-test-tiny")


def test_open_clip_pretrained_tag_offline_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="never downloads"):
        mmelkit.load_model("ViT-B-32", pretrained="openai")
    with pytest.raises(ValueError, match="neither a local file nor a known tag"):
        mmelkit.load_model("ViT-B-32", pretrained="no-such-tag")


def test_checkpoint_that_does_not_match_the_config(tmp_path: Path) -> None:
    path = tmp_path / "wrong.safetensors"
    save_file({"not_a_weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="does not match"):
        mmelkit.load_model(TINY_OPEN_CLIP, pretrained=path)
    with pytest.raises(FileNotFoundError):
        mmelkit.load_model(TINY_OPEN_CLIP, pretrained=tmp_path / "missing.pt")


def test_hugging_face_local_directory(tmp_path: Path, images: torch.Tensor) -> None:
    reference = make_hf_clip("sdpa", seed=5)
    directory = save_hf_clip(reference, tmp_path / "hf-tiny")
    for spec in (str(directory), f"hf:{directory}"):
        loaded = mmelkit.load_model(spec, device="cpu")
        assert loaded.family == "hf_clip"
        assert loaded.backend.tokenizer is not None, "the saved tokenizer must be used"
        _same_scores(loaded, mmelkit.load_model(reference, device="cpu"), images)
    # The saved Hugging Face tokenizer and open_clip's copy of the same BPE agree.
    hf_tokens = loaded.tokenize(TEXTS)
    bpe_tokens = mmelkit.load_model(reference).tokenize(TEXTS)
    for hf_row, bpe_row, hf_eos, bpe_eos in zip(hf_tokens.ids, bpe_tokens.ids, hf_tokens.eos_index, bpe_tokens.eos_index, strict=True):
        assert hf_eos == bpe_eos
        assert torch.equal(hf_row[: hf_eos + 1], bpe_row[: bpe_eos + 1])


def test_hugging_face_hub_id_offline_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="never downloads"):
        mmelkit.load_model("openai/clip-vit-base-patch32")


def test_user_model_object_is_left_alone(images: torch.Tensor) -> None:
    model = make_open_clip(seed=6).train()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.warns(UserWarning, match="training mode"):
        adapter = mmelkit.load_model(model)
    assert model.training, "mmelkit must not switch the user's model to eval mode"
    assert [p.requires_grad for p in model.parameters()] == flags
    assert adapter.device == torch.device("cpu") and adapter.dtype == torch.float32
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mmelkit.load_model(adapter) is adapter


def test_explaining_leaves_parameters_unchanged(images: torch.Tensor) -> None:
    model = make_open_clip(seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = mmelkit.load_model(model)
    with adapter.trace(image_blocks="all", text_blocks="all") as trace:
        score = adapter.score(images, TEXTS, pairing="paired").sum()
    torch.autograd.grad(score, trace.image[-1].attn_out)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unknown_specs_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        mmelkit.load_model("no-such-model")
    with pytest.raises(TypeError, match="does not know how to explain"):
        mmelkit.load_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        mmelkit.load_model(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="brings its own weights"):
        mmelkit.load_model("toy-random", pretrained="x.pt")


def test_devices() -> None:
    assert mmelkit.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adapter = mmelkit.load_model("toy-random", device="auto")
    assert next(adapter.model.parameters()).device.type == adapter.device.type
    assert adapter.score(list(torch.rand(2, 3, 64, 64)), ["a"]).device.type == adapter.device.type
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            mmelkit.load_model("toy-random", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_everything_stays_on_the_gpu(images: torch.Tensor) -> None:
    adapter = mmelkit.load_model("toy-random", device="cuda")
    pixels = adapter.preprocess(images)
    assert pixels.is_cuda
    with adapter.trace(image_blocks="all", text_blocks="all") as trace:
        score = adapter.score(pixels, TEXTS)
    assert score.is_cuda and trace.image[-1].attn.is_cuda and trace.text[0].q.is_cuda


def test_bfloat16_on_request(images: torch.Tensor) -> None:
    full = mmelkit.load_model(make_open_clip(seed=8), device="cpu")
    half = mmelkit.load_model(make_open_clip(seed=8), device="cpu", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.preprocess(images).dtype == torch.bfloat16
    with half.trace(image_blocks="all") as trace:
        scores = half.score(images, TEXTS)
    assert trace.image[-1].attn.dtype == torch.bfloat16
    torch.testing.assert_close(scores.float(), full.score(images, TEXTS), atol=0.05, rtol=0)


def test_position_interpolation_matches_hugging_face() -> None:
    model = make_hf_clip("eager", seed=9)
    embeddings = model.vision_model.embeddings
    table = embeddings.position_embedding.weight
    dummy = torch.zeros(1, 1 + 6 * 5, table.shape[-1])
    expected = embeddings.interpolate_pos_encoding(dummy, height=48, width=40)[0]
    ours = interpolate_position_embedding(table, (4, 4), (6, 5))
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert interpolate_position_embedding(table, (4, 4), (4, 4)) is table
