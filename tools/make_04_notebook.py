"""Write notebooks/04_training_level.ipynb (chapter 04: explanation-guided learning, MEGL).

The notebook is generated, not edited by hand: change this script and run it again::

    .venv/bin/python tools/make_04_notebook.py

It is written without outputs (the course tests check that); `mmelkit course run --only
04_training_level` executes it.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

TARGET = Path(__file__).resolve().parents[1] / "notebooks" / "04_training_level.ipynb"

CELLS: list[tuple[str, str] | tuple[str, str, list[str]]] = [
    ("markdown", r"""
# 04 · Training-level interpretability: explanation-guided learning (MEGL)

Chapters 01 to 03 *read* explanations of a trained model. This chapter *trains with* them. A model
can be right for the wrong reasons: it scores well on data like its training data because it found
a shortcut, and fails as soon as the shortcut breaks. When some training images come with a
human annotation of the right evidence (a mask, a sentence), the explanation itself can be part of
the loss: the model is rewarded for looking where the annotation says.

**MEGL** (multimodal explanation-guided learning) combines a visual term (Grad-CAM against the
mask), a textual term (a generated rationale, grounded in the saliency map, "SDTG"), textual
supervision for the images that have no mask, and a distribution-consistency prior. Everything
runs on `mmelkit.training.megl`; the command line `mmelkit train megl` trains the same models.

1. the task: shapes, a shortcut patch, masks and rationales;
2. right for the wrong reasons: a plain classifier;
3. the losses, on one batch;
4. pseudo-masks from CLIP for the images without a mask;
5. explanation-guided training: before and after;
6. rationales with and without saliency grounding;
7. the ablation table.
"""),
    ("markdown", r"""
## Parameters

Set by `mmelkit course run` from `notebooks/profiles.yaml` (`cpu` for CI, `gpu` for full size).
"""),
    ("code", r"""
device = "auto"  # "auto": CUDA when available, else the CPU
profile = "cpu"  # MEGL sizes (mmelkit.training.megl.trainer.PROFILES): "cpu" (32 px, 1000 steps) or "gpu" (64 px, 3000 steps)
configs = ["plain", "gradia", "megl", "megl-no-sdtg"]  # configurations for the ablation table (names from PRESETS), or "all"
seeds = [0]  # training seeds of every configuration; sections 2-6 show the first
eval_size = 300  # images in the biased test split and in the de-biased split
examples = 4  # images per gallery (Grad-CAMs, pseudo-masks, rationales)
out_dir = "build/train/megl-notebook"  # runs are cached here, one folder per profile; a rerun loads them
""", ["parameters"]),
    ("code", r"""
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Markdown, display

import mmelkit
from mmelkit.metrics.localisation import energy_pointing_game, mask_iou
from mmelkit.metrics.text import clip_score
from mmelkit.models.loading import resolve_device
from mmelkit.training.megl import (
    PRESETS,
    attach_pseudo_masks,
    build_split,
    evaluate_megl,
    generate_rationales,
    megl_study,
    preset,
    train_megl,
)
from mmelkit.training.megl.evaluate import predict_and_explain
from mmelkit.training.megl.losses import class_mean_masks
from mmelkit.training.megl.trainer import PRESET_NOTES, PROFILES, megl_loss, new_model
from mmelkit.viz.training import cam_gallery, loss_curves, rationale_table, sample_gallery, study_bars

device = resolve_device(device)
names = list(PRESETS) if configs == "all" else list(configs)
runs = Path(out_dir) / profile  # runs/<config>/seed-<s>/, the layout megl_study uses: section 7 reuses them


def config_of(name, seed=seeds[0]):
    # A preset at the profile's sizes (image size, width, training set, steps, batch).
    return preset(name, **PROFILES[profile], seed=seed)


def train_or_load(name, train_split):
    # Trains the first seed of a configuration, or loads it when its folder already holds the finished run.
    return train_megl(config_of(name), train_split, runs / name / f"seed-{seeds[0]}", device, progress=False)


