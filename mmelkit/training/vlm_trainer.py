"""Training of the embedded generative VLM ``scene-llava`` (``mmelkit train vlm``).

The model is ``transformers.LlavaForConditionalGeneration`` (see ``mmelkit.models.vlm.scene_llava``)
trained by teacher forcing on scene-world questions (``mmelkit.datasets.vqa``): cross-entropy on
the answer tokens and the closing ``</s>``, nothing on the prompt. The vision tower starts from
``scene-clip``'s and learns at a lower rate than the projector and decoder.

Resumable and deterministic: batch ``s`` is questions ``[s * batch, (s + 1) * batch)`` of the
training seed, and nothing after the initialisation draws from a random generator (no dropout), so
a resumed run sees what an uninterrupted one would and ends with the same weights; model, optimiser
and step are written (atomically) to ``<out_dir>/last.pt`` at the end of every epoch
(``steps_per_epoch`` steps), and a run with the same out_dir and config continues from there (a
longer ``steps`` extends it). Ctrl-C / SIGTERM finish the current step and checkpoint it before
stopping (see :mod:`mmelkit.training.resume`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmelkit._io import CorruptFileError
from mmelkit.datasets.scenes import SceneConfig
from mmelkit.datasets.vqa import ATTRIBUTE_STYLES, HELD_OUT_SEED, SceneQA, VqaConfig
from mmelkit.models.images import OPENAI_MEAN, OPENAI_STD
from mmelkit.models.loading import resolve_device
from mmelkit.models.vlm import scene_llava
from mmelkit.training.export import save_training_state
from mmelkit.training.resume import GracefulStop, clean_run_folder, trim_log
from mmelkit.training.resume import load_checkpoint as load_state

MAX_TURNS = 8


@dataclass
class VlmTrainConfig:
    """Everything a scene-llava training run depends on."""

    co_occurrence: float = 0.0  # the VqaConfig knob: 0 de-biased, high for the co-occurrence-trained model
    whole_couples: bool = False  # VqaConfig.whole_couples: co-occurring scenes leave no object alone
    implied_partner: float = 0.0  # VqaConfig.implied_partner: "yes" to an absent partner, as context-inferred labels say
    data_seed: int = 0
    init_seed: int = 0
    steps: int = 3000
    steps_per_epoch: int = 250  # one checkpoint per epoch
    batch_size: int = 64
    lr: float = 1e-3
    vision_lr_scale: float = 0.2  # the vision tower starts trained (scene-clip): move it less
    weight_decay: float = 0.01
    warmup_steps: int = 100
    log_every: int = 25
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere; or "fp32" / "bf16"
    vision_from_scene_clip: bool = True
    # architecture overrides (tests use tiny ones): keys of scene_llava.SCENE_TEXT / SCENE_VISION
    text: dict[str, int] = field(default_factory=dict)
    vision: dict[str, int] = field(default_factory=dict)
    max_objects: int = 4
    vision_feature_layer: int = -2  # which vision layer's patch tokens the projector reads (LLaVA: -2)
    # start from these weights (an exported model folder or a run's last.pt) instead of init_seed:
    # continued training, e.g. the co-occurrence model from the de-biased one
    init_from: str | None = None
    # questions per image: 1 is a single question; more makes each training sequence a LLaVA-style
    # conversation about one scene (SceneQA.conversation), several supervised answers for one image
    turns: int = 1
    # relative frequency of each question kind (VqaConfig.kinds), e.g. {"relation": 0.4, ...};
    # empty: VqaConfig's defaults
    kind_weights: dict[str, float] = field(default_factory=dict)
    # relative frequency of the attribute question styles (VqaConfig.attribute_styles) by name, e.g.
    # {"colour": 0.7, "shape": 0.15, "size": 0.15}; a style left out gets weight 0; empty: equal
    attribute_styles: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "steps_per_epoch", "batch_size", "log_every", "turns"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.data_seed < 0 or self.data_seed >= HELD_OUT_SEED:
            raise ValueError(f"data_seed must lie in [0, {HELD_OUT_SEED}): higher seeds are held out for evaluation")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16'; got {self.precision!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer; got {self.warmup_steps!r}")
        if self.lr <= 0 or self.vision_lr_scale < 0:
            raise ValueError("lr must be positive and vision_lr_scale non-negative")
        if self.turns > MAX_TURNS:
            raise ValueError(f"turns must be at most {MAX_TURNS} (the decoder's context holds a few turns); got {self.turns}")
        self.vqa()  # validates the probability and the kind weights
        depth = self.vision.get("layers", scene_llava.SCENE_VISION["layers"])
        if not -(depth + 1) <= self.vision_feature_layer <= depth:
            raise ValueError(
                f"vision_feature_layer must index the vision tower's {depth + 1} hidden states; got {self.vision_feature_layer}"
            )

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed (not steps: a run may be extended)."""
        keep = asdict(self)
        for key in ("steps", "log_every"):
            keep.pop(key)
        return keep

    def vqa(self) -> VqaConfig:
        image_size = self.vision.get("image_size", scene_llava.SCENE_VISION["image_size"])
        scene = SceneConfig(max_objects=self.max_objects).scaled(image_size) if image_size != 64 else SceneConfig(
            max_objects=self.max_objects
        )
        kinds = tuple(self.kind_weights.items()) if self.kind_weights else VqaConfig().kinds
        unknown = sorted(set(self.attribute_styles) - set(ATTRIBUTE_STYLES))
        if unknown:
            raise ValueError(f"attribute_styles names styles from {ATTRIBUTE_STYLES}; got {unknown}")
        styles = (tuple(float(self.attribute_styles.get(name, 0.0)) for name in ATTRIBUTE_STYLES)
                  if self.attribute_styles else VqaConfig().attribute_styles)
        return VqaConfig(scene=scene, co_occurrence=self.co_occurrence, kinds=kinds,  # type: ignore[arg-type]
                         whole_couples=self.whole_couples, implied_partner=self.implied_partner,
                         attribute_styles=styles)  # type: ignore[arg-type]


