"""Exact concepts of scene-world scenes, for scoring representation tools against the truth.

Papers that label neurons, score sparse-autoencoder features or probe layers on real photos must
guess which concepts an image holds. The scene world knows: every object's colour, shape and size,
how many objects there are and where they lie. This module turns scenes into

* a :class:`ConceptTable`: which of a fixed list of concepts each scene holds (a boolean matrix),
  with a short text per concept for CLIP-side tools (CLIP-Dissect's concept set, TextSpan's pool);
* :func:`probe_task`: class labels for the four layer-probe tasks of SPEC §7 (colour, shape,
  object count and one spatial relation), drawn from the scene kind each task needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from mmelkit._checks import positive_int
from mmelkit.datasets.scenes import NUMBER_WORDS, Scene, SceneConfig, SceneObject, SceneWorld, relation

ConceptGroup = Literal["colour", "shape", "size", "count"]
CONCEPT_GROUPS: tuple[ConceptGroup, ...] = ("colour", "shape", "size", "count")
ProbeTask = Literal["colour", "shape", "count", "relation"]
PROBE_TASKS: tuple[ProbeTask, ...] = ("colour", "shape", "count", "relation")


@dataclass(eq=False)
class ConceptTable:
    """Which concepts each of N scenes holds.

    ``names`` (C,) like ``"colour=red"``; ``groups`` (C,) the group of each (``"colour"``, ...);
    ``texts`` (C,) a short description for text encoders (``"a red object"``); ``presence``
    (N, C) bool, True where the scene holds the concept.
    """

    names: list[str]
    groups: list[str]
    texts: list[str]
    presence: torch.Tensor

    def __len__(self) -> int:
        return self.presence.shape[0]

    @property
    def num_concepts(self) -> int:
        return len(self.names)

    def column(self, name: str) -> torch.Tensor:
        """(N,) bool presence of one concept, by name (``"colour=red"``) or text."""
        if name in self.names:
            return self.presence[:, self.names.index(name)]
        if name in self.texts:
            return self.presence[:, self.texts.index(name)]
        raise KeyError(f"no concept {name!r}; concepts: {', '.join(self.names)}")

    def select(self, keep: Sequence[int] | torch.Tensor) -> ConceptTable:
        """The table restricted to some concept columns (indices or a (C,) bool mask)."""
        index = torch.as_tensor(keep)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        picked = index.tolist()
        return ConceptTable([self.names[i] for i in picked], [self.groups[i] for i in picked],
                            [self.texts[i] for i in picked], self.presence[:, index])

    def group(self, group: str) -> ConceptTable:
        """Only the concepts of one group."""
        if group not in self.groups:
            raise KeyError(f"no concept group {group!r}; groups: {sorted(set(self.groups))}")
        return self.select([i for i, g in enumerate(self.groups) if g == group])

    def present(self, min_count: int = 1) -> ConceptTable:
        """Only the concepts held by at least ``min_count`` scenes (and not by all of them)."""
        counts = self.presence.sum(dim=0)
        return self.select((counts >= min_count) & (counts < len(self)))


def _concept_list(config: SceneConfig, groups: Sequence[str]) -> list[tuple[str, str, str]]:
    """(name, group, text) of every concept the groups hold under ``config``."""
    out: list[tuple[str, str, str]] = []
    for group in groups:
        if group == "colour":
            out += [(f"colour={c}", group, f"a {c} object") for c in config.colours]
        elif group == "shape":
            out += [(f"shape={s}", group, f"a {s}") for s in config.shapes]
        elif group == "size":
            out += [(f"size={name}", group, f"a {name} object") for name, _ in config.sizes]
        elif group == "count":
            out += [
                (f"count={k}", group, f"{NUMBER_WORDS[k]} object{'s' if k > 1 else ''}")
                for k in range(config.min_objects, config.max_objects + 1)
            ]
        else:
            raise ValueError(f"unknown concept group {group!r}; groups: {', '.join(CONCEPT_GROUPS)}")
    return out


def concept_texts(config: SceneConfig | None = None, groups: Sequence[str] = CONCEPT_GROUPS) -> list[str]:
    """The descriptions of the scene world's concepts ("a red object", "a circle", "two objects")."""
    return [text for _, _, text in _concept_list(config or SceneConfig(), groups)]


def _holds(scene: Scene, name: str) -> bool:
    group, value = name.split("=", 1)
    objects: Sequence[SceneObject] = scene.objects
    if group == "count":
        return len(objects) == int(value)
    attribute = {"colour": "colour", "shape": "shape", "size": "size"}[group]
    return any(getattr(o, attribute) == value for o in objects)


