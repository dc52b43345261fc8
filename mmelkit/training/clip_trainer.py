"""Contrastive training of the embedded scene-world CLIP (``mmelkit train clip``).

Resumable: every ``checkpoint_every`` steps the model, optimiser, schedule and step are written to
``<out_dir>/last.pt`` (atomically); a new run with the same ``out_dir`` and config continues from
there. The data stream is a pure function of the step (scene ``step * batch + i``) and nothing after
the initialisation draws from a random generator (no dropout), so a resumed run sees exactly the
scenes, and ends with exactly the weights, of an uninterrupted one. Ctrl-C / SIGTERM finish the
current step and checkpoint it before stopping (see :mod:`mmelkit.training.resume`).
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
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from mmelkit._checks import choice, non_negative_int, non_negative_number, positive_int
from mmelkit._io import atomic_write_bytes
from mmelkit.models.images import OPENAI_MEAN, OPENAI_STD
from mmelkit.models.loading import resolve_device
from mmelkit.models.open_clip_backend import open_clip
from mmelkit.training.clip_data import CaptionMix, SceneCaptionPairs, collate, default_world
from mmelkit.training.export import save_training_state
from mmelkit.training.resume import GracefulStop, clean_run_folder, ignore_sigint, load_checkpoint, trim_log

# The embedded model's architecture: an open_clip ViT (patch 8, 64 px) small enough to train on a
# CPU in hours and on one GPU in minutes; open_clip's standard tokenizer and vocabulary.
SCENE_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}


@dataclass
class ClipTrainConfig:
    model: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(SCENE_CLIP_CONFIG)))
    data_seed: int = 0
    init_seed: int = 0
    steps: int = 4_600
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 200
    object_captions: float = 0.5
    pair_captions: float = 0.5
    checkpoint_every: int = 100
    log_every: int = 25
    workers: int = 1
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere; or "fp32" / "bf16"
    # start from these weights (a .safetensors export or a run's last.pt) instead of init_seed:
    # continued training, e.g. of the shipped model on fresh scenes at a lower learning rate
    init_from: str | None = None

    def __post_init__(self) -> None:
        # checked here, before a run folder or a data loader exists: `--steps 0` used to train nothing
        # and still write a checkpoint
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "workers"):
            non_negative_int(name, getattr(self, name))
        for name in ("lr", "weight_decay"):  # lr 0 is allowed: a run that must not move the weights
            non_negative_number(name, getattr(self, name))
        choice("precision", self.precision, ("auto", "fp32", "bf16"))

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed (not steps: a run may be extended)."""
        keep = asdict(self)
        for key in ("steps", "checkpoint_every", "log_every", "workers"):
            keep.pop(key)
        return keep


