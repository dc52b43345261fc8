"""One batched pass that collects a CLIP image tower's activations over a dataset.

Layer probes, the CLIP logit lens, neuron labelling, TCAV and sparse autoencoders (SPEC §7) all
start from the same thing: some activations of some blocks for many images. This module computes
them once, in chunks, on the model's device, with a progress bar, and (optionally) caches them on
disk as memory-mapped arrays so that a second run over the same model and images is instant.

Sites (what is recorded at block ``l``; ``D`` the tower width, ``P`` the patch tokens):

============== =================== ==========================================================
site           shape               meaning
============== =================== ==========================================================
``cls``        (N, D)              residual stream at the CLS token after block ``l``
``patch_mean`` (N, D)              mean of the patch tokens after block ``l``
``patches``    (N, P, D)           every patch token after block ``l``
``neurons``    (N, F)              MLP hidden units of block ``l`` (after the nonlinearity),
                                   averaged over the patch tokens
``neurons_cls``(N, F)              the same units at the CLS token
``embedding``  (N, E)              the image embedding, unnormalised (no layer: key it ``None``)
============== =================== ==========================================================

The pass is the plain forward plus forward hooks that copy what is asked (no attention
re-implementation, no gradients), so it costs little more than the forward itself;
``benchmarks/activation_pass.py`` measures the ratio. Hooks are installed in a context manager
and removed on exit, also after an exception.

The cache key holds a fingerprint of the model's weights and of the raw input images, so a
changed model or changed images never read stale activations; :meth:`Activations.load` on a
directory written for another model refuses with an error that says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from mmelkit._checks import positive_int
from mmelkit.models.adapter import ClipAdapter
from mmelkit.models.tracing import BlockSelection, resolve_blocks

Site = Literal["cls", "patch_mean", "patches", "neurons", "neurons_cls", "embedding"]
SITES: tuple[str, ...] = ("cls", "patch_mean", "patches", "neurons", "neurons_cls", "embedding")
_LAYERED = frozenset(SITES) - {"embedding"}
_FORMAT = 1  # bump when the on-disk layout changes


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Activations:
    """Activations of N images, keyed by ``(site, layer)``; ``layer`` is a block index (negative
    indices count from the last block) or ``None`` for ``embedding``.

    ``acts["cls", -1]`` is the CLS token after the last block. Tensors live on the model's device
    (uncached) or are read-only memory-mapped CPU tensors (cached); ``.to(device)`` moves them.
    """

    data: dict[tuple[str, int | None], torch.Tensor]
    layers: list[int]
    num_layers: int
    num_images: int
    model_fingerprint: str
    data_fingerprint: str
    path: Path | None = None
    sites: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, key: tuple[str, int | None] | str) -> torch.Tensor:
        site, layer = (key, None) if isinstance(key, str) else key
        if site not in SITES:
            raise KeyError(f"unknown site {site!r}; sites: {', '.join(SITES)}")
        if site == "embedding":
            layer = None
        elif layer is None:
            raise KeyError(f"site {site!r} needs a layer: acts[{site!r}, layer]")
        else:
            if not -self.num_layers <= layer < self.num_layers:
                raise IndexError(f"the image tower has {self.num_layers} blocks; layer {layer} is out of range")
            layer %= self.num_layers
        if (site, layer) not in self.data:
            have = ", ".join(f"{s}@{lay}" for s, lay in self.data)
            raise KeyError(f"({site!r}, {layer}) was not collected; collected: {have}")
        return self.data[(site, layer)]

    def to(self, device: torch.device | str) -> Activations:
        """A copy with every tensor on ``device``."""
        moved = {key: value.to(device) for key, value in self.data.items()}
        return Activations(moved, self.layers, self.num_layers, self.num_images, self.model_fingerprint,
                           self.data_fingerprint, self.path, list(self.sites))

    @classmethod
    def load(cls, path: str | Path, model: ClipAdapter | None = None) -> Activations:
        """Read a cache entry written by :func:`collect_activations`, memory-mapped.

        With ``model``, refuse an entry written for other weights (the cause named in the error)."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} holds no mmelkit activations (no meta.json)")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{meta_file} is not valid JSON ({error}); delete the folder to recompute") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} was written in activation-cache format {meta.get('format')}, this mmelkit "
                             f"reads format {_FORMAT}; delete it to recompute")
        if model is not None:
            fingerprint = model_fingerprint(model)
            if meta["model_fingerprint"] != fingerprint:
                raise ValueError(
                    f"the activations in {path} were written by another model ({meta['model_name']}, weights "
                    f"{meta['model_fingerprint'][:12]}), not by {model.name} (weights {fingerprint[:12]}); "
                    "recompute them for this model"
                )
        data: dict[tuple[str, int | None], torch.Tensor] = {}
        for entry in meta["entries"]:
            array = np.load(path / entry["file"], mmap_mode="r")
            if array.shape[0] != meta["num_images"]:
                raise ValueError(f"{path / entry['file']} holds {array.shape[0]} rows, not {meta['num_images']}: "
                                 "the cache is truncated; delete it to recompute")
            with warnings.catch_warnings():  # the arrays are read-only on purpose
                warnings.simplefilter("ignore", UserWarning)
                data[(entry["site"], entry["layer"])] = torch.from_numpy(array)
        return cls(data, meta["layers"], meta["num_layers"], meta["num_images"], meta["model_fingerprint"],
                   meta["data_fingerprint"], path, meta["sites"])


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------


