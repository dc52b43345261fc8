"""POPE and CHAIR: closed-form scores on hand-made answers and captions, and on scene-world probes."""

from __future__ import annotations

import functools

import pytest

from mmelkit.datasets.scenes import SceneConfig
from mmelkit.datasets.vqa import SceneQA, VqaConfig, caption_mentions, partner_map, pope_probes
from mmelkit.metrics import ChairScores, PopeScores, chair_scores, parse_yes_no, pope_scores

MENTIONS = functools.partial(caption_mentions, config=SceneConfig())


# --------------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("yes", True),
        ("Yes.", True),
        ("  YES  ", True),
        ("yes, there is a red circle", True),
        ("no", False),
        ("no, there is not", False),
        ("No.", False),
        ("", None),
        ("   ", None),
        ("maybe", None),
        ("there is no red circle", None),  # only the first word counts
        ("yesterday", None),
        ("nothing", None),
    ],
)
def test_parse_yes_no(answer: str, expected: bool | None) -> None:
    assert parse_yes_no(answer) is expected


def test_always_yes_on_a_balanced_set() -> None:
    truth = ["yes", "no"] * 5
    s = pope_scores(["yes"] * 10, truth)
    # tp = 5, fp = 5, fn = 0: precision 1/2, recall 1, F1 = 2 (1/2)(1) / (3/2) = 2/3
    assert s.precision == pytest.approx(0.5) and s.recall == pytest.approx(1.0)
    assert s.f1 == pytest.approx(2 / 3) and s.accuracy == pytest.approx(0.5)
    assert s.yes_ratio == pytest.approx(1.0) and s.n == 10 and s.unparsed == 0


def test_perfect_and_always_no_models() -> None:
    truth = ["yes", "no", "no", "yes", "yes", "no"]
    perfect = pope_scores(truth, truth)
    assert (perfect.accuracy, perfect.precision, perfect.recall, perfect.f1) == (1.0, 1.0, 1.0, 1.0)
    assert perfect.yes_ratio == pytest.approx(0.5)
    never = pope_scores(["no"] * 6, truth)
    # no predicted positives: precision, recall and F1 are 0 by convention, accuracy the share of "no"
    assert (never.precision, never.recall, never.f1, never.yes_ratio) == (0.0, 0.0, 0.0, 0.0)
    assert never.accuracy == pytest.approx(0.5)
    inverted = pope_scores(["no" if t == "yes" else "yes" for t in truth], truth)
    assert inverted.accuracy == 0.0 and inverted.f1 == 0.0 and inverted.yes_ratio == pytest.approx(0.5)


def test_a_hand_computed_confusion_matrix() -> None:
    # 4 present, 6 absent; the model says yes to 2 present (tp = 2, fn = 2) and 1 absent (fp = 1, tn = 5)
    truth = ["yes"] * 4 + ["no"] * 6
    predictions = ["yes", "Yes.", "no", "No, I don't see one", "yes, it is there", "no", "no", "no", "no", "no"]
    s = pope_scores(predictions, truth)
    assert s.accuracy == pytest.approx(7 / 10)
    assert s.precision == pytest.approx(2 / 3)
    assert s.recall == pytest.approx(1 / 2)
    assert s.f1 == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))  # = 4/7
    assert s.f1 == pytest.approx(4 / 7)
    assert s.yes_ratio == pytest.approx(3 / 10) and s.n == 10 and s.unparsed == 0
    d = s.as_dict()
    assert isinstance(s, PopeScores) and d["f1"] == s.f1 and d["n"] == 10 and set(d) == {
        "accuracy", "precision", "recall", "f1", "yes_ratio", "n", "unparsed"}


def test_unparsed_answers_count_as_no() -> None:
    truth = ["yes", "yes", "no", "no"]
    s = pope_scores(["yes", "maybe", "", "no"], truth)
    # "maybe" on a present object is a miss, "" on an absent one a correct rejection
    assert s.unparsed == 2
    assert s.accuracy == pytest.approx(3 / 4) and s.precision == pytest.approx(1.0)
    assert s.recall == pytest.approx(1 / 2) and s.yes_ratio == pytest.approx(1 / 4)
    same = pope_scores(["yes", "no", "no", "no"], truth)
    assert (same.accuracy, same.precision, same.recall, same.f1) == (s.accuracy, s.precision, s.recall, s.f1)
    assert same.unparsed == 0


def test_pope_scores_check_their_inputs() -> None:
    with pytest.raises(ValueError, match="predictions"):
        pope_scores(["yes"], ["yes", "no"])
    with pytest.raises(TypeError, match="one string"):
        pope_scores("yes", ["yes"])
    with pytest.raises(TypeError, match="one string"):
        pope_scores(["yes"], "yes")
    with pytest.raises(ValueError, match="no probes"):
        pope_scores([], [])
    with pytest.raises(ValueError, match="ground-truth"):
        pope_scores(["yes", "no"], ["yes", "maybe"])


