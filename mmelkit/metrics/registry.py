"""What every metric is, in one table: its category, its direction and what it needs.

Following Quantus, each metric declares its metadata once; the benchmark runner, the CLI and the
notebooks read it from here (to validate names, to sort, to say "lower is better").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmelkit._checks import choice

Category = Literal["faithfulness", "retrieval", "localisation", "sanity"]
Scope = Literal["sample", "dataset", "method"]


@dataclass(frozen=True)
class MetricInfo:
    """``scope``: ``sample`` metrics have a value per sample (the table shows the mean);
    ``dataset`` metrics need the whole gallery (retrieval); ``method`` metrics describe the method
    on a subset (the randomisation check)."""

    name: str
    category: Category
    higher_is_better: bool
    scope: Scope
    needs_masks: bool
    description: str

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


METRICS: dict[str, MetricInfo] = {m.name: m for m in [
    MetricInfo("deletion_auc", "faithfulness", False, "sample", False,
               "area under the score curve as the top pixels are deleted (Petsiuk et al. 2018)"),
    MetricInfo("insertion_auc", "faithfulness", True, "sample", False,
               "area under the score curve as the top pixels are inserted onto the substrate"),
    MetricInfo("confidence_drop", "faithfulness", False, "sample", False,
               "Average Drop in confidence (%) on image x map (Chattopadhyay et al. 2018)"),
    MetricInfo("confidence_increase", "faithfulness", True, "sample", False,
               "Average Increase in confidence (% of samples whose confidence rises on image x map)"),
    MetricInfo("deletion_ir", "retrieval", False, "dataset", False,
               "image-retrieval Recall@1 AUC while deleting 0-50% of pixels"),
    MetricInfo("deletion_tr", "retrieval", False, "dataset", False,
               "text-retrieval Recall@1 AUC while deleting 0-50% of pixels"),
    MetricInfo("insertion_ir", "retrieval", True, "dataset", False,
               "image-retrieval Recall@1 AUC while inserting 0-50% of pixels"),
    MetricInfo("insertion_tr", "retrieval", True, "dataset", False,
               "text-retrieval Recall@1 AUC while inserting 0-50% of pixels"),
    MetricInfo("pointing_game", "localisation", True, "sample", True,
               "the map's maximum lies on the referred object (15 px at 224 px tolerance)"),
    MetricInfo("energy_pointing_game", "localisation", True, "sample", True,
               "share of the map's mass on the referred object"),
    MetricInfo("iou", "localisation", True, "sample", True,
               "IoU of the map thresholded at 0.5 with the object's mask"),
    MetricInfo("auroc", "localisation", True, "sample", True,
               "area under the ROC curve of the map as a detector of the object's pixels"),
    MetricInfo("randomisation", "sanity", False, "method", False,
               "rank correlation with the map once the image tower is randomised (cascading); "
               "a method passes below 0.5"),
]}

GROUPS: dict[str, tuple[str, ...]] = {
    "faithfulness": ("deletion_auc", "insertion_auc", "confidence_drop", "confidence_increase"),
    "retrieval": ("deletion_ir", "deletion_tr", "insertion_ir", "insertion_tr"),
    "localisation": ("pointing_game", "energy_pointing_game", "iou", "auroc"),
    "sanity": ("randomisation",),
}
GROUPS["all"] = tuple(name for group in ("faithfulness", "retrieval", "localisation", "sanity") for name in GROUPS[group])


def resolve_metrics(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Metric names with groups (``faithfulness``, ``retrieval``, ``localisation``, ``sanity``,
    ``all``) expanded, duplicates dropped, order kept; an unknown name is a ValueError."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    resolved: list[str] = []
    for name in names:
        expanded = GROUPS.get(name, (name,))
        for metric in expanded:
            if metric not in METRICS:
                known = [*METRICS, *GROUPS]
                choice("metric", metric, known, listing=f"metrics and groups: {', '.join(known)}")
            if metric not in resolved:
                resolved.append(metric)
    if not resolved:
        raise ValueError("no metrics given")
    return resolved
