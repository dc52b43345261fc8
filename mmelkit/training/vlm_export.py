"""Turn a scene-llava training checkpoint into a shipped model folder.

``data/models/<name>/`` is a plain Hugging Face folder (``config.json``, ``model.safetensors``, the
processor and tokenizer files): ``LlavaForConditionalGeneration.from_pretrained`` and
``LlavaProcessor.from_pretrained`` open it without mmelkit. Next to them, ``mmelkit.json`` holds the
weights' SHA-256 (checked by ``load_vlm``), the training facts and the measured quality, and
``README.md`` is the model card.

The folder is built beside its target (``<name>.partial``), synced to disk and renamed into place;
files rewritten inside an exported folder are replaced atomically (:mod:`mmelkit._io`). An
interrupted export therefore never leaves a folder whose weights and checksum disagree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mmelkit._io import atomic_write_text, fsync_tree, read_json
from mmelkit.models.vlm import scene_llava
from mmelkit.models.vlm.loading import CHECKSUM_FILE, sha256_file
from mmelkit.training.export import MODELS_DIR, describe_hardware

WEIGHTS_FILE = "model.safetensors"
META_FILE = CHECKSUM_FILE  # the weights' SHA-256, training facts and quality


def export_vlm(
    checkpoint: str | Path,
    name: str = "scene-llava",
    out_dir: str | Path = MODELS_DIR,
    quality: dict[str, Any] | None = None,
    overwrite: bool = False,
    notes: str = "",
) -> Path:
    """Write the model folder ``out_dir/name`` from a training checkpoint and return it.

    An existing folder is replaced only with ``overwrite=True`` (the new one is written beside it
    and swapped in, so a failure leaves the old one intact; a kill between the two renames of the
    swap leaves the old folder as ``<name>.old``: rename it back to restore it, or let the next
    export delete it)."""
    from mmelkit.training.resume import load_checkpoint as load_state
    from mmelkit.training.vlm_trainer import load_checkpoint

    target = Path(out_dir) / name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (CLI: --force) to replace it")
    model, config = load_checkpoint(checkpoint)
    state = load_state(checkpoint, required=("config", "step"))
    staging = target.with_name(target.name + ".partial")
    retired = target.with_name(target.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    scene_llava.build_processor(
        image_size=model.config.vision_config.image_size, patch_size=model.config.vision_config.patch_size
    ).save_pretrained(staging)
    meta = {
        "name": name,
        "architecture": "transformers LlavaForConditionalGeneration (CLIP vision tower, 2-layer projector, Llama decoder)",
        "sha256": {WEIGHTS_FILE: sha256_file(staging / WEIGHTS_FILE)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": {
            "config": state["config"],
            "steps": state["step"],
            "questions_seen": state["step"] * state["config"]["batch_size"],
            "seconds": round(state.get("seconds", 0.0)),
            "hardware": state.get("hardware") or describe_hardware(torch.device("cpu")),
        },
        "quality": quality or {},
        "notes": notes,
    }
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (staging / "README.md").write_text(model_card(meta, (staging / WEIGHTS_FILE).stat().st_size))
    fsync_tree(staging)
    # A folder cannot be swapped in one atomic step: move the old one aside first, so that at no
    # moment is the target a mix of both, and delete it only once the new one is in place.
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        target.replace(retired)
    staging.replace(target)
    shutil.rmtree(retired, ignore_errors=True)
    return target


def write_quality(folder: str | Path, quality: dict[str, Any]) -> None:
    """Record measured quality in an exported folder's ``mmelkit.json`` and model card."""
    folder = Path(folder)
    meta = read_json(folder / META_FILE)
    meta["quality"] = quality
    atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2) + "\n")
    atomic_write_text(folder / "README.md", model_card(meta, (folder / WEIGHTS_FILE).stat().st_size))


