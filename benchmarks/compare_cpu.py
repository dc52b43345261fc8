"""mmelkit against pytorch-grad-cam and Captum on the CPU: the same maps, side by side, in one run.

    python benchmarks/compare_cpu.py [--model scene-clip|ViT-B-16|SPEC] [--pairs 16] [--batch-size 16]
        [--repeats 3] [--warmup 1] [--ig-steps 32] [--ig-batch 64] [--occlusion-batch 256]
        [--only grad_cam,integrated_gradients,occlusion] [--threads N]

Target (model-level issue): on the CPU, on the same model, at least 5x faster than
pytorch-grad-cam (Grad-CAM) and Captum (Integrated Gradients, occlusion) for the same maps. The
libraries are optional benchmark extras: ``pip install "mmelkit[bench]"``; a comparison whose
library is missing is skipped with that hint.

Both sides get the same image-text pairs (``--pairs`` of them, in calls of ``--batch-size``
pairs), the same model in fp32 on the CPU, and the same score S = cos(f_I(x), f_T(t)). Every
timed call includes encoding the pairs' texts. The sides alternate repeat by repeat (so a change
in the machine's load hits both), and the table gives the median pairs/s of each. Set-ups:

* Grad-CAM. mmelkit's default (``block=-1, where="input"``): the tokens entering the last image
  block, channel weights = mean gradient over the patch tokens, ReLU of the weighted sum.
  pytorch-grad-cam's ``GradCAM`` hooks the output of the block before (the same tensor), with a
  ``reshape_transform`` that drops the CLS token and lays the patch tokens on the grid derived from
  the input size; the target is a callable giving the cosine with the pair's text feature. The
  model's parameters stay frozen, as ``load_model`` leaves them, so pytorch-grad-cam is told to make
  the input require a gradient (``compute_input_gradient``; its hooks need some tensor that
  requires one); that is its cheapest set-up: with trainable parameters it also computes their
  gradients. pytorch-grad-cam returns maps upsampled to the image (cv2 bilinear) and min-max
  normalised; mmelkit's maps get the same bilinear upsampling and normalisation before comparing.
* Integrated Gradients. mmelkit's ``integrated_gradients`` and Captum's ``IntegratedGradients``
  with ``method="riemann_middle"`` (mmelkit's midpoint rule), the same ``n_steps``, the same black
  baseline ((0 - mean) / std per channel) and ``internal_batch_size`` = mmelkit's ``batch_size``
  (path points per forward). Captum's attribution goes through mmelkit's map recipe: sum over
  channels of |IG|, mean over each patch, min-max.
* Occlusion. mmelkit's ``occlusion`` defaults (window = stride = the patch size, substrate 0 in
  normalised input) and Captum's ``Occlusion`` with ``sliding_window_shapes=(3, w, w)``,
  ``strides=(3, s, s)``, ``baselines=0``; ``perturbations_per_eval`` is set so that Captum's
  forwards hold as many occluded images as mmelkit's (``--occlusion-batch``; Captum's default of 1
  would run one forward per window). Captum's per-pixel mean drop goes through mmelkit's recipe:
  mean over each patch, clamped at 0, min-max.

Agreement: the largest absolute difference between the two sides' maps (both in [0, 1]) and the
smallest per-map Spearman correlation; "agree" is yes when the difference is at most ``--tolerance``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mmelkit  # noqa: F401  (before torchvision, which pytorch-grad-cam imports: see mmelkit/_compat.py)
from mmelkit.methods import get_method
from mmelkit.models.adapter import ClipAdapter
from mmelkit.models.backend import TextTokens

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explain_speed import load_benchmark_model, make_pairs  # noqa: E402

COMPARISONS = ("grad_cam", "integrated_gradients", "occlusion")
INSTALL_HINT = 'pip install "mmelkit[bench]"  (or: pip install grad-cam captum)'
SPEED_TARGET = 5.0


# -- shared pieces ----------------------------------------------------------------------------------
def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each map of (N, ...) to [0, 1] (constant maps become 0)."""
    flat = maps.flatten(1).float()
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)


