"""The Session model on a napari ViewerModel, without Qt: events, layer tracking, runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("napari", reason="the napari tier needs napari (pip install .[dev])")

from napari.components import ViewerModel

from napari_revolver._napari import layers as L
from napari_revolver._napari.session import Session


class Recorder:
    """Every event a session emits, as (name, args)."""

    def __init__(self, session: Session) -> None:
        self.seen: list[tuple[str, tuple[Any, ...]]] = []
        for name in (
            "task_added",
            "task_removed",
            "task_changed",
            "task_stale",
            "painted_changed",
            "run_started",
            "run_progressed",
            "run_finished",
            "run_failed",
            "warned",
        ):
            getattr(session.events, name).connect(
                lambda *args, name=name: self.seen.append((name, args))
            )

    def names(self) -> list[str]:
        return [n for n, _ in self.seen]

    def count(self, name: str) -> int:
        return self.names().count(name)


@pytest.fixture
def model() -> ViewerModel:
    return ViewerModel()


@pytest.fixture
def sample(model: ViewerModel) -> dict[str, Any]:
    from napari_revolver._napari.sample_data import nuclei_stack_with_points

    out = {}
    for data, meta, kind in nuclei_stack_with_points():
        out[kind] = getattr(model, f"add_{kind}")(data, **meta)
    model.dims.current_step = (12, 0, 0)
    return out


@pytest.fixture
def session(model: ViewerModel, sample: dict[str, Any]) -> Session:
    s = Session(model, device="cpu")
    s.set_image(sample["image"])
    return s


def test_the_sample_points_are_taken_up_as_a_task(session: Session, sample: dict) -> None:
    [entry] = session.tasks
    assert entry.name == "nuclei" and entry.points is sample["points"]
    assert entry.image is sample["image"] and session.active == 0
    assert L.point_labels(entry.points).sum() == 4


def test_clicks_make_a_task_stale_and_an_update_guides_it(session: Session) -> None:
    rec = Recorder(session)
    entry = session.tasks[0]
    assert session.missing_features([(12,)])  # nothing encoded yet
    session.run_inline(session.encoding(session.missing_features([(12,)])))
    assert session.update_slice() == "Updated slice 12."
    assert entry.task is not None
    entry.points.add(np.array([[12, 5, 5]]))
    assert entry.task is None and rec.count("task_stale") == 1
    assert session.update_slice() == "Updated slice 12."
    assert entry.task is not None and len(entry.task.points) == 10


def test_removing_a_points_layer_removes_its_task(model: ViewerModel, session: Session) -> None:
    rec = Recorder(session)
    extra = session.add_task("extra")
    assert rec.count("task_added") == 1 and session.active == 1
    model.layers.remove(extra.points)
    assert [t.name for t in session.tasks] == ["nuclei"]
    assert rec.count("task_removed") == 1 and session.active == 0


def test_removal_is_matched_behind_the_plugin_proxy(model: ViewerModel, sample: dict) -> None:
    from napari.utils._proxies import PublicOnlyProxy

    proxy = PublicOnlyProxy(model)
    session = Session(proxy, device="cpu")
    session.set_image(proxy.layers[sample["image"].name])
    entry = session.add_task("x")
    assert entry.points is L.unwrap(entry.points)  # stored without a proxy
    proxy.layers.remove(proxy.layers[entry.points.name])
    assert [t.name for t in session.tasks] == ["nuclei"]
    model.layers.remove(sample["image"])
    assert session.image is None and session.images == {}


def test_closing_every_layer_leaves_no_state(model: ViewerModel, session: Session) -> None:
    session.run_inline(session.propagation(12, 12))
    model.layers.select_all()
    model.layers.remove_selected()
    assert session.tasks == [] and session.images == {} and session.image is None
    layer = model.add_image(np.random.default_rng(0).random((3, 32, 32)), name="new")
    session.set_image(layer)
    with pytest.raises(ValueError, match="no task has a positive point"):
        session.propagation()
    assert len(model.layers) == 1


def test_a_run_reports_start_progress_and_end(session: Session) -> None:
    rec = Recorder(session)
    run = session.run_inline(session.propagation(10, 13))
    assert run.done == run.total == 4 and not run.failed
    assert rec.count("run_started") == 1 and rec.count("run_finished") == 1
    assert rec.count("run_progressed") == 4 and session.run is None
    labels = session.image.labels
    assert all(labels.data[z].any() for z in range(10, 14)) and not labels.data[0].any()


class Broken(np.ndarray):
    def __getitem__(self, key: Any) -> Any:
        k = key[0] if isinstance(key, tuple) else key
        if isinstance(k, (int, np.integer)) and int(k) == 1:
            raise OSError("cannot read slice 1")
        return super().__getitem__(key)


def test_a_failed_run_is_one_event_and_leaves_no_layer(
    model: ViewerModel, session: Session
) -> None:
    from napari_revolver.core.synthetic import sample_stack

    image, _, _, _ = sample_stack(seed=5, shape=(5, 64, 64))
    other = model.add_image(image.view(Broken), name="broken")
    n_layers = len(model.layers)
    rec = Recorder(session)
    run = session.run_inline(session.propagation(state=session.state_for(other)))
    assert run.failed == "cannot read slice 1"
    [(_, (failed_run, message))] = [x for x in rec.seen if x[0] == "run_failed"]
    assert failed_run is run and "Propagation of 'broken' failed" in message
    assert rec.count("run_finished") == 0 and session.run is None
    assert len(model.layers) == n_layers


def test_painting_marks_a_slice_and_undo_clears_it(session: Session) -> None:
    session.run_inline(session.propagation(5, 6))
    rec = Recorder(session)
    labels = session.image.labels
    labels.paint((5, 10, 10), 1)
    assert session.image.painted == {(5,)} and rec.count("painted_changed") == 1
    labels.undo()
    assert session.image.painted == set() and rec.count("painted_changed") == 2
    labels.paint((6, 10, 10), 1)
    session.run_inline(session.propagation(5, 6))
    assert session.image.painted == {(6,)}  # kept, and still marked
    session.forget_painted()
    assert session.image.painted == set()


def test_points_outside_the_image_warn_once_per_task(session: Session) -> None:
    rec = Recorder(session)
    entry = session.add_task("out")
    entry.points.add(np.array([[12, 500, 500], [12, 20, 20]]))
    session.guide(entry)
    entry.points.add(np.array([[12, 30, 30]]))
    session.guide(entry)
    assert rec.count("warned") == 1
    assert entry.task is not None and len(entry.task.points) == 2


def test_an_inverted_task_is_applied_as_revolver_segment_apply_to_does(
    model: ViewerModel, session: Session
) -> None:
    from napari_revolver import RevolverPredictor
    from napari_revolver.core.synthetic import sample_stack

    entry = session.tasks[0]
    session.set_invert(True)
    assert entry.spec.invert and entry.task is None
    session.guide(entry)
    image, _, _, _ = sample_stack(seed=6, shape=(4, 96, 96))
    other = model.add_image(image, name="other")
    state = session.state_for(other)
    assert not state.spec.invert  # the image's own reading is unchanged
    run = session.run_inline(session.propagation(state=state))
    assert not run.failed
    predictor = RevolverPredictor(device="cpu")
    predictor.set_volume(image, invert=True)
    np.testing.assert_array_equal(state.labels.data > 0, predictor.segment(entry.task) > 0)
    # A task guided on the other image reads it as it is, next to the inverted one.
    session.set_image(other)
    model.dims.current_step = (1, 0, 0)
    fresh = session.add_task("fresh")
    fresh.points.add(np.array([[1, 48, 48]]))
    session.run_inline(session.encoding(session.missing_features([(1,)])))
    assert session.update_slice() == "Updated slice 1."
    assert fresh.task is not None and not fresh.task.invert


def test_an_object_followed_at_half_scale_is_labelled_in_image_pixels(
    session: Session, sample: dict, tmp_path: Path
) -> None:
    from napari_revolver import RevolverPredictor

    obj, yx = _one_clicked_object(session, sample)
    session.set_scale(0.5)
    assert obj.spec.scale == 0.5
    session.run_inline(session.encoding(session.missing_features([(12,)])))
    session.update_slice((12,))
    assert obj.task is not None and obj.task.scale == 0.5
    run = session.run_inline(session.propagation(10, 14))
    assert not run.failed
    data = np.asarray(session.image.labels.data)
    assert data.shape == np.asarray(sample["image"].data).shape
    assert data[12, yx[0], yx[1]] == obj.label_value
    predictor = RevolverPredictor(device="cpu")
    predictor.set_volume(np.asarray(sample["image"].data), scale=0.5)
    expected = predictor.segment(obj.task)
    for z in range(10, 15):
        np.testing.assert_array_equal(data[z] == obj.label_value, expected[z] == obj.label_value)
    with pytest.raises(ValueError, match="scale must be between"):
        session.set_scale(0)
    # A task file and the Points layer read from it keep the scale.
    from napari_revolver._napari import io

    path = session.save_task(obj, tmp_path / "cell.json")
    from napari_revolver._napari.session import TASK_METADATA

    [(data, meta, _)] = io.read_task(str(path))
    assert meta["metadata"][TASK_METADATA]["scale"] == 0.5
    layer = session.viewer.add_points(data, **meta)
    [back] = [t for t in session.tasks if t.points is layer]
    assert back.spec.scale == 0.5 and back.kind == "object"
    # A layer whose recorded scale is out of range is not taken up, and says why.
    rec = Recorder(session)
    meta["metadata"][TASK_METADATA]["scale"] = 0
    bad = session.viewer.add_points(data, **{**meta, "name": "bad points"})
    assert not any(t.points is bad for t in session.tasks)
    assert rec.count("warned") == 1 and "scale must be between" in rec.seen[-1][1][0]


def test_writer_and_reader_round_trip(tmp_path: Path) -> None:
    import npe2

    from napari_revolver._napari import io

    labels = np.zeros((3, 16, 16), np.uint32)
    labels[1, 4:8, 4:8] = 7
    path = tmp_path / "cells.labels.tif"
    io.write_labels_tiff(str(path), labels, {"scale": (3.0, 0.5, 0.5)})
    pm = npe2.PluginManager.instance()
    pm.discover()
    writer, _ = pm.get_writer(str(path), ["labels"])
    assert writer is not None and writer.plugin_name == "napari-revolver"
    reader = io.get_labels_reader(str(path))
    assert reader is not None and io.get_labels_reader(str(tmp_path / "x.tif")) is None
    [(data, meta, kind)] = reader(str(path))
    assert kind == "labels" and data.dtype == np.uint8
    np.testing.assert_array_equal(data, labels)
    assert meta["scale"] == (3.0, 0.5, 0.5) and meta["name"] == "cells labels"


def _largest_nucleus(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The largest connected nucleus of a slice, its deepest interior point, and the others."""
    from scipy import ndimage

    comps, n = ndimage.label(truth > 0)
    sizes = ndimage.sum(np.ones_like(comps), comps, index=range(1, n + 1))
    mask = comps == 1 + int(np.argmax(sizes))
    depth = ndimage.distance_transform_edt(mask)
    yx = np.array(np.unravel_index(np.argmax(depth), mask.shape))
    return mask, yx, (comps > 0) & ~mask


