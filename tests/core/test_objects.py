"""Object tasks: one click, one object; followed through a stack; corrections re-anchor."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_revolver.cli import main
from napari_revolver.core.evaluate_objects import next_click, simulate_clicks
from napari_revolver.core.io import PointTable, read_image, write_points
from napari_revolver.core.model.click_refiner import Window
from napari_revolver.core.objects import (
    _kept,
    click_threshold,
    distance_to,
    obey_clicks,
    object_order,
    select_object,
    without_last_click,
)
from napari_revolver.core.predictor import RevolverPredictor
from napari_revolver.core.task import Task, load_task


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _twins(shape: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """Two look-alike discs: a probability map that cannot tell them apart, and their ids."""
    a, b = _disc(shape, 32, 18, 9), _disc(shape, 32, 44, 9)
    ids = np.zeros(shape, np.int32)
    ids[a], ids[b] = 1, 2
    return (a | b).astype(np.float32) * 0.95, ids


# ------------------------------------------------------------------ selection on a slice
def test_the_flood_seeded_beside_unmarked_pixels_is_the_whole_watershed_up_to_ties() -> None:
    from skimage.segmentation import watershed

    from napari_revolver.core import objects as O

    rng = np.random.default_rng(0)
    checked, differing = 0, 0
    for _ in range(120):
        h, w = (int(v) for v in rng.integers(24, 160, 2))
        prob = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(2, 8))
        prob = np.clip((prob - prob.mean()) / (prob.std() + 1e-9) * 0.3 + 0.5, 0, 1)
        pos = np.column_stack([rng.integers(0, h, 2), rng.integers(0, w, 2)])
        pos = pos[: int(rng.integers(1, 3))]
        neg = np.column_stack([rng.integers(0, h, 2), rng.integers(0, w, 2)])
        neg = neg[: int(rng.integers(0, 3))]
        region = O._region(prob, pos, 0.5)
        dist = ndimage.distance_transform_edt(region)
        markers = O._markers(prob, pos, neg, region, dist)
        whole = watershed(-dist, markers, mask=region | (markers == 2)) == 1
        off = int((O.flood_object(dist, markers, region) != whole).sum())
        # Seeds of equal height leave the watershed's queue in another order: a few pixels.
        assert off <= 10
        differing += off > 0
        checked += bool(whole.any())
    assert checked > 60 and differing <= 0.1 * checked  # most cases hold an object, the same


def test_distance_to_a_mask_is_that_of_its_distance_transform() -> None:
    rng = np.random.default_rng(0)
    for share in (0.0005, 0.01, 0.3):
        for _ in range(60):
            h, w = (int(v) for v in rng.integers(5, 400, 2))
            mask = rng.random((h, w)) < share
            y, x = int(rng.integers(h)), int(rng.integers(w))
            if not mask.any():
                assert distance_to(mask, (y, x)) == np.inf
                continue
            want = ndimage.distance_transform_edt(~mask)[y, x]
            assert distance_to(mask, (y, x)) == pytest.approx(want, abs=1e-9)


def test_one_click_selects_only_the_clicked_look_alike() -> None:
    prob, ids = _twins()
    mask = select_object(prob, np.array([[32.0, 18.0]]), np.array([1]))
    assert (mask == (ids == 1)).mean() > 0.99
    mask = select_object(prob, np.array([[32.0, 44.0]]), np.array([1]))
    assert (mask == (ids == 2)).mean() > 0.99


def test_a_click_beside_a_dim_spot_selects_the_whole_object() -> None:
    # One large cell with a dim spot (a nucleus, a vacuole) beside the click, next to a
    # look-alike: the distance to the edge at the click is small, but the cell is not a
    # clump of small objects.
    shape = (100, 140)
    cell, twin = _disc(shape, 50, 45, 30), _disc(shape, 50, 108, 30)
    spot = _disc(shape, 50, 33, 5)
    prob = (cell | twin).astype(np.float32) * 0.95
    prob[spot] = 0.05
    mask = select_object(prob, np.array([[50.0, 41.0]]), np.array([1]))
    truth = cell & ~spot
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95
    assert not mask[twin].any()
    # A row of touching discs is still a clump of objects, wherever the first is clicked.
    shape = (40, 80)
    discs = [_disc(shape, 20, cx, 8) for cx in (14, 29, 44, 59)]
    prob = np.any(discs, axis=0).astype(np.float32) * 0.95
    for x in (11.0, 14.0, 17.0):
        mask = select_object(prob, np.array([[20.0, x]]), np.array([1]))
        assert mask[discs[0]].mean() > 0.8
        assert not mask[discs[2] | discs[3]].any()


def test_negative_click_on_a_merged_neighbour_removes_it() -> None:
    # Two discs merged by a bridge: one region, cut apart by a negative click on the second.
    prob, ids = _twins()
    prob[30:35, 18:44] = 0.95
    merged = select_object(prob, np.array([[32.0, 18.0]]), np.array([1]))
    assert merged[ids == 2].mean() > 0.9
    cut = select_object(prob, np.array([[32.0, 18.0], [32.0, 44.0]]), np.array([1, 0]))
    assert cut[ids == 1].mean() > 0.9
    assert cut[ids == 2].mean() < 0.1


def test_positive_click_on_a_missed_part_extends_the_object() -> None:
    prob, _ = _twins()
    missed = _disc(prob.shape, 32, 30, 4) & (prob == 0)
    prob[_disc(prob.shape, 32, 29, 4)] = 0.3  # faint lobe between the discs
    base = select_object(prob, np.array([[32.0, 18.0]]), np.array([1]))
    more = select_object(prob, np.array([[32.0, 18.0], [32.0, 29.0]]), np.array([1, 1]))
    assert more.sum() > base.sum()
    assert more[missed].mean() > base[missed].mean()


def test_far_clicks_start_nothing_new() -> None:
    prob, ids = _twins()
    base = select_object(prob, np.array([[32.0, 18.0]]), np.array([1]))
    far_neg = select_object(prob, np.array([[32.0, 18.0], [5.0, 60.0]]), np.array([1, 0]))
    np.testing.assert_array_equal(base, far_neg)
    far_pos = select_object(prob, np.array([[32.0, 18.0], [32.0, 47.0]]), np.array([1, 1]))
    assert not far_pos[ids == 2].any()


def test_select_object_needs_a_positive_click() -> None:
    prob, _ = _twins()
    with pytest.raises(ValueError, match="positive click"):
        select_object(prob, np.array([[32.0, 18.0]]), np.array([0]))


def test_a_negative_click_inside_a_mask_cuts_its_side_at_the_neck() -> None:
    _, ids = _twins()
    dumbbell = ids > 0
    dumbbell[31:34, 18:44] = True  # a thin bridge between the two discs
    pts = np.array([[32.0, 18.0], [32.0, 44.0]])
    cut = obey_clicks(dumbbell, pts, np.array([1, 0]))
    assert cut[ids == 1].all()
    assert not cut[ids == 2].any()
    # A protrusion clicked negative goes; the body stays.
    body = _disc((64, 64), 32, 24, 12)
    bump = _disc((64, 64), 32, 40, 5)
    cut = obey_clicks(body | bump, np.array([[32.0, 24.0], [32.0, 41.0]]), np.array([1, 0]))
    assert cut[body].mean() > 0.97 and cut[bump & ~body].mean() < 0.2


def test_a_positive_click_on_a_near_miss_joins_it_to_the_mask() -> None:
    mask = _disc((64, 64), 32, 18, 9)
    pts = np.array([[32.0, 18.0], [32.0, 33.0]])
    grown = obey_clicks(mask, pts, np.array([1, 1]))
    assert grown[32, 33] and grown[mask].all()
    assert ndimage.label(grown)[1] == 1
    assert grown.sum() < 2 * mask.sum()
    far = np.array([[32.0, 18.0], [32.0, 60.0]])  # beyond twice the radius: nothing new
    np.testing.assert_array_equal(obey_clicks(mask, far, np.array([1, 1])), mask)
    # A negative click beside the missed one stays out, though the disc reaches over it.
    both = np.array([[32.0, 18.0], [32.0, 30.0], [32.0, 32.0]])
    grown = obey_clicks(mask, both, np.array([1, 1, 0]))
    assert grown[32, 30] and not grown[32, 32] and grown[mask].all()


def test_a_mask_that_agrees_with_its_clicks_is_left_as_it_is() -> None:
    _, ids = _twins()
    mask = ids == 1
    for pts, lab in (
        (np.array([[32.0, 18.0], [32.0, 44.0]]), np.array([1, 0])),  # negative outside
        (np.array([[32.0, 18.0], [30.0, 20.0]]), np.array([1, 1])),
        (np.array([[32.0, 44.0]]), np.array([0])),
    ):
        np.testing.assert_array_equal(obey_clicks(mask, pts, lab), mask)
    empty = np.zeros_like(mask)
    np.testing.assert_array_equal(obey_clicks(empty, np.array([[32.0, 18.0]]), [1]), empty)


# ------------------------------------------------------------------ simulated annotator
def test_annotator_clicks_the_centre_then_the_largest_error() -> None:
    truth = _disc((40, 40), 20, 20, 8)
    (y, x), label = next_click(np.zeros_like(truth), truth)
    assert (label, abs(y - 20) <= 1, abs(x - 20) <= 1) == (1, True, True)
    pred = truth | _disc((40, 40), 20, 32, 5)
    (y, x), label = next_click(pred, truth)
    assert label == 0 and x > 28
    assert next_click(truth, truth) is None


def test_annotator_scores_a_perfect_segmenter_at_one_click() -> None:
    truth = _disc((40, 40), 20, 20, 8)
    res = simulate_clicks(lambda p, lab: truth, truth)
    assert res.iou_at(1) == 1.0 and res.noc(0.9) == 1


def test_annotator_counts_the_budget_when_never_reached() -> None:
    truth = _disc((40, 40), 20, 20, 8)
    res = simulate_clicks(lambda p, lab: np.zeros_like(truth), truth, max_clicks=4)
    assert res.noc(0.85) == 4 and res.iou_at(3) == 0.0


def test_annotator_times_each_segmentation_and_the_summary_gives_the_median() -> None:
    import time

    from napari_revolver.core.evaluate_objects import summarise_clicks

    truth = _disc((40, 40), 20, 20, 8)

    def slow(p: np.ndarray, lab: np.ndarray) -> np.ndarray:
        time.sleep(0.01 * len(p))  # 10, 20, 30 ms
        return np.zeros_like(truth)

    res = simulate_clicks(slow, truth, max_clicks=3)
    assert len(res.seconds) == 3 and res.seconds[0] >= 0.01 and res.seconds[2] >= 0.03
    summary = summarise_clicks([res]).to_dict()
    assert 20 <= summary["click_ms"] < res.seconds[2] * 1e3
    # Results made without timings (older code, or built by hand) summarise without it.
    assert "click_ms" not in summarise_clicks([replace(res, seconds=())]).to_dict()


# ------------------------------------------------------------------ order through z and t
def test_order_moves_outward_through_z_before_t() -> None:
    order = object_order([(1, 2)], (3, 5))
    assert order[(1, 2)] == (0, (1, 2))
    assert order[(1, 3)][1] == (1, 2) and order[(1, 4)][1] == (1, 3)
    assert order[(0, 2)][1] == (1, 2)
    # A slice's parent is a neighbour one step nearer the anchor, through z or across t.
    assert order[(0, 0)] in ((7, (0, 1)), (7, (1, 0)))
    # Every slice of the annotated timepoint comes before any slice of another one.
    assert max(order[(1, z)][0] for z in range(5)) < min(order[(0, z)][0] for z in range(5))


def test_order_takes_the_nearest_anchor() -> None:
    order = object_order([(0,), (9,)], (10,))
    assert order[(3,)][1] == (2,) and order[(6,)][1] == (7,)


# ------------------------------------------------------------------ the predictor
def _stack(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Two look-alike discs drifting apart slice by slice; the left one ends at slice 4."""
    rng = np.random.default_rng(0)
    image = np.zeros((n, 64, 64), np.float32)
    ids = np.zeros((n, 64, 64), np.int32)
    for z in range(n):
        right = _disc((64, 64), 32, 44 + z // 2, 8)
        ids[z][right] = 2
        if z < 4:
            left = _disc((64, 64), 32, 18 - z // 2, 8)
            ids[z][left] = 1
    image[ids > 0] = 1.0
    return image + 0.05 * rng.standard_normal(image.shape).astype(np.float32), ids


@pytest.fixture
def stack_predictor(predictor: RevolverPredictor) -> tuple[RevolverPredictor, np.ndarray]:
    image, ids = _stack()
    predictor.set_volume(image)
    return predictor, ids


def _force_probability(monkeypatch: pytest.MonkeyPatch, ids: np.ndarray) -> None:
    """Make the class probability the look-alike foreground itself (a perfect class head).

    The tiny test model is untrained; the geometry (which object, where it ends) is what
    these tests check, so the probability is the one thing taken as given.
    """
    import napari_revolver.core.predictor as P

    fg = (ids > 0).astype(np.float32) * 0.95

    def proba(self, index, tasks, *, local=False, working=False):
        k = self.info.flat(index)
        n = 1 if isinstance(tasks, Task) else len(tasks)
        return np.repeat(fg[k][None], n, 0)

    def with_guidance(self, index, guidance, prior=None):
        return fg[self.info.flat(index)]

    monkeypatch.setattr(P.RevolverPredictor, "predict_proba", proba)
    monkeypatch.setattr(P.RevolverPredictor, "probability_with", with_guidance)


def test_object_task_kind_is_saved_and_old_files_read_as_class(
    stack_predictor: tuple[RevolverPredictor, np.ndarray], tmp_path: Path
) -> None:
    predictor, _ = stack_predictor
    task = predictor.guide([[0, 32, 18]], [1], kind="object")
    assert task.kind == "object"
    assert load_task(task.save(tmp_path / "o.json")).kind == "object"
    d = task.to_dict()
    del d["kind"]
    assert Task.from_dict(d).kind == "class"
    assert predictor.guide([[0, 32, 18]], [1]).kind == "class"
    with pytest.raises(ValueError, match="kind"):
        predictor.guide([[0, 32, 18]], [1], kind="thing")  # type: ignore[arg-type]


def test_object_guide_ignores_negatives_and_later_positives_for_appearance(
    stack_predictor: tuple[RevolverPredictor, np.ndarray],
) -> None:
    predictor, _ = stack_predictor
    one = predictor.guide([[0, 32, 18]], [1], kind="object")
    more = predictor.guide([[0, 32, 18], [0, 32, 44], [0, 30, 20]], [1, 0, 1], kind="object")
    np.testing.assert_array_equal(one.sum_coarse, more.sum_coarse)
    cls = predictor.guide([[0, 32, 18], [0, 32, 44]], [1, 0])
    assert cls.mass[1] > 0 and more.mass[1] == 0


def test_clicked_object_is_one_of_two_look_alikes(
    stack_predictor: tuple[RevolverPredictor, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor, ids = stack_predictor
    _force_probability(monkeypatch, ids)
    task = predictor.guide([[0, 32, 44]], [1], kind="object")
    mask = predictor.predict_slice(0, task)
    assert (mask == (ids[0] == 2)).mean() > 0.99


def test_ids_stay_stable_through_the_stack_and_the_end_is_reported(
    stack_predictor: tuple[RevolverPredictor, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor, ids = stack_predictor
    _force_probability(monkeypatch, ids)
    left = predictor.guide([[0, 32, 18]], [1], kind="object", name="left", label_value=1)
    right = predictor.guide([[0, 32, 44]], [1], kind="object", name="right", label_value=2)
    out = np.zeros(ids.shape, np.uint32)
    events = []
    for step in predictor.propagate([left, right]):
        out[step.index] = step.result
        events += step.events
    for z in range(ids.shape[0]):
        for v in (1, 2):
            truth = ids[z] == v
            if truth.any():
                assert (out[z] == v)[truth].mean() > 0.9, (z, v)
                assert not (out[z] == v)[ids[z] == 3 - v].any(), (z, v)
    # The left object ends at slice 4 and never jumps onto its look-alike neighbour.
    assert not (out[4:] == 1).any()
    assert [(e.task, e.index) for e in events] == [("left", (4,))]


def test_a_click_on_another_slice_re_anchors_the_object(
    stack_predictor: tuple[RevolverPredictor, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor, ids = stack_predictor
    _force_probability(monkeypatch, ids)
    # Clicked on the left disc at slice 0, then corrected on slice 5 onto the right disc:
    # slices near 5 follow the correction.
    task = predictor.guide([[0, 32, 18], [5, 32, 46]], [1, 1], kind="object")
    out = predictor.segment(task)
    assert (out[5] > 0)[ids[5] == 2].mean() > 0.9
    assert (out[4] > 0)[ids[4] == 2].mean() > 0.9
    assert (out[0] > 0)[ids[0] == 1].mean() > 0.9
    assert predictor.predict_slice(4, task)[ids[4] == 2].mean() > 0.9


def test_a_painted_mask_anchors_the_object_like_a_click(
    stack_predictor: tuple[RevolverPredictor, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    predictor, ids = stack_predictor
    _force_probability(monkeypatch, ids)
    # Clicked on the left disc at slice 0; on slice 5 the user painted the right disc (half
    # of it) as this object: that mask is kept there and slices near it follow it.
    painted = (ids[5] == 2) & (np.arange(64)[None, :] < 48)
    task = predictor.guide([[0, 32, 18]], [1], kind="object")
    task = replace(task, object_masks=(((5,), painted),))
    out = predictor.segment(task)
    np.testing.assert_array_equal(out[5] > 0, painted)
    assert (out[4] > 0)[ids[4] == 2].mean() > 0.5 and not (out[4] > 0)[ids[4] == 1].any()
    assert (out[0] > 0)[ids[0] == 1].mean() > 0.9
    # A painted mask alone is an anchor too; a wrong shape is refused with both shapes.
    only = replace(
        predictor.guide([[0, 32, 18]], [1], kind="object"),
        points=np.zeros((0, 3)),
        labels=np.zeros(0, np.int8),
        object_masks=(((5,), painted),),
    )
    assert (predictor.segment(only)[5] > 0).sum() == painted.sum()
    wrong = replace(task, object_masks=(((5,), painted[:10]),))
    with pytest.raises(ValueError, match=r"\(10, 64\).*\(64, 64\)"):
        predictor.segment(wrong)
    with pytest.raises(ValueError, match="for object tasks"):
        replace(predictor.guide([[0, 32, 18]], [1]), object_masks=(((5,), painted),))


def test_objects_and_classes_do_not_mix(
    stack_predictor: tuple[RevolverPredictor, np.ndarray],
) -> None:
    predictor, _ = stack_predictor
    obj = predictor.guide([[0, 32, 18]], [1], kind="object")
    cls = predictor.guide([[0, 32, 18]], [1])
    with pytest.raises(ValueError, match="mix"):
        list(predictor.propagate([obj, cls]))
    with pytest.raises(ValueError, match="labels"):
        list(predictor.propagate(obj, output="masks"))


def test_objects_share_one_encoder_pass_per_slice(
    stack_predictor: tuple[RevolverPredictor, np.ndarray],
    count_encoder_calls,
) -> None:
    predictor, _ = stack_predictor
    calls = count_encoder_calls(predictor)
    tasks = [
        predictor.guide([[0, 32, 18]], [1], kind="object", label_value=1),
        predictor.guide([[0, 32, 44]], [1], kind="object", label_value=2),
    ]
    for _ in predictor.propagate(tasks):
        pass
    assert sum(calls) == predictor.info.n_slices


def test_objects_clicked_together_get_the_masks_they_get_alone(
    stack_predictor: tuple[RevolverPredictor, np.ndarray],
) -> None:
    from napari_revolver.core.predictor import OBJECT_HEAD_BATCH

    predictor, _ = stack_predictor
    clicks = [(32, 18), (32, 44), (30, 20), (34, 46), (10, 10), (32, 40)]
    assert len(clicks) % OBJECT_HEAD_BATCH  # a last, partial head batch
    tasks = [
        predictor.guide([[0, *c]], [1], kind="object", label_value=i + 1)
        for i, c in enumerate(clicks)
    ]
    together = predictor.object_masks(0, tasks)
    predictor.forget_object_masks()  # each one computed again, alone
    for t, m in zip(tasks, together, strict=True):
        np.testing.assert_array_equal(m, predictor.object_mask(0, t))


def test_a_negative_click_far_from_the_object_changes_nothing(
    predictor: RevolverPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from napari_revolver.core.model.click_refiner import ClickRefiner, RefinerConfig

    ids = np.zeros((3, 160, 160), np.int32)
    ids[:, _disc((160, 160), 40, 40, 10)] = 1
    ids[:, _disc((160, 160), 120, 110, 10)] = 2
    rng = np.random.default_rng(0)
    predictor.set_volume((ids > 0) + 0.05 * rng.standard_normal(ids.shape).astype(np.float32))
    _force_probability(monkeypatch, ids)
    refiner = ClickRefiner(
        RefinerConfig(feature_channels=predictor.model.config.feature_fine_channels)
    )
    with torch.no_grad():
        refiner.out.bias.fill_(20.0)  # draws its whole window: the window is what it saw
    predictor.refiner = refiner  # no redraws (config.regrow 0): the first window is the test

    def mask(points: list, labels: list) -> np.ndarray:
        return predictor.predict_slice(1, predictor.guide(points, labels, kind="object"))

    one = mask([[1, 40, 40]], [1])
    assert one[ids[1] == 1].all() and one.sum() < 0.2 * one.size
    for far in ([1, 150, 150], [1, 120, 110]):  # on the background, on a look-alike
        np.testing.assert_array_equal(mask([[1, 40, 40], far], [1, 0]), one)
    near = mask([[1, 40, 40], [1, 40, 47]], [1, 0])  # inside the object: it counts
    assert not near[40, 47] and near[40, 40]


def _count_head_passes(predictor: RevolverPredictor, monkeypatch: pytest.MonkeyPatch) -> list:
    passes: list[int] = []
    segment = predictor.model.segment

    def spy(*args, **kwargs):
        passes.append(1)
        return segment(*args, **kwargs)

    monkeypatch.setattr(predictor.model, "segment", spy)
    return passes


def test_clicked_masks_are_kept_for_the_same_clicks_only(
    stack_predictor: tuple[RevolverPredictor, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor, _ = stack_predictor
    passes = _count_head_passes(predictor, monkeypatch)
    task = predictor.guide([[0, 32, 18]], [1], kind="object")
    first = predictor.object_mask(0, task)
    assert passes and first.any()
    n = len(passes)
    # The same click guided again (another Task): the mask it got, without a head pass.
    again = predictor.object_mask(0, predictor.guide([[0, 32, 18]], [1], kind="object"))
    np.testing.assert_array_equal(again, first)
    assert len(passes) == n
    again[:] = ~again  # a copy: what is kept does not change
    np.testing.assert_array_equal(predictor.object_mask(0, task), first)
    # A negative click, another threshold: computed again from the kept probability (a
    # negative click changes neither the object's guide nor its local prior), with the
    # masks that a computation from scratch gives.
    negative = predictor.guide([[0, 32, 18], [0, 32, 44]], [1, 0], kind="object")
    calls = (
        lambda: predictor.object_mask(0, negative),
        lambda: predictor.object_mask(0, task, threshold=0.4),
    )
    before = len(passes)
    reused = [call() for call in calls]
    assert len(passes) == before
    predictor.forget_object_masks()
    for call, got in zip(calls, reused, strict=True):
        before = len(passes)
        np.testing.assert_array_equal(call(), got)
        assert len(passes) > before
        predictor.forget_object_masks()
    # A positive click (a new local prior), another slice: a head pass.
    for call in (
        lambda: predictor.object_mask(
            0, predictor.guide([[0, 32, 18], [0, 34, 20]], [1, 1], kind="object")
        ),
        lambda: predictor.object_mask(1, predictor.guide([[1, 32, 18]], [1], kind="object")),
    ):
        before = len(passes)
        call()
        assert len(passes) > before
    predictor.refiner = predictor.refiner  # setting a refiner forgets every mask
    before = len(passes)
    np.testing.assert_array_equal(predictor.object_mask(0, task), first)
    assert len(passes) > before
    # The same clicks on another volume of the same shape: computed there.
    image, _ = _stack()
    predictor.set_volume(image[:, ::-1].copy())
    before = len(passes)
    predictor.object_mask(0, predictor.guide([[0, 32, 18]], [1], kind="object"))
    assert len(passes) > before


def test_without_last_click_drops_the_last_click_on_that_slice_only(
    stack_predictor: tuple[RevolverPredictor, np.ndarray],
) -> None:
    predictor, _ = stack_predictor
    pts = [[0, 32, 18], [1, 32, 18], [0, 30, 20], [0, 32, 44], [1, 33, 18]]
    task = predictor.guide(pts, [1, 1, 1, 0, 1], kind="object")
    before = without_last_click(task, (0,), predictor.info)
    assert before is not None
    np.testing.assert_array_equal(before.points, np.asarray(pts, float)[[0, 1, 2, 4]])
    np.testing.assert_array_equal(before.labels, [1, 1, 1, 1])
    np.testing.assert_array_equal(before.sum_fine, task.sum_fine)  # the same guidance
    again = without_last_click(before, (0,), predictor.info)
    assert again is not None and len(again.points) == 3
    # One click on the slice, or only negatives left: no mask before the last click.
    assert without_last_click(again, (0,), predictor.info) is None
    assert without_last_click(task, (2,), predictor.info) is None
    neg_first = predictor.guide([[0, 32, 44], [0, 32, 18]], [0, 1], kind="object")
    assert without_last_click(neg_first, (0,), predictor.info) is None


def test_a_refiner_reading_the_previous_mask_redraws_the_mask_shown_before_the_click(
    stack_predictor: tuple[RevolverPredictor, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from napari_revolver.core import objects as O
    from napari_revolver.core.model.click_refiner import ClickRefiner, RefinerConfig

    predictor, ids = stack_predictor
    _force_probability(monkeypatch, ids)

    def refiner(previous: bool) -> ClickRefiner:
        channels = predictor.model.config.feature_fine_channels
        r = ClickRefiner(RefinerConfig(feature_channels=channels, previous_mask=previous))
        with torch.no_grad():
            r.out.bias.fill_(20.0)  # draws its whole window: what it read decides the mask
        return r

    predictor.refiner = refiner(False)
    read: list[np.ndarray] = []
    refined = O.refined_masks

    def spy(refiner, image, fine, stride, selections, **kw):
        def record():
            for prob, sel, pts, lab in selections:
                read.append(np.asarray(sel, bool).copy())
                yield prob, sel, pts, lab

        return refined(refiner, image, fine, stride, record(), **kw)

    monkeypatch.setattr(O, "refined_masks", spy)
    pts, lab = [[0, 32, 18], [0, 32, 27], [0, 25, 18]], [1, 0, 1]
    shown = [
        predictor.object_mask(0, predictor.guide(pts[:n], lab[:n], kind="object"))
        for n in (1, 2, 3)
    ]
    # A refiner of the older kind reads the selection at every click.
    assert len(read) == 3 and not np.array_equal(read[2], shown[1])
    predictor.refiner = refiner(True)
    selections = list(read)
    read.clear()
    after = [
        predictor.object_mask(0, predictor.guide(pts[:n], lab[:n], kind="object"))
        for n in (1, 2, 3)
    ]
    # Click by click: the first reads the selection, each correction the mask shown before it.
    assert len(read) >= 3
    np.testing.assert_array_equal(read[0], selections[0])
    np.testing.assert_array_equal(after[0], shown[0])
    np.testing.assert_array_equal(read[1], after[0])
    np.testing.assert_array_equal(read[2], after[1])
    # The mask depends on the clicks and their order only: asked cold, the masks before the
    # last click are computed the same way.
    predictor.forget_object_masks()
    read.clear()
    cold = predictor.object_mask(0, predictor.guide(pts, lab, kind="object"))
    np.testing.assert_array_equal(cold, after[2])
    assert len(read) == 3


def test_corrections_are_drawn_by_the_corrections_refiner(
    stack_predictor: tuple[RevolverPredictor, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from napari_revolver.core import objects as O
    from napari_revolver.core.model.click_refiner import ClickRefiner, RefinerConfig

    predictor, ids = stack_predictor
    _force_probability(monkeypatch, ids)
    channels = predictor.model.config.feature_fine_channels
    first = ClickRefiner(RefinerConfig(feature_channels=channels, previous_mask=True))
    # The corrector sees a wider window and draws all of it: its masks are its own.
    corrector = ClickRefiner(
        RefinerConfig(feature_channels=channels, previous_mask=True, context=2.4)
    )
    with torch.no_grad():
        corrector.out.bias.fill_(20.0)
    predictor.refiner = first
    predictor.corrector = corrector
    calls: list[tuple[ClickRefiner, int]] = []
    refined = O.refined_masks

    def spy(refiner, image, fine, stride, selections, **kw):
        items = list(selections)
        calls.append((refiner, len(items)))
        return refined(refiner, image, fine, stride, items, **kw)

    monkeypatch.setattr(O, "refined_masks", spy)
    pts, lab = [[0, 32, 18], [0, 25, 18]], [1, 1]
    one = predictor.object_mask(0, predictor.guide(pts[:1], lab[:1], kind="object"))
    assert calls == [(first, 1)]
    two = predictor.object_mask(0, predictor.guide(pts, lab, kind="object"))
    assert calls[1:] == [(corrector, 1)]
    assert two.sum() > one.sum()  # the corrector's whole window
    # Objects at their first click and at a correction, asked together: each by its own
    # refiner, in one pass each, with the masks they get alone.
    predictor.forget_object_masks()
    calls.clear()
    tasks = [
        predictor.guide(pts, lab, kind="object", label_value=1),
        predictor.guide([[0, 32, 45]], [1], kind="object", label_value=2),
    ]
    both = predictor.object_masks(0, tasks)
    np.testing.assert_array_equal(both[0], two)
    assert [(r, n) for r, n in calls if r is first][-1] == (first, 1)
    assert calls[-1] == (corrector, 1)
    alone = predictor.object_mask(0, tasks[1])
    np.testing.assert_array_equal(both[1], alone)
    # Setting a corrections refiner forgets the masks drawn before; without one, the click
    # refiner draws corrections as well.
    predictor.corrector = None
    calls.clear()
    again = predictor.object_mask(0, tasks[0])
    assert {r for r, _ in calls} == {first}
    assert not np.array_equal(again, two)


def test_kept_clicked_masks_stay_within_their_memory(
    stack_predictor: tuple[RevolverPredictor, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_revolver.core.predictor as P

    predictor, _ = stack_predictor
    monkeypatch.setattr(P, "OBJECT_MASKS_KEPT_BYTES", 1)  # the latest mask only
    monkeypatch.setattr(P, "OBJECT_PROBS_KEPT_BYTES", 1)  # and the latest probability
    passes = _count_head_passes(predictor, monkeypatch)
    a = predictor.guide([[0, 32, 18]], [1], kind="object")
    b = predictor.guide([[0, 32, 44]], [1], kind="object")
    predictor.object_mask(0, a)
    predictor.object_mask(0, b)
    before = len(passes)
    predictor.object_mask(0, b)
    assert len(passes) == before
    predictor.object_mask(0, a)
    assert len(passes) > before


def test_select_in_box_is_select_object_whatever_lies_outside_the_box() -> None:
    from napari_revolver.core.objects import select_in_box

    shape = (192, 256)
    prob = np.zeros(shape, np.float32)
    prob[_disc(shape, 45, 50, 8)] = 0.9
    prob[_disc(shape, 45, 68, 8)] = 0.9  # a touching look-alike
    prob[20:26, 60:256] = 0.9  # a bar leaving the box
    prob[_disc(shape, 8, 20, 6)] = 0.9  # at the slice's top edge
    box = (0, 120, 0, 150)
    noisy = np.random.default_rng(0).random(shape).astype(np.float32)
    y0, y1, x0, x1 = box
    noisy[y0:y1, x0:x1] = prob[y0:y1, x0:x1]  # exact in the box only
    pts, lab = np.array([[45.0, 50.0], [45.0, 68.0]]), np.array([1, 0])
    for points, labels in ((pts, lab), (pts[:1], lab[:1]), (np.array([[8.0, 20.0]]), [1])):
        found = select_in_box(noisy[y0:y1, x0:x1], box, shape, points, labels)
        assert found is not None
        np.testing.assert_array_equal(found[0], select_object(prob, points, labels))
    assert select_object(prob, pts[:1], [1]).any()
    # The bar reaches the box's right side, which is not the slice's edge: unknown.
    assert select_in_box(noisy[y0:y1, x0:x1], box, shape, [[22.0, 80.0]], [1]) is None
    # A positive click outside the box: unknown.
    assert select_in_box(noisy[y0:y1, x0:x1], box, shape, [[130.0, 50.0]], [1]) is None


def test_a_selection_bounded_near_its_clicks_in_a_long_clump(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from napari_revolver.core import objects as O

    shape = (120, 420)
    chain = np.zeros(shape, bool)
    for cx in range(20, 400, 16):  # touching look-alike discs: one probable clump
        chain |= _disc(shape, 60, cx, 10)
    prob = chain.astype(np.float32) * 0.95
    click = np.array([[60.0, 212.0]])
    seen: list[tuple[int, int]] = []
    select = O._select

    def spy(p: np.ndarray, *args: object) -> np.ndarray:
        seen.append(p.shape)
        return select(p, *args)

    monkeypatch.setattr(O, "_select", spy)
    whole = select_object(prob, click, [1])
    assert 0 < whole.sum() < 0.2 * chain.sum()  # one disc of the clump
    bounded = O.select_in_box(prob, (0, shape[0], 0, shape[1]), shape, click, [1], bound=40)
    assert bounded is not None and seen[-1][1] == 81  # only the clicks' box grown by 40
    np.testing.assert_array_equal(bounded[0], whole)
    # Objects larger than the bound reach its sides: the whole slice decides.
    big = np.zeros(shape, bool)
    for cx in range(12, 420, 66):
        big |= _disc(shape, 60, cx, 40)
    big_prob = big.astype(np.float32) * 0.95
    click = np.array([[60.0, 210.0]])
    bounded = O.select_in_box(big_prob, (0, shape[0], 0, shape[1]), shape, click, [1], bound=20)
    assert bounded is not None and seen[-2][1] == 41 and seen[-1] == shape  # tried, then whole
    np.testing.assert_array_equal(bounded[0], select_object(big_prob, click, [1]))


@pytest.mark.parametrize(
    ("grows", "previous", "corrector"),
    [(False, False, False), (True, False, False), (False, True, False), (False, True, True)],
)
def test_object_clicks_on_windows_get_the_masks_of_the_whole_slice(
    monkeypatch: pytest.MonkeyPatch, grows: bool, previous: bool, corrector: bool
) -> None:
    """The clicked slice's head runs in windows around the clicks, exactly.

    ``grows``: a refiner that draws its whole window, so every mask reaches its window's edge
    and is redrawn in larger windows, beyond the box its probability is exact in.
    ``corrector``: corrections drawn by another refiner, with a wider view.
    """
    import copy
    import dataclasses

    import torch

    import napari_revolver.core.predictor as P
    from napari_revolver.core.synthetic import sample_stack

    image, labels, _, _ = sample_stack(seed=3, shape=(2, 512, 512))
    predictor = RevolverPredictor(device="cpu")  # the shipped weights: local objects
    predictor.set_volume(image)
    if grows:
        predictor.refiner = copy.deepcopy(predictor.refiner)
        predictor.refiner.config = dataclasses.replace(predictor.refiner.config, regrow=4)
        with torch.no_grad():
            predictor.refiner.out.bias.add_(20.0)
    if previous:  # corrections redraw the mask before them, wherever it reaches
        predictor.refiner = copy.deepcopy(predictor.refiner)
        predictor.refiner.config = dataclasses.replace(predictor.refiner.config, previous_mask=True)
    predictor.corrector = None
    if corrector:
        predictor.corrector = copy.deepcopy(predictor.refiner)
        predictor.corrector.config = dataclasses.replace(predictor.refiner.config, context=2.2)
    ids, n = ndimage.label(labels[0] > 0)
    sizes = ndimage.sum(np.ones_like(ids), ids, range(1, n + 1))
    order = np.argsort(sizes)  # the smallest objects and the largest, which needs more
    picks = [*order[:5], *order[-2:]]
    tasks = []
    for i, lab in enumerate(picks):
        yx = ndimage.center_of_mass(ids == lab + 1)
        pts, lab = [[0, *yx]], [1]
        if previous:  # a second, corrective click beside the first
            pts, lab = [*pts, [0, min(yx[0] + 3, 511), min(yx[1] + 3, 511)]], [1, 1 - i % 2]
        tasks.append(predictor.guide(pts, lab, kind="object", label_value=i + 1))
    sides = []
    segment = predictor.model.segment

    def spy(features, *args, **kwargs):
        sides.append(features.coarse.shape[-1])
        return segment(features, *args, **kwargs)

    monkeypatch.setattr(predictor.model, "segment", spy)
    monkeypatch.setattr(P, "OBJECT_REACH", 16)
    windowed = predictor.object_masks(0, tasks)
    assert min(sides) < 64  # windows were used, on a 64-cell-wide slice
    # Objects whose probable parts reach beyond their windows are selected within
    # SELECT_BOUND of their clicks, in their windows: no pass on the whole slice (without the
    # bound, 4 here), also with the masks before a correction. A refiner that draws its whole
    # window redraws beyond every box, and reads the whole slice.
    assert (sides.count(64) > 0) == grows
    # Inside its box, a window's probability is the whole slice's (to float rounding).
    clicks = [(t.points[:, 1:], t.labels) for t in tasks]
    near = predictor._object_probabilities(0, tasks, clicks, 16)
    for (prob, (y0, y1, x0, x1)), full in zip(near, predictor.predict_proba(0, tasks), strict=True):
        assert (y1 - y0) * (x1 - x0) < prob.size / 4
        np.testing.assert_allclose(prob[y0:y1, x0:x1], full[y0:y1, x0:x1], atol=2e-6)
    monkeypatch.setattr(P, "OBJECT_WINDOW_SHARE", 0.0)
    sides.clear()
    predictor.forget_object_masks()  # computed again, not read back
    whole = predictor.object_masks(0, tasks)
    assert set(sides) == {64}
    assert all(m.any() for m in whole)
    for a, b in zip(windowed, whole, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ command line
def test_cli_segment_objects_writes_ids_in_csv_order(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tifffile

    image, _ = _stack()
    tifffile.imwrite(tmp_path / "image.tif", image, imagej=True, metadata={"axes": "ZYX"})
    coords = np.array([[0, 32, 44], [0, 32, 18], [0, 10, 10]], float)
    write_points(
        tmp_path / "p.csv",
        PointTable(coords, np.array([1, 1, 0]), ("right", "left", "right")),
    )
    out = tmp_path / "objects.tif"
    rc = main(
        [
            "segment",
            str(tmp_path / "image.tif"),
            "--points",
            str(tmp_path / "p.csv"),
            "--objects",
            "--threshold",
            "0.0",
            "-o",
            str(out),
            "--weights",
            str(tiny_weights),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "object 1: task 'right'" in printed and "object 2: task 'left'" in printed
    labels = read_image(out).data
    assert labels.shape == image.shape
    assert set(np.unique(labels)) <= {0, 1, 2}
    rc = main(
        [
            "segment",
            str(tmp_path / "image.tif"),
            "--points",
            str(tmp_path / "p.csv"),
            "--objects",
            "--instances",
            "-o",
            str(tmp_path / "x.tif"),
            "--weights",
            str(tiny_weights),
        ]
    )
    assert rc == 1
    assert "--objects" in capsys.readouterr().err


def test_cli_eval_objects_reports_clicks_and_following(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import tifffile

    image, ids = _stack(4)
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", ids.astype(np.uint16))
    rc = main(
        [
            "eval",
            str(tmp_path / "image.tif"),
            str(tmp_path / "labels.tif"),
            "--objects",
            "--max-clicks",
            "3",
            "--follow",
            "2",
            "--json",
            "--weights",
            str(tiny_weights),
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["clicks"]["n_objects"] == 8
    assert 1 <= res["clicks"]["noc@90"] <= 3
    assert res["follow"]["n_objects"] == 2
    assert 0.0 <= res["follow"]["iou_mean"] <= 1.0


def _whole_slice_watershed(prob: np.ndarray, prevs: list[np.ndarray]) -> list:
    """The joint following watershed on the whole slice, written plainly (the reference)."""
    from skimage.segmentation import watershed

    from napari_revolver.core.objects import BACKGROUND, CORE, FollowParams
    from napari_revolver.core.snap import bounding_box

    region = prob > 0.5
    markers = np.zeros(prob.shape, np.int32)
    markers[prob < BACKGROUND] = 1
    for i, m in enumerate(prevs, start=2):
        r = float(ndimage.distance_transform_edt(m[bounding_box(m, 1)]).max())
        core = ndimage.binary_erosion(m, iterations=max(1, int(FollowParams.erosion * r)))
        markers[(core if core.any() else m) & region] = i
    cores, n = ndimage.label(prob > CORE)
    others = np.setdiff1d(np.arange(1, n + 1), np.unique(cores[markers > 1]))
    sel = np.isin(cores, others)
    markers[sel] = cores[sel] + len(prevs) + 2
    basins = watershed(
        -ndimage.distance_transform_edt(region), markers, mask=region | (markers == 1)
    )
    out = []
    for i in range(2, len(prevs) + 2):
        seeds = np.argwhere(markers == i)
        if not len(seeds):
            out.append(None)
            continue
        comps, _ = ndimage.label(basins == i)
        out.append(comps == comps[tuple(seeds[0])])
    return out


def test_following_watershed_in_its_window_is_that_of_the_whole_slice() -> None:
    from napari_revolver.core.objects import FollowParams, _Track, _watershed_masks

    task = Task("o", *(np.zeros((2, 4), np.float32),) * 2, np.ones(2, np.float32),
                np.zeros((1, 3)), np.ones(1, np.int8), "m", "w")  # fmt: skip
    rng = np.random.default_rng(0)
    differing = total = 0
    for _ in range(60):
        h, w = rng.integers(40, 160, 2)
        prob = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(1.5, 5))
        prob = np.clip((prob - prob.min()) / np.ptp(prob) * rng.uniform(0.8, 1.5), 0, 1)
        prevs = [
            _disc((h, w), rng.integers(0, h), rng.integers(0, w), rng.integers(2, 15))
            for _ in range(rng.integers(1, 6))
        ]
        tracks = [_Track(task, {(1,): (1, (0,))}, {(0,): m}, {}) for m in prevs]
        got = _watershed_masks(prob.astype(np.float32), (1,), tracks, 0.5, FollowParams())
        for a, b in zip(got, _whole_slice_watershed(prob.astype(np.float32), prevs), strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                differing += int((a ^ b).sum())
                total += int((a | b).sum())
    # The same, up to the order in which the watershed breaks ties on a plateau.
    assert total > 0 and differing <= 0.002 * total
    # Two objects in one probable bar that fills its box: split where the whole slice does.
    prob = np.zeros((40, 80), np.float32)
    prob[10:22, 5:70] = 0.9
    prevs = [np.zeros((40, 80), bool), np.zeros((40, 80), bool)]
    prevs[0][12:20, 8:20] = prevs[1][12:20, 40:66] = True
    tracks = [_Track(task, {(1,): (1, (0,))}, {(0,): m}, {}) for m in prevs]
    got = _watershed_masks(prob, (1,), tracks, 0.5, FollowParams())
    for a, b in zip(got, _whole_slice_watershed(prob, prevs), strict=True):
        np.testing.assert_array_equal(a, b)


def test_follow_step_keeps_the_basin_and_reach_bounds_a_leak() -> None:
    """A probable region that spreads far from the previous mask: without ``reach`` the object
    takes the connected basin (as ever); with it, no further than the dilated previous mask."""
    from napari_revolver.core.objects import FollowParams, _Track, _watershed_masks

    prob = np.zeros((64, 64), np.float32)
    prob[20:30, 20:30] = 0.9  # where the object was
    prob[24:27, 30:60] = 0.9  # and a long thin leak to the right
    prev = np.zeros((64, 64), bool)
    prev[20:30, 20:30] = True
    task = Task(
        "obj",
        np.zeros((2, 4), np.float32),
        np.zeros((2, 4), np.float32),
        np.ones(2, np.float32),
        np.zeros((1, 3)),
        np.ones(1, np.int8),
        "m",
        "w",
    )

    def step(params: FollowParams) -> np.ndarray:
        track = _Track(task, {(1,): (1, (0,))}, {(0,): prev}, {})
        (new,) = _watershed_masks(prob, (1,), [track], 0.5, params)
        assert new is not None
        return new

    free = step(FollowParams())
    assert free[25, 58] and free[20:30, 20:30].all()
    bound = step(FollowParams(reach=0.3))
    assert bound[20:30, 20:30].all() and not bound[25, 40:].any()


def _cone(size: int = 60) -> np.ndarray:
    """Logits falling from 5 at the centre by 0.2 a pixel: the object at 0 is a disc of r 25."""
    yy, xx = np.mgrid[0:size, 0:size]
    return (5 - 0.2 * np.hypot(yy - size // 2, xx - size // 2)).astype(np.float32)


def test_a_negative_click_on_the_rim_draws_the_edge_inside_it() -> None:
    logits = _cone()
    window = Window(0.0, 0.0, 60.0)  # the window is the slice, pixel for pixel
    pts, lab = np.array([[30.0, 30.0], [30.0, 45.0]]), np.array([1, 0])
    mask = _kept(torch.from_numpy(logits), window, np.zeros((60, 60), bool), pts, lab)
    assert mask[30, 30] and not mask[30, 45]  # the rim beyond the click goes, not the object
    assert mask[30, 43] and mask[43, 30] and not mask[30 + 14, 30]  # a disc of r 13.75 remains
    # The threshold nearest 0 with the clicks 0.25 inside their sides: 2.0 + 0.25.
    assert click_threshold(logits, np.array([[30, 30]]), np.array([[30, 45]])) == pytest.approx(
        2.25
    )


def test_a_positive_click_on_a_missed_rim_lowers_the_edge_past_it() -> None:
    logits = _cone()
    pos = np.array([[30, 30], [30, 57]])  # the second at logit -0.4: outside the disc
    assert click_threshold(logits, pos, np.zeros((0, 2), int)) == pytest.approx(-0.65)
    mask = _kept(
        torch.from_numpy(logits), Window(0.0, 0.0, 60.0), np.zeros((60, 60), bool),
        pos.astype(float), np.array([1, 1]),
    )  # fmt: skip
    assert mask[30, 57] and mask[30, 2]


def test_clicks_no_threshold_can_satisfy_leave_the_edge_at_zero() -> None:
    logits = _cone()
    # The negative click more probable than the positive one: a neighbour, not a rim.
    assert click_threshold(logits, np.array([[30, 50]]), np.array([[30, 31]])) == 0.0
    assert click_threshold(logits, np.zeros((0, 2), int), np.array([[30, 31]])) == 0.0
