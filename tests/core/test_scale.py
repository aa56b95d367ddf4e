"""Slices resized before the network (``set_volume(..., scale=...)``), results in data pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_revolver.core.compat import TaskMismatch
from napari_revolver.core.predictor import RevolverPredictor
from napari_revolver.core.scale import (
    check_scale,
    labels_to_shape,
    mask_to_shape,
    painted_to_shape,
    points_to_work,
    probabilities_to_shape,
    resize_slice,
    work_shape,
)
from napari_revolver.core.task import Task, load_task
from napari_revolver.core.volume import VolumeSpec

SHAPE = (64, 80)
WORK = (32, 40)


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


# --------------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("bad", [0, -1, 0.05, 5, float("nan"), float("inf"), "big", None])
def test_check_scale_names_the_range(bad: object) -> None:
    with pytest.raises(ValueError, match="scale must be"):
        check_scale(bad)  # type: ignore[arg-type]


def test_volume_spec_refuses_a_bad_scale() -> None:
    with pytest.raises(ValueError, match=r"between 0.1 and 4; got 0"):
        VolumeSpec(scale=0).resolved((4, 32, 32))
    assert VolumeSpec(scale=0.5).resolved((4, 32, 32)).scale == 0.5


def test_work_shape_rounds_and_keeps_a_pixel() -> None:
    assert work_shape((64, 80), 0.5) == (32, 40)
    assert work_shape((65, 81), 0.5) == (32, 40)  # round half to even, as Python does
    assert work_shape((3, 3), 0.1) == (1, 1)
    assert work_shape((10, 12), 1.5) == (15, 18)


def test_points_map_pixel_centres_and_stay_on_the_slice() -> None:
    yx = np.array([[0.0, 0.0], [1.0, 3.0], [63.0, 79.0]])
    out = points_to_work(yx, SHAPE, WORK)
    # Data pixels 0 and 1 make working pixel 0: its centre is between theirs.
    np.testing.assert_allclose(out, [[-0.25, -0.25], [0.25, 1.25], [31.25, 39.25]])
    np.testing.assert_array_equal(points_to_work(yx, SHAPE, SHAPE), yx)
    far = points_to_work(np.array([[200.0, -50.0]]), SHAPE, WORK)
    np.testing.assert_allclose(far, [[31.5, -0.5]])
    # An odd side: 65 pixels at 0.5 are 32 (rounded), and the last centre maps to the last.
    odd = points_to_work(np.array([[0.0, 64.0]]), (65, 65), work_shape((65, 65), 0.5))
    np.testing.assert_allclose(odd, [[0.5 * 32 / 65 - 0.5, 64.5 * 32 / 65 - 0.5]])


def test_resize_slice_averages_when_shrinking_and_keeps_channels() -> None:
    checker = (np.indices((8, 8)).sum(0) % 2).astype(np.uint16) * 100
    small = resize_slice(checker, (4, 4))
    assert small.dtype == np.float32 and small.shape == (4, 4)
    np.testing.assert_allclose(small, 50.0, atol=1.5)  # averaged, not sampled (0 or 100)
    rgb = np.zeros((8, 6, 3), np.uint8)
    rgb[..., 1] = 200
    big = resize_slice(rgb, (16, 12))
    assert big.shape == (16, 12, 3)
    np.testing.assert_allclose(big[..., 1], 200.0)
    np.testing.assert_allclose(big[..., 0], 0.0)
    assert resize_slice(checker, (8, 8)) is checker


def test_probabilities_and_masks_come_back_to_the_data_shape() -> None:
    probs = np.random.default_rng(0).random((2, *WORK)).astype(np.float32)
    out = probabilities_to_shape(probs, SHAPE)
    assert out.shape == (2, *SHAPE) and out.dtype == np.float32
    assert out.min() >= probs.min() - 1e-6 and out.max() <= probs.max() + 1e-6
    disc = _disc(WORK, 16, 20, 8)
    big = mask_to_shape(disc, SHAPE)
    assert big.dtype == bool and big.shape == SHAPE
    blocks = disc.repeat(2, 0).repeat(2, 1)  # each working pixel covers 2 x 2 data pixels
    assert (big & blocks).sum() / (big | blocks).sum() > 0.95


def test_painted_strokes_survive_binning() -> None:
    lab = np.zeros(SHAPE, np.uint8)
    lab[10, 5:60] = 1  # a one-pixel foreground stroke
    lab[40:44, 10:70] = 2
    out = painted_to_shape(lab, WORK)
    assert out.shape == WORK
    assert (out[5, 3:30] == 1).all()
    assert (out[20:22, 5:35] == 2).all()
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out[28:, :] == 0).all()


def test_labels_keep_ids_and_smooth_outlines_when_enlarged() -> None:
    small = np.zeros(WORK, np.uint32)
    small[_disc(WORK, 10, 10, 6)] = 7
    small[_disc(WORK, 20, 28, 7)] = 300
    small[0:3, 36:40] = 2  # touching the border
    big = labels_to_shape(small, SHAPE)
    assert big.dtype == np.uint32 and big.shape == SHAPE
    assert set(np.unique(big)) == {0, 2, 7, 300}
    for i in (7, 300, 2):
        ratio = (big == i).sum() / (4 * (small == i).sum())
        assert 0.9 < ratio < 1.1, (i, ratio)
    # A smooth outline: fewer boundary steps than nearest-neighbour enlargement.
    nearest = small.repeat(2, 0).repeat(2, 1)
    assert (np.diff(big == 300, axis=0) != 0).sum() <= (np.diff(nearest == 300, axis=0) != 0).sum()
    assert labels_to_shape(small, WORK) is small


# ----------------------------------------------------------------------------------- predictor


@pytest.fixture
def volume(make_blobs) -> np.ndarray:
    return make_blobs((3, *SHAPE), seed=3) * 100 + 500


def _binned(volume: np.ndarray) -> np.ndarray:
    return np.stack([resize_slice(v, WORK) for v in volume])


def _pair(tiny_model, volume: np.ndarray) -> tuple[RevolverPredictor, RevolverPredictor]:
    """A predictor at scale 0.5, and one at scale 1 on the same volume binned beforehand."""
    scaled = RevolverPredictor(model=tiny_model, device="cpu")
    scaled.set_volume(volume, scale=0.5)
    binned = RevolverPredictor(model=tiny_model, device="cpu")
    binned.set_volume(_binned(volume))
    return scaled, binned


def _work_points(points: list[list[float]]) -> np.ndarray:
    pts = np.asarray(points, np.float64)
    pts[:, 1:] = (pts[:, 1:] + 0.5) * 0.5 - 0.5
    return pts


def test_class_task_at_half_scale_is_the_binned_volume_enlarged(tiny_model, volume) -> None:
    scaled, binned = _pair(tiny_model, volume)
    assert scaled.info.slice_shape == SHAPE and scaled.work_info.slice_shape == WORK
    points = [[1, 30, 40], [1, 4, 70], [1, 60, 2]]
    t = scaled.guide(points, [1, 0, 0], name="blob")
    ref = binned.guide(_work_points(points), [1, 0, 0], name="blob")
    np.testing.assert_array_equal(t.points, points)  # the task keeps data pixels
    assert t.scale == 0.5 and ref.scale == 1.0
    np.testing.assert_allclose(t.sum_coarse, ref.sum_coarse, rtol=1e-5, atol=1e-5)
    prob = scaled.predict_proba(2, t)
    assert prob.shape == (1, *SHAPE)
    np.testing.assert_allclose(
        prob, probabilities_to_shape(binned.predict_proba(2, ref), SHAPE), atol=1e-5
    )
    mask = scaled.predict_slice(2, t)
    assert mask.shape == SHAPE and mask.dtype == bool
    np.testing.assert_array_equal(mask, prob[0] > 0.5)
    out = scaled.segment(t, output="masks")
    assert out.shape == (3, 1, *SHAPE)
    steps = list(scaled.propagate(t, instances=True))
    assert all(s.result.shape == SHAPE for s in steps)


def test_painted_mask_at_half_scale(tiny_model, volume) -> None:
    scaled, binned = _pair(tiny_model, volume)
    mask = _disc(SHAPE, 30, 40, 12)
    t = scaled.guide_mask(1, mask)
    ref = binned.guide_mask(1, painted_to_shape(np.where(mask, 1, 2).astype(np.uint8), WORK) == 1)
    np.testing.assert_allclose(t.sum_fine, ref.sum_fine, rtol=1e-5, atol=1e-5)
    assert scaled.predict_slice(0, t).shape == SHAPE
    with pytest.raises(ValueError, match=r"slice shape \(64, 80\); got \(32, 40\)"):
        scaled.guide_mask(1, mask_to_shape(mask, WORK))
    fit = scaled.fit_labels({1: np.where(mask, 1, 2).astype(np.uint8)})
    assert fit is None or fit.active in (True, False)


def test_object_task_at_half_scale_follows_in_data_pixels(tiny_model, volume) -> None:
    scaled, binned = _pair(tiny_model, volume)
    fg = volume[1] > 550
    from scipy import ndimage

    comp, n = ndimage.label(fg)
    assert n >= 1
    cy, cx = ndimage.center_of_mass(comp == 1)
    click = [[1, round(cy), round(cx)]]
    obj = scaled.guide(click, [1], kind="object", name="o")
    ref = binned.guide(_work_points(click), [1], kind="object", name="o")
    mask = scaled.object_mask(1, obj)
    assert mask.shape == SHAPE and mask[round(cy), round(cx)]
    np.testing.assert_array_equal(mask, mask_to_shape(binned.object_mask(1, ref), SHAPE))
    labels = scaled.segment(obj)
    assert labels.shape == (3, *SHAPE)
    expect = np.stack([labels_to_shape(s, SHAPE) for s in binned.segment(ref)])
    np.testing.assert_array_equal(labels, expect)
    assert scaled.predict_slice(1, obj).shape == SHAPE


def test_painted_object_slice_is_taken_in_data_pixels(tiny_model, volume) -> None:
    from dataclasses import replace

    scaled = RevolverPredictor(model=tiny_model, device="cpu")
    scaled.set_volume(volume, scale=0.5)
    obj = scaled.guide([[1, 30, 40]], [1], kind="object")
    painted = _disc(SHAPE, 20, 20, 10)
    obj = replace(obj, object_masks=(((0,), painted),))
    labels = scaled.segment(obj)
    assert labels.shape == (3, *SHAPE)
    inside = (labels[0] == obj.label_value)[painted].mean()
    assert inside > 0.9


def test_scale_is_part_of_the_task_and_checked(tiny_model, volume, tmp_path) -> None:
    scaled = RevolverPredictor(model=tiny_model, device="cpu")
    scaled.set_volume(volume, scale=0.5)
    t = scaled.guide([[1, 30, 40]], [1])
    path = t.save(tmp_path / "t.json")
    assert load_task(path).scale == 0.5
    plain = RevolverPredictor(model=tiny_model, device="cpu")
    plain.set_volume(volume)
    with pytest.raises(TaskMismatch, match=r"scale=0.5") as err:
        plain.predict_slice(0, t)
    assert err.value.field == "scale"
    with pytest.raises(ValueError, match="different scales"):
        t.merge(plain.guide([[1, 30, 40]], [1]))
    # A file written before scales existed reads as scale 1.
    d = json.loads(path.read_text())
    del d["scale"]
    assert Task.from_dict(d).scale == 1.0
    d["scale"] = -2
    with pytest.raises(ValueError, match=r"scale must be between 0.1 and 4; got -2"):
        Task.from_dict(d)


def test_features_are_never_shared_across_scales(tiny_model, volume, tmp_path) -> None:
    p = RevolverPredictor(model=tiny_model, device="cpu")
    p.set_volume(volume, store=tmp_path / "f.zarr")
    list(p.precompute())
    full = p.features(0)
    p.set_volume(volume, store=tmp_path / "f.zarr", scale=0.5)
    assert p.signature().preprocessing.endswith("-x0.5")
    assert p.signature().slice_shape == WORK
    half = p.features(0)
    assert half.coarse.shape[-2:] != full.coarse.shape[-2:]
    other = RevolverPredictor(model=tiny_model, device="cpu")
    other.set_volume(volume)
    assert other.adopt_features(p) == 0


def test_default_scale_comes_from_the_preprocessing(tiny_model, volume) -> None:
    from napari_revolver.core.preprocess import Preprocessing

    p = RevolverPredictor(model=tiny_model, device="cpu", preprocessing=Preprocessing(scale=0.5))
    p.set_volume(volume)
    assert p.spec.scale == 0.5 and p.work_info.slice_shape == WORK
    p.set_volume(volume, scale=1.0)
    assert p.work_info.slice_shape == SHAPE
    with pytest.raises(ValueError, match="scale must be between"):
        p.set_volume(volume, scale=10)
