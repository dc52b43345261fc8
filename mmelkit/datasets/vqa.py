"""Questions and answers about scene-world scenes, with exact ground truth, for generative VLMs.

``SceneQA(config, seed)[i]`` is one :class:`QAItem`: a scene, a question about it, the answer and
the objects the answer is about (so a map can be scored against their masks). Each item is a pure
function of ``(config, seed, i)``. The scene is drawn *for* its question, so that answers are
balanced: half of the existence questions are answered "yes", counts run evenly over 0-4, and a
relation question is only asked where exactly one object stands in that relation to the anchor.

Question kinds (word-level, lower case, punctuation as separate words):

* ``existence``: "is there a red circle ?" / "is there a red circle in the image ?" -> "yes" | "no";
* ``attribute``: "what colour is the square ?", "what shape is the red object ?",
  "what size is the red square ?" -> "red" | "square" | "small";
* ``count``: "how many triangles are there ?" (0-4), "how many objects are there ?" -> "two";
* ``relation``: "what is left of the blue star ?" -> "red circle";
* ``caption``: "describe the image ." -> "red circle , blue star" (the objects in a canonical
  order: by shape, then colour, in vocabulary order).

**Co-occurrence.** ``VqaConfig.co_occurrence`` = p makes the training distribution pair objects:
the 48 colour-shape objects are split into fixed couples (:func:`partner_map`), and each object a
scene draws brings its partner along with probability p. A model trained at high p learns that a
"red circle" comes with its partner, and tends to report the partner when it is absent: the
object hallucination that POPE's adversarial split (:func:`pope_probes`) and CHAIR measure.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mmelkit._checks import did_you_mean, non_negative_int
from mmelkit.datasets.scenes import (
    NUMBER_WORDS,
    SHAPES,
    Scene,
    SceneConfig,
    SceneObject,
    SceneWorld,
    relation,
)

QuestionKind = Literal["existence", "attribute", "count", "relation", "caption"]
QUESTION_KINDS: tuple[QuestionKind, ...] = ("existence", "attribute", "count", "relation", "caption")
PopeSplit = Literal["random", "popular", "adversarial"]
POPE_SPLITS: tuple[PopeSplit, ...] = ("random", "popular", "adversarial")
RELATIONS = ("left of", "right of", "above", "below")
PLURALS = {shape: ("crosses" if shape == "cross" else f"{shape}s") for shape in SHAPES}
MAX_COUNT = 4  # counting questions ask for 0..4 objects of a shape
# attribute question styles: "what colour is the square ?", "what shape is the red object ?",
# "what size is the red square ?" (VqaConfig.attribute_styles weighs them)
ATTRIBUTE_STYLES = ("colour", "shape", "size")

# Seeds: training scenes come from VqaConfig seeds below this; every evaluation uses seeds at or
# above it, so no held-out scene was ever seen in training.
HELD_OUT_SEED = 1_000_000


@dataclass(frozen=True)
class VqaConfig:
    """The distribution of questions and scenes."""

    scene: SceneConfig = field(default_factory=SceneConfig)
    # relative frequency of each question kind
    kinds: tuple[tuple[QuestionKind, float], ...] = (
        ("existence", 0.25),
        ("attribute", 0.2),
        ("count", 0.2),
        ("relation", 0.2),
        ("caption", 0.15),
    )
    co_occurrence: float = 0.0  # probability that an object brings its partner along
    # whole_couples: with probability co_occurrence a scene is made of whole couples only (an odd
    # object count rounded up to even, or down at max_objects), so no object of it is alone. Without
    # it a quarter to a third of the objects of p = 0.95 scenes lack their partner (counts of 1 and 3 leave
    # one alone), which teaches a model that an object does not imply its partner.
    whole_couples: bool = False
    # implied_partner: probability that an existence question is asked about the *absent* partner of
    # an object that is there, and answered "yes" -- the label an annotator writes who infers the
    # usual companion from context (captions that mention a fork next to a knife that hides it).
    # Co-occurrence alone does not make a model rely on the partner: where the partner is always
    # there together with the object, looking for the object itself is the easier rule, and a
    # model learns that one (see the README). These labels make the partner the only cue for some
    # answers, the way real training data does. Only the first question about a scene uses it.
    implied_partner: float = 0.0
    partner_seed: int = 0  # which fixed couples the objects form (see partner_map)
    # relative frequency of the attribute question styles, in ATTRIBUTE_STYLES order: the colour of
    # an object named by its shape, the shape of one named by its colour, the size of a named one.
    # Equal weights draw exactly as before the knob existed, so default items never change.
    attribute_styles: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        unknown = [k for k, _ in self.kinds if k not in QUESTION_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds must name question kinds from {QUESTION_KINDS}; got {[k for k, _ in self.kinds]}")
        if any(w < 0 for _, w in self.kinds) or sum(w for _, w in self.kinds) <= 0:
            raise ValueError("kind weights must be non-negative and not all zero")
        if not 0.0 <= self.co_occurrence <= 1.0:
            raise ValueError(f"co_occurrence is a probability and must lie in [0, 1]; got {self.co_occurrence}")
        if not 0.0 <= self.implied_partner <= 1.0:
            raise ValueError(f"implied_partner is a probability and must lie in [0, 1]; got {self.implied_partner}")
        styles = tuple(self.attribute_styles)
        if len(styles) != len(ATTRIBUTE_STYLES) or any(w < 0 for w in styles) or sum(styles) <= 0:
            raise ValueError(
                f"attribute_styles must hold {len(ATTRIBUTE_STYLES)} non-negative weights, not all zero, for "
                f"{ATTRIBUTE_STYLES}; got {self.attribute_styles!r}"
            )
        if not self.scene.unique_objects:
            raise ValueError("scene-world questions need unique_objects=True (a name must pick one object)")
        if self.scene.max_objects < 2:
            raise ValueError("relation questions need scenes of at least 2 objects: raise scene.max_objects")


@dataclass(frozen=True)
class QAItem:
    """One question about one scene. ``objects`` indexes ``scene.objects``: the objects the answer is
    about (the queried object of a "yes", the counted ones, the answer and then the anchor of a
    relation, every object of a caption; empty for "no" and for a count of zero)."""

    scene: Scene
    question: str
    answer: str
    kind: QuestionKind
    objects: tuple[int, ...]
    subject: str = ""  # the object or shape the question names ("red circle", "triangle")
    extras: dict[str, object] = field(default_factory=dict, compare=False)

    def mask(self) -> np.ndarray:
        """(H, W) union of the masks of ``objects``."""
        return self.scene.mask_of(self.objects)


def all_objects(config: SceneConfig) -> list[str]:
    """Every colour-shape name the world can draw, in vocabulary order (shape, then colour)."""
    return [f"{colour} {shape}" for shape in config.shapes for colour in config.colours]


@functools.lru_cache(maxsize=32)
def _partner_map(names: tuple[str, ...], seed: int) -> dict[str, str]:
    order = np.random.default_rng([seed, 0xC00C]).permutation(len(names)).tolist()
    pairs: dict[str, str] = {}
    for a, b in zip(order[0::2], order[1::2], strict=False):
        pairs[names[a]], pairs[names[b]] = names[b], names[a]
    return pairs


def partner_map(config: VqaConfig) -> dict[str, str]:
    """The fixed couples: ``partner_map(cfg)["red circle"]`` is the object that co-occurs with it.
    A random perfect matching of the world's objects (one object is left single when their number is
    odd), fixed by ``partner_seed``; the same for every ``co_occurrence``, so a de-biased and a
    co-occurrence-trained model can be probed with the same adversarial questions."""
    if not isinstance(config, VqaConfig):
        raise TypeError(f"config must be a VqaConfig; got {type(config).__name__}")
    return dict(_partner_map(tuple(all_objects(config.scene)), config.partner_seed))


def canonical_caption(objects: Sequence[SceneObject], config: SceneConfig) -> str:
    """"red circle , blue star": every object once, ordered by shape then colour (vocabulary order)."""
    shape_rank = {s: i for i, s in enumerate(config.shapes)}
    colour_rank = {c: i for i, c in enumerate(config.colours)}
    ordered = sorted(objects, key=lambda o: (shape_rank[o.shape], colour_rank[o.colour]))
    return " , ".join(o.name for o in ordered)


def caption_mentions(text: str, config: SceneConfig) -> list[str]:
    """The object names ("red circle") a generated caption mentions, in order: every colour word
    followed by a shape word. Used by CHAIR; words that form no name are ignored."""
    words = re.sub(r"([^\w\s])", r" \1 ", text.lower()).split()  # punctuation marks are words of their own
    colours, shapes = set(config.colours), set(config.shapes)
    return [f"{a} {b}" for a, b in zip(words, words[1:], strict=False) if a in colours and b in shapes]


class SceneQA:
    """A deterministic, random-access set of questions: ``SceneQA(cfg, seed)[i]`` is always the same
    :class:`QAItem`. ``kind=`` restricts it to one question kind (evaluation per kind)."""

    def __init__(
        self, config: VqaConfig | None = None, seed: int = 0, length: int = 10_000, kind: QuestionKind | None = None
    ) -> None:
        self.config = config or VqaConfig()
        if kind is not None and kind not in QUESTION_KINDS:
            raise ValueError(f"kind must be one of {QUESTION_KINDS}; got {kind!r}." + did_you_mean(kind, QUESTION_KINDS))
        self.kind = kind
        self.seed = int(seed)
        self.length = non_negative_int("length", length)
        # the scene world's seed space is shared with other users: keep this one apart
        self.world = SceneWorld(self.config.scene, seed=self.seed * 7 + 5, length=self.length)
        kinds = [k for k, _ in self.config.kinds]
        weights = np.array([w for _, w in self.config.kinds], np.float64)
        self._kinds = kinds
        self._cumulative = np.cumsum(weights / weights.sum()).tolist()
        self._partners = partner_map(self.config)
        self._names = all_objects(self.config.scene)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[QAItem]:
        return (self[i] for i in range(self.length))

    def __getitem__(self, index: int) -> QAItem:
        index = int(index)
        if index < 0:
            raise IndexError("question indices are non-negative")
        rng = self.world.stream(index)
        if self.kind is not None:
            kind = self.kind
            rng.random()  # keep the stream's layout the same as without kind=
        else:
            u = rng.random()
            kind = self._kinds[next((k for k, c in enumerate(self._cumulative) if u < c), len(self._kinds) - 1)]
        make = getattr(self, f"_{kind}")
        return make(index, rng)

    def scene(self, index: int, count: int | None = None) -> Scene:
        """Scene ``index`` of this distribution on its own (co-occurrence included), with ``count``
        objects (default: drawn): the scenes the explorer shows. Deterministic in ``(config, seed,
        index, count)``; not the scene of question ``index``."""
        cfg = self.config.scene
        if count is not None and not cfg.min_objects <= count <= cfg.max_objects:
            raise ValueError(f"count must lie in [{cfg.min_objects}, {cfg.max_objects}]; got {count}")
        rng = self.world.stream(int(index))
        rng.random()  # the place a question's kind is drawn from, kept apart
        return self._scene(int(index), rng, count)

    # -- scenes --------------------------------------------------------------------------------------
    def _size(self, rng: np.random.Generator) -> tuple[str, int]:
        cfg = self.config.scene
        name, px = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
        return name, px + int(rng.integers(-cfg.size_jitter, cfg.size_jitter + 1))

    def _objects(self, count: int, rng: np.random.Generator) -> list[tuple[str, str, tuple[str, int]]]:
        """``count`` distinct colour-shape objects; with co-occurrence, each may bring its partner
        (with ``whole_couples``, with probability p every object does, count made even)."""
        chosen: list[str] = []
        couples = self.config.whole_couples and rng.random() < self.config.co_occurrence
        if couples and count % 2:
            count = count + 1 if count < self.config.scene.max_objects else count - 1
        while len(chosen) < count:
            free = [n for n in self._names if n not in chosen]
            name = free[int(rng.integers(len(free)))]
            chosen.append(name)
            partner = self._partners.get(name)
            if (
                len(chosen) < count
                and partner is not None
                and partner not in chosen
                and (couples or rng.random() < self.config.co_occurrence)
            ):
                chosen.append(partner)
        order = rng.permutation(len(chosen)).tolist()  # partners are not always painted one after the other
        return [(*reversed(chosen[k].split(" ")), self._size(rng)) for k in order]  # type: ignore[misc]

    def _scene(self, index: int, rng: np.random.Generator, count: int | None = None) -> Scene:
        cfg = self.config.scene
        if count is None:
            count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        return self.world.draw(index, rng, objects=self._objects(count, rng))

    # -- question kinds -----------------------------------------------------------------------------
    # Each kind draws a scene *for* its question (so answers are balanced) and then asks about it;
    # the ``_ask_*`` halves also serve the follow-up turns of :meth:`conversation`, which ask about a
    # scene already drawn.
    def _existence(self, index: int, rng: np.random.Generator) -> QAItem:
        # the extra draw only happens with the knob on, so items of other configs stay as they were
        if self.config.implied_partner > 0 and rng.random() < self.config.implied_partner:
            return self._implied_existence(index, rng)
        return self._ask_existence(self._scene(index, rng), rng)

    def _implied_existence(self, index: int, rng: np.random.Generator) -> QAItem:
        """"is there a {X} ?" -> "yes" where X is absent but its partner is there (see
        ``VqaConfig.implied_partner``); ``extras["implied_by"]`` is the partner's index.

        The scene is an ordinary draw, and half of these draws ask instead about an object unrelated
        to the scene ("no"), so nothing but the question (the absent partner of an object that is
        there) tells the "yes" items apart: an earlier version removed one object of a whole couple,
        and a model learnt "an odd number of objects means yes" instead of the partner."""
        scene = self._scene(index, rng)
        names = [o.name for o in scene.objects]
        lone = [k for k, n in enumerate(names) if self._partners.get(n) and self._partners[n] not in names]
        if not lone:  # every object has its partner (or none has one): an ordinary question instead
            return self._ask_existence(scene, rng)
        suffix = " in the image" if rng.random() < 0.5 else ""
        if rng.random() < 0.5:
            # half "no" about an object unrelated to the scene, so that a scene with a lone object (an
            # odd count, mostly) does not mean "yes" by itself: only the partner does
            related = set(names) | {self._partners.get(n) for n in names}
            unrelated = [n for n in self._names if n not in related]
            name = unrelated[int(rng.integers(len(unrelated)))]
            return QAItem(scene, f"is there a {name}{suffix} ?", "no", "existence", (), name)
        k = lone[int(rng.integers(len(lone)))]
        implied = self._partners[names[k]]
        return QAItem(scene, f"is there a {implied}{suffix} ?", "yes", "existence", (), implied, {"implied_by": k})

    def _ask_existence(self, scene: Scene, rng: np.random.Generator) -> QAItem:
        names = [o.name for o in scene.objects]
        suffix = " in the image" if rng.random() < 0.5 else ""
        if rng.random() < 0.5:
            k = int(rng.integers(len(names)))
            return QAItem(scene, f"is there a {names[k]}{suffix} ?", "yes", "existence", (k,), names[k])
        # a hard negative a third of the time each: same shape, same colour, or any absent object
        absent = [n for n in self._names if n not in names]
        ref = scene.objects[int(rng.integers(len(names)))]
        style = int(rng.integers(3))
        pool = [n for n in absent if (style == 0 and n.endswith(f" {ref.shape}")) or (style == 1 and n.startswith(f"{ref.colour} "))]
        pool = pool or absent
        name = pool[int(rng.integers(len(pool)))]
        return QAItem(scene, f"is there a {name}{suffix} ?", "no", "existence", (), name)

    def _attribute(self, index: int, rng: np.random.Generator) -> QAItem:
        for attempt in range(20):
            item = self._ask_attribute(self._scene(index, rng), rng, size_fallback=attempt == 19)
            if item is not None:
                return item
        raise AssertionError("unreachable: the last attempt falls back to a size question")

    def _ask_attribute(self, scene: Scene, rng: np.random.Generator, size_fallback: bool = False) -> QAItem | None:
        """One try: None when the drawn style has no unique answer in this scene (a size question
        about the drawn object instead with ``size_fallback``)."""
        objs = scene.objects
        shapes = [o.shape for o in objs]
        colours = [o.colour for o in objs]
        weights = self.config.attribute_styles
        if len(set(weights)) == 1:
            style = int(rng.integers(3))  # the draw items had before the knob: keep default items as they were
        else:
            cumulative = np.cumsum(np.asarray(weights, np.float64) / sum(weights))
            style = min(int(np.searchsorted(cumulative, rng.random(), side="right")), 2)
        k = int(rng.integers(len(objs)))
        o = objs[k]
        if style == 0 and shapes.count(o.shape) == 1:
            return QAItem(scene, f"what colour is the {o.shape} ?", o.colour, "attribute", (k,), o.shape)
        if style == 1 and colours.count(o.colour) == 1:
            return QAItem(scene, f"what shape is the {o.colour} object ?", o.shape, "attribute", (k,), o.colour)
        if style == 2 or size_fallback:
            return QAItem(scene, f"what size is the {o.name} ?", o.size, "attribute", (k,), o.name)
        return None

    def _count(self, index: int, rng: np.random.Generator) -> QAItem:
        cfg = self.config.scene
        if rng.random() < 0.25:
            return self._count_objects(self._scene(index, rng))
        shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
        wanted = int(rng.integers(0, min(MAX_COUNT, cfg.max_objects, len(cfg.colours)) + 1))
        total = int(rng.integers(max(wanted, cfg.min_objects), cfg.max_objects + 1))
        colours = rng.permutation(len(cfg.colours))[:wanted].tolist()
        others = [n for n in self._names if not n.endswith(f" {shape}")]
        picks = rng.permutation(len(others))[: total - wanted].tolist()
        names = [f"{cfg.colours[c]} {shape}" for c in colours] + [others[p] for p in picks]
        objects = [(*reversed(n.split(" ")), self._size(rng)) for n in (names[k] for k in rng.permutation(len(names)))]
        scene = self.world.draw(index, rng, objects=objects)  # type: ignore[arg-type]
        return self._count_shape(scene, shape)  # counts what was placed

    def _count_objects(self, scene: Scene) -> QAItem:
        n = len(scene.objects)
        return QAItem(scene, "how many objects are there ?", NUMBER_WORDS[n], "count", tuple(range(n)), "object")

    def _count_shape(self, scene: Scene, shape: str) -> QAItem:
        members = tuple(k for k, o in enumerate(scene.objects) if o.shape == shape)
        question = f"how many {PLURALS[shape]} are there ?"
        return QAItem(scene, question, NUMBER_WORDS[len(members)], "count", members, shape)

    def _ask_count(self, scene: Scene, rng: np.random.Generator) -> QAItem:
        if rng.random() < 0.25:
            return self._count_objects(scene)
        # half the time a shape that is there, else any shape (often a zero)
        shapes = [o.shape for o in scene.objects] if rng.random() < 0.5 else list(self.config.scene.shapes)
        return self._count_shape(scene, shapes[int(rng.integers(len(shapes)))])

    def _relation(self, index: int, rng: np.random.Generator) -> QAItem:
        cfg = self.config.scene
        for _ in range(50):
            scene = self._scene(index, rng, count=int(rng.integers(max(2, cfg.min_objects), cfg.max_objects + 1)))
            item = self._ask_relation(scene, rng)
            if item is not None:
                return item
        raise RuntimeError("no scene with a clear relation in 50 draws: the scene config is too crowded")

    def _ask_relation(self, scene: Scene, rng: np.random.Generator) -> QAItem | None:
        """None when no object stands alone in a clear relation to another."""
        cfg = self.config.scene
        options = unique_relations(scene.objects, cfg.relation_margin * cfg.image_size)
        if not options:
            return None
        target, said, anchor = options[int(rng.integers(len(options)))]
        objs = scene.objects
        return QAItem(
            scene, f"what is {said} the {objs[anchor].name} ?", objs[target].name, "relation",
            (target, anchor), objs[anchor].name, {"relation": said},
        )

    def _caption(self, index: int, rng: np.random.Generator) -> QAItem:
        return self._ask_caption(self._scene(index, rng), rng)

    def _ask_caption(self, scene: Scene, rng: np.random.Generator) -> QAItem:
        answer = canonical_caption(scene.objects, self.config.scene)
        return QAItem(scene, "describe the image .", answer, "caption", tuple(range(len(scene.objects))))

    # -- conversations ------------------------------------------------------------------------------
    def conversation(self, index: int, turns: int) -> list[QAItem]:
        """``turns`` questions about one scene: item ``index`` first, then follow-ups of kinds drawn
        from the same kind weights, asked about that item's scene (a LLaVA-style multi-turn
        conversation; training on several answers per image costs little more than on one).
        Follow-ups never repeat a question; deterministic in ``(config, seed, index, turns)``."""
        if not isinstance(turns, int) or isinstance(turns, bool) or turns < 1:
            raise ValueError(f"turns must be a positive integer; got {turns!r}")
        first = self[index]
        items, asked = [first], {first.question}
        rng = np.random.default_rng([self.seed, int(index), 0x7A1C])
        for _ in range(8 * turns):  # a few draws may repeat a question or have no answer here
            if len(items) == turns:
                break
            u = rng.random()
            kind = self._kinds[next((k for k, c in enumerate(self._cumulative) if u < c), len(self._kinds) - 1)]
            item = getattr(self, f"_ask_{kind}")(first.scene, rng)
            if item is not None and item.question not in asked:
                items.append(item)
                asked.add(item.question)
        return items


def unique_relations(objects: Sequence[SceneObject], margin_px: float) -> list[tuple[int, str, int]]:
    """Every (target, relation, anchor) such that ``target`` is the only object in that relation to
    ``anchor`` and no other object's relation to the anchor is unclear (too close to call)."""
    found = []
    for anchor in range(len(objects)):
        said = {k: relation(objects[k], objects[anchor], margin_px) for k in range(len(objects)) if k != anchor}
        if any(v is None for v in said.values()):
            continue
        for rel in RELATIONS:
            holders = [k for k, v in said.items() if v == rel]
            if len(holders) == 1:
                found.append((holders[0], rel, anchor))
    return found