def test_an_object_task_is_the_clicked_nucleus_followed_with_one_id(
    session: Session, sample: dict
) -> None:
    truth = np.asarray(sample["labels"].data)
    mask, yx, others = _largest_nucleus(truth[12])
    nuclei = session.tasks[0]
    obj = session.add_task(kind="object")
    assert obj.kind == "object" and obj.name == f"object {obj.label_value}"
    obj.points.add(np.array([[12, *yx]]))
    session.run_inline(session.encoding(session.missing_features([(12,)])))
    session.update_slice((12,))
    out = np.asarray(session.image.labels.data[12])
    mine = out == obj.label_value
    assert (mine & mask).sum() / (mine | mask).sum() > 0.6  # the clicked nucleus ...
    assert (mine & others).sum() < 0.05 * mine.sum()  # ... and not its look-alikes
    assert ((out == nuclei.label_value) & others).sum() > 0.5 * others.sum()  # the class task

    run = session.run_inline(session.propagation(9, 15))
    assert run.done == run.total == 2 * 7 and not run.failed
    data = np.asarray(session.image.labels.data)
    from scipy import ndimage

    comps, _ = ndimage.label(truth > 0)  # the clicked nucleus in 3D
    nucleus = comps == comps[12, yx[0], yx[1]]
    for z in (11, 13):  # followed onto the neighbours with the same id, beside the class
        here, m = data[z] == obj.label_value, nucleus[z]
        rest = (truth[z] > 0) & ~m
        assert (here & m).sum() / (here | m).sum() > 0.5
        assert ((data[z] == nuclei.label_value) & rest).sum() > 0.5 * rest.sum()

    # A click for the class task elsewhere keeps the object where it was followed.
    nuclei.points.add(np.array([[13, 5, 5]]))
    L.set_polarity(nuclei.points, L.NEGATIVE)
    session.update_slice((13,))
    assert (
        (np.asarray(session.image.labels.data[13]) == obj.label_value)
        == (data[13] == obj.label_value)
    ).all()