def model_fingerprint(model: ClipAdapter) -> str:
    """A hash of the model's family, dtype, image geometry and every weight (state dict bytes)."""
    digest = _digest()
    digest.update(f"{model.family}|{model.dtype}|{model.image_size}|{model.patch_size}".encode())
    digest.update(repr((model.backend.image_mean, model.backend.image_std)).encode())
    for name, tensor in model.model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _digest() -> Any:
    # SHA-1 is a cache key here, not a security measure; it hashes about 1 GB/s, so fingerprinting
    # the inputs stays a few percent of the pass.
    return hashlib.sha1(usedforsecurity=False)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().cpu()
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


def data_fingerprint(images: torch.Tensor | Sequence[Any]) -> str:
    """A hash of the raw images (their bytes, shapes and types), before any preprocessing."""
    digest = _digest()
    if isinstance(images, torch.Tensor):
        digest.update(f"tensor|{tuple(images.shape)}|{images.dtype}".encode())
        digest.update(_tensor_bytes(images))
        return digest.hexdigest()
    for image in images:
        if isinstance(image, Image.Image):
            digest.update(f"pil|{image.mode}|{image.size}".encode())
            digest.update(image.tobytes())
        elif isinstance(image, np.ndarray):
            digest.update(f"numpy|{image.shape}|{image.dtype}".encode())
            digest.update(np.ascontiguousarray(image).tobytes())
        elif isinstance(image, torch.Tensor):
            digest.update(f"tensor|{tuple(image.shape)}|{image.dtype}".encode())
            digest.update(_tensor_bytes(image))
        else:
            raise TypeError(f"cannot use {type(image).__name__} as an image: pass PIL images, numpy arrays or tensors")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


def _neuron_input_module(block: nn.Module, index: int) -> nn.Module:
    """The MLP's output projection, whose input is the hidden units after the nonlinearity."""
    mlp = getattr(block, "mlp", None)
    for name in ("c_proj", "fc2"):  # open_clip, Hugging Face
        module = getattr(mlp, name, None)
        if isinstance(module, nn.Module):
            return module
    raise NotImplementedError(f"image block {index} ({type(block).__name__}) has no MLP mmelkit can read neurons from")