def test_pope_on_scene_world_probes() -> None:
    config = VqaConfig(co_occurrence=0.9)
    qa = SceneQA(config, seed=6, kind="caption")
    scenes = [qa[i].scene for i in range(60)]
    probes = pope_probes(scenes, "adversarial", config)
    truth = [p.answer for p in probes]

    def oracle(p) -> str:  # looks at the scene itself
        return "yes" if p.subject in {o.name for o in p.scene.objects} else "no"

    perfect = pope_scores([oracle(p) for p in probes], truth)
    assert perfect.f1 == 1.0 and perfect.accuracy == 1.0 and perfect.yes_ratio == pytest.approx(0.5)
    assert pope_scores(["yes"] * len(probes), truth).f1 == pytest.approx(2 / 3)  # the probe set is balanced
    # a model that also says yes whenever the asked object's partner is in the scene: it is fooled
    # exactly on the adversarial negatives that are partners of present objects
    pairs = partner_map(config)

    def biased(p) -> str:
        names = {o.name for o in p.scene.objects}
        return "yes" if p.subject in names or pairs.get(p.subject) in names else "no"

    fooled = sum(p.answer == "no" and pairs.get(p.subject) in {o.name for o in p.scene.objects} for p in probes)
    assert fooled > 0
    s = pope_scores([biased(p) for p in probes], truth)
    positives = truth.count("yes")
    assert s.recall == 1.0 and s.precision == pytest.approx(positives / (positives + fooled))
    assert s.yes_ratio == pytest.approx((positives + fooled) / len(probes))


# --------------------------------------------------------------------------------------------------
# CHAIR
# --------------------------------------------------------------------------------------------------


def test_chair_of_one_caption_with_one_hallucination() -> None:
    s = chair_scores(["red circle , blue square"], [["red circle"]], MENTIONS)
    assert s.chair_i == pytest.approx(1 / 2) and s.chair_s == 1.0
    assert (s.mentions, s.hallucinated_mentions, s.captions, s.hallucinated_captions) == (2, 1, 1, 1)
    assert s.recall == 1.0
    assert isinstance(s, ChairScores) and s.as_dict()["chair_i"] == s.chair_i


def test_chair_counts_a_repeated_name_once() -> None:
    s = chair_scores(["red circle , red circle , blue square , blue square"], [["red circle"]], MENTIONS)
    assert (s.mentions, s.hallucinated_mentions) == (2, 1) and s.chair_i == pytest.approx(1 / 2)


def test_chair_over_several_captions() -> None:
    captions = [
        "a red circle and a blue square",  # present: red circle -> 1 of 2 mentions hallucinated
        "green star",  # present: green star, red circle -> no hallucination, 1 of 2 named
        "",  # present: blue square -> says nothing
        "a yellow cross , a pink diamond , a cyan star .",  # present: none of them -> 3 of 3
    ]
    present = [["red circle"], ["green star", "red circle"], ["blue square"], ["red square"]]
    s = chair_scores(captions, present, MENTIONS)
    assert (s.mentions, s.hallucinated_mentions) == (2 + 1 + 0 + 3, 1 + 0 + 0 + 3)
    assert s.chair_i == pytest.approx(4 / 6)
    assert (s.captions, s.hallucinated_captions) == (4, 2) and s.chair_s == pytest.approx(2 / 4)
    assert s.recall == pytest.approx((1 + 1 + 0 + 0) / (1 + 2 + 1 + 1))


def test_chair_of_captions_without_mentions_and_of_exact_captions() -> None:
    silent = chair_scores(["a thing", "nothing here"], [["red circle"], ["blue star"]], MENTIONS)
    assert (silent.chair_i, silent.chair_s, silent.mentions, silent.recall) == (0.0, 0.0, 0, 0.0)
    qa = SceneQA(VqaConfig(), seed=7, kind="caption")
    items = [qa[i] for i in range(40)]
    present = [[o.name for o in item.scene.objects] for item in items]
    exact = chair_scores([item.answer for item in items], present, MENTIONS)
    assert exact.chair_i == 0.0 and exact.chair_s == 0.0 and exact.recall == 1.0
    assert exact.mentions == sum(len(p) for p in present)
    # add to each caption an object its scene lacks (a partner where one is absent): one
    # hallucination per caption
    pairs = partner_map(VqaConfig())
    extra = [next((pairs[n] for n in names if pairs[n] not in names), next(n for n in pairs if n not in names))
             for names in present]
    padded = chair_scores([f"{item.answer} , {e}" for item, e in zip(items, extra, strict=True)], present, MENTIONS)
    assert padded.chair_s == 1.0 and padded.recall == 1.0
    assert padded.chair_i == pytest.approx(len(items) / (exact.mentions + len(items)))


def test_chair_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="captions"):
        chair_scores(["red circle"], [["red circle"], ["blue star"]], MENTIONS)
    with pytest.raises(TypeError, match="one string"):
        chair_scores("red circle", [["red circle"]], MENTIONS)
    with pytest.raises(ValueError, match="no captions"):
        chair_scores([], [], MENTIONS)
