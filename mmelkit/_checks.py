"""Argument checks shared by models, methods, metrics, the bench and training.

The package's layers depend one way: models know no method, methods know no metric, metrics know
no notebook. A check that several layers need (is this a positive integer? a batch of maps? a
known name?) therefore cannot live in any one of them without dragging an upward import along, so
it lives here, below all of them. This module imports nothing from mmelkit.

Every check names the argument it rejects and says what it wanted and what it got, so that an
error raised three calls deep still tells the caller which of *their* arguments to fix. Checks
return the value they accepted (converted where that is lossless: a numpy integer becomes an
``int``), so a caller can write ``steps = positive_int("steps", steps)``.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "choice",
    "did_you_mean",
    "feature_matrix",
    "finite",
    "float_dtype",
    "image_batch",
    "map_batch",
    "non_negative_int",
    "non_negative_number",
    "output_folder",
    "positive_int",
    "positive_number",
    "probability",
    "readable",
    "same_device",
]


# -- numbers -----------------------------------------------------------------------------------------
def _integer(value: Any) -> int | None:
    """``value`` as an int when it is an integer (a Python, numpy or 0-d torch integer), else None.
    bool is refused: ``True`` as a batch size is a slip, never a deliberate 1."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor) and (value.ndim != 0 or value.is_floating_point() or value.is_complex()):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (sizes, counts, steps, batch sizes), or a ValueError naming ``name``."""
    number = _integer(value)
    if number is None or number < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return number


def non_negative_int(name: str, value: Any, *, unit: str = "") -> int:
    """``value`` as an int >= 0 (seeds, tolerances, offsets), or a ValueError naming ``name``;
    ``unit`` (e.g. ``"pixels"``) goes into the message."""
    number = _integer(value)
    if number is None or number < 0:
        what = f" ({unit})" if unit else ""
        raise ValueError(f"{name} must be a non-negative integer{what}; got {value!r}")
    return number


def _real(value: Any) -> float | None:
    """``value`` as a finite float when it is a real number (not bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def positive_number(name: str, value: Any) -> float:
    """``value`` as a finite float > 0 (temperatures, learning rates, scales), or a ValueError."""
    number = _real(value)
    if number is None or number <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return number


def non_negative_number(name: str, value: Any) -> float:
    """``value`` as a finite float >= 0 (loss weights, strengths), or a ValueError naming ``name``."""
    number = _real(value)
    if number is None or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return number


def probability(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1] (shares, rates, mixing weights), or a ValueError naming ``name``."""
    number = _real(value)
    if number is None or not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
    return number


# -- names -------------------------------------------------------------------------------------------
def did_you_mean(value: Any, choices: Iterable[str]) -> str:
    """`` did you mean 'x'?`` for the known names closest to a mistyped ``value`` (up to three; by
    difflib's ratio, else a case-insensitive match, else names it abbreviates), or ``""`` when none
    is close: the suffix every "unknown name" error appends."""
    if not isinstance(value, str):
        return ""
    known = list(choices)
    close = difflib.get_close_matches(value, known, n=3, cutoff=0.6)
    if not close:  # a case slip ("Grad_ECLIP") is too far for difflib's ratio but obvious
        close = [name for name in known if name.lower() == value.lower()]
    if not close and len(value) >= 2:  # so is a shortening ("abs" for "absolute")
        close = [name for name in known if name.lower().startswith(value.lower())][:3]
    if not close:
        return ""
    return " did you mean " + " or ".join(repr(name) for name in close) + "?"


def choice(
    name: str, value: Any, choices: Iterable[str] | Mapping[str, Any], *, what: str | None = None,
    listing: str | None = None,
) -> str:
    """``value`` when it is one of ``choices``, else a ValueError: ``unknown <what> 'x'; did you mean
    'y'? <what>s: a, b, c``. ``what`` is the noun (default ``name``); ``listing`` replaces the
    ``<what>s: ...`` tail where the choices need explaining (e.g. datasets that take an argument)."""
    known = list(choices)
    if isinstance(value, str) and value in known:
        return value
    noun = what or name
    tail = listing if listing is not None else f"{noun}s: {', '.join(map(str, known))}"
    raise ValueError(f"unknown {noun} {value!r};{did_you_mean(value, known)} {tail}")


# -- tensors -----------------------------------------------------------------------------------------
def _tensor(name: str, value: Any, shape: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape}; got {type(value).__name__}")
    if value.is_meta:  # shapes without values (e.g. from a model built on the meta device)
        raise ValueError(f"{name} are on the meta device: they have a shape but no values to compute with")
    return value


def finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` unchanged when every value is finite, else a ValueError naming ``name`` and the
    first offending rows (along dim 0): NaN or inf in an input spreads silently into every
    downstream number, so it is stopped where it enters."""
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        rows = (~torch.isfinite(tensor)).reshape(tensor.shape[0], -1).any(dim=1) if tensor.ndim else None
        where = f" at rows {rows.nonzero()[:, 0].tolist()[:10]}" if rows is not None else ""
        raise ValueError(f"{name} hold NaN or infinite values{where}")
    return tensor


def class_labels(labels: Any, count: int, classes: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``labels`` as (count,) long class indices in [0, classes) on ``device``: one per image of a
    zero-shot task whose ``classes`` class texts they index. A ValueError (wrong length or range) or
    TypeError (not integers) names the labels."""
    tensor = torch.as_tensor(labels)
    if tensor.dim() != 1 or len(tensor) != count:
        raise ValueError(f"labels must be one integer per image ({count}); got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"labels must be integers; got {tensor.dtype}")
    if count and (tensor.min() < 0 or tensor.max() >= classes):
        raise ValueError(f"labels must index the {classes} class texts, [0, {classes}); got values from {int(tensor.min())} to "
                         f"{int(tensor.max())}")
    return tensor.to(device if device is not None else tensor.device, torch.long)


def refuse_active_dropout(module: torch.nn.Module, consequence: str, what: str = "model") -> None:
    """A RuntimeError when ``module`` runs dropout (a dropout ``p``, open_clip's patch-dropout
    ``prob`` or a Hugging Face attention ``dropout`` above 0 in a submodule in training mode).

    mmelkit never switches a user's model to eval mode; a tool whose result dropout would make
    random or inexact refuses instead, saying why (``consequence``)."""
    for name, sub in module.named_modules():
        for attribute in ("p", "prob", "dropout"):
            value = getattr(sub, attribute, None)
            if sub.training and isinstance(value, float) and value > 0:
                raise RuntimeError(f"the {what} is in training mode with dropout active ({name or what}.{attribute}="
                                   f"{value}): {consequence}; call model.model.eval() first")


def feature_matrix(name: str, value: Any) -> torch.Tensor:
    """A non-empty, finite, floating-point (N, D) tensor (activations, features), or an error
    naming ``name``: TypeError for a non-tensor or an integer dtype, ValueError for the rest."""
    tensor = _tensor(name, value, "(N, D)")
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D); got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} are empty: shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be floating point; got {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).any(dim=1).sum())
        raise ValueError(f"{name} hold NaN or infinite values in {bad} of {tensor.shape[0]} rows")
    return tensor


def map_batch(value: Any, count: int | None = None, *, name: str = "maps") -> torch.Tensor:
    """A batch of explanation maps as float32 (N, h, w): a tensor of three dimensions, ``count``
    maps when given (one per image), a non-empty grid, finite values. Anything else is an error
    naming ``name``; the maps stay on their device."""
    tensor = _tensor(name, value, "(N, h, w)")
    if tensor.ndim != 3:
        raise ValueError(f"{name} must have shape (N, h, w); got {tuple(tensor.shape)}")
    if count is not None and tensor.shape[0] != count:
        raise ValueError(f"got {tensor.shape[0]} {name} for {count} images: pass one map per image")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} are an empty batch (N = 0)")
    if min(tensor.shape[1:]) < 1:
        raise ValueError(f"{name} have an empty spatial size {tuple(tensor.shape[1:])}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers; got {tensor.dtype}")
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        bad = (~torch.isfinite(tensor)).flatten(1).any(dim=1).nonzero()[:, 0].tolist()
        raise ValueError(f"{name} {bad[:10]} contain NaN or infinite values")
    return tensor


def image_batch(value: Any, *, name: str = "images", channels: int | None = 3) -> torch.Tensor:
    """A batch of model-input images (N, C, H, W): a floating-point tensor, at least one image,
    ``channels`` channels when given, finite values. Errors name ``name``: TypeError for a
    non-tensor or an integer dtype (raw uint8 pictures go through the adapter's conversion, not
    here), ValueError for shapes and values."""
    tensor = _tensor(name, value, "(N, C, H, W)")
    if tensor.ndim != 4:
        raise ValueError(f"{name} must be a batch (N, C, H, W); got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} are an empty batch (N = 0)")
    if channels is not None and tensor.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels; got shape {tuple(tensor.shape)}")
    if min(tensor.shape[2:]) < 1:
        raise ValueError(f"{name} have an empty spatial size {tuple(tensor.shape[2:])}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be floating point (model input); got {tensor.dtype}")
    return finite(name, tensor)


def same_device(**tensors: torch.Tensor) -> torch.device:
    """The one device all the named tensors are on, or a ValueError naming each tensor's device.
    For tensors that must meet in one operation and that the callee should not silently copy
    (a copy of a large batch across devices is a cost the caller should choose)."""
    devices = {name: tensor.device for name, tensor in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"tensors must be on one device; got {listed}")
    return next(iter(devices.values()), torch.device("cpu"))


def float_dtype(name: str, dtype: Any) -> torch.dtype | None:
    """``dtype`` when it is None or a floating-point ``torch.dtype`` (what a model's weights can be
    cast to), else a TypeError naming ``name``; torch's own refusal comes from deep in ``.to()``."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    raise TypeError(f"{name} must be a floating-point dtype (torch.float32, torch.float16, torch.bfloat16); "
                    f"got {dtype!r}")


# -- paths -------------------------------------------------------------------------------------------
def readable(name: str, path: str | os.PathLike[str], *, folder: bool = False) -> Path:
    """``path`` as a Path when it exists, is a file (a folder with ``folder=True``) and can be read;
    else FileNotFoundError, IsADirectoryError / NotADirectoryError or PermissionError, each naming
    ``name`` and the path. Checked before a loader opens it: libraries report an unreadable file in
    their own words (safetensors calls it missing, transformers a missing weight file)."""
    path = Path(path).expanduser()
    kind = "folder" if folder else "file"
    try:
        path.stat()
    except PermissionError:
        raise PermissionError(f"{name}: cannot reach {path}: permission denied (a folder above it is not "
                              "searchable)") from None
    except OSError:
        raise FileNotFoundError(f"{name}: {path} does not exist") from None
    if folder and not path.is_dir():
        raise NotADirectoryError(f"{name}: {path} is a file, not a folder")
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{name}: {path} is a folder, not a file")
    if not os.access(path, os.R_OK | (os.X_OK if folder else 0)):
        raise PermissionError(f"{name}: cannot read the {kind} {path}: permission denied")
    return path


def output_folder(name: str, path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path for a folder that will be written into: it may be missing (it is created
    later) but must not be a file, which ``mkdir`` would refuse only after work was done (or which
    a careless writer would replace). A NotADirectoryError naming ``name`` otherwise."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{name}: {path} is a file, not a folder to write into")
    return path
