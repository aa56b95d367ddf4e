"""Tests for RevolverPredictor: volumes, guiding, predicting, propagating, tasks and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_revolver.core import tiling as tiling_module
from napari_revolver.core.instances import mask_to_instances
from napari_revolver.core.predictor import (
    PropagationStep,
    RevolverPredictor,
    VolumeInfo,
    labels_from_probabilities,
)
from napari_revolver.core.task import Task, load_task


@pytest.fixture
def stack(make_blobs) -> np.ndarray:
    return make_blobs((4, 48, 48))


@pytest.fixture
def task(predictor: RevolverPredictor, stack: np.ndarray) -> Task:
    predictor.set_volume(stack)
    return predictor.guide([[1, 24, 24], [1, 5, 5]], [1, 0], name="blob")


# ----------------------------------------------------------------------------------- set_volume


@pytest.mark.parametrize(
    ("shape", "dtype", "leading", "rgb"),
    [
        ((40, 44), np.float32, (), False),
        ((3, 40, 44), np.float32, (3,), False),
        ((2, 3, 40, 44), np.float32, (2, 3), False),
        ((40, 44, 3), np.uint8, (), True),
        ((3, 40, 44), np.uint16, (3,), False),
        ((3, 40, 44), np.float64, (3,), False),
        ((3, 40, 44), np.int16, (3,), False),
        ((40, 44), np.bool_, (), False),
    ],
)
def test_set_volume_accepts_layouts_and_dtypes(
    predictor: RevolverPredictor,
    rng: np.random.Generator,
    shape: tuple[int, ...],
    dtype: type,
    leading: tuple[int, ...],
    rgb: bool,
) -> None:
    if dtype is np.bool_:
        data = rng.random(shape) > 0.5
    else:
        data = (rng.random(shape) * 200).astype(dtype)
    info = predictor.set_volume(data)
    assert isinstance(info, VolumeInfo)
    assert info.shape == shape
    assert info.leading_shape == leading
    assert info.slice_shape == (40, 44)
    assert info.rgb is rgb
    assert info.n_slices == (int(np.prod(leading)) if leading else 1)
    assert info.ndim == len(leading) + 2
    assert isinstance(info.fingerprint, str) and len(info.fingerprint) == 32
    point = [*(n // 2 for n in leading), 20, 22]
    t = predictor.guide([point], [1])
    mask = predictor.predict_slice(tuple(n - 1 for n in leading), t)
    assert mask.shape == (40, 44) and mask.dtype == bool


def test_set_volume_rgb_guess_can_be_overridden(
    predictor: RevolverPredictor, rng: np.random.Generator
) -> None:
    data = rng.random((40, 44, 3)).astype(np.float32)
    assert predictor.set_volume(data).rgb
    # Not RGB: then the slices are (44, 3), too small to segment.
    with pytest.raises(ValueError, match=r"at least 8x8 pixels; got \(Y, X\) = \(44, 3\)"):
        predictor.set_volume(data, rgb=False)
    info = predictor.set_volume(rng.random((4, 40, 44)).astype(np.float32), rgb=False)
    assert not info.rgb and info.leading_shape == (4,)


def test_volume_info_flat_and_unflat_round_trip(
    predictor: RevolverPredictor, rng: np.random.Generator
) -> None:
    info = predictor.set_volume(rng.random((2, 3, 32, 32)).astype(np.float32))
    assert info.flat((1, 2)) == 5
    assert info.flat(4) == 4
    assert info.unflat(5) == (1, 2)
    assert [info.flat(info.unflat(k)) for k in range(6)] == list(range(6))
    with pytest.raises(IndexError, match="out of range"):
        info.flat((2, 0))
    with pytest.raises(IndexError, match="leading axes"):
        info.flat((1,))
    with pytest.raises(IndexError, match="out of range"):
        info.flat(6)


def test_multichannel_volume_segments_the_chosen_channel(
    predictor: RevolverPredictor, rng: np.random.Generator, make_blobs
) -> None:
    channels = np.stack([rng.random((3, 40, 40)).astype(np.float32), make_blobs((3, 40, 40))])
    assert channels.shape == (2, 3, 40, 40)  # (C, Z, Y, X)
    info = predictor.set_volume(channels, channel_axis=0, channel=1)
    assert info.shape == (3, 40, 40) and info.leading_shape == (3,)
    t = predictor.guide([[1, 20, 20]], [1])
    via_channel = predictor.predict_proba(2, t)

    single = RevolverPredictor(model=predictor.model, device="cpu")
    info_single = single.set_volume(channels[1])
    assert info_single.fingerprint == info.fingerprint
    np.testing.assert_allclose(single.predict_proba(2, t), via_channel, atol=1e-6)


def test_multichannel_with_trailing_channel_axis(predictor: RevolverPredictor, make_blobs) -> None:
    data = np.stack([make_blobs((2, 32, 32), seed=s) for s in range(4)], axis=-1)  # (Z, Y, X, C)
    info = predictor.set_volume(data, channel_axis=-1, channel=3)
    assert info.shape == (2, 32, 32) and not info.rgb
    np.testing.assert_array_equal(predictor._read(1), data[1, :, :, 3])


# ---------------------------------------------------------------------------------------- guide


def test_guide_returns_task_with_mass_of_positives_and_negatives(
    predictor: RevolverPredictor, stack: np.ndarray
) -> None:
    predictor.set_volume(stack)
    pts = np.array([[1, 10, 10], [1, 20, 30], [1, 40, 40], [1, 3, 44], [1, 44, 3]], float)
    t = predictor.guide(pts, [1, 1, 1, 0, 0], name="cells", label_value=3)
    assert isinstance(t, Task)
    np.testing.assert_allclose(t.mass, [3.0, 2.0], rtol=1e-5)
    assert (t.n_positive, t.n_negative) == (3, 2)
    assert t.name == "cells" and t.label_value == 3
    assert t.model_key == "revolver-tiny"
    assert t.weights_sha256 == predictor.weights.sha256
    cfg = predictor.model.config
    assert t.sum_coarse.shape == (2, cfg.coarse_channels)
    assert t.sum_fine.shape == (2, cfg.feature_fine_channels)
    d = cfg.feature_fine_channels + cfg.coarse_channels
    assert t.moments is not None and t.moments.shape == (2, d + 1, d + 1)
    # The constant of the augmented moments holds the mass.
    np.testing.assert_allclose(t.moments[:, d, d], t.mass, rtol=1e-5)
    np.testing.assert_array_equal(t.points, pts)


def test_guide_leaves_the_callers_points_writable(
    predictor: RevolverPredictor, stack: np.ndarray
) -> None:
    predictor.set_volume(stack)
    pts = np.array([[1.0, 10.0, 10.0], [1.0, 30.0, 30.0]])
    labels = np.array([1, 0], np.int8)
    t = predictor.guide(pts, labels)
    assert pts.flags.writeable and labels.flags.writeable
    pts[0, 1] = 11.0  # e.g. a napari layer whose point is then moved
    assert t.points[0, 1] == 10.0
    assert not t.points.flags.writeable


def test_guide_accepts_bool_labels_and_a_single_point_vector(
    predictor: RevolverPredictor, stack: np.ndarray
) -> None:
    predictor.set_volume(stack)
    t = predictor.guide(np.array([2, 24, 24]), np.array([True]))
    np.testing.assert_allclose(t.mass, [1.0, 0.0], rtol=1e-5)
    assert t.points.shape == (1, 3)


def test_multi_shot_points_on_two_slices_all_count(
    predictor: RevolverPredictor, stack: np.ndarray
) -> None:
    predictor.set_volume(stack)
    pts_a = [[0, 24, 24], [0, 3, 3]]
    pts_b = [[3, 20, 26], [3, 26, 20], [3, 45, 45]]
    both = predictor.guide(pts_a + pts_b, [1, 0, 1, 1, 0])
    np.testing.assert_allclose(both.mass, [3.0, 2.0], rtol=1e-5)
    a = predictor.guide(pts_a, [1, 0])
    b = predictor.guide(pts_b, [1, 1, 0])
    merged = a.merge(b)
    np.testing.assert_allclose(both.sum_coarse, merged.sum_coarse, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(both.sum_fine, merged.sum_fine, rtol=1e-4, atol=1e-4)
    # The second slice matters: a task from slice 0 alone has other vectors.
    assert not np.allclose(both.sum_coarse, a.sum_coarse)


def test_guide_mask_gives_a_dense_task(predictor: RevolverPredictor, stack: np.ndarray) -> None:
    predictor.set_volume(stack)
    mask = np.zeros((48, 48), bool)
    mask[16:32, 8:24] = True
    t = predictor.guide_mask(2, mask, name="dense", label_value=2)
    cells = 48 * 48 / 16  # fine cells inside the (unpadded) slice
    np.testing.assert_allclose(t.mass.sum(), cells, rtol=1e-4)
    np.testing.assert_allclose(t.mass[0], mask.sum() / 16, rtol=1e-4)
    assert t.points.shape == (0, 3) and t.label_value == 2
    assert predictor.predict_slice(2, t).shape == (48, 48)
    with pytest.raises(ValueError, match="support mask is empty"):
        predictor.guide_mask(2, np.zeros((48, 48), bool))
    with pytest.raises(ValueError, match="slice shape"):
        predictor.guide_mask(2, np.ones((40, 48), bool))


# -------------------------------------------------------------------------------------- predict


def test_predict_slice_with_one_task_returns_bool_mask(
    predictor: RevolverPredictor, task: Task
) -> None:
    mask = predictor.predict_slice(2, task)
    assert mask.shape == (48, 48) and mask.dtype == bool
    probs = predictor.predict_proba(2, task)
    np.testing.assert_array_equal(mask, probs[0] > 0.5)
    np.testing.assert_array_equal(predictor.predict_slice(2, task, threshold=0.0), probs[0] > 0.0)


def test_predict_slice_with_several_tasks_returns_task_label_values(
    predictor: RevolverPredictor, stack: np.ndarray
) -> None:
    predictor.set_volume(stack)
    t1 = predictor.guide([[1, 24, 24], [1, 5, 5]], [1, 0], label_value=1)
    t2 = predictor.guide([[1, 5, 5], [1, 24, 24]], [1, 0], label_value=2)
    labels = predictor.predict_slice(1, [t1, t2], threshold=0.0)
    assert labels.shape == (48, 48) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    probs = predictor.predict_proba(1, [t1, t2])
    assert probs.shape == (2, 48, 48) and probs.dtype == np.float32
    assert (probs >= 0).all() and (probs <= 1).all()
    np.testing.assert_array_equal(labels, labels_from_probabilities(probs, [1, 2], 0.0))
    # With threshold 0 every pixel goes to its most probable task.
    np.testing.assert_array_equal(labels, np.where(probs[1] > probs[0], 2, 1))


def test_predict_proba_shape_and_range(predictor: RevolverPredictor, task: Task) -> None:
    probs = predictor.predict_proba(3, [task, task.renamed("copy", 2)])
    assert probs.shape == (2, 48, 48)
    assert np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-6)
    with pytest.raises(ValueError, match="no task"):
        predictor.predict_proba(3, [])


@pytest.mark.parametrize("shape", [(37, 53), (8, 8), (33, 64)])
def test_odd_slice_sizes_are_padded_and_output_has_slice_shape(
    predictor: RevolverPredictor, make_blobs, shape: tuple[int, int]
) -> None:
    img = make_blobs(shape)
    predictor.set_volume(img)
    t = predictor.guide([[shape[0] // 2, shape[1] // 2]], [1])
    assert predictor.predict_slice(0, t).shape == shape
    assert predictor.predict_proba((), t).shape == (1, *shape)
    f = predictor.features(0)
    ph, pw = (-(-s // 32) * 32 for s in shape)
    assert f.coarse.shape[-2:] == (ph // 8, pw // 8)
    assert f.fine.shape[-2:] == (ph // 4, pw // 4)
    assert f.coarse.dtype == torch.float16


def test_predictions_are_deterministic(predictor: RevolverPredictor, task: Task) -> None:
    a = predictor.predict_proba(1, task)
    predictor.cache.clear()
    b = predictor.predict_proba(1, task)
    np.testing.assert_array_equal(a, b)


def test_cached_features_are_not_recomputed(
    predictor: RevolverPredictor, stack: np.ndarray, count_encoder_calls
) -> None:
    predictor.set_volume(stack)
    calls = count_encoder_calls(predictor)
    t = predictor.guide([[2, 24, 24]], [1])
    assert calls == [1]
    predictor.predict_slice(2, t)
    predictor.predict_slice(2, t)
    t2 = predictor.guide([[2, 20, 20], [2, 4, 4]], [1, 0])
    predictor.predict_proba(2, [t, t2])
    assert calls == [1]
    predictor.predict_slice(3, t)
    assert calls == [1, 1]
    # A new volume forgets the old features.
    predictor.set_volume(stack[::-1].copy())
    predictor.predict_slice(3, t)
    assert calls == [1, 1, 1]


def test_task_from_one_volume_applies_to_another(predictor: RevolverPredictor, make_blobs) -> None:
    predictor.set_volume(make_blobs((3, 48, 48), seed=0))
    t = predictor.guide([[1, 24, 24], [1, 2, 2]], [1, 0])
    info = predictor.set_volume(make_blobs((5, 40, 56), seed=7))
    assert info.slice_shape == (40, 56)
    out = predictor.segment(t)
    assert out.shape == (5, 40, 56)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}


# ------------------------------------------------------------------------------------ propagate


def test_propagate_yields_every_slice_with_progress(
    predictor: RevolverPredictor, task: Task
) -> None:
    steps = list(predictor.propagate(task, batch_size=3))
    assert all(isinstance(s, PropagationStep) for s in steps)
    assert [s.index for s in steps] == [(0,), (1,), (2,), (3,)]
    assert [(s.done, s.total) for s in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for s in steps:
        assert s.result.shape == (48, 48) and s.result.dtype == np.uint8
        expected = predictor.predict_slice(s.index, task).astype(np.uint8)
        np.testing.assert_array_equal(s.result, expected)


def test_propagate_outputs_masks_and_probabilities(
    predictor: RevolverPredictor, task: Task
) -> None:
    tasks = [task, task.renamed("other", 2)]
    masks = next(predictor.propagate(tasks, [2], output="masks"))
    probs = next(predictor.propagate(tasks, [2], output="probabilities"))
    assert masks.result.shape == (2, 48, 48) and masks.result.dtype == bool
    assert probs.result.shape == (2, 48, 48) and probs.result.dtype == np.float32
    np.testing.assert_array_equal(masks.result, probs.result > 0.5)
    with pytest.raises(ValueError, match="output must be"):
        next(predictor.propagate(task, output="nonsense"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no task"):
        next(predictor.propagate([]))


def test_propagate_results_do_not_depend_on_order_or_batch_size(
    tiny_weights: Path, stack: np.ndarray
) -> None:
    results = []
    for order, bs in [(None, 1), ([3, 2, 1, 0], 3), ([(2,), (0,), (3,), (1,)], 4)]:
        p = RevolverPredictor(tiny_weights, "cpu")  # fresh caches
        p.set_volume(stack)
        t = p.guide([[1, 24, 24], [1, 5, 5]], [1, 0])
        probs = {
            s.index: s.result for s in p.propagate(t, order, batch_size=bs, output="probabilities")
        }
        labels = {s.index: s.result for s in p.propagate(t, order, batch_size=bs)}
        assert sorted(probs) == [(0,), (1,), (2,), (3,)]
        results.append((probs, labels))
    (p0, l0) = results[0]
    for probs, labels in results[1:]:
        for k in p0:
            np.testing.assert_allclose(probs[k], p0[k], atol=1e-5)
            clear = np.abs(p0[k][0] - 0.5) > 1e-4  # pixels not within rounding of the threshold
            np.testing.assert_array_equal(labels[k][clear], l0[k][clear])


def test_propagate_to_a_subset_of_slices(predictor: RevolverPredictor, task: Task) -> None:
    steps = list(predictor.propagate(task, [3, 1]))
    assert [s.index for s in steps] == [(3,), (1,)]
    assert steps[-1].done == steps[-1].total == 2


def test_segment_returns_leading_axes_then_slice(predictor: RevolverPredictor, make_blobs) -> None:
    vol = make_blobs((2, 3, 32, 40))
    predictor.set_volume(vol)
    t = predictor.guide([[1, 2, 16, 20], [0, 0, 1, 1]], [1, 0])
    out = predictor.segment(t)
    assert out.shape == (2, 3, 32, 40)
    for idx in [(0, 0), (1, 2)]:
        np.testing.assert_array_equal(out[idx], predictor.predict_slice(idx, t))
    probs = predictor.segment(t, output="probabilities")
    assert probs.shape == (2, 3, 1, 32, 40)


def test_segment_of_2d_image(predictor: RevolverPredictor, make_blobs) -> None:
    predictor.set_volume(make_blobs((40, 40)))
    t = predictor.guide([[20, 20]], [1])
    out = predictor.segment(t)
    assert out.shape == (40, 40)
    np.testing.assert_array_equal(out, predictor.predict_slice(0, t))


# ---------------------------------------------------------------------------------------- tasks


def test_task_save_and_load_round_trip(
    predictor: RevolverPredictor, task: Task, tmp_path: Path
) -> None:
    path = task.save(tmp_path / "task.json")
    back = load_task(path)
    np.testing.assert_array_equal(back.sum_coarse, task.sum_coarse)
    np.testing.assert_array_equal(back.sum_fine, task.sum_fine)
    np.testing.assert_array_equal(back.mass, task.mass)
    np.testing.assert_array_equal(back.points, task.points)
    np.testing.assert_array_equal(back.labels, task.labels)
    assert (back.name, back.label_value, back.model_key, back.weights_sha256) == (
        task.name,
        task.label_value,
        task.model_key,
        task.weights_sha256,
    )
    np.testing.assert_array_equal(
        predictor.predict_slice(1, back), predictor.predict_slice(1, task)
    )
    with pytest.raises(FileExistsError, match="overwrite"):
        task.save(path)
    task.renamed("again").save(path, overwrite=True)
    assert load_task(path).name == "again"
    assert not list(tmp_path.glob("*.part"))


def test_task_keeps_its_intensity_convention(
    predictor: RevolverPredictor, stack: np.ndarray, task: Task, tmp_path: Path
) -> None:
    assert not task.invert
    predictor.set_volume(stack, invert=True)
    inverted = predictor.guide([[1, 24, 24], [1, 5, 5]], [1, 0], name="dark")
    assert inverted.invert
    back = load_task(inverted.save(tmp_path / "dark.json"))
    assert back.invert
    # Vectors pooled on reversed intensities mean nothing on plain ones, and vice versa.
    with pytest.raises(ValueError, match=r"invert=False.*invert=True.*intensity conventions"):
        task.merge(back)
    predictor.predict_slice(1, back)
    with pytest.raises(ValueError, match=r"'blob' was guided on intensities unchanged"):
        predictor.predict_slice(1, task)
    predictor.set_volume(stack)
    with pytest.raises(ValueError, match=r"set_volume\(\.\.\., invert=True\)"):
        next(iter(predictor.propagate(back)))
    # Task files written before the field existed read as not inverted.
    old = task.to_dict()
    del old["invert"]
    assert not Task.from_dict(old).invert


def test_load_task_refuses_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a task file"):
        load_task(bad)
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a napari-revolver task"):
        load_task(bad)


def test_task_merge_adds_sums_masses_and_points(
    predictor: RevolverPredictor, stack: np.ndarray
) -> None:
    predictor.set_volume(stack)
    a = predictor.guide([[0, 24, 24]], [1])
    b = predictor.guide([[2, 20, 20], [2, 3, 3]], [1, 0])
    m = a.merge(b)
    np.testing.assert_allclose(m.mass, a.mass + b.mass)
    np.testing.assert_allclose(m.sum_coarse, a.sum_coarse + b.sum_coarse)
    np.testing.assert_allclose(m.sum_fine, a.sum_fine + b.sum_fine)
    assert m.points.shape == (3, 3)
    np.testing.assert_array_equal(m.labels, [1, 1, 0])
    assert m.name == a.name


def test_task_from_another_model_is_refused(
    predictor: RevolverPredictor, stack: np.ndarray, make_tiny
) -> None:
    other = RevolverPredictor(model=make_tiny(1), device="cpu")
    other.set_volume(stack)
    foreign = other.guide([[1, 24, 24]], [1], name="foreign")
    predictor.set_volume(stack)
    with pytest.raises(ValueError, match="guided with model revolver-tiny"):
        predictor.predict_slice(0, foreign)
    with pytest.raises(ValueError, match="foreign"):
        next(predictor.propagate(foreign))
    own = predictor.guide([[1, 24, 24]], [1])
    with pytest.raises(ValueError, match="different models"):
        own.merge(foreign)


def test_task_validates_its_arrays() -> None:
    ok = {
        "name": "t",
        "sum_coarse": np.zeros((2, 4), np.float32),
        "sum_fine": np.zeros((2, 2), np.float32),
        "mass": np.zeros(2, np.float32),
        "points": np.zeros((1, 2)),
        "labels": np.ones(1, np.int8),
        "model_key": "m",
        "weights_sha256": "0" * 64,
    }
    Task(**ok)
    with pytest.raises(ValueError, match="sum_coarse"):
        Task(**{**ok, "sum_coarse": np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match="mass"):
        Task(**{**ok, "mass": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="label_value"):
        Task(**ok, label_value=0)


# ------------------------------------------------------------------------------ tiled encoding


def test_tiled_encoding_matches_untiled_shapes_and_correlates(
    predictor: RevolverPredictor, monkeypatch: pytest.MonkeyPatch, make_blobs
) -> None:
    img = make_blobs((160, 160), n_blobs=6)
    predictor.set_volume(img)
    untiled = predictor.features(0)

    tiled_calls: list[tuple[int, ...]] = []
    original_encode = predictor.model.encode

    def spy(x):
        tiled_calls.append(tuple(x.shape[-2:]))
        return original_encode(x)

    monkeypatch.setattr(tiling_module, "MAX_TILE_PIXELS", 64 * 64)
    monkeypatch.setattr(tiling_module, "TILE", 128)
    monkeypatch.setattr(tiling_module, "TILE_OVERLAP", 32)
    monkeypatch.setattr(predictor.model, "encode", spy)
    predictor.cache.clear()
    tiled = predictor.features(0)

    assert len(tiled_calls) > 1
    assert all(h <= 128 and w <= 128 and h % 32 == 0 and w % 32 == 0 for h, w in tiled_calls)
    assert tiled.coarse.shape == untiled.coarse.shape
    assert tiled.fine.shape == untiled.fine.shape
    for a, b in ((tiled.coarse, untiled.coarse), (tiled.fine, untiled.fine)):
        a, b = a.float().flatten(), b.float().flatten()
        assert torch.isfinite(a).all()
        assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.5

    t = predictor.guide([[80, 80]], [1])
    assert predictor.predict_slice(0, t).shape == (160, 160)


# ------------------------------------------------------------------------------------ instances


def test_predict_slice_instances_gives_int_ids(predictor: RevolverPredictor, task: Task) -> None:
    inst = predictor.predict_slice(1, task, instances=True, threshold=0.0)
    assert inst.shape == (48, 48)
    assert np.issubdtype(inst.dtype, np.integer)
    np.testing.assert_array_equal(
        inst, mask_to_instances(predictor.predict_slice(1, task, threshold=0.0))
    )


def test_instances_of_separated_blobs_get_one_id_each(
    predictor: RevolverPredictor, task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    probs = np.zeros((1, 48, 48), np.float32)
    probs[0, 4:14, 4:14] = 0.9
    probs[0, 30:44, 6:16] = 0.8
    probs[0, 20:28, 30:46] = 0.7
    monkeypatch.setattr(predictor, "predict_proba", lambda index, tasks, **kw: probs)
    inst = predictor.predict_slice(0, task, instances=True)
    assert np.issubdtype(inst.dtype, np.integer)
    assert sorted(np.unique(inst)) == [0, 1, 2, 3]
    assert len({inst[8, 8], inst[35, 10], inst[24, 40]}) == 3
    np.testing.assert_array_equal(inst > 0, probs[0] > 0.5)
    # Several tasks: instances of the union of their labels.
    two = np.concatenate([probs, np.zeros_like(probs)])
    monkeypatch.setattr(predictor, "predict_proba", lambda index, tasks, **kw: two)
    inst2 = predictor.predict_slice(0, [task, task.renamed("b", 2)], instances=True)
    np.testing.assert_array_equal(inst2, inst)


def test_mask_to_instances_splits_two_touching_discs() -> None:
    yy, xx = np.mgrid[0:60, 0:80]
    a = (yy - 30) ** 2 + (xx - 25) ** 2 < 14**2
    b = (yy - 30) ** 2 + (xx - 50) ** 2 < 14**2
    assert (a & b).any()  # they overlap: one connected component
    inst = mask_to_instances(a | b)
    assert inst.dtype == np.int32
    assert sorted(np.unique(inst)) == [0, 1, 2]
    assert inst[30, 25] != inst[30, 50]
    np.testing.assert_array_equal(inst > 0, a | b)


def test_mask_to_instances_of_a_full_mask_is_one_object() -> None:
    # No background pixel at all: the whole frame is one object, not background.
    inst = mask_to_instances(np.ones((40, 48), bool))
    np.testing.assert_array_equal(inst, np.ones((40, 48), np.int32))


def test_mask_to_instances_separate_blobs_and_small_objects() -> None:
    mask = np.zeros((40, 40), bool)
    mask[2:10, 2:10] = True
    mask[20:30, 20:35] = True
    mask[38, 38] = True  # smaller than min_size
    inst = mask_to_instances(mask)
    assert sorted(np.unique(inst)) == [0, 1, 2]
    assert inst[38, 38] == 0
    assert not mask_to_instances(np.zeros((5, 5), bool)).any()
    with pytest.raises(ValueError, match="2D"):
        mask_to_instances(np.zeros((2, 5, 5), bool))


# ------------------------------------------------------------------------------------- labels


def test_labels_from_probabilities_picks_most_probable_task_above_threshold() -> None:
    probs = np.array([[[0.9, 0.2, 0.6, 0.5]], [[0.8, 0.3, 0.7, 0.1]]], np.float32)  # (2, 1, 4)
    out = labels_from_probabilities(probs, [1, 2], threshold=0.5)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[1, 0, 2, 0]])
    big = labels_from_probabilities(probs, [1, 300], threshold=0.5)
    assert big.dtype == np.uint16
    np.testing.assert_array_equal(big, [[1, 0, 300, 0]])
    assert labels_from_probabilities(probs, [1, 70000]).dtype == np.uint32
    with pytest.raises(ValueError, match="T == 3"):
        labels_from_probabilities(probs, [1, 2, 3])


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("points", "labels", "match"),
    [
        ([[1, 10, 10]], [0], "no positive point"),
        (np.zeros((0, 3)), np.zeros(0), "no positive point"),
        ([[1, 10, 48]], [1], "outside the image"),
        ([[4, 10, 10]], [1], "outside the image"),
        ([[1, -1, 10]], [1], "outside the image"),
        ([[10, 10]], [1], r"points must have shape \(N, 3\)"),
        ([[0, 1, 10, 10]], [1], r"points must have shape \(N, 3\)"),
        ([[1, 10, 10]], [2], "labels must be 1 .positive. or 0"),
        ([[1, 10, 10], [1, 5, 5]], [1], r"labels must have shape \(2,\)"),
        ([[1, np.nan, 10]], [1], "NaN"),
        ([[1, np.inf, 10]], [1], "NaN or infinite"),
    ],
)
def test_guide_rejects_bad_points(
    predictor: RevolverPredictor, stack: np.ndarray, points: object, labels: object, match: str
) -> None:
    predictor.set_volume(stack)
    with pytest.raises(ValueError, match=match):
        predictor.guide(points, labels)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (np.full((2, 32, 32), np.nan, np.float32), "NaN"),
        (np.where(np.eye(32, dtype=bool), np.inf, 1.0)[None].astype(np.float32), "NaN or infinite"),
        (np.full((3, 32, 32), 7, np.uint16), "constant"),
        (np.zeros((0, 32, 32), np.float32), "empty"),
        (np.arange(100, dtype=np.float32), "at least 2 dimensions"),
        (np.zeros((32, 32), np.complex64) + np.eye(32), "real-valued"),
        (np.array([["a", "b"], ["c", "d"]]), "real-valued"),
        (np.arange(5 * 32, dtype=np.float32).reshape(5, 32), "at least 8x8"),
    ],
)
def test_set_volume_rejects_bad_images(
    predictor: RevolverPredictor, data: np.ndarray, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        predictor.set_volume(data)
    with pytest.raises(RuntimeError, match="no volume set"):
        _ = predictor.info


def test_calls_before_set_volume_raise_runtime_error(predictor: RevolverPredictor) -> None:
    with pytest.raises(RuntimeError, match="set_volume"):
        predictor.guide([[10, 10]], [1])
    with pytest.raises(RuntimeError, match="set_volume"):
        predictor.features(0)


def test_reset_forgets_the_volume(predictor: RevolverPredictor, task: Task) -> None:
    predictor.reset()
    with pytest.raises(RuntimeError, match="set_volume"):
        predictor.predict_slice(0, task)


def test_unknown_device_is_refused(tiny_model) -> None:
    with pytest.raises(ValueError, match="device must be one of"):
        RevolverPredictor(model=tiny_model, device="tpu")


def test_bad_constructor_arguments(tiny_model, tiny_weights: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        RevolverPredictor(model=tiny_model, device="cpu", batch_size=0)
    with pytest.raises(ValueError, match="either weights or model"):
        RevolverPredictor(tiny_weights, "cpu", model=tiny_model)


@pytest.mark.parametrize(("channel_axis", "channel"), [(0, 2), (0, -1), (0, None), (-1, 40)])
def test_channel_out_of_range_is_refused(
    predictor: RevolverPredictor, rng: np.random.Generator, channel_axis: int, channel: int | None
) -> None:
    data = rng.random((2, 3, 32, 32)).astype(np.float32)
    with pytest.raises(ValueError, match="channel must be in"):
        predictor.set_volume(data, channel_axis=channel_axis, channel=channel)


def test_rgb_forced_on_without_colour_axis_is_refused(
    predictor: RevolverPredictor, rng: np.random.Generator
) -> None:
    with pytest.raises(ValueError, match="rgb=True needs a last axis of size 3 or 4"):
        predictor.set_volume(rng.random((3, 32, 32)), rgb=True)


def test_predict_on_slice_out_of_range_raises_index_error(
    predictor: RevolverPredictor, task: Task
) -> None:
    with pytest.raises(IndexError, match="out of range"):
        predictor.predict_slice(4, task)


def test_tiled_segmentor_gives_the_same_probabilities_as_one_pass(
    predictor: RevolverPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    predictor.set_volume(rng.random((300, 420)).astype(np.float32))
    task = predictor.guide([[100, 100], [200, 300]], [1, 0])
    whole = predictor.predict_proba(0, task)
    # Features are cached now, so only the segmentor runs tiled below.
    monkeypatch.setattr(tiling_module, "MAX_TILE_PIXELS", 64 * 64)
    monkeypatch.setattr(tiling_module, "TILE", 128)
    tiled = predictor.predict_proba(0, task)
    assert tiled.shape == whole.shape == (1, 300, 420)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_clone_shares_the_model_and_accepts_the_same_tasks(predictor: RevolverPredictor) -> None:
    rng = np.random.default_rng(1)
    predictor.set_volume(rng.random((2, 40, 40)).astype(np.float32))
    task = predictor.guide([[0, 10, 10], [0, 30, 30]], [1, 0])
    other = predictor.clone()
    assert other.model is predictor.model and not other.has_volume
    other.set_volume(rng.random((3, 32, 48)).astype(np.float32))
    assert other.predict_slice(2, task).shape == (32, 48)
    assert predictor.info.slice_shape == (40, 40)


def test_propagate_without_cache_gives_the_same_result_and_keeps_nothing(
    predictor: RevolverPredictor,
) -> None:
    rng = np.random.default_rng(2)
    predictor.set_volume(rng.random((5, 40, 40)).astype(np.float32))
    task = predictor.guide([[0, 10, 10], [0, 30, 30]], [1, 0])
    uncached = [
        s.result
        for s in predictor.propagate(task, range(1, 5), cache=False, output="probabilities")
    ]
    assert len(predictor.cache) == 1  # only the support slice
    cached = [s.result for s in predictor.propagate(task, range(1, 5), output="probabilities")]
    assert len(predictor.cache) == 5
    np.testing.assert_array_equal(np.stack(uncached), np.stack(cached))


def test_dask_volume_is_read_one_slice_at_a_time(predictor: RevolverPredictor) -> None:
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(3)
    data = rng.random((6, 40, 48)).astype(np.float32)
    lazy = da.from_array(data, chunks=(1, 40, 48))
    predictor.set_volume(lazy)
    task = predictor.guide([[2, 10, 10], [2, 30, 30]], [1, 0])
    from_dask = predictor.segment(task, output="probabilities")
    predictor.set_volume(data)
    from_numpy = predictor.segment(task, output="probabilities")
    # Equal up to float rounding of the convolutions.
    np.testing.assert_allclose(from_dask, from_numpy, rtol=0, atol=1e-6)
