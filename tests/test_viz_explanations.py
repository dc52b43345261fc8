"""Explanation figures build from explanations, arrays and model input, and refuse bad input clearly."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from conftest import TEXTS, make_open_clip

import mmelkit
from mmelkit.methods.base import Explanation, TextExplanation
from mmelkit.models.images import OPENAI_MEAN, OPENAI_STD
from mmelkit.viz import (
    ExplanationExplorer,
    display_image,
    explanation_grid,
    explanation_overlay,
    heat_map,
    text_scores_figure,
)


def _explanation(n: int = 3, method: str = "m", grid: int = 4, size: int = 32) -> Explanation:
    maps = torch.rand(n, grid, grid, generator=torch.Generator().manual_seed(n))
    return Explanation(maps, (size, size), method, {}, [f"text {i}" for i in range(n)])


def _text_explanation(scores: list[float], method: str = "t") -> TextExplanation:
    words = [f"w{i}" for i in range(len(scores))]
    return TextExplanation(torch.tensor([scores]), [words], [words], [torch.tensor(scores)],
                           [[[i + 1] for i in range(len(scores))]], method, {}, ["one text"])


def _image(size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_display_image_accepts_numpy_torch_and_model_input() -> None:
    image = _image()
    assert display_image(image).dtype == np.uint8 and np.array_equal(display_image(image), image)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    assert np.array_equal(display_image(chw), image)
    # model input: normalised with CLIP's statistics, (N, 3, H, W); round trip within one level
    raw = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    pixels = ((raw - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None])[None]
    batch = torch.cat([torch.zeros_like(pixels), pixels])
    assert np.abs(display_image(batch, index=1).astype(int) - image.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="channel"):
        display_image(np.zeros((32, 32, 7), np.uint8))
    with pytest.raises(ValueError, match="model input"):
        display_image(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(IndexError, match="2 images"):
        display_image(batch, index=2)


def test_heat_map_upsamples_one_map() -> None:
    explanation = _explanation()
    heat = heat_map(explanation, (32, 32), index=1)
    assert heat.shape == (32, 32)
    np.testing.assert_allclose(heat, explanation.upsample()[1].numpy(), atol=1e-6)
    assert heat_map(np.ones((4, 4)), (16, 8)).shape == (16, 8)
    with pytest.raises(IndexError, match="3 maps"):
        heat_map(explanation, (32, 32), index=3)
    with pytest.raises(ValueError, match=r"\(h, w\) or \(N, h, w\)"):
        heat_map(torch.zeros(1, 1, 4, 4), (8, 8))
    with pytest.raises(ValueError, match="NaN"):
        heat_map(torch.full((4, 4), float("nan")), (8, 8))
    with pytest.raises(TypeError, match="text_scores_figure"):
        heat_map(_text_explanation([0.1]), (8, 8))
    with pytest.raises(TypeError, match="Explanation or a map"):
        heat_map("not a map", (8, 8))


def test_overlay() -> None:
    explanation = _explanation()
    figure = explanation_overlay(_image(), explanation, index=2)
    assert isinstance(figure, go.Figure)
    assert [type(t).__name__ for t in figure.data] == ["Image", "Heatmap"]
    heat = figure.data[1]
    assert heat.z.shape == (32, 32) and (heat.zmin, heat.zmax) == (0.0, 1.0) and heat.opacity == 0.5
    assert heat.colorbar.title.text == "relevance"
    assert figure.layout.title.text == "m: 'text 2'"
    bare = explanation_overlay(_image(), np.zeros((4, 4)), title="bare", opacity=0.2)
    assert bare.layout.title.text == "bare" and bare.data[1].zmin is None and bare.data[1].opacity == 0.2
    with pytest.raises(ValueError, match="opacity"):
        explanation_overlay(_image(), explanation, opacity=2)


def test_grid_has_a_cell_per_pair_and_method() -> None:
    explanations = {"a": _explanation(method="a"), "b": _explanation(method="b")}
    images = [_image() for _ in range(3)]
    figure = explanation_grid(images, explanations)
    # per row: the plain image, then image + heat map per method
    assert len(figure.data) == 3 * (1 + 2 * 2)
    assert len([t for t in figure.data if isinstance(t, go.Heatmap)]) == 6
    assert all(t.coloraxis == "coloraxis" for t in figure.data if isinstance(t, go.Heatmap))
    titles = [a.text for a in figure.layout.annotations]
    assert titles[:3] == ["image", "a", "b"] and "text 0" in titles
    rows, cols = figure._get_subplot_rows_columns()
    assert (len(rows), len(cols)) == (3, 3)
    # one shared image, without the image column, own row titles
    shared = explanation_grid(_image(), explanations, texts=["x", "y", "z"], show_image=False)
    assert len(shared.data) == 3 * 2 * 2 and len(shared._get_subplot_rows_columns()[1]) == 2
    assert [a.text for a in shared.layout.annotations][-3:] == ["x", "y", "z"]
    assert (shared.layout.coloraxis.cmin, shared.layout.coloraxis.cmax) == (0.0, 1.0)
    # bare (N, h, w) maps mix with explanations; the colour axis then follows the data
    mixed = explanation_grid(images, {"a": explanations["a"], "raw": torch.rand(3, 4, 4) * 5})
    assert len(mixed.data) == 3 * 5 and mixed.layout.coloraxis.cmax is None


def test_grid_errors() -> None:
    with pytest.raises(ValueError, match="no explanations"):
        explanation_grid(_image(), {})
    with pytest.raises(ValueError, match="same number of pairs"):
        explanation_grid(_image(), {"a": _explanation(3), "b": _explanation(2)})
    with pytest.raises(ValueError, match="2 images for 3 pairs"):
        explanation_grid([_image(), _image()], {"a": _explanation(3)})
    with pytest.raises(ValueError, match="2 texts for 3 pairs"):
        explanation_grid(_image(), {"a": _explanation(3)}, texts=["x", "y"])
    with pytest.raises(TypeError, match="not image explanations"):
        explanation_grid(_image(), {"a": _text_explanation([0.1])})
    with pytest.raises(TypeError, match=r"\(N, h, w\) maps: \['b'\]"):
        explanation_grid(_image(), {"a": _explanation(3), "b": torch.zeros(4, 4)})


def test_text_scores_figure() -> None:
    figure = text_scores_figure(_text_explanation([0.5, -0.25, 0.1]))
    (bars,) = figure.data
    np.testing.assert_allclose(bars.y, [0.5, -0.25, 0.1], rtol=1e-6)
    assert list(figure.layout.xaxis.ticktext) == ["w0", "w1", "w2"]
    assert bars.marker.color[1] != bars.marker.color[0]  # negative bars stand out
    grouped = text_scores_figure({"p": _text_explanation([0.5, 1.0]), "q": _text_explanation([-4.0, 2.0])},
                                 normalise=True)
    assert [t.name for t in grouped.data] == ["p", "q"]
    np.testing.assert_allclose(grouped.data[1].y, [-1.0, 0.5])
    with pytest.raises(ValueError, match="other words"):
        text_scores_figure({"p": _text_explanation([0.5]), "q": _text_explanation([1.0, 2.0])})
    with pytest.raises(IndexError, match="1 texts"):
        text_scores_figure(_text_explanation([0.5]), index=1)
    with pytest.raises(TypeError, match="not text explanations"):
        text_scores_figure({"p": _explanation()})


def test_with_a_model_and_the_explorer(images: torch.Tensor) -> None:
    model = mmelkit.load_model(make_open_clip(), device="cpu")
    pixels = model.as_pixels(images)
    explanation = mmelkit.explain(model, pixels, TEXTS, method="grad_eclip")
    figure = explanation_overlay(pixels, explanation, index=1)
    assert figure.data[0].z.shape == (*model.image_size, 3)
    grid = explanation_grid(pixels, {"grad_eclip": explanation})
    assert len(grid.data) == 3 * 3
    text = mmelkit.explain(model, pixels, TEXTS, method="leave_one_word_out")
    assert len(text_scores_figure(text, index=1).data[0].y) == len(text.words(1))

    explorer = ExplanationExplorer(model, images[0], TEXTS, methods=["grad_eclip", "rollout"])
    before = np.array(explorer.figure.data[1].z)
    explorer.text.value = TEXTS[2]  # the widgets' observers call update()
    assert "nothing at all" in explorer.figure.layout.title.text
    assert not np.array_equal(before, np.array(explorer.figure.data[1].z))
    explorer.method.value = "rollout"
    assert explorer.layers.disabled and explorer.figure.layout.title.text.startswith("rollout")
    explorer.method.value = "grad_eclip"
    explorer.layers.value = 2
    assert not explorer.layers.disabled and explorer.update().params["layers"] == 2
    with pytest.raises(ValueError, match="unknown method"):
        ExplanationExplorer(model, images[0], TEXTS, methods=["nope"])


def test_the_explorer_drives_a_generative_vlm_over_several_scenes() -> None:
    from conftest import tiny_llava

    vlm = mmelkit.load_vlm(tiny_llava(), device="cpu")
    rng = np.random.default_rng(1)
    scenes = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(3)]
    questions = ["what colour is the star ?", "is there a red circle ?"]
    explorer = ExplanationExplorer(vlm, scenes, questions, image_labels=["a", "b", "c"])
    assert list(explorer.method.options) == list(ExplanationExplorer.VLM_METHODS)
    assert explorer.scene in explorer.widget.children[0].children  # several scenes: a scene picker
    own = vlm.generate([scenes[0]], questions[:1], max_new_tokens=8).texts[0]
    assert explorer.figure.layout.title.text == f"answer_relevancy: {questions[0]} → {own!r}"

    before_map, before_image = np.array(explorer.figure.data[1].z), np.array(explorer.figure.data[0].z)
    explorer.scene.value = 2  # the widgets' observers call update()
    assert not np.array_equal(before_image, np.array(explorer.figure.data[0].z))
    assert not np.array_equal(before_map, np.array(explorer.figure.data[1].z))
    expected = mmelkit.explain(vlm, [scenes[2]], questions[:1], method="answer_relevancy")
    np.testing.assert_allclose(np.array(explorer.figure.data[1].z), heat_map(expected, (48, 48)), atol=1e-6)

    explorer.method.value = "answer_attention"
    assert not explorer.layers.disabled and explorer.layers.value == vlm.num_decoder_layers
    explorer.layers.value = 1  # the last decoder layer only
    assert explorer.update().params["layers"] == (vlm.num_decoder_layers - 1, vlm.num_decoder_layers)
    explorer.method.value = "answer_gradient_x_input"
    assert explorer.layers.disabled

    single = ExplanationExplorer(vlm, scenes[0], questions, methods=["answer_attention"])
    assert single.scene not in single.widget.children[0].children
    with pytest.raises(ValueError, match="explain CLIP-style models"):
        ExplanationExplorer(vlm, scenes, questions, methods=["grad_eclip"])
    with pytest.raises(ValueError, match="image labels"):
        ExplanationExplorer(vlm, scenes, questions, image_labels=["only one"])