def _one_clicked_object(session: Session, sample: dict) -> tuple[Any, np.ndarray]:
    """The sample's class task replaced by one object clicked on slice 12; its click."""
    truth = np.asarray(sample["labels"].data)
    _, yx, _ = _largest_nucleus(truth[12])
    session.remove_task(session.tasks[0])  # the sample's class task
    obj = session.add_task("cell", kind="object")
    obj.points.add(np.array([[12, *yx]]))
    session.run_inline(session.encoding(session.missing_features([(12,)])))
    return obj, np.asarray(yx)


def test_a_slice_left_blank_says_where_its_objects_were_clicked(
    session: Session, sample: dict, model: ViewerModel
) -> None:
    obj, yx = _one_clicked_object(session, sample)
    assert session.update_slice((12,)) == "Updated slice 12."
    changed: list[Any] = []
    session.events.task_changed.connect(changed.append)
    image = np.asarray(sample["image"].data)
    model.layers.remove(sample["image"])
    assert obj.image is None and obj in changed  # its line in the task list says so
    # Another image (the same one opened again would take the object up: next test).
    again = model.add_image(image[:, ::-1].copy(), name="reopened")
    session.set_image(again)
    session.run_inline(session.encoding(session.missing_features([(12,)])))
    text = session.update_slice((12,))
    assert "blank" in text and "'cell' was deleted" in text and "'reopened'" in text
    # Another image beside it: the object stays on the image it was clicked on.
    obj.points.add(np.array([[12, *yx]]))
    session.update_slice((12,))
    assert obj.image is again
    other = model.add_image(image[:, :, ::-1].copy(), name="other")
    session.set_image(other)
    session.run_inline(session.encoding(session.missing_features([(12,)])))
    text = session.update_slice((12,))
    assert "clicked on 'reopened'" in text and "deleted" not in text


