"""Turn a training checkpoint into a shipped model: fp16 safetensors, config and model card.

Every file is written atomically (:mod:`mmelkit._io`): an export or a checkpoint save that is
interrupted leaves the previous file whole, never a truncated one that a later load trusts.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from mmelkit._io import atomic_torch_save, atomic_write_bytes, atomic_write_text, read_json
from mmelkit.models.loading import DATA_DIR
from mmelkit.training.resume import load_checkpoint

MODELS_DIR = DATA_DIR / "models"


def export_clip(
    checkpoint: str | Path,
    name: str = "scene-clip",
    out_dir: str | Path = MODELS_DIR,
    quality: dict[str, Any] | None = None,
    notes: str = "",
) -> Path:
    """Write ``<name>.safetensors`` (fp16 weights), ``<name>.json`` (config, training facts and
    quality) and ``<name>.md`` (the model card) into ``out_dir``; return the weights' path."""
    state = load_checkpoint(checkpoint, required=("model", "config", "step"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # fp16 halves the file; the vocabulary embedding alone is most of the model.
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in state["model"].items()}
    weights_path = out / f"{name}.safetensors"
    atomic_write_bytes(weights_path, safetensors_bytes(weights))
    train = state["config"]
    meta = {
        "name": name,
        "architecture": "open_clip CLIP",
        "model_config": train["model"],
        "tokenizer": "open_clip SimpleTokenizer (OpenAI CLIP BPE)",
        "training": {
            "config": train,
            "steps": state["step"],
            "images_seen": state["step"] * train["batch_size"],
            "seconds": round(state.get("seconds", 0.0)),
            "hardware": state.get("hardware") or describe_hardware(torch.device("cpu")),
        },
        "quality": quality or {},
        "notes": notes or _run_notes(Path(checkpoint)),
    }
    parent = _parent_training(Path(checkpoint))
    if parent is not None:
        meta["training"]["parent"] = parent
    atomic_write_text(out / f"{name}.json", json.dumps(meta, indent=2) + "\n")
    atomic_write_text(out / f"{name}.md", model_card(meta, weights_path.stat().st_size))
    return weights_path


def save_training_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    seconds: float,
    config: Any,
    device: torch.device,
) -> None:
    """Write a resumable checkpoint (model, optimiser, step, wall time, config and its fingerprint,
    hardware) atomically (:func:`mmelkit._io.atomic_torch_save`), so an interrupted save leaves the
    previous checkpoint intact. ``config`` is a trainer's config dataclass with ``fingerprint()``."""
    from dataclasses import asdict

    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "seconds": seconds,
        "config": asdict(config),
        "fingerprint": config.fingerprint(),
        "hardware": describe_hardware(device),
    }
    atomic_torch_save(path, state)


def describe_hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}"


def _parent_training(checkpoint: Path) -> dict[str, Any] | None:
    """The training facts of the model a continued run started from (``parent.json`` beside
    ``last.pt``, copied there by the trainer before the export could overwrite it)."""
    path = checkpoint.parent / "parent.json"
    if not path.is_file():
        return None
    parent = read_json(path)
    return {**parent["training"], "quality": parent.get("quality", {})}


def _run_notes(checkpoint: Path) -> str:
    """Free-text notes a run folder may carry (``notes.md`` beside ``last.pt``) for the model card."""
    path = checkpoint.parent / "notes.md"
    return path.read_text().strip() if path.is_file() else ""


