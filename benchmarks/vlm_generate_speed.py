"""VLM generation speed: batched greedy decoding against single forward passes of the same length.

    python benchmarks/vlm_generate_speed.py [--model scene-llava|FOLDER] [--device auto|cpu|cuda]
        [--answers 64] [--new-tokens 8] [--repeats 3] [--threads N]

Times :meth:`VlmAdapter.generate` of ``--answers`` answers in one batch with the KV cache,
``--new-tokens`` steps each (eos ignored, so every row runs every step), against ``--answers``
forward passes of one row each over the finished sequence (prompt + answer, no padding): the
cost of one teacher-forced pass per answer, which every explanation of an answer pays anyway.
One batched forward over all the finished sequences is printed for reference. Scene-world
images and questions; medians of ``--repeats`` runs after a warm-up; CUDA is synchronised.

Target (VLM issue): generation <= 3x the single forward passes.
Without the shipped ``scene-llava`` folder a random-init model of the same architecture is
timed instead (speed does not depend on the weights), with a notice.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import mmelkit
from mmelkit.datasets.scenes import SceneConfig, SceneWorld
from mmelkit.models.loading import resolve_device
from mmelkit.models.vlm import VlmAdapter, VlmBatch, load_vlm

TARGET_RATIO = 3.0
QUESTIONS = (
    "what colour is the star ?",
    "how many circles are there ?",
    "is there a red square in the image ?",
    "what shape is on the left ?",
    "describe the image .",
    "which object is large ?",
    "where is the blue cross ?",
    "is there a green triangle ?",
)


@dataclass
class Result:
    model: str
    device: str
    answers: int
    new_tokens: int
    generate_s: float
    singles_s: float
    batched_forward_s: float

    @property
    def ratio(self) -> float:
        return self.generate_s / self.singles_s


def load(spec: str, device: torch.device) -> tuple[VlmAdapter, str]:
    try:
        return load_vlm(spec, device=device), spec
    except FileNotFoundError as error:
        if spec != "scene-llava":
            raise
        from mmelkit.models.vlm import scene_llava

        print(f"notice: {error}\nnotice: timing a random-init model of the scene-llava architecture instead")
        model = scene_llava.build_model(0, vision_from_scene_clip=False).eval().requires_grad_(False)
        return load_vlm(model, device=device), "scene-llava (random init)"


def row(batch: VlmBatch, index: int) -> VlmBatch:
    """Row ``index`` of a batch without its padding (its answers must be unpadded, as here)."""
    keep = batch.attention_mask[index].bool()
    ids = batch.input_ids[index][keep][None]
    shift = int((~keep).nonzero().numel())
    return VlmBatch(ids, torch.ones_like(ids), batch.pixel_values[index : index + 1],
                    batch.visual_positions[index : index + 1] - shift, batch.prompts[index : index + 1])


def median_seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _synchronize(device)
        began = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(vlm: VlmAdapter, name: str, answers: int, new_tokens: int, repeats: int) -> Result:
    world = SceneWorld(SceneConfig().scaled(vlm.image_size[0]), seed=0)
    images = [world[i].image for i in range(answers)]
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(answers)]
    pixels = vlm.preprocess(images)

    def generate() -> None:
        vlm.generate(pixels, questions, max_new_tokens=new_tokens, batch_size=answers, stop_at_eos=False)

    finished = vlm.generate(pixels, questions, max_new_tokens=new_tokens, batch_size=answers, stop_at_eos=False)
    full = finished.to_batch(pixels)
    singles = [row(full, i) for i in range(answers)]

    def single_forwards() -> None:
        with torch.no_grad():
            for one in singles:
                vlm.forward(one)

    def batched_forward() -> None:
        with torch.no_grad():
            vlm.forward(full)

    return Result(
        model=name,
        device=str(vlm.device),
        answers=answers,
        new_tokens=new_tokens,
        generate_s=median_seconds(generate, vlm.device, repeats),
        singles_s=median_seconds(single_forwards, vlm.device, repeats),
        batched_forward_s=median_seconds(batched_forward, vlm.device, repeats),
    )


def main(argv: Sequence[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="scene-llava", help="a VLM zoo name or a save_pretrained folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--answers", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    vlm, name = load(args.model, resolve_device(args.device))
    result = measure(vlm, name, args.answers, args.new_tokens, args.repeats)
    print(f"{name} on {result.device} ({vlm.num_visual_tokens} visual tokens, {vlm.num_decoder_layers} decoder "
          f"layers), torch {torch.__version__}, mmelkit {mmelkit.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"batched generation, {args.answers} answers x {args.new_tokens} tokens: {result.generate_s * 1e3:9.1f} ms")
    print(f"{args.answers} single forward passes (full length):       {result.singles_s * 1e3:9.1f} ms")
    print(f"one batched forward over all {args.answers} sequences:       {result.batched_forward_s * 1e3:9.1f} ms")
    verdict = "PASS" if result.ratio <= TARGET_RATIO else "MISS"
    print(f"ratio generation / single forwards: {result.ratio:.2f}x (target <= {TARGET_RATIO:.0f}x: {verdict}); "
          f"generation / batched forward: {result.generate_s / result.batched_forward_s:.2f}x")
    return result


if __name__ == "__main__":
    main()
