"""Scene-world generation speed: prints scenes per second on one core.

    python benchmarks/scene_world_speed.py [--count 4000] [--size 64] [--max-objects 4]

Target (issue 3): at least 2,000 64-px scenes of 1 to 4 objects per second on one core.
"""

from __future__ import annotations

import argparse
import os
import time

# one core: keep numpy's BLAS from spreading (scene drawing is elementwise numpy anyway)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from mmelkit.datasets import SceneConfig, SceneWorld  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = SceneConfig(max_objects=args.max_objects).scaled(args.size)
    world = SceneWorld(config, seed=0)
    world[0]  # warm caches
    rates = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        for index in range(repeat * args.count, (repeat + 1) * args.count):
            world[index]
        rates.append(args.count / (time.perf_counter() - start))
    print(f"scene world, {args.size} px, 1-{args.max_objects} objects: best {max(rates):,.0f} scenes/s, "
          f"median {sorted(rates)[len(rates) // 2]:,.0f} scenes/s over {args.repeats} x {args.count} (one process)")


if __name__ == "__main__":
    main()
