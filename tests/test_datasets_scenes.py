"""The scene world: determinism, ground truth that matches the pixels, captions that refer right."""

from __future__ import annotations

import numpy as np
import pytest

from mmelkit.datasets import COLOURS, SHAPES, SceneConfig, SceneWorld, relation, swapped_relation
from mmelkit.datasets.scenes import SceneObject


@pytest.fixture(scope="module")
def world() -> SceneWorld:
    return SceneWorld(SceneConfig(max_objects=5), seed=3, length=60)


def test_scenes_are_deterministic_and_random_access(world: SceneWorld) -> None:
    again = SceneWorld(SceneConfig(max_objects=5), seed=3)
    for index in (7, 0, 31):
        a, b = world[index], again[index]
        assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
        assert a.captions == b.captions
    other = SceneWorld(SceneConfig(max_objects=5), seed=4)
    assert not np.array_equal(world[7].image, other[7].image)
    with pytest.raises(IndexError):
        world[-1]


def test_masks_match_the_painted_pixels(world: SceneWorld) -> None:
    for scene in world:
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 5
        assert scene.masks.shape == (len(scene.objects), 64, 64)
        assert not (scene.masks.sum(axis=0) > 1).any(), "visible masks must not overlap"
        for k, obj in enumerate(scene.objects):
            mask = scene.masks[k]
            assert mask.sum() > 0
            colour = np.array(COLOURS[obj.colour])
            # every visible pixel carries the object's colour (up to the per-object shade)
            assert np.abs(scene.image[mask].astype(int) - colour).max() <= 12 + 1
            x1, y1, x2, y2 = scene.boxes[k]
            assert mask[y1:y2, x1:x2].sum() == mask.sum()
            assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()
            assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()


def test_overlap_is_bounded() -> None:
    config = SceneConfig(min_objects=6, max_objects=6, max_overlap=0.1)
    world = SceneWorld(config, seed=5, length=30)
    for scene in world:
        for k, obj in enumerate(scene.objects):
            full_area = world._shape_mask(obj.shape, *obj.center, obj.diameter / 2)[1].sum()
            assert scene.masks[k].sum() >= 0.9 * full_area - 1


def test_captions_refer_to_the_right_objects(world: SceneWorld) -> None:
    for scene in world:
        kinds = {c.kind for c in scene.captions}
        assert {"object", "attribute", "count"} <= kinds
        for caption in scene.captions:
            assert caption.objects
            mask = scene.mask_of(caption)
            assert mask.sum() == sum(scene.masks[k].sum() for k in caption.objects)
            named = [scene.objects[k] for k in caption.objects]
            if caption.kind in ("object", "attribute"):
                assert caption.text.endswith(named[0].name)
            if caption.kind == "attribute":
                assert named[0].size in caption.text
            if caption.kind in ("pair", "relation"):
                assert caption.text.startswith(f"a {named[0].name}") and caption.text.endswith(f"a {named[1].name}")
        names = [o.name for o in scene.objects]
        assert len(set(names)) == len(names), "unique_objects: one object per colour-shape name"


def test_relations_follow_the_geometry() -> None:
    def at(x: float, y: float) -> SceneObject:
        return SceneObject("circle", "red", "small", (x, y), 12)

    assert relation(at(10, 30), at(50, 30), margin_px=5) == "left of"
    assert relation(at(50, 30), at(10, 30), margin_px=5) == "right of"
    assert relation(at(30, 10), at(30, 50), margin_px=5) == "above"
    assert relation(at(30, 50), at(30, 10), margin_px=5) == "below"
    assert relation(at(30, 30), at(32, 31), margin_px=5) is None


def test_swapped_relation(world: SceneWorld) -> None:
    scene = next(s for s in world if s.captions_of("relation"))
    caption = scene.captions_of("relation")[0]
    swapped = swapped_relation(caption, scene)
    a, b = (scene.objects[k].name for k in caption.objects)
    assert swapped.startswith(f"a {b} ") and swapped.endswith(f" a {a}") and swapped != caption.text
    with pytest.raises(ValueError):
        swapped_relation(scene.captions_of("object")[0], scene)


def test_clutter_world_with_sixteen_objects() -> None:
    config = SceneConfig(image_size=128, min_objects=16, max_objects=16, max_overlap=0.3, clutter=4).scaled(128)
    scenes = list(SceneWorld(config, seed=9, length=5))
    assert max(len(s.objects) for s in scenes) >= 14  # crowded scenes may place a few fewer
    assert all(s.image.shape == (128, 128, 3) for s in scenes)
    counts = [c for s in scenes for c in s.captions_of("count")]
    assert any(c.text.startswith(("fourteen", "fifteen", "sixteen")) for c in counts)