def test_the_same_image_opened_again_takes_up_its_objects_and_output(
    session: Session, sample: dict, model: ViewerModel
) -> None:
    obj, _ = _one_clicked_object(session, sample)
    session.update_slice((12,))
    output = session.image.labels
    before = np.asarray(output.data[12]) == obj.label_value
    assert before.any()
    name, image = sample["image"].name, np.asarray(sample["image"].data)
    model.layers.remove(sample["image"])
    assert obj.image is None
    # The same data opened again under its name: a new layer, on top of the others.
    again = model.add_image(image.copy(), name=name)
    changed: list[Any] = []
    session.events.task_changed.connect(changed.append)
    session.set_image(again)
    assert obj.image is again and obj in changed
    assert session.image.labels is output  # the user's output layer is written on again
    order = list(model.layers)
    assert order.index(output) > order.index(again) < order.index(obj.points)
    session.run_inline(session.encoding(session.missing_features([(12,)])))
    text = session.update_slice((12,))
    assert "blank" not in text
    np.testing.assert_array_equal(np.asarray(output.data[12]) == obj.label_value, before)
    # Other data does not take up an object whose image was deleted.
    model.layers.remove(again)
    other = model.add_image(image[:, ::-1].copy(), name="other")
    session.set_image(other)
    assert obj.image is None