def model_card(meta: dict[str, Any], size_bytes: int) -> str:
    train = meta["training"]
    config = train["config"]
    text = {**scene_llava.SCENE_TEXT, **config.get("text", {})}
    vision = {**scene_llava.SCENE_VISION, **config.get("vision", {})}
    grid = vision["image_size"] // vision["patch_size"]
    lines = [
        f"# {meta['name']}: the embedded scene-world generative VLM",
        "",
        "A real `transformers` LLaVA (`LlavaForConditionalGeneration`), small enough to train on a CPU,",
        "trained by `mmelkit train vlm` on mmelkit's scene-world questions (`mmelkit.datasets.vqa`).",
        "It exists so that a course can ask a generative model about an image and open it up, and so that",
        "explanations of its answers can be checked against exact ground truth, offline.",
        "",
        "## Architecture",
        f"- vision: CLIP ViT, {vision['image_size']} px, patch {vision['patch_size']} ({grid} x {grid} = "
        f"{grid * grid} visual tokens, CLS dropped), width {vision['hidden_size']}, {vision['layers']} layers, "
        f"{vision['heads']} heads; features from layer -2; initialised from scene-clip's image tower",
        f"- projector: linear-GELU-linear to {text['hidden_size']}",
        f"- decoder: Llama, {text['layers']} layers, width {text['hidden_size']}, {text['heads']} heads, "
        f"MLP {text['intermediate_size']}, RoPE, {text['max_positions']} positions",
        f"- tokenizer: word level, {len(scene_llava.VOCABULARY)} words with `<image>`; LLaVA-1.5 chat format",
        f"- {meta['parameters']:,} parameters, fp32 safetensors ({size_bytes / 1e6:.1f} MB), SHA-256 in `mmelkit.json`",
        "",
        "## Training",
        f"- questions: existence, attribute, count (0-4), relation, caption; co-occurrence {config['co_occurrence']}"
        + (" (scenes of whole couples)" if config.get("whole_couples") else "")
        + (f"; implied partners {config['implied_partner']} (existence questions about the absent partner of an "
           "object that is there, answered yes)" if config.get("implied_partner") else ""),
        *(["- question mix: " + ", ".join(f"{k} {w:g}" for k, w in config["kind_weights"].items())]
          if config.get("kind_weights") else []),
        *(["- attribute questions by style: " + ", ".join(f"{k} {w:g}" for k, w in config["attribute_styles"].items())]
          if config.get("attribute_styles") else []),
        *([f"- {config['turns']} questions per image, as one LLaVA-style conversation (SceneQA.conversation)"]
          if config.get("turns", 1) > 1 else []),
        f"- AdamW, lr {config['lr']} (vision tower x {config['vision_lr_scale']}), warm-up {config['warmup_steps']}, "
        f"cosine to 5%; batch {config['batch_size']}; init seed {config['init_seed']}, data seed {config['data_seed']}",
        f"- {train['steps']} steps, {train['questions_seen']:,} {'images' if config.get('turns', 1) > 1 else 'questions'}, "
        f"{train['seconds'] / 60:.0f} minutes on "
        f"{train['hardware']}",
        (f"- continued training from `{config['init_from']}`; how to reproduce every stage: see Notes"
         if config.get("init_from") else f"- reproduce: `mmelkit train vlm --preset {meta['name']} --export`"),
        "",
    ]
    quality = meta.get("quality") or {}
    if quality:
        lines += ["## Quality (held-out scenes, `mmelkit eval vlm`)", ""]
        for kind, value in quality.get("accuracy", {}).items():
            lines.append(f"- {kind}: {100 * value:.1f}%")
        for split, scores in quality.get("pope", {}).items():
            lines.append(f"- POPE {split}: F1 {scores['f1']:.3f}, accuracy {scores['accuracy']:.3f}, "
                         f"yes-ratio {scores['yes_ratio']:.3f}")
        chair = quality.get("chair")
        if chair:
            lines.append(f"- CHAIR_i {chair['chair_i']:.3f}, CHAIR_s {chair['chair_s']:.3f}")
        lines.append("")
    if meta.get("notes"):
        lines += ["## Notes", "", meta["notes"], ""]
    return "\n".join(lines)