base = config_of("megl")
task = base.task()
classes = list(task.classes)
clip = mmelkit.load_model("scene-clip", device=device)  # the embedded CLIP: pseudo-masks and CLIPScore
train = build_split(task, "train", base.train_size, base.data_seed)
test = build_split(task, "test", eval_size, base.data_seed)  # the cue agrees as often as in training
debiased = build_split(task, "debiased", eval_size, base.data_seed)  # the cue is independent of the label
print(f"profile {profile!r} on {device}: {base.image_size} px images, {base.train_size} training images, "
      f"{base.steps} steps of {base.batch_size}; classes {classes}")
"""),
    ("markdown", r"""
## 1 · The task: a shape, a shortcut patch, a mask, a sentence

Each image shows one **large** shape (the label: circle, square, triangle or star) and up to two
small distractors. A small square of a **class colour** sits in one corner: a watermark. In the
training data the patch has the colour of the right class 90% of the time (`spurious = 0.9`), so
a model can learn "red corner means circle" instead of shapes. The **de-biased** split draws the
patch colour at random (it agrees with the label only by chance, about 1 in 4).

Half of the training images keep a **mask** of the large shape (tinted yellow below); for the other
half it is withheld, as in real annotated datasets where only some images were outlined. Every
image has a **rationale**, the sentence a human would say ("the large red star in the top left").
The ✗ marks images whose patch points to another class.
"""),
    ("code", r"""
shown = train.take(torch.arange(2 * examples))
titles = [f"{classes[y]} · patch {classes[c]}{'' if y == c else ' ✗'}"
          for y, c in zip(shown.labels.tolist(), shown.cue_classes.tolist(), strict=True)]
masks = [m if keep else None for m, keep in zip(shown.true_masks, shown.has_mask.tolist(), strict=True)]
sample_gallery(shown.raw_images, titles, masks=masks).show()
display(pd.DataFrame({"label": [classes[y] for y in shown.labels.tolist()],
                      "patch says": [classes[c] for c in shown.cue_classes.tolist()],
                      "mask": ["given" if k else "withheld" for k in shown.has_mask.tolist()],
                      "rationale": shown.rationales}))
pd.DataFrame([{"split": name, "images": len(split),
               "patch agrees with label": float((split.cue_classes == split.labels).float().mean()),
               "masks given": float(split.has_mask.float().mean())}
              for name, split in (("train", train), ("test (biased)", test), ("de-biased", debiased))]).set_index("split").round(3)
"""),
    ("markdown", r"""
## 2 · Right for the wrong reasons

A small CNN trained with cross-entropy only (preset `plain`). On the biased test split it looks
fine. On the de-biased split its accuracy drops, and `shortcut` says how often its prediction is
the class the patch points to (chance: 0.25). `iou` compares its Grad-CAM with the shape's mask;
`cue_energy` is the share of the Grad-CAM's mass on the patch.

Then the de-biased images whose patch disagrees with the label, split by what the model did:
followed the patch, or got the shape right. The patch covers under 2% of the image; a map that
ignored it would put about that share of its mass there. The gallery shows the first few images
where the model **followed the patch** (chosen for that, so they show the failure, not the
typical case). Grad-CAM is coarse (one cell per 4 × 4 pixels here), so heat on the patch spills
into its corner.
"""),
    ("code", r"""
plain = train_or_load("plain", train)
scores = {"plain": evaluate_megl(plain, test, debiased, clip)}
shown_metrics = ["test_acc", "debiased_acc", "shortcut", "iou", "pointing", "cue_energy"]
print(f"plain: trained in {plain.seconds:.0f} s")
pd.DataFrame(scores).T[shown_metrics].round(3)
"""),
    ("code", r"""
