"""``load_model``: every way of naming a CLIP model, one adapter out."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmelkit._checks import did_you_mean, float_dtype, readable
from mmelkit._io import CorruptFileError
from mmelkit.models.adapter import ClipAdapter
from mmelkit.models.backend import ClipBackend

ModelSpec = str | dict | nn.Module | ClipAdapter


@dataclass(frozen=True)
class ZooEntry:
    """A short model name mmelkit resolves itself, without any download."""

    name: str
    description: str
    build: Callable[[], tuple[nn.Module, str | None]]  # -> (open_clip model, tokenizer name)


DATA_DIR = Path(os.environ.get("MMELKIT_DATA", Path(__file__).resolve().parents[2] / "data"))


def _shipped(name: str) -> Callable[[], tuple[nn.Module, str | None]]:
    """Builder for a checkpoint shipped in data/models: <name>.json (config) + <name>.safetensors."""

    def build() -> tuple[nn.Module, str | None]:
        from mmelkit.models.open_clip_backend import open_clip

        meta_path = DATA_DIR / "models" / f"{name}.json"
        weights_path = meta_path.with_suffix(".safetensors")
        if not weights_path.is_file() or not meta_path.is_file():
            raise FileNotFoundError(
                f"the shipped model {name!r} is missing ({weights_path}); train and export it with "
                f"`mmelkit train clip` or set MMELKIT_DATA to the folder holding models/{name}.*"
            )
        config = json.loads(meta_path.read_text())["model_config"]
        with torch.random.fork_rng(devices=[]):
            model = open_clip.CLIP(**config)
        state = {k: v.float() for k, v in _load_state_dict(weights_path).items()}
        model.load_state_dict(state)
        return model, None

    return build


def _toy_random() -> tuple[nn.Module, str | None]:
    from mmelkit.models.open_clip_backend import open_clip

    # Seeded without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(**TOY_CONFIG)
    return model, None


# A small open_clip ViT (patch 8, 64 px) that runs fast on a CPU. Random weights: its outputs mean
# nothing; it exists so that the plumbing (and the course) runs before a trained model is there.
TOY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}

ZOO: dict[str, ZooEntry] = {
    "scene-clip": ZooEntry(
        "scene-clip",
        "The embedded CLIP trained by mmelkit on the synthetic scene world (64 px, patch 8). See data/models/scene-clip.md.",
        _shipped("scene-clip"),
    ),
    "toy-random": ZooEntry(
        "toy-random",
        "Random-init open_clip ViT (64 px, patch 8, 4 image and 3 text blocks). For plumbing and demos only.",
        _toy_random,
    ),
}


def list_zoo() -> dict[str, str]:
    """Short model names :func:`load_model` understands, with a description of each."""
    return {name: entry.description for name, entry in ZOO.items()}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when present, else Apple MPS, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a device torch knows ({error}); use 'auto', 'cpu', 'cuda', "
                         "'cuda:1' or 'mps'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return resolved


def _param_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file. A file that cannot be read is an error naming it: missing,
    a folder or unreadable (:func:`~mmelkit._checks.readable`), or truncated / not a checkpoint
    (:class:`~mmelkit._io.CorruptFileError`, a ValueError) instead of the loader's own words."""
    path = readable("checkpoint", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # (gone or locked since the check) already names the path
    except Exception as error:  # safetensors, zip, pickle and EOF errors all mean the same here
        raise CorruptFileError(path, f"checkpoint {path} cannot be loaded: it is truncated, damaged or not a "
                               f"checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise CorruptFileError(path, f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    # Checkpoints saved from DistributedDataParallel carry a "module." prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_hf_dir(path: Path) -> bool:
    if path.is_dir():
        readable("model folder", path, folder=True)  # a locked folder: say so, not "unknown model"
    return path.is_dir() and (path / "config.json").is_file() and not (path / "open_clip_config.json").is_file()


def load_model(
    spec: ModelSpec = "scene-clip",
    pretrained: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
) -> ClipAdapter:
    """Load a CLIP model and wrap it in a :class:`ClipAdapter`.

    ``spec`` may be:

    * a short name from :func:`list_zoo` (e.g. ``"toy-random"``);
    * an open_clip architecture (``"ViT-B-16"`` or ``"open_clip:ViT-B-16"``) with ``pretrained``
      a tag (``"openai"``, downloaded by open_clip, needs the network or its cache) or a local
      checkpoint file (``.pt``/``.bin``/``.safetensors``); without ``pretrained`` the weights are
      random;
    * an open_clip model config dict (``{"embed_dim": ..., "vision_cfg": ..., "text_cfg": ...}``),
      optionally with a local ``pretrained`` checkpoint file;
    * a Hugging Face CLIP id (``"openai/clip-vit-base-patch16"``, ``"hf:..."``) or a local
      directory written by ``save_pretrained``;
    * a model object: an open_clip ``CLIP``/``CustomTextCLIP`` or a transformers ``CLIPModel``.

    ``device="auto"`` picks CUDA when present. A model object the caller passes in stays where it
    is unless ``device``/``dtype`` are given explicitly; mmelkit does not switch its train/eval mode.
    Models mmelkit loads itself are put in eval mode with gradients off for their parameters.
    """
    if isinstance(spec, ClipAdapter):
        return spec
    float_dtype("dtype", dtype)
    if isinstance(spec, nn.Module):
        return _wrap_user_model(spec, device=device, dtype=dtype, tokenizer=tokenizer)

    backend, name = _build_backend(spec, pretrained, tokenizer)
    model = backend.model
    target = resolve_device(device)
    model.to(device=target, dtype=dtype or torch.float32)
    model.eval()
    model.requires_grad_(False)
    return ClipAdapter(backend, name=name, device=target, dtype=dtype or torch.float32)


def _wrap_user_model(
    model: nn.Module, *, device: str | torch.device, dtype: torch.dtype | None, tokenizer: Any
) -> ClipAdapter:
    backend = _backend_for_object(model, tokenizer=tokenizer)
    current_device, current_dtype = place_user_model(model, device, dtype)
    return ClipAdapter(backend, name=type(model).__name__, device=current_device, dtype=current_dtype)


def place_user_model(
    model: nn.Module, device: str | torch.device, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """A model object the caller passed in: moved only when ``device``/``dtype`` are given, its
    train/eval mode left alone (with a warning in training mode); returns where it now is."""
    current_device, current_dtype = _param_device_dtype(model)
    if device != "auto" or dtype is not None:
        target = current_device if device == "auto" else resolve_device(device)
        model.to(device=target, dtype=dtype or current_dtype)
        current_device, current_dtype = target, dtype or current_dtype
    if model.training:
        warnings.warn(
            "the model is in training mode: dropout makes its outputs and explanations random. "
            "Call model.eval() first unless that is what you want (mmelkit does not change it).",
            stacklevel=4,
        )
    return current_device, current_dtype


def _backend_for_object(model: nn.Module, tokenizer: Any = None, name: str | None = None) -> ClipBackend:
    from mmelkit.models.hf_backend import HFClipBackend, is_hf_clip_model
    from mmelkit.models.open_clip_backend import OpenClipBackend, is_open_clip_model

    if is_open_clip_model(model):
        return OpenClipBackend(model, tokenizer=tokenizer, name=name)
    if is_hf_clip_model(model):
        return HFClipBackend(model, tokenizer=tokenizer)
    raise TypeError(
        f"mmelkit does not know how to explain a {type(model).__name__}: pass an open_clip CLIP/CustomTextCLIP "
        "or a transformers CLIPModel"
    )


def _build_backend(spec: str | dict, pretrained: Any, tokenizer: Any) -> tuple[ClipBackend, str]:
    if isinstance(spec, dict):
        return _open_clip_from_config(spec, pretrained, tokenizer), "open_clip:custom-config"
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"model spec must be a name, a config dict or a model object; got {spec!r}")
    if spec in ZOO:
        if pretrained is not None:
            raise ValueError(f"zoo model {spec!r} brings its own weights; do not pass pretrained=")
        model, tokenizer_name = ZOO[spec].build()
        return _backend_for_object(model, tokenizer, tokenizer_name), spec
    if spec.startswith("hf:"):
        return _hf_backend(spec[3:], tokenizer), spec
    if spec.startswith("open_clip:"):
        return _open_clip_named(spec[len("open_clip:") :], pretrained, tokenizer), spec
    if _is_hf_dir(Path(spec)):
        return _hf_backend(spec, tokenizer), spec

    from mmelkit.models.open_clip_backend import open_clip

    if spec in open_clip.list_models():
        return _open_clip_named(spec, pretrained, tokenizer), f"open_clip:{spec}"
    if "/" in spec and not Path(spec).exists():
        return _hf_backend(spec, tokenizer), f"hf:{spec}"
    raise ValueError(
        f"unknown model {spec!r}.{did_you_mean(spec, [*ZOO, *open_clip.list_models()])} "
        f"Use a short name ({', '.join(ZOO)}), an open_clip architecture "
        "(see open_clip.list_models()), a Hugging Face CLIP id or local directory, or a model object"
    )


def _open_clip_named(arch: str, pretrained: Any, tokenizer: Any) -> ClipBackend:
    from mmelkit.models.open_clip_backend import OpenClipBackend, open_clip

    if arch not in open_clip.list_models():
        raise ValueError(f"open_clip has no architecture {arch!r};{did_you_mean(arch, open_clip.list_models())} "
                         "see open_clip.list_models()")
    if pretrained is None:
        warnings.warn(f"{arch}: no pretrained weights given, the model is randomly initialised", stacklevel=4)
    elif not Path(os.fspath(pretrained)).is_file():
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if str(pretrained) not in tags:
            raise ValueError(
                f"pretrained={pretrained!r} is neither a local file nor a known tag for {arch} ({', '.join(tags) or 'none'})"
            )
    try:
        model = open_clip.create_model(arch, pretrained=os.fspath(pretrained) if pretrained else None)
    except Exception as error:  # a damaged local file, or a tag that cannot be fetched offline
        if pretrained and Path(os.fspath(pretrained)).is_file():
            hint = "the file exists but could not be read as this architecture's weights (truncated, or another model's?)"
        else:
            hint = "mmelkit never downloads weights itself; a tag needs open_clip's cache or the network"
        raise RuntimeError(f"could not load open_clip {arch} with pretrained={pretrained!r}: {error}. {hint}") from error
    return OpenClipBackend(model, tokenizer=tokenizer, name=arch)


def _open_clip_from_config(config: dict, pretrained: Any, tokenizer: Any) -> ClipBackend:
    from mmelkit.models.open_clip_backend import OpenClipBackend, open_clip

    config = dict(config)
    custom_text = bool(config.pop("custom_text", False)) or "hf_model_name" in config.get("text_cfg", {})
    model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**config)
    if pretrained is not None:
        path = Path(os.fspath(pretrained))
        try:
            missing, unexpected = model.load_state_dict(_load_state_dict(path), strict=False)
        except RuntimeError as error:  # shapes differ: another architecture's weights
            raise ValueError(f"checkpoint {path} does not match the config: {error}") from None
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return OpenClipBackend(model, tokenizer=tokenizer)


def _hf_backend(name_or_dir: str, tokenizer: Any) -> ClipBackend:
    from transformers import CLIPModel

    from mmelkit.models.hf_backend import HFClipBackend

    try:
        model = CLIPModel.from_pretrained(name_or_dir)
    except Exception as error:
        if Path(name_or_dir).is_dir():  # a local folder: its files are damaged or missing, nothing to fetch
            hint = "the folder exists but its config or weights could not be read (truncated or incomplete files?)"
        else:
            hint = ("mmelkit never downloads weights itself; use a local directory (save_pretrained) or a model "
                    "in the Hugging Face cache")
        raise RuntimeError(f"could not load Hugging Face CLIP {name_or_dir!r}: {error}. {hint}") from error
    image_processor = None
    if tokenizer is None:
        tokenizer, image_processor = _hf_processors(name_or_dir)
    return HFClipBackend(model, tokenizer=tokenizer, image_processor=image_processor)


def _hf_processors(name_or_dir: str) -> tuple[Any, Any]:
    """Tokenizer and image processor saved with the model, or (None, None) where there are none."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    tokenizer = image_processor = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    except Exception:
        warnings.warn(f"{name_or_dir}: no tokenizer found; using OpenAI CLIP's BPE from open_clip", stacklevel=5)
    try:
        image_processor = CLIPImageProcessor.from_pretrained(name_or_dir)
    except Exception:
        pass  # OpenAI normalisation is the default for CLIP checkpoints
    return tokenizer, image_processor
