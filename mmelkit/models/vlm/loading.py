"""``load_vlm``: a LLaVA-style model by short name, by folder or as an object, one adapter out.

Nothing is ever downloaded: a short name resolves to a folder under ``DATA_DIR/models``, a path
must be an existing ``save_pretrained`` folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmelkit._checks import did_you_mean, float_dtype, readable
from mmelkit._io import CorruptFileError
from mmelkit.models import loading
from mmelkit.models.loading import resolve_device
from mmelkit.models.vlm.adapter import VlmAdapter

VlmSpec = str | os.PathLike[str] | nn.Module | VlmAdapter

CHECKSUM_FILE = "mmelkit.json"


@dataclass(frozen=True)
class VlmZooEntry:
    """A short VLM name: a ``save_pretrained`` folder (model and processor) plus ``mmelkit.json``
    holding ``{"sha256": {"model.safetensors": "<hex>", ...}}``, checked on every load."""

    name: str
    description: str
    folder: str | Path  # under DATA_DIR / "models"; an absolute path is used as it is

    def path(self) -> Path:
        return Path(loading.DATA_DIR) / "models" / self.folder


VLM_ZOO: dict[str, VlmZooEntry] = {
    "scene-llava": VlmZooEntry(
        "scene-llava",
        "The embedded LLaVA trained by mmelkit on scene-world questions (scene-clip's vision tower, 64 px, "
        "patch 8, 64 visual tokens; a 4-layer Llama decoder).",
        "scene-llava",
    ),
    "scene-llava-cooc": VlmZooEntry(
        "scene-llava-cooc",
        "scene-llava trained on scenes with planted object co-occurrences, so that it hallucinates the "
        "usual companion of an object (for POPE, CHAIR and contrastive decoding).",
        "scene-llava-cooc",
    ),
}



@contextlib.contextmanager
def quiet_transformers_loading() -> Iterator[None]:
    """transformers draws a progress bar per ``from_pretrained``: noise for a 17 MB model in a
    notebook or a training log. Its switch is global, so it is put back as it was."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()

def list_vlm_zoo() -> dict[str, str]:
    """Short VLM names :func:`load_vlm` understands, with a description of each (and how to make
    the model where this checkout does not hold it)."""
    return {
        name: entry.description
        + ("" if entry.path().is_dir() else f" [not in this checkout: `mmelkit train vlm --preset {name} --export`]")
        for name, entry in VLM_ZOO.items()
    }