predicted, cams = predict_and_explain(plain, debiased)
on_patch = energy_pointing_game(cams, debiased.cue_masks.to(cams.device)).cpu()
predicted = predicted.cpu()
disagrees = debiased.cue_classes != debiased.labels
followed, right = disagrees & (predicted == debiased.cue_classes), disagrees & (predicted == debiased.labels)
patch_share = float(debiased.cue_masks.float().mean())
display(pd.DataFrame([{"de-biased images, patch disagrees": what, "images": int(rows.sum()),
                       "Grad-CAM mass on the patch": float(on_patch[rows].mean()) if rows.any() else float("nan")}
                      for what, rows in (("plain followed the patch", followed), ("plain got the shape right", right))]).round(3))
print(f"the patch covers {patch_share:.1%} of an image on average")
# the first images where plain followed the patch (then other disagreeing ones, if there are too few);
# section 5 shows the same images again
chosen = torch.cat([followed.nonzero().flatten(), (disagrees & ~followed).nonzero().flatten()])[:examples]
picked = debiased.take(chosen)
predicted_plain, cams_plain = predict_and_explain(plain, picked)
titles = [f"{classes[y]}, patch {classes[c]}: plain says {classes[p]} ({e:.0%} on patch)"
          for y, c, p, e in zip(picked.labels.tolist(), picked.cue_classes.tolist(), predicted_plain.tolist(),
                                on_patch[chosen].tolist(), strict=True)]
cam_gallery(picked.raw_images, {"plain: Grad-CAM": cams_plain}, titles).show()
"""),
    ("markdown", r"""
## 3 · The losses

MEGL's objective for a batch is

$$
L = L_{cls} + \lambda_v\, L_{att}\,[\text{mask}] + \lambda_t\, L_{txt} + \lambda_s\, L_{tsv}\,[\text{no mask}] + \lambda_d\, L_{dc}
$$

* $L_{cls}$: cross-entropy of the label.
* $L_{att}$ (images **with** a mask): the Grad-CAM $\hat A$ against the mask $A$: mean $|\hat A - A|$
  plus a binary cross-entropy (HAICS); GRADIA instead weighs $|\hat A - A|$ on the mask only.
* $L_{txt}$ (SDTG): the negative log-likelihood of the rationale under a small text decoder that
  sees the image features and the *saliency-highlighted image* $I \cdot \hat A$.
* $L_{tsv}$ (images **without** a mask): mean $|\hat A - A_T|$ with $A_T$ a pseudo-mask, the
  embedded CLIP's Grad-ECLIP map of the rationale on the image (section 4).
* $L_{dc}$: the KL divergence from the class's mean mask to the Grad-CAM as a distribution.

The Grad-CAM is computed with `create_graph=True`, so it is a differentiable function of the
weights: a loss on the explanation moves the model. The weights $\lambda$ are all 0.1 in the
`megl` preset. Below: one training batch through an untrained `megl` model.
"""),
    ("code", r"""
train = attach_pseudo_masks(train, clip)  # L_tsv needs the CLIP pseudo-masks of the images without a mask (section 4)
megl_config = config_of("megl")
fresh = new_model(megl_config, device)
batch = train.take(torch.arange(megl_config.batch_size)).to(device)
priors = class_mean_masks(train.masks, train.labels, train.has_mask, len(classes)).to(device)
total, parts = megl_loss(fresh, batch, priors)
weights = {"cls": 1.0, "att": megl_config.visual_weight, "txt": megl_config.text_weight,
           "tsv": megl_config.tsv_weight, "dc": megl_config.dc_weight}
meaning = {"cls": "cross-entropy", "att": "Grad-CAM vs mask (l1 + HAICS), masked images",
           "txt": "rationale NLL (SDTG)", "tsv": "Grad-CAM vs CLIP pseudo-mask, unmasked images",
           "dc": "KL from the class's mean mask"}
with_mask = int(batch.has_mask.sum())
print(f"one batch of {len(batch)}: {with_mask} with a mask (L_att), {len(batch) - with_mask} without (L_tsv); "
      f"total L = {float(total.detach()):.3f}")
