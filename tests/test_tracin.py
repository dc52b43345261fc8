"""TracIn-CP (mmelkit.methods.data.tracin) against its definition, on tiny models of both families.

The slow reference here is the definition itself: per pair, the loss on a copy of the model that
holds the checkpoint's weights, ``torch.autograd.grad`` over the chosen parameters, the gradients
flattened and dotted one pair at a time. The tool's fast paths (the projection heads' closed form
and the torch.func per-example gradients) must agree with it.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_OPEN_CLIP, make_hf_clip, make_open_clip

import mmelkit
from mmelkit.methods.data import TracIn, TrainingBank, tracin
from mmelkit.models.open_clip_backend import open_clip

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red circle", "a blue square", "a green star", "a red star", "a yellow cross", "two objects",
            "a purple diamond", "a blue circle", "a pink triangle", "three objects", "a cyan ring", "a red square"]
QUERY_TEXTS = ["a red circle", "a green cross", "a blue square"]
BLOCKS = {"open_clip": ["visual.transformer.resblocks.1.mlp.c_fc", "ln_final"],
          "hf": ["vision_model.encoder.layers.1.mlp.fc1", "text_model.final_layer_norm"]}
HEADS = {"open_clip": ["visual.proj", "text_projection"], "hf": ["visual_projection", "text_projection"],
         "open_clip-bias": ["visual.proj", "text_projection"]}


HEAD_NAMES = {"open_clip": ["visual.proj", "text_projection"], "hf": ["visual_projection.weight", "text_projection.weight"],
              "open_clip-bias": ["visual.proj", "text_projection.weight", "text_projection.bias"]}


def make(family: str, seed: int = 0) -> torch.nn.Module:
    if family == "open_clip-bias":  # an nn.Linear text projection with a bias: the closed form's bias term
        config = copy.deepcopy(TINY_OPEN_CLIP)
        config["text_cfg"].update(proj_type="linear", proj_bias=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.CLIP(**config)
            with torch.no_grad():
                model.text_projection.bias.normal_(0.0, 0.2)
        return model.eval()
    return make_open_clip(seed=seed) if family == "open_clip" else make_hf_clip(seed=seed)


def random_images(count: int, seed: int) -> list[np.ndarray]:
    """Images with a coloured block on noise (structure, not just noise)."""
    rng = np.random.default_rng(seed)
    images = (rng.random((count, 32, 32, 3)) * 255).astype(np.uint8)
    for image in images:
        y, x = rng.integers(0, 20, size=2)
        image[y : y + 12, x : x + 12] = rng.integers(0, 256, size=3)
    return list(images)


def bank_pairs(count: int = 8, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    return list(zip(random_images(count, seed), CAPTIONS[:count], strict=True))


def slow_reference(model: mmelkit.ClipAdapter, checkpoints: list[tuple[dict, float]], bank: list[tuple[Any, str]],
                   queries: list[tuple[Any, str]], names: list[str], loss: str = "contrastive",
                   gallery: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(influence (Q, N), query self-influence, bank self-influence) by the definition: a Python loop
    over pairs, ``torch.autograd.grad`` per pair, flattened gradients, explicit dot products."""
    gallery = len(bank) if gallery is None else gallery
    influence = torch.zeros(len(queries), len(bank))
    query_self, bank_self = torch.zeros(len(queries)), torch.zeros(len(bank))
    for state, lr in checkpoints:
        module = copy.deepcopy(model.model)
        module.load_state_dict(state)
        module.eval()
        copy_adapter = mmelkit.load_model(module, device="cpu")
        params = dict(module.named_parameters())
        chosen = [params[n] for n in params if any(n == p or n.startswith(p + ".") for p in names)]
        with torch.no_grad():
            gallery_images = copy_adapter.encode_image([image for image, _ in bank[:gallery]])
            gallery_texts = copy_adapter.encode_text([caption for _, caption in bank[:gallery]])
            scale = copy_adapter.logit_scale

        def flat_gradient(image: Any, caption: str) -> torch.Tensor:
            x = F.normalize(copy_adapter.encode_image([image], normalize=False)[0], dim=-1)  # noqa: B023
            t = F.normalize(copy_adapter.encode_text([caption], normalize=False)[0], dim=-1)  # noqa: B023
            positive = scale * (x @ t)  # noqa: B023
            if loss == "cosine":
                value = -positive
            else:
                keep = [j for j in range(gallery) if bank[j][1] != caption]  # noqa: B023
                to_texts = scale * gallery_texts[keep] @ x  # noqa: B023
                to_images = scale * gallery_images[keep] @ t  # noqa: B023
                value = (torch.logsumexp(torch.cat([positive[None], to_texts]), 0)
                         + torch.logsumexp(torch.cat([positive[None], to_images]), 0)) / 2 - positive
            gradients = torch.autograd.grad(value, chosen, allow_unused=True)  # noqa: B023
            return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                              for g, p in zip(gradients, chosen, strict=True)])  # noqa: B023

        query_gradients = [flat_gradient(*pair) for pair in queries]
        bank_gradients = [flat_gradient(*pair) for pair in bank]
        for i, gq in enumerate(query_gradients):
            query_self[i] += lr * torch.dot(gq, gq)
            for j, gn in enumerate(bank_gradients):
                influence[i, j] += lr * torch.dot(gq, gn)
        for j, gn in enumerate(bank_gradients):
            bank_self[j] += lr * torch.dot(gn, gn)
    return influence, query_self, bank_self


