"""Training speed of explanation-guided configurations: optimiser steps per second.

Double backward (a loss on Grad-CAM, or RRR's loss on input gradients) costs more than plain
cross-entropy; this prints how much, per configuration and architecture.

    python benchmarks/megl_speed.py                      # cpu profile sizes, on the CPU
    python benchmarks/megl_speed.py --profile gpu --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from mmelkit.models import load_model
from mmelkit.models.loading import resolve_device
from mmelkit.training.megl import attach_pseudo_masks, build_split, preset
from mmelkit.training.megl.trainer import PROFILES, batch_indices, megl_loss, new_model


def steps_per_second(name: str, arch: str, profile: str, device: torch.device, steps: int, clip) -> float:
    config = preset(name, arch=arch, **PROFILES[profile])
    split = build_split(config.task(), "train", min(config.train_size, 512), config.data_seed)
    if config.uses_pseudo_masks:
        split = attach_pseudo_masks(split, clip)
    data = split.to(device)
    model = new_model(config, device)
    params = list(model.classifier.parameters()) + ([] if model.generator is None else list(model.generator.parameters()))
    optimizer = torch.optim.Adam(params, lr=config.lr)
    priors = torch.full((4, config.image_size, config.image_size), 1.0 / config.image_size**2, device=device)

    def step(t: int) -> None:
        loss, _ = megl_loss(model, data.take(batch_indices(config, t, len(data), device), host_fields=False), priors)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for t in range(3):  # warm-up
        step(t)
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for t in range(steps):
        step(t)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--configs", nargs="+", default=["plain", "rrr", "gradia", "megl"])
    parser.add_argument("--archs", nargs="+", default=["cnn", "vit"])
    args = parser.parse_args()
    device = resolve_device(args.device)
    clip = load_model("scene-clip", device=device)
    sizes = PROFILES[args.profile]
    print(f"profile {args.profile} ({sizes['image_size']} px, batch {sizes['batch_size']}) on {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'config':<14} {'arch':<5} {'steps/s':>8} {'images/s':>9}")
    for arch in args.archs:
        for name in args.configs:
            rate = steps_per_second(name, arch, args.profile, device, args.steps, clip)
            print(f"{name:<14} {arch:<5} {rate:8.2f} {rate * sizes['batch_size']:9.0f}")


if __name__ == "__main__":
    main()
