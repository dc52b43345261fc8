"""The activation pass, layer probes and the CLIP logit lens (SPEC §7): exact against the model's own
forward, closed-form checks, cache behaviour, batch invariance and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_model

import mmelkit
from mmelkit.datasets import SceneWorld
from mmelkit.datasets.concepts import PROBE_TASKS, probe_task, scene_concepts
from mmelkit.methods.layer import clip_logit_lens, fit_ridge_probe, layer_probes
from mmelkit.models.activations import Activations, collect_activations

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = ["open_clip-default", "open_clip-lnd", "open_clip-custom", "hf-eager", "hf-sdpa"]


def _pixels(model: mmelkit.ClipAdapter, count: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return model.preprocess(list(torch.rand(count, 3, 32, 32, generator=generator)))


# -- the activation pass ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_pass_records_what_the_forward_computes(variant: str) -> None:
    model = mmelkit.load_model(make_model(variant), device="cpu")
    pixels = _pixels(model)
    acts = collect_activations(model, pixels, sites=["cls", "patch_mean", "patches", "neurons", "neurons_cls",
                                                     "embedding"], progress=False)
    with torch.no_grad(), model.trace(image_blocks="all", attention_probs=False) as trace:
        embedding = model.encode_image(pixels, normalize=False)
    torch.testing.assert_close(acts["embedding"], embedding)
    for block in trace.image:
        tokens = block.tokens_out
        torch.testing.assert_close(acts["cls", block.index], tokens[:, 0])
        torch.testing.assert_close(acts["patch_mean", block.index], tokens[:, 1:].mean(dim=1))
        torch.testing.assert_close(acts["patches", block.index], tokens[:, 1:])
    # the lens identity: the last CLS through the final norm and projection is the embedding
    torch.testing.assert_close(model.project_image_tokens(acts["cls", -1][:, None])[:, 0], embedding)
    hidden = model.backend.image_tower().blocks[0].mlp
    width = (hidden.c_fc if hasattr(hidden, "c_fc") else hidden.fc1).out_features
    assert acts["neurons", 0].shape == (5, width) == acts["neurons_cls", 0].shape


def test_neurons_are_the_mlp_hidden_units_after_the_nonlinearity() -> None:
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    pixels = _pixels(model, 3)
    block = model.backend.image_tower().blocks[1]
    acts = collect_activations(model, pixels, sites=["neurons", "neurons_cls"], layers=[1], progress=False)
    # reference: the input of the MLP's output projection, read by a hook of the test's own
    reference = {}

    def keep(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        reference["hidden"] = args[0]

    handle = block.mlp.c_proj.register_forward_pre_hook(keep)
    try:
        with torch.no_grad():
            model.encode_image(pixels)
    finally:
        handle.remove()
    torch.testing.assert_close(acts["neurons", 1], reference["hidden"][:, 1:].mean(dim=1))
    torch.testing.assert_close(acts["neurons_cls", 1], reference["hidden"][:, 0])
    assert (reference["hidden"] >= -0.2).all()  # after GELU: nothing below its minimum (about -0.17)


def test_batch_size_does_not_change_the_activations() -> None:
    model = mmelkit.load_model(make_model("hf-eager"), device="cpu")
    pixels = _pixels(model, 7)
    one = collect_activations(model, pixels, sites=["cls", "neurons"], batch_size=2, progress=False)
    all_at_once = collect_activations(model, pixels, sites=["cls", "neurons"], batch_size=64, progress=False)
    for key in one.data:
        torch.testing.assert_close(one.data[key], all_at_once.data[key], rtol=1e-5, atol=1e-5)


def test_raw_images_and_model_input_give_the_same_pass() -> None:
    model = mmelkit.load_model("scene-clip")
    world = SceneWorld(seed=3)
    images = [world[i].image for i in range(4)]
    from_images = collect_activations(model, images, sites=["cls"], layers=[-1], progress=False)
    from_pixels = collect_activations(model, model.preprocess(images), sites=["cls"], layers=[-1], progress=False)
    torch.testing.assert_close(from_images["cls", 3], from_pixels["cls", -1])


def test_the_cache_reads_back_and_is_keyed_by_model_and_data(tmp_path) -> None:
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    pixels = _pixels(model, 6)
    first = collect_activations(model, pixels, sites=["cls", "neurons"], layers=[0, -1], cache=tmp_path, progress=False)
    assert first.path is not None and (first.path / "meta.json").is_file()
    again = collect_activations(model, pixels, sites=["cls", "neurons"], layers=[0, -1], cache=tmp_path, progress=False)
    assert again.path == first.path
    torch.testing.assert_close(again["cls", -1], first["cls", -1])
    assert len(list(tmp_path.iterdir())) == 1  # no partial folders left behind

    # changed weights: a new entry with new values, never the stale one
    with torch.no_grad():
        model.model.visual.transformer.resblocks[0].mlp.c_fc.weight.mul_(1.5)
    changed = collect_activations(model, pixels, sites=["cls", "neurons"], layers=[0, -1], cache=tmp_path,
                                  progress=False)
    assert changed.path != first.path
    assert not torch.allclose(changed["cls", -1], first["cls", -1])
    # changed images: a new entry too
    other = collect_activations(model, pixels.flip(0), sites=["cls", "neurons"], layers=[0, -1], cache=tmp_path,
                                progress=False)
    assert other.path not in (first.path, changed.path)
    torch.testing.assert_close(other["cls", 0], changed["cls", 0].flip(0))
    assert len(list(tmp_path.iterdir())) == 3


def test_a_cache_written_by_another_model_is_refused_by_name(tmp_path) -> None:
    model = mmelkit.load_model(make_model("open_clip-default", seed=0), device="cpu")
    other = mmelkit.load_model(make_model("open_clip-default", seed=1), device="cpu")
    acts = collect_activations(model, _pixels(model), sites=["cls"], cache=tmp_path, progress=False)
    assert Activations.load(acts.path, model=model).num_images == 5
    with pytest.raises(ValueError, match="written by another model"):
        Activations.load(acts.path, model=other)
    meta = json.loads((acts.path / "meta.json").read_text())
    np.save(acts.path / meta["entries"][0]["file"], np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="truncated"):
        Activations.load(acts.path)
    (acts.path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Activations.load(acts.path)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        Activations.load(tmp_path / "nowhere")


def test_hooks_are_removed_after_an_error_inside_the_pass() -> None:
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    images = [np.zeros((32, 32, 3), np.uint8)] * 3 + ["not an image"]
    with pytest.raises(TypeError, match="cannot use str as an image"):
        collect_activations(model, images, sites=["cls", "neurons"], batch_size=3, progress=False)
    for block in model.backend.image_tower().blocks:
        assert not block._forward_hooks and not block.mlp.c_proj._forward_pre_hooks


def test_bad_requests_name_their_cause() -> None:
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    pixels = _pixels(model, 2)
    with pytest.raises(IndexError, match="2 blocks; index 5 is out of range"):
        collect_activations(model, pixels, layers=[5], progress=False)
    with pytest.raises(ValueError, match="unknown site"):
        collect_activations(model, pixels, sites=["attention"], progress=False)
    with pytest.raises(ValueError, match="no images"):
        collect_activations(model, [], progress=False)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        collect_activations(model, pixels, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="model input"):
        collect_activations(model, torch.zeros(2, 32, 32, dtype=torch.uint8), progress=False)
    acts = collect_activations(model, pixels, sites=["cls"], layers=[0], progress=False)
    with pytest.raises(KeyError, match="was not collected"):
        acts["cls", 1]
    with pytest.raises(IndexError, match="layer 7 is out of range"):
        acts["cls", 7]
    with pytest.raises(KeyError, match="needs a layer"):
        acts["cls"]


def test_a_model_that_is_not_a_vit_is_refused() -> None:
    import open_clip

    resnet = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": (1, 1, 1, 1), "width": 8},
                            text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    with pytest.raises(NotImplementedError, match="ViT image towers"):
        mmelkit.load_model(resnet, device="cpu")


# -- probes ----------------------------------------------------------------------------------------


def test_ridge_equals_the_normal_equations() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=generator)
    probe = fit_ridge_probe(x, y, alpha=0.5)
    z = (x - x.mean(0)) / x.std(0)
    targets = torch.nn.functional.one_hot(y, 3).double()
    expected = torch.linalg.solve(z.T @ z + 0.5 * 60 * torch.eye(5, dtype=torch.float64),
                                  z.T @ (targets - targets.mean(0)))
    torch.testing.assert_close(probe.weight, expected)
    torch.testing.assert_close(probe.bias, targets.mean(0))


def test_a_probe_separates_linearly_separable_features_perfectly() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (400,), generator=generator)
    centres = torch.randn(4, 16, generator=generator) * 4
    features = centres[labels] + 0.3 * torch.randn(400, 16, generator=generator)
    probe = fit_ridge_probe(features[:300], labels[:300])
    assert probe.accuracy(features[300:], labels[300:]) == 1.0
    assert probe.alpha in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def test_a_probe_on_noise_stays_near_chance() -> None:
    generator = torch.Generator().manual_seed(2)
    features, labels = torch.randn(600, 8, generator=generator), torch.randint(0, 2, (600,), generator=generator)
    probe = fit_ridge_probe(features[:400], labels[:400])
    assert abs(probe.accuracy(features[400:], labels[400:]) - 0.5) < 0.12


def test_bad_probe_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="labels must be non-negative integer"):
        fit_ridge_probe(torch.randn(4, 2), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_ridge_probe(torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"\(N, D\) and labels \(N,\)"):
        fit_ridge_probe(torch.randn(4, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="alpha"):
        fit_ridge_probe(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), alpha=-1.0)
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu")
    with pytest.raises(ValueError, match="unknown or no probe tasks"):
        layer_probes(model, ["texture"], progress=False)
    with pytest.raises(ValueError, match="probe sites"):
        layer_probes(model, ["colour"], sites=["neurons"], progress=False)


def test_layer_probes_give_one_accuracy_per_task_site_and_layer() -> None:
    model = mmelkit.load_model(make_model("hf-eager"), device="cpu")
    result = layer_probes(model, PROBE_TASKS, train_count=40, test_count=30, progress=False)
    frame = result.to_frame()
    assert len(frame) == len(PROBE_TASKS) * 2 * model.num_image_blocks
    assert frame["accuracy"].between(0, 1).all() and set(frame["task"]) == set(PROBE_TASKS)
    assert result.samples["relation"] == (40, 30)


def test_probe_tasks_have_exact_labels() -> None:
    data = probe_task("count", 30, seed=4)
    assert [int(data.classes[i]) for i in data.labels] == [len(s.objects) for s in data.scenes]
    relation = probe_task("relation", 20, seed=4)
    assert all(len(s.objects) == 2 for s in relation.scenes) and set(relation.labels.tolist()) <= {0, 1}
    table = scene_concepts(data.scenes)
    assert table.presence[:, table.names.index("count=1")].tolist() == [len(s.objects) == 1 for s in data.scenes]
    colours = table.group("colour").presence
    assert colours.sum(1).tolist() == [len({o.colour for o in s.objects}) for s in data.scenes]


# -- the CLIP logit lens ---------------------------------------------------------------------------


def test_the_last_layer_of_the_lens_is_the_zero_shot_prediction() -> None:
    model = mmelkit.load_model(make_model("open_clip-lnd"), device="cpu")
    pixels = _pixels(model, 6)
    classes = ["a red square", "a blue bar", "nothing", "a cat"]
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    lens = clip_logit_lens(model, pixels, classes, labels, progress=False)
    with torch.no_grad():
        zero_shot = model.score(pixels, classes).argmax(dim=1)
    assert torch.equal(lens.predictions[-1], zero_shot)
    assert lens.accuracy[-1].item() == pytest.approx(zero_shot.eq(labels).float().mean().item())
    assert lens.predictions.shape == (model.num_image_blocks, 6)
    split = clip_logit_lens(model, pixels, classes, labels, batch_size=4, progress=False)
    assert torch.equal(split.predictions, lens.predictions)
    with pytest.raises(ValueError, match="index the 4 class texts"):
        clip_logit_lens(model, pixels, classes, torch.tensor([0, 1, 2, 3, 4, 0]), progress=False)
    with pytest.raises(ValueError, match="no class texts"):
        clip_logit_lens(model, pixels, [], labels, progress=False)


def test_the_tools_are_listed_with_their_place() -> None:
    table = mmelkit.list_methods("tool")
    assert {"layer_probes", "clip_logit_lens", "causal_trace", "logit_lens"} <= set(table.index)
    assert (table.loc[["layer_probes", "clip_logit_lens"], "granularity"] == "layer").all()
    assert set(mmelkit.list_methods("map").index) & set(table.index) == set()
    with pytest.raises(ValueError, match="kind must be"):
        mmelkit.list_methods("probes")
