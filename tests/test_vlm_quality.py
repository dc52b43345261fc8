"""The shipped scene-llava on held-out scenes: the issue's targets, and checks that its answers come
from the image.

The evaluation is deterministic (fixed held-out seeds, greedy decoding), so ``quality`` is exactly
what `mmelkit eval vlm` prints and the README reports.
"""

from __future__ import annotations

import numpy as np
import pytest

import mmelkit
from mmelkit.datasets.vqa import QUESTION_KINDS, VqaConfig, held_out
from mmelkit.models.vlm import VlmAdapter
from mmelkit.training.vlm_eval import TARGETS, VlmQuality, evaluate_vlm


@pytest.fixture(scope="module")
def vlm() -> VlmAdapter:
    return mmelkit.load_vlm("scene-llava", device="cpu")


@pytest.fixture(scope="module")
def quality(vlm: VlmAdapter) -> VlmQuality:
    return evaluate_vlm(vlm)


@pytest.mark.xfail(
    strict=True,
    reason="the shipped scene-llava is an interim model (7,000 steps on 2 CPU cores) that misses two of the "
    "issue's targets (attribute 0.835, relation 0.750); see the README and data/models/scene-llava/README.md. Strict: meeting them fails this xfail.",
)
def test_scene_llava_meets_the_issue_targets(quality: VlmQuality) -> None:
    missed = {name: t for name, t in quality.targets().items() if not t["met"]}
    assert not missed, f"targets missed: {missed}\n{quality.table()}"


def test_the_report_covers_every_target_and_kind(quality: VlmQuality) -> None:
    assert set(quality.targets()) == set(TARGETS)
    assert list(quality.accuracy) == list(QUESTION_KINDS)
    assert set(quality.pope) == {"random", "popular", "adversarial"}
    probes = quality.pope["random"].n
    assert probes % 2 == 0 and probes >= 2 * quality.samples["pope_images"]  # as many yes as no probes


def _accuracy(vlm: VlmAdapter, items: list, blind: bool) -> float:
    images = [np.full_like(i.scene.image, 128) if blind else i.scene.image for i in items]
    said = vlm.generate(images, [i.question for i in items], max_new_tokens=24, batch_size=64).texts
    return float(np.mean([s == i.answer for s, i in zip(said, items, strict=True)]))


@pytest.mark.parametrize("kind", QUESTION_KINDS)
def test_answers_come_from_the_image(vlm: VlmAdapter, kind: str) -> None:
    # the same questions about a grey image: what the language prior alone gets right
    offset = QUESTION_KINDS.index(kind)
    items = [held_out(VqaConfig(), seed=50 + offset, length=64, kind=kind)[i] for i in range(64)]
    seeing, blind = _accuracy(vlm, items, blind=False), _accuracy(vlm, items, blind=True)
    assert seeing >= blind + 0.15, (kind, seeing, blind)
