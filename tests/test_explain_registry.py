"""Every registered method: listed with its taxonomy place, found where the tree says, and usable
with a reduced-precision model."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXTS, make_model

import mmelkit
from mmelkit.methods.base import REGISTRY, TOOLS

# cheap settings for the expensive methods: this file checks plumbing, not quality
FAST = {"rise": {"masks": 40}, "integrated_gradients": {"steps": 3}, "smoothgrad": {"samples": 3},
        "integrated_gradients_text": {"steps": 3}, "mmel": {"layers": 2}}
FOLDERS = {  # the package of each (level, granularity): the folder layout mirrors the taxonomy
    ("model", "token"): ("token", "text"),
    ("model", "architecture"): ("architecture",),
    ("data", "input"): ("perturbation", "text"),
    ("model", "layer"): ("layer",),
    ("model", "embedding"): ("embedding",),
    ("model", "neuron"): ("neuron",),
    ("data", "attribution"): ("data",),
    ("inference", "rationale"): ("inference",),
}
VLM_EXPECTED = {"answer_attention", "answer_relevancy", "answer_gradient_x_input", "answer_integrated_gradients",
                "answer_occlusion"}
EXPECTED = {"grad_eclip", "mmel", "head_text_map", "raw_attention", "rollout", "generic_attention", "grad_cam", "maskclip",
            "clip_surgery", "integrated_gradients", "smoothgrad", "rise", "occlusion", "grad_eclip_text",
            "integrated_gradients_text", "leave_one_word_out"}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_table_lists_every_method_with_its_place() -> None:
    table = mmelkit.list_methods("map")
    assert EXPECTED | VLM_EXPECTED <= set(table.index)
    assert set(table.index[table["explains"] == "vlm"]) == VLM_EXPECTED
    for column in ("level", "granularity", "family", "modality", "explains", "reference", "parameters"):
        assert table[column].notna().all(), column
    for name, cls in REGISTRY.items():
        package = cls.__module__.split(".")[2]
        assert package in FOLDERS[(cls.level, cls.granularity)], f"{name} lives in methods/{package}"
    for name, tool in TOOLS.items():  # the analysis tools follow the same layout
        package = tool.function.__module__.split(".")[2]
        assert package in FOLDERS[(tool.level, tool.granularity)], f"{name} lives in methods/{package}"
    assert set(mmelkit.list_methods().index) == set(REGISTRY) | set(TOOLS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_method_runs_in_bfloat16(name: str, images: torch.Tensor) -> None:
    model = mmelkit.load_model(make_model("open_clip-default"), device="cpu", dtype=torch.bfloat16)
    result = mmelkit.explain(model, images, TEXTS, method=name, **FAST.get(name, {}))
    values = result.maps if hasattr(result, "maps") else result.scores
    assert len(result) == 3 and torch.isfinite(values.float()).all()
    assert values.float().amax() > 0, f"{name} gave all-zero output"
