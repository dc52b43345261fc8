"""Figures of the metrics and the benchmark runner: one trace per thing they promise to draw."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import TEXTS, make_open_clip

import mmelkit
from mmelkit.metrics.faithfulness import deletion_curves
from mmelkit.metrics.perturbation import perturbed_images
from mmelkit.metrics.retrieval import retrieval_protocol
from mmelkit.viz.metrics import (
    image_row,
    metric_bars,
    perturbation_curves_figure,
    perturbation_strip,
    retrieval_curves_figure,
    sweep_figure,
    write_figures,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> mmelkit.ClipAdapter:
    return mmelkit.load_model(make_open_clip(seed=5), device="cpu")


def test_curve_figures_have_a_line_per_map_with_its_auc(model: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    maps = {"a": torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)), "b": torch.ones(3, 4, 4)}
    curves = {name: deletion_curves(model, images, TEXTS, m, steps=4) for name, m in maps.items()}
    figure = perturbation_curves_figure(curves, show_samples=2)
    means = [t for t in figure.data if t.showlegend is not False]
    assert [t.name for t in means] == [f"{n} (AUC {float(c.auc.mean()):.3f})" for n, c in curves.items()]
    assert len(figure.data) == 2 * (2 + 1)  # two thin sample lines and the mean per map
    assert torch.allclose(torch.tensor(means[0].y).double(), curves["a"].mean_curve().double(), atol=1e-6)
    assert "removed" in figure.layout.xaxis.title.text
    retrieval = {name: retrieval_protocol(model, images, TEXTS, m) for name, m in maps.items()}
    both = retrieval_curves_figure(retrieval)
    assert len(both.data) == 4 and both.data[0].name.startswith("a (AUC")


def test_image_rows_show_the_perturbed_copies(model: mmelkit.ClipAdapter, images: torch.Tensor) -> None:
    fractions = [0.0, 0.5, 1.0]
    copies = perturbed_images(model, images[:1], torch.rand(1, 4, 4), fractions)
    strip = perturbation_strip(model, copies[0], fractions)
    assert len(strip.data) == 3 and [a.text for a in strip.layout.annotations] == ["0%", "50%", "100%"]
    # the first copy is the image itself (nothing deleted), the last all black
    assert (strip.data[-1].z == 0).all() and not (strip.data[0].z == 0).all()
    with pytest.raises(ValueError, match="labels"):
        image_row(model, copies[0], ["only one"])


def test_table_figures(tmp_path) -> None:
    table = pd.DataFrame({
        "dataset": ["scenes:1", "scenes:4", "scenes:1", "scenes:4"], "method": ["m", "m", "n", "n"],
        "metric": "pointing_game", "value": [0.9, 0.5, 0.8, 0.7], "sem": [0.01, 0.02, None, 0.03]})
    bars = metric_bars(table, "pointing_game")
    assert [t.name for t in bars.data] == ["scenes:1", "scenes:4"] and "higher is better" in bars.layout.title.text
    sweep = sweep_figure(table, "pointing_game", {"scenes:1": 1, "scenes:4": 4})
    assert [t.name for t in sweep.data] == ["m", "n"] and list(sweep.data[0].y) == [0.9, 0.5]
    path = write_figures([bars, sweep], tmp_path / "f.html")
    text = path.read_text()
    assert text.count("Plotly.newPlot") == 2 and text.count("plotly.js v") == 1  # the library inlined once
