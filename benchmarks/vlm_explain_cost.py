"""What the VLM answer-map and layer methods cost, as ratios to their lower bounds in one run.

    python benchmarks/vlm_explain_cost.py [--model scene-llava|FOLDER] [--device auto|cpu|cuda]
        [--rows 8] [--repeats 3] [--threads N]

For ``--rows`` held-out (image, question, answer) rows of the scene world, each method's time is
divided by the least work it must do, timed on the same rows in the same run:

* answer_gradient_x_input: one forward + backward to the visual tokens (target <= 1.5x);
* answer_relevancy: the same bound (target <= 3x; it also records eager attention);
* answer_attention: one forward;
* answer_integrated_gradients (m steps): m forward + backward passes of the rows;
* answer_occlusion and causal tracing: their copies as batched forwards of ``batch_size`` rows
  each, i.e. ceil(copies / batch) forwards of a full batch (target <= 1.3x);
* attention knockout: the same, over its (row, window) copies.

Medians of ``--repeats`` after a warm-up; CUDA is synchronised. Speed is measured here, never in
tests.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

import mmelkit
from mmelkit.datasets.vqa import held_out
from mmelkit.methods.answers import AnswerTarget, answer_target, chunked_rows, target_score
from mmelkit.methods.layer import attention_knockout, causal_trace
from mmelkit.methods.perturbation.answer_occlusion import AnswerOcclusion, token_windows
from mmelkit.methods.token.answer_attention import AnswerAttention
from mmelkit.methods.token.answer_gradient_x_input import AnswerGradientXInput, visual_gradient
from mmelkit.methods.token.answer_integrated_gradients import AnswerIntegratedGradients
from mmelkit.methods.token.answer_relevancy import AnswerRelevancy
from mmelkit.models.vlm import VlmAdapter

TARGETS = {"answer_gradient_x_input": 1.5, "answer_relevancy": 3.0, "answer_occlusion": 1.3, "causal_trace": 1.3}


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batched_forwards(vlm: VlmAdapter, target: AnswerTarget, copies: int, batch: int) -> Callable[[], object]:
    """ceil(copies / batch) forwards of full batches of the rows (repeated): the bound of a batched
    perturbation method."""
    rows = torch.arange(batch, device=vlm.device) % len(target)
    chunk = target.select(rows)
    visual = vlm.visual_features(chunk.batch.pixel_values)

    def run() -> None:
        with torch.no_grad():
            for _ in chunked_rows(copies, batch, vlm.device):
                target_score(vlm, chunk, visual)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scene-llava")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vlm = mmelkit.load_vlm(args.model, device=args.device)
    items = [held_out(seed=140, length=args.rows, kind="attribute")[i] for i in range(args.rows)]
    target = answer_target(vlm, [i.scene.image for i in items], [i.question for i in items], [i.answer for i in items])
    device, reps = vlm.device, args.repeats
    visual = vlm.visual_features(target.batch.pixel_values)

    def forward() -> None:
        with torch.no_grad():
            target_score(vlm, target, visual)

    t_forward = timed(forward, device, reps)
    t_backward = timed(lambda: visual_gradient(vlm, target, visual), device, reps)
    rows = []

    def report(name: str, seconds: float, bound: float, what: str) -> None:
        goal = TARGETS.get(name)
        verdict = "" if goal is None else ("PASS" if seconds / bound <= goal else "MISS")
        rows.append((name, seconds, bound, seconds / bound, what, f"<= {goal}x {verdict}" if goal else ""))

    report("answer_attention", timed(lambda: AnswerAttention(vlm).visual_values(target), device, reps), t_forward, "1 forward")
    report("answer_gradient_x_input", timed(lambda: AnswerGradientXInput(vlm).visual_values(target), device, reps),
           t_backward, "1 forward+backward")
    report("answer_relevancy", timed(lambda: AnswerRelevancy(vlm).visual_values(target), device, reps), t_backward,
           "1 forward+backward")
    steps = 16
    ig = AnswerIntegratedGradients(vlm, steps=steps, batch_size=args.rows * steps)
    report("answer_integrated_gradients", timed(lambda: ig.visual_values(target), device, reps),
           t_backward * steps, f"{steps} forward+backward")
    occlusion = AnswerOcclusion(vlm)
    windows = len(token_windows(vlm.grid, occlusion.params["window"], occlusion.params["stride"]))
    batch = occlusion.params["batch_size"]
    copies = args.rows * windows
    bound = timed(batched_forwards(vlm, target, copies, batch), device, reps)
    report("answer_occlusion", timed(lambda: occlusion.visual_values(target), device, reps), bound,
           f"{math.ceil(copies / batch)} forwards of {batch}")
    knock_copies = args.rows * vlm.num_decoder_layers
    bound = timed(batched_forwards(vlm, target, knock_copies, 32), device, reps)
    report("attention_knockout", timed(lambda: attention_knockout(vlm, target, batch_size=32), device, reps), bound,
           f"{math.ceil(knock_copies / 32)} forwards of 32")
    one = target.select(torch.arange(min(2, args.rows), device=device))
    last = (one.query_positions * (one.weights > 0)).amax(1)
    trace_copies = int(sum((one.batch.attention_mask[r, : int(last[r]) + 1] > 0).sum() for r in range(len(one)))
                       * vlm.num_decoder_layers)
    bound = timed(batched_forwards(vlm, one, trace_copies, 64), device, reps)
    report("causal_trace", timed(lambda: causal_trace(vlm, one, batch_size=64), device, reps), bound,
           f"{math.ceil(trace_copies / 64)} forwards of 64 (2 rows)")

    print(f"model {args.model} on {device}, {args.rows} rows, {torch.get_num_threads()} threads; "
          f"1 forward {1000 * t_forward:.1f} ms, 1 forward+backward {1000 * t_backward:.1f} ms\n")
    print("| method | seconds | bound (s) | ratio | bound is | target |")
    print("|---|---|---|---|---|---|")
    for name, seconds, bound_s, ratio, what, goal in rows:
        print(f"| {name} | {seconds:.4f} | {bound_s:.4f} | {ratio:.2f} | {what} | {goal} |")


if __name__ == "__main__":
    main()