def cosine_scores(model: ClipAdapter, pixels: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """S_n = cos(f_I(pixels_n), text_features_n) for unit ``text_features``: (N,)."""
    return (F.normalize(model.encode_image(pixels, normalize=False), dim=-1) * text_features).sum(-1)


def encode_texts(model: ClipAdapter, tokens: TextTokens) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(tokens)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest Spearman rank correlation over the maps of (N, ...) and (N, ...)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:  # ranks without tie handling
        def spearmanr(x: np.ndarray, y: np.ndarray) -> tuple[float, None]:
            rx, ry = np.argsort(np.argsort(x)).astype(float), np.argsort(np.argsort(y)).astype(float)
            return float(np.corrcoef(rx, ry)[0, 1]), None
    values = []
    for x, y in zip(a.flatten(1).double().numpy(), b.flatten(1).double().numpy(), strict=True):
        if np.ptp(x) == 0 and np.ptp(y) == 0:
            values.append(1.0)
            continue
        values.append(float(spearmanr(x, y)[0]))
    return min(values)


# -- the implementations ----------------------------------------------------------------------------
Impl = Callable[[torch.Tensor, TextTokens], torch.Tensor]


def mmelkit_impl(model: ClipAdapter, method: str, **params: Any) -> Impl:
    explainer = get_method(method)(model, **params)
    return lambda pixels, tokens: explainer.explain(pixels, tokens).maps


class _ImageScore(nn.Module):
    """The image tower as pytorch-grad-cam wants a model: pixels -> unnormalised image features."""

    def __init__(self, model: ClipAdapter) -> None:
        super().__init__()
        self.clip = model.model  # registered, so the library finds parameters (and their device)
        self._adapter = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._adapter.encode_image(pixels, normalize=False)


class CosineTarget:
    """pytorch-grad-cam target: the cosine of one sample's image feature with its text feature."""

    def __init__(self, text_feature: torch.Tensor) -> None:
        self.text_feature = text_feature

    def __call__(self, image_feature: torch.Tensor) -> torch.Tensor:
        return (F.normalize(image_feature, dim=-1) * self.text_feature).sum()


def grad_cam_target_layer(model: ClipAdapter) -> nn.Module:
    """The module whose output is the tensor mmelkit's default Grad-CAM weights: the input of block
    ``block`` (the output of the block before) or, with ``where="output"``, that block's output."""
    defaults = get_method("grad_cam").defaults
    blocks = model.backend.image_tower().blocks
    index = int(defaults["block"]) % len(blocks)
    if defaults["where"] == "output":
        return blocks[index]
    if index == 0:
        raise ValueError("Grad-CAM on the first block's input has no block output to hook")
    return blocks[index - 1]


def pytorch_grad_cam_impl(model: ClipAdapter) -> Impl:
    from pytorch_grad_cam import GradCAM

    tower = model.backend.image_tower()
    prefix = tower.num_prefix_tokens

    def reshape_transform(tokens: torch.Tensor) -> torch.Tensor:
        if not tower.batch_first:
            tokens = tokens.transpose(0, 1)  # (L, N, D) -> (N, L, D)
        patches = tokens[:, prefix:]
        height, width = grid_now[0]
        return patches.reshape(len(patches), height, width, -1).permute(0, 3, 1, 2)  # (N, D, h, w)

    grid_now: list[tuple[int, int]] = [(0, 0)]
    wrapper, layer = _ImageScore(model), grad_cam_target_layer(model)

    def run(pixels: torch.Tensor, tokens: TextTokens) -> torch.Tensor:
        grid_now[0] = model.grid(pixels)
        features = encode_texts(model, tokens)
        # The library's hooks stay on the model until released: hold them for this call only.
        with GradCAM(model=wrapper, target_layers=[layer], reshape_transform=reshape_transform) as cam:
            cam.compute_input_gradient = True  # frozen parameters: let the input carry the gradient
            maps = cam(input_tensor=pixels, targets=[CosineTarget(f) for f in features])
        return torch.from_numpy(maps)

    return run


def mmelkit_grad_cam_as_pytorch_grad_cam(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """mmelkit's grid maps the way pytorch-grad-cam presents them: bilinear to the image, min-max."""
    upsampled = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return minmax(upsampled)


def black_baseline(model: ClipAdapter, pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(model.backend.image_mean, dtype=torch.float32)
    std = torch.tensor(model.backend.image_std, dtype=torch.float32)
    return (-mean / std).view(1, 3, 1, 1).to(pixels.dtype).expand_as(pixels).contiguous()


def patch_means(model: ClipAdapter, per_pixel: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(per_pixel[:, None], kernel_size=model.patch_size)[:, 0]


def captum_ig_impl(model: ClipAdapter, steps: int, internal_batch_size: int) -> Impl:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(lambda pixels, text: cosine_scores(model, pixels, text))

    def run(pixels: torch.Tensor, tokens: TextTokens) -> torch.Tensor:
        features = encode_texts(model, tokens)
        attribution = ig.attribute(
            pixels, baselines=black_baseline(model, pixels), additional_forward_args=(features,), n_steps=steps,
            method="riemann_middle", internal_batch_size=max(internal_batch_size, len(pixels)),
        )
        with torch.no_grad():
            return minmax(patch_means(model, attribution.abs().sum(dim=1)))

    return run


def captum_occlusion_impl(
    model: ClipAdapter, window: int, stride: int, images_per_forward: int, per_eval: int | None = None
) -> Impl:
    from captum.attr import Occlusion

    occlusion = Occlusion(lambda pixels, text: cosine_scores(model, pixels, text))

    def run(pixels: torch.Tensor, tokens: TextTokens) -> torch.Tensor:
        features = encode_texts(model, tokens)
        with torch.no_grad():
            attribution = occlusion.attribute(
                pixels, sliding_window_shapes=(3, window, window), strides=(3, stride, stride), baselines=0.0,
                additional_forward_args=(features,),
                perturbations_per_eval=per_eval or max(1, images_per_forward // len(pixels)),
            )
            return minmax(patch_means(model, attribution[:, 0].float()).clamp_min(0))

    return run


# -- running and timing -----------------------------------------------------------------------------
@dataclass
class Result:
    map_name: str
    ours: str
    baseline: str
    ours_rate: float | None = None
    baseline_rate: float | None = None
    max_diff: float | None = None
    spearman: float | None = None
    tolerance: float = 1e-3
    skipped: str = ""

    @property
    def speedup(self) -> float | None:
        if self.ours_rate is None or self.baseline_rate is None:
            return None
        return self.ours_rate / self.baseline_rate

    @property
    def agree(self) -> str:
        if self.max_diff is None:
            return "-"
        return "yes" if self.max_diff <= self.tolerance else "NO"

    def cells(self) -> list[str]:
        if self.skipped:
            return [self.map_name, self.ours, "-", self.baseline, "-", "-", f">={SPEED_TARGET:g}x", "-", "-", "-",
                    "-", f"skipped: {self.skipped}"]
        speedup = self.speedup
        return [
            self.map_name, self.ours, f"{self.ours_rate:,.2f}", self.baseline, f"{self.baseline_rate:,.2f}",
            f"{speedup:.2f}x", f">={SPEED_TARGET:g}x", "PASS" if speedup >= SPEED_TARGET else "MISS",
            f"{self.max_diff:.1e}", f"{self.spearman:.4f}", self.agree, "",
        ]


HEADER = ["map", "mmelkit", "pairs/s", "baseline", "pairs/s", "speed-up", "target", "verdict", "max|diff|",
          "Spearman", "agree", "note"]


def format_table(results: Sequence[Result]) -> str:
    cells = [HEADER] + [r.cells() for r in results]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    numeric = {2, 4, 5, 8, 9}
    lines = []
    for k, row in enumerate(cells):
        parts = [c.rjust(w) if i in numeric and k else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_all(impl: Impl, batches: Sequence[tuple[torch.Tensor, TextTokens]]) -> torch.Tensor:
    return torch.cat([impl(pixels, tokens).detach().float().cpu() for pixels, tokens in batches])


def compare(
    ours: Impl,
    baseline: Impl,
    batches: Sequence[tuple[torch.Tensor, TextTokens]],
    repeats: int,
    warmup: int,
    convert_ours: Callable[[torch.Tensor], torch.Tensor] = lambda maps: maps,
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Median pairs/s of both sides (alternating repeat by repeat) and both sides' maps."""
    pairs = sum(len(pixels) for pixels, _ in batches)
    for _ in range(warmup):
        ours(*batches[0])
        baseline(*batches[0])
    rates: dict[str, list[float]] = {"ours": [], "baseline": []}
    maps: dict[str, torch.Tensor] = {}
    for repeat in range(repeats):
        order = [("ours", ours), ("baseline", baseline)]
        for name, impl in order if repeat % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            maps[name] = run_all(impl, batches)
            rates[name].append(pairs / (time.perf_counter() - start))
    return (statistics.median(rates["ours"]), statistics.median(rates["baseline"]), convert_ours(maps["ours"]),
            maps["baseline"])


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="scene-clip",
                        help="scene-clip (default), ViT-B-16 (random-init open_clip ViT-B/16, 224 px) or any load_model spec")
    parser.add_argument("--pairs", type=int, default=None, help="image-text pairs (default 16; 2 for ViT-B-16)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per call (default: all pairs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each side on the first batch")
    parser.add_argument("--only", default=",".join(COMPARISONS), help="comma list of %(default)s")
    parser.add_argument("--ig-steps", type=int, default=get_method("integrated_gradients").defaults["steps"])
    parser.add_argument("--ig-batch", type=int, default=get_method("integrated_gradients").defaults["batch_size"],
                        help="path points per forward (mmelkit batch_size, Captum internal_batch_size)")
    parser.add_argument("--occlusion-batch", type=int, default=get_method("occlusion").defaults["batch_size"],
                        help="occluded images per forward")
    parser.add_argument("--occlusion-per-eval", type=int, default=None,
                        help="Captum's perturbations_per_eval (default: occlusion-batch / pairs per call, so both "
                             "sides' forwards hold as many images; 1 is Captum's own default)")
    parser.add_argument("--images", choices=("auto", "scenes", "noise"), default="auto")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest |difference| of maps that counts as agreeing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    return parser


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(COMPARISONS))
    if unknown:
        raise SystemExit(f"--only: unknown comparison(s) {unknown}; choose from {', '.join(COMPARISONS)}")
    big = args.model in ("ViT-B-16", "open_clip:ViT-B-16")
    count = args.pairs or (2 if big else 16)
    batch_size = args.batch_size or count
    device = torch.device("cpu")
    model = load_benchmark_model(args.model, device, torch.float32)
    pixels, captions = make_pairs(model, count, args.images)
    batches = [(pixels[i : i + batch_size], model.tokenize(captions[i : i + batch_size]))
               for i in range(0, count, batch_size)]
    size = tuple(pixels.shape[-2:])
    occlusion_defaults = get_method("occlusion").defaults
    window = int(occlusion_defaults["window"] or model.patch_size[0])
    stride = int(occlusion_defaults["stride"] or window)

    print(f"mmelkit vs pytorch-grad-cam / Captum on the CPU | torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s) | model {args.model} ({size[0]}x{size[1]} px, patch {model.patch_size[0]}, fp32)")
    print(f"{count} pairs in calls of {batch_size}, {args.warmup} warm-up call(s) per side, median of {args.repeats} "
          f"alternating repeat(s); IG: {args.ig_steps} midpoint steps, black baseline, {args.ig_batch} points per "
          f"forward; occlusion: window {window}, stride {stride}, {args.occlusion_batch} images per forward")

    results: list[Result] = []
    if "grad_cam" in only:
        result = Result("Grad-CAM", "grad_cam", "pytorch-grad-cam GradCAM", tolerance=args.tolerance)
        if not have("pytorch_grad_cam"):
            result.skipped = "pytorch-grad-cam is not installed"
            print(f"Grad-CAM: pytorch-grad-cam is not installed; to compare: {INSTALL_HINT}")
        else:
            ours, theirs, a, b = compare(
                mmelkit_impl(model, "grad_cam"), pytorch_grad_cam_impl(model), batches, args.repeats, args.warmup,
                convert_ours=lambda maps: mmelkit_grad_cam_as_pytorch_grad_cam(maps, size),
            )
            fill(result, ours, theirs, a, b)
        results.append(result)
        print(format_table(results[-1:]).splitlines()[-1], flush=True)
    for name, label, baseline_name in (
        ("integrated_gradients", "Integrated Gradients", "Captum IntegratedGradients"),
        ("occlusion", "Occlusion", "Captum Occlusion"),
    ):
        if name not in only:
            continue
        result = Result(label, name, baseline_name, tolerance=args.tolerance)
        if not have("captum"):
            result.skipped = "captum is not installed"
            print(f"{label}: captum is not installed; to compare: {INSTALL_HINT}")
        elif name == "integrated_gradients":
            fill(result, *compare(
                mmelkit_impl(model, name, steps=args.ig_steps, baseline="black", batch_size=args.ig_batch),
                captum_ig_impl(model, args.ig_steps, args.ig_batch), batches, args.repeats, args.warmup,
            ))
        else:
            fill(result, *compare(
                mmelkit_impl(model, name, batch_size=args.occlusion_batch),
                captum_occlusion_impl(model, window, stride, args.occlusion_batch, args.occlusion_per_eval), batches,
                args.repeats, args.warmup,
            ))
        results.append(result)
        print(format_table(results[-1:]).splitlines()[-1], flush=True)

    print()
    print(format_table(results))
    print(f"* pairs/s: median over the repeats, text encoding included; verdict: speed-up >= {SPEED_TARGET:g}x "
          "(the issue's CPU target)")
    print(f"* max|diff|: largest absolute difference of the two sides' [0, 1] maps (Grad-CAM at image size, the "
          f"others on the patch grid); agree: max|diff| <= {args.tolerance:g}; Spearman: smallest over the maps")
    return results


def fill(result: Result, ours: float, theirs: float, ours_maps: torch.Tensor, their_maps: torch.Tensor) -> None:
    result.ours_rate, result.baseline_rate = ours, theirs
    result.max_diff = float((ours_maps - their_maps).abs().max())
    result.spearman = spearman(ours_maps, their_maps)


if __name__ == "__main__":
    main()