def assert_matches(result: TracIn, reference: tuple[torch.Tensor, ...]) -> None:
    influence, query_self, bank_self = reference
    scale = float(influence.abs().max())
    torch.testing.assert_close(result.influence, influence, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(result.query_self_influence, query_self, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(result.bank_self_influence, bank_self, rtol=1e-4, atol=1e-5 * scale)


def queries_of(bank: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """Three queries: a bank pair's image with its caption, with an unseen caption, and a new image."""
    return [(bank[0][0], QUERY_TEXTS[0]), (bank[1][0], QUERY_TEXTS[1]), (random_images(1, 99)[0], QUERY_TEXTS[2])]


def run(model: mmelkit.ClipAdapter, bank: Any, queries: list[tuple[Any, str]], **kwargs: Any) -> TracIn:
    return tracin(model, bank, [image for image, _ in queries], [text for _, text in queries], **kwargs)


# -- the fast paths against the definition ---------------------------------------------------------------
@pytest.mark.parametrize(("family", "loss"), [("open_clip", "contrastive"), ("open_clip", "cosine"), ("hf", "contrastive"),
                                            ("open_clip-bias", "contrastive")])
def test_the_heads_closed_form_matches_the_slow_reference(family: str, loss: str) -> None:
    model = mmelkit.load_model(make(family), device="cpu")
    other = make(family, seed=7).state_dict()
    bank = bank_pairs()
    queries = queries_of(bank)
    checkpoints = [(model, 1.0), (other, 0.3)]
    result = run(model, bank, queries, checkpoints=checkpoints, loss=loss, gallery=6, k=3)
    assert result.parameters == HEAD_NAMES[family]
    reference = slow_reference(model, [(model.model.state_dict(), 1.0), (other, 0.3)], bank, queries, HEADS[family],
                               loss, gallery=6)
    assert_matches(result, reference)


@pytest.mark.parametrize("family", ["open_clip", "hf"])
def test_per_example_gradients_of_chosen_blocks_match_the_slow_reference(family: str) -> None:
    model = mmelkit.load_model(make(family), device="cpu")
    other = make(family, seed=7).state_dict()
    bank = bank_pairs(6)
    queries = queries_of(bank)
    result = run(model, bank, queries, checkpoints=[(model, 0.5), (other, 2.0)], parameters=BLOCKS[family],
                 k=2, batch_size=4)
    assert all(any(n.startswith(p) for p in BLOCKS[family]) for n in result.parameters)
    reference = slow_reference(model, [(model.model.state_dict(), 0.5), (other, 2.0)], bank, queries,
                               BLOCKS[family])
    assert_matches(result, reference)


@pytest.mark.parametrize("family", ["open_clip", "hf"])
def test_the_general_path_over_the_heads_equals_their_closed_form(family: str) -> None:
    model = mmelkit.load_model(make(family), device="cpu")
    bank = bank_pairs(6)
    queries = queries_of(bank)
    closed = run(model, bank, queries, k=2)
    general = run(model, bank, queries, k=2, parameters=HEADS[family])
    torch.testing.assert_close(general.influence, closed.influence, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(general.bank_self_influence, closed.bank_self_influence, rtol=1e-4, atol=1e-4)


# -- closed forms: self-influence, linearity in the checkpoints ------------------------------------------
def test_self_influence_is_lr_times_the_squared_gradient_norm() -> None:
    model = mmelkit.load_model(make_open_clip(seed=4), device="cpu")
    bank = bank_pairs(6)
    query = [bank[2]]  # the bank holds the query pair itself
    one = run(model, bank, query, k=1)
    scaled = run(model, bank, query, checkpoints=[(model, 2.5)], k=1)
    _, squared_norm, _ = slow_reference(model, [(model.model.state_dict(), 1.0)], bank, query, HEADS["open_clip"])
    torch.testing.assert_close(one.influence[0, 2], squared_norm[0], rtol=1e-5, atol=0.0)
    torch.testing.assert_close(one.query_self_influence, squared_norm, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(scaled.influence[0, 2], 2.5 * squared_norm[0], rtol=1e-5, atol=0.0)
    torch.testing.assert_close(scaled.influence, 2.5 * one.influence, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("parameters", ["projections", "blocks"])
def test_influence_is_linear_in_the_checkpoints(parameters: str) -> None:
    model = mmelkit.load_model(make_open_clip(), device="cpu")
    second = make_open_clip(seed=5)
    chosen: Any = BLOCKS["open_clip"] if parameters == "blocks" else "projections"
    bank = bank_pairs(6)
    queries = queries_of(bank)
    first_only = run(model, bank, queries, checkpoints=[(model.model.state_dict(), 1.0)], parameters=chosen, k=2)
    second_only = run(model, bank, queries, checkpoints=[(second, 0.4)], parameters=chosen, k=2)
    both = run(model, bank, queries, checkpoints=[(model, 1.0), (mmelkit.load_model(second, device="cpu"), 0.4)],
               parameters=chosen, k=2)
    torch.testing.assert_close(both.influence, first_only.influence + second_only.influence, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(both.bank_self_influence,
                               first_only.bank_self_influence + second_only.bank_self_influence, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(first_only.influence, second_only.influence), "the checkpoints must differ"


# -- the oracle: an exact duplicate ------------------------------------------------------------------------
@pytest.mark.parametrize("parameters", ["projections", "blocks"])
def test_an_exact_duplicate_ranks_first(parameters: str) -> None:
    """Influence is an inner product of gradients, so by Cauchy-Schwarz g(q).g(z) <= |g(q)| |g(z)|.
    Take as query the pair with the largest gradient norm among 12 random pairs with distinct
    captions: every other pair then scores below |g(q)|^2, which is exactly the duplicate's score
    (it has the same loss function: same caption, same gallery exclusions), so the duplicate ranks
    first. Checked with two checkpoints (a positive-weighted sum of inner products is one too)."""
    model = mmelkit.load_model(make_open_clip(seed=2), device="cpu")
    chosen: Any = BLOCKS["open_clip"] if parameters == "blocks" else "projections"
    checkpoints = [(model, 1.0), (make_open_clip(seed=6), 0.5)]
    bank = bank_pairs(12, seed=3)
    everything = run(model, bank, bank, checkpoints=checkpoints, parameters=chosen, k=12)
    diagonal = everything.influence.diagonal()
    torch.testing.assert_close(diagonal, everything.bank_self_influence, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diagonal, everything.query_self_influence, rtol=1e-5, atol=1e-5)
    bound = (diagonal[:, None] * diagonal[None, :]).sqrt()
    assert (everything.influence.abs() <= bound * (1 + 1e-5)).all(), "Cauchy-Schwarz: influence is a Gram matrix"

    strongest = int(everything.bank_self_influence.argmax())
    result = run(model, bank, [bank[strongest]], checkpoints=checkpoints, parameters=chosen, k=3)
    assert int(result.proponents[0, 0]) == strongest
    assert result.proponent_captions[0][0] == bank[strongest][1]
    torch.testing.assert_close(result.proponent_scores[0, 0], result.query_self_influence[0], rtol=1e-5, atol=0.0)
    others = torch.cat([result.influence[0, :strongest], result.influence[0, strongest + 1 :]])
    assert (others < result.query_self_influence[0]).all()

    # The cosine needs no such choice: every query's duplicate scores 1, the bound, and ranks first.
    cosine = everything.cosine
    torch.testing.assert_close(cosine.diagonal(), torch.ones(12), rtol=0, atol=1e-5)
    assert (cosine.abs() <= 1).all() and torch.equal(cosine.argmax(dim=1), torch.arange(12))
    torch.testing.assert_close(cosine, everything.influence / bound, rtol=1e-5, atol=1e-6)


# -- invariances and the user's model ----------------------------------------------------------------------
@pytest.mark.parametrize("parameters", ["projections", "blocks"])
def test_bank_batch_size_does_not_change_the_scores(parameters: str) -> None:
    model = mmelkit.load_model(make_hf_clip(), device="cpu")
    chosen: Any = BLOCKS["hf"] if parameters == "blocks" else "projections"
    bank = bank_pairs(7)
    queries = queries_of(bank)
    results = [run(model, bank, queries, parameters=chosen, k=2, batch_size=size) for size in (1, 3, 64)]
    for other in results[1:]:
        torch.testing.assert_close(other.influence, results[0].influence, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other.bank_self_influence, results[0].bank_self_influence, rtol=1e-5, atol=1e-5)
        assert torch.equal(other.proponents, results[0].proponents)


def test_the_users_model_is_unchanged_even_after_an_error() -> None:
    module = make_open_clip()
    module.train()  # no dropout in the tiny model: training mode is allowed, and must stay
    module.visual.transformer.eval()  # mixed modes: each module's own flag must stay
    module.ln_final.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="training mode"):
        model = mmelkit.load_model(module, device="cpu")
    modes = {name: m.training for name, m in module.named_modules()}
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    weights = {name: t.clone() for name, t in module.state_dict().items()}
    bank = bank_pairs(5)
    queries = queries_of(bank)
    results = [run(model, bank, queries, parameters=chosen, k=2) for chosen in ("projections", BLOCKS["open_clip"])]
    with pytest.raises((TypeError, ValueError)):  # fails inside, at the second chunk of the bank
        run(model, [*bank[:2], ("not an image", "a red circle")], queries, k=1, batch_size=2)
    assert {name: m.training for name, m in module.named_modules()} == modes
    assert {name: p.requires_grad for name, p in module.named_parameters()} == flags
    assert all(torch.equal(t, weights[name]) for name, t in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())
    assert torch.backends.mha.get_fastpath_enabled(), "the fused-attention switch is restored"
    evaluated = mmelkit.load_model(make_open_clip(), device="cpu")  # eval mode throughout
    torch.testing.assert_close(results[0].influence, run(evaluated, bank, queries, k=2).influence)

    module.transformer.resblocks[0].attn.dropout = 0.1  # now dropout is active: random gradients
    with pytest.raises(RuntimeError, match=r"dropout active \(transformer.resblocks.0.attn.dropout=0.1\)"):
        run(model, bank, queries, k=2)


# -- the result ------------------------------------------------------------------------------------------------
def test_proponents_opponents_and_the_frame() -> None:
    model = mmelkit.load_model(make_open_clip(seed=1), device="cpu")
    pairs = bank_pairs(8)
    queries = queries_of(pairs)
    bank = TrainingBank(model, lambda i: pairs[i], len(pairs), batch=3)
    result = run(model, bank, queries, k=3)
    torch.testing.assert_close(result.influence, run(model, pairs, queries, k=3).influence)
    assert len(result) == 3 and result.influence.shape == (3, 8)
    ordered = result.influence.sort(dim=1, descending=True)
    torch.testing.assert_close(result.proponent_scores, ordered.values[:, :3])
    torch.testing.assert_close(result.opponent_scores, ordered.values[:, -3:].flip(1))
    assert torch.equal(result.influence.gather(1, result.proponents), result.proponent_scores)
    assert torch.equal(result.influence.gather(1, result.opponents), result.opponent_scores)
    assert result.proponent_captions == [[CAPTIONS[j] for j in row] for row in result.proponents.tolist()]
    assert result.opponent_captions == [[CAPTIONS[j] for j in row] for row in result.opponents.tolist()]
    frame = result.to_frame()
    assert len(frame) == 2 * 3 * 3
    first = frame[(frame["query"] == 1) & (frame["role"] == "proponent") & (frame["rank"] == 1)].iloc[0]
    assert first["index"] == int(result.proponents[1, 0]) and first["query_text"] == QUERY_TEXTS[1]
    assert first["caption"] == CAPTIONS[first["index"]]
    assert first["influence"] == pytest.approx(float(result.proponent_scores[1, 0]))


def test_checkpoints_that_do_not_fit_the_model_are_refused() -> None:
    model = mmelkit.load_model(make_open_clip(), device="cpu")
    bank = bank_pairs(5)
    queries = queries_of(bank)[:1]
    state = model.model.state_dict()
    with pytest.raises(ValueError, match=r"checkpoints\[0\] has weights the model does not: \['visual.prj'\]"):
        run(model, bank, queries, checkpoints=[({**state, "visual.prj": state["visual.proj"]}, 1.0)])
    with pytest.raises(ValueError, match=r"checkpoints\[0\] lacks 1 of the model's weights"):
        run(model, bank, queries, checkpoints=[({n: t for n, t in state.items() if n != "logit_scale"}, 1.0)])
    with pytest.raises(ValueError, match=r"weight 'visual.proj' has shape \(2, 2\)"):
        run(model, bank, queries, checkpoints=[({**state, "visual.proj": torch.zeros(2, 2)}, 1.0)])
    with pytest.raises(ValueError, match=r"checkpoints\[1\] learning rate must be a positive finite number"):
        run(model, bank, queries, checkpoints=[(model, 1.0), (model, float("nan"))])
    with pytest.raises(TypeError, match=r"got one pair: wrap it in a list"):
        run(model, bank, queries, checkpoints=(model, 1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown loss 'contrastiv'; did you mean 'contrastive'"):
        run(model, bank, queries, loss="contrastiv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"gallery must lie in 1..5"):
        run(model, bank, queries, gallery=6)
