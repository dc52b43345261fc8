"""VlmAdapter and load_vlm on tiny LLaVA models written here: batching, padding, greedy decoding
against Hugging Face's, teacher-forced scores against a slow reference, tracing, loading, errors."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import EOS, VISION, make_hf_clip, tiny_llava
from PIL import Image

import mmelkit
from mmelkit.models.vlm import VLM_ZOO, VlmAdapter, VlmZooEntry, load_vlm, scene_llava
from mmelkit.models.vlm.loading import sha256_file
from mmelkit.models.vlm.tracing import attention_configs

# Tiny models are all overhead: on a small, busy machine extra intra-op threads only contend.
pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [
    "what colour is the star ?",
    "how many",
    "is there a red circle in the image ?",
    "what shape is left",
    "describe the image",
    "is it big",
    "what",
    "where is the blue cross ?",
]


def all_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llava")
    tiny_llava().save_pretrained(directory)
    scene_llava.build_processor(image_size=48, patch_size=8).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vlm(tiny_dir: Path) -> VlmAdapter:
    return load_vlm(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def images() -> list[Any]:
    """Eight images of different sizes and kinds: PIL (RGB, grayscale), numpy (RGB, RGBA), torch."""
    rng = np.random.default_rng(0)
    out: list[Any] = []
    for i in range(8):
        array = (rng.random((40 + 5 * i, 56 - 3 * i, 3)) * 255).astype(np.uint8)
        array[5:20, 8 + i : 24 + i] = (220, 40, 40) if i % 2 else (40, 80, 225)
        if i % 4 == 0:
            out.append(Image.fromarray(array))
        elif i % 4 == 1:
            out.append(Image.fromarray(array).convert("L"))
        elif i % 4 == 2:
            out.append(np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=-1))
        else:
            out.append(torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    return out


def hf_logits(model: Any, batch: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids).logits


# -- facts and batches ---------------------------------------------------------------------------------
def test_facts_and_visual_positions_on_36_visual_tokens(vlm: VlmAdapter, images: list[Any]) -> None:
    assert vlm.num_visual_tokens == 36 and vlm.grid == (6, 6)
    assert vlm.image_size == (48, 48) and vlm.patch_size == (8, 8)
    assert (vlm.num_decoder_layers, vlm.num_decoder_heads, vlm.num_vision_layers, vlm.num_vision_heads) == (2, 2, 2, 2)
    assert vlm.image_token_id == scene_llava.VOCABULARY.index(scene_llava.IMAGE)
    assert not vlm.model.training and not any(p.requires_grad for p in vlm.model.parameters())
    batch = vlm.encode(images[:4], QUESTIONS[:4])
    assert batch.visual_positions.shape == (4, 36) and batch.visual_positions.dtype == torch.long
    rows = torch.arange(4)[:, None]
    assert bool((batch.input_ids[rows, batch.visual_positions] == vlm.image_token_id).all())
    assert int((batch.input_ids == vlm.image_token_id).sum()) == 4 * 36
    # left padding: every prompt ends in the last column, visual tokens follow "USER :"
    assert bool((batch.attention_mask[:, -1] == 1).all())
    pads = (batch.attention_mask == 0).sum(-1)
    torch.testing.assert_close(batch.visual_positions[:, 0], pads + 2)
    torch.testing.assert_close(batch.visual_positions, batch.visual_positions[:, :1] + torch.arange(36))
    # the same ids as Hugging Face's processor (which expands <image> itself)
    reference = vlm.processor(images=[Image.new("RGB", (48, 48))] * 4, text=batch.prompts, padding=True,
                              return_tensors="pt")
    torch.testing.assert_close(batch.input_ids, reference["input_ids"])
    torch.testing.assert_close(batch.attention_mask, reference["attention_mask"])


def test_prompt_template(vlm: VlmAdapter) -> None:
    expected = scene_llava.PLAIN_TEMPLATE.format(question="what colour is it ?")
    assert vlm.prompt("what colour is it ?") == expected
    assert vlm.prompt(["a", "b"]) == [scene_llava.PLAIN_TEMPLATE.format(question=q) for q in "ab"]
    other = load_vlm(vlm.model, processor=scene_llava.build_processor(48, 8))
    other.processor.chat_template = "{% for m in messages %}Q: <image> {{ m['content'][1]['text'] }} A:{% endfor %}"
    assert other.prompt("hi") == "Q: <image> hi A:"
    other.processor.chat_template = None
    assert other.prompt("hi") == scene_llava.PLAIN_TEMPLATE.format(question="hi")
    # a text holding the image token is taken as a prompt as it is
    assert vlm.encode(images_one(), "USER: <image> hi ASSISTANT:").prompts == ["USER: <image> hi ASSISTANT:"]


def images_one() -> torch.Tensor:
    return torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(5))


def test_preprocess_any_kind_and_mode(vlm: VlmAdapter, images: list[Any]) -> None:
    pixels = vlm.preprocess(images)
    assert pixels.shape == (8, 3, 48, 48) and pixels.dtype == torch.float32 and pixels.device == vlm.device
    grey = vlm.preprocess(np.full((20, 30), 128, np.uint8))
    mean = torch.tensor(vlm.processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(vlm.processor.image_processor.image_std).view(3, 1, 1)
    torch.testing.assert_close(grey[0], ((128 / 255 - mean) / std).expand(3, 48, 48), atol=1e-5, rtol=0)
    # 4-D float tensors are taken as pixels already
    assert vlm.encode(pixels, QUESTIONS).pixel_values is not None
    with pytest.raises(ValueError, match="pixel values must be"):
        vlm.encode(torch.zeros(2, 3, 32, 32), "what")


def test_broadcasting_one_image_or_one_question(vlm: VlmAdapter, images: list[Any]) -> None:
    one_image = vlm.encode(images[0], QUESTIONS[:3])
    assert len(one_image) == 3
    torch.testing.assert_close(one_image.pixel_values, vlm.preprocess(images[0]).expand(3, -1, -1, -1))
    one_question = vlm.encode(images[:3], "what")
    assert len(one_question) == 3 and len(set(one_question.prompts)) == 1


# -- forward and tracing -------------------------------------------------------------------------------
def test_traced_logits_equal_the_plain_forward(vlm: VlmAdapter, images: list[Any]) -> None:
    batch = vlm.encode(images[:4], QUESTIONS[:4], ["red", "two", "yes", "circle"])
    plain = hf_logits(vlm.model, batch)  # Hugging Face's own forward, sdpa attention
    before = [c._attn_implementation_internal for c in attention_configs(vlm.model)]
    assert "sdpa" in before
    with vlm.trace() as trace:
        assert {c._attn_implementation_internal for c in attention_configs(vlm.model)} == {"eager"}
        traced = vlm.forward(batch).logits
    assert [c._attn_implementation_internal for c in attention_configs(vlm.model)] == before
    real = batch.attention_mask.bool()  # padding positions are meaningless (and differ between kernels)
    torch.testing.assert_close(traced[real], plain[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(vlm.forward(batch).logits[real], plain[real], atol=1e-5, rtol=0)
    n, length = batch.input_ids.shape
    for layer in trace.decoder:
        assert layer.attn.shape == (n, 2, length, length) and layer.hidden.shape == (n, length, 64)
        torch.testing.assert_close(layer.attn.sum(-1), torch.ones(n, 2, length), atol=1e-5, rtol=0)
        assert layer.attn.requires_grad and layer.calls == 1
    torch.testing.assert_close(trace.decoder[1].hidden_in, trace.decoder[0].hidden)
    assert len(trace.vision) == 2 and trace.vision[-1].attn.shape == (n, 2, 37, 37)
    assert trace.vision[0].hidden.shape == (n, 37, 32) and trace.vision[0].attn.requires_grad
    assert trace.decoder_attentions().shape == (2, n, 2, length, length)
    leaf = trace.visual_embeds
    assert leaf is not None and leaf.is_leaf and leaf.requires_grad and leaf.shape == (n, 36, 64)
    torch.testing.assert_close(leaf.detach(), vlm.visual_features(batch.pixel_values), atol=1e-5, rtol=0)
    # the logit lens of the last layer's output is the model's logits
    torch.testing.assert_close(vlm.project_hidden(trace.decoder[-1].hidden), traced, atol=1e-5, rtol=0)
    # an unpadded row: the whole logits tensor agrees
    single = vlm.encode(images[0], QUESTIONS[0])
    with torch.no_grad(), vlm.trace():
        alone = vlm.forward(single).logits
    torch.testing.assert_close(alone, vlm.model(input_ids=single.input_ids, pixel_values=single.pixel_values).logits,
                               atol=1e-5, rtol=0)


def test_layer_selection_and_vision_off(vlm: VlmAdapter, images: list[Any]) -> None:
    batch = vlm.encode(images[:2], QUESTIONS[:2])
    with vlm.trace(layers=[-1], vision=False, decoder_hidden=False) as trace:
        vlm.forward(batch)
    assert trace.decoder.indices() == [1] and len(trace.vision) == 0
    assert trace.decoder[-1].hidden is None and trace.decoder[-1].attn is not None
    with pytest.raises(KeyError, match="not traced"):
        trace.decoder[0]
    with pytest.raises(RuntimeError, match="recorded no 'hidden'"):
        trace.decoder[1].require("hidden")
    with pytest.raises(IndexError):
        with vlm.trace(layers=5):
            pass


def test_gradients_reach_the_visual_leaf(vlm: VlmAdapter, images: list[Any]) -> None:
    batch = vlm.encode(images[:3], QUESTIONS[:3], ["red", "two", "yes"])
    with vlm.trace() as trace:
        target = vlm.answer_logprob_from_logits(vlm.forward(batch).logits, batch).total.sum()
    grad, = torch.autograd.grad(target, trace.visual_embeds)
    assert grad.shape == (3, 36, 64) and float(grad.abs().sum()) > 0
    assert all(p.grad is None for p in vlm.model.parameters())
    # the same gradient through forward(visual_embeds=...) without a trace
    embeds = vlm.visual_features(batch.pixel_values).detach().requires_grad_(True)
    direct, = torch.autograd.grad(vlm.answer_logprob_from_logits(vlm.forward(batch, embeds).logits, batch).total.sum(),
                                  embeds)
    torch.testing.assert_close(grad, direct, atol=1e-5, rtol=1e-4)
    # given visual tokens are what the trace records; perturbing them changes the score
    with vlm.trace(vision=False) as trace:
        shifted = vlm.forward(batch, embeds.detach() + 0.5)
    torch.testing.assert_close(trace.visual_embeds.detach(), embeds.detach() + 0.5)
    assert not torch.allclose(shifted.logits, vlm.forward(batch).logits)
    # visual_leaf=False: the graph runs on into the vision tower's records
    with vlm.trace(visual_leaf=False) as trace:
        target = vlm.answer_logprob_from_logits(vlm.forward(batch).logits, batch).total.sum()
    assert not trace.visual_embeds.is_leaf
    grad_vision, grad_visual = torch.autograd.grad(target, [trace.vision[0].hidden_in, trace.visual_embeds])
    assert float(grad_vision.abs().sum()) > 0
    torch.testing.assert_close(grad_visual, grad, atol=1e-5, rtol=1e-4)


def test_hooks_removed_and_attention_restored_after_an_exception(vlm: VlmAdapter, images: list[Any]) -> None:
    batch = vlm.encode(images[:2], QUESTIONS[:2])
    vlm.forward(batch)  # Hugging Face installs its own output-capturing hooks lazily, once
    hooks = all_hooks(vlm.model)
    before = [c._attn_implementation_internal for c in attention_configs(vlm.model)]
    with pytest.raises(ZeroDivisionError):
        with vlm.trace():
            vlm.forward(batch)
            raise ZeroDivisionError
    assert all_hooks(vlm.model) == hooks
    assert [c._attn_implementation_internal for c in attention_configs(vlm.model)] == before
    # failing inside the model's forward, mid-trace
    def explode(module: torch.nn.Module, args: tuple, output: Any) -> None:
        raise RuntimeError("boom")

    handle = vlm.parts.decoder_layers[-1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"), vlm.trace():
            vlm.forward(batch)
    finally:
        handle.remove()
    assert all_hooks(vlm.model) == hooks
    assert [c._attn_implementation_internal for c in attention_configs(vlm.model)] == before
    # one trace at a time; the outer one survives the refusal
    with vlm.trace() as outer:
        with pytest.raises(RuntimeError, match="already being traced"):
            with vlm.trace():
                pass
        vlm.forward(batch)
        assert outer.decoder[0].attn is not None
    assert all_hooks(vlm.model) == hooks
    assert [c._attn_implementation_internal for c in attention_configs(vlm.model)] == before
    assert not vlm._traces


# -- generation ----------------------------------------------------------------------------------------
def test_batched_generation_equals_one_by_one(vlm: VlmAdapter, images: list[Any]) -> None:
    together = vlm.generate(images, QUESTIONS, max_new_tokens=8, batch_size=8)
    lengths = [len(ids) for ids in together.token_ids]
    assert len(set(lengths)) > 1 and any(together.finished) and not all(together.finished), lengths
    assert len(set(together.texts)) > 2  # the rows do differ
    alone = [vlm.generate(images[i], QUESTIONS[i], max_new_tokens=8) for i in range(8)]
    chunked = vlm.generate(images, QUESTIONS, max_new_tokens=8, batch_size=3)
    for i in range(8):
        assert torch.equal(together.token_ids[i], alone[i].token_ids[0]), i
        assert torch.equal(together.token_ids[i], chunked.token_ids[i]), i
        assert together.texts[i] == alone[i].texts[0] == chunked.texts[i]
    for out in (together, chunked):  # spans point at the tokens in sequences
        for i, (start, end) in enumerate(out.answer_spans):
            assert torch.equal(out.sequences[i, start:end], out.token_ids[i])
            assert int(out.attention_mask[i, end:].sum()) == 0 and bool(out.attention_mask[i, start:end].all())
        rows = torch.arange(8)[:, None]
        assert bool((out.sequences[rows, out.visual_positions] == vlm.image_token_id).all())
    finished = [i for i in range(8) if together.finished[i]]
    assert all(int(together.token_ids[i][-1]) == EOS for i in finished)
    assert all("</s>" not in text for text in together.texts)


def test_left_padding_changes_no_answer(vlm: VlmAdapter, images: list[Any]) -> None:
    long_question = "is there a small red circle on the left of the large blue square in this picture ?"
    alone = vlm.generate(images[1], QUESTIONS[6], max_new_tokens=8)
    padded = vlm.generate([images[1], images[2]], [QUESTIONS[6], long_question], max_new_tokens=8)
    assert int((padded.attention_mask[0] == 0).sum()) >= 10  # row 0 really is padded
    assert torch.equal(padded.token_ids[0], alone.token_ids[0])
    short, both = vlm.encode(images[1], QUESTIONS[6]), vlm.encode([images[1], images[2]], [QUESTIONS[6], long_question])
    torch.testing.assert_close(vlm.forward(both).logits[0, -1], vlm.forward(short).logits[0, -1], atol=1e-5, rtol=0)


def test_own_greedy_loop_equals_hugging_face_generate(vlm: VlmAdapter, images: list[Any]) -> None:
    ours = vlm.generate(images, QUESTIONS, max_new_tokens=8)
    batch = vlm.encode(images, QUESTIONS)
    with torch.no_grad():
        theirs = vlm.model.generate(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                                    attention_mask=batch.attention_mask, max_new_tokens=8, do_sample=False,
                                    eos_token_id=EOS, pad_token_id=vlm.pad_token_id)
    generated = theirs[:, batch.input_ids.shape[1]:]
    for i in range(8):
        n = len(ours.token_ids[i])
        assert torch.equal(generated[i, :n], ours.token_ids[i]), i
        assert n == generated.shape[1] or int(generated[i, n - 1]) == EOS


def test_stop_at_eos_off_runs_every_step_and_logits_hooks(vlm: VlmAdapter, images: list[Any]) -> None:
    full = vlm.generate(images[:4], QUESTIONS[:4], max_new_tokens=6, stop_at_eos=False)
    assert [len(t) for t in full.token_ids] == [6] * 4 and full.sequences.shape[1] == full.answer_spans[0][1]
    banned = scene_llava.VOCABULARY.index("yes")

    def force_yes(logits: torch.Tensor, step: mmelkit.models.vlm.DecodeStep) -> torch.Tensor:
        assert step.sequences.shape[1] == step.batch.input_ids.shape[1] + step.index
        return logits.index_fill(-1, torch.tensor([banned]), 1e4)

    assert vlm.generate(images[:2], QUESTIONS[:2], max_new_tokens=3, logits_hook=force_yes).texts == ["yes yes yes"] * 2

    class Contrast:  # a second stream on the same images: (1 + a) l - a l' == l, the answers stay
        def __call__(self, logits: torch.Tensor, step: mmelkit.models.vlm.DecodeStep) -> torch.Tensor:
            if step.index == 0:
                self.stream = vlm.decode_stream(step.batch)
                other = self.stream.prefill()
            else:
                other = self.stream.step(step.last_tokens)
            return 2.0 * logits - other

    plain = vlm.generate(images, QUESTIONS, max_new_tokens=8, batch_size=5)
    contrasted = vlm.generate(images, QUESTIONS, max_new_tokens=8, batch_size=5, logits_hook=Contrast())
    assert all(torch.equal(a, b) for a, b in zip(plain.token_ids, contrasted.token_ids, strict=True))


def test_generated_answers_as_a_teacher_forced_batch(vlm: VlmAdapter, images: list[Any]) -> None:
    out = vlm.generate(images[:5], QUESTIONS[:5], max_new_tokens=8, batch_size=2)
    batch = out.to_batch(vlm.preprocess(images[:5]))
    logits = vlm.forward(batch).logits
    scores = vlm.answer_logprob_from_logits(logits, batch)
    for i, (start, end) in enumerate(out.answer_spans):  # greedy: every answer token was the argmax
        assert torch.equal(logits[i, start - 1 : end - 1].argmax(-1), out.token_ids[i])
        assert int(scores.mask[i].sum()) == end - start


# -- scoring -------------------------------------------------------------------------------------------
def test_answer_logprob_matches_a_slow_reference(vlm: VlmAdapter, images: list[Any]) -> None:
    answers = ["red", "two three", "yes", "a large blue circle", "no"]
    got = vlm.answer_logprob(images[:5], QUESTIONS[:5], answers, batch_size=2)
    assert got.token_logprobs.device == vlm.device and got.token_logprobs.dtype == torch.float32
    tokenizer = vlm.processor.tokenizer
    for i, answer in enumerate(answers):
        prompt = vlm.prompt(QUESTIONS[i])
        inputs = vlm.processor(images=Image.new("RGB", (48, 48)), text=prompt, return_tensors="pt")
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [EOS]
        ids = torch.cat([inputs["input_ids"][0], torch.tensor(answer_ids)])[None]
        with torch.no_grad():
            logits = vlm.model(input_ids=ids, pixel_values=vlm.preprocess(images[i])).logits[0]
        start = ids.shape[1] - len(answer_ids)
        reference = logits.log_softmax(-1)[start - 1 : -1].gather(-1, ids[0, start:, None])[:, 0]
        n = len(answer_ids)
        assert int(got.mask[i].sum()) == n and bool(got.mask[i, :n].all())
        assert got.token_ids[i, :n].tolist() == answer_ids
        torch.testing.assert_close(got.token_logprobs[i, :n], reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.total[i], reference.sum(), atol=1e-5, rtol=0)
    no_eos = vlm.answer_logprob(images[:2], QUESTIONS[:2], "red", eos=False)
    assert no_eos.mask.sum(-1).tolist() == [1, 1]


# -- another number of visual tokens -------------------------------------------------------------------
def test_full_strategy_and_another_grid() -> None:
    model = tiny_llava(1, vision={**VISION, "image_size": 40}, strategy="full")
    other = load_vlm(model, processor=scene_llava.build_processor(image_size=40, patch_size=8))
    assert other.grid == (5, 5) and other.num_prefix_visual_tokens == 1 and other.num_visual_tokens == 26
    pictures = [torch.rand(3, 33, 47, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    batch = other.encode(pictures, QUESTIONS[:3])
    assert batch.visual_positions.shape == (3, 26) and other.visual_features(batch.pixel_values).shape == (3, 26, 64)
    real = batch.attention_mask.bool()
    with other.trace() as trace:
        traced = other.forward(batch).logits
    torch.testing.assert_close(traced[real], hf_logits(model, batch)[real], atol=1e-5, rtol=0)
    assert trace.grid == (5, 5) and trace.num_prefix_visual_tokens == 1
    ours = other.generate(pictures, QUESTIONS[:3], max_new_tokens=5)
    with torch.no_grad():
        theirs = model.generate(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                                attention_mask=batch.attention_mask, max_new_tokens=5, do_sample=False,
                                eos_token_id=EOS, pad_token_id=0)[:, batch.input_ids.shape[1]:]
    for i in range(3):
        assert torch.equal(theirs[i, : len(ours.token_ids[i])], ours.token_ids[i])


# -- bad inputs ----------------------------------------------------------------------------------------
def test_bad_inputs_say_what_is_wrong(vlm: VlmAdapter, images: list[Any]) -> None:
    with pytest.raises(ValueError, match="no images"):
        vlm.encode([], "what")
    with pytest.raises(ValueError, match="no questions"):
        vlm.encode(images[:2], [])
    with pytest.raises(ValueError, match="2 images and 3 questions"):
        vlm.encode(images[:2], QUESTIONS[:3])
    with pytest.raises(ValueError, match="no image token"):
        vlm.encode(images[0], "what colour is it ?", template=False)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        vlm.encode(images[0], " ".join(["red"] * 300))
    with pytest.raises(ValueError, match="72 image tokens"):
        vlm.encode(images[0], "USER: <image> <image> what ASSISTANT:")
    with pytest.raises(ValueError, match="3 answers for 2 rows"):
        vlm.encode(images[:2], QUESTIONS[:2], ["a", "b", "c"])
    with pytest.raises(TypeError, match="strings"):
        vlm.encode(images[:2], [1, 2])
    batch = vlm.encode(images[:2], QUESTIONS[:2])
    with pytest.raises(ValueError, match="visual_embeds must have shape"):
        vlm.forward(batch, torch.zeros(2, 35, 64))
    with pytest.raises(ValueError, match="max_new_tokens=250"):
        vlm.generate(images[0], "what", max_new_tokens=250)
    with pytest.raises(ValueError, match="batch_size"):
        vlm.generate(images[0], "what", batch_size=0)
    with pytest.raises(ValueError, match="no answers"):
        vlm.answer_logprob_from_logits(vlm.forward(batch).logits, batch)


# -- loading -------------------------------------------------------------------------------------------
def test_load_from_a_directory_and_from_an_object(tiny_dir: Path, vlm: VlmAdapter, images: list[Any]) -> None:
    model = tiny_llava()
    wrapped = load_vlm(model, processor=vlm.processor)
    assert wrapped.model is model and not model.training
    assert all(not p.requires_grad for p in vlm.model.parameters())
    assert any(p.requires_grad for p in model.parameters())  # a caller's model is not frozen
    batch = vlm.encode(images[:3], QUESTIONS[:3])
    torch.testing.assert_close(wrapped.forward(batch).logits, vlm.forward(batch).logits, atol=1e-6, rtol=0)
    assert wrapped.generate(images[:3], QUESTIONS[:3]).texts == vlm.generate(images[:3], QUESTIONS[:3]).texts
    assert load_vlm(vlm) is vlm
    assert load_vlm(tiny_llava()).processor is not None  # scene-llava's processor is built when none is given
    training = tiny_llava().train()
    with pytest.warns(UserWarning, match="training mode"):
        adapter = load_vlm(training)
    assert adapter.model.training  # not switched
    half = load_vlm(tiny_llava(), device="cpu", dtype=torch.float64)
    assert half.dtype == torch.float64 and next(half.model.parameters()).dtype == torch.float64
    assert half.preprocess(images[0]).dtype == torch.float64
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        load_vlm(torch.nn.Linear(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_vlm(tiny_dir, device="cpu")  # loads quietly


def test_missing_names_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(VLM_ZOO, "scene-llava", VlmZooEntry("scene-llava", "test", tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="mmelkit train vlm") as error:
        load_vlm("scene-llava")
    assert str(tmp_path / "absent") in str(error.value)
    with pytest.raises(ValueError, match="does not exist") as error:
        load_vlm(str(tmp_path / "nowhere"))
    assert "nowhere" in str(error.value) and "scene-llava" in str(error.value)
    with pytest.raises(ValueError, match="not a short name"):
        load_vlm("llava-hf/llava-1.5-7b-hf")  # never a download


def test_wrong_architecture_is_named(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="'llama'"):
        load_vlm(tmp_path / "llama")
    make_hf_clip().save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="'clip'.*mmelkit.load_model"):
        load_vlm(tmp_path / "clip")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vlm(tmp_path)


def test_tokenizer_only_folders(tmp_path: Path, vlm: VlmAdapter, images: list[Any]) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    good = tmp_path / "good"
    tiny_llava().save_pretrained(good)
    scene_llava.build_tokenizer().save_pretrained(good)  # no processor files: one is built
    loaded = load_vlm(good, device="cpu")
    assert loaded.num_visual_tokens == 36
    assert loaded.generate(images[:3], QUESTIONS[:3]).texts == vlm.generate(images[:3], QUESTIONS[:3]).texts

    bad = tmp_path / "bad"
    tiny_llava().save_pretrained(bad)
    words = [w for w in scene_llava.VOCABULARY if w != scene_llava.IMAGE]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=scene_llava.UNK))
    core.normalizer, core.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token=scene_llava.EOS, pad_token=scene_llava.PAD,
                            unk_token=scene_llava.UNK).save_pretrained(bad)
    with pytest.raises(ValueError, match="no '<image>' token"):
        load_vlm(bad)


def test_zoo_folder_checksums(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch,
                              images: list[Any]) -> None:
    folder = tmp_path / "scene-llava"
    shutil.copytree(tiny_dir, folder)
    monkeypatch.setitem(VLM_ZOO, "scene-llava", VlmZooEntry("scene-llava", "test", folder))
    with pytest.raises(FileNotFoundError, match="mmelkit.json"):
        load_vlm("scene-llava")
    weights = folder / "model.safetensors"
    (folder / "mmelkit.json").write_text(json.dumps({"sha256": {"model.safetensors": sha256_file(weights)}}))
    loaded = load_vlm("scene-llava", device="cpu")
    assert loaded.name == "scene-llava" and not loaded.model.training
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch") as error:
        load_vlm("scene-llava")
    assert str(weights) in str(error.value)


def test_the_full_size_architecture_fits_the_size_budget_and_loads(tmp_path: Path) -> None:
    # load time is a benchmark figure (README), not a timed assertion
    model = scene_llava.build_model(0, vision_from_scene_clip=False)
    model.save_pretrained(tmp_path)
    scene_llava.build_processor().save_pretrained(tmp_path)
    size_mb = (tmp_path / "model.safetensors").stat().st_size / 2**20
    assert 10 < size_mb < 25, size_mb  # the budget: <= 25 MB of weights
    loaded = load_vlm(tmp_path, device="cpu")
    assert loaded.num_visual_tokens == 64 and loaded.grid == (8, 8)


def test_generate_speed_benchmark_runs(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        import vlm_generate_speed
    finally:
        sys.path.remove(str(benchmarks))
    result = vlm_generate_speed.main(["--model", str(tiny_dir), "--device", "cpu", "--answers", "3",
                                      "--new-tokens", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert result.generate_s > 0 and result.singles_s > 0 and "ratio generation / single forwards" in out
