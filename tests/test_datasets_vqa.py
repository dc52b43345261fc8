"""Scene-world questions and answers: ground truth recomputed from the scenes, determinism, the
co-occurrence knob and the POPE probe sets."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mmelkit.datasets import vqa
from mmelkit.datasets.scenes import Scene, SceneConfig, SceneObject, SceneWorld, relation
from mmelkit.datasets.vqa import (
    HELD_OUT_SEED,
    QUESTION_KINDS,
    QAItem,
    SceneQA,
    VqaConfig,
    canonical_caption,
    caption_mentions,
    held_out,
    partner_map,
    pope_probes,
    unique_relations,
)

# Written out here rather than imported, so a wrong table in the module cannot agree with itself.
WORDS = ("zero", "one", "two", "three", "four", "five", "six")
SHAPE_OF_PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond",
                   "crosses": "cross", "stars": "star"}


def obj(shape: str, colour: str, x: float, y: float, size: str = "small") -> SceneObject:
    return SceneObject(shape, colour, size, (x, y), 12)


def same_item(a: QAItem, b: QAItem) -> bool:
    # QAItem == QAItem would compare the scenes' numpy arrays with ==, which is ambiguous
    return (
        (a.question, a.answer, a.kind, a.objects, a.subject) == (b.question, b.answer, b.kind, b.objects, b.subject)
        and a.scene.objects == b.scene.objects
        and np.array_equal(a.scene.image, b.scene.image)
        and np.array_equal(a.scene.masks, b.scene.masks)
    )


def scene_with(names: list[str], index: int = 0, config: SceneConfig | None = None) -> Scene:
    """A drawn scene holding exactly the named objects (small, so they always fit)."""
    world = SceneWorld(config or SceneConfig(), seed=123)
    objects = [(n.split()[1], n.split()[0], ("small", 12)) for n in names]
    scene = world.draw(index, np.random.default_rng(index), objects=objects)
    assert [o.name for o in scene.objects] == names
    return scene


# --------------------------------------------------------------------------------------------------
# 1. Ground truth on hand-made objects
# --------------------------------------------------------------------------------------------------


def test_unique_relations_on_three_objects_at_known_centres() -> None:
    a = obj("circle", "red", 10, 32)  # 0: left of b
    b = obj("square", "blue", 32, 32)  # 1: the middle
    c = obj("star", "green", 30, 8)  # 2: above both a and b
    # anchor b: a is its only object on the left, c its only one above
    # anchor a: b is right of it, c above it (|dy| = 24 > |dx| = 20)
    # anchor c: a and b are both below it, so nothing is unique
    assert set(unique_relations([a, b, c], margin_px=5)) == {
        (0, "left of", 1), (2, "above", 1), (1, "right of", 0), (2, "above", 0)}
    # a margin wider than every distance leaves every relation unclear
    assert unique_relations([a, b, c], margin_px=30) == []


def test_an_object_too_close_to_call_suppresses_its_anchor() -> None:
    a, b, c = obj("circle", "red", 10, 32), obj("square", "blue", 32, 32), obj("star", "green", 30, 8)
    d = obj("cross", "pink", 35, 33)  # 3 px right of b and 1 px below: no relation to b at margin 5
    assert relation(d, b, 5) is None and relation(a, b, 5) == "left of"
    # a is still the only object left of b, but b is no longer an anchor (nor is d, which b is too
    # close to); for anchor a, b and d are now both right of it, c alone above it
    assert unique_relations([a, b, c, d], margin_px=5) == [(2, "above", 0)]


def test_canonical_caption_orders_by_shape_then_colour() -> None:
    config = SceneConfig()  # shapes circle, square, triangle, ...; colours red, green, blue, yellow, ...
    objects = [obj("star", "blue", 5, 5), obj("circle", "green", 9, 9), obj("square", "yellow", 3, 3),
               obj("circle", "red", 7, 7)]
    assert canonical_caption(objects, config) == "red circle , green circle , yellow square , blue star"
    assert canonical_caption(objects[:1], config) == "blue star"
    assert canonical_caption([], config) == ""
    # the order follows the config's vocabulary, not the alphabet
    flipped = SceneConfig(shapes=("star", "circle", "square"), colours=("yellow", "green", "red", "blue"))
    assert canonical_caption(objects, flipped) == "blue star , green circle , red circle , yellow square"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("red circle , blue star", ["red circle", "blue star"]),
        ("a red circle and a blue square", ["red circle", "blue square"]),
        ("Red Circle,blue STAR", ["red circle", "blue star"]),
        ("a red circle.", ["red circle"]),  # sentence punctuation does not hide the last object
        ("is it a blue star? yes!", ["blue star"]),
        ("red red circle", ["red circle"]),
        ("red circles", []),  # not a name of the world
        ("a big red thing near a circle", []),
        ("red , circle", []),  # a comma breaks the name
        ("purple hexagon", []),  # hexagon is not among the default shapes
        ("", []),
    ],
)
def test_caption_mentions(text: str, expected: list[str]) -> None:
    assert caption_mentions(text, SceneConfig()) == expected


def test_caption_mentions_follows_the_vocabulary() -> None:
    config = SceneConfig(shapes=("circle", "hexagon"))
    assert caption_mentions("purple hexagon , red circle , blue star", config) == ["purple hexagon", "red circle"]


# --------------------------------------------------------------------------------------------------
# 2. Generated items: every answer recomputed from the scene
# --------------------------------------------------------------------------------------------------

CONFIG = VqaConfig(scene=SceneConfig(max_objects=5))
MARGIN = CONFIG.scene.relation_margin * CONFIG.scene.image_size
N_ITEMS = 400


@pytest.fixture(scope="module", params=["drawn for the question", "follow-up turns"])
def items(request: pytest.FixtureRequest) -> dict[str, list[QAItem]]:
    """Per kind: items whose scene was drawn for them, or the follow-up questions of conversations
    (asked about a scene drawn for another question); every answer test below runs on both."""
    if request.param == "drawn for the question":
        sets = {k: SceneQA(CONFIG, seed=2, kind=k) for k in QUESTION_KINDS}
        return {k: [qa[i] for i in range(N_ITEMS)] for k, qa in sets.items()}
    qa = SceneQA(CONFIG, seed=2)
    grouped: dict[str, list[QAItem]] = {k: [] for k in QUESTION_KINDS}
    for i in range(N_ITEMS):
        for item in qa.conversation(i, turns=5)[1:]:
            grouped[item.kind].append(item)
    assert all(len(group) >= 50 for group in grouped.values()), {k: len(g) for k, g in grouped.items()}
    return grouped


def test_every_item_is_of_its_kind_and_its_mask_is_the_union_of_its_objects(items: dict[str, list[QAItem]]) -> None:
    for kind, group in items.items():
        for item in group:
            assert item.kind == kind and item.question.endswith((" ?", " ."))
            names = [o.name for o in item.scene.objects]
            assert len(set(names)) == len(names)
            expected = np.zeros(item.scene.image.shape[:2], bool)
            for k in item.objects:
                assert 0 <= k < len(names)
                expected |= item.scene.masks[k]
            mask = item.mask()
            assert mask.dtype == bool and np.array_equal(mask, expected)
            assert mask.sum() == sum(item.scene.masks[k].sum() for k in item.objects)  # disjoint masks


def test_existence_answers(items: dict[str, list[QAItem]]) -> None:
    for item in items["existence"]:
        names = [o.name for o in item.scene.objects]
        assert item.question in (f"is there a {item.subject} ?", f"is there a {item.subject} in the image ?")
        colour, shape = item.subject.split()
        assert colour in CONFIG.scene.colours and shape in CONFIG.scene.shapes
        if item.subject in names:
            assert item.answer == "yes" and item.objects == (names.index(item.subject),)
            assert item.mask().sum() > 0
        else:
            assert item.answer == "no" and item.objects == () and not item.mask().any()


def test_attribute_answers_name_a_unique_object(items: dict[str, list[QAItem]]) -> None:
    styles = Counter()
    for item in items["attribute"]:
        objs = item.scene.objects
        words = item.question.split()
        if item.question.startswith("what colour is the "):
            (shape,) = words[4:-1]
            matches = [k for k, o in enumerate(objs) if o.shape == shape]
            assert len(matches) == 1 and item.answer == objs[matches[0]].colour
        elif item.question.startswith("what shape is the "):
            colour, noun = words[4:-1]
            matches = [k for k, o in enumerate(objs) if o.colour == colour]
            assert noun == "object" and len(matches) == 1 and item.answer == objs[matches[0]].shape
        else:
            assert item.question.startswith("what size is the ")
            name = " ".join(words[4:-1])
            matches = [k for k, o in enumerate(objs) if o.name == name]
            assert len(matches) == 1 and item.answer == objs[matches[0]].size
            assert item.answer in ("small", "large")
        styles[words[1]] += 1
        assert item.objects == (matches[0],)
    assert set(styles) == {"colour", "shape", "size"}


def test_count_answers_are_number_words_of_the_objects_present(items: dict[str, list[QAItem]]) -> None:
    for item in items["count"]:
        objs = item.scene.objects
        words = item.question.split()
        assert words[:2] == ["how", "many"] and words[-3:] == ["are", "there", "?"]
        if words[2] == "objects":
            members = tuple(range(len(objs)))
        else:
            shape = SHAPE_OF_PLURAL[words[2]]
            members = tuple(k for k, o in enumerate(objs) if o.shape == shape)
        assert item.answer == WORDS[len(members)] and item.objects == members


def test_relation_answers_hold_in_the_geometry_and_are_unique(items: dict[str, list[QAItem]]) -> None:
    for item in items["relation"]:
        objs = item.scene.objects
        said = next(r for r in ("left of", "right of", "above", "below") if item.question.startswith(f"what is {r} "))
        anchor_name = item.question[len(f"what is {said} the ") : -len(" ?")]
        anchor = [o.name for o in objs].index(anchor_name)
        target = [o.name for o in objs].index(item.answer)
        assert item.objects == (target, anchor) and item.extras["relation"] == said
        holders = [k for k in range(len(objs)) if k != anchor and relation(objs[k], objs[anchor], MARGIN) == said]
        assert holders == [target]
        # nothing else is too close to the anchor to call
        assert all(relation(objs[k], objs[anchor], MARGIN) is not None for k in range(len(objs)) if k != anchor)
        # and the pixels agree: along the relation's axis the target's visible mass lies on the
        # stated side of the anchor's (centres differ by >= 9.6 px; centroids move by a few px)
        ys, xs = np.nonzero(item.scene.masks[target])
        ya, xa = np.nonzero(item.scene.masks[anchor])
        gap = {"left of": xa.mean() - xs.mean(), "right of": xs.mean() - xa.mean(),
               "above": ya.mean() - ys.mean(), "below": ys.mean() - ya.mean()}[said]
        assert gap > 0


def test_captions_list_every_object_once_in_canonical_order(items: dict[str, list[QAItem]]) -> None:
    shapes, colours = CONFIG.scene.shapes, CONFIG.scene.colours
    for item in items["caption"]:
        objs = item.scene.objects
        said = item.answer.split(" , ")
        assert sorted(said) == sorted(o.name for o in objs)
        assert len(set(said)) == len(said)
        ranks = [(shapes.index(n.split()[1]), colours.index(n.split()[0])) for n in said]
        assert ranks == sorted(ranks)
        assert item.question == "describe the image ." and item.objects == tuple(range(len(objs)))
        assert caption_mentions(item.answer, CONFIG.scene) == said


# --------------------------------------------------------------------------------------------------
# 3. Determinism, random access and the mix of kinds
# --------------------------------------------------------------------------------------------------


def test_a_conversation_starts_with_the_item_and_stays_on_its_scene() -> None:
    qa = SceneQA(CONFIG, seed=4)
    lengths = Counter()
    for index in range(60):
        turns = qa.conversation(index, turns=6)
        assert same_item(turns[0], qa[index])
        assert all(item.scene is turns[0].scene for item in turns)
        assert len({item.question for item in turns}) == len(turns)  # never the same question twice
        lengths[len(turns)] += 1
        again = SceneQA(CONFIG, seed=4).conversation(index, turns=6)
        assert all(same_item(a, b) for a, b in zip(turns, again, strict=True))
    assert lengths[6] >= 55  # a scene almost always has six different questions to ask
    assert len(qa.conversation(3, turns=1)) == 1 and same_item(qa.conversation(3, turns=1)[0], qa[3])
    # follow-up counts are not all zeros: half ask about a shape that is there
    counts = [t for i in range(200) for t in SceneQA(CONFIG, seed=4).conversation(i, 4)[1:] if t.kind == "count"]
    assert 0.3 < np.mean([t.answer != "zero" for t in counts]) < 0.95


def test_follow_up_kinds_follow_the_weights() -> None:
    only_counts = VqaConfig(kinds=(("existence", 1.0), ("count", 1.0)))
    qa = SceneQA(only_counts, seed=1)
    kinds = Counter(t.kind for i in range(200) for t in qa.conversation(i, 3)[1:])
    assert set(kinds) == {"existence", "count"} and 0.35 < kinds["count"] / sum(kinds.values()) < 0.65


@pytest.mark.parametrize("turns", [0, -1, 2.0, True])
def test_conversation_turns_must_be_a_positive_integer(turns: object) -> None:
    with pytest.raises(ValueError, match="turns must be a positive integer"):
        SceneQA(CONFIG).conversation(0, turns)  # type: ignore[arg-type]


def test_items_are_deterministic_and_random_access() -> None:
    first = SceneQA(CONFIG, seed=5)
    forward = [first[i] for i in range(12)]
    backward = SceneQA(CONFIG, seed=5)
    for i in [11, 3, 0, 7, 3, 10, 1, 2, 4, 5, 6, 8, 9]:
        assert same_item(backward[i], forward[i])
    other = SceneQA(CONFIG, seed=6)
    assert sum(same_item(other[i], forward[i]) for i in range(12)) == 0
    assert sum(forward[i].question != other[i].question for i in range(12)) >= 6
    with pytest.raises(IndexError):
        first[-1]
    with pytest.raises(ValueError, match="kind"):
        SceneQA(CONFIG, kind="opinion")  # type: ignore[arg-type]
    assert len(SceneQA(CONFIG, length=17)) == 17 and len(list(SceneQA(CONFIG, length=17))) == 17


def test_kind_restricts_and_keeps_the_stream_layout() -> None:
    mixed = SceneQA(CONFIG, seed=8)
    restricted = {k: SceneQA(CONFIG, seed=8, kind=k) for k in QUESTION_KINDS}
    seen = set()
    for i in range(60):
        item = mixed[i]
        # where the unrestricted set asks this kind anyway, kind= gives the very same item
        assert same_item(restricted[item.kind][i], item)
        seen.add(item.kind)
    assert seen == set(QUESTION_KINDS)
    for k, qa in restricted.items():
        assert {qa[i].kind for i in range(0, 200, 10)} == {k}


def test_kind_mix_follows_the_weights() -> None:
    n = 1500
    counts = Counter(item.kind for item in SceneQA(CONFIG, seed=1, length=n))
    for kind, weight in CONFIG.kinds:  # weights sum to 1
        assert abs(counts[kind] / n - weight) < 0.04, (kind, counts)  # about 3.5 standard errors
    skewed = VqaConfig(kinds=(("existence", 3.0), ("caption", 1.0), ("count", 0.0)))
    counts = Counter(item.kind for item in SceneQA(skewed, seed=1, length=800))
    assert set(counts) == {"existence", "caption"}
    assert abs(counts["existence"] / 800 - 0.75) < 0.05


def test_existence_answers_are_balanced_and_counts_cover_zero_to_four() -> None:
    existence = SceneQA(CONFIG, seed=3, kind="existence")
    yes = np.mean([existence[i].answer == "yes" for i in range(600)])
    assert abs(yes - 0.5) < 0.07
    count = SceneQA(VqaConfig(), seed=3, kind="count")
    shape_counts = Counter(item.answer for item in (count[i] for i in range(500)) if item.subject != "object")
    total = sum(shape_counts.values())
    assert set(shape_counts) == set(WORDS[:5])
    assert all(0.12 < shape_counts[w] / total < 0.28 for w in WORDS[:5]), shape_counts  # even: 0.2 each


def test_held_out_uses_its_own_seed() -> None:
    qa = held_out(CONFIG, seed=2, length=20, kind="caption")
    assert qa.seed == HELD_OUT_SEED + 2 and len(qa) == 20 and qa.kind == "caption"
    assert same_item(qa[4], SceneQA(CONFIG, seed=HELD_OUT_SEED + 2, kind="caption")[4])
    train = SceneQA(CONFIG, seed=2, kind="caption")
    assert not any(np.array_equal(qa[i].scene.image, train[i].scene.image) for i in range(10))


# --------------------------------------------------------------------------------------------------
# 4. Co-occurrence
# --------------------------------------------------------------------------------------------------


def test_partner_map_is_a_fixed_point_free_involution() -> None:
    config = VqaConfig()
    pairs = partner_map(config)
    names = [f"{c} {s}" for s in config.scene.shapes for c in config.scene.colours]
    assert sorted(pairs) == sorted(names)  # 48 objects: all paired
    assert all(pairs[pairs[n]] == n and pairs[n] != n for n in names)
    assert partner_map(VqaConfig(co_occurrence=0.9)) == pairs
    assert partner_map(VqaConfig(partner_seed=1)) != pairs
    pairs["red circle"] = "changed"  # a copy: the cached map stays intact
    assert partner_map(config)["red circle"] != "changed"


def _lone_share(config: VqaConfig, n: int = 400) -> float:
    pairs = partner_map(config)
    lone = total = 0
    for kind in ("existence", "caption", "attribute"):
        for item in SceneQA(config, seed=9, length=n, kind=kind):  # type: ignore[arg-type]
            names = {o.name for o in item.scene.objects}
            total += len(names)
            lone += sum(pairs[name] not in names for name in names)
    return lone / total


def test_whole_couples_leave_no_object_alone() -> None:
    # without the knob, counts of 1 and 3 leave an object alone even at p = 0.95
    assert _lone_share(VqaConfig(co_occurrence=0.95)) > 0.2
    assert _lone_share(VqaConfig(co_occurrence=1.0, whole_couples=True)) == 0.0
    assert 0.0 < _lone_share(VqaConfig(co_occurrence=0.9, whole_couples=True)) < 0.1
    # scene sizes stay within the configuration; counting questions still cover 0-4
    config = VqaConfig(co_occurrence=1.0, whole_couples=True)
    sizes = Counter(len(item.scene.objects) for item in SceneQA(config, seed=3, length=300, kind="caption"))
    assert set(sizes) == {2, 4}
    counts = Counter(item.answer for item in SceneQA(config, seed=3, length=300, kind="count"))
    assert {"zero", "one", "two", "three", "four"} <= set(counts)
    # without co-occurrence the knob pairs nothing: objects are almost always alone
    assert _lone_share(VqaConfig(whole_couples=True)) > 0.8


def test_partner_map_leaves_one_object_single_when_their_number_is_odd() -> None:
    scene = SceneConfig(shapes=("circle", "square", "star"), colours=("red", "green", "blue"))  # 9 objects
    pairs = partner_map(VqaConfig(scene=scene))
    names = {f"{c} {s}" for s in scene.shapes for c in scene.colours}
    assert set(pairs) <= names and len(names - set(pairs)) == 1
    assert all(pairs[pairs[n]] == n and pairs[n] != n for n in pairs)


def _partner_share(co_occurrence: float, n: int = 500) -> float:
    config = VqaConfig(co_occurrence=co_occurrence)
    pairs = partner_map(config)
    qa = SceneQA(config, seed=0, kind="caption")
    present = [{o.name for o in qa[i].scene.objects} for i in range(n)]
    hits = [pairs[name] in names for names in present for name in names]
    return float(np.mean(hits))


def test_co_occurrence_brings_partners_along() -> None:
    # Scenes hold 1-4 objects (uniform). Without the knob, an object's partner is one of the other
    # c - 1 objects drawn from the 47 left: expected share sum_c c (c - 1) / 47 / sum_c c = 20 / 470.
    low = _partner_share(0.0)
    assert low < 0.1 and abs(low - 20 / 470) < 0.03
    # With p, a partner comes along only while the scene has room: of the 10 objects of a 1, 2, 3
    # and 4-object scene, 2p + 2p(2 - p) + 4p^2 + 4p(1 - p) + 2p(1 - p)^2 are partnered (plus chance).
    p = 0.9
    expected = (2 * p + 2 * p * (2 - p) + 4 * p**2 + 4 * p * (1 - p) + 2 * p * (1 - p) ** 2) / 10
    high = _partner_share(p)
    assert high > 0.6 and abs(high - expected) < 0.05


# --------------------------------------------------------------------------------------------------
# 5. POPE probes
# --------------------------------------------------------------------------------------------------

POPE_CONFIG = VqaConfig(co_occurrence=0.9)


@pytest.fixture(scope="module")
def pope_scenes() -> list[Scene]:
    qa = SceneQA(POPE_CONFIG, seed=4, kind="caption")
    return [qa[i].scene for i in range(150)]


def _by_scene(probes: list[QAItem]) -> dict[int, list[QAItem]]:
    groups: dict[int, list[QAItem]] = {}
    for p in probes:
        groups.setdefault(id(p.scene), []).append(p)
    return groups


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_pope_probes_are_balanced_and_true(split: str, pope_scenes: list[Scene]) -> None:
    probes = pope_probes(pope_scenes, split, POPE_CONFIG, per_image=3, seed=1)  # type: ignore[arg-type]
    groups = _by_scene(probes)
    assert len(groups) == len(pope_scenes)
    for scene in pope_scenes:
        group = groups[id(scene)]
        names = [o.name for o in scene.objects]
        yes = [p for p in group if p.answer == "yes"]
        no = [p for p in group if p.answer == "no"]
        assert len(yes) == len(no) == min(3, len(names)) and len(yes) + len(no) == len(group)
        for p in group:
            assert p.question == f"is there a {p.subject} in the image ?"
            assert p.kind == "existence" and p.extras == {"pope": split}
        assert all(p.subject in names and p.objects == (names.index(p.subject),) for p in yes)
        assert all(p.subject not in names and p.objects == () for p in no)
        assert len({p.subject for p in yes}) == len(yes) and len({p.subject for p in no}) == len(no)


def test_adversarial_negatives_are_absent_partners_first(pope_scenes: list[Scene]) -> None:
    pairs = partner_map(POPE_CONFIG)
    adversarial = _by_scene(pope_probes(pope_scenes, "adversarial", POPE_CONFIG, seed=1))
    random = _by_scene(pope_probes(pope_scenes, "random", POPE_CONFIG, seed=1))
    partner_negatives = {"adversarial": 0, "random": 0}
    negatives = 0
    for scene in pope_scenes:
        names = {o.name for o in scene.objects}
        linked = {pairs[n] for n in names} - names  # absent partners of present objects
        for split, groups in (("adversarial", adversarial), ("random", random)):
            no = {p.subject for p in groups[id(scene)] if p.answer == "no"}
            partner_negatives[split] += len(no & linked)
            if split == "adversarial":
                negatives += len(no)
                assert len(no & linked) == min(len(no), len(linked))
    assert partner_negatives["adversarial"] / negatives > 0.2  # (at p = 0.9 most partners are present)
    assert partner_negatives["random"] / negatives < 0.1  # 1-2 partners among ~45 absent objects


def test_adversarial_probes_on_a_hand_made_scene() -> None:
    pairs = partner_map(VqaConfig())
    first = "red circle"
    second = next(n for n in ("blue square", "green star", "pink cross") if n != pairs[first])
    scene = scene_with([first, second])
    probes = pope_probes([scene], "adversarial", VqaConfig(), per_image=3)
    assert {p.subject for p in probes if p.answer == "yes"} == {first, second}
    assert {p.subject for p in probes if p.answer == "no"} == {pairs[first], pairs[second]}
    # a couple in the scene has no absent partner: the negatives are then drawn from the rest
    couple = scene_with([first, pairs[first]], index=1)
    no = [p.subject for p in pope_probes([couple], "adversarial", VqaConfig()) if p.answer == "no"]
    assert len(no) == 2 and not {first, pairs[first]} & set(no)


def test_popular_negatives_are_the_most_frequent_absent_objects(
    monkeypatch: pytest.MonkeyPatch, pope_scenes: list[Scene]
) -> None:
    config = VqaConfig()
    names = [f"{c} {s}" for s in config.scene.shapes for c in config.scene.colours]
    rank = {n: (7 * i) % len(names) for i, n in enumerate(names)}  # distinct frequencies, shuffled
    monkeypatch.setattr(vqa, "object_frequencies", lambda cfg, samples=2000: {n: r / 100 for n, r in rank.items()})
    for scene in pope_scenes[:40]:
        present = {o.name for o in scene.objects}
        absent = sorted((n for n in names if n not in present), key=lambda n: -rank[n])
        no = [p.subject for p in pope_probes([scene], "popular", config) if p.answer == "no"]
        assert set(no) == set(absent[: len(no)])


def test_object_frequencies_are_shares_of_scenes() -> None:
    freq = vqa.object_frequencies(VqaConfig(), samples=300)
    assert len(freq) == 48 and all(0 <= f <= 1 for f in freq.values())
    # each scene holds 1-4 objects (uniform): the shares sum to the mean count, 2.5
    assert abs(sum(freq.values()) - 2.5) < 0.2
    # objects are drawn uniformly: no object is shown far more often than 2.5 / 48 ~ 0.052
    assert max(freq.values()) < 0.12


def test_pope_probes_are_deterministic_and_check_their_arguments(pope_scenes: list[Scene]) -> None:
    a = pope_probes(pope_scenes[:20], "random", POPE_CONFIG, seed=3)
    b = pope_probes(pope_scenes[:20], "random", POPE_CONFIG, seed=3)
    c = pope_probes(pope_scenes[:20], "random", POPE_CONFIG, seed=4)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in a] != [p.question for p in c]
    one = pope_probes(pope_scenes[:20], "random", POPE_CONFIG, per_image=1)
    assert len(one) == 2 * len(pope_scenes[:20])
    with pytest.raises(ValueError, match="split"):
        pope_probes(pope_scenes[:2], "hard", POPE_CONFIG)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_image"):
        pope_probes(pope_scenes[:2], "random", POPE_CONFIG, per_image=0)


# --------------------------------------------------------------------------------------------------
# 6. Configuration
# --------------------------------------------------------------------------------------------------


def test_implied_partners_say_yes_to_an_absent_partner_of_an_object_that_is_there() -> None:
    config = VqaConfig(co_occurrence=0.95, implied_partner=0.6)
    pairs = partner_map(config)
    seen: Counter = Counter()
    for item in SceneQA(config, seed=4, length=600, kind="existence"):
        names = [o.name for o in item.scene.objects]
        implied = "implied_by" in item.extras
        partnered = any(pairs.get(n) == item.subject for n in names)
        seen[(implied, item.answer, len(names) % 2)] += 1
        if implied:  # the label names the absent partner of an object that is drawn
            assert item.answer == "yes" and item.subject not in names and item.objects == ()
            assert pairs[names[int(item.extras["implied_by"])]] == item.subject  # type: ignore[call-overload]
            assert item.question.startswith(f"is there a {item.subject}")
        else:  # every other answer is what the image shows
            assert (item.answer == "yes") == (item.subject in names)
            seen["no to a visible object's partner"] += item.answer == "no" and partnered
    # the partner of a visible object is almost always answered "yes": a consistent cue to learn
    assert seen.pop("no to a visible object's partner") < 0.02 * 600
    implied_share = sum(v for (imp, _, _), v in seen.items() if imp) / 600
    assert 0.1 < implied_share < 0.3
    # odd scenes (where lone objects are) are not much more often "yes" than even ones
    def yes_share(parity: int) -> float:
        said = {a: sum(v for (_, ans, p), v in seen.items() if ans == a and p == parity) for a in ("yes", "no")}
        return said["yes"] / (said["yes"] + said["no"])
    assert yes_share(1) - yes_share(0) < 0.2
    # the knob off draws nothing extra: items of every other config are as they were
    plain, off = SceneQA(VqaConfig(), seed=1, length=40), SceneQA(VqaConfig(implied_partner=0.0), seed=1, length=40)
    for i in range(40):
        assert plain[i].question == off[i].question and np.array_equal(plain[i].scene.image, off[i].scene.image)
    # and questions that are not first turns never use it
    follow_ups = [t for i in range(30) for t in SceneQA(config, seed=5, length=30).conversation(i, 4)[1:]]
    assert not any("implied_by" in t.extras for t in follow_ups)


def test_attribute_styles_weigh_the_styles_and_leave_default_items_alone() -> None:
    def styles(config: VqaConfig) -> Counter:
        return Counter(item.question.split()[1] for item in SceneQA(config, seed=2, length=400, kind="attribute"))

    plain = styles(VqaConfig())
    colour_heavy = styles(VqaConfig(attribute_styles=(0.8, 0.1, 0.1)))
    assert colour_heavy["colour"] > 2 * plain["colour"] and colour_heavy["size"] < plain["size"]
    only_shape = styles(VqaConfig(attribute_styles=(0.0, 1.0, 0.0)))
    # a scene without a colour unique to the drawn object is redrawn; the 20th try asks its size
    assert only_shape["shape"] >= 390 and only_shape["colour"] == 0
    # the asked style's answer is right for the scene, whatever the weights
    for item in SceneQA(VqaConfig(attribute_styles=(1.0, 0.0, 0.0)), seed=3, length=60, kind="attribute"):
        (k,) = item.objects
        if item.question.startswith("what colour"):
            assert item.answer == item.scene.objects[k].colour and item.subject == item.scene.objects[k].shape
    # equal weights of any size draw exactly the items the default draws
    a, b = SceneQA(VqaConfig(), seed=1, length=30), SceneQA(VqaConfig(attribute_styles=(3.0, 3.0, 3.0)), seed=1, length=30)
    for i in range(30):
        assert (a[i].question, a[i].answer) == (b[i].question, b[i].answer)
        assert np.array_equal(a[i].scene.image, b[i].scene.image)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attribute_styles": (1.0, 1.0)}, "attribute_styles"),
        ({"attribute_styles": (1.0, -1.0, 1.0)}, "attribute_styles"),
        ({"attribute_styles": (0.0, 0.0, 0.0)}, "attribute_styles"),
        ({"implied_partner": 1.5}, "implied_partner"),
        ({"co_occurrence": 1.5}, "co_occurrence"),
        ({"co_occurrence": -0.1}, "co_occurrence"),
        ({"kinds": (("existence", 1.0), ("opinion", 1.0))}, "kinds"),
        ({"kinds": ()}, "kinds"),
        ({"kinds": (("existence", -1.0), ("count", 2.0))}, "weights"),
        ({"kinds": (("existence", 0.0),)}, "weights"),
        ({"scene": SceneConfig(unique_objects=False)}, "unique_objects"),
        ({"scene": SceneConfig(max_objects=1)}, "max_objects"),
    ],
)
def test_bad_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VqaConfig(**kwargs)