def model_card(meta: dict[str, Any], size_bytes: int) -> str:
    train = meta["training"]
    config = train["config"]
    quality = meta.get("quality") or {}
    vision, text = meta["model_config"]["vision_cfg"], meta["model_config"]["text_cfg"]
    lines = [
        f"# {meta['name']}: the embedded scene-world CLIP",
        "",
        "A small open_clip CLIP trained by `mmelkit train clip` on mmelkit's synthetic scene world",
        "(coloured shapes with exact masks). It exists so that every explanation method and metric can",
        "run, and be checked against ground truth, on any machine without downloading anything.",
        "",
        "## Architecture",
        f"- image: ViT, {vision['image_size']} px, patch {vision['patch_size']}, width {vision['width']}, "
        f"{vision['layers']} blocks, head width {vision['head_width']}",
        f"- text: context {text['context_length']}, width {text['width']}, {text['layers']} blocks, "
        f"{text['heads']} heads; open_clip's tokenizer and 49,408-token vocabulary",
        f"- embedding dimension {meta['model_config']['embed_dim']}; weights stored in fp16 "
        f"({size_bytes / 1e6:.1f} MB)",
        "",
        "## Data recipe",
        "- scenes of 1 to 4 objects, 6 shapes x 8 colours, two sizes, textured or noisy backgrounds",
        f"  (`mmelkit.training.clip_data.default_world(seed={config['data_seed']})`)",
        f"- captions: \"a {{colour}} {{shape}}\" ({config['object_captions']:.0%}) or \"a {{c1}} {{s1}} and a "
        f"{{c2}} {{s2}}\" ({config['pair_captions']:.0%})",
        "- loss: multi-positive InfoNCE (a caption is positive for every image holding all the objects it",
        "  names; only the unique captions of a batch are encoded)",
        "",
        "## Training",
        *_training_lines(train),
        f"- reproduce: {_reproduce(train)} (resumable; `--device cuda` on a GPU); the figures below",
        "  come from the export's evaluation, also available alone as `mmelkit eval clip`",
        "",
        "## Quality (held-out scenes, another seed; `mmelkit eval clip`)",
    ]
    if quality:
        lines += [
            f"- zero-shot colour+shape naming, top-1 over all 48 captions: {100 * quality['naming']:.1f}%",
            f"- retrieval on 2-4 object scenes, Recall@1: image->text {100 * quality['i2t_r1']:.1f}%, "
            f"text->image {100 * quality['t2i_r1']:.1f}%",
            f"- relation caption vs its swapped counterpart: {100 * quality['relation']:.1f}% (chance 50%; "
            "CLIP models are known to be weak at relations, and this one never saw a relation caption)",
        ]
    else:
        lines.append("- not measured yet")
    if meta.get("notes"):
        lines += ["", "## Notes", meta["notes"]]
    return "\n".join(lines) + "\n"


def _command(config: dict[str, Any], export: bool) -> str:
    """The ``mmelkit train clip`` command line that repeats a run with this config."""
    defaults = {"steps": 4_600, "batch_size": 128, "lr": 5e-4, "warmup_steps": 200, "init_seed": 0, "data_seed": 0}
    flags = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "warmup_steps": "--warmup-steps",
             "init_seed": "--seed", "data_seed": "--data-seed"}
    parts = ["mmelkit train clip"]
    if config.get("init_from"):
        parts.append(f"--init-from {config['init_from']}")
    parts += [f"{flags[key]} {config[key]}" for key in flags if config.get(key, defaults[key]) != defaults[key]]
    return "`" + " ".join(parts + (["--export"] if export else [])) + "`"


def _reproduce(train: dict[str, Any]) -> str:
    if "parent" not in train:
        return _command(train["config"], export=True)
    return f"{_command(train['parent']['config'], export=True)}, then {_command(train['config'], export=True)}"


def _training_lines(train: dict[str, Any]) -> list[str]:
    """One bullet pair per stage: the run itself, preceded by the run it continued (if any)."""

    def stage(facts: dict[str, Any]) -> list[str]:
        config = facts["config"]
        start = f"from `{config['init_from']}`" if config.get("init_from") else f"init seed {config['init_seed']}"
        return [
            f"- AdamW, lr {config['lr']}, weight decay {config['weight_decay']}, warm-up {config['warmup_steps']} "
            f"steps, cosine decay; batch {config['batch_size']}; {start}; scene seed {config['data_seed']}",
            f"- {facts['steps']} steps, {facts['images_seen']:,} images, {facts['seconds'] / 60:.0f} minutes on "
            f"{facts['hardware']}",
        ]

    parent = train.get("parent")
    if parent is None:
        return stage(train)
    total = parent["images_seen"] + train["images_seen"]
    return [
        "Stage 1 (from scratch):",
        *stage(parent),
        "",
        "Stage 2 (continued training on fresh scenes):",
        *stage(train),
        "",
        f"In all {total:,} images.",
    ]
