"""The representation tools' figures on scene-clip (README, "Inside the CLIP image tower").

    python benchmarks/representations_report.py [--model scene-clip] [--out report.json]

Held-out scenes that no decision used (seeds 2,000,601 and up): layer probes, the CLIP logit lens,
the residual decomposition's sum error, head mean-ablation, TextSpan of the last block,
CLIP-Dissect per block with match rates against random labels, TCAV with 20 runs, and the top-k
SAE (16 features, k 8, chosen on validation seeds 2,000,401/403) against its baselines. About 4
minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

import torch

import mmelkit
from mmelkit.datasets import Scene, SceneConfig, SceneWorld
from mmelkit.datasets.concepts import scene_concepts
from mmelkit.methods.embedding import (
    SaeConfig,
    decompose_image,
    mean_ablate_heads,
    score_dictionary,
    tcav,
    text_span_heads,
    train_sae,
)
from mmelkit.methods.layer import clip_logit_lens, layer_probes
from mmelkit.methods.neuron import clip_dissect, label_match_rate, true_neuron_concepts
from mmelkit.models.activations import collect_activations


def scenes(config: SceneConfig, seed: int, count: int) -> list[Scene]:
    world = SceneWorld(config, seed=seed)
    return [world[i] for i in range(count)]


def holds(scene: Scene, colour: str | None = None, shape: str | None = None) -> bool:
    return any((colour is None or o.colour == colour) and (shape is None or o.shape == shape) for o in scene.objects)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scene-clip")
    parser.add_argument("--out", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args()
    model = mmelkit.load_model(args.model)
    config = SceneConfig().scaled(model.image_size[0])
    report: dict[str, Any] = {}

    probes = layer_probes(model, train_count=4000, test_count=2000, seed=2_000_601, progress=False)
    report["probes"] = {f"{task}/{site}": values for (task, site), values in probes.accuracy.items()}
    report["probe_chance"] = probes.chance
    print("## probes (accuracy per block)")
    print(probes.to_frame().pivot_table(index=["task", "site"], columns="layer", values="accuracy").round(3))

    single = scenes(replace(config, min_objects=1, max_objects=1), 2_000_611, 2000)
    images = [s.image for s in single]
    cls_tokens = collect_activations(model, images, sites=["cls"], progress=False)
    names = [f"a {c} {s}" for s in config.shapes for c in config.colours]
    naming_labels = torch.tensor([names.index(f"a {s.objects[0].name}") for s in single])
    for task, texts in (("colour", [f"a {c} object" for c in config.colours]),
                        ("shape", [f"a {s}" for s in config.shapes]), ("naming", names)):
        if task == "naming":
            labels = naming_labels
        else:
            classes = list(config.colours if task == "colour" else config.shapes)
            labels = torch.tensor([classes.index(getattr(s.objects[0], task)) for s in single])
        report[f"lens/{task}"] = clip_logit_lens(model, None, texts, labels, activations=cls_tokens).accuracy.tolist()
        print(f"logit lens, {task}: {[round(v, 3) for v in report[f'lens/{task}']]}")

    parts = decompose_image(model, images)
    report["decomposition_max_relative_error"] = parts.relative_error().max().item()
    with torch.no_grad():
        class_features = model.encode_text(names)
    ablation = mean_ablate_heads(parts, class_features, naming_labels)
    last = model.num_image_blocks - 1
    whole_block = mean_ablate_heads(parts, class_features, naming_labels, ablate=[(last, h) for h in range(parts.num_heads)])
    report["ablation"] = {"baseline": ablation.baseline_accuracy, "top": ablation.to_frame().head(5).to_dict("records"),
                          "last_block_together": whole_block.set_drop}
    spans = text_span_heads(parts, model, m=3, layers=[last])
    report["text_span_last_block"] = {f"{layer}/{head}": [r.texts, float(r.variance_explained[-1])]
                                      for (layer, head), r in spans.results.items()}
    print(f"decomposition: largest relative error {report['decomposition_max_relative_error']:.1e}")
    print(f"mean-ablation: baseline {ablation.baseline_accuracy:.3f}; last block's heads together: "
          f"{whole_block.set_drop:.3f}\n{ablation.to_frame().head(5).round(3)}")
    print(spans.to_frame().round(3))

    crowd = scenes(config, 2_000_621, 2000)
    table = scene_concepts(crowd, config)
    neurons = collect_activations(model, [s.image for s in crowd], sites=["neurons"], progress=False)
    for layer in range(model.num_image_blocks):
        truth = true_neuron_concepts(neurons["neurons", layer], table.presence)
        for method in ("soft_wpmi", "cos3"):
            labels = clip_dissect(model, [s.image for s in crowd], layer, table.texts, method=method, progress=False)
            rate = label_match_rate(labels, truth).as_dict()
            report[f"clip_dissect/{layer}/{method}"] = rate
            print(f"CLIP-Dissect block {layer} {method}: {rate['rate']:.3f} [{rate['ci_low']:.3f}, {rate['ci_high']:.3f}] "
                  f"of {rate['kept']} neurons; shuffled {rate['baseline']:.3f}, uniform {rate['uniform_baseline']:.3f}")

    pool = scenes(config, 2_000_641, 3000)
    for concept, colour in (("red", "red"), ("red", "blue"), ("blue", "blue"), ("blue", "red")):
        result = tcav(model, [s.image for s in pool if holds(s, colour, "circle")][:100], f"a {colour} circle",
                      [s.image for s in pool if holds(s, concept) and not holds(s, shape="circle")][:200],
                      [s.image for s in pool if not holds(s, concept)][:300], -1, concept=concept, runs=20)
        report[f"tcav/{concept}/{colour}"] = {"mean": result.mean, "random": result.random_mean, "p": result.p_value,
                                              "significant": bool(result.significant)}
        print(f"TCAV {concept!r} for 'a {colour} circle': {result.mean:.3f} (random {result.random_mean:.3f}, "
              f"p {result.p_value:.1e})")

    train_embeddings = collect_activations(model, [s.image for s in scenes(config, 2_000_631, 8000)],
                                           sites=["embedding"], progress=False)["embedding"]
    held_out = scenes(config, 2_000_633, 2000)
    test_embeddings = collect_activations(model, [s.image for s in held_out], sites=["embedding"],
                                          progress=False)["embedding"]
    trained = train_sae(train_embeddings, SaeConfig(n_features=16, k=8, steps=3000), progress=False)
    scores = score_dictionary(trained.sae, test_embeddings, scene_concepts(held_out, config), pca_fit=train_embeddings)
    report["sae"] = {"fvu": trained.fvu, "seconds": trained.seconds, "table": scores.to_frame().to_dict("records")}
    print(f"SAE: variance unexplained {trained.fvu:.3f}, {trained.seconds:.1f} s\n{scores.to_frame().round(3)}")

    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
