"""The dock widget in a real viewer, docked from the Plugins menu path: clicks in, labels out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from napari_revolver._napari import layers as L

from .conftest import WAIT_MS, click_points, dock, errors, iou, wait_idle


def annotate_sample(qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]) -> Any:
    """The sample's task (nine clicks on slice 12) on screen; waits for the live update."""
    viewer.dims.current_step = (12, 0, 0)
    widget.update_now()
    wait_idle(qtbot, widget)
    return widget.session.tasks[0]


def propagate_and_wait(qtbot: Any, widget: Any, *args: int) -> None:
    assert widget.propagate(*args) is not None
    # A short run can be over before a signal could be awaited: wait for the session instead.
    qtbot.waitUntil(lambda: widget.session.run is None, timeout=WAIT_MS)
    wait_idle(qtbot, widget)


def test_the_sample_with_clicks_opens_as_a_ready_task(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    assert widget.image_box.image_combo.currentText() == sample["image"].name
    [entry] = widget.session.tasks
    assert entry.name == "nuclei" and entry.points is sample["points"]
    assert entry.image is sample["image"]
    assert L.point_labels(sample["points"]).tolist().count(0) == 5
    entry = annotate_sample(qtbot, viewer, widget, sample)
    assert iou(widget.session.image.labels.data[12], sample["truth"].data[12]) > 0.7


def test_the_sample_opened_after_docking_is_taken_up_too(viewer: Any, notes: list) -> None:
    w = dock(viewer)
    viewer.open_sample("napari-revolver", "nuclei_points")
    assert [t.name for t in w.session.tasks] == ["nuclei"]
    assert "nuclei" in w.tasks_box.task_list.item(0).text()


def test_clicks_update_the_current_slice_and_status_is_prose(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    labels = widget.session.image.labels
    assert labels is not None and labels.data.shape == (24, 256, 256)
    assert iou(labels.data[12], sample["truth"].data[12]) > 0.7
    assert labels.data[0].max() == 0  # only the slice on screen was computed
    assert widget.status.text() == "Updated slice 12."


def test_a_click_on_a_cached_slice_updates_before_returning(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    entry = annotate_sample(qtbot, viewer, widget, sample)
    labels = widget.session.image.labels
    before = labels.data[12].copy()
    inside = np.argwhere(before > 0)[len(np.argwhere(before > 0)) // 2]
    L.set_polarity(entry.points, L.NEGATIVE)
    entry.points.add(np.array([[12, *inside]]))
    assert entry.task is not None and len(entry.task.points) == 10
    assert not widget._update_timer.isActive()
    assert not np.array_equal(labels.data[12], before)


def test_propagation_matches_the_core_and_shows_progress(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    from napari_revolver import RevolverPredictor

    entry = annotate_sample(qtbot, viewer, widget, sample)
    seen: list[tuple[int, int, str]] = []
    bar = widget.propagate_box.progress
    widget.session.events.run_progressed.connect(
        lambda run: seen.append((bar.value(), bar.maximum(), widget.propagate_box.eta_label.text()))
    )
    propagate_and_wait(qtbot, widget)
    out = np.asarray(widget.session.image.labels.data)
    assert iou(out, sample["truth"].data) > 0.7
    # The bar follows the slices (redrawn a few times a second, and at the end).
    values = [s[0] for s in seen]
    assert values == sorted(values) and values[-1] == 24 and {s[1] for s in seen} == {24}
    assert 1 in values and any(s[2].endswith("left") for s in seen)
    assert bar.text() == "done: 24 / 24 slices"
    assert widget.status.text() == "Propagated to 24 slice(s)."

    predictor = RevolverPredictor(device="cpu")
    predictor.set_volume(sample["image"].data)
    task = predictor.guide(
        sample["points"].data, L.point_labels(sample["points"]), label_value=entry.label_value
    )
    np.testing.assert_array_equal(out > 0, predictor.segment(task) > 0)


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
    args = ["segment", str(tmp_path / "image.tif"), "--points", str(tmp_path / "points.csv")]
    assert cli.main([*args, "-o", str(tmp_path / "cli.tif"), "--device", "cpu"]) == 0
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "cli.tif"), widget.session.image.labels.data
    )


def test_two_tasks_switch_and_label_values(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    first = annotate_sample(qtbot, viewer, widget, sample)
    negatives = sample["points"].data[L.point_labels(sample["points"]) == 0]
    second = click_points(widget, negatives[:3], np.ones(3, int), "background")
    assert widget.session.active == 1 and second.label_value == 2
    wait_idle(qtbot, widget)
    assert {1, 2} <= set(np.unique(widget.session.image.labels.data[12]).tolist())
    widget.tasks_box.select_task(0)
    assert widget.session.active_task() is first
    assert viewer.layers.selection.active is first.points
    before = L.polarity(first.points)
    widget.tasks_box.toggle_polarity()
    assert L.polarity(first.points) != before
    assert widget.tasks_box.polarity_button.text().split()[1] == L.polarity(first.points)
    widget.tasks_box.rename_task("nuclei 2")
    assert first.points.name == "nuclei 2 points"
    qtbot.waitUntil(lambda: "nuclei 2" in widget.tasks_box.task_list.item(0).text())
    for row in range(widget.tasks_box.task_list.count()):  # the whole line, on hover
        item = widget.tasks_box.task_list.item(row)
        assert item.toolTip() == item.text()
    widget.tasks_box.delete_task()
    assert [t.name for t in widget.session.tasks] == ["background"]


def test_the_polarity_button_shows_the_new_task_polarity_after_add(
    viewer: Any, widget: Any
) -> None:
    widget.tasks_box.toggle_polarity()  # the sample task: next point negative
    assert "negative" in widget.tasks_box.polarity_button.text()
    entry = widget.add_task("second")
    assert L.polarity(entry.points) == L.POSITIVE
    assert "positive" in widget.tasks_box.polarity_button.text()
    assert not widget.tasks_box.polarity_button.isChecked()


def test_deleting_a_task_layer_from_the_layer_list_leaves_no_ghost(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any], notes: list
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    extra = widget.add_task("extra")
    extra.points.add(np.array([[12, 40, 40]]))
    wait_idle(qtbot, widget)
    # The user deletes the Points layer in the layer list (the viewer, not the widget's proxy).
    viewer.layers.remove(viewer.layers[extra.points.name])
    assert [t.name for t in widget.session.tasks] == ["nuclei"]
    assert widget.tasks_box.task_list.count() == 1
    assert 2 not in np.unique(widget.session.image.labels.data[12])
    # Close all layers, open a new image: no task is left to segment it, nothing fails.
    viewer.layers.select_all()
    viewer.layers.remove_selected()
    assert widget.session.tasks == [] and widget.session.images == {}
    rng = np.random.default_rng(1)
    viewer.add_image(rng.random((4, 64, 64)).astype(np.float32), name="new")
    wait_idle(qtbot, widget)
    assert widget.image_box.image_combo.currentText() == "new"
    assert not [x for x in viewer.layers if "[revolver]" in x.name]
    assert not errors(notes)


class FlakyStack(np.ndarray):
    """A stack whose slice 1 cannot be read once armed (a disk or network that fails)."""

    armed = False

    def __getitem__(self, key: Any) -> Any:
        out = super().__getitem__(key)
        k = key[0] if isinstance(key, tuple) else key
        if FlakyStack.armed and isinstance(k, (int, np.integer)) and int(k) == 1:
            raise OSError("slice 1 could not be read")
        return out


def test_a_failed_run_is_shown_once_and_leaves_no_empty_layer(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any], notes: list
) -> None:
    from napari_revolver.core.synthetic import sample_stack

    annotate_sample(qtbot, viewer, widget, sample)
    image, _, _, _ = sample_stack(seed=2, shape=(8, 96, 96))
    layer = viewer.add_image(image.view(FlakyStack), name="flaky")
    FlakyStack.armed = True
    try:
        assert widget.propagate_box.apply_to_target("flaky") is not None
        # The run fails on its first slices and may be over before a signal could be awaited.
        qtbot.waitUntil(lambda: widget.session.run is None and bool(errors(notes)), timeout=WAIT_MS)
        wait_idle(qtbot, widget)
    finally:
        FlakyStack.armed = False
    failed = errors(notes)
    assert len(failed) == 1 and "slice 1 could not be read" in failed[0]
    assert widget.status.text().startswith("Propagation of 'flaky' failed")
    assert widget.propagate_box.progress.text() == "failed"
    assert not [x for x in viewer.layers if x.name == "flaky [revolver]"]
    assert layer in viewer.layers and widget.session.run is None


def test_cancel_stops_a_propagation(qtbot: Any, viewer: Any, widget: Any) -> None:
    rng = np.random.default_rng(0)
    big = viewer.add_image(rng.random((300, 96, 96)).astype(np.float32), name="big")
    widget.image_box.image_combo.setCurrentText("big")
    entry = widget.add_task("x")
    entry.points.add(np.array([[0, 40, 40]]))
    wait_idle(qtbot, widget)
    worker = widget.propagate()
    with qtbot.waitSignal(worker.finished, timeout=WAIT_MS):
        widget.propagate_box.cancel_button.click()
    assert "cancelled" in widget.status.text()
    assert "cancelled" in widget.propagate_box.progress.text()
    assert widget.session.images[id(big)].labels.data.shape == (300, 96, 96)


def test_painted_slices_are_kept_marked_and_undo_clears_the_mark(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    labels = widget.session.image.labels
    viewer.dims.current_step = (5, 0, 0)
    wait_idle(qtbot, widget)
    labels.paint((5, 100, 100), 1, refresh=True)
    box = widget.propagate_box
    assert widget.session.image.painted == {(5,)}
    assert box.strip.painted == {5} and box.painted_label.text() == "Slices painted by hand: 5"
    painted = labels.data[5].copy()
    propagate_and_wait(qtbot, widget)
    np.testing.assert_array_equal(labels.data[5], painted)
    # Undo the stroke (napari's key binding): the slice is no longer marked as painted.
    labels.paint((5, 30, 30), 1, refresh=True)
    viewer.layers.selection.active = labels
    labels.undo()
    assert widget.session.image.painted == {(5,)}  # the first stroke is still there
    labels.undo()
    assert widget.session.image.painted == set()
    assert box.strip.painted == set() and box.painted_label.text() == "Slices painted by hand: none"
    box.recompute_check.setChecked(True)
    labels.paint((5, 100, 100), 1, refresh=True)
    propagate_and_wait(qtbot, widget)
    assert not np.array_equal(labels.data[5], painted)
    assert widget.session.image.painted == set()


def test_apply_tasks_to_another_image(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    from napari_revolver.core.synthetic import sample_stack

    annotate_sample(qtbot, viewer, widget, sample)
    other, truth, _, _ = sample_stack(seed=3, shape=(6, 192, 160))
    layer = viewer.add_image(other, name="other")
    with qtbot.waitSignal(widget.propagate_box.apply_to_target("other").finished, timeout=WAIT_MS):
        pass
    wait_idle(qtbot, widget)
    out = widget.session.images[id(layer)].labels
    assert out.data.shape == (6, 192, 160)
    assert iou(out.data, truth) > 0.6


def test_an_inverted_task_reads_other_images_inverted(
    qtbot: Any, tmp_path: Path, viewer: Any, widget: Any, sample: dict[str, Any], notes: list
) -> None:
    from napari_revolver import RevolverPredictor
    from napari_revolver.core.synthetic import sample_stack

    entry = annotate_sample(qtbot, viewer, widget, sample)
    widget.image_box.invert_check.setChecked(True)
    wait_idle(qtbot, widget)
    assert entry.spec.invert and entry.task is not None and entry.task.invert
    other, _, _, _ = sample_stack(seed=3, shape=(6, 128, 128))
    layer = viewer.add_image(other, name="other")
    assert widget.propagate_box.apply_to_target("other") is not None
    qtbot.waitUntil(lambda: widget.session.run is None, timeout=WAIT_MS)
    wait_idle(qtbot, widget)
    assert not errors(notes)
    # As `revolver segment --invert --apply-to other.tif`: the same task, the image inverted.
    predictor = RevolverPredictor(device="cpu")
    predictor.set_volume(other, invert=True)
    expected = predictor.segment(entry.task)
    np.testing.assert_array_equal(widget.session.images[id(layer)].labels.data > 0, expected > 0)
    # A new task on the other, non-inverted image works on every click.
    widget.image_box.image_combo.setCurrentText("other")
    assert not widget.image_box.invert_check.isChecked()
    viewer.dims.current_step = (2, 0, 0)
    fresh = widget.add_task("fresh")
    fresh.points.add(np.array([[2, 64, 64]]))
    fresh.points.add(np.array([[2, 10, 10]]))
    wait_idle(qtbot, widget)
    assert fresh.task is not None and not fresh.task.invert
    assert not errors(notes)


def test_labels_round_trip_through_the_plugin_writer_and_reader(
    qtbot: Any, tmp_path: Path, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    labels = widget.session.image.labels
    labels.scale = (2.0, 0.5, 0.5)
    path = tmp_path / "nuclei.labels.tif"
    # File > Save Selected Layers with no plugin named: the plugin's writer is the default.
    viewer.layers.selection = {labels}
    written = viewer.layers.save(str(path), selected=True)
    assert written == [str(path)]
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "ZYX" and tif.series[0].dtype == np.uint8
    [opened] = viewer.open(str(path), plugin="napari-revolver")
    assert type(opened).__name__ == "Labels"
    np.testing.assert_array_equal(opened.data, labels.data)
    np.testing.assert_allclose(opened.scale, (2.0, 0.5, 0.5))
    # The widget's Save labels writes the same file.
    out = widget.io_box.save_labels(tmp_path / "again.labels.tif")
    np.testing.assert_array_equal(tifffile.imread(out), labels.data)


def test_a_labels_tif_opens_with_the_plugin_reader_once_the_widget_is_docked(
    tmp_path: Path, viewer: Any, napari_settings: Any
) -> None:
    import yaml  # napari's dependency
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings

    assert get_settings() is napari_settings  # this test's settings file, not the user's
    data = np.zeros((3, 16, 16), np.uint16)
    data[1, 4:8, 4:8] = 3
    viewer.add_labels(data, scale=(2.0, 0.5, 0.5), name="cells")
    path = tmp_path / "cells.labels.tif"
    assert viewer.layers.save(str(path), selected=True) == [str(path)]
    # No reader named (plugin=None, as File > Open and drag and drop do): napari's TIFF
    # reader accepts the file too, and without a preference napari cannot choose.
    with pytest.raises(MultipleReaderError):
        viewer.open(str(path), plugin=None)
    dock(viewer)
    prefs = napari_settings.plugins.extension2reader
    assert prefs == {"*.labels.tif": "napari-revolver", "*.labels.tiff": "napari-revolver"}
    saved = yaml.safe_load(Path(napari_settings.config_path).read_text())
    assert saved["plugins"]["extension2reader"] == prefs
    [opened] = viewer.open(str(path), plugin=None)
    assert type(opened).__name__ == "Labels"
    assert opened.data.dtype == np.uint8
    np.testing.assert_array_equal(opened.data, data)
    np.testing.assert_allclose(opened.scale, (2.0, 0.5, 0.5))


def test_a_reader_preference_the_user_set_is_kept(viewer: Any, napari_settings: Any) -> None:
    napari_settings.plugins.extension2reader = {"*.labels.tif": "napari"}
    dock(viewer)
    assert napari_settings.plugins.extension2reader == {
        "*.labels.tif": "napari",
        "*.labels.tiff": "napari-revolver",
    }


def test_save_and_load_a_task(
    qtbot: Any, tmp_path: Path, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    task_path = widget.io_box.save_task(tmp_path / "nuclei.revolver-task.json")
    loaded = widget.io_box.load_task(task_path)
    assert loaded is not None and loaded.task is not None
    assert len(loaded.points.data) == 9
    # The reader contribution opens the same file as a task.
    [layer] = viewer.open(str(task_path), plugin="napari-revolver")
    assert len(layer.data) == 9
    assert widget.session.tasks[-1].points is layer


def test_no_positive_point_is_a_notification(
    viewer: Any, widget: Any, qtbot: Any, notes: list
) -> None:
    entry = widget.add_task("neg only")
    L.set_polarity(entry.points, L.NEGATIVE)
    entry.points.add(np.array([[12, 10, 10]]))
    wait_idle(qtbot, widget)
    assert any(kind == "warning" and "no positive point" in msg for kind, msg in notes)
    widget.session.remove_task(0)
    assert widget.propagate() is None
    assert any("no task has a positive point" in msg for _, msg in notes)


def test_points_outside_the_image_are_a_warning_once_per_task(
    qtbot: Any, viewer: Any, widget: Any, notes: list
) -> None:
    entry = widget.add_task("outside")
    entry.points.add(np.array([[12, 10, 10], [12, 400, 400]]))
    wait_idle(qtbot, widget)
    for yx in ([12, 30, 30], [12, 60, 60]):
        entry.points.add(np.array([yx]))
        wait_idle(qtbot, widget)
    outside = [m for _, m in notes if "outside" in m]
    assert len(outside) == 1 and "'outside'" in outside[0]
    assert not errors(notes)
    assert entry.task is not None and len(entry.task.points) == 3


def test_the_channel_axis_choices_are_not_cut_off(qtbot: Any, viewer: Any, widget: Any) -> None:
    viewer.add_image(np.random.default_rng(0).random((3, 5, 64, 64)), name="multi")
    widget.image_box.image_combo.setCurrentText("multi")
    widget.show()
    qtbot.waitExposed(widget)
    combo = widget.image_box.channel_axis
    longest = max(combo.itemText(i) for i in range(combo.count()))
    assert combo.width() > combo.fontMetrics().horizontalAdvance(longest)


def test_rgb_image_is_segmented(qtbot: Any, viewer: Any, widget: Any, notes: list) -> None:
    rgb = np.zeros((96, 96, 3), np.uint8)
    yy, xx = np.mgrid[:96, :96]
    rgb[(yy - 48) ** 2 + (xx - 48) ** 2 < 300] = (200, 40, 160)
    viewer.add_image(rgb, name="rgb", rgb=True)
    widget.image_box.image_combo.setCurrentText("rgb")
    entry = widget.add_task("blob")
    entry.points.add(np.array([[48, 48]]))
    wait_idle(qtbot, widget)
    assert widget.session.image.labels.data.shape == (96, 96)
    assert widget.status.text() == "Updated the image."
    assert not errors(notes)


def test_deleting_the_image_mid_propagation_is_handled(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any], notes: list
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    worker = widget.propagate()
    with qtbot.waitSignal(worker.finished, timeout=WAIT_MS):
        viewer.layers.remove(sample["image"])
    wait_idle(qtbot, widget)
    assert widget.session.image is None
    names = [
        widget.image_box.image_combo.itemText(i)
        for i in range(widget.image_box.image_combo.count())
    ]
    assert sample["image"].name not in names
    assert not errors(notes)


def test_closing_the_widget_stops_its_work(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    worker = widget.propagate()
    with qtbot.waitSignal(worker.finished, timeout=WAIT_MS):
        widget.close()
    viewer.dims.current_step = (3, 0, 0)  # no callbacks into the closed widget
    viewer.layers.remove(sample["points"])


def test_instances_give_one_id_per_object_unique_across_slices(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    widget.propagate_box.instances_check.setChecked(True)
    wait_idle(qtbot, widget)
    propagate_and_wait(qtbot, widget, 10, 13)
    data = widget.session.image.labels.data
    ids = [set(np.unique(data[z]).tolist()) - {0} for z in (10, 11)]
    assert len(ids[0]) > 3 and len(ids[1]) > 3
    assert not ids[0] & ids[1]


def test_follow_positions_reaches_the_core(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    from napari_revolver import RevolverPredictor

    entry = annotate_sample(qtbot, viewer, widget, sample)
    widget.propagate_box.local_check.setChecked(True)
    assert widget.session.local
    wait_idle(qtbot, widget)
    propagate_and_wait(qtbot, widget)
    out = np.asarray(widget.session.image.labels.data)
    predictor = RevolverPredictor(device="cpu")
    predictor.set_volume(sample["image"].data)
    task = predictor.guide(
        sample["points"].data, L.point_labels(sample["points"]), label_value=entry.label_value
    )
    np.testing.assert_array_equal(out > 0, predictor.segment(task, local=True) > 0)


def test_invert_checkbox_guides_the_image_tasks_again(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    entry = annotate_sample(qtbot, viewer, widget, sample)
    before = widget.session.image.labels.data[12].copy()
    widget.image_box.invert_check.setChecked(True)
    wait_idle(qtbot, widget)
    state = widget.session.image
    assert state.spec.invert and entry.task is not None and entry.task.invert
    assert not np.array_equal(state.labels.data[12], before)
    qtbot.waitUntil(lambda: "inverted" in widget.tasks_box.task_list.item(0).text())
    widget.image_box.invert_check.setChecked(False)
    wait_idle(qtbot, widget)
    np.testing.assert_array_equal(widget.session.image.labels.data[12], before)


def test_scale_box_resizes_the_slices_and_keeps_the_labels_in_image_pixels(
    qtbot: Any, tmp_path: Path, viewer: Any, widget: Any, sample: dict[str, Any], notes: list
) -> None:
    from napari_revolver import RevolverPredictor

    entry = annotate_sample(qtbot, viewer, widget, sample)
    image = np.asarray(sample["image"].data)
    widget.image_box.scale_spin.setValue(0.5)
    wait_idle(qtbot, widget)
    state = widget.session.image
    assert state.spec.scale == 0.5 and entry.task is not None and entry.task.scale == 0.5
    assert state.predictor.work_info.slice_shape == tuple(s // 2 for s in image.shape[-2:])
    assert state.labels.data.shape == image.shape  # the image's own pixels
    qtbot.waitUntil(lambda: "scale 0.5" in widget.tasks_box.task_list.item(0).text())
    # As `revolver segment --scale 0.5`: the same task, the same slice.
    predictor = RevolverPredictor(device="cpu")
    predictor.set_volume(image, scale=0.5)
    expected = predictor.predict_slice(12, entry.task) > 0
    np.testing.assert_array_equal(state.labels.data[12] > 0, expected)
    # A saved task keeps its scale; loaded at scale 1, it still reads at 0.5, and says so.
    path = widget.io_box.save_task(tmp_path / "half.json")
    widget.image_box.scale_spin.setValue(1.0)
    wait_idle(qtbot, widget)
    assert widget.session.image.spec.scale == 1.0 and entry.task.scale == 1.0
    loaded = widget.io_box.load_task(path)
    wait_idle(qtbot, widget)
    assert loaded is not None and loaded.spec.scale == 0.5
    assert any(kind == "info" and "resized by 0.5" in msg for kind, msg in notes)
    assert not errors(notes)


def test_a_loaded_inverted_task_keeps_its_reading(
    qtbot: Any, tmp_path: Path, viewer: Any, widget: Any, sample: dict[str, Any], notes: list
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    widget.image_box.invert_check.setChecked(True)
    wait_idle(qtbot, widget)
    path = widget.io_box.save_task(tmp_path / "dark.json")
    widget.image_box.invert_check.setChecked(False)
    wait_idle(qtbot, widget)
    loaded = widget.io_box.load_task(path)
    wait_idle(qtbot, widget)
    assert loaded is not None and loaded.task is not None and loaded.task.invert
    assert loaded.spec.invert and not widget.session.image.spec.invert
    assert any(kind == "info" and "inverted" in msg for kind, msg in notes)
    assert not errors(notes)


def test_toggle_key_is_bound_on_task_points(widget: Any) -> None:
    from napari_revolver._napari.tasks_box import TOGGLE_KEY

    entry = widget.add_task("k")
    before = L.polarity(entry.points)
    bound = {str(k): f for k, f in entry.points.keymap.items()}
    bound[TOGGLE_KEY.upper()](entry.points)
    assert L.polarity(entry.points) != before
    assert L.polarity(entry.points) in widget.tasks_box.polarity_button.text()


def test_corrupt_weights_are_a_notification_and_the_model_stays(
    tmp_path: Path, qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any], notes: list
) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    widget.image_box.set_weights(str(bad))
    assert len([m for m in errors(notes) if "Cannot use these weights" in m]) == 1
    assert widget.image_box.weights_label.text() == "shipped weights"
    annotate_sample(qtbot, viewer, widget, sample)
    assert widget.session.image.labels.data[12].any()


def test_dask_backed_layer_is_segmented(qtbot: Any, viewer: Any, widget: Any, notes: list) -> None:
    da = pytest.importorskip("dask.array")
    from napari_revolver.core.synthetic import sample_stack

    image, truth, points, labels = sample_stack(seed=4, shape=(6, 128, 128))
    viewer.add_image(da.from_array(image, chunks=(1, 128, 128)), name="lazy")
    widget.image_box.image_combo.setCurrentText("lazy")
    viewer.dims.current_step = (3, 0, 0)
    click_points(widget, points, labels, "lazy nuclei")
    wait_idle(qtbot, widget)
    propagate_and_wait(qtbot, widget)
    assert iou(widget.session.image.labels.data, truth) > 0.6
    assert not errors(notes)


def test_feature_store_is_shared_with_the_cli(
    qtbot: Any, tmp_path: Path, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    from napari_revolver import RevolverPredictor

    store = tmp_path / "features.zarr"
    predictor = RevolverPredictor(device="cpu")
    predictor.set_volume(sample["image"].data, store=store)
    for _ in predictor.precompute():
        pass
    widget.image_box.set_store(str(store))
    state = widget.session.image
    assert widget.session.missing_features([(z,) for z in range(24)]) == []
    annotate_sample(qtbot, viewer, widget, sample)
    assert iou(state.labels.data[12], sample["truth"].data[12]) > 0.7


def test_manifest_is_valid_and_the_writer_has_a_clean_name() -> None:
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-revolver")
    manifest.validate_imports()
    assert {w.display_name for w in manifest.contributions.widgets} == {"Revolver"}
    titles = {f"{manifest.display_name} {w.display_name}" for w in manifest.contributions.writers}
    assert titles == {"Revolver labels TIFF"}
    assert len(manifest.contributions.readers) == 2


def test_a_task_added_later_gets_its_colour_in_the_labels_layer(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any]
) -> None:
    annotate_sample(qtbot, viewer, widget, sample)
    second = widget.add_task("later")
    rgba = np.asarray(widget.session.image.labels.colormap.map(np.array([second.label_value])))[0]
    assert rgba[3] > 0


def test_new_object_selects_one_nucleus_and_propagation_follows_it(
    qtbot: Any, viewer: Any, widget: Any, sample: dict[str, Any], notes: list
) -> None:
    from scipy import ndimage

    annotate_sample(qtbot, viewer, widget, sample)
    truth = np.asarray(sample["truth"].data)
    flat, n = ndimage.label(truth[12] > 0)
    sizes = ndimage.sum(np.ones_like(flat), flat, index=range(1, n + 1))
    clicked = flat == 1 + int(np.argmax(sizes))  # the largest nucleus on slice 12
    depth = ndimage.distance_transform_edt(clicked)
    yx = np.unravel_index(np.argmax(depth), depth.shape)  # its deepest interior point
    comps, _ = ndimage.label(truth > 0)
    nucleus = comps == comps[12, yx[0], yx[1]]  # the same nucleus in 3D

    widget.tasks_box.object_button.click()
    obj = widget.session.active_task()
    assert obj.kind == "object" and obj.points.name == f"{obj.name} points"
    assert "New object" == widget.tasks_box.object_button.text()
    obj.points.add(np.array([[12, *yx]]))
    wait_idle(qtbot, widget)
    line = f"◆ {obj.name}  (object, id {obj.label_value}; +1 / −0"
    qtbot.waitUntil(lambda: widget.tasks_box.task_list.item(1).text().startswith(line))
    out = np.asarray(widget.session.image.labels.data)
    assert iou(out[12] == obj.label_value, clicked) > 0.6

    propagate_and_wait(qtbot, widget)
    out = np.asarray(widget.session.image.labels.data)
    followed = [z for z in range(24) if (out[z] == obj.label_value).any()]
    assert {11, 12, 13} <= set(followed)
    mine = out == obj.label_value
    assert (mine & nucleus).sum() > 0.8 * mine.sum()  # one id, on that nucleus, through z
    assert iou(out > 0, truth) > 0.7  # the class task is still everywhere
    status = widget.status.text()
    assert status.startswith("Propagated to 24 slice(s).")
    assert "Objects ended" not in status or status.count(obj.name) == 1  # one clause per object
    assert not errors(notes)


def test_a_short_window_scrolls_the_widget_instead_of_squeezing_its_buttons(
    qtbot: Any, viewer: Any, widget: Any
) -> None:
    window = viewer.window._qt_window
    window.resize(1000, 600)
    window.show()
    ended = "; ".join(f"object {i} at slice {i} (area grew 3.0x in one step)" for i in range(60))
    widget.report("status", f"Propagated to 100 slice(s). Objects ended: {ended}.")
    qtbot.wait(100)
    # The dock does not force the window taller than asked (it did: 872 px); it scrolls.
    assert window.height() <= 600
    assert widget.scroll.verticalScrollBar().maximum() > 0
    for button in (widget.propagate_box.propagate_button, widget.propagate_box.cancel_button):
        assert button.height() >= button.minimumSizeHint().height()
