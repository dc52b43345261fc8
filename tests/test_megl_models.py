"""MEGL's networks: differentiable Grad-CAM, input gradients, highlighting, the rationale generator.

Both classifiers end in a linear head on the spatial mean of their features, so their Grad-CAM has
a closed form: for the logit of class y, dS/dF_c(i, j) = w_{y,c} / (h w), so alpha_c = w_{y,c} / (h w)
and the map is ReLU(sum_c w_{y,c} F_c / (h w)) / (max + eps); for log p_y, w_y is replaced by
w_y - sum_j p_j w_j. Gradients through the map are checked against finite differences in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmelkit.training.megl import losses
from mmelkit.training.megl.models import (
    ConvClassifier,
    ExplainableClassifier,
    MathAttention,
    RationaleGenerator,
    ViTClassifier,
    build_classifier,
    grad_cam,
    highlight,
    input_gradients,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16


def _seeded(build, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        with torch.no_grad():  # default inits leave biases/norms at 0/1, which can hide bugs
            for name, parameter in model.named_parameters():
                if "bias" in name or "norm" in name:
                    parameter.add_(0.1 * torch.randn(parameter.shape))
    return model


def cnn(seed: int = 0, classes: int = 3) -> ConvClassifier:
    return _seeded(lambda: ConvClassifier(classes, width=4), seed)


def vit(seed: int = 0, classes: int = 3, depth: int = 1) -> ViTClassifier:
    return _seeded(lambda: ViTClassifier(classes, SIZE, width=8, patch=4, depth=depth, heads=2), seed)


MODELS = {"cnn": cnn, "vit": vit}


def _images(n: int = 3, seed: int = 0, size: int = SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def _closed_form_cam(model: ExplainableClassifier, images: torch.Tensor, classes: torch.Tensor,
                     target: str, eps: float = 1e-6) -> torch.Tensor:
    with torch.no_grad():
        features = model.features(images)
        h, w = features.shape[-2:]
        weight = model.head.weight  # (K, C)
        alpha = weight[classes]
        if target == "log_prob":
            probs = torch.softmax(model.classify(features), dim=1)
            alpha = alpha - probs @ weight
        cam = F.relu(torch.einsum("nc,nchw->nhw", alpha / (h * w), features))
        return cam / (cam.flatten(1).amax(1)[:, None, None] + eps)


# -- grad_cam: values ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("target", ["logit", "log_prob"])
def test_grad_cam_equals_the_closed_form_cam(arch: str, target: str) -> None:
    model = MODELS[arch]().double()
    images = _images(4, dtype=torch.float64)
    classes = torch.tensor([0, 1, 2, 1])
    logits, maps, features = grad_cam(model, images, classes, target=target)
    assert maps.shape == (4, 4, 4) and features.shape[-2:] == (4, 4)
    torch.testing.assert_close(logits, model(images))
    expected = _closed_form_cam(model, images, classes, target)
    assert (expected.flatten(1).amax(1) > 0.5).sum() >= 3  # mostly not degenerate all-zero maps
    assert torch.isfinite(maps).all()
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)


class SpatiallyWeighted(ExplainableClassifier):
    """An oracle whose head weighs each feature position by a fixed s_ij (not a plain average), so
    the gradient differs across positions: dS/dF_c(i, j) = w_{y,c} s_ij / (h w), alpha_c =
    w_{y,c} mean(s) / (h w) with mean(s) = 1, and the map is ReLU(sum_c w_{y,c} F_c / 16) / (max + eps)
    (a per-position weighting, without the average, would give a different map)."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_dim = 4
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.head = nn.Linear(4, 3)
        self.register_buffer("s", torch.arange(1.0, 17.0).view(4, 4) / 8.5)  # mean 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(images))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head((features * self.s).mean(dim=(2, 3)))


def test_grad_cam_averages_the_gradient_over_positions() -> None:
    model = _seeded(SpatiallyWeighted).double()
    images, classes = _images(4, seed=14, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    _, maps, _ = grad_cam(model, images, classes, target="logit")
    with torch.no_grad():
        cam = F.relu(torch.einsum("nc,nchw->nhw", model.head.weight[classes], model.features(images)) / 16)
    expected = cam / (cam.flatten(1).amax(1)[:, None, None] + 1e-6)
    assert (expected.flatten(1).amax(1) > 0.5).all()
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)