def test_all_shapes_and_backgrounds_render() -> None:
    config = SceneConfig(shapes=tuple(SHAPES), backgrounds=("noise", "texture", "plain"), min_objects=3, max_objects=3)
    scenes = list(SceneWorld(config, seed=11, length=80))
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {s.background for s in scenes} == {"noise", "texture", "plain"}
    plain = next(s for s in scenes if s.background == "plain")
    background = ~plain.masks.any(axis=0)
    assert len(np.unique(plain.image[background], axis=0)) == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"min_objects": 0}, {"max_objects": 17}, {"shapes": ("blob",)}, {"colours": ("mauve",)}, {"image_size": 8},
     {"max_overlap": 2.0}, {"sizes": (("huge", 90),)},
     {"image_size": 32, "min_objects": 16, "max_objects": 16, "sizes": (("small", 14),), "max_overlap": 0.0}],
)
def test_bad_configs(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SceneConfig(**kwargs)


def test_dataloader_batches_scenes(world: SceneWorld) -> None:
    import torch
    from torch.utils.data import DataLoader

    from mmelkit.datasets import collate_scenes

    batch = next(iter(DataLoader(world, batch_size=5, collate_fn=collate_scenes)))
    assert batch["images"].shape == (5, 3, 64, 64) and batch["images"].dtype == torch.uint8
    assert np.array_equal(batch["images"][2].permute(1, 2, 0).numpy(), world[2].image)
    assert [s.index for s in batch["scenes"]] == [0, 1, 2, 3, 4]


def _reference_raster(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """The shape over the whole canvas, computed directly (no stamp cache, no cropping)."""
    centres = np.arange(size, dtype=np.float64) + 0.5
    return SHAPES[shape]((centres[None, :] - cx) / radius, (centres[:, None] - cy) / radius)


@pytest.mark.parametrize("image_size", [64, 40])
def test_cached_stamps_equal_a_direct_rasterisation(image_size: int) -> None:
    # Visible mask of object k = its full shape minus every later (painted on top) object's shape.
    # 40 px with large objects makes many stamps touch the border, exercising the cropped path.
    config = SceneConfig(image_size=image_size, min_objects=3, max_objects=6, shapes=tuple(SHAPES), max_overlap=0.3)
    world = SceneWorld(config, seed=21, length=40)
    touched_border = overlapped = 0
    for scene in world:
        full = [_reference_raster(o.shape, *o.center, o.diameter / 2, image_size) for o in scene.objects]
        for k, obj in enumerate(scene.objects):
            assert obj.center[0] * 8 == int(obj.center[0] * 8), "centres lie on the 1/8-pixel grid"
            later = np.zeros_like(full[k])
            for top in full[k + 1 :]:
                later |= top
            np.testing.assert_array_equal(scene.masks[k], full[k] & ~later)
            overlapped += int((full[k] & later).any())
            touched_border += int(full[k][[0, -1]].any() or full[k][:, [0, -1]].any())
    assert touched_border and overlapped, "the fixture must exercise cropped and overlapping stamps"


def test_scene_streams_survive_pickling_and_threads() -> None:
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    world = SceneWorld(SceneConfig(), seed=8)
    expected = [world[i].image for i in range(12)]
    copy = pickle.loads(pickle.dumps(world))
    assert all(np.array_equal(copy[i].image, expected[i]) for i in range(12))
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda i: world[i].image, list(range(12)) * 4))
    assert all(np.array_equal(image, expected[i % 12]) for i, image in enumerate(images))
    # a stream is positioned by the index alone: drawing other scenes in between changes nothing
    first = world.stream(5).random(3)
    world[99]
    np.testing.assert_array_equal(world.stream(5).random(3), first)


def test_choices_are_uniform() -> None:
    # object counts, colour-shape pairs and centres are uniform (loose bounds: 3,000 scenes)
    config = SceneConfig(min_objects=1, max_objects=4)
    world = SceneWorld(config, seed=13)
    scenes = [world[i] for i in range(3000)]
    counts = np.bincount([len(s.objects) for s in scenes], minlength=5)[1:]
    assert counts.min() > 0.2 * 3000 and counts.max() < 0.3 * 3000  # 1 to 4 rarely fails to place
    pairs = np.bincount([config.shapes.index(o.shape) * 8 + config.colours.index(o.colour)
                         for s in scenes for o in s.objects], minlength=48)
    assert pairs.min() > 0.6 * pairs.mean() and pairs.max() < 1.4 * pairs.mean()
    xs = np.array([o.center[0] for s in scenes for o in s.objects])
    assert abs(np.median(xs) - 32) < 1.5


def test_backdrop_is_the_scene_wherever_no_object_lies(world: SceneWorld) -> None:
    busy = SceneWorld(SceneConfig(max_objects=5, clutter=3), seed=9)
    for scene_world in (world, busy):
        for index in range(0, 60, 7):
            scene = scene_world[index]
            free = ~scene.masks.any(axis=0)
            assert scene.backdrop.shape == scene.image.shape and scene.backdrop.dtype == np.uint8
            assert np.array_equal(scene.backdrop[free], scene.image[free])
            assert not np.array_equal(scene.backdrop, scene.image)  # the objects are not part of it


def test_erased_paints_only_the_named_objects_over(world: SceneWorld) -> None:
    for index in (2, 11, 40):
        scene = world[index]
        image = scene.image.copy()
        assert np.array_equal(scene.erased(range(len(scene.objects))), scene.backdrop)
        assert np.array_equal(scene.erased([]), scene.image)
        for k in range(len(scene.objects)):
            erased, mask = scene.erased([k]), scene.masks[k]
            assert np.array_equal(erased[~mask], scene.image[~mask])  # every other object, every other pixel
            assert np.array_equal(erased[mask], scene.backdrop[mask])
        caption = scene.captions[0]
        assert np.array_equal(scene.erased(caption), scene.erased(caption.objects))
        assert np.array_equal(scene.image, image)  # erasing draws a copy
    with pytest.raises(IndexError, match=r"objects \[9\] do not exist"):
        world[2].erased([9])


def test_scenes_of_derived_tasks_erase_too() -> None:
    """Scenes drawn with chosen objects (questions, shortcut tasks) keep their backdrop as well."""
    from mmelkit.datasets.vqa import held_out

    item = held_out(seed=3, length=5)[0]
    scene = item.scene
    erased = scene.erased(item.objects)
    mask = item.mask()
    assert np.array_equal(erased[~mask], scene.image[~mask]) and np.array_equal(erased[mask], scene.backdrop[mask])
    assert mask.any() and not np.array_equal(erased, scene.image)
