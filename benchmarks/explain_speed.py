"""Explanation-method speed: pairs/s per method, model, batch size and dtype, and the peak memory.

    python benchmarks/explain_speed.py [--model scene-clip|ViT-B-16|SPEC] [--methods grad_eclip,mmel|all]
        [--batch-sizes 1,16] [--dtypes fp32,bf16,fp16] [--device auto|cpu|cuda] [--pairs 64]
        [--repeats 3] [--warmup 1] [--rise-masks 2000] [--param rise.batch_size=500]
        [--csv out.csv] [--markdown out.md]

Each row times ``mmelkit.explain(model, pixels, tokens, method=...)`` on batches of image-text
pairs: ``--pairs`` pairs per measurement in calls of one batch size, after ``--warmup`` calls,
``--repeats`` times; the row gives the median rate (and the best). The timed call does all of a
method's work: encoding each pair's text, the forward and backward passes, the maps on the
device (CUDA is synchronised before the clock stops). Preprocessing the images and tokenising the
captions happen once, outside the clock. RISE (``--rise-masks`` masks per map, default 2,000)
is reported in maps/s and measured on ``--rise-pairs`` pairs at ``--rise-batch-sizes``.

Inputs: scene-world scenes with one of their captions for ``scene-clip`` (the model's own 64 px
world); uniform noise images with scene-world captions for any other model (``--images`` picks).
``--model ViT-B-16`` is open_clip's ViT-B/16 at 224 px with random weights (seeded), which is
what the speed targets are stated for.

Targets (model-level issue), open_clip ViT-B/16 at 224 px on one H100 in bf16: Grad-ECLIP
>= 4,000 pairs/s, MMEL >= 2,500, Grad-CAM and rollout >= 4,000, generic attention >= 1,500,
RISE with 2,000 masks >= 3 maps/s. PASS/MISS is printed only for rows measured under those
conditions (CUDA, bf16, ViT-B-16 at 224 px); elsewhere the target column says "n/a".

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the timed calls (after
``reset_peak_memory_stats``), i.e. tensors alive at the peak including the weights. On the CPU
there is no allocator statistic, so the column gives how far the process's resident set rose
above its level before the timed calls, after glibc's ``malloc_trim`` has returned the heap pages
the warm-up freed: exactly on Linux (the peak, VmHWM, is reset through /proc/self/clear_refs),
else sampled with psutil, else from ``resource``'s ru_maxrss (a process-lifetime high-water mark:
0 unless the calls exceed every earlier peak). The footnote names the one used. Under a loaded
CPU, ``--threads 1`` avoids torch's threads waiting on each other (10x slower here otherwise).
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import logging
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import mmelkit  # noqa: F401  (before anything imports torchvision: see mmelkit/_compat.py)
from mmelkit.methods import get_method
from mmelkit.methods.base import image_methods
from mmelkit.models.adapter import ClipAdapter
from mmelkit.models.backend import TextTokens
from mmelkit.models.loading import load_model, resolve_device

DEFAULT_METHODS = ("grad_eclip", "mmel", "grad_cam", "rollout", "generic_attention", "raw_attention", "maskclip", "rise")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VIT_B16 = ("ViT-B-16", "open_clip:ViT-B-16")

# The targets: method -> (rate, unit). They hold for ViT-B/16, 224 px, one H100, bf16.
TARGETS: dict[str, tuple[float, str]] = {
    "grad_eclip": (4000, "pairs/s"),
    "mmel": (2500, "pairs/s"),
    "grad_cam": (4000, "pairs/s"),
    "rollout": (4000, "pairs/s"),
    "generic_attention": (1500, "pairs/s"),
    "rise": (3, "maps/s"),
}
RISE_TARGET_MASKS = 2000


# -- model and inputs -------------------------------------------------------------------------------
def load_benchmark_model(spec: str, device: torch.device, dtype: torch.dtype) -> ClipAdapter:
    """``load_model(spec)`` on ``device`` in ``dtype``; open_clip architectures without weights are
    built with a fixed seed (random init, fine for speed) and without the random-init warning."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip logs "No pretrained weights loaded" for random init
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", message=".*no pretrained weights given.*")
            torch.manual_seed(0)
            return load_model(spec, device=device, dtype=dtype)
    finally:
        logging.disable(previous)


def is_vit_b16_224(spec: str, model: ClipAdapter) -> bool:
    return spec in VIT_B16 and tuple(model.image_size) == (224, 224) and tuple(model.patch_size) == (16, 16)


