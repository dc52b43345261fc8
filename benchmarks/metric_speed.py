"""Faithfulness-metric speed: deletion plus insertion (100 steps each) in maps per second.

    python benchmarks/metric_speed.py [--model scene-clip|ViT-B-16|SPEC] [--device auto|cpu|cuda]
        [--dtypes fp32,bf16] [--batches 128,512] [--maps 32] [--steps 100] [--repeats 3]
        [--threads N] [--markdown out.md]

One *map* costs a deletion curve and an insertion curve of ``--steps`` steps each, i.e.
2 x (steps + 1) perturbed copies of its image, embedded ``--batches`` copies per forward pass
(:func:`mmelkit.metrics.perturbation.perturbed_features`), scored by cosine with the text. The
timed call is :func:`mmelkit.metrics.faithfulness.perturbation_curves` twice, text encoding and
all; CUDA is synchronised before the clock stops. The maps are random (speed does not depend on
them); the images are scene-world scenes for scene-clip and noise otherwise.

Target (evaluation issue): >= 50 maps/s for open_clip ViT-B/16 at 224 px in bf16 on one H100.
PASS/MISS is printed only for rows measured under those conditions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import mmelkit  # noqa: F401  (before anything imports torchvision)
from mmelkit.metrics.faithfulness import perturbation_curves
from mmelkit.models.loading import resolve_device

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from explain_speed import DTYPES, is_vit_b16_224, load_benchmark_model, make_pairs, synchronize  # noqa: E402

TARGET_MAPS_PER_SECOND = 50.0


@dataclass
class Row:
    model: str
    device: str
    dtype: str
    batch: int
    maps: int
    steps: int
    rates: list[float]
    target: str
    verdict: str

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def images_per_second(self) -> float:
        return self.median * 2 * (self.steps + 1)


def measure(spec: str, device: torch.device, dtype_name: str, batch: int, maps: int, steps: int,
            repeats: int) -> Row:
    model = load_benchmark_model(spec, device, DTYPES[dtype_name])
    pixels, texts = make_pairs(model, maps)
    grid = model.grid(pixels)
    generator = torch.Generator().manual_seed(0)
    saliency = torch.rand((maps, *grid), generator=generator).to(device)

    def both() -> None:
        for mode in ("deletion", "insertion"):
            perturbation_curves(model, pixels, texts, saliency, mode=mode, steps=steps, batch_size=batch)
        synchronize(device)

    both()  # warm-up: kernels, caches, the allocator
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        both()
        rates.append(maps / (time.perf_counter() - start))
    judged = device.type == "cuda" and dtype_name == "bf16" and is_vit_b16_224(spec, model) and steps == 100
    target = f">={TARGET_MAPS_PER_SECOND:.0f} maps/s"
    verdict = ("PASS" if statistics.median(rates) >= TARGET_MAPS_PER_SECOND else "MISS") if judged else "n/a"
    return Row(spec, str(device), dtype_name, batch, maps, steps, rates, target, verdict)


def format_rows(rows: Sequence[Row]) -> str:
    header = ["model", "device", "dtype", "batch", "maps", "steps", "maps/s (median)", "best", "images/s", "target",
              "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.model, r.device, r.dtype, str(r.batch), str(r.maps), str(r.steps), f"{r.median:.2f}",
                 f"{max(r.rates):.2f}", f"{r.images_per_second:,.0f}", r.target, r.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="scene-clip")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--batches", default="128,512", help="perturbed images per forward pass, comma-separated")
    parser.add_argument("--maps", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = []
    for dtype_name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        if dtype_name not in DTYPES:
            parser.error(f"unknown dtype {dtype_name!r}; dtypes: {', '.join(DTYPES)}")
        if device.type == "cpu" and dtype_name == "fp16":
            print("fp16 skipped on the CPU")
            continue
        for batch in [int(b) for b in args.batches.split(",")]:
            rows.append(measure(args.model, device, dtype_name, batch, args.maps, args.steps, args.repeats))
            print(f"{dtype_name} batch {batch}: {rows[-1].median:.2f} maps/s", flush=True)
    table = format_rows(rows)
    print(table)
    print(f"one map = deletion + insertion, {args.steps} steps each ({2 * (args.steps + 1)} forward images); "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