def test_logit_and_log_prob_maps_differ() -> None:
    # the two targets are different explanations (else the log_prob option would be a no-op)
    model = cnn().double()
    images, classes = _images(3, dtype=torch.float64), torch.tensor([0, 1, 2])
    _, by_logit, _ = grad_cam(model, images, classes, target="logit")
    _, by_log_prob, _ = grad_cam(model, images, classes, target="log_prob")
    assert (by_logit - by_log_prob).abs().max() > 1e-3


@pytest.mark.parametrize("arch", list(MODELS))
def test_grad_cam_maps_are_normalised(arch: str) -> None:
    model = MODELS[arch]()
    images = _images(6, seed=1)
    for k in range(3):
        classes = torch.full((6,), k)
        _, maps, _ = grad_cam(model, images, classes)
        assert maps.shape == (6, 4, 4)
        assert maps.min() >= 0 and maps.max() <= 1
        top = maps.flatten(1).amax(1)
        # max / (max + 1e-6): just under 1 (a tiny model's raw CAM is ~1e-3, so about 0.998)
        assert torch.all((top == 0) | ((top > 0.99) & (top < 1)))
        assert (top > 0).any()
        # without eps (on the maps that are not all zero: 0 / 0 there) the max is exactly 1, and
        # the eps only rescales each map
        _, exact, _ = grad_cam(model, images, classes, eps=0.0)
        lit = top > 0
        assert torch.all(exact[lit].flatten(1).amax(1) == 1)
        torch.testing.assert_close(maps[lit], exact[lit] * top[lit, None, None])


