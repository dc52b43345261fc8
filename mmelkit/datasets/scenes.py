"""The scene world: synthetic images of coloured shapes with exact ground truth.

Every scene is a pure function of ``(config, seed, index)``: ``SceneWorld(config, seed)[i]`` draws
scene ``i`` from its own random stream, so any scene can be regenerated alone, in any order, in
any DataLoader worker. Each scene carries the image, every object's visible instance mask, box and
attributes, and captions from several templates, each with the objects (and so the mask) it
refers to. That ground truth is the point: with it, a student or a test can check whether an
explanation points at the right thing.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import numpy as np

from mmelkit._checks import non_negative_int, non_negative_number

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 200),
    "orange": (250, 135, 25),
    "pink": (250, 125, 195),
    "cyan": (40, 215, 225),
}

Mask = np.ndarray  # (h, w) bool


def _circle(u: np.ndarray, v: np.ndarray) -> Mask:
    return u * u + v * v <= 1.0


def _square(u: np.ndarray, v: np.ndarray) -> Mask:
    return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)


def _triangle(u: np.ndarray, v: np.ndarray) -> Mask:
    # apex up (image rows grow downwards), base at v = 0.85
    return (v <= 0.85) & (np.abs(u) <= (v + 0.95) * 0.55)


def _diamond(u: np.ndarray, v: np.ndarray) -> Mask:
    return np.abs(u) + np.abs(v) <= 1.0


def _cross(u: np.ndarray, v: np.ndarray) -> Mask:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))


def _star(u: np.ndarray, v: np.ndarray) -> Mask:
    radius = np.sqrt(u * u + v * v)
    angle = np.arctan2(v, u) + np.pi / 2  # one point straight up
    return radius <= 0.42 + 0.58 * np.abs(np.cos(2.5 * angle)) ** 3


def _ring(u: np.ndarray, v: np.ndarray) -> Mask:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.36)


def _hexagon(u: np.ndarray, v: np.ndarray) -> Mask:
    au, av = np.abs(u), np.abs(v)
    return (av <= 0.87) & (au * 0.87 + av * 0.5 <= 0.87)


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], Mask]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
    "cross": _cross,
    "star": _star,
    "ring": _ring,
    "hexagon": _hexagon,
}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen")

CaptionKind = Literal["object", "attribute", "pair", "relation", "count"]
CAPTION_KINDS: tuple[CaptionKind, ...] = ("object", "attribute", "pair", "relation", "count")
Background = Literal["noise", "texture", "plain"]


# --------------------------------------------------------------------------------------------------
# Configuration and records
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneConfig:
    """Everything that shapes the distribution of scenes. Sizes are in pixels at ``image_size``."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[tuple[str, int], ...] = (("small", 12), ("large", 20))
    size_jitter: int = 1
    max_overlap: float = 0.1  # largest share of an object's area another object may cover
    backgrounds: tuple[Background, ...] = ("noise", "texture")
    clutter: int = 0  # distractor strokes per scene (unnamed, never referred to)
    unique_objects: bool = True  # no two objects share colour and shape (captions then name one object)
    colour_jitter: int = 12  # per-object brightness variation
    relation_margin: float = 0.15  # centres must differ by this share of the image to state a relation
    placement_tries: int = 60

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 16:
            raise ValueError("need 1 <= min_objects <= max_objects <= 16")
        unknown = [s for s in self.shapes if s not in SHAPES] + [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown shapes/colours {unknown}; known: {list(SHAPES)}, {list(COLOURS)}")
        if self.unique_objects and self.max_objects > len(self.shapes) * len(self.colours):
            raise ValueError("max_objects exceeds the number of distinct colour-shape pairs")
        if self.image_size < 16:
            raise ValueError("image_size must be at least 16")
        if not 0.0 <= self.max_overlap <= 1.0:
            raise ValueError("max_overlap must lie in [0, 1]")
        smallest = min(px for _, px in self.sizes) - self.size_jitter
        largest = max(px for _, px in self.sizes) + self.size_jitter
        if smallest < 3 or largest > self.image_size:
            raise ValueError(f"object sizes {self.sizes} must lie between 3 px and the image size {self.image_size}")
        # Shapes fill at least about half of their square; beyond that the canvas cannot hold them.
        needed = self.min_objects * 0.5 * smallest**2 * (1.0 - self.max_overlap)
        if needed > self.image_size**2:
            raise ValueError(
                f"{self.min_objects} objects of at least {smallest} px cannot fit a {self.image_size} px canvas "
                "with this overlap: lower min_objects or the sizes, raise image_size or max_overlap"
            )

    def scaled(self, image_size: int) -> SceneConfig:
        """The same world at another resolution (object sizes scale with the image)."""
        factor = image_size / self.image_size
        sizes = tuple((name, max(4, round(px * factor))) for name, px in self.sizes)
        return replace(self, image_size=image_size, sizes=sizes)


class SceneObject(NamedTuple):
    shape: str
    colour: str
    size: str
    center: tuple[float, float]  # (x, y) in pixels
    diameter: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


class Caption(NamedTuple):
    text: str
    kind: CaptionKind
    objects: tuple[int, ...]  # indices into Scene.objects that the caption refers to


@dataclass
class Scene:
    """One annotated image: a scene-world scene, a real photo or a COCO image.

    ``masks[k]`` is the visible part of object ``k`` (for photos annotated with boxes only, the
    box); ``boxes[k]`` its box ``(x1, y1, x2, y2)``, exclusive at the far end (index
    ``[y1:y2, x1:x2]``). ``objects`` holds :class:`SceneObject` records for the scene world and
    source-specific records elsewhere. Every caption lists the objects it refers to.
    """

    index: int
    image: np.ndarray  # (H, W, 3) uint8
    objects: Sequence[Any]
    masks: np.ndarray  # (K, H, W) bool
    boxes: np.ndarray  # (K, 4) int
    captions: list[Caption]
    background: str
    background_tint: tuple[int, int, int] = (0, 0, 0)
    extras: dict[str, object] = field(default_factory=dict)
    # The scene-world background (texture and clutter) before any object was painted; None for
    # photos. It makes "the object removed" exact (see erased), e.g. for causal tracing.
    backdrop: np.ndarray | None = field(default=None, repr=False)

    def mask_of(self, objects: Sequence[int] | Caption) -> np.ndarray:
        """Union of the visible masks of the given objects (or of a caption's referents)."""
        indices = objects.objects if isinstance(objects, Caption) else tuple(objects)
        if not indices:
            return np.zeros(self.image.shape[:2], bool)
        return self.masks[list(indices)].any(axis=0)

    def captions_of(self, kind: CaptionKind) -> list[Caption]:
        return [c for c in self.captions if c.kind == kind]

    def erased(self, objects: Sequence[int] | Caption) -> np.ndarray:
        """(H, W, 3) uint8: this scene with the visible part of the given objects (indices, or a
        caption's referents) painted over with its own background, a new array: the clean vs
        "object removed" image pair of causal tracing (``causal_trace(..., corrupted_images=)``).
        Objects painted on top of an erased one stay."""
        if self.backdrop is None:
            raise ValueError(f"scene {self.index} ({self.background}) has no background layer to paint with: only "
                             "scene-world scenes can erase objects")
        indices = objects.objects if isinstance(objects, Caption) else tuple(int(k) for k in objects)
        wrong = [k for k in indices if not 0 <= k < len(self.objects)]
        if wrong:
            raise IndexError(f"objects {wrong} do not exist in scene {self.index}, which has {len(self.objects)}")
        return np.where(self.mask_of(indices)[..., None], self.backdrop, self.image)


# --------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------


class SceneWorld:
    """A deterministic, random-access collection of scenes: ``world[i]`` is always the same scene.

    ``length`` only bounds iteration and ``len()``; any non-negative index can be drawn.

    Scene ``i`` comes from a counter-based Philox stream keyed by the seed, positioned at block
    ``i``: reaching any scene costs a state assignment, not a seeding hash, which matters when a
    trainer asks for thousands of scenes per second. Object centres lie on a 1/8-pixel grid, so the
    rasterised shapes come from a small cache (:func:`_canonical_stamp`) instead of being redrawn.
    """

    def __init__(self, config: SceneConfig | None = None, seed: int = 0, length: int = 10_000) -> None:
        self.config = config or SceneConfig()
        self.seed = int(seed)
        if not 0 <= self.seed < 2**63:
            raise ValueError("seed must be a non-negative 63-bit integer")
        self.length = non_negative_int("length", length)
        self._textures = _texture_bank(self.config.image_size, np.random.default_rng([self.seed, 2**31 - 1]))
        # one generator per thread, re-positioned for every scene (see __getitem__)
        self._streams = threading.local()

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Scene]:
        return (self[i] for i in range(self.length))

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by "spawn" receive a pickled copy: leave the per-thread
        # generators behind (they are rebuilt on first use)
        state = self.__dict__.copy()
        del state["_streams"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._streams = threading.local()

    def __getitem__(self, index: int) -> Scene:
        index = int(index)
        if index < 0:
            raise IndexError("scene indices are non-negative")
        return self.draw(index, self.stream(index))

    def stream(self, index: int) -> np.random.Generator:
        """The random stream of scene ``index``: Philox keyed by the seed, counter ``(0, 0, index, 0)``.

        Streams of different scenes never overlap (a scene would need 2**128 draws to reach the
        next one). The generator object is reused per thread: draw from it before asking for the
        next scene's stream.
        """
        generator = getattr(self._streams, "generator", None)
        if generator is None:
            generator = np.random.Generator(np.random.Philox(key=[self.seed, _PHILOX_DOMAIN]))
            self._streams.generator = generator
            self._streams.key = generator.bit_generator.state["state"]["key"]
        generator.bit_generator.state = {
            "bit_generator": "Philox",
            "state": {"counter": np.array([0, 0, index, 0], np.uint64), "key": self._streams.key},
            "buffer": _EMPTY_PHILOX_BUFFER,
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        return generator

    # -- drawing ---------------------------------------------------------------------------------
    def draw(
        self,
        index: int,
        rng: np.random.Generator,
        objects: list[tuple[str, str, tuple[str, int]]] | None = None,
        tint: tuple[int, int, int] | None = None,
    ) -> Scene:
        """Draw one scene from ``rng``. ``objects`` ((shape, colour, (size name, diameter)), in
        painting order) and the background ``tint`` replace the random choices when given: derived
        tasks (``mmelkit.datasets.shortcut``) control them.

        All of the scene's scalar choices come from one block of uniforms (one call into numpy
        instead of dozens); each object then draws its candidate positions in one more call.
        """
        cfg = self.config
        size = cfg.image_size
        # 7 scene-level uniforms (object count, then 6 for the background), then 4 per object
        # (colour-shape, size, size jitter, shade)
        head = _SCENE_UNIFORMS
        uniforms = rng.random(head + 4 * (cfg.max_objects if objects is None else len(objects))).tolist()
        if objects is None:
            count = cfg.min_objects + _pick(uniforms[0], cfg.max_objects - cfg.min_objects + 1)
            objects = self._choose_objects(count, uniforms[head:])
        image, kind, tint = self._background(uniforms[1:head], tint)
        self._add_clutter(image, rng)
        backdrop = image.copy()  # about 1 us at 64 px: kept so that objects can be erased exactly
        placed: list[SceneObject] = []
        stamps: list[tuple[tuple[slice, slice], np.ndarray, int]] = []  # (box, local mask, area)
        tight_boxes: list[tuple[int, int, int, int]] = []  # of each full stamp, in image coordinates
        occupied = np.full((size, size), -1, np.int16)  # index of the object on top at each pixel
        overlapped = False
        jitter = 2 * cfg.colour_jitter + 1
        for k, (shape, colour, (size_name, diameter)) in enumerate(objects):
            placement = self._place(shape, diameter, occupied, stamps, rng)
            if placement is None:
                continue  # crowded scene: fewer objects than asked rather than heavy overlap
            center, box, local, tight, covers = placement
            overlapped |= covers
            shade = _pick(uniforms[head + 4 * k + 3], jitter) - cfg.colour_jitter
            paint = np.frombuffer(bytes(min(255, max(0, c + shade)) for c in COLOURS[colour]), np.uint8)
            # copyto with a mask is several times faster than boolean-index assignment here
            np.copyto(image[box], paint, where=local[:, :, None])
            np.copyto(occupied[box], len(placed), where=local)
            stamps.append((box, local, np.count_nonzero(local)))
            tight_boxes.append(tight)
            placed.append(SceneObject(shape, colour, size_name, center, diameter))
        # Visible masks: an object is what remains on top in the occupancy map.
        masks = occupied[None] == np.arange(len(placed), dtype=np.int16)[:, None, None]
        # Without any overlap every object is fully visible and its box is its stamp's box.
        boxes = _boxes(masks) if overlapped else np.array(tight_boxes, np.int64).reshape(-1, 4)
        scene = Scene(index, image, placed, masks, boxes, [], kind, tint, backdrop=backdrop)
        scene.captions = make_captions(scene, cfg)
        return scene

    def _choose_objects(self, count: int, uniforms: list[float]) -> list[tuple[str, str, tuple[str, int]]]:
        """``count`` objects from 4 uniforms each: colour-shape pair (without replacement when
        objects are unique), size class, size jitter; the 4th (shade) is used when painting."""
        cfg = self.config
        num_colours = len(cfg.colours)
        pool = list(range(len(cfg.shapes) * num_colours))
        jitter = 2 * cfg.size_jitter + 1
        chosen = []
        for k in range(count):
            u_code, u_size, u_jitter = uniforms[4 * k : 4 * k + 3]
            code = pool.pop(_pick(u_code, len(pool))) if cfg.unique_objects else _pick(u_code, len(pool))
            name, px = cfg.sizes[_pick(u_size, len(cfg.sizes))]
            diameter = px + _pick(u_jitter, jitter) - cfg.size_jitter
            chosen.append((cfg.shapes[code // num_colours], cfg.colours[code % num_colours], (name, diameter)))
        return chosen

    def _place(
        self,
        shape: str,
        diameter: int,
        occupied: np.ndarray,
        stamps: list[tuple[tuple[slice, slice], np.ndarray, int]],
        rng: np.random.Generator,
    ) -> tuple[tuple[float, float], tuple[slice, slice], np.ndarray, tuple[int, int, int, int], bool] | None:
        """The first of ``placement_tries`` uniform positions where the new object and every earlier
        one each keep all but ``max_overlap`` of their area: (centre, box, local mask, tight box,
        whether it covers anything), or None."""
        cfg = self.config
        radius = diameter / 2
        span = cfg.image_size - diameter
        for u, v in rng.random((cfg.placement_tries, 2)).tolist():
            # centres on the 1/8-pixel grid, within [radius, image_size - radius)
            cx = radius + math.floor(u * span * _SUBPIXELS) / _SUBPIXELS
            cy = radius + math.floor(v * span * _SUBPIXELS) / _SUBPIXELS
            box, local, tight = self._stamp(shape, cx, cy, radius)
            area = np.count_nonzero(local)
            if area == 0:
                continue
            under = occupied[box]
            if under.max() < 0:
                return (cx, cy), box, local, tight, False  # free ground: the common case
            covered = under[local]
            covered = covered[covered >= 0]
            if covered.size:
                shared = np.bincount(covered).tolist()
                # neither the new object nor an earlier one may lose more than max_overlap of itself
                if any(n > cfg.max_overlap * min(area, stamps[k][2]) for k, n in enumerate(shared)):
                    continue
            return (cx, cy), box, local, tight, bool(covered.size)
        return None

    def _stamp(
        self, shape: str, cx: float, cy: float, radius: float
    ) -> tuple[tuple[slice, slice], np.ndarray, tuple[int, int, int, int]]:
        """The shape centred at (cx, cy) on the 1/8-pixel grid, cropped to the image: (box, local
        mask, tight box (x1, y1, x2, y2) of the cropped mask)."""
        size = self.config.image_size
        whole_x, whole_y = math.floor(cx), math.floor(cy)
        mask, (top_offset, left_offset, tight) = _canonical_stamp(shape, radius, cx - whole_x, cy - whole_y)
        top, left = whole_y + top_offset, whole_x + left_offset
        bottom, right = top + mask.shape[0], left + mask.shape[1]
        if top >= 0 and left >= 0 and bottom <= size and right <= size:
            x1, y1, x2, y2 = tight
            return (slice(top, bottom), slice(left, right)), mask, (x1 + left, y1 + top, x2 + left, y2 + top)
        crop = mask[max(0, -top) : mask.shape[0] - max(0, bottom - size), max(0, -left) : mask.shape[1] - max(0, right - size)]
        top, left = max(0, top), max(0, left)
        box = (slice(top, top + crop.shape[0]), slice(left, left + crop.shape[1]))
        return box, crop, tuple(_boxes(crop[None])[0] + [left, top, left, top])  # type: ignore[return-value]

    def _shape_mask(self, shape: str, cx: float, cy: float, radius: float) -> tuple[tuple[slice, slice], np.ndarray]:
        """(box, local mask) of a shape placed by the generator (centre on the 1/8-pixel grid)."""
        box, local, _ = self._stamp(shape, cx, cy, radius)
        return box, local

    def _background(
        self, uniforms: list[float], tint: tuple[int, int, int] | None = None
    ) -> tuple[np.ndarray, str, tuple[int, int, int]]:
        """A textured or noisy background from 6 uniforms: kind, pattern (one of the bank's
        textures in one of 8 orientations), base grey and a tint per channel."""
        cfg = self.config
        u_kind, u_pattern, u_base, *u_tint = uniforms
        kind = cfg.backgrounds[_pick(u_kind, len(cfg.backgrounds))]
        base = 95 + _pick(u_base, 56)
        if tint is None:
            tint = tuple(_pick(u, 25) - 12 for u in u_tint)
        elif max(abs(t) for t in tint) > 30:
            raise ValueError(f"background tint {tint} must stay within +-30 per channel")
        bank = self._textures[kind]
        texture = bank[_pick(u_pattern, len(bank))]
        # Textures are stored shifted by +60 (so 0..120, uint8) and base + tint lies in [65, 180]:
        # adding base + tint - 60 stays within 5..240, so plain uint8 addition is exact. The offset
        # image is built from bytes: numpy broadcasts a length-3 axis slowly.
        pixel = bytes(base + t - _TEXTURE_SHIFT for t in tint)
        offset = np.frombuffer(pixel * (texture.shape[0] * texture.shape[1]), np.uint8).reshape(texture.shape)
        return texture + offset, kind, tint  # type: ignore[return-value]

    def _add_clutter(self, image: np.ndarray, rng: np.random.Generator) -> None:
        """Thin grey strokes: visual distractors that no caption names."""
        size = self.config.image_size
        for _ in range(self.config.clutter):
            x0, y0, x1, y1 = rng.uniform(0, size, size=4)
            steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            xs = np.linspace(x0, x1, steps).astype(int).clip(0, size - 1)
            ys = np.linspace(y0, y1, steps).astype(int).clip(0, size - 1)
            grey = int(rng.integers(60, 200))
            image[ys, xs] = grey


_SCENE_UNIFORMS = 7  # uniforms a scene draws before its objects' (see SceneWorld.draw)
_SUBPIXELS = 8  # object centres lie on a 1/8-pixel grid
_MARGIN = 2  # canonical stamps put their centre's whole part at int(radius) + _MARGIN: never cropped
_PHILOX_DOMAIN = 0x5CE4E  # second key word: separates scene streams from other Philox users
_EMPTY_PHILOX_BUFFER = np.zeros(4, np.uint64)


def _pick(u: float, n: int) -> int:
    """An index uniform in range(n) from a uniform u in [0, 1) (guarding the float edge)."""
    return min(n - 1, int(u * n))


@functools.lru_cache(maxsize=16384)
def _canonical_stamp(
    shape: str, radius: float, fx: float, fy: float
) -> tuple[np.ndarray, tuple[int, int, tuple[int, int, int, int]]]:
    """The rasterised shape of ``radius`` centred at ``(c + fx, c + fy)`` with ``c = int(radius) +
    _MARGIN`` (so nothing is cropped), as (mask, (top - c, left - c, tight box within the mask)): a
    centre ``(X + fx, Y + fy)`` puts the mask's corner at ``(Y + top - c, X + left - c)``. Read-only:
    the cache shares it."""
    c = int(radius) + _MARGIN
    cx, cy = c + fx, c + fy
    top, bottom = int(cy - radius) - 1, int(cy + radius) + 2
    left, right = int(cx - radius) - 1, int(cx + radius) + 2
    # pixel centres relative to the shape's centre, in units of the radius
    u = (np.arange(left, right, dtype=np.float64)[None, :] + 0.5 - cx) / radius
    v = (np.arange(top, bottom, dtype=np.float64)[:, None] + 0.5 - cy) / radius
    mask = np.ascontiguousarray(SHAPES[shape](u, v))
    mask.setflags(write=False)
    x1, y1, x2, y2 = _boxes(mask[None])[0].tolist()
    return mask, (top - c, left - c, (x1, y1, x2, y2))


def collate_scenes(scenes: list[Scene]) -> dict[str, object]:
    """``DataLoader(world, batch_size=..., collate_fn=collate_scenes)``: images stacked into a uint8
    tensor (N, 3, H, W); the scenes themselves (masks, captions, ...) kept as a list."""
    import torch

    if not scenes:
        raise ValueError("no scenes to collate: the batch is empty")
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).contiguous()
    return {"images": images, "scenes": scenes}


_TEXTURE_SHIFT = 60  # textures lie in +-60 and are stored as uint8 with this offset added


def _texture_bank(size: int, rng: np.random.Generator, count: int = 16) -> dict[str, np.ndarray]:
    """Background patterns drawn once per world: zero-mean in -60..60, stored as uint8 shifted by
    ``_TEXTURE_SHIFT``; each scene picks one of them and one of its 8 orientations."""
    noise = rng.normal(0, 14, size=(count, size, size, 3)).astype(np.int16)
    rows, cols = np.mgrid[0:size, 0:size]
    textures = []
    for _ in range(count):
        period = rng.uniform(5, 14)
        angle = rng.uniform(0, np.pi)
        wave = np.sin((cols * np.cos(angle) + rows * np.sin(angle)) * 2 * np.pi / period)
        pattern = 18 * wave[..., None] + rng.normal(0, 5, size=(size, size, 3))
        textures.append(pattern.astype(np.int16))
    bank = {"noise": noise, "texture": np.stack(textures), "plain": np.zeros((1, size, size, 3), np.int16)}
    # 8 orientations of each pattern (flips and a transpose): variety without seams
    return {
        kind: (np.concatenate([np.ascontiguousarray(o) for o in _orientations(t)]).clip(-60, 60) + _TEXTURE_SHIFT)
        .astype(np.uint8)
        for kind, t in bank.items()
    }


def _orientations(t: np.ndarray) -> list[np.ndarray]:
    flips = [t, t[:, ::-1], t[:, :, ::-1], t[:, ::-1, ::-1]]
    return flips + [f.transpose(0, 2, 1, 3) for f in flips]


def _boxes(masks: np.ndarray) -> np.ndarray:
    """Boxes (x1, y1, x2, y2), exclusive at the far end, of (K, H, W) masks; (0, 0, 0, 0) if empty."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # (K, H), (K, W)
    height, width = rows.shape[1], cols.shape[1]
    y1, x1 = rows.argmax(axis=1), cols.argmax(axis=1)
    y2, x2 = height - rows[:, ::-1].argmax(axis=1), width - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.int64).reshape(-1, 4)
    boxes[~rows.any(axis=1)] = 0  # fully hidden (possible only with max_overlap 1)
    return boxes


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def relation(a: SceneObject, b: SceneObject, margin_px: float) -> str | None:
    """The spatial relation of ``a`` to ``b`` ("left of", "right of", "above", "below"), or None
    when their centres are too close to say."""
    non_negative_number("margin_px", margin_px)
    dx = b.center[0] - a.center[0]
    dy = b.center[1] - a.center[1]
    if abs(dx) >= abs(dy):
        if abs(dx) < margin_px:
            return None
        return "left of" if dx > 0 else "right of"
    if abs(dy) < margin_px:
        return None
    return "above" if dy > 0 else "below"


def make_captions(scene: Scene, config: SceneConfig) -> list[Caption]:
    """Captions of every template, each with the objects it refers to.

    * object: "a red circle" (one per object);
    * attribute: "a small red circle";
    * pair: "a red circle and a blue square" (every unordered pair);
    * relation: "a red circle left of a blue square" (pairs whose relation is clear);
    * count: "three objects", and "two circles" where a shape occurs more than once.
    With ``unique_objects`` every object caption names exactly one object.
    """
    if not isinstance(config, SceneConfig):
        raise TypeError(f"config must be a SceneConfig (the world's, for the relation margin); got {type(config).__name__}")
    objs = scene.objects
    captions: list[Caption] = []
    for k, o in enumerate(objs):
        captions.append(Caption(f"a {o.colour} {o.shape}", "object", (k,)))
        captions.append(Caption(f"a {o.size} {o.colour} {o.shape}", "attribute", (k,)))
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            captions.append(Caption(f"a {a.name} and a {b.name}", "pair", (i, j)))
            said = relation(a, b, config.relation_margin * config.image_size)
            if said is not None:
                captions.append(Caption(f"a {a.name} {said} a {b.name}", "relation", (i, j)))
    if objs:
        noun = "object" if len(objs) == 1 else "objects"
        captions.append(Caption(f"{NUMBER_WORDS[len(objs)]} {noun}", "count", tuple(range(len(objs)))))
        by_shape: dict[str, list[int]] = {}
        for k, o in enumerate(objs):
            by_shape.setdefault(o.shape, []).append(k)
        for shape, members in by_shape.items():
            if len(members) > 1:
                captions.append(Caption(f"{NUMBER_WORDS[len(members)]} {shape}s", "count", tuple(members)))
    return captions


def swapped_relation(caption: Caption, scene: Scene) -> str:
    """The relation caption with its two objects exchanged ("a blue square left of a red circle"):
    the hard negative for relation understanding."""
    if caption.kind != "relation":
        raise ValueError("only relation captions can be swapped")
    i, j = caption.objects
    a, b = scene.objects[i], scene.objects[j]
    said = caption.text[len(f"a {a.name} ") : -len(f" a {b.name}")]
    return f"a {b.name} {said} a {a.name}"
