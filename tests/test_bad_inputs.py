"""The bad-input sweep: every public entry point, driven with inputs a user gets wrong.

One table, :data:`TABLE`, holds every case: the entry point it drives, what is wrong with the
input, the call (on tiny models from ``conftest``), and what must happen: an exception of a given
type whose message names the argument or the cause, raised by mmelkit itself at the entry point (not
a traceback from deep inside torch or transformers), or, for inputs with documented handling, a
result that holds a stated property. Every case also checks that no file the user owns changed:
the files of the ``user`` fixture (checkpoints good and truncated, model folders, a locked folder, a
text file) are hashed before and after, and a refused call must not have written any output.

The public surface is defined mechanically (:func:`public_entry_points`) so a new entry point
cannot slip past: ``__all__`` of the public modules, every registered method and tool, and every
leaf command of the CLI's argparse tree. ``test_every_public_entry_point_is_in_the_table`` fails
when one of them has no row. A new entry point joins by adding a row here.

Decisions this sweep pins down (documented handling rather than errors):

* NaN or infinite pixels are an error wherever images enter (raw images and model input alike):
  a NaN spreads into every map and score without a word, so it is stopped at the door.
* Tensors on another device than the model are moved to the model's device (maps in the metrics
  to the images' device); a tensor that holds no data (the ``meta`` device) is an error.
* One image with many texts, or many images with one text, pairs the single side with every row;
  any other count mismatch is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import math
import re
import shutil
import stat
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, is_dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_OPEN_CLIP, make_hf_clip, make_open_clip, save_hf_clip, tiny_llava

import mmelkit
import mmelkit.bench
import mmelkit.datasets
import mmelkit.methods.architecture as architecture
import mmelkit.methods.data as data_methods
import mmelkit.methods.embedding as embedding
import mmelkit.methods.inference as inference
import mmelkit.methods.layer as layer
import mmelkit.methods.neuron as neuron
import mmelkit.metrics as metrics
import mmelkit.models.vlm as vlm_models
import mmelkit.training.megl as megl
from mmelkit.cli import build_parser, main
from mmelkit.methods.base import REGISTRY, TOOLS

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = Path(mmelkit.__file__).resolve().parent

# -- the public surface ------------------------------------------------------------------------------
# Modules whose __all__ is public API. A new public module joins here.
PUBLIC_MODULES = [mmelkit, metrics, layer, embedding, neuron, inference, mmelkit.datasets, mmelkit.bench, vlm_models,
                  megl]

# Callable public names with no row, each with the reason. Records (dataclasses without validation,
# named tuples) are recognised by :func:`is_record` and need no entry; everything else does.
EXEMPT: dict[str, str] = {
    "mmelkit.ClipAdapter": "made by load_model, whose rows cover its inputs (images and texts go through explain)",
    "mmelkit.VlmAdapter": "made by load_vlm, whose rows cover it",
    "mmelkit.models.vlm.DecodeStream": "made by VlmAdapter.decode_stream for a logits hook; not built by users",
}


def is_record(obj: Any) -> bool:
    """A class that only holds fields: a dataclass without ``__post_init__`` (no validation to
    sweep) or a named tuple. Dataclasses that validate (configs) are entry points and need rows."""
    if not inspect.isclass(obj):
        return False
    if issubclass(obj, tuple) and hasattr(obj, "_fields"):
        return True
    return is_dataclass(obj) and "__post_init__" not in vars(obj)


def cli_commands() -> list[str]:
    """Every leaf command of the ``mmelkit`` argparse tree, as ``"cli:train megl"``."""
    found: list[str] = []

    def walk(parser: Any, prefix: list[str]) -> None:
        subparsers = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subparsers:
            found.append("cli:" + " ".join(prefix))
            return
        for action in subparsers:
            for name, child in action.choices.items():
                walk(child, [*prefix, name])

    walk(build_parser(), [])
    return found


def public_entry_points() -> dict[str, str]:
    """Name -> kind of everything the sweep must cover. An object exported by several modules counts
    once, under the first module of :data:`PUBLIC_MODULES` that exports it (``mmelkit.load_vlm``,
    not ``mmelkit.models.vlm.load_vlm``)."""
    entries: dict[str, str] = {}
    seen = {id(cls) for cls in REGISTRY.values()}  # a method's class is covered by its "method:" entry
    for module in PUBLIC_MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or is_record(obj) or id(obj) in seen:
                continue  # constants, type aliases, records, and names re-exported by a later module
            seen.add(id(obj))
            entries[f"{module.__name__}.{name}"] = "class" if inspect.isclass(obj) else "function"
    entries.update({f"method:{name}": "method" for name in REGISTRY})
    entries.update({f"tool:{name}": "tool" for name in TOOLS})
    entries.update({command: "command" for command in cli_commands()})
    return {name: kind for name, kind in entries.items() if name not in EXEMPT}


# -- fixtures the calls use ---------------------------------------------------------------------------
QUESTIONS = ["is there a red circle ?", "what colour is the star ?"]
ANSWERS = ["yes", "red"]
TEXTS = ["a red square", "a blue circle"]
OUT = "out"  # where commands given a user folder may write; emptied after every case


class Kit:
    """Tiny models and valid inputs, built on first use and shared by the cases (module scope)."""

    @cached_property
    def clip(self) -> mmelkit.ClipAdapter:
        return mmelkit.load_model(make_open_clip(), device="cpu")

    @cached_property
    def images(self) -> torch.Tensor:
        """Two raw images (2, 3, 32, 32) in [0, 1]."""
        return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    @cached_property
    def pixels(self) -> torch.Tensor:
        return self.clip.as_pixels(self.images)

    @cached_property
    def maps(self) -> torch.Tensor:
        return torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(1))

    @cached_property
    def masks(self) -> torch.Tensor:
        masks = torch.zeros(2, 32, 32, dtype=torch.bool)
        masks[:, 8:16, 8:16] = True
        return masks

    def nan_pixels(self) -> torch.Tensor:
        pixels = self.pixels.clone()
        pixels[1, 0, 3, 3] = math.nan
        return pixels

    @cached_property
    def vlm(self) -> mmelkit.VlmAdapter:
        return mmelkit.load_vlm(tiny_llava(seed=1), device="cpu")

    @cached_property
    def vlm_images(self) -> list[np.ndarray]:
        rng = np.random.default_rng(3)
        return [(rng.random((48, 48, 3)) * 255).astype(np.uint8) for _ in QUESTIONS]

    @cached_property
    def target(self) -> Any:
        from mmelkit.methods.answers import answer_target

        return answer_target(self.vlm, self.vlm_images, QUESTIONS, ANSWERS)

    @cached_property
    def decomposition(self) -> Any:
        return embedding.decompose_image(self.clip, self.pixels, tokens=True)

    @cached_property
    def activations(self) -> Any:
        from mmelkit.models.activations import collect_activations

        return collect_activations(self.clip, self.pixels, sites=["cls"], progress=False)

    @cached_property
    def labels(self) -> Any:
        return neuron.label_neurons(torch.rand(6, 4), torch.rand(6, 3), ["red", "blue", "star"])

    @cached_property
    def scenes(self) -> list[Any]:
        world = mmelkit.datasets.SceneWorld(mmelkit.datasets.SceneConfig().scaled(32), seed=0, length=4)
        return [world[i] for i in range(4)]

    @cached_property
    def megl_config(self) -> Any:
        return megl.preset("megl", image_size=16, width=4, train_size=8, steps=1, batch_size=4, checkpoint_every=1)

    @cached_property
    def megl_plain(self) -> Any:
        """The same sizes without textual supervision (no CLIP needed)."""
        return megl.preset("plain", image_size=16, width=4, train_size=8, steps=1, batch_size=4, checkpoint_every=1)

    @cached_property
    def megl_split(self) -> Any:
        return megl.build_split(self.megl_config.task(), "train", 8)

    @cached_property
    def megl_model(self) -> Any:
        from mmelkit.training.megl.trainer import new_model

        return new_model(self.megl_config, torch.device("cpu")).eval()

    @cached_property
    def sae(self) -> Any:
        return embedding.TopKSAE(8, 16, 2, generator=torch.Generator().manual_seed(0))

    @cached_property
    def bench_result(self) -> Any:
        config = mmelkit.bench.BenchConfig(methods=["raw_attention"], metrics=["pointing_game"], samples=2,
                                           batch_size=2)
        return mmelkit.bench.run_bench(self.clip, config, progress=False)


# -- the user's files ----------------------------------------------------------------------------------
def _write_user_files(user: Path) -> None:
    """Checkpoints and folders a user might hand to the loaders: good ones, truncated ones, garbage,
    a folder without permissions. Every case checks that none of them changes."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in make_open_clip().state_dict().items()}
    save_file(state, user / "clip.safetensors")
    torch.save(state, user / "clip.pt")
    for name in ("clip.safetensors", "clip.pt"):
        data = (user / name).read_bytes()
        (user / f"truncated-{name}").write_bytes(data[: len(data) // 2])
    (user / "empty.pt").write_bytes(b"")
    (user / "notes.txt").write_text("a file of the user's that no entry point may touch\n")
    save_hf_clip(make_hf_clip(), user / "hf-clip-truncated")
    weights = next((user / "hf-clip-truncated").glob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:4096])
    llava = tiny_llava(seed=2)
    folder = user / "llava"
    llava.save_pretrained(folder)
    from mmelkit.models.vlm import scene_llava

    vision = llava.config.vision_config
    scene_llava.build_processor(image_size=vision.image_size, patch_size=vision.patch_size).save_pretrained(folder)
    shutil.copytree(folder, user / "llava-truncated")
    weights = user / "llava-truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    shutil.copytree(folder, user / "llava-bad-config")
    (user / "llava-bad-config" / "config.json").write_text("{not json")
    locked = user / "locked"
    locked.mkdir()
    (locked / "config.json").write_text("{}")
    shutil.copy(user / "clip.pt", locked / "clip.pt")
    locked.chmod(0)


def _hashes(user: Path) -> dict[str, str]:
    locked = user / "locked"
    locked.chmod(stat.S_IRWXU)
    try:
        return {str(p.relative_to(user)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(user.rglob("*")) if p.is_file() and p.relative_to(user).parts[0] != OUT}
    finally:
        locked.chmod(0)


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("user")
    _write_user_files(folder)
    yield folder
    (folder / "locked").chmod(stat.S_IRWXU)  # so that pytest can clean up


@pytest.fixture(scope="module")
def kit() -> Kit:
    return Kit()


# -- the CLI as a function ------------------------------------------------------------------------------
class CliError(Exception):
    """A command that exited non-zero: ``code`` and what it wrote to stderr."""

    def __init__(self, code: int, stderr: str) -> None:
        super().__init__(f"exit {code}: {stderr.strip()}")
        self.code = code


def cli(*argv: str) -> str:
    """Run ``mmelkit argv``; return stdout, or raise :class:`CliError` for a non-zero exit (argparse's
    own exits included) so that the table can match the message like any other error."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
    if code:
        raise CliError(code, err.getvalue())
    return out.getvalue()


# -- the table --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One bad input for one entry point.

    ``error``/``match``: the exception type and a regex its message must match (naming the argument
    or the cause). ``error=None``: documented handling; the call must succeed and ``holds(result,
    kit)`` be true. ``skip()``: a reason to skip this row on this machine, or None. ``known``: a
    defect found by the sweep and left to the module's owner; the row then xfails strictly (so it
    fails once the defect is fixed, to be turned into a plain row)."""

    entry: str
    bad: str
    call: Callable[[Kit, Path], Any]
    error: type[BaseException] | None
    match: str = ""
    holds: Callable[[Any, Kit], bool] | None = None
    skip: Callable[[], str | None] | None = None
    known: str = ""

    @property
    def id(self) -> str:
        return f"{self.entry} | {self.bad}"


def _permissions_enforced() -> bool:
    """Whether a file without read permission is unreadable here: not for root (nor for a process
    with CAP_DAC_OVERRIDE), where the permission rows have nothing to test."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        locked = Path(folder) / "locked"
        locked.write_text("x")
        locked.chmod(0)
        try:
            locked.read_text()
        except PermissionError:
            return True
        finally:
            locked.chmod(stat.S_IRWXU)
    return False


PERMISSIONS_ENFORCED = _permissions_enforced()


def root_skip() -> str | None:
    return None if PERMISSIONS_ENFORCED else "permission bits do not stop reads here (root)"


def cuda_skip() -> str | None:
    return "CUDA is available: asking for it is not an error here" if torch.cuda.is_available() else None


def no_cuda_skip() -> str | None:
    return None if torch.cuda.is_available() else "needs CUDA"


def E(entry: str, bad: str, call: Callable[[Kit, Path], Any], error: type[BaseException], match: str,
      skip: Callable[[], str | None] | None = None) -> Case:
    return Case(entry, bad, call, error, match, skip=skip)


def OK(entry: str, bad: str, call: Callable[[Kit, Path], Any], holds: Callable[[Any, Kit], bool],
       skip: Callable[[], str | None] | None = None) -> Case:
    return Case(entry, bad, call, None, holds=holds, skip=skip)


# mmelkit/bench/runner.py belongs to the fault-tolerance work in progress; its input checks are left to it

M = "mmelkit"
MET = "mmelkit.metrics"
LAY = "mmelkit.methods.layer"
EMB = "mmelkit.methods.embedding"
NEU = "mmelkit.methods.neuron"
INF = "mmelkit.methods.inference"
DAT = "mmelkit.datasets"
BEN = "mmelkit.bench"
VLM = "mmelkit.models.vlm"
MEG = "mmelkit.training.megl"

ex = mmelkit.explain


def meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


TABLE: list[Case] = [
    # -- loading -------------------------------------------------------------------------------------
    E(f"{M}.load_model", "unknown zoo name", lambda k, u: mmelkit.load_model("toy-randm"),
      ValueError, r"unknown model 'toy-randm'.*did you mean 'toy-random'"),
    E(f"{M}.load_model", "truncated .safetensors", lambda k, u: mmelkit.load_model(
        TINY_OPEN_CLIP, u / "truncated-clip.safetensors", device="cpu"), ValueError, r"truncated-clip\.safetensors cannot be loaded: it is truncated"),
    E(f"{M}.load_model", "truncated .pt", lambda k, u: mmelkit.load_model(
        TINY_OPEN_CLIP, u / "truncated-clip.pt", device="cpu"), ValueError, r"truncated-clip\.pt cannot be loaded: it is truncated"),
    E(f"{M}.load_model", "empty checkpoint", lambda k, u: mmelkit.load_model(TINY_OPEN_CLIP, u / "empty.pt"),
      ValueError, r"empty\.pt cannot be loaded"),
    E(f"{M}.load_model", "not a checkpoint", lambda k, u: mmelkit.load_model(TINY_OPEN_CLIP, u / "notes.txt"),
      ValueError, r"notes\.txt cannot be loaded"),
    E(f"{M}.load_model", "a folder as checkpoint", lambda k, u: mmelkit.load_model(TINY_OPEN_CLIP, u / "llava"),
      IsADirectoryError, r"checkpoint: .*llava is a folder, not a file"),
    E(f"{M}.load_model", "missing checkpoint", lambda k, u: mmelkit.load_model(TINY_OPEN_CLIP, u / "nowhere.pt"),
      FileNotFoundError, r"checkpoint: .*nowhere\.pt does not exist"),
    E(f"{M}.load_model", "checkpoint of another architecture", lambda k, u: mmelkit.load_model(
        {**TINY_OPEN_CLIP, "embed_dim": 8}, u / "clip.safetensors"), ValueError, r"clip\.safetensors.*does not match"),
    E(f"{M}.load_model", "Hugging Face folder with truncated weights", lambda k, u: mmelkit.load_model(
        str(u / "hf-clip-truncated"), device="cpu"), RuntimeError, r"could not load Hugging Face CLIP .*hf-clip-truncated.*the folder exists but"),
    E(f"{M}.load_model", "model folder without permission", lambda k, u: mmelkit.load_model(str(u / "locked")),
      PermissionError, r"model folder: cannot read the folder .*locked: permission denied", skip=root_skip),
    E(f"{M}.load_model", "checkpoint without permission", lambda k, u: mmelkit.load_model(
        TINY_OPEN_CLIP, u / "locked" / "clip.pt"), PermissionError, r"checkpoint: cannot reach .*locked/clip\.pt",
      skip=root_skip),
    E(f"{M}.load_model", "CUDA on a machine without it", lambda k, u: mmelkit.load_model(make_open_clip(), device="cuda"),
      RuntimeError, r"device 'cuda'.*CUDA is not available", skip=cuda_skip),
    E(f"{M}.load_model", "integer dtype", lambda k, u: mmelkit.load_model(make_open_clip(), dtype=torch.int8),
      TypeError, r"dtype must be a floating-point dtype .*; got torch.int8"),
    E(f"{M}.load_model", "not a model", lambda k, u: mmelkit.load_model(torch.nn.Linear(2, 2)),
      TypeError, r"does not know how to explain a Linear"),
    E(f"{M}.load_vlm", "unknown zoo name", lambda k, u: mmelkit.load_vlm("scene-lava"),
      ValueError, r"unknown VLM 'scene-lava'.*did you mean 'scene-llava'"),
    E(f"{M}.load_vlm", "truncated weights", lambda k, u: mmelkit.load_vlm(u / "llava-truncated", device="cpu"),
      ValueError, r"the VLM in .*llava-truncated cannot be loaded"),
    E(f"{M}.load_vlm", "config.json not JSON", lambda k, u: mmelkit.load_vlm(u / "llava-bad-config", device="cpu"),
      ValueError, r"llava-bad-config/config\.json is not valid JSON"),
    E(f"{M}.load_vlm", "a file, not a folder", lambda k, u: mmelkit.load_vlm(u / "clip.pt"),
      ValueError, r"clip\.pt is a file, not a save_pretrained folder"),
    E(f"{M}.load_vlm", "folder without permission", lambda k, u: mmelkit.load_vlm(u / "locked"),
      PermissionError, r"VLM folder: cannot read the folder .*locked: permission denied", skip=root_skip),
    E(f"{M}.load_vlm", "a CLIP model", lambda k, u: mmelkit.load_vlm(make_open_clip()),
      TypeError, r"load_vlm explains LlavaForConditionalGeneration models; got a CLIP"),
    E(f"{M}.load_vlm", "integer dtype", lambda k, u: mmelkit.load_vlm(u / "llava", dtype=torch.int64),
      TypeError, r"dtype must be a floating-point dtype .*; got torch.int64"),
    E(f"{M}.resolve_device", "unknown device", lambda k, u: mmelkit.resolve_device("tpu"),
      ValueError, r"device 'tpu'"),
    E(f"{M}.resolve_device", "CUDA on a machine without it", lambda k, u: mmelkit.resolve_device("cuda:0"),
      RuntimeError, r"CUDA is not available", skip=cuda_skip),
    OK(f"{M}.list_zoo", "takes no input: lists the short names", lambda k, u: mmelkit.list_zoo(),
       lambda r, k: "toy-random" in r and all(isinstance(v, str) for v in r.values())),
    E(f"{M}.list_methods", "unknown kind", lambda k, u: mmelkit.list_methods("maps"),
      ValueError, r"kind must be 'all', 'map' or 'tool'; got 'maps'.*did you mean 'map'"),

    # -- explain: the inputs every method shares ------------------------------------------------------------
    E(f"{M}.explain", "unknown method", lambda k, u: ex(k.clip, k.images, TEXTS, method="grad_eclp"),
      ValueError, r"unknown method 'grad_eclp'; did you mean 'grad_eclip'"),
    E(f"{M}.explain", "2 images, 3 texts", lambda k, u: ex(k.clip, k.images, [*TEXTS, "x"], method="grad_eclip"),
      ValueError, r"got 2 images and 3 texts"),
    OK(f"{M}.explain", "one image, many texts: pairs the image with each", lambda k, u: ex(
        k.clip, k.images[:1], TEXTS, method="grad_eclip"), lambda r, k: r.maps.shape == (2, 4, 4)),
    E(f"{M}.explain", "empty batch (tensor)", lambda k, u: ex(k.clip, k.pixels[:0], TEXTS),
      ValueError, r"images are an empty batch"),
    E(f"{M}.explain", "empty batch (list)", lambda k, u: ex(k.clip, [], TEXTS), ValueError, r"no images given"),
    E(f"{M}.explain", "no texts", lambda k, u: ex(k.clip, k.images, []), ValueError, r"no texts given"),
    E(f"{M}.explain", "texts not strings", lambda k, u: ex(k.clip, k.images, [1, 2]),
      TypeError, r"texts must be strings; got int"),
    E(f"{M}.explain", "NaN in model input", lambda k, u: ex(k.clip, k.nan_pixels(), TEXTS),
      ValueError, r"images hold NaN or infinite values at rows \[1\]"),
    E(f"{M}.explain", "inf in a raw image", lambda k, u: ex(k.clip, k.images[0].clone().fill_(math.inf), TEXTS[:1]),
      ValueError, r"image contains NaN or infinite values"),
    E(f"{M}.explain", "integer images", lambda k, u: ex(k.clip, (k.images * 9).long(), TEXTS),
      TypeError, r"unsupported image dtype torch.int64"),
    E(f"{M}.explain", "images on the meta device", lambda k, u: ex(k.clip, meta(k.pixels), TEXTS),
      ValueError, r"images are on the meta device"),
    OK(f"{M}.explain", "images on CUDA, model on the CPU: moved to the model", lambda k, u: ex(
        k.clip, k.pixels.cuda(), TEXTS, method="grad_eclip"), lambda r, k: r.maps.device.type == "cpu",
       skip=no_cuda_skip),
    E(f"{M}.explain", "a VLM method on a CLIP", lambda k, u: ex(k.clip, k.images, TEXTS, method="answer_attention"),
      ValueError, r"method 'answer_attention' explains generative VLMs"),
    E(f"{M}.explain", "answer= on a CLIP", lambda k, u: ex(k.clip, k.images, TEXTS, answer="yes"),
      ValueError, r"answer= and token= apply to generative VLMs"),
    E(f"{M}.explain", "unknown parameter", lambda k, u: ex(k.clip, k.images, TEXTS, method="grad_eclip", layer=2),
      TypeError, r"grad_eclip has no parameter\(s\) \['layer'\].*did you mean 'layers'"),
    E(f"{M}.explain", "VLM: 2 images, 3 questions", lambda k, u: ex(k.vlm, k.vlm_images, [*QUESTIONS, "x ?"]),
      ValueError, r"got 2 images and 3 questions"),
    E(f"{M}.explain", "VLM: token out of range", lambda k, u: ex(k.vlm, k.vlm_images, QUESTIONS, answer=ANSWERS,
                                                                  token=5), ValueError, r"token=5 lies outside the answer span"),

    # -- each registered method: its own parameters -----------------------------------------------------------
    E("method:grad_eclip", "layers=0", lambda k, u: ex(k.clip, k.images, TEXTS, method="grad_eclip", layers=0),
      ValueError, r"layers must lie in 1\.\.2; got 0"),
    E("method:grad_eclip", "unknown mode", lambda k, u: ex(k.clip, k.images, TEXTS, method="grad_eclip", mode="faithfull"),
      ValueError, r"mode.*did you mean 'faithful'"),
    E("method:mmel", "tau=0", lambda k, u: ex(k.clip, k.images, TEXTS, method="mmel", layers=2, tau=0.0),
      ValueError, r"tau must be positive"),
    E("method:mmel", "gamma outside [0, 1]", lambda k, u: ex(k.clip, k.images, TEXTS, method="mmel", layers=2, gamma=2.0),
      ValueError, r"gamma must lie in \[0, 1\]"),
    E("method:raw_attention", "block out of range", lambda k, u: ex(k.clip, k.images, TEXTS, method="raw_attention",
                                                                    block=9), IndexError, r"index 9 is out of range"),
    E("method:rollout", "start_layer out of range", lambda k, u: ex(k.clip, k.images, TEXTS, method="rollout",
                                                                    start_layer=9),
      IndexError, r"start_layer 9 is out of range: the image tower has 2 blocks"),
    E("method:generic_attention", "start_layer out of range", lambda k, u: ex(
        k.clip, k.images, TEXTS, method="generic_attention", start_layer=-9), IndexError, r"start_layer -9 is out of range"),
    E("method:grad_cam", "block out of range", lambda k, u: ex(k.clip, k.images, TEXTS, method="grad_cam", block=9),
      IndexError, r"index 9 is out of range"),
    E("method:grad_cam", "unknown where", lambda k, u: ex(k.clip, k.images, TEXTS, method="grad_cam", where="inpt"),
      ValueError, r"where.*did you mean 'input'"),
    E("method:integrated_gradients", "steps=0", lambda k, u: ex(k.clip, k.images, TEXTS, method="integrated_gradients",
                                                                steps=0), ValueError, r"steps must be an integer >= 1"),
    E("method:smoothgrad", "noise < 0", lambda k, u: ex(k.clip, k.images, TEXTS, method="smoothgrad", noise=-0.1),
      ValueError, r"noise must be a number >= 0"),
    E("method:occlusion", "window larger than the image", lambda k, u: ex(k.clip, k.images, TEXTS, method="occlusion",
                                                                          window=99), ValueError, r"window must lie in 1\.\.32"),
    E("method:rise", "masks=0", lambda k, u: ex(k.clip, k.images, TEXTS, method="rise", masks=0),
      ValueError, r"masks must be an integer >= 1"),
    E("method:maskclip", "2 images, 3 texts", lambda k, u: ex(k.clip, k.images, [*TEXTS, "x"], method="maskclip"),
      ValueError, r"got 2 images and 3 texts"),
    E("method:clip_surgery", "layers=0", lambda k, u: ex(k.clip, k.images, TEXTS, method="clip_surgery", layers=0),
      ValueError, r"layers must lie in 1\.\.2; got 0"),
    E("method:head_text_map", "head out of range", lambda k, u: ex(k.clip, k.images, TEXTS, method="head_text_map",
                                                                   heads=[9]), IndexError, r"head 9 is out of range"),
    E("method:grad_eclip_text", "layers=0", lambda k, u: ex(k.clip, k.images, TEXTS, method="grad_eclip_text",
                                                            layers=0), ValueError, r"layers must be None or an int in 1\.\.2"),
    E("method:integrated_gradients_text", "unknown baseline", lambda k, u: ex(
        k.clip, k.images, TEXTS, method="integrated_gradients_text", baseline="zeros"),
      ValueError, r"baseline.*did you mean 'zero'"),
    E("method:leave_one_word_out", "batch_size=0", lambda k, u: ex(k.clip, k.images, TEXTS, method="leave_one_word_out",
                                                                   batch_size=0), ValueError, r"batch_size must be"),
    E("method:answer_attention", "layer out of range", lambda k, u: ex(k.vlm, k.vlm_images, QUESTIONS,
                                                                       method="answer_attention", layers=[9]),
      ValueError, r"layers: decoder tower has 2 blocks; index 9 is out of range"),
    E("method:answer_gradient_x_input", "unknown sign", lambda k, u: ex(
        k.vlm, k.vlm_images, QUESTIONS, method="answer_gradient_x_input", sign="abs"),
      ValueError, r"sign.*did you mean 'absolute'"),
    E("method:answer_integrated_gradients", "steps=0", lambda k, u: ex(
        k.vlm, k.vlm_images, QUESTIONS, method="answer_integrated_gradients", steps=0), ValueError, r"steps must be"),
    E("method:answer_occlusion", "window=0", lambda k, u: ex(k.vlm, k.vlm_images, QUESTIONS, method="answer_occlusion",
                                                             window=0), ValueError, r"window must be"),
    E("method:answer_relevancy", "answers for 3 rows, 2 questions", lambda k, u: ex(
        k.vlm, k.vlm_images, QUESTIONS, method="answer_relevancy", answer=[*ANSWERS, "no"]), ValueError, r"got 3 answers for 2 rows"),
]

TABLE += [
    # -- metrics -----------------------------------------------------------------------------------------------
    E(f"{MET}.deletion_curves", "steps=0", lambda k, u: metrics.deletion_curves(k.clip, k.pixels, TEXTS, k.maps, steps=0),
      ValueError, r"steps must be an integer >= 1; got 0"),
    E(f"{MET}.deletion_curves", "NaN in a map", lambda k, u: metrics.deletion_curves(
        k.clip, k.pixels, TEXTS, k.maps.clone().fill_(math.nan)), ValueError, r"maps \[0, 1\] contain NaN"),
    E(f"{MET}.deletion_curves", "maps on the meta device", lambda k, u: metrics.deletion_curves(
        k.clip, k.pixels, TEXTS, meta(k.maps)), ValueError, r"maps are on the meta device"),
    E(f"{MET}.insertion_curves", "maps (h, w) without a batch", lambda k, u: metrics.insertion_curves(
        k.clip, k.pixels, TEXTS, k.maps[0]), ValueError, r"maps must have shape \(N, h, w\)"),
    E(f"{MET}.insertion_curves", "NaN images", lambda k, u: metrics.insertion_curves(k.clip, k.nan_pixels(), TEXTS,
                                                                                      k.maps), ValueError, r"images hold NaN"),
    E(f"{MET}.perturbation_curves", "unknown mode", lambda k, u: metrics.perturbation_curves(
        k.clip, k.pixels, TEXTS, k.maps, mode="delete"), ValueError, r"mode.*did you mean 'deletion'"),
    E(f"{MET}.perturbation_curves", "unknown substrate", lambda k, u: metrics.perturbation_curves(
        k.clip, k.pixels, TEXTS, k.maps, substrate="blak"), ValueError, r"substrate.*did you mean 'black'"),
    E(f"{MET}.confidence_change", "3 maps for 2 images", lambda k, u: metrics.confidence_change(
        k.clip, k.pixels, TEXTS, torch.rand(3, 4, 4)), ValueError, r"got 3 maps for 2 images"),
    E(f"{MET}.retrieval_protocol", "fractions outside [0, 1]", lambda k, u: metrics.retrieval_protocol(
        k.clip, k.pixels, TEXTS, k.maps, fractions=[0.0, 1.5]), ValueError, r"fractions must lie in \[0, 1\]"),
    E(f"{MET}.retrieval_protocol", "k=0", lambda k, u: metrics.retrieval_protocol(k.clip, k.pixels, TEXTS, k.maps, k=0),
      ValueError, r"k must be an integer >= 1"),
    E(f"{MET}.retrieval_recall", "features for 3 images, 2 texts", lambda k, u: metrics.retrieval_recall(
        torch.rand(3, 2, 16), TEXTS, torch.rand(2, 16), TEXTS), ValueError, r"image features .* must be \(N, S, E\)"),
    E(f"{MET}.pointing_game", "negative tolerance", lambda k, u: metrics.pointing_game(
        k.masks.float(), k.masks, tolerance=-1), ValueError, r"tolerance must be a non-negative integer \(pixels\)"),
    E(f"{MET}.pointing_game", "unknown ties", lambda k, u: metrics.pointing_game(k.masks.float(), k.masks, ties="expect"),
      ValueError, r"ties.*did you mean 'expected'"),
    E(f"{MET}.energy_pointing_game", "float masks", lambda k, u: metrics.energy_pointing_game(
        k.masks.float(), k.masks.float()), ValueError, r"masks must be a bool tensor; got torch.float32"),
    E(f"{MET}.mask_iou", "threshold above 1", lambda k, u: metrics.mask_iou(k.masks.float(), k.masks, threshold=2.0),
      ValueError, r"threshold must be a number in \(0, 1\]; got 2\.0"),
    E(f"{MET}.mask_precision", "top_fraction above 1", lambda k, u: metrics.mask_precision(
        k.masks.float(), k.masks, top_fraction=1.5), ValueError, r"top_fraction"),
    E(f"{MET}.mask_recall", "empty mask", lambda k, u: metrics.mask_recall(
        k.masks.float(), torch.zeros_like(k.masks)), ValueError, r"at least one pixel"),
    E(f"{MET}.mask_auroc", "maps and masks of different sizes", lambda k, u: metrics.mask_auroc(
        torch.rand(2, 16, 16), k.masks), ValueError, r"maps \(2, 16, 16\) and masks \(2, 32, 32\)"),
    E(f"{MET}.mask_auroc", "NaN in a map", lambda k, u: metrics.mask_auroc(
        torch.full((2, 32, 32), math.nan), k.masks), ValueError, r"maps hold NaN"),
    E(f"{MET}.box_masks", "float boxes", lambda k, u: metrics.box_masks(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), (8, 8)),
      ValueError, r"boxes must be an integer tensor"),
    E(f"{MET}.auroc", "positives not bool", lambda k, u: metrics.auroc(torch.rand(4, 2), torch.ones(4, 3)),
      TypeError, r"positives must be a bool tensor"),
    E(f"{MET}.auroc", "no images", lambda k, u: metrics.auroc(torch.rand(0, 2), torch.ones(0, 3, dtype=torch.bool)),
      ValueError, r"no images"),
    E(f"{MET}.binary_auroc", "one class only", lambda k, u: metrics.binary_auroc(
        torch.rand(4), torch.ones(4, dtype=torch.bool)), ValueError, r"needs both classes"),
    E(f"{MET}.binary_auroc", "NaN scores", lambda k, u: metrics.binary_auroc(
        torch.tensor([0.1, math.nan, 0.3, 0.4]), torch.tensor([True, False, True, False])),
      ValueError, r"scores hold NaN"),
    E(f"{MET}.detector_auroc", "signal for 3 answers, labels for 2", lambda k, u: metrics.detector_auroc(
        torch.rand(3, 2), torch.tensor([True, False])), ValueError, r"signal must be \(N, layers\)"),
    E(f"{MET}.chair_scores", "3 captions, 2 object lists", lambda k, u: metrics.chair_scores(
        ["a", "b", "c"], [["x"], ["y"]], lambda text: []), ValueError, r"3 captions for 2 object lists"),
    E(f"{MET}.parse_yes_no", "not a string", lambda k, u: metrics.parse_yes_no(None),
      TypeError, r"answer must be a string; got NoneType"),
    E(f"{MET}.pope_scores", "an answer that is not yes/no", lambda k, u: metrics.pope_scores(["yes"], ["maybe"]),
      ValueError, r"ground-truth answers must be 'yes' or 'no'"),
    E(f"{MET}.resolve_metrics", "unknown metric", lambda k, u: metrics.resolve_metrics("deletion_aux"),
      ValueError, r"unknown metric 'deletion_aux'; did you mean 'deletion_auc'"),
    E(f"{MET}.resolve_metrics", "nothing", lambda k, u: metrics.resolve_metrics([]), ValueError, r"no metrics given"),
    E(f"{MET}.scene_pointing_game", "unknown method", lambda k, u: metrics.scene_pointing_game(
        k.clip, ["grad_eclp"], num_scenes=2, progress=False), ValueError, r"unknown method 'grad_eclp'; did you mean"),
    E(f"{MET}.scene_pointing_game", "num_scenes=0", lambda k, u: metrics.scene_pointing_game(
        k.clip, ["raw_attention"], num_scenes=0, progress=False), ValueError, r"num_scenes must be an integer >= 1"),
    E(f"{MET}.TextScore", "temperature=0", lambda k, u: metrics.TextScore("softmax", temperature=0.0),
      ValueError, r"temperature must be positive"),
    E(f"{MET}.TextScore", "unknown kind", lambda k, u: metrics.TextScore("cosin"),
      ValueError, r"did you mean 'cosine'"),

    # -- layer tools ----------------------------------------------------------------------------------------------
    E(f"{LAY}.attention_knockout", "window=0", lambda k, u: layer.attention_knockout(k.vlm, k.target, window=0),
      ValueError, r"window must be an integer >= 1"),
    E("tool:attention_knockout", "keys of the wrong shape", lambda k, u: layer.attention_knockout(
        k.vlm, k.target, keys=torch.zeros(2, 3, dtype=torch.bool)), ValueError, r"keys must be an \(N, V\)"),
    E(f"{LAY}.causal_trace", "noise_scale=0", lambda k, u: layer.causal_trace(k.vlm, k.target, noise_scale=0.0),
      ValueError, r"noise_scale must be positive"),
    E("tool:causal_trace", "tokens not bool", lambda k, u: layer.causal_trace(
        k.vlm, k.target, tokens=torch.zeros(2, k.vlm.num_visual_tokens)), ValueError, r"tokens must be an \(N, V\)"),
    E("tool:causal_trace", "tokens and corrupted images together", lambda k, u: layer.causal_trace(
        k.vlm, k.target, tokens=torch.ones(2, k.vlm.num_visual_tokens, dtype=torch.bool),
        corrupted_images=k.target.batch.pixel_values), ValueError, r"tokens .* or corrupted_images, not both"),
    E("tool:causal_trace", "one corrupted image for two rows", lambda k, u: layer.causal_trace(
        k.vlm, k.target, corrupted_images=k.target.batch.pixel_values[:1]), ValueError,
      r"corrupted_images must give one image per row"),
    E(f"{LAY}.logit_lens", "k=0", lambda k, u: layer.logit_lens(k.vlm, k.target, k=0),
      ValueError, r"k must be an integer >= 1"),
    E("tool:logit_lens", "not a target", lambda k, u: layer.logit_lens(k.vlm, "yes"), TypeError, r"VlmBatch.*got str"),
    E(f"{LAY}.knocked_out", "layer out of range", lambda k, u: layer.knocked_out(k.vlm, {9: torch.zeros(1)}).__enter__(),
      IndexError, r"decoder layer\(s\) \[9\]; the decoder has 2 layers"),
    E(f"{LAY}.clip_logit_lens", "label out of range", lambda k, u: layer.clip_logit_lens(
        k.clip, k.pixels, TEXTS, [0, 5], progress=False), ValueError, r"labels must index the 2 class texts"),
    E("tool:clip_logit_lens", "no class texts", lambda k, u: layer.clip_logit_lens(
        k.clip, k.pixels, [], [0, 0], progress=False), ValueError, r"no class texts given"),
    E(f"{LAY}.layer_ablation", "unknown part", lambda k, u: layer.layer_ablation(
        k.clip, k.pixels, TEXTS, [0, 1], parts=["attention", "mpl"]), ValueError, r"unknown part 'mpl'; did you mean 'mlp'"),
    E(f"{LAY}.layer_ablation", "3 labels for 2 images", lambda k, u: layer.layer_ablation(
        k.clip, k.pixels, TEXTS, [0, 1, 0]), ValueError, r"labels must be one integer per image \(2\)"),
    E("tool:layer_ablation", "layer out of range", lambda k, u: layer.layer_ablation(
        k.clip, k.pixels, TEXTS, [0, 1], layers=[5]), IndexError, r"image tower has 2 blocks; index 5 is out of range"),
    E("tool:layer_ablation", "ablated layer out of range", lambda k, u: layer.layer_ablation(
        k.clip, k.pixels, TEXTS, [0, 1], ablate=[(-3, "mlp")]), IndexError, r"2 blocks; layer -3 is out of range"),
    E("tool:layer_ablation", "no class texts", lambda k, u: layer.layer_ablation(
        k.clip, k.pixels, [], [0, 0]), ValueError, r"class_texts must be a non-empty list"),
    E(f"{LAY}.branch_means", "batch_size=0", lambda k, u: layer.branch_means(k.clip, k.pixels, batch_size=0),
      ValueError, r"batch_size must be an integer >= 1"),
    E(f"{LAY}.mean_ablated", "unknown part", lambda k, u: layer.mean_ablated(
        k.clip, layer.branch_means(k.clip, k.pixels), [(0, "atention")]).__enter__(), ValueError,
      r"unknown part 'atention'; did you mean 'attention'"),
    E(f"{LAY}.mean_ablated", "means that are not BranchMeans", lambda k, u: layer.mean_ablated(
        k.clip, torch.zeros(2, 17, 32), [(0, "mlp")]).__enter__(), TypeError, r"means must be BranchMeans"),
    E(f"{LAY}.fit_ridge_probe", "NaN features", lambda k, u: layer.fit_ridge_probe(
        torch.full((4, 3), math.nan), torch.tensor([0, 1, 0, 1])), ValueError, r"features hold NaN"),
    E(f"{LAY}.fit_ridge_probe", "float labels", lambda k, u: layer.fit_ridge_probe(torch.rand(4, 3), torch.rand(4)),
      ValueError, r"labels must be non-negative integer class indices"),
    E(f"{LAY}.layer_probes", "unknown task", lambda k, u: layer.layer_probes(k.clip, ["colr"], progress=False),
      ValueError, r"unknown or no probe tasks \['colr'\]; did you mean 'colour'"),
    E("tool:layer_probes", "train_count=0", lambda k, u: layer.layer_probes(k.clip, ["colour"], train_count=0,
                                                                             progress=False), ValueError, r"train_count must be an integer >= 1"),
    E(f"{LAY}.probe_layers", "labels for another number of images", lambda k, u: layer.probe_layers(
        k.activations, torch.tensor([0, 1, 0]), k.activations, torch.tensor([0, 1])),
      ValueError, r"labels \(N,\); got \(2, 32\) and \(3,\)"),

    # -- embedding tools ---------------------------------------------------------------------------------------------
    E(f"{EMB}.TopKSAE", "k > n_features", lambda k, u: embedding.TopKSAE(8, 4, 5),
      ValueError, r"k \(5\) cannot exceed n_features \(4\)"),
    E(f"{EMB}.train_sae", "NaN activations", lambda k, u: embedding.train_sae(
        torch.full((8, 4), math.nan), embedding.SaeConfig(n_features=8, k=2), progress=False),
      ValueError, r"activations hold NaN or infinite values in 8 of 8 rows"),
    E(f"{EMB}.train_sae", "k=0 in the config", lambda k, u: embedding.train_sae(
        torch.rand(8, 4), embedding.SaeConfig(n_features=8, k=0), progress=False), ValueError, r"k must be an integer"),
    E(f"{EMB}.train_sae", "a user's file as checkpoint", lambda k, u: embedding.train_sae(
        torch.rand(8, 4), embedding.SaeConfig(n_features=8, k=2, steps=1), checkpoint=u / "notes.txt", progress=False),
      ValueError, r"notes\.txt cannot be loaded"),
    E(f"{EMB}.sae_on_model", "unknown site", lambda k, u: embedding.sae_on_model(k.clip, k.pixels, site="embeding",
                                                                                 progress=False),
      ValueError, r"site.*did you mean 'embedding'"),
    E("tool:sparse_autoencoder", "batch_size=0", lambda k, u: embedding.sae_on_model(
        k.clip, k.pixels, batch_size=0, progress=False), ValueError, r"batch_size must be an integer >= 1"),
    E(f"{EMB}.score_dictionary", "presence for another number of rows", lambda k, u: embedding.score_dictionary(
        k.sae, torch.rand(6, 8), torch.ones(5, 2, dtype=torch.bool)), ValueError, r"presence has 5 rows"),
    E(f"{EMB}.decompose_image", "NaN images", lambda k, u: embedding.decompose_image(k.clip, k.nan_pixels()),
      ValueError, r"images hold NaN"),
    E("tool:residual_decomposition", "batch_size=0", lambda k, u: embedding.decompose_image(
        k.clip, k.pixels, batch_size=0), ValueError, r"batch_size must be an integer >= 1"),
    E(f"{EMB}.head_ablation", "3 labels for 2 images", lambda k, u: embedding.head_ablation(
        k.clip, k.pixels, TEXTS, [0, 1, 0]), ValueError, r"labels must be one integer per image"),
    E("tool:head_ablation", "head out of range", lambda k, u: embedding.head_ablation(
        k.clip, k.pixels, TEXTS, [0, 1], ablate=[(0, 9)]), IndexError, r"head 9 is out of range"),
    E(f"{EMB}.mean_ablate_heads", "class features of another width", lambda k, u: embedding.mean_ablate_heads(
        k.decomposition, torch.rand(2, 5), [0, 1]), ValueError, r"class_text_features have width 5"),
    E(f"{EMB}.linearised_head", "std of another batch size", lambda k, u: embedding.linearised_head(
        torch.rand(2, 3, 32), torch.rand(5), None, None), ValueError, r"std must hold one value per image"),
    OK(f"{EMB}.scene_text_pool", "takes no input: the scene world's texts", lambda k, u: embedding.scene_text_pool(),
       lambda r, k: len(r) > 10 and all(isinstance(t, str) for t in r)),
    E(f"{EMB}.text_span", "m=0", lambda k, u: embedding.text_span(torch.rand(4, 8), torch.rand(3, 8), 0, ["a", "b", "c"]),
      ValueError, r"m must be an integer >= 1"),
    E(f"{EMB}.text_span", "features on two devices", lambda k, u: embedding.text_span(
        torch.rand(4, 8), meta(torch.rand(3, 8)), 2, ["a", "b", "c"]),
      ValueError, r"got head_outputs on cpu, text_features on meta"),
    E(f"{EMB}.text_span", "texts for other features", lambda k, u: embedding.text_span(
        torch.rand(4, 8), torch.rand(3, 8), 2, ["a", "b"]), ValueError, r"2 texts for 3 text features"),
    E(f"{EMB}.text_span_heads", "no texts", lambda k, u: embedding.text_span_heads(k.decomposition, k.clip, texts=[]),
      ValueError, r"the text pool is empty"),
    E("tool:text_span", "m=0", lambda k, u: embedding.text_span_heads(k.decomposition, k.clip, texts=TEXTS, m=0),
      ValueError, r"m must be an integer >= 1"),
    E(f"{EMB}.tcav", "runs=0", lambda k, u: embedding.tcav(k.clip, k.pixels, "a star", k.pixels, k.pixels, 0, runs=0,
                                                           progress=False), ValueError, r"runs must be an integer >= 1"),
    E("tool:tcav", "no concept images", lambda k, u: embedding.tcav(k.clip, k.pixels, "a star", k.pixels[:0], k.pixels,
                                                                    0, progress=False),
      ValueError, r"concept images|no positive images|empty"),
    E(f"{EMB}.tcav_from_gradients", "gradients of another width", lambda k, u: embedding.tcav_from_gradients(
        torch.rand(4, 5), torch.rand(3, 8), torch.rand(3, 8)), ValueError, r"direction must be \(D,\) or \(R, D\) with D = 5"),
    E(f"{EMB}.tcav_score", "direction of another width", lambda k, u: embedding.tcav_score(torch.rand(4, 8),
                                                                                          torch.rand(5)),
      ValueError, r"direction must be \(D,\) or \(R, D\) with D = 8"),
    E(f"{EMB}.concept_direction", "no concept images", lambda k, u: embedding.concept_direction(
        torch.rand(0, 8), torch.rand(3, 8), concept="red"), ValueError, r"concept 'red' has no positive images"),
    E(f"{EMB}.class_score_gradients", "layer out of range", lambda k, u: embedding.class_score_gradients(
        k.clip, k.pixels, "a star", 9), IndexError, r"index 9 is out of range"),

    # -- architecture tools ----------------------------------------------------------------------------------------
    E("tool:concept_bottleneck", "empty concept list", lambda k, u: architecture.concept_bottleneck(
        k.clip, k.images, [0, 1], []), ValueError, r"concepts is empty"),
    E("tool:concept_bottleneck", "labels of the wrong length", lambda k, u: architecture.concept_bottleneck(
        k.clip, k.images, [0, 1, 1], TEXTS), ValueError, r"labels must give one class per image \(2\); got 3"),
    E("tool:concept_bottleneck", "alpha outside [0, 1]", lambda k, u: architecture.concept_bottleneck(
        k.clip, k.images, [0, 1], TEXTS, alpha=1.5), ValueError, r"alpha must be a number in \[0, 1\]; got 1.5"),
    E("tool:concept_bottleneck", "negative lam", lambda k, u: architecture.concept_bottleneck(
        k.clip, k.images, [0, 1], TEXTS, lam=-0.1), ValueError, r"lam must be a finite number >= 0; got -0.1"),
    E("tool:concept_bottleneck", "a class without examples", lambda k, u: architecture.concept_bottleneck(
        k.clip, k.images, [0, 1], TEXTS, ["circle", "square", "star"]), ValueError,
      r"class 2 \('star'\) has no examples"),

    # -- neuron tools ----------------------------------------------------------------------------------------------
    E(f"{NEU}.clip_dissect", "unknown method", lambda k, u: neuron.clip_dissect(
        k.clip, k.pixels, 0, ["red", "blue"], method="soft-wpmi", progress=False),
      ValueError, r"did you mean 'soft_wpmi'"),
    E("tool:clip_dissect", "layer out of range", lambda k, u: neuron.clip_dissect(
        k.clip, k.pixels, 9, ["red", "blue"], progress=False), IndexError, r"index 9 is out of range"),
    E(f"{NEU}.label_neurons", "names for another number of concepts", lambda k, u: neuron.label_neurons(
        torch.rand(6, 4), torch.rand(6, 3), ["red"]), ValueError, r"similarity has 3 concept columns but 1"),
    E(f"{NEU}.soft_wpmi", "NaN activations", lambda k, u: neuron.soft_wpmi(torch.full((6, 4), math.nan),
                                                                           torch.rand(6, 3)),
      ValueError, r"activations hold non-finite values"),
    E(f"{NEU}.cos_cubed", "activations and similarity over different images", lambda k, u: neuron.cos_cubed(
        torch.rand(6, 4), torch.rand(5, 3)), ValueError, r"same N images"),
    E(f"{NEU}.true_neuron_concepts", "presence not bool", lambda k, u: neuron.true_neuron_concepts(
        torch.rand(6, 4), torch.rand(6, 3)), TypeError, r"must be a bool tensor \(concept presence\)"),
    E(f"{NEU}.label_match_rate", "truth for another number of neurons", lambda k, u: neuron.label_match_rate(
        k.labels, torch.zeros(9, dtype=torch.long)), ValueError, r"truth_index has 9 entries"),

    # -- data tools ------------------------------------------------------------------------------------------------
    E("tool:tracin", "empty bank", lambda k, u: data_methods.tracin(k.clip, [], k.images, TEXTS),
      ValueError, r"the training bank is empty"),
    E("tool:tracin", "unknown parameter name", lambda k, u: data_methods.tracin(
        k.clip, list(zip(k.images, TEXTS, strict=True)), k.images, TEXTS, parameters=["visual.prj"], k=1),
      ValueError, r"unknown parameter 'visual.prj'; did you mean 'visual.proj'"),
    E("tool:tracin", "learning rate 0", lambda k, u: data_methods.tracin(
        k.clip, list(zip(k.images, TEXTS, strict=True)), k.images, TEXTS, checkpoints=[(k.clip, 0.0)], k=1),
      ValueError, r"checkpoints\[0\] learning rate must be a positive finite number; got 0.0"),
    E("tool:tracin", "k larger than the bank", lambda k, u: data_methods.tracin(
        k.clip, list(zip(k.images, TEXTS, strict=True)), k.images, TEXTS, k=3), ValueError, r"k must lie in 1..2 \(the bank's size\); got 3"),

    # -- inference tools -------------------------------------------------------------------------------------------
    E(f"{INF}.classify_by_description", "a class without descriptors", lambda k, u: inference.classify_by_description(
        k.clip, k.images, {"circle": ["is round"], "square": []}), ValueError,
      r"descriptions\['square'\] must be a non-empty list"),
    E("tool:classify_by_description", "descriptions as a list", lambda k, u: inference.classify_by_description(
        k.clip, k.images, ["is round"]), ValueError, r"descriptions must be a non-empty mapping"),
    E(f"{INF}.classify_by_description", "template without {desc}", lambda k, u: inference.classify_by_description(
        k.clip, k.images, {"circle": ["is round"]}, template="a {cls}"), ValueError, r"template must contain \{desc\}"),
    E(f"{INF}.classify_by_description", "NaN images", lambda k, u: inference.classify_by_description(
        k.clip, k.nan_pixels(), {"circle": ["is round"]}), ValueError, r"NaN"),
    E(f"{INF}.classify_by_description", "rationale of an image that is not there", lambda k, u: inference.classify_by_description(
        k.clip, k.images, {"circle": ["is round"]}).rationale(7), IndexError, r"image 7 out of range for 2 images"),
    E(f"{INF}.VisualContrastiveDecoding", "alpha < 0", lambda k, u: inference.VisualContrastiveDecoding(k.vlm, alpha=-1),
      ValueError, r"alpha must be a finite number >= 0"),
    E(f"{INF}.VisualContrastiveDecoding", "NaN beta", lambda k, u: inference.VisualContrastiveDecoding(
        k.vlm, beta=math.nan), ValueError, r"beta must be a number in \[0, 1\]"),
    E(f"{INF}.distort_pixels", "noise above 1", lambda k, u: inference.distort_pixels(torch.rand(1, 3, 8, 8), noise=1.5),
      ValueError, r"noise must be a number in \[0, 1\]"),
    E(f"{INF}.vcd_logits", "logits of different shapes", lambda k, u: inference.vcd_logits(torch.rand(2, 5),
                                                                                          torch.rand(2, 6)),
      ValueError, r"clean \(2, 5\) and distorted \(2, 6\) logits differ in shape"),
    E(f"{INF}.vcd_logits", "logits on two devices", lambda k, u: inference.vcd_logits(torch.rand(2, 5),
                                                                                  meta(torch.rand(2, 5))),
      ValueError, r"tensors must be on one device; got clean on cpu, distorted on meta"),
    E(f"{INF}.visual_attention_share", "2 images, 3 questions", lambda k, u: inference.visual_attention_share(
        k.vlm, k.vlm_images, [*QUESTIONS, "x ?"]), ValueError, r"got 2 images and 3 questions"),
    E(f"{INF}.visual_attention_share", "token out of range", lambda k, u: inference.visual_attention_share(
        k.vlm, k.vlm_images, QUESTIONS, ANSWERS, token=7), ValueError, r"token=7 lies outside the answer span"),
]

TABLE += [
    # -- datasets ---------------------------------------------------------------------------------------------------
    E(f"{DAT}.SceneWorld", "negative seed", lambda k, u: mmelkit.datasets.SceneWorld(seed=-1),
      ValueError, r"seed must be a non-negative"),
    E(f"{DAT}.SceneWorld", "negative length", lambda k, u: mmelkit.datasets.SceneWorld(length=-1),
      ValueError, r"length must be a non-negative integer; got -1"),
    E(f"{DAT}.SceneWorld", "negative index", lambda k, u: mmelkit.datasets.SceneWorld(length=2)[-1],
      IndexError, r"non-negative"),
    OK(f"{DAT}.SceneWorld", "index past the length: drawn (length only bounds iteration)",
       lambda k, u: mmelkit.datasets.SceneWorld(length=2)[5], lambda r, k: r.index == 5),
    E(f"{DAT}.SceneWorld", "erasing an object the scene lacks", lambda k, u: mmelkit.datasets.SceneWorld()[0].erased(
        [99]), IndexError, r"objects \[99\] do not exist in scene 0"),
    E(f"{DAT}.RealPhotos", "erasing an object of a photo", lambda k, u: mmelkit.datasets.RealPhotos()[0].erased([0]),
      ValueError, r"no background layer to paint with"),
    E(f"{DAT}.SceneConfig", "image_size below 16", lambda k, u: mmelkit.datasets.SceneConfig(image_size=8),
      ValueError, r"image_size must be at least 16"),
    E(f"{DAT}.SceneConfig", "unknown colour", lambda k, u: mmelkit.datasets.SceneConfig(colours=("red", "bleu")),
      ValueError, r"unknown shapes/colours \['bleu'\]"),
    E(f"{DAT}.SceneQA", "unknown kind", lambda k, u: mmelkit.datasets.SceneQA(kind="existance"),
      ValueError, r"kind must be one of .*; got 'existance'. did you mean 'existence'"),
    E(f"{DAT}.SceneQA", "negative length", lambda k, u: mmelkit.datasets.SceneQA(length=-1),
      ValueError, r"length must be a non-negative integer; got -1"),
    E(f"{DAT}.VqaConfig", "co_occurrence above 1", lambda k, u: mmelkit.datasets.VqaConfig(co_occurrence=2.0),
      ValueError, r"co_occurrence is a probability"),
    E(f"{DAT}.pope_probes", "unknown split", lambda k, u: mmelkit.datasets.pope_probes(k.scenes, "rand"),
      ValueError, r"split.*did you mean 'random'"),
    E(f"{DAT}.pope_probes", "per_image=0", lambda k, u: mmelkit.datasets.pope_probes(k.scenes, "random", per_image=0),
      ValueError, r"per_image must be"),
    E(f"{DAT}.partner_map", "not a VqaConfig", lambda k, u: mmelkit.datasets.partner_map("cooc"),
      TypeError, r"config must be a VqaConfig"),
    E(f"{DAT}.RealPhotos", "missing annotations", lambda k, u: mmelkit.datasets.RealPhotos(u / "nowhere.json"),
      FileNotFoundError, r"annotation file .*nowhere\.json does not exist"),
    E(f"{DAT}.RealPhotos", "annotations that are not JSON", lambda k, u: mmelkit.datasets.RealPhotos(u / "notes.txt"),
      ValueError, r"notes\.txt is not a photo annotation file"),
    E(f"{DAT}.collate_scenes", "no scenes", lambda k, u: mmelkit.datasets.collate_scenes([]),
      ValueError, r"no scenes"),
    E(f"{DAT}.make_captions", "no config", lambda k, u: mmelkit.datasets.make_captions(k.scenes[0], None),
      TypeError, r"config must be a SceneConfig"),
    E(f"{DAT}.relation", "negative margin", lambda k, u: mmelkit.datasets.relation(
        k.scenes[0].objects[0], k.scenes[0].objects[0], -1.0), ValueError, r"margin_px must be a finite number >= 0"),
    E(f"{DAT}.swapped_relation", "a caption without a relation", lambda k, u: mmelkit.datasets.swapped_relation(
        k.scenes[0].captions_of("object")[0], k.scenes[0]), ValueError, r"only relation captions can be swapped"),

    # -- bench --------------------------------------------------------------------------------------------------------
    E(f"{BEN}.BenchConfig", "unknown method", lambda k, u: mmelkit.bench.BenchConfig(methods=["grad_eclp"]),
      ValueError, r"unknown method 'grad_eclp'; did you mean 'grad_eclip'"),
    E(f"{BEN}.BenchConfig", "a text method", lambda k, u: mmelkit.bench.BenchConfig(methods=["grad_eclip_text"]),
      ValueError, r"grad_eclip_text explains texts"),
    E(f"{BEN}.BenchConfig", "unknown dataset", lambda k, u: mmelkit.bench.BenchConfig(methods=["mmel"],
                                                                                       datasets=["scene"]),
      ValueError, r"unknown dataset 'scene'; did you mean 'scenes'"),
    E(f"{BEN}.preset_config", "unknown preset", lambda k, u: mmelkit.bench.preset_config("mmel-papr"),
      ValueError, r"unknown preset 'mmel-papr'; did you mean 'mmel-paper'"),
    E(f"{BEN}.load_bench_data", "samples=0", lambda k, u: mmelkit.bench.load_bench_data("scenes", k.clip, 0),
      ValueError, r"samples must be an integer >= 1; got 0"),
    E(f"{BEN}.load_bench_data", "coco folder that is missing", lambda k, u: mmelkit.bench.load_bench_data(
        f"coco:{u / 'nowhere'}", k.clip, 2), ValueError, r"nowhere.*missing"),
    Case(f"{BEN}.run_bench", "a method name instead of a config", lambda k, u: mmelkit.bench.run_bench(
        k.clip, "grad_eclip"), TypeError, r"config must be a BenchConfig"),
    Case(f"{BEN}.run_bench", "out is a user's file", lambda k, u: mmelkit.bench.run_bench(
        k.clip, mmelkit.bench.BenchConfig(methods=["raw_attention"], metrics=["pointing_game"], samples=2),
        out=u / "notes.txt", progress=False), NotADirectoryError, r"out: .*notes\.txt is a file"),
    E(f"{BEN}.paper_table", "a dataset the result does not hold", lambda k, u: mmelkit.bench.paper_table(
        k.bench_result, "photos"), ValueError, r"dataset 'photos'"),

    # -- VLM zoo ------------------------------------------------------------------------------------------------------
    OK(f"{VLM}.list_vlm_zoo", "takes no input: names, with how to make missing ones", lambda k, u: vlm_models.list_vlm_zoo(),
       lambda r, k: "scene-llava" in r),
    E(f"{VLM}.verify_checksums", "folder without mmelkit.json", lambda k, u: vlm_models.verify_checksums(u / "llava"),
      FileNotFoundError, r"llava/mmelkit\.json is missing"),

    # -- MEGL ---------------------------------------------------------------------------------------------------------
    E(f"{MEG}.MeglConfig", "unknown arch", lambda k, u: megl.MeglConfig(arch="resnet"),
      ValueError, r"arch must be 'cnn' or 'vit'; got 'resnet'"),
    E(f"{MEG}.MeglConfig", "NaN loss weight", lambda k, u: megl.MeglConfig(text_weight=math.nan),
      ValueError, r"text_weight must be a finite number >= 0"),
    E(f"{MEG}.preset", "unknown preset", lambda k, u: megl.preset("megl2"), ValueError, r"did you mean 'megl'"),
    E(f"{MEG}.build_split", "unknown split", lambda k, u: megl.build_split(k.megl_config.task(), "tran", 4),
      ValueError, r"split.*did you mean 'train'"),
    E(f"{MEG}.build_split", "size=0", lambda k, u: megl.build_split(k.megl_config.task(), "train", 0),
      ValueError, r"size must be an integer >= 1; got 0"),
    E(f"{MEG}.train_megl", "textual supervision without pseudo-masks", lambda k, u: megl.train_megl(
        k.megl_config, k.megl_split, device="cpu", progress=False), ValueError, r"attach pseudo-masks"),
    E(f"{MEG}.train_megl", "out_dir is a user's file", lambda k, u: megl.train_megl(
        k.megl_plain, k.megl_split, out_dir=u / "notes.txt", device="cpu", progress=False),
      NotADirectoryError, r"out_dir: .*notes\.txt is a file"),
    E(f"{MEG}.train_megl", "unknown device", lambda k, u: megl.train_megl(k.megl_config, k.megl_split, device="tpu"),
      ValueError, r"device 'tpu'"),
    E(f"{MEG}.load_megl", "truncated checkpoint", lambda k, u: megl.load_megl(u / "truncated-clip.pt"),
      ValueError, r"truncated-clip\.pt cannot be loaded \(truncated or damaged"),
    E(f"{MEG}.load_megl", "missing checkpoint", lambda k, u: megl.load_megl(u / "nowhere.pt"),
      FileNotFoundError, r"MEGL checkpoint: .*nowhere\.pt does not exist"),
    E(f"{MEG}.load_megl", "checkpoint without permission", lambda k, u: megl.load_megl(u / "locked" / "clip.pt"),
      PermissionError, r"MEGL checkpoint: cannot reach .*locked/clip\.pt", skip=root_skip),
    E(f"{MEG}.megl_study", "repeated seeds", lambda k, u: megl.megl_study([k.megl_plain], seeds=[0, 0], clip=None,
                                                                          progress=False),
      ValueError, r"seeds repeat: \[0, 0\]"),
    E(f"{MEG}.megl_study", "eval_size=0", lambda k, u: megl.megl_study([k.megl_plain], seeds=[0], eval_size=0,
                                                                       clip=None, progress=False),
      ValueError, r"eval_size must be an integer >= 1"),
    E(f"{MEG}.attach_pseudo_masks", "batch_size=0", lambda k, u: megl.attach_pseudo_masks(k.megl_split, k.clip, 0),
      ValueError, r"batch_size must be an integer >= 1"),
    E(f"{MEG}.pseudo_masks", "3 rationales for 2 images", lambda k, u: megl.pseudo_masks(
        k.clip, k.megl_split.raw_images[:2], ["a", "b", "c"], (16, 16)), ValueError, r"2 images but 3 rationales"),
    E(f"{MEG}.evaluate_megl", "batch_size=0", lambda k, u: megl.evaluate_megl(
        k.megl_model, k.megl_split, k.megl_split, batch_size=0), ValueError, r"batch_size must be an integer >= 1"),
    E(f"{MEG}.generate_rationales", "batch_size=0", lambda k, u: megl.generate_rationales(
        k.megl_model, k.megl_split, batch_size=0), ValueError, r"batch_size must be an integer >= 1"),
    E(f"{MEG}.grad_cam", "classes for another number of images", lambda k, u: megl.grad_cam(
        k.megl_model.classifier, k.megl_split.images[:2], torch.tensor([0, 1, 0])), ValueError, r"one class per image"),
    E(f"{MEG}.input_gradients", "NaN images", lambda k, u: megl.input_gradients(
        k.megl_model.classifier, k.megl_split.images[:2].clone().fill_(math.nan)), ValueError, r"images hold NaN"),
    E(f"{MEG}.ConvClassifier", "num_classes=1", lambda k, u: megl.ConvClassifier(1),
      ValueError, r"num_classes must be at least 2"),
    E(f"{MEG}.ViTClassifier", "patch=0", lambda k, u: megl.ViTClassifier(2, image_size=32, patch=0),
      ValueError, r"patch must be an integer >= 1; got 0"),
    E(f"{MEG}.ViTClassifier", "patch does not divide the image", lambda k, u: megl.ViTClassifier(2, image_size=30, patch=4),
      ValueError, r"image_size 30 must be a multiple of the patch size 4"),
    E(f"{MEG}.RationaleGenerator", "vocab_size=0", lambda k, u: megl.RationaleGenerator(0, 8, grounded=True),
      ValueError, r"vocab_size must be an integer >= 1"),
    OK(f"{MEG}.RationaleVocab", "no words: the special tokens only (every word encodes to <unk>)",
       lambda k, u: megl.RationaleVocab([]), lambda r, k: r.words == list(megl.RationaleVocab.SPECIALS)),
]

TABLE += [
    # -- the command line ---------------------------------------------------------------------------------------------
    E("cli:models", "an extra argument", lambda k, u: cli("models", "--all"), CliError, r"exit 2: .*unrecognized"),
    E("cli:course run", "unknown profile", lambda k, u: cli("course", "run", "--profile", "nope", "--out",
                                                            str(u / "out")), CliError, r"exit 2: .*profile"),
    E("cli:course list", "a notebooks folder that does not exist", lambda k, u: cli(
        "course", "list", "--notebooks", str(u / "nowhere")), CliError, r"exit 2: .*nowhere"),
    E("cli:course build", "a notebooks folder that does not exist", lambda k, u: cli(
        "course", "build", "--notebooks", str(u / "nowhere"), "--out", str(u / "out")), CliError, r"exit 2: .*nowhere"),
    E("cli:course site", "a notebooks folder that does not exist", lambda k, u: cli(
        "course", "site", "--notebooks", str(u / "nowhere"), "--out", str(u / "out")), CliError, r"exit 2: .*nowhere"),
    E("cli:train clip", "--steps 0", lambda k, u: cli("train", "clip", "--steps", "0", "--out", str(u / "out")),
      CliError, r"exit 2: .*steps"),
    E("cli:train megl", "unknown configuration", lambda k, u: cli("train", "megl", "--configs", "megl2", "--out",
                                                                  str(u / "out")),
      CliError, r"exit 2: .*did you mean 'megl'"),
    E("cli:train clip", "truncated --init-from", lambda k, u: cli(
        "train", "clip", "--init-from", str(u / "truncated-clip.safetensors"), "--steps", "1", "--workers", "0",
        "--device", "cpu", "--out", str(u / "out")), CliError, r"exit 1: .*truncated-clip\.safetensors cannot be loaded"),
    E("cli:train vlm", "truncated --init-from", lambda k, u: cli(
        "train", "vlm", "--init-from", str(u / "llava-truncated"), "--steps", "1", "--device", "cpu", "--out",
        str(u / "out")), CliError, r"exit 1: .*llava-truncated cannot be loaded"),
    E("cli:eval vlm", "a model folder with truncated weights", lambda k, u: cli(
        "eval", "vlm", "--model", str(u / "llava-truncated"), "--device", "cpu"),
      CliError, r"exit 2: .*llava-truncated cannot be loaded"),
    E("cli:bench", "a VLM folder without permission", lambda k, u: cli(
        "bench", "--vlm", str(u / "locked"), "--device", "cpu", "--out", str(u / "out")),
      CliError, r"exit 2: mmelkit bench: VLM folder: cannot read the folder .*locked", skip=root_skip),
    E("cli:train clip", "unknown --device", lambda k, u: cli("train", "clip", "--device", "tpu", "--out", str(u / "out")),
      CliError, r"exit 2: mmelkit train clip: device 'tpu' is not a device torch knows"),
    E("cli:train megl", "--device cuda without CUDA", lambda k, u: cli(
        "train", "megl", "--configs", "plain", "--device", "cuda", "--out", str(u / "out")),
      CliError, r"exit 2: mmelkit train megl: device 'cuda' was asked for but CUDA is not available", skip=cuda_skip),
    E("cli:eval clip", "unknown --device", lambda k, u: cli("eval", "clip", "--model", "toy-random", "--device", "tpu"),
      CliError, r"exit 2: mmelkit eval clip: device 'tpu'"),
    E("cli:train vlm", "--steps 0", lambda k, u: cli("train", "vlm", "--steps", "0", "--out", str(u / "out")),
      CliError, r"exit 2: .*steps"),
    E("cli:eval clip", "unknown model", lambda k, u: cli("eval", "clip", "--model", "toy-randm"),
      CliError, r"exit 2: .*did you mean 'toy-random'"),
    E("cli:eval pointing", "unknown method", lambda k, u: cli("eval", "pointing", "--model", "toy-random",
                                                              "--methods", "grad_eclp"),
      CliError, r"exit 2: .*grad_eclp.*did you mean 'grad_eclip'"),
    E("cli:eval vlm", "--per-kind 0", lambda k, u: cli("eval", "vlm", "--per-kind", "0"),
      CliError, r"exit 2: .*--per-kind must be at least 1"),
    E("cli:bench", "unknown method", lambda k, u: cli("bench", "--methods", "grad_eclp", "--out", str(u / "out")),
      CliError, r"exit 2: .*did you mean 'grad_eclip'"),
    E("cli:bench", "unknown model", lambda k, u: cli("bench", "--model", "toy-randm", "--methods", "mmel", "--samples",
                                                     "2", "--out", str(u / "out")),
      CliError, r"exit 2: .*did you mean 'toy-random'"),
]


# -- every registered method, through explain: the inputs all of them share ------------------------------------------------
# defaults that do not fit the tiny models (two blocks), so that the generated rows test the input
TINY_PARAMS: dict[str, dict[str, Any]] = {"mmel": {"layers": 2}}


def _method_rows() -> list[Case]:
    """Rows generated per method (so a new method gets them without a line here); they count for
    ``mmelkit.explain``, not for the method's own entry, which needs a row of its own above."""
    rows = []
    for name, cls in sorted(REGISTRY.items()):
        params = TINY_PARAMS.get(name, {})
        if cls.explains == "clip":
            rows += [
                E(f"{M}.explain", f"{name}: NaN in model input", lambda k, u, n=name, p=params: ex(
                    k.clip, k.nan_pixels(), TEXTS, method=n, **p),
                  ValueError, r"images hold NaN or infinite values at rows \[1\]"),
                E(f"{M}.explain", f"{name}: 2 images, 3 texts", lambda k, u, n=name, p=params: ex(
                    k.clip, k.pixels, [*TEXTS, "x"], method=n, **p), ValueError, r"got 2 images and 3 texts"),
                E(f"{M}.explain", f"{name}: empty batch", lambda k, u, n=name, p=params: ex(
                    k.clip, k.pixels[:0], TEXTS, method=n, **p), ValueError, r"images are an empty batch"),
            ]
        else:
            rows += [
                E(f"{M}.explain", f"{name}: 2 images, 3 questions", lambda k, u, n=name: ex(
                    k.vlm, k.vlm_images, [*QUESTIONS, "x ?"], method=n), ValueError, r"got 2 images and 3 questions"),
                E(f"{M}.explain", f"{name}: NaN in an image", lambda k, u, n=name: ex(
                    k.vlm, [np.full((48, 48, 3), math.nan, np.float32)], QUESTIONS[:1], method=n),
                  ValueError, r"image contains NaN or infinite values"),
            ]
    return rows


TABLE += _method_rows()


# -- the tests -----------------------------------------------------------------------------------------------------------
def _where(error: BaseException) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{frame.filename}:{frame.lineno}"


def _raised_by_mmelkit(error: BaseException) -> bool:
    """The innermost frame is mmelkit's own code: the error was raised on purpose at an entry point,
    not by torch, transformers or Python tripping over the input. (A command's exit is judged by its
    code and message: a traceback inside it would escape :func:`cli` as some other exception.)"""
    if isinstance(error, CliError):
        return True
    innermost = Path(traceback.extract_tb(error.__traceback__)[-1].filename).resolve()
    return PACKAGE in innermost.parents


def _params() -> list[Any]:
    return [pytest.param(case, id=case.id, marks=pytest.mark.xfail(strict=True, reason=case.known) if case.known else ())
            for case in TABLE]


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, kit: Kit, user: Path, tmp_path: Path) -> None:
    reason = case.skip() if case.skip else None
    if reason:
        pytest.skip(reason)
    before = _hashes(user)
    if case.error is None:
        result = case.call(kit, user)
        assert case.holds is not None and case.holds(result, kit), f"{case.id}: the documented handling does not hold"
    else:
        try:
            case.call(kit, user)
        except case.error as error:
            message = str(error)
            assert re.search(case.match, message, re.S), (
                f"{case.id}: {type(error).__name__} raised but its message does not match {case.match!r}: {message!r}")
            assert _raised_by_mmelkit(error), f"{case.id}: raised at {_where(error)}, not by mmelkit: {message!r}"
        except Exception as error:  # noqa: BLE001  (the failure message says what came instead)
            pytest.fail(f"{case.id}: expected {case.error.__name__} matching {case.match!r}; got "
                        f"{type(error).__name__} at {_where(error)}: {str(error)[:400]!r}")
        else:
            pytest.fail(f"{case.id}: expected {case.error.__name__} matching {case.match!r}; the call succeeded")
    after = _hashes(user)
    wrote = [str(p) for p in (user / OUT).rglob("*") if p.is_file()]  # (an empty run folder is harmless)
    shutil.rmtree(user / OUT, ignore_errors=True)  # so that one case's output cannot fail the next
    assert after == before, f"{case.id}: a file of the user's changed: " + ", ".join(
        sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name)))
    assert case.error is None or not wrote, f"{case.id}: wrote {wrote} although the input was refused"


