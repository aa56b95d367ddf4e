"""Tests for procedural volumes (synthetic) and episodic training data (episodes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_revolver.core import synthetic
from napari_revolver.core.episodes import (
    Episode,
    EpisodeConfig,
    LabelledStack,
    StackEpisodes,
    SyntheticEpisodes,
    load_labelled_stacks,
    sample_points,
)


def _scene(seed: int, shape: tuple[int, int, int] = (6, 48, 56)) -> synthetic.Scene:
    rng = np.random.default_rng(seed)
    return synthetic.make_scene(rng, synthetic.random_style(rng), shape)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_render_slice_shapes_dtypes_and_consistent_labels(seed: int) -> None:
    scene = _scene(seed)
    assert isinstance(scene.style, synthetic.SceneStyle)
    assert scene.shape == (6, 48, 56)
    n = len(scene.centers)
    assert scene.radii.shape == (n, 3) and scene.classes.shape == (n,)
    r = synthetic.render_slice(scene, 2.5)
    assert r.image.shape == (48, 56) and r.image.dtype == np.float32
    assert r.semantic.shape == (48, 56) and r.semantic.dtype == np.int16
    assert r.instance.dtype == np.int32 and r.cells.dtype == np.int32
    assert np.isfinite(r.image).all()
    # Every object pixel carries its object class; ids are 1..N.
    inside = r.instance > 0
    assert (r.semantic[inside] > 0).all()
    assert r.instance.max() <= n
    assert (r.semantic[inside] == scene.classes[r.instance[inside] - 1]).all()
    k = len(scene.style.classes)
    assert r.semantic.max() <= k + 1
    if scene.style.membrane is None:
        assert not r.cells.any() and (r.semantic <= k).all()


def test_scenes_and_renders_are_deterministic_for_a_seed() -> None:
    a, b = _scene(7), _scene(7)
    np.testing.assert_array_equal(a.centers, b.centers)
    ra, rb = synthetic.render_slice(a, 3.0), synthetic.render_slice(b, 3.0)
    np.testing.assert_array_equal(ra.image, rb.image)
    np.testing.assert_array_equal(ra.instance, rb.instance)
    rc = synthetic.render_slice(_scene(8), 3.0)
    assert not np.array_equal(ra.image, rc.image)


def test_render_volume_stacks_planes() -> None:
    scene = _scene(3, (4, 32, 40))
    vol = synthetic.render_volume(scene)
    assert vol.image.shape == (4, 32, 40) and vol.semantic.shape == (4, 32, 40)
    np.testing.assert_array_equal(vol.image[2], synthetic.render_slice(scene, 2.0).image)


def test_smooth_noise_is_standardised() -> None:
    f = synthetic.smooth_noise(np.random.default_rng(0), (64, 80), 8.0)
    assert f.shape == (64, 80)
    assert abs(float(f.mean())) < 1e-3 and abs(float(f.std()) - 1) < 1e-2


@pytest.fixture(scope="module")
def demo() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return synthetic.sample_stack(seed=0)


def test_sample_stack_shapes_and_dtypes(demo: tuple[np.ndarray, ...]) -> None:
    image, labels, points, point_labels = demo
    assert image.shape == (24, 256, 256) and image.dtype == np.uint16
    assert labels.shape == (24, 256, 256) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1}
    assert points.ndim == 2 and points.shape[1] == 3
    assert point_labels.dtype == np.int8 and point_labels.shape == (len(points),)
    assert image.min() < image.max()


def test_sample_stack_points_are_on_one_slice_and_match_the_labels(
    demo: tuple[np.ndarray, ...],
) -> None:
    _, labels, points, point_labels = demo
    assert len(np.unique(points[:, 0])) == 1
    assert (point_labels == 1).sum() >= 1 and (point_labels == 0).sum() >= 1
    z, y, x = np.rint(points).astype(int).T
    assert (labels[z, y, x][point_labels == 1] == 1).all()
    assert (labels[z, y, x][point_labels == 0] == 0).all()


def test_sample_stack_is_deterministic_for_a_seed() -> None:
    a = synthetic.sample_stack(seed=3, shape=(4, 64, 64))
    b = synthetic.sample_stack(seed=3, shape=(4, 64, 64))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape == (4, 64, 64)


# -------------------------------------------------------------------------------------- episodes


def _check_episode(ep: Episode, crop: int) -> None:
    assert isinstance(ep, Episode)
    assert ep.support.shape == (3, crop, crop) and ep.support.dtype == np.float32
    assert ep.query.shape == (3, crop, crop) and ep.query.dtype == np.float32
    assert ep.masks.shape == (2, crop // 4, crop // 4) and ep.masks.dtype == np.float32
    assert ep.target.shape == (crop, crop) and ep.target.dtype == np.float32
    assert set(np.unique(ep.target)) <= {0.0, 1.0}
    assert (ep.masks >= 0).all() and ep.masks[0].sum() > 0
    assert np.isfinite(ep.support).all() and np.isfinite(ep.query).all()


def test_synthetic_episodes_have_documented_shapes() -> None:
    episodes = SyntheticEpisodes(EpisodeConfig(crop=64), seed=0)
    for _ in range(3):
        _check_episode(next(episodes), 64)


def test_synthetic_episodes_are_deterministic_for_a_seed() -> None:
    a = next(SyntheticEpisodes(EpisodeConfig(crop=64), seed=5))
    b = next(SyntheticEpisodes(EpisodeConfig(crop=64), seed=5))
    np.testing.assert_array_equal(a.support, b.support)
    np.testing.assert_array_equal(a.target, b.target)


def _hand_made_stack() -> LabelledStack:
    rng = np.random.default_rng(0)
    nuclei = synthetic.random_class_style(rng, "nuclei")
    style = synthetic.SceneStyle((nuclei,), None, 0.05, 8.0, 0.5, 0.02, 300.0, 0.1, 1.0)
    vol = synthetic.render_volume(synthetic.make_scene(rng, style, (6, 72, 72)))
    return LabelledStack(
        "hand", list(vol.image), list(vol.instance), semantic=False, volumetric=True
    )


def test_stack_episodes_have_documented_shapes() -> None:
    stack = _hand_made_stack()
    assert any(lab.any() for lab in stack.labels)
    episodes = StackEpisodes([stack], EpisodeConfig(crop=64), seed=0)
    for _ in range(4):
        _check_episode(next(episodes), 64)


def test_stack_episodes_need_stacks() -> None:
    with pytest.raises(ValueError, match="no labelled stacks"):
        StackEpisodes([])


def test_sample_points_lie_inside_the_mask() -> None:
    mask = np.zeros((32, 32), bool)
    mask[5:15, 10:20] = True
    pts = sample_points(np.random.default_rng(0), mask, 20).astype(int)
    assert pts.shape == (20, 2)
    assert mask[pts[:, 0], pts[:, 1]].all()
    assert sample_points(np.random.default_rng(0), np.zeros((4, 4), bool), 3).shape == (0, 2)


def test_load_labelled_stacks_splits_train_and_val(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d = tmp_path / "cells"
    d.mkdir()
    img = rng.integers(0, 1000, (8, 32, 32)).astype(np.uint16)
    lab = np.zeros((8, 32, 32), np.uint8)
    lab[:, 8:20, 8:20] = 1
    tifffile.imwrite(d / "image.tif", img, photometric="minisblack")
    tifffile.imwrite(d / "labels.tif", lab, photometric="minisblack")
    (tmp_path / "empty").mkdir()

    train = load_labelled_stacks(tmp_path, ["cells"], split="train")
    val = load_labelled_stacks(tmp_path, ["cells"], split="val")
    everything = load_labelled_stacks(tmp_path, ["cells"], split="all")
    assert [len(s.images) for s in (train[0], val[0], everything[0])] == [6, 2, 8]
    assert train[0].name == "cells" and train[0].semantic
    np.testing.assert_array_equal(val[0].images[0], img[6])
    np.testing.assert_array_equal(train[0].labels[5], lab[5])
    with pytest.raises(FileNotFoundError, match="neither image.tif nor images/"):
        load_labelled_stacks(tmp_path)  # the empty folder is not a data set
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_labelled_stacks(tmp_path / "missing")


def test_load_labelled_stacks_rejects_mismatched_labels(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    tifffile.imwrite(d / "image.tif", np.zeros((4, 32, 32), np.uint16), photometric="minisblack")
    tifffile.imwrite(d / "labels.tif", np.zeros((4, 16, 16), np.uint8), photometric="minisblack")
    with pytest.raises(ValueError, match="does not match"):
        load_labelled_stacks(tmp_path)


def test_stained_rgb_renders_bright_objects_dark_in_one_stain() -> None:
    from napari_revolver.core.synthetic import stain_rgb

    rng = np.random.default_rng(0)
    a = np.zeros((64, 64), np.float32)
    a[20:40, 20:40] = 10.0
    b = np.roll(a, 5, axis=1)
    out = stain_rgb(rng, [a, b])
    assert len(out) == 2
    for img, src in zip(out, (a, b), strict=True):
        assert img.shape == (64, 64, 3) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        # Brightfield: the object absorbs, most in red and green (haematoxylin-like).
        obj, bg = img[src > 0].mean(axis=0), img[src == 0].mean(axis=0)
        assert np.all(obj < bg)
    # One stain for the pair: the objects' extra optical density has the same colour in both
    # (the counterstain varies from image to image).
    extra = []
    for img, src in zip(out, (a, b), strict=True):
        od = -np.log(img)
        extra.append(od[src > 0].mean(axis=0) - od[src == 0].mean(axis=0))
    cos = extra[0] @ extra[1] / np.linalg.norm(extra[0]) / np.linalg.norm(extra[1])
    assert cos > 0.99


def test_filaments_are_thin_curved_lines() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(3)
    fil = synthetic.random_class_style(rng, "filaments")
    assert fil.bend > 0
    style = synthetic.SceneStyle(
        classes=(fil,),
        membrane=None,
        background_texture=0.0,
        background_texture_scale=10,
        blur=0.0,
        noise=0.0,
        photons=1e4,
        illumination=0.0,
        gamma=1.0,
    )
    scene = synthetic.make_scene(np.random.default_rng(1), style, (9, 256, 256))
    planes = synthetic.render_volume(scene)
    lengths, widths, bent = [], [], 0
    for z in range(9):
        for i in np.unique(planes.instance[z])[1:]:
            m = planes.instance[z] == i
            if m.sum() < 20 or m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any():
                continue
            skeleton_len = np.ptp(np.argwhere(m), axis=0).max() + 1
            lengths.append(skeleton_len)
            widths.append(m.sum() / skeleton_len)
            # Bent: the chord's midpoint lies off the line.
            yx = np.argwhere(m)
            far = yx[np.argsort(((yx - yx.mean(0)) ** 2).sum(1))[-1]]
            other = yx[np.argmax(((yx - far) ** 2).sum(1))]
            mid = np.rint((far + other) / 2).astype(int)
            bent += not ndimage.binary_dilation(m, iterations=1)[tuple(mid)]
    assert len(lengths) >= 5
    assert np.median(widths) < 4.5 and np.median(lengths) > 15  # thin and long
    assert bent >= 1  # at least one visibly curved
    assert (
        planes.image[planes.semantic == 1].mean() - planes.image[planes.semantic == 0].mean()
    ) != 0