def load_vlm(
    spec: VlmSpec = "scene-llava",
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    processor: Any = None,
) -> VlmAdapter:
    """Load a LLaVA-style VLM and wrap it in a :class:`VlmAdapter`.

    ``spec`` may be a short name from :func:`list_vlm_zoo` (its checksums are verified), a folder
    written by ``save_pretrained`` holding a ``LlavaForConditionalGeneration`` with its processor
    (or just its tokenizer: the processor is then built from the model's config), or a
    ``LlavaForConditionalGeneration`` object with ``processor=`` (a ``LlavaProcessor`` or a
    tokenizer; optional for models of the scene-llava architecture).

    Models mmelkit loads itself are put in eval mode with gradients off, on ``device`` (``"auto"``:
    CUDA when present) in ``dtype`` (default float32). A model object stays where it is, in the
    mode it is in, unless ``device``/``dtype`` are given.
    """
    if isinstance(spec, VlmAdapter):
        return spec
    float_dtype("dtype", dtype)
    if isinstance(spec, nn.Module):
        return _wrap_user_model(spec, processor, device=device, dtype=dtype)
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
        raise TypeError(f"VLM spec must be a short name, a folder or a model object; got {spec!r}")
    if processor is not None:
        raise ValueError("processor= is only for a model object; a named or saved model brings its own")
    name = os.fspath(spec)
    if isinstance(spec, str) and spec in VLM_ZOO:
        folder = VLM_ZOO[spec].path()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"the embedded VLM {spec!r} is missing: looked for the folder {folder}. Train and export it with "
                f"`mmelkit train vlm`, or set MMELKIT_DATA to the folder holding models/{spec}/"
            )
        verify_checksums(folder)
    else:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            what = "is a file, not a save_pretrained folder" if folder.exists() else "does not exist"
            raise ValueError(
                f"unknown VLM {name!r}:{did_you_mean(name, VLM_ZOO)} not a short name ({', '.join(VLM_ZOO)}) and "
                f"{folder} {what}. "
                "mmelkit never downloads models: save one with save_pretrained and pass its folder"
            )
    model, loaded_processor = _load_folder(folder)
    target = resolve_device(device)
    model.to(device=target, dtype=dtype or torch.float32)
    model.eval()
    model.requires_grad_(False)
    return VlmAdapter(model, loaded_processor, name=name, device=target, dtype=dtype or torch.float32)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(folder: Path) -> None:
    """Check every file listed in ``folder/mmelkit.json`` against its sha256; every weight file
    (``*.safetensors``) must be listed."""
    meta_path = folder / CHECKSUM_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} is missing: a zoo model folder carries the checksums of its weights. "
            "Re-export it with `mmelkit train vlm`"
        )
    try:
        sums = json.loads(meta_path.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{meta_path} must hold {{\"sha256\": {{file: hex digest}}}}; it does not ({error})") from error
    if not isinstance(sums, dict) or not sums:
        raise ValueError(f"{meta_path} lists no checksums")
    unlisted = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in sums)
    if unlisted:
        raise ValueError(f"{meta_path} has no checksum for {', '.join(unlisted)}; re-export with `mmelkit train vlm`")
    for file_name, expected in sums.items():
        path = folder / file_name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {meta_path} but missing")
        actual = sha256_file(path)
        if actual != str(expected).lower():
            raise ValueError(
                f"checksum mismatch for {path}: expected sha256 {expected}, found {actual}. The file is corrupt or "
                "was replaced; re-export the model with `mmelkit train vlm`"
            )


def _load_folder(folder: Path) -> tuple[nn.Module, Any]:
    """Model and processor of a ``save_pretrained`` folder. Whatever is wrong with the folder (locked,
    no or broken config.json, unreadable or truncated weights) is an error naming the folder and the
    file, not transformers' report of a missing or undecodable weight file."""
    readable("VLM folder", folder, folder=True)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a save_pretrained model folder")
    try:
        config = json.loads(readable("config", config_path).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptFileError(config_path, f"{config_path} is not valid JSON ({error})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "llava":
        raise ValueError(
            f"{folder} holds a model of model_type {model_type!r} (config.json); load_vlm needs a LLaVA model "
            "(model_type 'llava', LlavaForConditionalGeneration). CLIP models load with mmelkit.load_model"
        )
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        readable("weights", weights)
    from safetensors import SafetensorError

    try:
        with quiet_transformers_loading():
            model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise CorruptFileError(folder, f"the VLM in {folder} cannot be loaded: its weights are truncated, damaged "
                               f"or do not fit config.json ({type(error).__name__}: {error})") from error
    processor: Any = None
    try:
        processor = AutoProcessor.from_pretrained(str(folder))
    except Exception:  # no processor files: built from the tokenizer below
        processor = None
    if processor is None or getattr(processor, "image_processor", None) is None:
        tokenizer = processor if processor is not None else _load_tokenizer(folder)
        processor = processor_from_tokenizer(tokenizer, model.config, folder)
    return model, processor


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:
        raise FileNotFoundError(
            f"{folder} has neither a processor nor a tokenizer that loads ({error}); save the processor (or "
            "tokenizer) with save_pretrained into the same folder"
        ) from error


def processor_from_tokenizer(tokenizer: Any, config: Any, folder: Path | None = None) -> Any:
    """A ``LlavaProcessor`` for a model that came with a tokenizer only: CLIP image processing at
    the vision tower's size (the folder's ``preprocessor_config.json`` when there is one, else
    OpenAI normalisation) and the tokenizer's chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from mmelkit.models.images import OPENAI_MEAN, OPENAI_STD

    vision = config.vision_config
    image_processor = None
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        image_processor = CLIPImageProcessor.from_pretrained(str(folder))
    if image_processor is None:
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": vision.image_size},
            crop_size={"height": vision.image_size, "width": vision.image_size},
            image_mean=list(OPENAI_MEAN),
            image_std=list(OPENAI_STD),
        )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=getattr(config, "vision_feature_select_strategy", "default"),
        num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=getattr(tokenizer, "chat_template", None),
    )


def _wrap_user_model(
    model: nn.Module, processor: Any, *, device: str | torch.device, dtype: torch.dtype | None
) -> VlmAdapter:
    from transformers import LlavaForConditionalGeneration

    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(
            f"load_vlm explains LlavaForConditionalGeneration models; got a {type(model).__name__} "
            "(CLIP models load with mmelkit.load_model)"
        )
    if processor is None:
        processor = _scene_llava_processor(model.config)
    elif getattr(processor, "image_processor", None) is None:  # a bare tokenizer
        processor = processor_from_tokenizer(processor, model.config)
    current_device, current_dtype = loading.place_user_model(model, device, dtype)
    return VlmAdapter(model, processor, name=type(model).__name__, device=current_device, dtype=current_dtype)


def _scene_llava_processor(config: Any) -> Any:
    """The scene-llava processor, for a model object of that architecture passed without one."""
    from mmelkit.models.vlm import scene_llava

    vocabulary = scene_llava.VOCABULARY
    if (
        int(config.text_config.vocab_size) != len(vocabulary)
        or int(config.image_token_id) != vocabulary.index(scene_llava.IMAGE)
    ):
        raise ValueError(
            "pass processor= (the model's LlavaProcessor or tokenizer): this model does not use scene-llava's "
            "vocabulary, so mmelkit cannot build its processor"
        )
    vision = config.vision_config
    return scene_llava.build_processor(image_size=vision.image_size, patch_size=vision.patch_size)