def make_pairs(model: ClipAdapter, count: int, images: str = "auto", seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """``count`` preprocessed images (on the model's device, in its dtype) and one caption each.

    ``images="scenes"``: scene-world scenes at the model's size, each with one of its own captions;
    ``"noise"``: uniform noise images, with captions of scene-world scenes; ``"auto"``: scenes for
    scene-clip, noise otherwise.
    """
    from mmelkit.datasets import SceneConfig, SceneWorld

    if images == "auto":
        images = "scenes" if model.name == "scene-clip" else "noise"
    if images not in ("scenes", "noise"):
        raise ValueError(f"images must be 'scenes', 'noise' or 'auto'; got {images!r}")
    height, width = model.image_size
    size = min(height, width) if images == "scenes" else 64  # noise images only borrow the captions
    world = SceneWorld(SceneConfig().scaled(size), seed=seed)
    rng = np.random.default_rng(seed)
    scenes = [world[i] for i in range(count)]
    captions = [scene.captions[int(rng.integers(len(scene.captions)))].text for scene in scenes]
    if images == "scenes":
        arrays = [scene.image for scene in scenes]
    else:
        arrays = [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(count)]
    with torch.no_grad():
        pixels = torch.cat([model.preprocess(arrays[i : i + 64]) for i in range(0, count, 64)])
    return pixels, captions


# -- memory -----------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory over a stretch of code: CUDA allocator peak, or the rise of the CPU process's RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = self._cpu_kind() if device.type != "cuda" else "cuda"
        self._start = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_peak = 0

    @staticmethod
    def _cpu_kind() -> str:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM (Linux >= 4.0)
            if _proc_status_kib("VmHWM") is not None:
                return "vmhwm"
        except OSError:
            pass
        try:
            import psutil  # noqa: F401
        except ImportError:
            return "maxrss"
        return "psutil"

    @property
    def label(self) -> str:
        return {
            "cuda": "CUDA: torch.cuda.max_memory_allocated over the timed calls (weights included)",
            "vmhwm": "CPU: rise of the process's peak RSS over the timed calls (Linux VmHWM, reset before them, "
                     "after malloc_trim)",
            "psutil": "CPU: rise of the process's RSS over the timed calls (psutil, sampled every 2 ms)",
            "maxrss": "CPU: rise of ru_maxrss over the timed calls (lifetime high-water mark: 0 unless a new peak)",
        }[self.kind]

    def start(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _release_free_heap()  # else the timed calls reuse pages the warm-up left mapped, and show no rise
        if self.kind == "vmhwm":
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self._start = _proc_status_kib("VmRSS") * 1024
        elif self.kind == "psutil":
            import psutil

            process = psutil.Process()
            self._start = self._sampled_peak = process.memory_info().rss
            self._stop.clear()

            def sample() -> None:
                while not self._stop.wait(0.002):
                    self._sampled_peak = max(self._sampled_peak, process.memory_info().rss)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        else:
            self._start = _maxrss_bytes()

    def abort(self) -> None:
        """End a measurement that failed (stops the psutil sampler, if any)."""
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
            self._sampler = None

    def stop(self) -> int:
        """Bytes: the CUDA peak, or the CPU rise above the level at ``start``."""
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "vmhwm":
            return max(0, _proc_status_kib("VmHWM") * 1024 - self._start)
        if self.kind == "psutil":
            self.abort()
            return max(0, self._sampled_peak - self._start)
        return max(0, _maxrss_bytes() - self._start)


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim), where there is glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _maxrss_bytes() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024  # bytes on macOS, KiB on Linux


# -- timing -----------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Timing:
    rates: list[float]  # pairs (maps) per second, one per repeat
    peak_bytes: int
    pairs: int  # pairs per repeat

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def best(self) -> float:
        return max(self.rates)


def time_calls(
    call: Callable[[], Any], pairs_per_call: int, calls: int, repeats: int, warmup: int, memory: PeakMemory
) -> Timing:
    """Run ``call`` ``warmup`` times, then ``repeats`` x ``calls`` times under the clock."""
    device = memory.device
    for _ in range(warmup):
        call()
    synchronize(device)
    memory.start()
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize(device)
        rates.append(calls * pairs_per_call / (time.perf_counter() - start))
    return Timing(rates, memory.stop(), calls * pairs_per_call)


# -- rows -------------------------------------------------------------------------------------------
@dataclass
class Row:
    method: str
    model: str
    device: str
    dtype: str
    batch: int
    pairs: int = 0
    rate: float | None = None
    best: float | None = None
    unit: str = "pairs/s"
    peak_mib: float | None = None
    target: str = "n/a"
    verdict: str = "n/a"
    note: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[str]:
        rate = "-" if self.rate is None else f"{_fmt_rate(self.rate)} {self.unit}"
        best = "-" if self.best is None else _fmt_rate(self.best)
        peak = "-" if self.peak_mib is None else f"{self.peak_mib:,.1f}"
        return [self.method, self.model, self.device, self.dtype, str(self.batch), str(self.pairs), rate, best,
                peak, self.target, self.verdict, self.note]


HEADER = ["method", "model", "device", "dtype", "batch", "pairs", "median", "best", "peak MiB", "target",
          "verdict", "note"]


def _fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:,.2f}"