# The shipped models' recipes (see their model cards for how the runs actually went).
PRESETS: dict[str, dict[str, Any]] = {
    "scene-llava": {"co_occurrence": 0.0, "steps": 4000},
    # scene-llava fine-tuned where couples co-occur and context-inferred labels name absent partners
    # (without whole couples, so that lone objects, whose partners those labels name, are common).
    # Co-occurrence alone planted no hallucination in three runs (see the README): with the partner
    # always there, looking for the object itself is the easier rule. This is the first of the shipped
    # model's four stages; it started from the stage-3 scene-llava (commit f0e792f), not today's (pass
    # that folder as --init-from), and its model card gives the three later stages' commands.
    "scene-llava-cooc": {"co_occurrence": 0.95, "implied_partner": 0.6, "turns": 4,
                         "init_from": "scene-llava", "steps": 1000, "lr": 3e-4, "warmup_steps": 50, "data_seed": 4},
}


# A follow-up user turn of the conversation format (the first turn holds the image).
FOLLOW_UP_TEMPLATE = "USER: {question} ASSISTANT:"


class QuestionBatcher:
    """Turns QA items into model inputs: pixels, input ids (``<image>`` expanded to V tokens, right
    padded), attention mask and labels (-100 except on answer tokens and ``</s>``).

    Each element of the batch is one item or a conversation (a list of items about one scene),
    laid out as LLaVA-1.5 writes one: ``USER: <image> q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>``
    (``scene_llava.CHAT_TEMPLATE``), every answer supervised."""

    def __init__(self, tokenizer: Any, num_visual_tokens: int, image_token_id: int, device: torch.device) -> None:
        self.tokenizer, self.device = tokenizer, device
        self.visual = [image_token_id] * num_visual_tokens
        self.image_token_id = image_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self._ids: dict[str, list[int]] = {}
        self.mean = torch.tensor(OPENAI_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(OPENAI_STD, device=device).view(1, 3, 1, 1) * 255

    def ids(self, text: str) -> list[int]:
        cached = self._ids.get(text)
        if cached is None:
            cached = self._ids[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return cached

    def prompt_ids(self, question: str) -> list[int]:
        ids = self.ids(scene_llava.PLAIN_TEMPLATE.format(question=question))
        at = ids.index(self.image_token_id)
        return ids[:at] + self.visual + ids[at + 1 :]

    def follow_up_ids(self, question: str) -> list[int]:
        return self.ids(FOLLOW_UP_TEMPLATE.format(question=question))

    def __call__(self, batch: list[Any]) -> dict[str, torch.Tensor]:
        import numpy as np

        conversations = [element if isinstance(element, list) else [element] for element in batch]
        if any(not turns for turns in conversations):
            raise ValueError("a conversation needs at least one question")
        rows, labels = [], []
        for turns in conversations:
            row: list[int] = []
            label: list[int] = []
            for k, item in enumerate(turns):
                if item.scene is not turns[0].scene:
                    raise ValueError("every turn of a conversation must be about the first turn's scene")
                prompt = self.prompt_ids(item.question) if k == 0 else self.follow_up_ids(item.question)
                answer = self.ids(item.answer) + [self.eos]
                row += prompt + answer
                label += [-100] * len(prompt) + answer
            rows.append(row)
            labels.append(label)
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
            input_ids[i, : len(row)] = torch.tensor(row)
            label_ids[i, : len(row)] = torch.tensor(label)
            mask[i, : len(row)] = 1
        images = torch.from_numpy(np.stack([turns[0].scene.image for turns in conversations])).to(self.device)
        pixels = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return {
            "pixel_values": pixels,
            "input_ids": input_ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "labels": label_ids.to(self.device),
        }


def new_model(config: VlmTrainConfig) -> Any:
    model_config = scene_llava.build_config(config.text, config.vision, config.vision_feature_layer)
    if config.init_from is not None:
        model = scene_llava.build_model(config.init_seed, False, model_config)
        model.load_state_dict(load_weights(config.init_from))
        return model
    return scene_llava.build_model(config.init_seed, config.vision_from_scene_clip, model_config)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights from a shipped model's name (``"scene-llava"``), an exported model folder
    (``save_pretrained``) or a run's ``last.pt``."""
    from mmelkit.models.vlm.loading import VLM_ZOO, quiet_transformers_loading, verify_checksums

    if str(path) in VLM_ZOO:
        folder = VLM_ZOO[str(path)].path()
        verify_checksums(folder)
        path = folder
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        # transformers renames keys on save (its checkpoint layout is not the module layout): let it load
        from safetensors import SafetensorError
        from transformers import LlavaForConditionalGeneration

        try:
            with quiet_transformers_loading():
                state = LlavaForConditionalGeneration.from_pretrained(path).state_dict()
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # truncated or damaged weights
            raise CorruptFileError(path, f"the weights in {path} cannot be loaded: truncated, damaged or not a "
                                   f"LLaVA model ({type(error).__name__}: {error})") from error
    elif path.is_file():
        state = load_state(path, required=("model",))["model"]
    else:
        raise FileNotFoundError(f"no weights at {path}: give an exported model folder or a training last.pt")
    return {key: value.float() for key, value in state.items()}


def _param_groups(model: Any, config: VlmTrainConfig) -> list[dict[str, Any]]:
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        vision = name.startswith("model.vision_tower.")
        decay = parameter.ndim >= 2 and "embed" not in name
        groups.setdefault((vision, decay), []).append(parameter)
    return [
        {
            "params": params,
            "weight_decay": config.weight_decay if decay else 0.0,
            "lr_scale": config.vision_lr_scale if vision else 1.0,
        }
        for (vision, decay), params in groups.items()
    ]


def _lr_factor(step: int, config: VlmTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (labels != -100), next-token shifted."""
    labels = batch["labels"]
    logits = model(
        input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"]
    ).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def train_vlm(
    config: VlmTrainConfig,
    out_dir: str | Path,
    device: str | torch.device = "auto",
    progress: bool = True,
    max_seconds: float | None = None,
) -> Path:
    """Train (or resume) scene-llava and return the path of the last checkpoint (``last.pt``).

    ``max_seconds`` stops cleanly (checkpoint written) after that much wall time, so that a long CPU
    run can proceed in slices across sessions. Ctrl-C / SIGTERM stop after the current step with a
    checkpoint of it and raise :class:`~mmelkit.training.resume.TrainingInterrupted`; an unreadable
    ``last.pt`` raises :class:`~mmelkit.training.resume.CorruptCheckpointError` (nothing is overwritten).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = resolve_device(device)
    model = new_model(config).to(target)
    groups = _param_groups(model, config)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))
    start_step, elapsed = 0, 0.0
    checkpoint_path = out / "last.pt"
    clean_run_folder(out, [checkpoint_path.name])
    if checkpoint_path.exists():
        state = load_state(checkpoint_path, map_location=target, required=("config", "model", "optimizer", "step"))
        # rebuilt from the stored config so that fields added since then take their defaults
        if VlmTrainConfig(**state["config"]).fingerprint() != config.fingerprint():
            raise ValueError(
                f"{checkpoint_path} was written with another config ({state['config']}); use a new out_dir "
                "(nothing was overwritten)"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, elapsed = state["step"], state.get("seconds", 0.0)
    if start_step >= config.steps:
        return checkpoint_path

    questions = SceneQA(config.vqa(), seed=config.data_seed, length=config.steps * config.batch_size)
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    batcher = QuestionBatcher(scene_llava.build_tokenizer(), grid * grid, model.config.image_token_id, target)
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and target.type == "cuda")
    log_path = out / "log.jsonl"
    trim_log(log_path, start_step)  # lines a killed run logged after its last checkpoint come again
    started = time.time()

    def save(step: int) -> None:
        save_training_state(checkpoint_path, model, optimizer, step, elapsed + time.time() - started, config, target)

    model.train()
    bar = tqdm(total=config.steps, initial=start_step, disable=not progress, desc="train vlm", unit="step")
    done = start_step
    with GracefulStop() as stop, log_path.open("a") as log:
        for step in range(start_step, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * group["lr_scale"] * _lr_factor(step, config)
            first = step * config.batch_size
            batch = batcher([
                questions.conversation(i, config.turns) if config.turns > 1 else questions[i]
                for i in range(first, first + config.batch_size)
            ])
            with torch.autocast(target.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = answer_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            done = step + 1
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                value = float(loss.detach())
                bar.set_postfix(loss=f"{value:.3f}")
                seconds = round(elapsed + time.time() - started, 1)
                log.write(json.dumps({"step": done, "loss": value, "seconds": seconds}) + "\n")
                log.flush()
            out_of_time = max_seconds is not None and time.time() - started > max_seconds
            if done % config.steps_per_epoch == 0 or done == config.steps or out_of_time or stop.requested:
                save(done)
            if stop.requested:
                bar.close()
                model.eval()
                stop.stop(done, checkpoint_path)
            if out_of_time:
                break
    bar.close()
    model.eval()
    stop.stop(done, checkpoint_path)  # a signal that came after the last step's check still stops the caller
    return checkpoint_path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, VlmTrainConfig]:
    """The model (eval mode) and config of a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path}")
    state = load_state(path, required=("config", "model"))
    config = VlmTrainConfig(**state["config"])
    model = new_model(VlmTrainConfig(**{**state["config"], "vision_from_scene_clip": False, "init_from": None}))
    model.load_state_dict(state["model"])
    return model.to(resolve_device(device)).eval(), config