def multi_positive_info_nce(
    image_features: torch.Tensor, text_features: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE where ``positives[i, j]`` marks every matching image-text pair.

    For image i: -log(sum over its positive texts of softmax over all texts), and likewise per text
    over images. Rows without a positive are skipped (they cannot occur with scene captions).
    """
    logits = logit_scale * image_features @ text_features.T
    positive_mask = torch.where(positives, 0.0, float("-inf"))
    image_rows = positives.any(dim=1)
    text_cols = positives.any(dim=0)
    image_loss = torch.logsumexp(logits, dim=1) - torch.logsumexp(logits + positive_mask, dim=1)
    text_loss = torch.logsumexp(logits, dim=0) - torch.logsumexp(logits + positive_mask, dim=0)
    return 0.5 * (image_loss[image_rows].mean() + text_loss[text_cols].mean())


class _StepSampler(Sampler[int]):
    """Scene indices for steps start..end: step s uses scenes [s * batch, (s + 1) * batch)."""

    def __init__(self, start_step: int, end_step: int, batch_size: int) -> None:
        self.start, self.end, self.batch = start_step, end_step, batch_size

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self.start * self.batch, self.end * self.batch))

    def __len__(self) -> int:
        return (self.end - self.start) * self.batch


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, config: ClipTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class TokenCache:
    """Tokenised captions, memoised: the scene world's caption space is small."""

    def __init__(self, tokenizer: Any, device: torch.device) -> None:
        self.tokenizer, self.device, self._cache = tokenizer, device, {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for text, ids in zip(missing, self.tokenizer(missing), strict=True):
                self._cache[text] = ids
        return torch.stack([self._cache[t] for t in texts]).to(self.device, non_blocking=True)


def build_model(config: ClipTrainConfig) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        model = open_clip.CLIP(**config.model)
    if config.init_from is not None:
        model.load_state_dict(load_weights(config.init_from))
    return model


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights from a ``.safetensors`` export or a training checkpoint (``last.pt``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    if path.suffix == ".safetensors":
        from mmelkit.models.loading import _load_state_dict  # a damaged file: a CorruptFileError naming it

        state = _load_state_dict(path)
    else:
        state = load_checkpoint(path, required=("model",))["model"]
    return {key: value.float() for key, value in state.items()}


def train_clip(
    config: ClipTrainConfig,
    out_dir: str | Path,
    device: str | torch.device = "auto",
    progress: bool = True,
    max_seconds: float | None = None,
) -> Path:
    """Train (or resume) and return the path of the last checkpoint.

    ``max_seconds`` stops cleanly (checkpoint written) after that much wall time, so long CPU runs
    can proceed in slices. Ctrl-C / SIGTERM stop after the current step with a checkpoint of it and
    raise :class:`~mmelkit.training.resume.TrainingInterrupted`; an unreadable ``last.pt`` raises
    :class:`~mmelkit.training.resume.CorruptCheckpointError` (nothing is overwritten).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = resolve_device(device)
    model = build_model(config).to(target)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98))
    start_step, elapsed = 0, 0.0
    checkpoint_path = out / "last.pt"
    clean_run_folder(out, [checkpoint_path.name])
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, map_location=target,
                                required=("fingerprint", "model", "optimizer", "step"))
        if state["fingerprint"] != config.fingerprint():
            raise ValueError(f"{checkpoint_path} was written with another config; use a new out_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, elapsed = state["step"], state.get("seconds", 0.0)
    if start_step >= config.steps:
        return checkpoint_path

    if config.init_from is not None:
        # keep the starting model's card facts: exporting may overwrite the file they came from
        parent_card = Path(config.init_from).with_suffix(".json")
        if parent_card.is_file() and not (out / "parent.json").exists():
            atomic_write_bytes(out / "parent.json", parent_card.read_bytes())
    pairs = SceneCaptionPairs(
        default_world(config.data_seed, config.model["vision_cfg"]["image_size"]),
        CaptionMix(config.object_captions, config.pair_captions),
    )
    loader = DataLoader(
        pairs,
        batch_size=config.batch_size,
        sampler=_StepSampler(start_step, config.steps, config.batch_size),
        num_workers=config.workers,
        collate_fn=collate,
        pin_memory=target.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if config.workers else None,
        worker_init_fn=ignore_sigint if config.workers else None,
    )
    tokens = TokenCache(open_clip.SimpleTokenizer(context_length=config.model["text_cfg"]["context_length"]), target)
    mean = torch.tensor(OPENAI_MEAN, device=target).view(1, 3, 1, 1) * 255
    std = torch.tensor(OPENAI_STD, device=target).view(1, 3, 1, 1) * 255
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and target.type == "cuda")
    log_path = out / "log.jsonl"
    trim_log(log_path, start_step)  # lines a killed run logged after its last checkpoint come again

    def save(step: int) -> None:
        save_training_state(checkpoint_path, model, optimizer, step, elapsed + time.time() - started, config, target)

    model.train()
    started = time.time()
    step = start_step
    bar = tqdm(total=config.steps, initial=start_step, disable=not progress, desc="train clip", unit="step")
    with GracefulStop() as stop, log_path.open("a") as log:
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(step, config)
            images = (batch["images"].to(target, non_blocking=True).float() - mean) / std
            unique_texts = list(dict.fromkeys(batch["texts"]))
            first_index = {t: i for i, t in reversed(list(enumerate(batch["texts"])))}
            caption_codes = batch["caption_codes"][[first_index[t] for t in unique_texts]].to(target)
            codes = batch["codes"].to(target)
            # image i matches caption u when it holds every object the caption names
            positives = codes[:, caption_codes[:, 0]] & codes[:, caption_codes[:, 1]]
            with torch.autocast(target.type, dtype=torch.bfloat16, enabled=use_bf16):
                image_features = F.normalize(model.encode_image(images), dim=-1)
                text_features = F.normalize(model.encode_text(tokens(unique_texts)), dim=-1)
            loss = multi_positive_info_nce(
                image_features.float(), text_features.float(), positives, model.logit_scale.exp().clamp(max=100)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                value = float(loss.detach())
                bar.set_postfix(loss=f"{value:.3f}")
                log.write(json.dumps({"step": step, "loss": value, "seconds": round(elapsed + time.time() - started, 1)}) + "\n")
                log.flush()
            out_of_time = max_seconds is not None and time.time() - started > max_seconds
            if step % config.checkpoint_every == 0 or step == config.steps or out_of_time or stop.requested:
                save(step)
            if stop.requested:
                bar.close()
                stop.stop(step, checkpoint_path)
            if out_of_time:
                break
    bar.close()
    stop.stop(step, checkpoint_path)  # a signal that came after the last step's check still stops the caller
    return checkpoint_path