pd.DataFrame([{"loss": f"L_{k}", "what": meaning[k], "value": v, "weight": weights[k], "weight × value": weights[k] * v}
              for k, v in parts.items()]).set_index("loss").round(4)
"""),
    ("markdown", r"""
## 4 · Pseudo-masks for the images without a mask

Where the mask is withheld, MEGL still has the rationale. The embedded CLIP explains the
rationale on the image (Grad-ECLIP), and that map, the **pseudo-mask**, stands in for the mask in
$L_{tsv}$. Here we *do* know the withheld masks, so we can check how good the stand-in is (IoU of
the pseudo-mask thresholded at half its maximum, with the true mask). A pseudo-mask is weaker
supervision than a mask: a toy CLIP on 32-pixel images is blurry, and it may also respond to the
distractors and to colour words.
"""),
    ("code", r"""
withheld = (~train.has_mask).nonzero().flatten()
pseudo_iou = mask_iou(train.pseudo_masks[withheld], train.true_masks[withheld])
some = withheld[:examples]
titles = [f"{train.rationales[i]} (IoU {iou:.2f})" for i, iou in zip(some.tolist(), pseudo_iou[:examples].tolist(), strict=True)]
cam_gallery(train.raw_images[some.numpy()], {"true mask (withheld)": train.true_masks[some].float(),
                                             "CLIP pseudo-mask": train.pseudo_masks[some]}, titles).show()
print(f"pseudo-mask IoU with the withheld mask over all {len(withheld)} such training images: "
      f"mean {float(pseudo_iou.mean()):.3f}, median {float(pseudo_iou.median()):.3f}")
"""),
    ("markdown", r"""
## 5 · Explanation-guided training

The same network, the same data and seed, now trained with the full MEGL loss. Compare the
de-biased accuracy, how often the prediction follows the patch (`shortcut`) and the Grad-CAM
scores on the whole de-biased split, then the maps of the images from section 2. Those were
picked because `plain` failed on them, so they flatter any other model: the table is the fair
comparison. The loss curves show how each part evolves (`plain` has only $L_{cls}$). One training
run is one sample: section 7 is where seeds are compared.
"""),
    ("code", r"""
megl = train_or_load("megl", train)
scores["megl"] = evaluate_megl(megl, test, debiased, clip)
print(f"megl: trained in {megl.seconds:.0f} s")
pd.DataFrame(scores).T[shown_metrics].round(3)
"""),
    ("code", r"""
predicted_megl, cams_megl = predict_and_explain(megl, picked)
titles = [f"{classes[y]}, patch {classes[c]}: plain says {classes[p]}, megl says {classes[q]}"
          for y, c, p, q in zip(picked.labels.tolist(), picked.cue_classes.tolist(), predicted_plain.tolist(), predicted_megl.tolist(), strict=True)]
cam_gallery(picked.raw_images, {"plain": cams_plain, "megl": cams_megl}, titles).show()
loss_curves({"plain": plain.history, "megl": megl.history}).show()
"""),
    ("markdown", r"""
## 6 · Rationales with and without saliency grounding (SDTG)

