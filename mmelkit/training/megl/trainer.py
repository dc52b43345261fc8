"""Explanation-guided training (``mmelkit train megl``): plain, RRR, GRADIA, HAICS, MEGL and its ablations.

One :class:`MeglConfig` says which losses are on and with what weight; :data:`PRESETS` names the
configurations the chapter compares. :func:`train_megl` trains one configuration for one seed,
resumably: ``<out_dir>/last.pt`` every ``checkpoint_every`` steps, ``<out_dir>/model.pt`` at the
end (a finished run is loaded, not retrained), both written atomically. The batch of step ``t`` is
a pure function of ``(seed, t)`` and no step draws from a random generator, so a resumed run sees
exactly the batches an uninterrupted one would have and ends with the same weights. Ctrl-C /
SIGTERM finish the current step and checkpoint it before stopping (see
:mod:`mmelkit.training.resume`).

The total loss (SPEC section 3)::

    L = L_cls + l_v L_att [mask] + l_t L_txt + l_s L_tsv [no mask] + l_d L_dc

With SDTG the generator reads ``I * up(A_hat)`` built from the *differentiable* Grad-CAM, so L_txt
also trains the classifier's explanation (the interaction between the two explanations that
SDTG is about); ``megl-no-sdtg`` cuts that path. Runs cached in ``out_dir`` are matched by
configuration, not by code: after changing a loss, train into a fresh folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmelkit._checks import did_you_mean, non_negative_number, output_folder, positive_int, readable
from mmelkit._io import atomic_torch_save, atomic_write_text
from mmelkit.datasets.shortcut import ShortcutConfig
from mmelkit.models.loading import resolve_device
from mmelkit.training.megl import losses
from mmelkit.training.megl.data import MeglSplit, RationaleVocab
from mmelkit.training.megl.models import (
    ExplainableClassifier,
    RationaleGenerator,
    build_classifier,
    grad_cam,
    highlight,
    input_gradients,
)
from mmelkit.training.resume import STOP_SIGNALS, GracefulStop, clean_run_folder, load_checkpoint

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class MeglConfig:
    """One training configuration. Weights of 0 switch a loss off (``text_weight=0``: no generator)."""

    name: str = "megl"
    # data: the shortcut task
    cue: str = "patch"  # "patch" (a local watermark) or "tint" (a diffuse background tint)
    spurious: float = 0.9  # share of training images whose cue agrees with the label
    mask_fraction: float = 0.5  # share of training images that keep their mask
    image_size: int = 32
    train_size: int = 3000
    data_seed: int = 0
    # model and optimisation
    arch: str = "cnn"  # "cnn" or "vit"
    width: int = 16
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    # losses
    attention: tuple[str, ...] = ("l1", "haics")  # terms of L_att, from losses.ATTENTION_TERMS
    cam_target: str = "log_prob"  # Grad-CAM of log p(y) ("log_prob") or of the logit ("logit")
    visual_weight: float = 0.1  # l_v, on L_att
    text_weight: float = 0.1  # l_t, on L_txt (SDTG's rationale likelihood)
    tsv_weight: float = 0.1  # l_s, on L_tsv (pseudo-masks from the embedded CLIP)
    dc_weight: float = 0.1  # l_d, on L_dc (KL to the class's mean mask)
    grounded: bool = True  # SDTG: the generator also sees the saliency-highlighted image
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        unknown = [t for t in self.attention if t not in losses.ATTENTION_TERMS]
        if unknown:
            raise ValueError(f"unknown attention terms {unknown}; choose from {list(losses.ATTENTION_TERMS)}")
        if self.cam_target not in ("logit", "log_prob"):
            raise ValueError(f"cam_target must be 'logit' or 'log_prob'; got {self.cam_target!r}")
        if self.arch not in ("cnn", "vit"):
            raise ValueError(f"arch must be 'cnn' or 'vit'; got {self.arch!r}")
        for name in ("visual_weight", "text_weight", "tsv_weight", "dc_weight", "lr"):
            non_negative_number(name, getattr(self, name))
        for name in ("image_size", "train_size", "width", "steps", "batch_size", "checkpoint_every"):
            positive_int(name, getattr(self, name))
        if self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4; got {self.image_size}")
        self.task()  # validates spurious, mask_fraction and cue

    def task(self) -> ShortcutConfig:
        """The shortcut task this configuration trains on."""
        base = ShortcutConfig()
        return ShortcutConfig(spurious=self.spurious, mask_fraction=self.mask_fraction,
                              cue=self.cue,  # type: ignore[arg-type]
                              scene=base.scene.scaled(self.image_size))

    @property
    def uses_generator(self) -> bool:
        return self.text_weight > 0

    @property
    def uses_pseudo_masks(self) -> bool:
        return self.tsv_weight > 0

    @property
    def needs_maps(self) -> bool:
        """Whether training differentiates through Grad-CAM at all."""
        map_terms = any(t != "rrr" for t in self.attention) and self.visual_weight > 0
        return map_terms or self.uses_pseudo_masks or self.dc_weight > 0 or (self.uses_generator and self.grounded)

    def data_key(self) -> tuple[Any, ...]:
        """What the training split depends on (configs sharing it can share one drawn split)."""
        return (self.cue, self.spurious, self.mask_fraction, self.image_size, self.train_size, self.data_seed)

    def fingerprint(self) -> dict[str, Any]:
        """What must match to resume a checkpoint (not ``steps``: a run may be extended)."""
        data = asdict(self)
        data.pop("steps")
        data.pop("checkpoint_every")
        data["attention"] = list(self.attention)
        return data


def _preset_table() -> dict[str, dict[str, Any]]:
    off = {"text_weight": 0.0, "tsv_weight": 0.0, "dc_weight": 0.0}
    return {
        "plain": {"attention": (), "visual_weight": 0.0, **off},
        "rrr": {"attention": ("rrr",), "visual_weight": 10.0, **off},
        "gradia": {"attention": ("l1", "gradia"), **off},
        "haics": {"attention": ("l1", "haics"), **off},
        "megl": {},
        "megl-no-sdtg": {"grounded": False},
        "megl-no-text": {"text_weight": 0.0},
        "megl-no-tsv": {"tsv_weight": 0.0},
        "megl-no-dc": {"dc_weight": 0.0},
        "megl-logit-cam": {"cam_target": "logit"},
    }


PRESETS: tuple[str, ...] = tuple(_preset_table())
PRESET_NOTES: dict[str, str] = {
    "plain": "cross-entropy only",
    "rrr": "Right for the Right Reasons: squared input gradients outside the mask",
    "gradia": "l1 + GRADIA attention supervision on masked samples",
    "haics": "l1 + HAICS (BCE) attention supervision on masked samples",
    "megl": "full MEGL: l1 + HAICS, SDTG rationales, textual supervision, distribution consistency",
    "megl-no-sdtg": "MEGL, generator without the saliency-highlighted image",
    "megl-no-text": "MEGL without the rationale generator (no L_txt)",
    "megl-no-tsv": "MEGL without textual supervision of unmasked samples",
    "megl-no-dc": "MEGL without the distribution-consistency loss",
    "megl-logit-cam": "MEGL with Grad-CAM of the logit instead of log p(y)",
}


def preset(which: str, /, **overrides: Any) -> MeglConfig:
    """The named configuration (see :data:`PRESETS`), with any field overridden (``name`` too)."""
    table = _preset_table()
    if which not in table:
        raise ValueError(f"unknown MEGL preset {which!r};{did_you_mean(which, table)} choose from {list(table)}")
    return MeglConfig(**{**table[which], "name": which, **overrides})


@dataclass
class MeglModel:
    """A trained configuration: the classifier, its rationale generator (or None) and the vocabulary."""

    config: MeglConfig
    classifier: ExplainableClassifier
    generator: RationaleGenerator | None
    vocab: RationaleVocab
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    def eval(self) -> MeglModel:
        self.classifier.eval()
        if self.generator is not None:
            self.generator.eval()
        return self


def new_model(config: MeglConfig, device: torch.device) -> MeglModel:
    """Freshly initialised networks, seeded by ``config.seed`` (the global RNG is left alone)."""
    vocab = RationaleVocab.for_task(config.task())
    num_classes = len(config.task().classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        classifier = build_classifier(config.arch, num_classes, config.image_size, config.width)
        generator = (RationaleGenerator(len(vocab), classifier.feature_dim, config.grounded)
                     if config.uses_generator else None)
    classifier.to(device)
    if generator is not None:
        generator.to(device)
    return MeglModel(config, classifier, generator, vocab)


def batch_indices(config: MeglConfig, step: int, count: int, device: torch.device) -> torch.Tensor:
    """The training batch of ``step``: a pure function of (seed, step)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    return torch.randint(0, count, (config.batch_size,), generator=generator).to(device)