def test_the_same_image_opened_again_takes_over_its_features(
    session: Session, sample: dict, model: ViewerModel
) -> None:
    obj, _ = _one_clicked_object(session, sample)
    session.run_inline(session.encoding(session.missing_features([(3,), (20,)])))
    name, image = sample["image"].name, np.asarray(sample["image"].data)
    model.layers.remove(sample["image"])
    again = model.add_image(image.copy(), name=name)
    session.set_image(again)
    # The slices encoded before the image was deleted are not encoded again.
    assert session.missing_features([(3,), (12,), (20,)]) == []
    assert [i for _, i in session.missing_features([(4,)])] == [(4,)]
    # Other data takes nothing over; with no task left without its image, nothing is kept.
    model.layers.remove(again)
    other = model.add_image(image[:, ::-1].copy(), name="other")
    session.set_image(other)
    assert len(session.missing_features([(3,), (12,), (20,)])) == 3
    session.remove_task(obj)
    assert session._released == []


def test_an_object_task_file_keeps_its_kind(session: Session, tmp_path: Path) -> None:
    truth = np.asarray(session.viewer.layers["ground truth"].data)
    _, yx, _ = _largest_nucleus(truth[12])
    obj = session.add_task("cell", kind="object")
    obj.points.add(np.array([[12, *yx]]))
    session.guide(obj)
    path = session.save_task(obj, tmp_path / "cell.revolver-task.json")
    back = session.load_task(path)
    assert back.kind == "object" and back.task is not None and back.task.kind == "object"
    with pytest.raises(ValueError, match="'class' or 'object'"):
        session.add_task(kind="instance")


def test_a_slice_painted_for_an_object_guides_its_neighbours(
    session: Session, sample: dict
) -> None:
    from scipy import ndimage

    truth = np.asarray(sample["labels"].data)
    mask, yx, _ = _largest_nucleus(truth[12])
    obj = session.add_task(kind="object")
    obj.points.add(np.array([[12, *yx]]))
    session.run_inline(session.propagation(12, 12))
    # On slice 18 the user paints another nucleus as this object (a correction).
    comps, _ = ndimage.label(truth > 0)
    clicked = comps == comps[12, yx[0], yx[1]]
    on18, n = ndimage.label(((comps > 0) & ~clicked)[18])
    sizes = ndimage.sum(np.ones_like(on18), on18, index=range(1, n + 1))
    painted = on18 == 1 + int(np.argmax(sizes))
    labels = session.image.labels
    labels.paint((18, *np.argwhere(painted)[0]), obj.label_value)  # marks slice 18 painted
    plane = labels.data[18]
    plane[plane == obj.label_value] = 0
    plane[painted] = obj.label_value
    assert (18,) in session.image.painted

    session.run_inline(session.propagation(9, 20))
    data = np.asarray(labels.data)
    np.testing.assert_array_equal(data[18] == obj.label_value, painted)  # kept as painted
    target = comps == comps[18][painted][0]  # the painted nucleus in 3D
    for z in (17, 19):  # followed from the painted slice, not from the click
        here = data[z] == obj.label_value
        assert here.any() and (here & target[z]).sum() > 0.8 * here.sum()
    assert ((data[12] == obj.label_value) & mask).sum() > 0.5 * mask.sum()