def test_every_public_entry_point_is_in_the_table() -> None:
    covered = {case.entry for case in TABLE}
    missing = sorted(set(public_entry_points()) - covered)
    assert not missing, "public entry points without a row in TABLE (add one, or an EXEMPT entry with the reason): " + \
        ", ".join(missing)


def test_the_table_names_only_real_entry_points() -> None:
    """A row whose entry is misspelt would cover nothing; so would an exemption of a name that left."""
    known = set(public_entry_points())
    assert not sorted({case.entry for case in TABLE} - known)
    every = {f"{module.__name__}.{name}" for module in PUBLIC_MODULES for name in module.__all__}
    assert not sorted(set(EXEMPT) - every)


def test_the_surface_is_what_it_claims() -> None:
    """The surface finds functions, validating classes, methods, tools and leaf commands, and
    skips records and constants."""
    surface = public_entry_points()
    assert surface["mmelkit.load_model"] == "function"
    assert surface["mmelkit.training.megl.MeglConfig"] == "class"  # validates: a row
    assert "mmelkit.metrics.Curves" not in surface  # a record
    assert "mmelkit.metrics.METRICS" not in surface  # a constant
    assert {"method:grad_eclip", "tool:tcav", "cli:train megl", "cli:bench", "cli:course run"} <= set(surface)
    assert "cli:train" not in surface  # only leaves