@pytest.mark.parametrize("arch", list(MODELS))
def test_grad_cam_batch_equals_per_example(arch: str) -> None:
    model = MODELS[arch]().double()
    images = _images(3, seed=2, dtype=torch.float64)
    classes = torch.tensor([2, 0, 1])
    logits, maps, _ = grad_cam(model, images, classes)
    for i in range(3):
        one_logits, one_map, _ = grad_cam(model, images[i : i + 1], classes[i : i + 1])
        torch.testing.assert_close(one_map, maps[i : i + 1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(one_logits, logits[i : i + 1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("classes", [torch.tensor([0, 1]), torch.tensor([[0], [1], [2]]), torch.tensor(1)])
def test_grad_cam_needs_one_class_per_image(classes: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="one class per image"):
        grad_cam(cnn(), _images(3), classes)


def test_grad_cam_refuses_an_unknown_target() -> None:
    with pytest.raises(ValueError, match="target"):
        grad_cam(cnn(), _images(2), torch.tensor([0, 1]), target="prob")  # type: ignore[arg-type]


def test_grad_cam_works_under_no_grad_and_on_a_frozen_model() -> None:
    model = cnn()
    images, classes = _images(2), torch.tensor([0, 2])
    _, reference, _ = grad_cam(model, images, classes, create_graph=False)
    with torch.no_grad():
        _, under_no_grad, _ = grad_cam(model, images, classes, create_graph=False)
    torch.testing.assert_close(under_no_grad, reference)
    model.requires_grad_(False)
    _, frozen, _ = grad_cam(model, images, classes)
    torch.testing.assert_close(frozen, reference)


# -- grad_cam: gradients through the explanation -------------------------------------------------
def _mask(n: int) -> torch.Tensor:
    mask = torch.zeros(n, 4, 4)
    mask[:, :2, :2] = 1.0
    return mask


@pytest.mark.parametrize("target", ["logit", "log_prob"])
def test_a_loss_on_the_cnn_map_alone_trains_the_first_conv_and_the_head(target: str) -> None:
    model = cnn()
    images, classes = _images(3, seed=3), torch.tensor([0, 1, 2])
    _, maps, _ = grad_cam(model, images, classes, target=target)
    assert maps.requires_grad
    loss = losses.l1_attention(maps, _mask(3)).mean()
    first, head = model.body[0].weight, model.head.weight
    g_first, g_head = torch.autograd.grad(loss, [first, head])
    assert g_first.abs().max() > 0 and g_head.abs().max() > 0


def test_a_loss_on_the_vit_map_alone_trains_the_attention() -> None:
    model = vit(depth=2)
    images, classes = _images(3, seed=4), torch.tensor([0, 1, 2])
    _, maps, _ = grad_cam(model, images, classes)
    loss = losses.l1_attention(maps, _mask(3)).mean()
    qkv = [block.attention.qkv.weight for block in model.blocks]
    grads = torch.autograd.grad(loss, [*qkv, model.embed.weight, model.position, model.head.weight])
    assert all(g.abs().max() > 0 for g in grads)


class _CamOf(nn.Module):
    """The map as a function of the weights, so that torch.func.functional_call can swap them."""

    def __init__(self, model: ExplainableClassifier, target: str) -> None:
        super().__init__()
        self.model, self.target = model, target

    def forward(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return grad_cam(self.model, images, classes, target=self.target)[1]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arch", "names", "target"),
    [
        ("cnn", ["model.body.0.weight", "model.head.weight"], "logit"),
        ("cnn", ["model.body.3.bias", "model.head.weight"], "log_prob"),
        ("vit", ["model.blocks.0.attention.qkv.weight", "model.head.bias"], "log_prob"),
    ],
)
def test_the_gradient_through_the_map_matches_finite_differences(arch: str, names: list[str], target: str) -> None:
    # gradcheck differentiates grad_cam's output, itself a gradient: this is the double backward
    # (through MathAttention for the ViT)
    wrapper = _CamOf(MODELS[arch]().double(), target)
    images, classes = _images(2, seed=5, dtype=torch.float64), torch.tensor([1, 2])
    params = dict(wrapper.named_parameters())
    inputs = tuple(params[name].detach().clone().requires_grad_(True) for name in names)

    def cam(*tensors: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(wrapper, dict(zip(names, tensors, strict=True)), (images, classes))

    assert cam(*inputs).abs().sum() > 0
    assert torch.autograd.gradcheck(cam, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_without_create_graph_the_maps_carry_no_graph() -> None:
    for build in MODELS.values():
        model = build()
        logits, maps, _ = grad_cam(model, _images(2), torch.tensor([0, 1]), create_graph=False)
        assert not maps.requires_grad and maps.grad_fn is None
        _, with_graph, _ = grad_cam(model, _images(2), torch.tensor([0, 1]))
        torch.testing.assert_close(maps, with_graph.detach())


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("training", [True, False])
def test_grad_cam_leaves_the_model_alone(arch: str, training: bool) -> None:
    model = MODELS[arch]().train(training)
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    _, maps, _ = grad_cam(model, _images(2), torch.tensor([0, 1]))
    assert maps.requires_grad  # a graph was built (create_graph), yet nothing reached .grad
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- MathAttention and the ViT's layout ----------------------------------------------------------
def test_math_attention_equals_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    ours = MathAttention(8, heads=2).double()
    reference = nn.MultiheadAttention(8, 2, batch_first=True).double()
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.qkv.weight)
        reference.in_proj_bias.copy_(ours.qkv.bias)
        reference.out_proj.weight.copy_(ours.out.weight)
        reference.out_proj.bias.copy_(ours.out.bias)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    expected, _ = reference(x, x, x, need_weights=False)
    torch.testing.assert_close(ours(x), expected, rtol=1e-10, atol=1e-12)


def test_math_attention_refuses_a_width_not_divisible_by_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MathAttention(6, heads=4)


def test_vit_features_sit_on_their_patch_grid() -> None:
    # with no blocks each token depends on its own patch only: changing the patch at row 1,
    # column 2 must change exactly features[:, :, 1, 2]
    model = vit(depth=0)
    images = _images(1, seed=6)
    changed = images.clone()
    changed[:, :, 4:8, 8:12] = torch.rand(3, 4, 4)
    with torch.no_grad():
        moved = (model.features(changed) - model.features(images)).abs().amax(dim=(0, 1))
    assert moved[1, 2] > 0
    moved[1, 2] = 0
    assert torch.equal(moved, torch.zeros(4, 4))


def test_builders_and_their_refusals() -> None:
    assert isinstance(build_classifier("cnn", 3, SIZE, 4), ConvClassifier)
    built = build_classifier("vit", 3, SIZE, 4)
    assert isinstance(built, ViTClassifier) and built.feature_dim == 8 and built.grid == 4
    assert build_classifier("cnn", 3, SIZE, 4).feature_dim == 8
    with pytest.raises(ValueError, match="arch"):
        build_classifier("resnet", 3, SIZE, 4)
    with pytest.raises(ValueError, match="multiple of the patch"):
        ViTClassifier(3, 18, width=8, patch=4, heads=2)


# -- input gradients -----------------------------------------------------------------------------
def _finite_difference_input_gradients(model: ExplainableClassifier, image: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central differences of sum_k log p_k for one image (C, H, W), every pixel in one batch."""
    count = image.numel()
    steps = torch.eye(count, dtype=image.dtype).view(count, *image.shape) * h
    with torch.no_grad():
        plus = F.log_softmax(model(image[None] + steps), dim=1).sum(1)
        minus = F.log_softmax(model(image[None] - steps), dim=1).sum(1)
    return ((plus - minus) / (2 * h)).view_as(image)


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_input_gradients_equal_finite_differences(arch: str) -> None:
    # 8 px images: 192 pixels, all perturbed in one batch
    if arch == "cnn":
        model = cnn().double()
    else:
        model = _seeded(lambda: ViTClassifier(3, 8, width=8, patch=4, depth=1, heads=2)).double()
    images = _images(2, seed=7, size=8, dtype=torch.float64)
    grads = input_gradients(model, images)
    assert grads.shape == images.shape
    for i in range(2):
        reference = _finite_difference_input_gradients(model, images[i])
        torch.testing.assert_close(grads[i], reference, rtol=1e-5, atol=1e-7)


def test_input_gradients_carry_a_graph_to_the_weights_only_when_asked() -> None:
    model = cnn()
    images = _images(2, seed=8)
    grads = input_gradients(model, images)
    (g_head,) = torch.autograd.grad(grads.square().sum(), [model.head.weight])
    assert g_head.abs().max() > 0
    assert not input_gradients(model, images, create_graph=False).requires_grad
    assert not images.requires_grad and images.grad is None  # the caller's tensor is left alone


# -- highlight -----------------------------------------------------------------------------------
def test_highlight_closed_form() -> None:
    images = _images(1, seed=9, size=4, dtype=torch.float64)
    a, b, c, d = 0.2, 1.0, 0.0, 0.6
    maps = torch.tensor([[[a, b], [c, d]]], dtype=torch.float64)
    # bilinear 2 -> 4 without corner alignment samples the source at -0.25, 0.25, 0.75, 1.25
    # (clamped at the borders): weights [1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1] on each axis
    rows = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    up = rows @ maps[0] @ rows.T
    assert up[1, 1].item() == pytest.approx(0.75 * (0.75 * a + 0.25 * b) + 0.25 * (0.75 * c + 0.25 * d))
    torch.testing.assert_close(highlight(images, maps), (images + 1) * up - 1, rtol=1e-12, atol=1e-12)


def test_highlight_of_ones_is_the_image_and_of_zeros_is_black() -> None:
    images = _images(2, seed=10)
    torch.testing.assert_close(highlight(images, torch.ones(2, 4, 4)), images)
    assert torch.equal(highlight(images, torch.zeros(2, 4, 4)), torch.full_like(images, -1.0))


# -- the rationale generator ---------------------------------------------------------------------
V, BOS, EOS = 6, 0, 1


def generator(grounded: bool, seed: int = 0) -> RationaleGenerator:
    return _seeded(lambda: RationaleGenerator(V, feature_dim=8, grounded=grounded, hidden=8, grid=2), seed)


def _pooled(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def test_generator_forward_shape_and_grounding_requirement() -> None:
    tokens = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(0))
    assert generator(False)(_pooled(3), None, tokens).shape == (3, 5, V)
    grounded = generator(True)
    assert grounded(_pooled(3), _images(3), tokens).shape == (3, 5, V)
    with pytest.raises(ValueError, match="highlighted"):
        grounded(_pooled(3), None, tokens)
    with pytest.raises(ValueError, match="highlighted"):
        grounded.generate(_pooled(3), None, BOS, EOS, 4)


def test_the_ungrounded_generator_ignores_the_highlighted_image() -> None:
    model = generator(False)
    assert not hasattr(model, "saliency_encoder")
    tokens = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(1))
    pooled = _pooled(2)
    torch.testing.assert_close(model(pooled, _images(2, seed=1), tokens), model(pooled, None, tokens))
    assert torch.equal(model.generate(pooled, _images(2, seed=2), BOS, EOS, 5), model.generate(pooled, None, BOS, EOS, 5))


def test_the_grounded_generator_sees_where_the_saliency_is() -> None:
    model = generator(True)
    pooled = _pooled(2)
    tokens = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(2))
    # the same small highlighted blob on a black 32 px background, in opposite quadrants, moved by
    # 12 px (a multiple of the encoder's 2x2 pooling) and far enough from the borders that no
    # padding is involved: a position-blind encoder (global pooling) sees exactly the same thing in
    # both (checked: the outputs then agree to 1e-7)
    blob = _images(2, seed=11, size=2)
    top_left = torch.full((2, 3, 32, 32), -1.0)
    bottom_right = top_left.clone()
    top_left[:, :, 9:11, 9:11] = blob
    bottom_right[:, :, 21:23, 21:23] = blob
    assert (model(pooled, top_left, tokens) - model(pooled, bottom_right, tokens)).abs().max() > 1e-4


def test_generation_is_greedy_and_pads_with_eos() -> None:
    # look over a few deterministic seeds for a generator whose output stops mid-way and whose
    # teacher-forced argmax after the stop is not EOS, so that the padding is really exercised
    length, n = 6, 8
    for seed in range(20):
        model = generator(False, seed)
        pooled = _pooled(n, seed)
        out = model.generate(pooled, None, BOS, EOS, length)
        assert out.shape == (n, length) and out.dtype == torch.long
        inputs = torch.cat([torch.full((n, 1), BOS), out[:, :-1]], dim=1)
        with torch.no_grad():
            forced = model(pooled, None, inputs).argmax(dim=2)
        is_eos = out == EOS
        after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        # greedy: each token is the argmax given its own prefix (up to and including the first EOS)
        assert torch.equal(out[~after_first_eos], forced[~after_first_eos])
        # padded with EOS after the first EOS
        assert (out[after_first_eos] == EOS).all()
        if (forced[after_first_eos] != EOS).any():
            break
    else:
        pytest.fail("no seed exercised the EOS padding")
    # and the generator is not left with a graph nor in another mode
    assert not out.requires_grad and model.training


def test_generation_batch_equals_per_example() -> None:
    model = generator(True, seed=3)
    pooled, images = _pooled(3, seed=3), _images(3, seed=12)
    out = model.generate(pooled, images, BOS, EOS, 5)
    for i in range(3):
        assert torch.equal(model.generate(pooled[i : i + 1], images[i : i + 1], BOS, EOS, 5), out[i : i + 1])


def test_the_rationale_loss_reaches_the_classifier_through_the_highlighted_image() -> None:
    # SDTG: the generator reads I * up(A_hat), so L_txt trains the classifier through its map too
    classifier, model = cnn(), generator(True)
    images, classes = _images(2, seed=13), torch.tensor([0, 1])
    _, maps, features = grad_cam(classifier, images, classes)
    tokens = torch.tensor([[BOS, 2, 3, EOS], [BOS, 4, EOS, 5]])
    logits = model(features.detach().mean(dim=(2, 3)), highlight(images, maps), tokens[:, :-1])
    loss = losses.rationale_nll(logits, tokens[:, 1:], pad=5).mean()
    (g_first,) = torch.autograd.grad(loss, [classifier.body[0].weight])
    assert g_first.abs().max() > 0
