"""The parts of ``scene-llava``, mmelkit's embedded generative VLM: vocabulary, tokenizer, processor,
architecture, and the conversion of ``scene-clip``'s open_clip vision tower into the Hugging Face
CLIP vision tower that LLaVA expects.

The model is a real ``transformers.LlavaForConditionalGeneration`` (CLIP vision tower -> two-layer
projector -> Llama decoder), only small, so that every tool written against it works unchanged on
real LLaVA checkpoints. Its tokenizer is word-level over the closed vocabulary of the scene world's
questions and answers (``mmelkit.datasets.vqa``), with the ``<image>`` placeholder that the
processor expands to one token per visual token.
"""

from __future__ import annotations

from typing import Any

import torch

from mmelkit.datasets.scenes import COLOURS, NUMBER_WORDS, SHAPES
from mmelkit.models.images import OPENAI_MEAN, OPENAI_STD

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)

# Plural nouns the counting questions use ("how many crosses are there ?").
PLURALS = {shape: ("crosses" if shape == "cross" else f"{shape}s") for shape in SHAPES}

_FUNCTION_WORDS = (
    "user assistant system : ? . , ! ' - is are there a an the what which where how many colour color shape "
    "size object objects of in on and or not left right above below describe image picture scene this it "
    "yes no small large big tiny"
).split()

# Every word the tokenizer knows, in a fixed order (ids are positions): the checkpoint's embedding
# rows depend on it, so new words may only ever be appended.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*SPECIAL_TOKENS, *_FUNCTION_WORDS, *COLOURS, *SHAPES, *PLURALS.values(), *NUMBER_WORDS]
    )
)

# LLaVA-1.5's conversation format, written as the Jinja chat template the processor applies:
# "USER: <image> {question} ASSISTANT:" and, for an assistant turn, " {answer}</s>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %} ASSISTANT:"
    "{% else %}{% for part in message['content'] %} {{ part['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
)
PLAIN_TEMPLATE = "USER: <image> {question} ASSISTANT:"

# scene-clip's vision tower (data/models/scene-clip.json): 64 px, patch 8, width 128, 4 blocks of
# 4 heads of 32. Keeping it lets scene-llava start from a tower that already knows colour and shape.
SCENE_VISION = {"image_size": 64, "patch_size": 8, "hidden_size": 128, "layers": 4, "heads": 4}
SCENE_TEXT = {"hidden_size": 256, "intermediate_size": 704, "layers": 4, "heads": 4, "max_positions": 256}


def build_tokenizer() -> Any:
    """The word-level tokenizer: lower-cases, splits on whitespace and punctuation, maps each word
    to its id (``<unk>`` for words outside the vocabulary); ``<image>`` is a special token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCABULARY)}, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",  # generation pads on the left, so every prompt ends at the same column
        model_max_length=SCENE_TEXT["max_positions"],
    )
    return tokenizer


def build_processor(image_size: int = SCENE_VISION["image_size"], patch_size: int = SCENE_VISION["patch_size"]) -> Any:
    """A ``LlavaProcessor``: CLIP image processing at ``image_size`` (OpenAI normalisation, as
    scene-clip) and the tokenizer, with ``<image>`` expanded to (image_size / patch_size)^2 tokens."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    text: dict[str, int] | None = None, vision: dict[str, int] | None = None, vision_feature_layer: int = -2
) -> Any:
    """The ``LlavaConfig`` of scene-llava (``text`` / ``vision`` override the sizes above)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    t = {**SCENE_TEXT, **(text or {})}
    v = {**SCENE_VISION, **(vision or {})}
    ids = {word: i for i, word in enumerate(VOCABULARY)}
    vision_config = CLIPVisionConfig(
        hidden_size=v["hidden_size"],
        intermediate_size=4 * v["hidden_size"],
        num_hidden_layers=v["layers"],
        num_attention_heads=v["heads"],
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        hidden_act="gelu",  # open_clip's nn.GELU (scene-clip is not a quick-gelu model)
        layer_norm_eps=1e-5,
        projection_dim=v["hidden_size"],
    )
    text_config = LlamaConfig(
        vocab_size=len(VOCABULARY),
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        num_key_value_heads=t["heads"],
        max_position_embeddings=t["max_positions"],
        rms_norm_eps=1e-5,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        tie_word_embeddings=False,
    )
    grid = v["image_size"] // v["patch_size"]
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=ids[IMAGE],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
        image_seq_length=grid * grid,
    )


def vision_state_from_open_clip(visual: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An open_clip ``VisionTransformer``'s weights renamed (and q/k/v split) for HF's
    ``CLIPVisionModel``, keys relative to the vision tower. open_clip's final ``ln_post`` and
    projection become HF's ``post_layernorm`` (LLaVA reads hidden states before either)."""
    state: dict[str, torch.Tensor] = {
        "vision_model.embeddings.class_embedding": visual.class_embedding.detach().clone(),
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight.detach().clone(),
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding.detach().clone(),
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight.detach().clone(),
        "vision_model.pre_layrnorm.bias": visual.ln_pre.bias.detach().clone(),
        "vision_model.post_layernorm.weight": visual.ln_post.weight.detach().clone(),
        "vision_model.post_layernorm.bias": visual.ln_post.bias.detach().clone(),
    }
    for index, block in enumerate(visual.transformer.resblocks):
        prefix = f"vision_model.encoder.layers.{index}."
        q, k, v = block.attn.in_proj_weight.detach().chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.detach().chunk(3)
        pairs = {
            "layer_norm1": block.ln_1,
            "layer_norm2": block.ln_2,
            "self_attn.out_proj": block.attn.out_proj,
            "mlp.fc1": block.mlp.c_fc,
            "mlp.fc2": block.mlp.c_proj,
        }
        for name, module in pairs.items():
            state[prefix + name + ".weight"] = module.weight.detach().clone()
            state[prefix + name + ".bias"] = module.bias.detach().clone()
        for name, weight, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            state[prefix + f"self_attn.{name}.weight"] = weight.clone()
            state[prefix + f"self_attn.{name}.bias"] = bias.clone()
    return state


def load_vision_tower(tower: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load HF CLIP vision weights into ``tower`` whichever nesting its transformers version uses
    (``vision_model.embeddings...`` in 4.x, ``embeddings...`` in 5.x): strict in every other way."""
    own = set(tower.state_dict())
    if not own & set(state):
        state = {key.removeprefix("vision_model."): value for key, value in state.items()}
    tower.load_state_dict(state)


def build_model(seed: int = 0, vision_from_scene_clip: bool = True, config: Any = None) -> Any:
    """A freshly initialised scene-llava (seeded without touching the global RNG); its vision tower
    starts from the shipped scene-clip's when ``vision_from_scene_clip``."""
    from transformers import LlavaForConditionalGeneration

    config = config or build_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    if vision_from_scene_clip:
        from mmelkit.models.loading import ZOO

        clip_model, _ = ZOO["scene-clip"].build()
        load_vision_tower(model.model.vision_tower, vision_state_from_open_clip(clip_model.visual))
    return model
