"""Classification by description: scores against hand-computed cosines, the invariances the mean
must have, the rationale's order, and bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_clip, make_open_clip

import mmelkit
from mmelkit.methods.inference import classify_by_description

DESCRIPTIONS = {
    "square": ["has four equal sides", "is red", "has sharp corners"],
    "bar": ["is long and thin", "is blue"],
    "nothing": ["is empty", "has no objects", "is red"],  # "is red" also in square: a text shared by two classes
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["open_clip", "hf"])
def model(request: pytest.FixtureRequest) -> mmelkit.ClipAdapter:
    built = make_open_clip(seed=2) if request.param == "open_clip" else make_hf_clip(seed=2)
    return mmelkit.load_model(built, device="cpu")


def test_scores_are_the_mean_descriptor_cosine(model: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    result = classify_by_description(model, images, DESCRIPTIONS)
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(model.preprocess(images)), dim=-1)
    assert result.scores.shape == (3, 3) and result.classes == list(DESCRIPTIONS)
    for c, (cls, items) in enumerate(DESCRIPTIONS.items()):
        for j, desc in enumerate(items):
            text = f"{cls}, which {desc}"
            assert result.texts[c][j] == text
            with torch.no_grad():
                expected = image_features @ F.normalize(model.encode_text([text]), dim=-1)[0]
            torch.testing.assert_close(result.descriptor_scores[c][:, j], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(result.scores[:, c], result.descriptor_scores[c].mean(dim=1))
    assert torch.equal(result.predicted, result.scores.argmax(dim=1))


def test_one_plain_prompt_per_class_is_zero_shot_clip(model: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    """With the template "{desc}" and one descriptor per class, the scores are CLIP's zero-shot
    cosines for those prompts (the method reduces to the baseline it extends)."""
    prompts = ["a red square", "a blue bar", "nothing at all"]
    result = classify_by_description(model, images, {p: [p] for p in prompts}, template="{desc}")
    with torch.no_grad():
        pixels = model.preprocess(images)
        expected = F.normalize(model.encode_image(pixels), dim=-1) @ F.normalize(model.encode_text(prompts), dim=-1).T
        clip_scores = model.score(pixels, prompts)  # the adapter's own zero-shot scores
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=0)
    assert torch.equal(clip_scores.argmax(dim=1), result.predicted)


def test_invariances(model: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    base = classify_by_description(model, images, DESCRIPTIONS)
    # a repeated descriptor does not change a mean; reordered classes permute the columns
    repeated = classify_by_description(model, images, {k: v * 2 for k, v in DESCRIPTIONS.items()})
    torch.testing.assert_close(repeated.scores, base.scores)
    reordered = classify_by_description(model, images, dict(reversed(list(DESCRIPTIONS.items()))))
    torch.testing.assert_close(reordered.scores, base.scores.flip(1))
    # batch == per example
    small = classify_by_description(model, images, DESCRIPTIONS, batch_size=1)
    torch.testing.assert_close(small.scores, base.scores, atol=1e-6, rtol=0)
    single = torch.cat([classify_by_description(model, images[i : i + 1], DESCRIPTIONS).scores for i in range(3)])
    torch.testing.assert_close(single, base.scores, atol=1e-6, rtol=0)


def test_rationale_and_table(model: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    result = classify_by_description(model, images, DESCRIPTIONS)
    for image in range(3):
        reasons = result.rationale(image, top=2)
        predicted = int(result.predicted[image])
        assert len(reasons) == 2 and all(d in DESCRIPTIONS[result.classes[predicted]] for d, _ in reasons)
        values = result.descriptor_scores[predicted][image]
        assert reasons[0][1] == pytest.approx(float(values.max())) and reasons[0][1] >= reasons[1][1]
    assert [d for d, _ in result.rationale(0, top=9, cls=1)] == sorted(
        DESCRIPTIONS["bar"], key=lambda d: -float(result.descriptor_scores[1][0, DESCRIPTIONS["bar"].index(d)]))
    frame = result.to_frame(0)
    assert len(frame) == sum(len(v) for v in DESCRIPTIONS.values())
    assert frame["predicted"].iloc[0] and frame["class"].iloc[0] == result.classes[int(result.predicted[0])]
    labels = result.predicted.tolist()
    assert result.accuracy(labels) == 1.0
    with pytest.raises(ValueError, match="one class per image"):
        result.accuracy([0])
    with pytest.raises(IndexError, match="image 5"):
        result.rationale(5)


def test_the_model_is_left_alone(images: torch.Tensor) -> None:
    built = make_open_clip(seed=4).train()
    before = {k: v.clone() for k, v in built.state_dict().items()}
    flags = {k: p.requires_grad for k, p in built.named_parameters()}
    with pytest.warns(UserWarning, match="training mode"):
        classify_by_description(mmelkit.load_model(built, device="cpu"), images, DESCRIPTIONS)
    assert built.training
    assert all(torch.equal(before[k], v) for k, v in built.state_dict().items())
    assert {k: p.requires_grad for k, p in built.named_parameters()} == flags


@pytest.mark.parametrize(("descriptions", "template", "message"), [
    ({}, "{cls}, which {desc}", "non-empty mapping"),
    ({"square": []}, "{cls}, which {desc}", r"descriptions\['square'\] must be a non-empty list"),
    ({"square": "is red"}, "{cls}, which {desc}", r"descriptions\['square'\] must be a non-empty list"),
    ({"square": ["is red", ""]}, "{cls}, which {desc}", "empty or non-string descriptor"),
    ({"square": ["is red"]}, "a photo of a {cls}", r"template must contain \{desc\}"),
    ({"square": ["is red"]}, "{cls} {desc} {colour}", "takes only"),
])
def test_bad_descriptions(images: torch.Tensor, descriptions: dict, template: str, message: str) -> None:
    model = mmelkit.load_model(make_open_clip(seed=2), device="cpu")
    with pytest.raises(ValueError, match=message):
        classify_by_description(model, images, descriptions, template=template)