def format_table(rows: Sequence[Row]) -> str:
    cells = [HEADER] + [row.cells() for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADER))]
    numeric = {"batch", "pairs", "median", "best", "peak MiB"}
    lines = []
    for k, r in enumerate(cells):
        parts = [c.rjust(w) if HEADER[i] in numeric and k else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], handle: io.TextIOBase) -> None:
    writer = csv.writer(handle)
    writer.writerow(["method", "model", "device", "dtype", "batch", "pairs", "median_rate", "best_rate", "unit",
                     "peak_mib", "target", "verdict", "note", "params"])
    for row in rows:
        writer.writerow([row.method, row.model, row.device, row.dtype, row.batch, row.pairs,
                         "" if row.rate is None else f"{row.rate:.4g}", "" if row.best is None else f"{row.best:.4g}",
                         row.unit, "" if row.peak_mib is None else f"{row.peak_mib:.1f}", row.target, row.verdict,
                         row.note, repr(row.params)])


# -- command line -----------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas; got {text!r}")
    return values


def _parse_param(text: str) -> tuple[str, str, Any]:
    try:
        key, value = text.split("=", 1)
        method, name = key.split(".", 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--param takes METHOD.NAME=VALUE; got {text!r}") from None
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare string
    return method.strip(), name.strip(), parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="scene-clip",
                        help="scene-clip (default), ViT-B-16 (random-init open_clip ViT-B/16, 224 px) or any load_model spec")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma list of image-side methods, or 'all' (default: %(default)s)")
    parser.add_argument("--batch-sizes", type=_int_list, default=None,
                        help="pairs per call, comma list (default: 1,64,256 on CUDA, 1,16 on the CPU)")
    parser.add_argument("--dtypes", default="fp32,bf16",
                        help="comma list of fp32, bf16, fp16 (unsupported ones are skipped with a note)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:i]")
    parser.add_argument("--pairs", type=int, default=None,
                        help="pairs per measurement (rounded up to whole batches; default 512 on CUDA, 16 on the CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement")
    parser.add_argument("--images", choices=("auto", "scenes", "noise"), default="auto")
    parser.add_argument("--rise-masks", type=int, default=RISE_TARGET_MASKS)
    parser.add_argument("--rise-pairs", type=int, default=None,
                        help="pairs per RISE measurement (default 8 on CUDA, 2 on the CPU)")
    parser.add_argument("--rise-batch-sizes", type=_int_list, default=[1], help="pairs per RISE call")
    parser.add_argument("--param", type=_parse_param, action="append", default=[], metavar="METHOD.NAME=VALUE",
                        help="a method parameter, e.g. rise.batch_size=500 or integrated_gradients.steps=16 (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file ('-': stdout)")
    parser.add_argument("--markdown", default=None, help="also write a markdown table to this file ('-': stdout)")
    return parser


def resolve_methods(text: str) -> list[str]:
    image_side = image_methods("clip")
    if text.strip() == "all":
        return image_side
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for name in methods:
        cls = get_method(name)  # unknown names raise with the list of methods
        if cls.modality != "image":
            raise SystemExit(f"{name} explains the text side; this benchmark times image-side maps ({', '.join(image_side)})")
    return methods