def scene_concepts(
    scenes: Sequence[Scene], config: SceneConfig | None = None, groups: Sequence[str] = CONCEPT_GROUPS
) -> ConceptTable:
    """The exact concept table of scene-world scenes (colours, shapes, sizes present; object count).

    ``config`` names the concept vocabulary (default: the scene world's defaults); a scene object
    outside it is an error, since its concept would silently be missing."""
    if not scenes:
        raise ValueError("no scenes given")
    config = config or SceneConfig()
    concepts = _concept_list(config, groups)
    known = {"colour": set(config.colours), "shape": set(config.shapes), "size": {n for n, _ in config.sizes}}
    for scene in scenes:
        for obj in scene.objects:
            if not isinstance(obj, SceneObject):
                raise TypeError("scene_concepts needs scene-world scenes (their objects are SceneObject records)")
            for group in ("colour", "shape", "size"):
                if group in groups and getattr(obj, group) not in known[group]:
                    raise ValueError(f"scene {scene.index}: {group} {getattr(obj, group)!r} is not in the config's "
                                     f"vocabulary; pass the SceneConfig the scenes were drawn with")
    presence = torch.tensor([[_holds(scene, name) for name, _, _ in concepts] for scene in scenes], dtype=torch.bool)
    return ConceptTable([c[0] for c in concepts], [c[1] for c in concepts], [c[2] for c in concepts], presence)


# --------------------------------------------------------------------------------------------------
# Layer-probe tasks
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ProbeData:
    """Scenes of one probe task with their class labels: ``labels`` (N,) long indexes ``classes``."""

    task: str
    scenes: list[Scene]
    labels: torch.Tensor
    classes: list[str]

    @property
    def images(self) -> list[np.ndarray]:
        return [s.image for s in self.scenes]


def _relation_label(scene: Scene, config: SceneConfig) -> int | None:
    # The relation task: is the object whose (shape, colour) comes first in the vocabulary left of
    # the other one? Reading it needs both objects' identities bound to their positions, which a
    # bag of features cannot give. Scenes whose objects are too close in x to say are skipped.
    if len(scene.objects) != 2:
        return None
    order = {(s, c): i for i, (s, c) in enumerate((s, c) for s in config.shapes for c in config.colours)}
    first, second = sorted(scene.objects, key=lambda o: order[(o.shape, o.colour)])
    said = relation(first, second, config.relation_margin * config.image_size)
    if said not in ("left of", "right of"):
        return None
    return int(said == "left of")


def probe_task(task: ProbeTask, count: int, seed: int, image_size: int = 64,
               config: SceneConfig | None = None) -> ProbeData:
    """``count`` scenes for one probe task, drawn from the scene kind that task needs.

    colour / shape: one-object scenes, the object's colour or shape. count: 1..max objects. relation:
    two-object scenes, "is the object first in the vocabulary's (shape, colour) order left of the
    other" (1) or right of it (0), scenes that state no horizontal relation skipped."""
    if task not in PROBE_TASKS:
        raise ValueError(f"unknown probe task {task!r}; tasks: {', '.join(PROBE_TASKS)}")
    count = positive_int("count", count)
    base = config or SceneConfig().scaled(image_size)
    if task in ("colour", "shape"):
        world = SceneWorld(replace(base, min_objects=1, max_objects=1), seed=seed)
        scenes = [world[i] for i in range(count)]
        classes = list(base.colours if task == "colour" else base.shapes)
        labels = [classes.index(getattr(s.objects[0], task)) for s in scenes]
        return ProbeData(task, scenes, torch.tensor(labels), classes)
    if task == "count":
        world = SceneWorld(base, seed=seed)
        scenes = [world[i] for i in range(count)]
        classes = [str(k) for k in range(base.min_objects, base.max_objects + 1)]
        labels = [classes.index(str(len(s.objects))) for s in scenes]
        return ProbeData(task, scenes, torch.tensor(labels), classes)
    world = SceneWorld(replace(base, min_objects=2, max_objects=2), seed=seed)
    scenes, labels, index = [], [], 0
    while len(scenes) < count:
        if index > 20 * count + 100:  # pragma: no cover - the default world states relations often
            raise RuntimeError("the scene world states too few horizontal relations under this config")
        scene = world[index]
        index += 1
        label = _relation_label(scene, base)
        if label is not None:
            scenes.append(scene)
            labels.append(label)
    return ProbeData(task, scenes, torch.tensor(labels), ["right of", "left of"])
