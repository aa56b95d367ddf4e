"""The dock widget in a real viewer: clicks in, labels out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from napari_revolver._napari import layers as L

from .conftest import click_points, iou

WAIT_MS = 60_000


def wait_idle(qtbot: Any, widget: Any) -> None:
    qtbot.waitUntil(
        lambda: (
            widget._worker is None
            and widget._feature_worker is None
            and not widget._update_timer.isActive()
        ),
        timeout=WAIT_MS,
    )


def annotate_sample(qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]) -> Any:
    """The sample's nine clicks on slice 12, as a new task; waits for the live update."""
    viewer.dims.current_step = (12, 0, 0)
    entry = click_points(widget, sample["points"].data, L.point_labels(sample["points"]))
    wait_idle(qtbot, widget)
    return entry


def propagate_and_wait(qtbot: Any, widget: Any, *args: int) -> None:
    with qtbot.waitSignal(widget.propagate(*args).finished, timeout=WAIT_MS):
        pass
    wait_idle(qtbot, widget)


def test_manifest_opens_the_widget_and_sample_data(widget: Any, sample: dict[str, Any]) -> None:
    assert widget.image_combo.currentText() == sample["image"].name
    assert sample["image"].data.shape == (24, 256, 256)
    assert len(sample["points"].data) == 9