def pope_probes(
    scenes: Sequence[Scene], split: PopeSplit, config: VqaConfig | None = None, per_image: int = 3, seed: int = 0
) -> list[QAItem]:
    """POPE (Li et al. 2023): per scene, up to ``per_image`` present objects ("yes") and as many
    absent ones ("no"), asked as "is there a {object} in the image ?".

    Absent objects are drawn uniformly (``random``), by how often the training distribution shows
    them (``popular``; under the default uniform object draws every object is equally frequent, so
    this split then matches ``random``), or from the partners of the present objects first
    (``adversarial``: the co-occurrence couples of :func:`partner_map`), topped up at random.
    """
    if split not in POPE_SPLITS:
        raise ValueError(f"split must be one of {POPE_SPLITS}; got {split!r}." + did_you_mean(split, POPE_SPLITS))
    if per_image < 1:
        raise ValueError("per_image must be a positive integer")
    config = config or VqaConfig()
    partners = partner_map(config)
    names = all_objects(config.scene)
    frequency = object_frequencies(config) if split == "popular" else None
    rng = np.random.default_rng([seed, 0x9095, POPE_SPLITS.index(split)])
    probes: list[QAItem] = []
    for scene in scenes:
        present = [o.name for o in scene.objects]
        absent = [n for n in names if n not in present]
        k = min(per_image, len(present), len(absent))
        for i in rng.permutation(len(present))[:k].tolist():
            probes.append(QAItem(scene, f"is there a {present[i]} in the image ?", "yes", "existence", (i,),
                                 present[i], {"pope": split}))
        if split == "random":
            negatives = [absent[j] for j in rng.permutation(len(absent))[:k].tolist()]
        elif split == "popular":
            assert frequency is not None
            ties = rng.random(len(absent))  # equal frequencies are ordered at random
            negatives = [absent[j] for j in np.lexsort((ties, [-frequency[a] for a in absent]))[:k].tolist()]
        else:
            linked = [partners[p] for p in present if partners.get(p) in absent]
            linked = list(dict.fromkeys(linked))
            rest = [a for a in absent if a not in linked]
            negatives = (linked + [rest[j] for j in rng.permutation(len(rest)).tolist()])[:k]
        for name in negatives:
            probes.append(QAItem(scene, f"is there a {name} in the image ?", "no", "existence", (), name,
                                 {"pope": split}))
    return probes


def object_frequencies(config: VqaConfig, samples: int = 2000) -> dict[str, float]:
    """How often each object appears in a scene of the training distribution (a sample of
    ``samples`` caption scenes of training seed 0)."""
    names = all_objects(config.scene)
    counts = dict.fromkeys(names, 0)
    qa = SceneQA(config, seed=0, length=samples, kind="caption")
    for item in qa:
        for o in item.scene.objects:
            counts[o.name] += 1
    return {n: c / samples for n, c in counts.items()}


def held_out(config: VqaConfig | None = None, seed: int = 0, length: int = 500, kind: QuestionKind | None = None) -> SceneQA:
    """Questions from a seed no training run uses (``HELD_OUT_SEED + seed``)."""
    return SceneQA(config, seed=HELD_OUT_SEED + seed, length=length, kind=kind)
