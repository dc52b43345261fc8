"""Mean-ablation of whole branches of a CLIP image tower (mmelkit.methods.layer.layer_ablation).

The hook path is checked against a hand-written block-by-block forward; oracles whose answer is
known (identical images, a branch that writes a constant, the last attention branch where total
and direct effect must coincide) pin down what the numbers mean; then batch invariance, the
sequence-first layout, hook clean-up and the user's model.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXTS, TINY_OPEN_CLIP, _randomize_biases, make_hf_clip, make_model, make_open_clip
from torch import nn

import mmelkit
from mmelkit.methods.embedding import decompose_image, head_ablation
from mmelkit.methods.layer import BranchMeans, branch_means, layer_ablation, mean_ablated
from mmelkit.models.open_clip_backend import open_clip

pytestmark = pytest.mark.usefixtures("one_thread")

BRANCHES = ("attention", "mlp")
EVERY_PAIR = [(layer, branch) for layer in range(2) for branch in BRANCHES]  # tiny towers have 2 blocks


def _images(count: int, seed: int) -> torch.Tensor:
    """Raw images (count, 3, 32, 32) in [0, 1], from dark to washed out so the tiny models disagree on them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, 32, 32, generator=generator) ** torch.linspace(0.3, 3.0, count)[:, None, None, None]