def test_clicks_update_the_current_slice(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    labels = widget.session.image.labels
    assert labels is not None and labels.data.shape == (24, 256, 256)
    assert iou(labels.data[12], sample["truth"].data[12]) > 0.7
    # Only the slice on screen was computed.
    assert labels.data[0].max() == 0


def test_a_click_on_a_cached_slice_updates_before_returning(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    entry = annotate_sample(qtbot, viewer, widget, sample)
    labels = widget.session.image.labels
    before = labels.data[12].copy()
    # A negative click in the middle of a segmented object: no event loop turn in between.
    inside = np.argwhere(before > 0)[len(np.argwhere(before > 0)) // 2]
    L.set_polarity(entry.points, L.NEGATIVE)
    entry.points.add(np.array([[12, *inside]]))
    assert entry.task is not None and len(entry.task.points) == 10
    assert not widget._update_timer.isActive()
    assert not np.array_equal(labels.data[12], before)


def test_propagation_matches_the_core_and_the_truth(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    from napari_revolver import RevolverPredictor

    entry = annotate_sample(qtbot, viewer, widget, sample)
    propagate_and_wait(qtbot, widget)
    out = np.asarray(widget.session.image.labels.data)
    assert iou(out, sample["truth"].data) > 0.7

    # The same points through the core (as `revolver segment` does) give the same labels.
    predictor = RevolverPredictor(device="cpu")
    predictor.set_volume(sample["image"].data)
    task = predictor.guide(
        sample["points"].data, L.point_labels(sample["points"]), label_value=entry.label_value
    )
    expected = predictor.segment(task)
    np.testing.assert_array_equal(out > 0, expected > 0)


def test_widget_propagation_equals_revolver_segment(
    qtbot: Any, tmp_path: Path, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    from napari_revolver import cli
    from napari_revolver.core.io import PointTable, write_points

    annotate_sample(qtbot, viewer, widget, sample)
    propagate_and_wait(qtbot, widget)
    tifffile.imwrite(
        tmp_path / "image.tif", sample["image"].data, imagej=True, metadata={"axes": "ZYX"}
    )
    write_points(
        tmp_path / "points.csv", PointTable(sample["points"].data, L.point_labels(sample["points"]))
    )
    assert (
        cli.main(
            [
                "segment",
                str(tmp_path / "image.tif"),
                "--points",
                str(tmp_path / "points.csv"),
                "-o",
                str(tmp_path / "cli.tif"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "cli.tif"), widget.session.image.labels.data
    )


def test_two_tasks_switch_and_label_values(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    viewer.dims.current_step = (12, 0, 0)
    first = click_points(widget, sample["points"].data, L.point_labels(sample["points"]))
    second = widget.add_task("background")
    assert widget.session.active == 1 and second.label_value == 2
    # Background: positives where the first task had negatives.
    L.set_polarity(second.points, L.POSITIVE)
    second.points.add(sample["points"].data[L.point_labels(sample["points"]) == 0][:3])
    wait_idle(qtbot, widget)
    values = set(np.unique(widget.session.image.labels.data[12]).tolist())
    assert {1, 2} <= values
    widget.select_task(0)
    assert widget.session.active_task() is first
    assert viewer.layers.selection.active.name == first.points.name
    before = L.polarity(first.points)
    widget.toggle_polarity()
    assert L.polarity(first.points) != before
    assert widget.polarity_button.text().split()[1] == L.polarity(first.points)
    widget.rename_task("nuclei 2")
    assert first.points.name == "nuclei 2 points"
    widget.delete_task()
    assert [t.name for t in widget.session.tasks] == ["background"]


def test_cancel_stops_a_propagation(qtbot: Any, viewer: Any, widget: Any, notes: list) -> None:
    rng = np.random.default_rng(0)
    big = viewer.add_image(rng.random((300, 96, 96)).astype(np.float32), name="big")
    widget.image_combo.setCurrentText("big")
    entry = widget.add_task("x")
    entry.points.add(np.array([[0, 40, 40]]))
    wait_idle(qtbot, widget)
    worker = widget.propagate()
    with qtbot.waitSignal(worker.finished, timeout=WAIT_MS):
        widget.cancel()
    assert "cancelled" in widget.status.text()
    written = widget.session.images[id(big)].labels.data
    assert written.shape == (300, 96, 96)


def test_painted_slices_are_kept(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    labels = widget.session.image.labels
    labels.paint((5, 100, 100), 1, refresh=True)
    painted = labels.data[5].copy()
    propagate_and_wait(qtbot, widget)
    np.testing.assert_array_equal(labels.data[5], painted)
    widget.recompute_check.setChecked(True)
    propagate_and_wait(qtbot, widget)
    assert not np.array_equal(labels.data[5], painted)


def test_apply_tasks_to_another_image(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    from napari_revolver.core.synthetic import sample_stack

    annotate_sample(qtbot, viewer, widget, sample)
    other, truth, _, _ = sample_stack(seed=3, shape=(6, 192, 160))
    layer = viewer.add_image(other, name="other")
    with qtbot.waitSignal(widget.apply_to_target("other").finished, timeout=WAIT_MS):
        pass
    wait_idle(qtbot, widget)
    out = widget.session.images[id(layer)].labels
    assert out.data.shape == (6, 192, 160)
    assert iou(out.data, truth) > 0.6


def test_save_labels_and_task_round_trip(
    qtbot: Any, tmp_path: Path, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    path = widget.save_labels(tmp_path / "labels.tif")
    np.testing.assert_array_equal(tifffile.imread(path), widget.session.image.labels.data)
    task_path = widget.save_task(tmp_path / "nuclei.revolver-task.json")
    loaded = widget.load_task(task_path)
    assert loaded is not None and loaded.task is not None
    assert len(loaded.points.data) == 9
    # The reader contribution opens the same file as a Points layer.
    layers = viewer.open(str(task_path), plugin="napari-revolver")
    assert len(layers[0].data) == 9


def test_no_positive_point_is_a_notification(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any], notes: list
) -> None:
    entry = widget.add_task("neg only")
    L.set_polarity(entry.points, L.NEGATIVE)
    entry.points.add(np.array([[12, 10, 10]]))
    wait_idle(qtbot, widget)
    assert any(kind == "warning" and "no positive point" in msg for kind, msg in notes)
    assert widget.propagate() is None
    assert any("no task has a positive point" in msg for _, msg in notes)


def test_points_outside_the_image_are_a_notification(
    qtbot: Any, viewer: Any, widget: Any, notes: list
) -> None:
    entry = widget.add_task("outside")
    entry.points.add(np.array([[12, 10, 10], [12, 400, 400]]))
    wait_idle(qtbot, widget)
    assert any("outside the image" in msg for _, msg in notes)


def test_rgb_image_is_segmented(qtbot: Any, viewer: Any, widget: Any, notes: list) -> None:
    rgb = np.zeros((96, 96, 3), np.uint8)
    yy, xx = np.mgrid[:96, :96]
    rgb[(yy - 48) ** 2 + (xx - 48) ** 2 < 300] = (200, 40, 160)
    viewer.add_image(rgb, name="rgb", rgb=True)
    widget.image_combo.setCurrentText("rgb")
    entry = widget.add_task("blob")
    entry.points.add(np.array([[48, 48]]))
    wait_idle(qtbot, widget)
    labels = widget.session.image.labels
    assert labels.data.shape == (96, 96)
    assert not [n for n in notes if n[0] == "error"]


def test_deleting_the_image_mid_propagation_is_handled(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    worker = widget.propagate()
    with qtbot.waitSignal(worker.finished, timeout=WAIT_MS):
        viewer.layers.remove(sample["image"])
    wait_idle(qtbot, widget)
    assert widget.session.image is None
    assert sample["image"].name not in [
        widget.image_combo.itemText(i) for i in range(widget.image_combo.count())
    ]


def test_closing_the_widget_stops_its_work(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    worker = widget.propagate()
    with qtbot.waitSignal(worker.finished, timeout=WAIT_MS):
        widget.close()
    # No callbacks into the closed widget after that.
    viewer.dims.current_step = (3, 0, 0)


@pytest.mark.parametrize("scale", [(2.0, 0.5, 0.5)])
def test_points_on_a_scaled_image_map_to_data_pixels(viewer: Any, scale: tuple) -> None:
    img = viewer.add_image(np.zeros((4, 32, 32), np.float32), scale=scale, translate=(0, 5, 5))
    pts = viewer.add_points(np.array([[2.0 * 2, 5 + 0.5 * 10, 5 + 0.5 * 20]]))  # world coords
    got = L.to_image_data(pts, pts.data, img, L.world_point(viewer))
    np.testing.assert_allclose(got, [[2, 10, 20]])


def test_instances_give_one_id_per_object_unique_across_slices(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    viewer.dims.current_step = (12, 0, 0)
    click_points(widget, sample["points"].data, L.point_labels(sample["points"]))
    widget.instances_check.setChecked(True)
    wait_idle(qtbot, widget)
    propagate_and_wait(qtbot, widget, 10, 13)
    data = widget.session.image.labels.data
    ids = [set(np.unique(data[z]).tolist()) - {0} for z in (10, 11)]
    assert len(ids[0]) > 3 and len(ids[1]) > 3
    assert not ids[0] & ids[1]


def test_follow_positions_reaches_the_core_and_changes_other_slices(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    from napari_revolver import RevolverPredictor

    entry = annotate_sample(qtbot, viewer, widget, sample)
    widget.local_check.setChecked(True)
    assert widget.session.local
    wait_idle(qtbot, widget)
    propagate_and_wait(qtbot, widget)
    out = np.asarray(widget.session.image.labels.data)
    predictor = RevolverPredictor(device="cpu")
    assert predictor.model.config.local_prior  # the shipped weights see positions
    predictor.set_volume(sample["image"].data)
    task = predictor.guide(
        sample["points"].data, L.point_labels(sample["points"]), label_value=entry.label_value
    )
    np.testing.assert_array_equal(out > 0, predictor.segment(task, local=True) > 0)
    far = predictor.predict_proba(0, task, local=True)
    assert not np.allclose(far, predictor.predict_proba(0, task), atol=1e-4)


def test_invert_checkbox_recomputes_features_and_guides_again(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    entry = annotate_sample(qtbot, viewer, widget, sample)
    before = widget.session.image.labels.data[12].copy()
    widget.invert_check.setChecked(True)
    wait_idle(qtbot, widget)
    state = widget.session.image
    assert state.predictor.preprocessing.invert
    assert entry.task is not None  # guided again on the inverted features
    # Bright nuclei read as dark objects now: the same clicks give another result.
    assert not np.array_equal(state.labels.data[12], before)
    widget.invert_check.setChecked(False)
    wait_idle(qtbot, widget)
    np.testing.assert_array_equal(widget.session.image.labels.data[12], before)


def test_loading_an_inverted_task_inverts_the_image(
    qtbot: Any, tmp_path: Path, viewer: Any, widget: Any, sample: dict[str, Any], notes: list
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    widget.invert_check.setChecked(True)
    wait_idle(qtbot, widget)
    path = widget.save_task(tmp_path / "dark.json")
    widget.invert_check.setChecked(False)
    wait_idle(qtbot, widget)
    loaded = widget.load_task(path)
    wait_idle(qtbot, widget)
    assert loaded is not None and loaded.task is not None and loaded.task.invert
    assert widget.session.image.predictor.preprocessing.invert
    assert widget.invert_check.isChecked()
    assert any(kind == "info" and "inverted" in msg for kind, msg in notes)
    assert not [n for n in notes if n[0] == "error"]


def test_toggle_key_is_bound_on_task_points(widget: Any, sample: dict[str, Any]) -> None:
    entry = widget.add_task("k")
    before = L.polarity(entry.points)
    bound = {str(k): f for k, f in entry.points.keymap.items()}
    bound[widget_module().TOGGLE_KEY.upper()](entry.points)
    assert L.polarity(entry.points) != before


def test_two_dimensional_points_over_a_stack_use_the_slice_on_screen(viewer: Any) -> None:
    img = viewer.add_image(np.zeros((6, 32, 32), np.float32))
    viewer.dims.current_step = (4, 0, 0)
    pts = viewer.add_points(np.array([[10.0, 20.0]]))
    np.testing.assert_allclose(
        L.to_image_data(pts, pts.data, img, L.world_point(viewer)), [[4, 10, 20]]
    )


def widget_module() -> Any:
    from napari_revolver._napari import widget as module

    return module


def test_corrupt_weights_are_a_notification_and_the_model_stays(
    tmp_path: Path, qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any], notes: list
) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    widget._set_weights(str(bad))
    assert any(kind == "error" and "Cannot use these weights" in msg for kind, msg in notes)
    assert widget.weights_label.text() == "shipped weights"
    annotate_sample(qtbot, viewer, widget, sample)
    assert widget.session.image.labels.data[12].any()


def test_dask_backed_layer_is_segmented(qtbot: Any, viewer: Any, widget: Any, notes: list) -> None:
    da = pytest.importorskip("dask.array")
    from napari_revolver.core.synthetic import sample_stack

    image, truth, points, labels = sample_stack(seed=4, shape=(6, 128, 128))
    viewer.add_image(da.from_array(image, chunks=(1, 128, 128)), name="lazy")
    widget.image_combo.setCurrentText("lazy")
    viewer.dims.current_step = (3, 0, 0)
    entry = widget.add_task("nuclei")
    for p, lab in zip(points, labels, strict=True):
        L.set_polarity(entry.points, L.POSITIVE if lab else L.NEGATIVE)
        entry.points.add(np.asarray(p)[None])
    wait_idle(qtbot, widget)
    propagate_and_wait(qtbot, widget)
    assert iou(widget.session.image.labels.data, truth) > 0.6
    assert not [n for n in notes if n[0] == "error"]


def test_feature_store_is_shared_with_the_cli(
    qtbot: Any, tmp_path: Path, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    from napari_revolver import RevolverPredictor

    store = tmp_path / "features.zarr"
    # Filled outside napari, as `revolver precompute` does.
    predictor = RevolverPredictor(device="cpu")
    predictor.set_volume(sample["image"].data, store=store)
    for _ in predictor.precompute():
        pass
    widget.set_store(str(store))
    state = widget.session.image
    assert widget.session.missing_features([(z,) for z in range(24)]) == []
    annotate_sample(qtbot, viewer, widget, sample)
    assert widget._feature_worker is None
    assert iou(state.labels.data[12], sample["truth"].data[12]) > 0.7


def test_manifest_is_valid_npe2() -> None:
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-revolver")
    manifest.validate_imports()
    assert {w.display_name for w in manifest.contributions.widgets} == {"Revolver"}
    assert manifest.contributions.writers and manifest.contributions.readers


def test_a_task_added_later_gets_its_colour_in_the_labels_layer(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    second = widget.add_task("later")
    colormap = widget.session.image.labels.colormap
    rgba = np.asarray(colormap.map(np.array([second.label_value])))[0]
    assert rgba[3] > 0  # visible, not the transparent default
