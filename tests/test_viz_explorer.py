"""The course's scene explorer (mmelkit.viz.explorer): scenes from seed / object count /
co-occurrence, method parameters from the registry, curves and scores equal to the library's,
errors shown in place, both model kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_open_clip, tiny_llava

import mmelkit
from mmelkit.datasets.vqa import SceneQA, VqaConfig, partner_map
from mmelkit.metrics.faithfulness import deletion_curves, insertion_curves
from mmelkit.metrics.localisation import mask_iou, pointing_game, protocol_tolerance
from mmelkit.viz.explorer import SceneExplorer, scene_texts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip() -> mmelkit.ClipAdapter:
    return mmelkit.load_model(make_open_clip(), device="cpu")


def test_scenes_follow_seed_count_and_co_occurrence() -> None:
    qa = SceneQA(VqaConfig(co_occurrence=1.0), seed=3)
    first, again = qa.scene(7, count=2), qa.scene(7, count=2)
    assert np.array_equal(first.image, again.image) and len(first.objects) == 2
    # with certain co-occurrence the second object is the first one's partner
    pairs = partner_map(qa.config)
    names = [o.name for o in first.objects]
    assert pairs[names[0]] == names[1]
    assert not np.array_equal(first.image, qa.scene(8, count=2).image)
    with pytest.raises(ValueError, match="count must lie in"):
        qa.scene(0, count=9)


def test_the_explorer_shows_what_the_library_computes(clip: mmelkit.ClipAdapter) -> None:
    explorer = SceneExplorer(clip, methods=["grad_eclip", "rollout"], seed=2, objects=3, steps=4)
    state = explorer.state
    scene = state.scene
    assert [t for t, _ in scene_texts(scene, vlm=False)] == list(explorer.text.options)
    # the map is the method's own
    expected = mmelkit.explain(clip, [scene.image], [state.text], method="grad_eclip")
    torch.testing.assert_close(state.explanation.maps, expected.maps)
    # curves and scores equal the metric functions on the same map
    deletion = deletion_curves(clip, [scene.image], [state.text], expected, steps=4)
    insertion = insertion_curves(clip, [scene.image], [state.text], expected, steps=4)
    np.testing.assert_allclose(state.curves["deletion"], deletion.scores[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.curves["insertion"], insertion.scores[0].numpy(), rtol=1e-5, atol=1e-6)
    objects = dict(scene_texts(scene, vlm=False))[state.text]
    mask = torch.nn.functional.interpolate(torch.from_numpy(scene.mask_of(objects))[None, None].float(),
                                           size=clip.image_size, mode="nearest")[0] > 0.5
    up = expected.upsample()
    assert state.scores["pointing"] == float(pointing_game(up, mask, tolerance=protocol_tolerance(clip.image_size[0]))[0])
    assert state.scores["iou"] == pytest.approx(float(mask_iou(up, mask)[0]))
    # the figures show it
    assert explorer.overlay.layout.title.text.startswith("grad_eclip") and len(explorer.curves_figure.data) == 2


def test_widgets_drive_the_explorer(clip: mmelkit.ClipAdapter) -> None:
    explorer = SceneExplorer(clip, methods=["grad_eclip", "rollout"], seed=0, objects=2, steps=2)
    before = np.array(explorer.overlay.data[1].z)
    options = list(explorer.text.options)
    explorer.objects.value = 4  # a new scene: new texts, one per object
    assert len(explorer.text.options) == 4 and list(explorer.text.options) != options
    assert len(explorer.state.scene.objects) == 4
    assert not np.array_equal(before, np.array(explorer.overlay.data[1].z))
    explorer.method.value = "rollout"  # the parameter widgets follow the registry's defaults
    from mmelkit.methods import get_method

    editable = {k for k, v in get_method("rollout").defaults.items() if isinstance(v, (bool, int, float, str))}
    assert set(explorer.params()) == editable
    assert explorer.overlay.layout.title.text.startswith("rollout")


def test_a_refused_parameter_is_shown_in_place_and_the_figure_stays(clip: mmelkit.ClipAdapter) -> None:
    explorer = SceneExplorer(clip, methods=["grad_eclip"], steps=2)
    before = np.array(explorer.overlay.data[1].z)
    explorer._param_widgets["layers"].value = 99  # more blocks than the model has
    assert "layers" in explorer.message.value and "color:#b00" in explorer.message.value
    assert np.array_equal(before, np.array(explorer.overlay.data[1].z))
    explorer._param_widgets["layers"].value = 1  # a good value clears the message
    assert explorer.message.value == "" and explorer.state.explanation.params["layers"] == 1


def test_the_explorer_explains_a_vlm_answer_with_its_deletion_curve() -> None:
    vlm = mmelkit.load_vlm(tiny_llava(), device="cpu")
    explorer = SceneExplorer(vlm, seed=1, objects=2, steps=3, methods=["answer_attention"])
    state = explorer.state
    assert explorer.text.description == "question"
    assert state.text.startswith("is there a") and "describe the image ." in explorer.text.options
    assert set(state.curves) == {"deletion"} and state.curves["deletion"].shape == (4,)
    assert state.curves["deletion"][0] == pytest.approx(1.0)  # relative to the intact image
    answer = state.explanation.texts[0]
    assert repr(answer) in explorer.overlay.layout.title.text
    with pytest.raises(ValueError, match="explains"):
        SceneExplorer(vlm, methods=["grad_eclip"])