def megl_loss(model: MeglModel, batch: MeglSplit, priors: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured total loss on one batch, and its parts (as floats, for the log)."""
    config = model.config
    images, labels = batch.images, batch.labels
    size = tuple(images.shape[-2:])
    parts: dict[str, torch.Tensor] = {}
    if config.needs_maps:
        logits, cams, features = grad_cam(model.classifier, images, labels, create_graph=True, target=config.cam_target)  # type: ignore[arg-type]
        maps = F.interpolate(cams[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    else:
        features = model.classifier.features(images)
        logits = model.classifier.classify(features)
        cams = maps = None
    parts["cls"] = losses.classification_loss(logits, labels)
    total = parts["cls"]
    if config.visual_weight > 0 and config.attention:
        per_sample = torch.zeros(len(labels), device=images.device)
        for term in config.attention:
            if term == "rrr":
                grads = input_gradients(model.classifier, images, create_graph=True)
                per_sample = per_sample + losses.rrr_attention(grads, batch.masks)
            else:
                assert maps is not None
                function = {"l1": losses.l1_attention, "gradia": losses.gradia_attention,
                            "haics": losses.haics_attention}[term]
                per_sample = per_sample + function(maps, batch.masks)
        parts["att"] = losses.masked_mean(per_sample, batch.has_mask)
        total = total + config.visual_weight * parts["att"]
    if config.uses_pseudo_masks:
        if batch.pseudo_masks is None:
            raise ValueError("textual supervision needs pseudo-masks: build the split with attach_pseudo_masks")
        assert maps is not None
        parts["tsv"] = losses.masked_mean(losses.textual_supervision(maps, batch.pseudo_masks), ~batch.has_mask)
        total = total + config.tsv_weight * parts["tsv"]
    if config.dc_weight > 0:
        assert maps is not None and priors is not None
        parts["dc"] = losses.distribution_consistency(maps, priors[labels]).mean()
        total = total + config.dc_weight * parts["dc"]
    if model.generator is not None:
        highlighted = highlight(images, cams) if config.grounded else None
        logits_txt = model.generator(features.mean(dim=(2, 3)), highlighted, batch.tokens[:, :-1])
        parts["txt"] = losses.rationale_nll(logits_txt, batch.tokens[:, 1:], RationaleVocab.PAD).mean()
        total = total + config.text_weight * parts["txt"]
    return total, {name: float(value.detach()) for name, value in parts.items()}


def _save(path: Path, model: MeglModel, optimizer: torch.optim.Optimizer, step: int) -> None:
    state = {
        "version": CHECKPOINT_VERSION,
        "config": asdict(model.config),
        "fingerprint": model.config.fingerprint(),
        "step": step,
        "classifier": model.classifier.state_dict(),
        "generator": None if model.generator is None else model.generator.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": model.history,
        "seconds": model.seconds,
    }
    atomic_torch_save(path, state)


def _load_state(path: Path) -> dict[str, Any]:
    return load_checkpoint(path, required=("version", "step", "classifier"), what="MEGL checkpoint")


def load_megl(path: str | Path, device: str | torch.device = "auto") -> MeglModel:
    """A trained model from ``model.pt`` (or a ``last.pt`` checkpoint)."""
    state = _load_state(readable("MEGL checkpoint", path))
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a MEGL checkpoint of version {CHECKPOINT_VERSION}")
    values = dict(state["config"])
    values["attention"] = tuple(values["attention"])
    model = new_model(MeglConfig(**values), resolve_device(device))
    model.classifier.load_state_dict(state["classifier"])
    if model.generator is not None:
        model.generator.load_state_dict(state["generator"])
    model.history, model.seconds = list(state["history"]), float(state["seconds"])
    return model.eval()


def train_megl(
    config: MeglConfig,
    train: MeglSplit,
    out_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    log_every: int = 50,
) -> MeglModel:
    """Train ``config`` on ``train`` (a :class:`MeglSplit`, with pseudo-masks if the config uses them).

    With ``out_dir`` the run checkpoints there and resumes; a finished run (``model.pt`` of this
    configuration) is loaded instead of trained again, or trained on when ``steps`` grew. With
    ``out_dir``, Ctrl-C / SIGTERM stop after the current step with a checkpoint of it and raise
    :class:`~mmelkit.training.resume.TrainingInterrupted` (without one there is nothing to keep, and
    Ctrl-C stops at once); an unreadable checkpoint raises
    :class:`~mmelkit.training.resume.CorruptCheckpointError`."""
    target = resolve_device(device)
    out = output_folder("out_dir", out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if config.uses_pseudo_masks and train.pseudo_masks is None:
        raise ValueError("this configuration uses textual supervision: attach pseudo-masks to the split first")
    model = new_model(config, target)
    parameters = list(model.classifier.parameters()) + ([] if model.generator is None else list(model.generator.parameters()))
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    start = 0
    # Resume from the interrupted run's last.pt, or extend a finished model.pt (both keep the
    # optimiser): whichever went further. A last.pt behind model.pt is stale (a run killed between
    # writing model.pt and deleting last.pt) and goes.
    found: list[tuple[int, bool, Path, dict[str, Any]]] = []
    if out is not None:
        clean_run_folder(out, ["last.pt", "model.pt"])
        for name in ("last.pt", "model.pt"):
            if not (out / name).exists():
                continue
            state = _load_state(out / name)
            if state.get("version") != CHECKPOINT_VERSION or state.get("fingerprint") != config.fingerprint():
                raise ValueError(f"{out / name} belongs to another configuration; use another out_dir or delete it")
            found.append((int(state["step"]), name == "model.pt", out / name, state))
    if found:
        step_done, _, path, state = max(found, key=lambda entry: entry[:2])
        if step_done > config.steps:
            raise ValueError(f"{path} has trained {step_done} steps, more than the {config.steps} asked for")
        model.classifier.load_state_dict(state["classifier"])
        if model.generator is not None:
            model.generator.load_state_dict(state["generator"])
        if state.get("optimizer") is not None:  # (runs of an earlier version finished without it)
            optimizer.load_state_dict(state["optimizer"])
        start, model.history, model.seconds = step_done, list(state["history"]), float(state["seconds"])
        if path.name == "model.pt" and out is not None:
            (out / "last.pt").unlink(missing_ok=True)
    if start == config.steps:
        return model.eval()
    data = train.to(target)
    priors = losses.class_mean_masks(data.masks, data.labels, data.has_mask, len(config.task().classes)) \
        if config.dc_weight > 0 else None
    model.classifier.train()
    if model.generator is not None:
        model.generator.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress,
               desc=f"train {config.name} (seed {config.seed})")
    began = time.perf_counter()
    with GracefulStop(STOP_SIGNALS if out is not None else ()) as stop:
        for step in bar:
            batch = data.take(batch_indices(config, step, len(data), target), host_fields=False)
            loss, parts = megl_loss(model, batch, priors)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % log_every == 0 or step == config.steps - 1:
                model.history.append({"step": step, **parts})
                bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()})
            done = step + 1
            if out is not None and done < config.steps and (done % config.checkpoint_every == 0 or stop.requested):
                model.seconds += time.perf_counter() - began
                began = time.perf_counter()
                _save(out / "last.pt", model, optimizer, done)
                if stop.requested:
                    bar.close()
                    stop.stop(done, out / "last.pt")
        model.seconds += time.perf_counter() - began
        if out is not None:
            _save(out / "model.pt", model, optimizer, config.steps)
            atomic_write_text(out / "config.json", json.dumps(asdict(model.config), indent=2) + "\n")
            (out / "last.pt").unlink(missing_ok=True)
    # a signal during the last step or the final save: the run is complete, but the caller stops
    stop.stop(config.steps, None if out is None else out / "model.pt")
    return model.eval()


# Sizes for the command line and the notebook: "cpu" trains one configuration in well under a
# minute on two cores; "gpu" is the full-size study.
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {"image_size": 32, "width": 16, "train_size": 3000, "steps": 1000, "batch_size": 64},
    "gpu": {"image_size": 64, "width": 32, "train_size": 10000, "steps": 3000, "batch_size": 128},
}
