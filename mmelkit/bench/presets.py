"""Ready-made benchmark configurations, and the MMEL paper's table layout.

* ``mmel-paper``: Confidence Drop / Increase and the retrieval protocol's deletion and insertion
  AUCs (IR, TR) for Grad-CAM, Grad-ECLIP, MMEL and the other baselines, printed in the paper's
  layout next to the figures the paper publishes (MSCOCO, CLIP ViT; see SPEC section 2);
* ``localisation``: pointing game, energy pointing game, IoU and AUROC on the scene world;
* ``clutter``: pointing, energy pointing and IoU on scenes of exactly 1, 2, 4, 8, 12 and 16
  objects, the paper's stated weakness (more than 10 objects).

The paper's numbers come from real CLIP on MSCOCO; the scene-world numbers from the embedded toy
model. They are printed side by side for reference, not as a like-for-like comparison.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pandas as pd

from mmelkit._checks import choice, did_you_mean
from mmelkit.bench.runner import BenchConfig, BenchResult

PAPER_BASELINES = ["grad_cam", "grad_eclip", "mmel", "raw_attention", "rollout", "generic_attention", "maskclip",
                   "clip_surgery"]
CLUTTER_COUNTS = (1, 2, 4, 8, 12, 16)

PRESETS: dict[str, BenchConfig] = {
    "mmel-paper": BenchConfig(
        methods=PAPER_BASELINES,
        metrics=["confidence_drop", "confidence_increase", "deletion_ir", "deletion_tr", "insertion_ir", "insertion_tr"],
        samples=200,
    ),
    "localisation": BenchConfig(methods=PAPER_BASELINES, metrics=["localisation"], samples=200),
    "clutter": BenchConfig(
        methods=["grad_cam", "grad_eclip", "mmel", "generic_attention", "maskclip"],
        datasets=[f"scenes:{k}" for k in CLUTTER_COUNTS],
        metrics=["pointing_game", "energy_pointing_game", "iou"],
        samples=100,
    ),
}

# MMEL paper (arXiv 2509.15243), MSCOCO, CLIP ViT, as stated in its summary and SPEC section 2.
PAPER_FIGURES: dict[str, dict[str, float]] = {
    "grad_cam": {"confidence_drop": 4.96, "confidence_increase": 17.84},
    "mmel": {"confidence_drop": 0.92, "confidence_increase": 42.13, "deletion_ir": 0.0992, "insertion_tr": 0.2560},
}
PAPER_RELATIVE = {"deletion": -0.172, "insertion": 0.215}  # MMEL vs Grad-ECLIP, relative change of the AUC

PAPER_COLUMNS = {
    "confidence_drop": "Confidence Drop ↓",
    "confidence_increase": "Confidence Increase ↑",
    "deletion_ir": "Deletion AUC IR ↓",
    "deletion_tr": "Deletion AUC TR ↓",
    "insertion_ir": "Insertion AUC IR ↑",
    "insertion_tr": "Insertion AUC TR ↑",
}


def preset_config(name: str, **overrides: Any) -> BenchConfig:
    """A copy of preset ``name`` with fields replaced (``samples=20``, ``methods=[...]``, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r};{did_you_mean(name, PRESETS)} presets: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def paper_table(result: BenchResult, dataset: str | None = None) -> pd.DataFrame:
    """The MMEL paper's layout: one row per method measured here, then the paper's published rows
    (marked "(paper, MSCOCO)"); columns in the paper's order. Retrieval AUCs are fractions, the
    confidence figures percentages, as in the paper."""
    held = result.config.datasets
    dataset = held[0] if dataset is None else choice("dataset", dataset, held,
                                                     listing=f"the result holds: {', '.join(held)}")
    rows = result.table[result.table["dataset"] == dataset]
    wide = rows.pivot_table(index="method", columns="metric", values="value", aggfunc="first", dropna=False)
    columns = [c for c in PAPER_COLUMNS if c in wide.columns]
    methods = [m for m in result.config.methods if m in wide.index]
    table = wide.loc[methods, columns].copy()
    table.index = [f"{m} ({dataset})" for m in methods]
    reference = pd.DataFrame.from_dict(PAPER_FIGURES, orient="index").reindex(columns=columns)
    reference.index = [f"{m} (paper, MSCOCO)" for m in reference.index]
    table = pd.concat([table, reference])
    table.columns = [PAPER_COLUMNS[c] for c in columns]
    return table


def relative_to_grad_eclip(result: BenchResult, dataset: str | None = None) -> pd.DataFrame:
    """MMEL's relative change of each retrieval AUC against Grad-ECLIP, next to the paper's claim
    (17.2% lower deletion AUC, 21.5% higher insertion AUC)."""
    held = result.config.datasets
    dataset = held[0] if dataset is None else choice("dataset", dataset, held,
                                                     listing=f"the result holds: {', '.join(held)}")
    rows = result.table[(result.table["dataset"] == dataset) & result.table["method"].isin(["mmel", "grad_eclip"])]
    values = rows.pivot_table(index="metric", columns="method", values="value", aggfunc="first")
    out = []
    for metric in ("deletion_ir", "deletion_tr", "insertion_ir", "insertion_tr"):
        if metric in values.index and {"mmel", "grad_eclip"} <= set(values.columns):
            base, mmel = values.loc[metric, "grad_eclip"], values.loc[metric, "mmel"]
            out.append({"metric": metric, "grad_eclip": base, "mmel": mmel,
                        "measured change": (mmel - base) / base if base else float("nan"),
                        "paper's claim": PAPER_RELATIVE[metric.split("_")[0]]})
    return pd.DataFrame(out).set_index("metric") if out else pd.DataFrame()


def clutter_table(result: BenchResult, metric: str = "pointing_game") -> pd.DataFrame:
    """``metric`` per method (rows) and objects per scene (columns) from a clutter run."""
    rows = result.table[result.table["metric"] == metric]
    table = rows.pivot_table(index="method", columns="dataset", values="value", aggfunc="first")
    order = [d for d in result.config.datasets if d in table.columns]
    table = table.loc[[m for m in result.config.methods if m in table.index], order]
    table.columns = [d.partition(":")[2] or d for d in order]
    table.columns.name = "objects"
    return table