def test_a_click_reselects_only_its_object_and_its_old_pixels_go(
    session: Session, sample: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scipy import ndimage

    from napari_revolver.core.predictor import RevolverPredictor

    truth = np.asarray(sample["labels"].data)
    comps, n = ndimage.label(truth[12] > 0)
    sizes = ndimage.sum(np.ones_like(comps), comps, index=range(1, n + 1))
    big = [1 + int(i) for i in np.argsort(sizes)[::-1][:3]]
    centres = []
    for c in big:
        depth = ndimage.distance_transform_edt(comps == c)
        centres.append(np.unravel_index(np.argmax(depth), depth.shape))
    session.remove_task(session.tasks[0])
    a, b = session.add_task(kind="object"), session.add_task(kind="object")
    a.points.add(np.array([[12, *centres[0]]]))
    b.points.add(np.array([[12, *centres[1]]]))
    session.run_inline(session.encoding(session.missing_features([(12,)])))
    session.update_slice((12,))
    calls: list[str] = []
    original = RevolverPredictor.object_mask

    def counted(self: RevolverPredictor, index: Any, task: Any, **kw: Any) -> np.ndarray:
        calls.append(task.name)
        return original(self, index, task, **kw)

    monkeypatch.setattr(RevolverPredictor, "object_mask", counted)
    # Object b's click moves to the third nucleus: only b is selected again, and its old
    # pixels on the second nucleus go; a is untouched.
    before_a = np.asarray(session.image.labels.data[12]) == a.label_value
    b.points.data = np.array([[12, *centres[2]]], float)
    session.update_slice((12,))
    out = np.asarray(session.image.labels.data[12])
    assert calls == [b.name]
    assert ((out == a.label_value) == before_a).all()
    assert not ((out == b.label_value) & (comps == big[1])).any()
    assert ((out == b.label_value) & (comps == big[2])).sum() > 0.5 * (comps == big[2]).sum()


def test_where_objects_ended_reads_as_one_clause_per_object() -> None:
    from napari_revolver._napari.session import _ends_text

    ends = [("cell", "r", (17,)), ("cell", "r", (6,)), ("b", "q", (3,)), ("b", "q", (4,))]
    ends += [("b", "q", (5,))]
    assert _ends_text(ends) == "cell at slices 6 and 17 (r); b at slices 3-5 (q)"


def _brush(session: Session) -> Any:
    """Paint on the image's output layer as a mouse stroke does, with a 9 px brush."""
    labels = session.image.labels
    labels.brush_size = 9

    def stroke(at: tuple[int, int, int], value: int) -> None:
        # As a mouse stroke: napari sends its paint event once the stroke is written.
        with labels.block_history():
            labels.paint(at, value)

    return stroke


def test_a_task_added_after_a_slice_was_painted_does_not_learn_from_it(
    session: Session,
) -> None:
    entry = session.tasks[0]
    session.run_inline(session.propagation(5, 6))
    stroke = _brush(session)

    stroke((5, 40, 40), entry.label_value)
    assert (5,) in session.painted_support(entry)
    later = session.add_task("background")
    later.points.add(np.array([[5, 10, 10]]))
    # Nobody painted 'background' on slice 5: its unpainted pixels there are not known to
    # be anything for it, so the slice does not teach it.
    assert session.painted_support(later) == {}
    task = session.guide(later)
    assert task is not None and not task.support_masks
    # Painting the slice again makes it the truth for every task there is by then.
    stroke((5, 80, 80), later.label_value)
    support = session.painted_support(later)
    assert list(support) == [(5,)] and (support[(5,)] == 1).any()
    assert (5,) in session.painted_support(entry)


def test_a_slice_painted_by_hand_teaches_the_class_tasks(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = session.tasks[0]
    session.run_inline(session.propagation(5, 6))
    predictor = session.image.predictor
    fits: list[int] = []
    real_fit = predictor.fit_labels

    def counting(painted):
        fits.append(len(painted))
        return real_fit(painted)

    monkeypatch.setattr(predictor, "fit_labels", counting)
    rec = Recorder(session)
    labels = session.image.labels
    stroke = _brush(session)

    stroke((5, 40, 40), entry.label_value)
    assert session.image.painted == {(5,)}
    assert entry.task is None and rec.count("task_stale") == 1
    task = session.guide(entry)
    assert task is not None and [k for k, _ in task.support_masks] == [(5,)]
    painted = session.painted_support(entry)
    np.testing.assert_array_equal(
        painted[(5,)] == 1, np.asarray(labels.data[5]) == entry.label_value
    )
    # Moving through the stack changes no painting: the task stays guided.
    session.viewer.dims.current_step = (7, 0, 0)
    session.viewer.dims.current_step = (5, 0, 0)
    assert entry.task is task
    # Clicks alone do not refit: the painted slice's fit is kept until the painting changes.
    entry.points.add(np.array([[12, 30, 30]]))
    session.guide(entry)
    assert fits == [1]
    stroke((5, 60, 60), entry.label_value)
    session.guide(entry)
    assert fits == [1, 1]
    # A class task without clicks learns from the painting alone.
    other = session.add_task("painted only")
    stroke((5, 20, 90), other.label_value)
    assert other.task is None
    assert not session.guide_stale()
    assert other.task is not None and other.task.n_positive == 0
    # Forgetting the painted slices: the tasks no longer learn from them.
    session.forget_painted()
    assert entry.task is None
    assert [k for k, _ in session.guide(entry).support_masks] == []
    assert session.guide(other) is None


def test_class_tasks_fit_their_clicks_once_per_set_of_clicks(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = session.tasks[0]
    predictor = session.image.predictor
    calls: list[int] = []
    real_fit = predictor.fit_clicks

    def counting(points, labels):
        calls.append(len(labels))
        return real_fit(points, labels)

    monkeypatch.setattr(predictor, "fit_clicks", counting)
    task = session.guide(entry)
    pts, lab = session.task_points(entry)
    assert calls == [len(lab)]
    # The task carries the predictor's decision for these clicks (a fit, or the network).
    expected = real_fit(pts, lab)
    assert (task.pixel_fit is None) == (expected is None)
    # Guiding again with the same clicks reuses the decision; a new click makes a new one.
    session.guide(entry)
    assert calls == [len(lab)]
    entry.points.add(np.array([[12, 30, 30]]))
    session.guide(entry)
    assert calls == [len(lab), len(lab) + 1]
    # Object tasks never fit.
    obj = session.add_task("one", kind="object")
    obj.points.add(np.array([[12, 30, 30]]))
    session.guide(obj)
    assert calls == [len(lab), len(lab) + 1]


def test_the_task_list_says_whether_a_pixel_fit_counts(session: Session) -> None:
    from dataclasses import replace

    from napari_revolver._napari.tasks_box import task_text
    from napari_revolver.core.pixel_fit import PixelFit

    entry = session.tasks[0]
    task = session.guide(entry)
    fit = PixelFit(np.zeros(3), np.ones(3), np.zeros(4), 1.0, 0.0)
    entry.task = replace(task, pixel_fit=fit)
    assert "pixel fit used" in task_text(entry)
    assert "pixel fit off while following positions" in task_text(entry, local=True)
    entry.task = replace(task, pixel_fit=replace(fit, gain=0.0, net_weight=1.0))
    assert "pixel fit" not in task_text(entry)