@contextmanager
def _recording(model: ClipAdapter, wanted: dict[int, set[str]], store: dict[tuple[str, int], torch.Tensor]
               ) -> Iterator[None]:
    """Hooks that put the wanted sites of each wanted block into ``store`` on every forward."""
    tower = model.backend.image_tower()
    prefix = tower.num_prefix_tokens
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def block_hook(index: int, sites: set[str]) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tokens = output[0] if isinstance(output, tuple) else output
            if not tower.batch_first:
                tokens = tokens.transpose(0, 1)
            if "cls" in sites:
                store[("cls", index)] = tokens[:, 0]
            if "patch_mean" in sites:
                store[("patch_mean", index)] = tokens[:, prefix:].mean(dim=1)
            if "patches" in sites:
                store[("patches", index)] = tokens[:, prefix:]
        return hook

    def neuron_hook(index: int, sites: set[str]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            hidden = args[0]
            if not tower.batch_first:
                hidden = hidden.transpose(0, 1)
            if "neurons" in sites:
                store[("neurons", index)] = hidden[:, prefix:].mean(dim=1)
            if "neurons_cls" in sites:
                store[("neurons_cls", index)] = hidden[:, 0]
        return hook

    try:
        for index, sites in wanted.items():
            block = tower.blocks[index]
            if sites & {"cls", "patch_mean", "patches"}:
                handles.append(block.register_forward_hook(block_hook(index, sites)))
            if sites & {"neurons", "neurons_cls"}:
                handles.append(_neuron_input_module(block, index).register_forward_pre_hook(neuron_hook(index, sites)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------------


def _check_sites(sites: Sequence[str] | str) -> list[str]:
    items = [sites] if isinstance(sites, str) else list(sites)
    if not items:
        raise ValueError(f"no sites asked for; sites: {', '.join(SITES)}")
    unknown = [s for s in items if s not in SITES]
    if unknown:
        raise ValueError(f"unknown site(s) {unknown}; sites: {', '.join(SITES)}")
    return list(dict.fromkeys(items))


def _num_images(images: torch.Tensor | Sequence[Any]) -> int:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError("a tensor of images must be model input: float (N, 3, H, W) from model.preprocess(); "
                             f"got {tuple(images.shape)} {images.dtype}")
        return images.shape[0]
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError("images must be a model-input tensor (N, 3, H, W) or a sequence of images "
                        f"(PIL, numpy, torch); got {type(images).__name__}")
    return len(images)


def collect_activations(
    model: ClipAdapter,
    images: torch.Tensor | Sequence[Any],
    *,
    sites: Sequence[str] | str = ("cls",),
    layers: BlockSelection = "all",
    batch_size: int = 64,
    cache: str | Path | None = None,
    progress: bool = True,
) -> Activations:
    """Run the image tower over ``images`` in chunks and keep the asked activations.

    ``images``: model input (N, 3, H, W) or a sequence of images of any kind :meth:`ClipAdapter.preprocess`
    takes. ``sites``: see the module docstring. ``layers``: blocks to record (``"all"``, an index or
    indices, negatives allowed). ``cache``: a folder; the result is stored under a key made of the
    model's and the images' fingerprints, the sites and the layers, and read back (memory-mapped)
    when the same pass is asked again.
    """
    sites = _check_sites(sites)
    batch_size = positive_int("batch_size", batch_size)
    count = _num_images(images)
    if count == 0:
        raise ValueError("no images given")
    depth = model.num_image_blocks
    layered = [s for s in sites if s in _LAYERED]
    indices = resolve_blocks(layers, depth, "image") if layered else []
    if layered and not indices:
        raise ValueError(f"sites {layered} need at least one layer; got layers={layers!r}")
    keys: list[tuple[str, int | None]] = [(s, i) for s in layered for i in indices]
    if "embedding" in sites:
        keys.append(("embedding", None))

    model_print = model_fingerprint(model) if cache is not None else ""
    data_print = data_fingerprint(images) if cache is not None else ""
    entry: Path | None = None
    if cache is not None:
        request = json.dumps({"model": model_print, "data": data_print, "keys": keys, "format": _FORMAT})
        entry = Path(cache) / hashlib.blake2b(request.encode(), digest_size=12).hexdigest()
        if (entry / "meta.json").is_file():
            return Activations.load(entry, model=None)

    wanted: dict[int, set[str]] = {}
    for site, index in keys:
        if index is not None:
            wanted.setdefault(index, set()).add(site)
    store: dict[tuple[str, int], torch.Tensor] = {}
    outputs: dict[tuple[str, int | None], Any] = {}
    scratch: Path | None = None
    if entry is not None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=entry.parent))
    try:
        bar = tqdm(total=count, disable=not progress, desc="activations", unit="img")
        with torch.no_grad(), _recording(model, wanted, store):
            for start in range(0, count, batch_size):
                chunk = images[start : start + batch_size]
                pixels = model.as_pixels(chunk)
                embedding = model.encode_image(pixels, normalize=False)
                got: dict[tuple[str, int | None], torch.Tensor] = {**store, ("embedding", None): embedding}
                for key in keys:
                    value = got[key]
                    if key not in outputs:
                        outputs[key] = _allocate(scratch, key, (count, *value.shape[1:]), value, model.device)
                    _write(outputs[key], start, value)
                store.clear()
                bar.update(len(pixels))
        bar.close()
        if scratch is None:
            return Activations(outputs, indices, depth, count, model_print, data_print, None, sites)
        for array in outputs.values():
            array.flush()
        meta = {
            "format": _FORMAT, "model_name": model.name, "model_fingerprint": model_print,
            "data_fingerprint": data_print, "num_images": count, "num_layers": depth, "layers": indices,
            "sites": sites, "entries": [{"site": s, "layer": i, "file": _file_name(s, i)} for s, i in keys],
        }
        (scratch / "meta.json").write_text(json.dumps(meta, indent=1))
        outputs.clear()
        assert entry is not None
        try:
            os.replace(scratch, entry)  # atomic: a reader sees a whole entry or none
        except OSError:  # another process finished the same entry first: use theirs
            shutil.rmtree(scratch, ignore_errors=True)
        return Activations.load(entry)
    finally:
        if scratch is not None and scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def _file_name(site: str, layer: int | None) -> str:
    return f"{site}.npy" if layer is None else f"{site}@{layer}.npy"


def _allocate(scratch: Path | None, key: tuple[str, int | None], shape: tuple[int, ...], like: torch.Tensor,
              device: torch.device) -> Any:
    if scratch is None:
        return torch.empty(shape, dtype=like.dtype, device=device)
    dtype = np.float16 if like.dtype == torch.float16 else np.float32  # numpy has no bfloat16
    return np.lib.format.open_memmap(scratch / _file_name(*key), mode="w+", dtype=dtype, shape=shape)


def _write(target: Any, start: int, value: torch.Tensor) -> None:
    if isinstance(target, torch.Tensor):
        target[start : start + len(value)] = value
    else:
        target[start : start + len(value)] = value.float().cpu().numpy() if value.dtype == torch.bfloat16 \
            else value.cpu().numpy()