def _embed(adapter: mmelkit.ClipAdapter, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return adapter.encode_image(pixels)


def _ablated(adapter: mmelkit.ClipAdapter, pixels: torch.Tensor, means: BranchMeans, pairs: Any) -> torch.Tensor:
    with torch.no_grad(), mean_ablated(adapter, means, pairs):
        return adapter.encode_image(pixels)


def _forward_hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


# -------------------------------------------------------------------------------------------------
# The slow reference: the tower run block by block, branches replaced by hand
# -------------------------------------------------------------------------------------------------


def reference_forward(adapter: mmelkit.ClipAdapter, pixels: torch.Tensor,
                      replace: dict[tuple[int, str], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Unit image embeddings of a batch-first open_clip or Hugging Face tower written out block by
    block, with branch (layer, branch) replaced by ``replace[(layer, branch)]`` (L, D) at every image;
    also every branch's output (N, L, D) as computed."""
    replace = replace or {}
    outputs: dict[tuple[int, str], torch.Tensor] = {}

    def branch(layer: int, name: str, value: torch.Tensor) -> torch.Tensor:
        outputs[(layer, name)] = value
        return replace[(layer, name)].expand_as(value) if (layer, name) in replace else value

    with torch.no_grad():
        if adapter.family == "open_clip":
            visual = adapter.model.visual
            x = visual.conv1(pixels).flatten(2).transpose(1, 2)
            x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
            x = visual.ln_pre(x)
            for layer, block in enumerate(visual.transformer.resblocks):
                h = block.ln_1(x)
                if isinstance(block.attn, nn.MultiheadAttention):
                    attention = block.attn(h, h, h, need_weights=False)[0]
                else:  # open_clip's own Attention (CustomResidualAttentionBlock)
                    attention = block.ln_attn(block.attn(h))
                x = x + branch(layer, "attention", block.ls_1(attention))
                x = x + branch(layer, "mlp", block.ls_2(block.mlp(block.ln_2(x))))
            embedding = visual.ln_post(x[:, 0]) @ visual.proj
        else:
            vision = adapter.model.vision_model
            x = vision.pre_layrnorm(vision.embeddings(pixels))
            for layer, block in enumerate(vision.encoder.layers):
                x = x + branch(layer, "attention", block.self_attn(block.layer_norm1(x))[0])
                x = x + branch(layer, "mlp", block.mlp(block.layer_norm2(x)))
            embedding = adapter.model.visual_projection(vision.post_layernorm(x[:, 0]))
    return F.normalize(embedding, dim=-1), outputs


@pytest.mark.parametrize("variant", ["open_clip-default", "open_clip-custom", "hf-eager"])
def test_hooks_match_a_block_by_block_reference(variant: str) -> None:
    adapter = mmelkit.load_model(make_model(variant, seed=3), device="cpu")
    pixels, other = adapter.as_pixels(_images(8, 1)), adapter.as_pixels(_images(6, 2))
    baseline, _ = reference_forward(adapter, pixels)
    assert torch.allclose(baseline, _embed(adapter, pixels), atol=1e-5), "the reference forward is not the model's"

    # Means over the reference images, per token position, computed by hand.
    _, outputs = reference_forward(adapter, other)
    means = branch_means(adapter, other, batch_size=4)
    assert means.num_images == 6
    for (layer, name), value in outputs.items():
        assert torch.allclose(means.of(name)[layer], value.double().mean(dim=0).float(), atol=1e-6)

    replacements = {key: means.of(key[1])[key[0]] for key in outputs}
    with torch.no_grad():
        class_features = adapter.encode_text(TEXTS)
    labels = (baseline @ class_features.T).argmax(dim=-1)
    expected = {}
    for layer, name in EVERY_PAIR:
        reference, _ = reference_forward(adapter, pixels, {(layer, name): replacements[(layer, name)]})
        assert (reference - baseline).abs().max() > 1e-4, f"ablating {(layer, name)} should change something"
        assert torch.allclose(_ablated(adapter, pixels, means, [(layer, name)]), reference, atol=1e-5)
        expected[(layer, name)] = float(((reference @ class_features.T).argmax(-1) == labels).float().mean())
    together = [(0, "mlp"), (1, "attention")]
    reference, _ = reference_forward(adapter, pixels, {key: replacements[key] for key in together})
    assert torch.allclose(_ablated(adapter, pixels, means, together), reference, atol=1e-5)

    result = layer_ablation(adapter, pixels, TEXTS, labels, parts=["attention", "mlp"], ablate=together,
                            reference_images=other, batch_size=3)
    assert result.baseline_accuracy == 1.0 and result.num_images == 8 and result.num_reference == 6
    assert result.layers == [0, 1] and result.parts == ["attention", "mlp"]
    for i, layer in enumerate(result.layers):
        for j, name in enumerate(result.parts):
            assert result.accuracy[i, j] == pytest.approx(expected[(layer, name)])
    assert torch.allclose(result.drop, 1.0 - result.accuracy)
    assert result.set_accuracy == pytest.approx(float(((reference @ class_features.T).argmax(-1) == labels).float().mean()))
    assert result.ablated == together


# -------------------------------------------------------------------------------------------------
# Oracles
# -------------------------------------------------------------------------------------------------


def test_mean_over_identical_images_changes_nothing(adapter: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    """Every backend and layout: the mean of copies of one image is that image's own branch output,
    so every ablation leaves the embedding; over distinct images it does not."""
    same = adapter.as_pixels(images[:1]).expand(3, -1, -1, -1)
    baseline = _embed(adapter, same)
    means = branch_means(adapter, same)
    everything = [(layer, "both") for layer in range(adapter.num_image_blocks)]
    assert torch.equal(_ablated(adapter, same, means, everything), baseline)
    one = adapter.as_pixels(images[:1])
    assert torch.equal(_ablated(adapter, one, branch_means(adapter, one), everything), _embed(adapter, one))

    result = layer_ablation(adapter, same, TEXTS, [0, 1, 2], parts=("attention", "mlp", "both"), ablate=everything)
    assert result.baseline_accuracy == pytest.approx(1 / 3)
    assert torch.equal(result.drop, torch.zeros(2, 3)) and result.set_drop == 0.0

    distinct = adapter.as_pixels(images)
    ablated = _ablated(adapter, distinct, branch_means(adapter, distinct), [(0, "attention")])
    assert (ablated - _embed(adapter, distinct)).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["open_clip", "hf"])
def test_a_branch_that_writes_a_constant_can_be_ablated_for_free(family: str) -> None:
    """Block 0's MLP output weights are zero, so it writes its bias, the same at every image and
    position: the mean is that bias and ablating it changes nothing. Its attention matters."""
    model = make_open_clip(seed=1) if family == "open_clip" else make_hf_clip(seed=1)
    blocks = model.visual.transformer.resblocks if family == "open_clip" else model.vision_model.encoder.layers
    with torch.no_grad():
        (blocks[0].mlp.c_proj if family == "open_clip" else blocks[0].mlp.fc2).weight.zero_()
    adapter = mmelkit.load_model(model, device="cpu")
    pixels = adapter.as_pixels(_images(8, 3))
    means = branch_means(adapter, pixels)
    baseline = _embed(adapter, pixels)
    assert torch.equal(_ablated(adapter, pixels, means, [(0, "mlp")]), baseline)
    assert (_ablated(adapter, pixels, means, [(0, "attention")]) - baseline).abs().max() > 1e-3
    assert (_ablated(adapter, pixels, means, [(1, "mlp")]) - baseline).abs().max() > 1e-4

    labels = torch.arange(8) % 3
    result = layer_ablation(adapter, pixels, TEXTS, labels, layers=0, parts="mlp")
    assert result.accuracy.shape == (1, 1) and result.drop[0, 0] == 0.0


def _oracle_for_direct_effects(linear_norm: bool, seed: int = 2) -> mmelkit.ClipAdapter:
    """A tiny open_clip tower (with LayerScale) whose last MLP writes a constant and, when
    ``linear_norm``, whose final LayerNorm divides by the same number for every image."""
    config = json.loads(json.dumps(TINY_OPEN_CLIP))
    config["vision_cfg"]["ls_init_value"] = 0.5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**config)
        _randomize_biases(model, seed)
        with torch.no_grad():
            for block in model.visual.transformer.resblocks:
                for scale in (block.ls_1, block.ls_2):
                    scale.gamma.uniform_(0.5, 1.5)
            model.visual.transformer.resblocks[-1].mlp.c_proj.weight.zero_()
            if linear_norm:
                # sqrt(var + 1e12) is exactly 1e6 in float32 for any var below 2^15: the norm
                # becomes a fixed affine map, and the larger gain keeps the image's part visible.
                model.visual.ln_post.eps = 1e12
                model.visual.ln_post.weight.mul_(1e6)
    return mmelkit.load_model(model.eval(), device="cpu")


def test_last_attention_total_effect_equals_the_direct_effect_of_all_its_heads() -> None:
    """Ablating block L-1's attention changes the final stream at CLS by mean(a) - a(x) and nothing
    else when the last MLP writes a constant. head_ablation moves the embedding by the same
    difference through the final norm *linearised at each image's own std*, and averages the
    linearised terms (each divided by its image's std); the real norm divides by the std of the
    ablated stream. Both agree exactly when the norm's denominator is one constant, which the
    oracle arranges (LayerScale is linear and in both). Labels are the direct-ablation
    predictions, so equal accuracies mean equal predictions image by image."""
    texts = ["a red square", "a blue bar on the left", "nothing at all", "a green circle", "two yellow stars",
             "a dark room", "a bright sky", "a cat"]
    adapter = _oracle_for_direct_effects(linear_norm=True)
    pixels = adapter.as_pixels(_images(24, 7))
    decomposition = decompose_image(adapter, pixels)
    assert torch.all(decomposition.final_std == decomposition.final_std[0])
    last = decomposition.heads[:, -1]  # (N, H, E)
    direct = F.normalize(decomposition.total() - last.sum(1) + last.mean(0).sum(0), dim=-1)
    total = _ablated(adapter, pixels, branch_means(adapter, pixels), [(-1, "attention")])
    assert torch.allclose(total, direct, atol=1e-5)

    with torch.no_grad():
        labels = (direct @ adapter.encode_text(texts).T).argmax(dim=-1)
    heads = head_ablation(adapter, pixels, texts, labels, ablate=[(1, h) for h in range(last.shape[1])])
    layers = layer_ablation(adapter, pixels, texts, labels, layers=[-1], parts=["attention"])
    assert heads.set_accuracy == 1.0 == float(layers.accuracy[0, 0])
    assert layers.baseline_accuracy == heads.baseline_accuracy < 1.0, "the ablation should flip some predictions"

    # Control: with the usual image-dependent norm the two effects differ.
    plain = _oracle_for_direct_effects(linear_norm=False)
    pixels = plain.as_pixels(_images(24, 7))
    decomposition = decompose_image(plain, pixels)
    last = decomposition.heads[:, -1]
    direct = F.normalize(decomposition.total() - last.sum(1) + last.mean(0).sum(0), dim=-1)
    total = _ablated(plain, pixels, branch_means(plain, pixels), [(-1, "attention")])
    assert (total - direct).abs().max() > 1e-3


# -------------------------------------------------------------------------------------------------
# Batches, layouts, clean-up, the user's model
# -------------------------------------------------------------------------------------------------


def test_batch_size_does_not_change_the_result() -> None:
    adapter = mmelkit.load_model(make_open_clip(seed=4), device="cpu")
    pixels = adapter.as_pixels(_images(7, 5))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    results = [layer_ablation(adapter, pixels, TEXTS, labels, parts=("attention", "mlp", "both"),
                              ablate=[(0, "both")], batch_size=size) for size in (1, 3, 7)]
    for other in results[1:]:
        assert torch.equal(other.accuracy, results[0].accuracy) and other.set_accuracy == results[0].set_accuracy
    means = [branch_means(adapter, pixels, batch_size=size) for size in (1, 4)]
    assert torch.allclose(means[0].attention, means[1].attention, atol=1e-6)
    assert torch.allclose(means[0].mlp, means[1].mlp, atol=1e-6)
    batched = _ablated(adapter, pixels, means[0], [(1, "attention")])
    one_by_one = torch.cat([_ablated(adapter, pixels[i : i + 1], means[0], [(1, "attention")]) for i in range(7)])
    assert torch.allclose(batched, one_by_one, atol=1e-6)


def test_the_sequence_first_layout_gives_the_batch_first_numbers() -> None:
    """'lnd' runs the same weights with (L, N, D) tokens: means and ablations must not notice."""
    first, second = (mmelkit.load_model(make_open_clip(kind, seed=5), device="cpu") for kind in ("default", "lnd"))
    pixels = first.as_pixels(_images(6, 6))
    means = [branch_means(model, pixels, batch_size=4) for model in (first, second)]
    assert means[1].attention.shape == (2, 17, 32)  # batch-first tables whatever the layout
    assert torch.allclose(means[0].attention, means[1].attention, atol=1e-6)
    assert torch.allclose(means[0].mlp, means[1].mlp, atol=1e-6)
    for pair in EVERY_PAIR:
        assert torch.allclose(_ablated(first, pixels, means[0], [pair]), _ablated(second, pixels, means[1], [pair]),
                              atol=1e-5)


def test_hooks_are_removed_after_an_exception(images: torch.Tensor) -> None:
    adapter = mmelkit.load_model(make_open_clip(), device="cpu")
    means = branch_means(adapter, images)
    before = _forward_hooks(adapter.model)
    with pytest.raises(RuntimeError, match="boom"), mean_ablated(adapter, means, [(0, "both"), (1, "mlp")]):
        assert _forward_hooks(adapter.model) == before + 3
        raise RuntimeError("boom")
    assert _forward_hooks(adapter.model) == before
    # A hook that raises (images of another size than the means' images) leaves nothing behind either.
    larger = adapter.preprocess(images, size=40)
    with pytest.raises(ValueError, match="sees 26 tokens; the means were computed on images with 17"):
        _ablated(adapter, larger, means, [(1, "attention")])
    assert _forward_hooks(adapter.model) == before


def test_the_users_model_is_left_as_it_was(images: torch.Tensor) -> None:
    model = make_hf_clip(seed=2)
    model.train()  # dropout probabilities are 0: allowed, and the mode must survive
    model.vision_model.encoder.layers[0].requires_grad_(False)
    with pytest.warns(UserWarning, match="training mode"):
        adapter = mmelkit.load_model(model, device="cpu")
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    hooks = _forward_hooks(model)
    result = layer_ablation(adapter, images, TEXTS, [0, 1, 2], parts="both", ablate=[(0, "attention")],
                            reference_images=images[:2])
    assert result.accuracy.shape == (2, 1)
    assert modes == {name: m.training for name, m in model.named_modules()}
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(torch.equal(weights[name], p) and p.grad is None for name, p in model.named_parameters())
    assert _forward_hooks(model) == hooks


def test_the_frame_lists_every_pair_largest_drop_first() -> None:
    adapter = mmelkit.load_model(make_open_clip(seed=6), device="cpu")
    pixels = adapter.as_pixels(_images(9, 8))
    with torch.no_grad():
        labels = (adapter.encode_image(pixels) @ adapter.encode_text(TEXTS).T).argmax(dim=-1)
    result = layer_ablation(adapter, pixels, TEXTS, labels, parts=("attention", "mlp", "both"))
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "part", "accuracy", "drop"] and len(frame) == 6
    assert frame["drop"].is_monotonic_decreasing
    row = frame[(frame.layer == 1) & (frame.part == "mlp")].iloc[0]
    assert row.accuracy == pytest.approx(float(result.accuracy[1, 1]))
    assert result.set_accuracy is None and result.set_drop is None


def test_active_dropout_is_refused() -> None:
    """Dropout would give the mean pass and each ablated pass different random models."""
    model = make_hf_clip(seed=2)
    model.vision_model.encoder.layers[1].self_attn.dropout = 0.1
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        adapter = mmelkit.load_model(model, device="cpu")
    with pytest.raises(RuntimeError, match=r"dropout active \(vision_model.encoder.layers.1.self_attn.dropout=0.1\)"):
        branch_means(adapter, _images(2, 0))
    assert model.training
