"""preprocess / tokenize / score: every accepted input form, and clear errors for the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEXTS, make_open_clip
from PIL import Image

import mmelkit
from mmelkit.models.images import OPENAI_MEAN, OPENAI_STD, keep_size


@pytest.fixture(scope="module")
def model() -> mmelkit.ClipAdapter:
    return mmelkit.load_model(make_open_clip(seed=11), device="cpu")


def _unnormalise(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return pixels * std + mean


RGB = (np.arange(40 * 56 * 3).reshape(40, 56, 3) % 251).astype(np.uint8)


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(RGB),
        Image.fromarray(RGB).convert("RGBA"),
        Image.fromarray(RGB).convert("P"),
        RGB,
        RGB.astype(np.float32) / 255.0,
        np.concatenate([RGB, np.full((40, 56, 1), 7, np.uint8)], axis=-1),  # RGBA array
        torch.from_numpy(RGB).permute(2, 0, 1).contiguous(),  # uint8 CHW tensor
        torch.from_numpy(RGB).permute(2, 0, 1).float() / 255.0,
    ],
    ids=["pil-rgb", "pil-rgba", "pil-palette", "np-uint8", "np-float", "np-rgba", "torch-uint8", "torch-float"],
)
def test_colour_inputs_agree(model: mmelkit.ClipAdapter, image: object) -> None:
    # A palette image holds quantised colours: compare it with its own RGB conversion.
    palette = isinstance(image, Image.Image) and image.mode == "P"
    reference = model.preprocess(np.asarray(image.convert("RGB")) if palette else RGB)
    pixels = model.preprocess(image)
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "gray",
    [
        Image.fromarray(RGB[..., 0]),
        RGB[..., 0],
        RGB[..., :1],
        torch.from_numpy(RGB[..., 0]),
        torch.from_numpy(RGB[..., 0])[None],
    ],
    ids=["pil-L", "np-HW", "np-HW1", "torch-HW", "torch-1HW"],
)
def test_grayscale_becomes_three_equal_channels(model: mmelkit.ClipAdapter, gray: object) -> None:
    raw = _unnormalise(model.preprocess(gray))
    torch.testing.assert_close(raw[:, 0], raw[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[:, 1], raw[:, 2], atol=1e-5, rtol=0)


def test_sizes(model: mmelkit.ClipAdapter) -> None:
    wide = np.zeros((30, 90, 3), np.uint8)
    assert model.preprocess(wide).shape[-2:] == (32, 32)
    assert model.preprocess(wide, size="keep").shape[-2:] == (32, 88)
    assert model.preprocess(wide, size=(16, 48)).shape[-2:] == (16, 48)
    assert model.preprocess(wide, size=24).shape[-2:] == (24, 24)
    assert keep_size(3, 3, (8, 8)) == (8, 8)
    assert model.grid(model.preprocess(wide, size="keep")) == (4, 11)
    assert model.grid((64, 40)) == (8, 5)


def test_centre_crop_keeps_the_centre(model: mmelkit.ClipAdapter) -> None:
    image = np.zeros((32, 96, 3), np.uint8)
    image[:, 32:64] = 255  # white centre third, black sides
    raw = _unnormalise(model.preprocess(image))
    assert raw.min() > 0.99


def test_a_list_and_a_batch_tensor_of_raw_images(model: mmelkit.ClipAdapter) -> None:
    batch = torch.rand(4, 3, 20, 20)
    from_list = model.preprocess(list(batch))
    assert from_list.shape == (4, 3, 32, 32)
    torch.testing.assert_close(model.preprocess([batch[2]]), from_list[2:3])


def test_model_input_tensor_passes_through(model: mmelkit.ClipAdapter) -> None:
    pixels = model.preprocess([RGB, RGB[::-1].copy()])
    assert model.as_pixels(pixels) is pixels
    torch.testing.assert_close(model.encode_image(pixels), model.encode_image([RGB, RGB[::-1].copy()]))


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ("photo.png", TypeError, "expected an image"),
        ([object()], TypeError, "cannot use object"),
        ([], ValueError, "no images"),
        (np.zeros((2, 2, 2, 2, 2)), ValueError, "2 or 3 dimensions"),
        (np.zeros((10, 10, 7)), ValueError, "channel axis"),
        (np.full((8, 8, 3), 2.5, np.float32), ValueError, r"\[0, 1\]"),
        (np.full((8, 8, 3), np.nan, np.float32), ValueError, "NaN"),
        (np.zeros((8, 8, 3), np.int32), TypeError, "dtype"),
        (np.zeros((0, 8, 3), np.uint8), ValueError, "empty"),
    ],
)
def test_bad_images(model: mmelkit.ClipAdapter, bad: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        model.preprocess(bad)


def test_bad_sizes(model: mmelkit.ClipAdapter) -> None:
    with pytest.raises(ValueError, match="one size"):
        model.preprocess([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], size="keep")
    with pytest.raises(ValueError, match="multiple of the patch"):
        model.preprocess(RGB, size=(30, 32))
    with pytest.raises(ValueError, match="size must be"):
        model.preprocess(RGB, size=(8, 8, 8))
    with pytest.raises(ValueError, match="multiple of the patch"):
        model.encode_image(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="3 channels"):
        model.encode_image(torch.zeros(1, 4, 32, 32))


def test_texts(model: mmelkit.ClipAdapter) -> None:
    tokens = model.tokenize(TEXTS)
    assert tokens.ids.shape == (3, 16) and tokens.texts == TEXTS
    assert (tokens.ids[torch.arange(3), tokens.eos_index] == 49407).all()
    assert len(model.tokenize("one text")) == 1
    with pytest.raises(ValueError, match="no texts"):
        model.tokenize([])
    with pytest.raises(TypeError, match="strings"):
        model.tokenize([1, 2])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="TextTokens"):
        model.encode_text(tokens.ids)
    torch.testing.assert_close(model.encode_text(tokens), model.encode_text(TEXTS))
    picked = tokens.select([2, 2, 0])
    assert picked.texts == [TEXTS[2], TEXTS[2], TEXTS[0]]


def test_score_pairings(model: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    every = model.score(images, TEXTS)
    assert every.shape == (3, 3)
    assert (every.abs() <= 1 + 1e-6).all()
    torch.testing.assert_close(model.score(images, TEXTS, pairing="paired"), every.diagonal())
    assert model.score(images, TEXTS[:2]).shape == (3, 2)
    with pytest.raises(ValueError, match="as many texts as images"):
        model.score(images, TEXTS[:2], pairing="paired")
    with pytest.raises(ValueError, match="pairing"):
        model.score(images, TEXTS, pairing="diagonal")  # type: ignore[arg-type]
    unit = model.encode_image(images)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(model.encode_image(images, normalize=False).norm(dim=-1), torch.ones(3))