def apply_params(params: dict[str, dict[str, Any]], given: Sequence[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    """Put ``--param METHOD.NAME=VALUE`` settings into ``params`` (method -> its parameters), refusing
    a method not measured or a parameter the method does not have. Shared by the speed benchmarks."""
    for method, name, value in given:
        if method not in params:
            raise SystemExit(f"--param {method}.{name}: {method} is not among the benchmarked methods")
        if name not in get_method(method).defaults:
            raise SystemExit(f"--param {method}.{name}: {method} has no parameter {name!r}; "
                             f"parameters: {sorted(get_method(method).defaults)}")
        params[method][name] = value
    return params


def method_params(methods: Sequence[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    params: dict[str, dict[str, Any]] = {m: {} for m in methods}
    if "rise" in params:
        params["rise"]["masks"] = args.rise_masks
    return apply_params(params, args.param)


def dtype_support(name: str, device: torch.device, model_spec: str) -> str | None:
    """None when ``name`` can run on ``device``, else the reason it is skipped."""
    if name not in DTYPES:
        return f"unknown dtype {name!r} (use {', '.join(DTYPES)})"
    if device.type == "cpu" and name == "fp16":
        return "fp16 skipped on the CPU (half-precision matmuls there are slow or missing; use bf16)"
    if device.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
        return "bf16 skipped: this GPU does not support it"
    return None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    batch_sizes = args.batch_sizes or ([1, 64, 256] if on_cuda else [1, 16])
    pairs = args.pairs or (512 if on_cuda else 16)
    rise_pairs = args.rise_pairs or (8 if on_cuda else 2)
    methods = resolve_methods(args.methods)
    params = method_params(methods, args)
    memory = PeakMemory(device)

    print(f"mmelkit explanation speed | torch {torch.__version__} | {describe_device(device)}")
    print(f"model {args.model} | {pairs} pairs per measurement ({rise_pairs} for RISE, {args.rise_masks} masks) | "
          f"{args.warmup} warm-up call(s), median of {args.repeats} repeat(s)")

    rows: list[Row] = []
    notes: list[str] = []
    for dtype_name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        reason = dtype_support(dtype_name, device, args.model)
        if reason:
            print(f"note: {reason}")
            notes.append(reason)
            continue
        dtype = DTYPES[dtype_name]
        model = load_benchmark_model(args.model, device, dtype)
        targets_apply = on_cuda and dtype_name == "bf16" and is_vit_b16_224(args.model, model)
        grid = model.grid(model.image_size)
        largest = max(max(batch_sizes), max(args.rise_batch_sizes) if "rise" in methods else 1)
        pixels, captions = make_pairs(model, largest, args.images)
        print(f"{model.name}: {model.image_size[0]}x{model.image_size[1]} px, patch {model.patch_size[0]}, "
              f"grid {grid[0]}x{grid[1]}, {model.num_image_blocks} image blocks, {dtype_name}")
        for method in methods:
            method_batches = args.rise_batch_sizes if method == "rise" else batch_sizes
            total = rise_pairs if method == "rise" else pairs
            for batch in method_batches:
                rows.append(run_row(model, args.model, method, params[method], pixels[:batch],
                                    model.tokenize(captions[:batch]), total, args, memory, dtype_name,
                                    targets_apply))
                row = rows[-1]
                done = row.note if row.rate is None else f"{_fmt_rate(row.rate)} {row.unit}"
                print(f"  {method:<20} {dtype_name:<5} batch {batch:<5} {done}", flush=True)
        del model, pixels
        if on_cuda:
            torch.cuda.empty_cache()

    print()
    print(format_table(rows))
    print(f"* peak MiB: {memory.label}")
    print("* median/best: rates over the repeats; pairs/s counts image-text pairs explained (maps/s for RISE)")
    print("* target: the issue's figure for ViT-B/16 at 224 px, one H100, bf16; PASS/MISS only for rows measured so")
    for note in notes:
        print(f"* {note}")
    if args.csv:
        if args.csv == "-":
            write_csv(rows, sys.stdout)
        else:
            with open(args.csv, "w", newline="") as handle:
                write_csv(rows, handle)
    if args.markdown:
        text = format_markdown(rows) + "\n"
        if args.markdown == "-":
            print(text, end="")
        else:
            with open(args.markdown, "w") as handle:
                handle.write(text)
    return rows


def run_row(
    model: ClipAdapter,
    spec: str,
    method: str,
    params: dict[str, Any],
    pixels: torch.Tensor,
    tokens: TextTokens,
    total_pairs: int,
    args: argparse.Namespace,
    memory: PeakMemory,
    dtype_name: str,
    targets_apply: bool,
) -> Row:
    batch = len(pixels)
    calls = max(1, math.ceil(total_pairs / batch))
    unit = "maps/s" if method == "rise" else "pairs/s"
    row = Row(method, spec, str(memory.device), dtype_name, batch, calls * batch, unit=unit, params=dict(params))
    if method == "rise":
        row.note = f"{params.get('masks', RISE_TARGET_MASKS)} masks"
    if method in TARGETS:
        value, target_unit = TARGETS[method]
        row.target = f">={value:,.0f} {target_unit}"
    explainer = get_method(method)(model, **params)

    def call() -> Any:
        return explainer.explain(pixels, tokens).maps

    try:
        timing = time_calls(call, batch, calls, args.repeats, args.warmup, memory)
    except torch.cuda.OutOfMemoryError:
        memory.abort()
        torch.cuda.empty_cache()
        row.note = (row.note + "; " if row.note else "") + "out of memory"
        return row
    except Exception as error:  # a method that cannot run in this dtype, say: report it and go on
        memory.abort()
        message = str(error).splitlines()[0] if str(error) else ""
        row.note = f"error: {type(error).__name__}: {message[:80]}"
        return row
    row.rate, row.best = timing.median, timing.best
    row.peak_mib = timing.peak_bytes / 2**20
    rise_ok = method != "rise" or params.get("masks") == RISE_TARGET_MASKS
    if method in TARGETS:
        if targets_apply and rise_ok:
            row.verdict = "PASS" if timing.median >= TARGETS[method][0] else "MISS"
    return row


if __name__ == "__main__":
    main()
