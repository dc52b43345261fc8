"""An oracle VLM whose answer reads exactly one visual token, built by hand, and what every
answer-map method, the knockout and the logit lens must say about it.

The decoder is a real one-layer Llama in a real ``LlavaForConditionalGeneration`` with weights set
so that the computation is known in closed form:

* every text token embeds as ``u_text``; visual token i is ``u_vis + s_i u_sig`` where s_i = 1 on
  the image's one bright patch (a hand-made patch detector stands in for the vision tower);
* the single attention head's query reads ``u_text`` and its key reads ``u_sig`` on a head
  dimension whose RoPE frequency is ~0, with scores of ~70: every text column attends to the
  signal token alone;
* the value carries ``u_sig`` to ``u_ans`` through o_proj; the MLP is zero; the LM head scores
  "yes" from ``u_ans``.

So the answer "yes" at the last prompt column depends on the image only through visual token k.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import mmelkit
from mmelkit.methods.answers import answer_target, target_score
from mmelkit.methods.layer import attention_knockout
from mmelkit.models.vlm import VlmAdapter, load_vlm, scene_llava

pytestmark = pytest.mark.usefixtures("one_thread")

D, U_VIS, U_SIG, U_TEXT, U_ANS = 16, 1, 2, 3, 4
QK_DIM, V_DIM = 7, 6  # head dimensions; 7 pairs with 15, the slowest RoPE frequency
GRID, PATCH = 4, 8
METHODS = ["answer_attention", "answer_relevancy", "answer_integrated_gradients", "answer_occlusion"]
PARAMS = {"answer_occlusion": {"window": 1}}  # windows of 2 x 2 tokens would share the signal token's drop


class OracleAdapter(VlmAdapter):
    """The hand-made "vision tower": visual token i is u_vis, plus u_sig where patch i is bright."""

    def visual_features(self, images: Any) -> torch.Tensor:
        pixels = self.as_pixels(images)
        patches = torch.nn.functional.avg_pool2d(pixels.mean(1, keepdim=True), PATCH).flatten(1)  # (N, V)
        tokens = torch.zeros(len(pixels), GRID * GRID, D, device=pixels.device, dtype=pixels.dtype)
        tokens[..., U_VIS] = 1.0
        tokens[..., U_SIG] = (patches > 0).to(pixels.dtype)
        return tokens


def oracle_model() -> torch.nn.Module:
    config = scene_llava.build_config(
        text={"hidden_size": D, "intermediate_size": 8, "layers": 1, "heads": 1},
        vision={"image_size": GRID * PATCH, "patch_size": PATCH, "hidden_size": 16, "layers": 1, "heads": 1},
    )
    config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e12}
    model = scene_llava.build_model(0, vision_from_scene_clip=False, config=config).eval()
    lm = model.model.language_model
    layer = lm.layers[0]
    yes = scene_llava.VOCABULARY.index("yes")
    with torch.no_grad():
        for parameter in lm.parameters():
            parameter.zero_()
        model.lm_head.weight.zero_()
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, lm.norm):
            norm.weight.fill_(1.0)
        lm.embed_tokens.weight[:, U_TEXT] = 1.0
        attention = layer.self_attn
        attention.q_proj.weight[QK_DIM, U_TEXT] = 5.0
        attention.k_proj.weight[QK_DIM, U_SIG] = 5.0
        attention.v_proj.weight[V_DIM, U_SIG] = 1.0
        attention.o_proj.weight[U_ANS, V_DIM] = 3.0
        model.lm_head.weight[yes, U_ANS] = 2.0
    return model


@pytest.fixture(scope="module")
def oracle() -> VlmAdapter:
    plain = load_vlm(oracle_model(), device="cpu")
    return OracleAdapter(plain.model, plain.processor, name="oracle", device=plain.device, dtype=plain.dtype)


def bright_patch_images(positions: list[int]) -> list[np.ndarray]:
    images = []
    for k in positions:
        image = np.full((GRID * PATCH, GRID * PATCH, 3), 10, np.uint8)
        row, col = divmod(k, GRID)
        image[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = 250
        images.append(image)
    return images


POSITIONS = [0, 5, 10, 15, 3, 12]
QUESTIONS = ["is there a red circle ?", "is there a blue star in the image ?", "is there a red circle ?",
             "is there a cross ?", "is it big ?", "is there a green square ?"]


def test_the_oracle_reads_only_its_signal_token(oracle: VlmAdapter) -> None:
    images = bright_patch_images(POSITIONS)
    visual = oracle.visual_features(images)
    assert [int(v[:, U_SIG].argmax()) for v in visual] == POSITIONS and visual[:, :, U_SIG].sum() == len(POSITIONS)
    with oracle.trace(decoder_hidden=False, vision=False) as trace, torch.no_grad():
        oracle.forward(oracle.encode(images, QUESTIONS))
    attention = trace.decoder[0].attn[:, 0, -1]  # the last prompt column
    batch = oracle.encode(images, QUESTIONS)
    picked = attention[torch.arange(6), batch.visual_positions[torch.arange(6), POSITIONS]]
    assert (picked > 0.999).all()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_puts_its_mass_on_the_signal_token(oracle: VlmAdapter, method: str) -> None:
    images = bright_patch_images(POSITIONS)
    maps = mmelkit.explain(oracle, images, QUESTIONS, method=method, answer="yes", **PARAMS.get(method, {})).maps.flatten(1)
    assert maps.argmax(1).tolist() == POSITIONS
    share = maps[torch.arange(6), POSITIONS] / maps.sum(1)
    assert (share > 0.9).all(), (method, share)


def test_gradient_x_input_is_exactly_zero_on_a_one_layer_pre_norm_decoder(oracle: VlmAdapter) -> None:
    # the target depends on each visual token only through RMSNorm(e_i), which is scale invariant,
    # so sum_c e_ic dT/de_ic = 0 (Euler): gradient x input cannot see the signal token here
    from mmelkit.methods.token.answer_gradient_x_input import visual_gradient

    images = bright_patch_images(POSITIONS)
    target = answer_target(oracle, images, QUESTIONS, "yes")
    visual = oracle.visual_features(images)
    grad = visual_gradient(oracle, target, visual)
    assert grad.abs().max() > 1e-3  # the gradient itself is not zero
    assert (grad * visual).sum(-1).abs().max() < 1e-5


def test_knocking_out_the_edge_gives_the_no_image_value(oracle: VlmAdapter) -> None:
    images = bright_patch_images(POSITIONS)
    target = answer_target(oracle, images, QUESTIONS, "yes")
    keys = torch.zeros(6, GRID * GRID, dtype=torch.bool)
    keys[torch.arange(6), POSITIONS] = True
    result = attention_knockout(oracle, target, window=1, keys=keys)
    blank = answer_target(oracle, [np.full_like(images[0], 10)] * 6, QUESTIONS, "yes")  # no signal token
    with torch.no_grad():
        no_image = target_score(oracle, blank).exp()
    knocked = result.clean * (1 - result.drops[:, 0])
    torch.testing.assert_close(knocked, no_image, atol=1e-6, rtol=1e-5)
    assert (result.drops[:, 0] > 0.5).all()
    # knocking out every other visual token changes nothing
    others = attention_knockout(oracle, target, window=1, keys=~keys)
    assert others.drops.abs().max() < 1e-4
