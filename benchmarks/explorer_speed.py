"""How long one update of the course's explorer takes (``mmelkit.viz.explorer.SceneExplorer``).

    python benchmarks/explorer_speed.py [--models scene-clip,scene-llava] [--repeats 5] [--threads N]

For each model and each method the explorer offers by default, the median time of
``explorer.update()`` (the map, the deletion / insertion curves at the explorer's default steps, the
scores and the redraw), over scenes drawn from successive seeds. The course asks for under 1 s on
a CPU at the cpu profile. Speed is measured here, never in tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmelkit.viz.explorer import SceneExplorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="scene-clip,scene-llava")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, device {args.device}")
    print("| model | method | median update (s) | max (s) | under 1 s |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        explorer = SceneExplorer(name, device=args.device)
        for method in list(explorer.method.options):
            explorer.method.value = method  # one update here: the warm-up
            times = []
            for repeat in range(args.repeats):
                explorer.seed.value = repeat + 1  # a new scene rebuilds the texts and updates once
                start = time.perf_counter()
                explorer.update()
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            print(f"| {name} | {method} | {median:.3f} | {max(times):.3f} | {'yes' if median < 1 else 'NO'} |")


if __name__ == "__main__":
    main()