MEGL also trains a small decoder that writes the rationale. With **SDTG** it sees the classifier's
features *and* the saliency-highlighted image, so it can tell *where* the evidence is; the
`megl-no-sdtg` ablation sees the features only. Below: a few test images, their reference
rationales and both generated ones (words that differ from the reference in bold), then BLEU-4
and ROUGE-L against the references and CLIPScore (the embedded CLIP's image-text agreement) on
the whole test split. The CLIPScore of the references themselves is the ceiling to compare with:
this toy CLIP never saw position words, so CLIPScore barely measures *where*.
"""),
    ("code", r"""
no_sdtg = train_or_load("megl-no-sdtg", train)
scores["megl-no-sdtg"] = evaluate_megl(no_sdtg, test, debiased, clip)
few = test.take(torch.arange(examples))
sample_gallery(few.raw_images, [f"test #{i}" for i in range(examples)]).show()
rationale_table({"reference": few.rationales, "megl (grounded)": generate_rationales(megl, few),
                 "megl-no-sdtg": generate_rationales(no_sdtg, few)},
                row_labels=[f"#{i}" for i in range(examples)], title="rationales of test images").show()
text_scores = pd.DataFrame(scores).T.loc[["megl", "megl-no-sdtg"], ["bleu4", "rouge_l", "clip_score"]]
text_scores.loc["reference rationales"] = [1.0, 1.0, float(clip_score(clip, list(test.raw_images), test.rationales).mean())]
text_scores.round(3)
"""),
    ("markdown", r"""
## 7 · The ablation table

`megl_study` trains every configuration for every seed (or loads the finished runs: the models
above were saved in the same folders, so they are not trained again) and scores them on the same
test splits. The table is the mean over seeds (± the sample standard deviation when there are
several). The same study from a shell: `mmelkit train megl --configs plain gradia megl megl-no-sdtg --seeds 0 1 2`.
"""),
    ("code", r"""
study = megl_study([preset(name, **PROFILES[profile]) for name in names], seeds=seeds, out_dir=runs,
                   eval_size=eval_size, device=device, progress=False, clip=clip)
display(Markdown(study.table()))
display(Markdown("\n".join(f"- `{name}`: {PRESET_NOTES.get(name, 'custom configuration')}" for name in names)))
chance = 1 / len(classes)
study_bars(study, metrics=("debiased_acc", "shortcut", "iou"), chance={"debiased_acc": chance, "shortcut": chance}).show()
"""),
    ("code", r"""
summary = {row["config"]: row for row in study.summary()}
for name in names:
    if name != "plain" and "plain" in summary:
        gap = summary[name]["debiased_acc"] - summary["plain"]["debiased_acc"]
        spread = max(summary[name]["debiased_acc_std"], summary["plain"]["debiased_acc_std"])
        note = f" (largest std over seeds {spread:.3f})" if len(seeds) > 1 else " (one seed: no spread to compare with)"
        print(f"{name:>15}: de-biased accuracy {summary[name]['debiased_acc']:.3f}, {gap:+.3f} against plain{note}")
"""),
    ("markdown", r"""
## What to look for, honestly

* **The shortcut is real.** The plain model does much better on the biased test split than on the
  de-biased one, and on the de-biased split it follows the patch far more often than chance.
* **Explanation guidance should move both numbers**: higher de-biased accuracy, a lower
  `shortcut` rate and less Grad-CAM mass on the patch, with better IoU against the shape's mask.
  The galleries above show *where* the change happens.
* **SDTG is about the rationale, not the classifier**: grounded rationales should get the position
  words right more often (higher BLEU-4 and ROUGE-L); classification need not change.
* **One seed is an anecdote.** With the `cpu` profile each configuration is trained once, for
  1000 steps on 32-pixel images, and the plain model's de-biased accuracy alone varies by about
  ±0.1 from seed to seed. Differences between configurations in this table can be noise, and can
  even come out in the wrong order. Run the `gpu` profile (`mmelkit course run --profile gpu`:
  64 px, 3000 steps, every configuration, three seeds) or add seeds before you believe a gap, and
  compare it with the standard deviations.
* The README's MEGL section reports a three-seed study of all ten configurations, including the
  ones that did *not* help (RRR, the rationale loss for classification).
"""),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs; cell ids are stable (derived from each cell's position)."""
    cells = []
    for index, entry in enumerate(CELLS):
        kind, source = entry[0], entry[1].strip("\n")
        tags = entry[2] if len(entry) > 2 else []
        cell = new_code_cell(source) if kind == "code" else new_markdown_cell(source)
        cell.id = hashlib.sha1(f"04_training_level:{index}".encode()).hexdigest()[:8]
        if tags:
            cell.metadata["tags"] = list(tags)
        cells.append(cell)
    notebook = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(notebook)
    return notebook


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else TARGET
    nbformat.write(build(), target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
