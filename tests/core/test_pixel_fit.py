"""The per-task pixel fit: when the support says it helps, and how predictions use it."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_revolver.core import pixel_fit as pf
from napari_revolver.core.pixel_fit import PixelFit, fit_features, validated_fit
from napari_revolver.core.prior import label_support
from napari_revolver.core.task import Task


def _support(predictor, image: np.ndarray, fg: np.ndarray, k: int = 0):
    predictor.set_volume(image)
    f = predictor.features(k)
    grid = tuple(f.fine.shape[-2:])
    masks = label_support(np.where(fg[k], 1, 2), grid, predictor.model.fine_stride)
    return fit_features(f, predictor._prepare(k)[None])[0], masks


def _fixed_network(masks: torch.Tensor, value: float | None):
    """A stand-in for the network: ``value`` everywhere, or the truth (+-8) when ``None``."""
    truth = torch.where(masks[0] > masks[1], 8.0, -8.0)

    def logits(fold: list[torch.Tensor]) -> list[torch.Tensor]:
        assert len(fold) == 1 and fold[0].shape == masks.shape
        return [truth if value is None else torch.full_like(truth, value)]

    return logits


@pytest.fixture
def blobs(make_blobs):
    image = make_blobs((2, 128, 128), n_blobs=6)
    return image, image > 0.5


def test_the_network_is_kept_where_it_is_right(predictor, blobs) -> None:
    x, masks = _support(predictor, *blobs)
    fit = validated_fit([x], [masks], _fixed_network(masks, None))
    assert fit is not None and not fit.active
    assert fit.scores["net"] == pytest.approx(1.0)


def test_the_fit_takes_over_where_the_network_fails(predictor, blobs) -> None:
    x, masks = _support(predictor, *blobs)
    fit = validated_fit([x], [masks], _fixed_network(masks, -3.0))
    assert fit is not None and fit.active
    assert fit.scores["net"] == 0.0
    best = max(fit.scores.values())
    assert best > 0.7
    # The fit alone separates the blobs on the slice it was fitted to.
    z = fit.logits(x[None])[0].numpy()
    labelled = masks.sum(0).numpy() > 0.5
    truth = (masks[0] > masks[1]).numpy()
    assert np.mean((z > 0)[labelled] == truth[labelled]) > 0.9


def test_too_little_support_gives_no_fit(predictor, blobs) -> None:
    x, masks = _support(predictor, *blobs)
    sparse = masks.clone()
    sparse[:, 1:] = 0.0  # one row of annotation: fewer cells than MIN_CELLS per class
    assert int((sparse[0] > 0.5).sum()) < pf.MIN_CELLS
    assert validated_fit([x], [sparse], _fixed_network(sparse, -3.0)) is None


def test_logistic_warm_start_reaches_the_same_model(rng) -> None:
    x = np.c_[rng.normal(size=(300, 4)), np.ones(300)]
    y = (x[:, 0] + x[:, 2] > 0).astype(float)
    w = np.ones(300)
    cold = pf.logistic(x, y, w, 1.0)
    warm = pf.logistic(x, y, w, 1.0, start=cold + 0.3)
    np.testing.assert_allclose(warm, cold, atol=1e-3)


def test_pixel_fit_checks_shapes_and_channels() -> None:
    with pytest.raises(ValueError, match=r"coef \(D \+ 1,\)"):
        PixelFit(np.zeros(3), np.ones(3), np.zeros(3), 1.0)
    fit = PixelFit(np.zeros(3), np.ones(3), np.array([1.0, 0.0, 0.0, -0.5]), 2.0)
    with pytest.raises(ValueError, match="3 feature channels"):
        fit.logits(torch.zeros(1, 4, 2, 2))
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0, 0, 0] = 2.0
    np.testing.assert_allclose(fit.logits(x)[0].numpy(), [[1.5, -0.5], [-0.5, -0.5]])
    assert PixelFit.from_dict(fit.to_dict()).to_dict() == fit.to_dict()


def test_smoothing_keeps_constants_and_spreads_an_impulse_evenly() -> None:
    flat = torch.full((2, 9, 11), 3.0)
    torch.testing.assert_close(pf.smooth_cells(flat, 1.5), flat)
    assert pf.smooth_cells(flat, 0.0) is flat
    impulse = torch.zeros(1, 21, 21)
    impulse[0, 10, 10] = 1.0
    out = pf.smooth_cells(impulse, 2.0)[0]
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(out, out.flip(0))
    torch.testing.assert_close(out, out.T)
    assert float(out[10, 10]) == pytest.approx(1 / (2 * np.pi * 4), rel=0.05)
    # Smoothing and the shift act on the fit's logit, and survive a task file.
    fit = PixelFit(np.zeros(1), np.ones(1), np.array([1.0, 0.0]), 1.0, bias=-0.5, smooth=2.0)
    torch.testing.assert_close(fit.logits(impulse[:, None])[0], out - 0.5)
    assert PixelFit.from_dict(fit.to_dict()).to_dict() == fit.to_dict()
    # Task files written before the fit had a smoothing and a shift read as neither.
    old = {k: v for k, v in fit.to_dict().items() if k not in ("bias", "smooth")}
    assert (PixelFit.from_dict(old).bias, PixelFit.from_dict(old).smooth) == (0.0, 0.0)
    with pytest.raises(ValueError, match="smoothing must be >= 0"):
        PixelFit(np.zeros(1), np.ones(1), np.zeros(2), 1.0, smooth=-1.0)


def _small_noisy_class(
    rng: np.random.Generator, patches: bool, n: int = 96
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """One feature channel, a class on about 8% of the cells, both classes with unit noise.

    ``patches``: the class is square patches (neighbours share it); else scattered cells.
    """
    if patches:
        truth = np.zeros((n, n), bool)
        for y in range(6, n - 12, 24):
            for x in range(6, n - 12, 24):
                truth[y : y + 7, x : x + 7] = True
    else:
        truth = np.random.default_rng(7).random((n, n)) < 0.08
    x = np.where(truth, 1.0, -1.0) + rng.normal(size=(n, n))
    masks = torch.from_numpy(np.stack([truth, ~truth]).astype(np.float32))
    return torch.from_numpy(x[None].astype(np.float32)), masks, truth


def _iou(fit: PixelFit, x: torch.Tensor, truth: np.ndarray, net: torch.Tensor) -> float:
    """IoU of the task's foreground where the network's logits are ``net``."""
    z = fit.combine(net, fit.logits(x[None])[0]).numpy() > 0
    return float((z & truth).sum() / (z | truth).sum())


@pytest.mark.parametrize("patches", [False, True])
def test_cross_validation_shifts_or_smooths_a_fit_that_overmarks_a_small_class(
    rng, patches: bool
) -> None:
    x, masks, truth = _small_noisy_class(rng, patches)
    # A network that knows nothing: loud noise, unrelated to the class.
    net = torch.from_numpy(4.0 * np.random.default_rng(3).normal(size=truth.shape)).float()
    fit = validated_fit([x], [masks], lambda fold: [net])
    assert fit is not None and (fit.gain, fit.net_weight) == (1.0, 0.0)
    if patches:
        # Neighbours share the class: smoothing pools the noise.
        assert fit.smooth > 0.0
    else:
        # Both classes weigh the same in the fit, so unshifted it marks far more than the
        # class: the held-out quadrants move its threshold up, and smoothing would only blur.
        assert fit.bias < 0.0 and fit.smooth == 0.0
    raw = replace(fit, bias=0.0, smooth=0.0)  # the fit as it was chosen before either
    fresh, _, _ = _small_noisy_class(rng, patches)  # the same scene, new noise: not fitted on
    assert _iou(fit, fresh, truth, net) > _iou(raw, fresh, truth, net) + 0.05


def test_guide_labels_gives_a_task_that_predictions_use(predictor, blobs) -> None:
    image, fg = blobs
    predictor.set_volume(image)
    painted = np.zeros(fg.shape[1:], np.uint8)
    painted[fg[0]] = 1
    painted[~fg[0]] = 2
    task = predictor.guide_labels({0: painted})
    net_only = predictor.guide_labels({0: painted}, fit=False)
    assert net_only.pixel_fit is None
    np.testing.assert_array_equal(task.sum_coarse, net_only.sum_coarse)
    assert task.support_masks and task.support_masks[0][0] == (0,)
    # A fit that replaces the network: the probability is the fit's, upsampled.
    assert task.pixel_fit is not None
    only_fit = replace(task, pixel_fit=replace(task.pixel_fit, gain=1.0, net_weight=0.0))
    prob = predictor.predict_proba(1, only_fit)[0]
    f = predictor.features(1)
    z = only_fit.pixel_fit.logits(fit_features(f, predictor._prepare(1)[None]))[:, None]
    expected = torch.sigmoid(torch.nn.functional.interpolate(z, scale_factor=4, mode="bilinear"))
    np.testing.assert_allclose(prob, expected[0, 0, :128, :128].numpy(), atol=1e-5)
    # A fit that does not count changes nothing.
    idle = replace(task, pixel_fit=replace(task.pixel_fit, gain=0.0, net_weight=1.0))
    np.testing.assert_array_equal(
        predictor.predict_proba(1, idle), predictor.predict_proba(1, net_only)
    )


def test_guide_labels_refuses_bad_input(predictor, blobs) -> None:
    image, fg = blobs
    predictor.set_volume(image)
    with pytest.raises(ValueError, match="no foreground"):
        predictor.guide_labels({})
    with pytest.raises(ValueError, match="slice shape"):
        predictor.guide_labels({0: np.ones((10, 10), np.uint8)})
    with pytest.raises(ValueError, match=r"0 \(not annotated\), 1 \(foreground\) or 2"):
        predictor.guide_labels({0: np.full(fg.shape[1:], 3, np.uint8)})
    with pytest.raises(ValueError, match="no foreground"):
        predictor.guide_labels({0: np.full(fg.shape[1:], 2, np.uint8)})


def test_task_files_keep_the_fit_and_merging_drops_it(predictor, blobs, tmp_path) -> None:
    image, fg = blobs
    predictor.set_volume(image)
    task = predictor.guide_labels({0: np.where(fg[0], 1, 2).astype(np.uint8)})
    assert task.pixel_fit is not None
    path = task.save(tmp_path / "t.revolver-task.json")
    from napari_revolver.core.task import load_task

    back = load_task(path)
    assert back.pixel_fit is not None
    np.testing.assert_allclose(back.pixel_fit.coef, task.pixel_fit.coef)
    assert (back.pixel_fit.gain, back.pixel_fit.net_weight) == (
        task.pixel_fit.gain,
        task.pixel_fit.net_weight,
    )
    assert task.merge(task).pixel_fit is None
    with pytest.raises(ValueError, match="pixel fit is for class tasks"):
        replace(task, kind="object")
    assert isinstance(task, Task)


def test_clicks_and_painted_labels_guide_one_task(predictor, blobs) -> None:
    image, fg = blobs
    predictor.set_volume(image)
    painted = {0: np.where(fg[0], 1, 2).astype(np.uint8)}
    ys, xs = np.nonzero(fg[1])
    pts = np.array([[1, ys[0], xs[0]], [1, 2, 2]], float)
    lab = np.array([1, 0])
    both = predictor.guide_labels(painted, points=pts, point_labels=lab)
    clicks = predictor.guide(pts, lab)
    paint = predictor.guide_labels(painted, fit=False)
    np.testing.assert_allclose(both.sum_coarse, clicks.sum_coarse + paint.sum_coarse, rtol=1e-5)
    np.testing.assert_allclose(both.mass, clicks.mass + paint.mass, rtol=1e-6)
    np.testing.assert_array_equal(both.points, pts)
    # The fit comes from the painted cells alone, so it can be made once and reused.
    fit = predictor.fit_labels(painted)
    assert fit is not None
    np.testing.assert_allclose(both.pixel_fit.coef, fit.coef, rtol=1e-5)
    reused = predictor.guide_labels(painted, points=pts, point_labels=lab, fit=fit)
    assert reused.pixel_fit is fit
    # Clicks alone, no painted slice: the network alone.
    assert predictor.guide_labels({}, points=pts, point_labels=lab).pixel_fit is None


def test_the_fit_in_parts_equals_the_fit_on_the_concatenation(predictor, blobs) -> None:
    image, _ = blobs
    predictor.set_volume(image)
    f = predictor.features(0)
    images = predictor._prepare(0)[None]
    whole = pf.fit_features(f, images)
    rng = np.random.default_rng(0)
    d = whole.shape[1]
    fit = PixelFit(rng.normal(size=d), rng.uniform(0.5, 2, d), rng.normal(size=d + 1), 1.0)
    np.testing.assert_allclose(
        fit.logits(pf.fit_inputs(f, images)).numpy(), fit.logits(whole).numpy(), atol=1e-3
    )


def _clicks(predictor, fg: np.ndarray, n: int, k: int = 0):
    """``n`` positive and ``n`` negative clicks on slice ``k``, and their footprints."""
    from napari_revolver.core.model.guide import point_masks

    rng = np.random.default_rng(1)
    yx = []
    for want in (True, False):
        ys, xs = np.nonzero(fg[k] == want)
        pick = rng.choice(len(ys), n, replace=False)
        yx.append(np.c_[ys[pick], xs[pick]].astype(float))
    yx = np.concatenate(yx)
    lab = np.r_[np.ones(n), np.zeros(n)].astype(np.int8)
    grid = tuple(predictor.features(k).fine.shape[-2:])
    stride = predictor.model.fine_stride
    feet = [(0, point_masks(torch.from_numpy(p[None]), torch.ones(1), grid, stride)[0]) for p in yx]
    return yx, lab, feet


def _fixed_click_network(truth: torch.Tensor | None, value: float = -3.0):
    """A stand-in for the network on clicks: the truth (+-8), or ``value`` everywhere."""

    def logits(folds: list[list[torch.Tensor]], focus=None) -> list[list[torch.Tensor]]:
        assert focus is None or len(focus) == len(folds)
        shape = folds[0][0].shape[-2:]
        out = truth if truth is not None else torch.full(shape, value)
        return [[out] for _ in folds]

    return logits


def test_clicks_the_network_reproduces_give_no_fit(predictor, blobs) -> None:
    image, fg = blobs
    x, masks = _support(predictor, image, fg)
    _, lab, feet = _clicks(predictor, fg, 5)
    truth = torch.where(masks[0] > masks[1], 8.0, -8.0)
    called = []
    fit = pf.validated_click_fit(
        lambda: called.append(1) or [x], feet, lab, _fixed_click_network(truth)
    )
    assert fit is None and not called  # one network pass, no features, no fit


def test_clicks_the_network_reproduces_in_windows_need_no_pass_over_the_slice(
    predictor, blobs
) -> None:
    image, fg = blobs
    x, masks = _support(predictor, image, fg)
    _, lab, feet = _clicks(predictor, fg, 5)
    truth = torch.where(masks[0] > masks[1], 8.0, -8.0)
    network = _fixed_click_network(truth)
    reads: list[object] = []

    def logits(folds, focus=None):
        reads.append(focus)
        return network(folds, focus)

    fit = pf.validated_click_fit(lambda: [x], feet, lab, logits, clicks_in_windows=True)
    assert fit is None and len(reads) == 1 and reads[0] is not None and len(reads[0]) == 10


def test_clicks_a_network_that_over_segments_gets_wrong_give_the_fit(predictor, blobs) -> None:
    image, fg = blobs
    x, _ = _support(predictor, image, fg)
    yx, lab, feet = _clicks(predictor, fg, 5)
    # The network marks everything: every negative click wrong, as on EM mitochondria.
    fit = pf.validated_click_fit(lambda: [x], feet, lab, _fixed_click_network(None, 3.0))
    assert fit is not None and fit.active and fit.net_weight == 0.0
    assert fit.scores["net"] == pytest.approx(0.5)
    assert fit.scores["net_on_negatives"] == 0.0 and fit.scores["net_on_positives"] == 1.0
    assert fit.scores["fit"] - fit.scores["net"] > pf.CLICK_MARGIN
    assert fit.scores["fit_foreground"] < fit.scores["net_foreground"] == 1.0
    # The fit separates the blobs on the slice beyond the clicks.
    z = fit.logits(x[None])[0].numpy()
    cells = fg[0].reshape(32, 4, 32, 4).mean((1, 3))
    sure = (cells == 0) | (cells == 1)
    assert np.mean((z > 0)[sure] == (cells[sure] == 1)) > 0.85
    # Drawn for the slice: smoothed, calibrated to the class's share of it (which the fit
    # estimates) and thresholded for the best expected IoU.
    z = replace(fit, bias=0.0).logits(x[None]).numpy()
    share, prior = pf.prior_shift(z)
    t, _ = pf.expected_iou_threshold(1 / (1 + np.exp(-(z + prior))))
    assert fit.smooth == pf.CLICK_SMOOTHING
    assert pf.BIASES[0] < fit.bias < pf.BIASES[-1]
    assert fit.bias == pytest.approx(prior - np.log(t / (1 - t)))
    assert pf.drawn_shift(z) == pytest.approx((share, t, fit.bias))
    assert (fit.scores["fit_share"], fit.scores["fit_threshold"]) == pytest.approx((share, t))
    assert abs(share - fg[0].mean()) < 0.1


def test_the_drawn_shift_stays_within_what_a_painted_support_may_choose(rng) -> None:
    # A fit sure of almost nothing: its share is estimated near zero, and the shift that
    # implies would erase the few cells it does mark.
    z = np.r_[np.full(5000, -12.0), np.full(5, 5.0)] + 0.1 * rng.normal(size=5005)
    share, t, shift = pf.drawn_shift(z)
    unbounded = np.log(share / (1 - share)) - np.log(t / (1 - t))
    assert share < 0.001 and np.sum(z + unbounded > 0) == 0
    assert shift == pf.BIASES[0] and np.sum(z + shift > 0) == 5
    # And one sure of almost everything.
    assert pf.drawn_shift(-z)[2] == pf.BIASES[-1]


def test_prior_shift_recovers_the_share_of_a_class(rng) -> None:
    for share in (0.05, 0.3, 0.8):
        y = rng.random(20000) < share
        # A balanced fit of two unit Gaussians at -1 and +1: its logit is 2 x.
        z = 2.0 * (np.where(y, 1.0, -1.0) + rng.normal(size=y.size))
        est, shift = pf.prior_shift(z)
        assert est == pytest.approx(share, abs=0.02)
        assert shift == pytest.approx(np.log(est / (1 - est)))
        # Shifted, the fit's errors are the fewest: the posterior is calibrated.
        errors = [np.mean((z + b > 0) != y) for b in (shift - 1.0, shift, shift + 1.0)]
        assert errors[1] == min(errors)
    with pytest.raises(ValueError, match="at least one cell"):
        pf.prior_shift(np.zeros(0))


def test_expected_iou_threshold_is_the_best_threshold_on_calibrated_labels(rng) -> None:
    # A class that is hard to tell: probabilities spread low; labels drawn from them.
    p = rng.beta(1.0, 6.0, size=200000)
    y = rng.random(p.size) < p
    t, expected = pf.expected_iou_threshold(p)
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    realised = {g: np.sum((p > g) & y) / np.sum((p > g) | y) for g in grid}
    assert t < 0.5 and realised[t] > realised[0.5] + 0.05
    assert realised[t] == pytest.approx(max(realised.values()), abs=0.005)
    assert expected == pytest.approx(realised[t], abs=0.01)
    # Sure labels: every threshold is as good, and 0.5 is kept.
    assert pf.expected_iou_threshold(np.r_[np.zeros(50), np.ones(50)]) == (0.5, 1.0)
    with pytest.raises(ValueError, match="at least one cell"):
        pf.expected_iou_threshold(np.zeros(0))


def test_a_fit_that_claims_more_than_the_network_is_not_used(predictor, blobs) -> None:
    image, fg = blobs
    x, _ = _support(predictor, image, fg)
    _, lab, feet = _clicks(predictor, fg, 5)
    # The network marks nothing: it misses every positive click, yet a fit that marks more
    # of the slice than the network could be buying its click accuracy with false positives.
    network = _fixed_click_network(None, -3.0)
    reads: list[object] = []

    def logits(folds, focus=None):
        reads.append(focus)
        return network(folds, focus)

    fit = pf.validated_click_fit(lambda: [x], feet, lab, logits)
    assert fit is not None and not fit.active
    assert fit.scores["fit_foreground"] > pf.MAX_AREA_RATIO * fit.scores["net_foreground"]
    # Refused before the held-out clicks are scored: one pass over the slice, no held-out
    # fits or network passes (the fit's lead on them is not asked).
    assert reads == [None] and "net" not in fit.scores and "fit" not in fit.scores
    assert fit.scores["net_on_positives"] == 0.0


def test_too_few_clicks_give_no_fit(predictor, blobs) -> None:
    image, fg = blobs
    x, _ = _support(predictor, image, fg)
    _, lab, feet = _clicks(predictor, fg, 1)
    assert pf.validated_click_fit(lambda: [x], feet, lab, _fixed_click_network(None)) is None
    with pytest.raises(ValueError, match="one footprint per click: 2 footprints, 3 labels"):
        pf.validated_click_fit(lambda: [x], feet, np.r_[lab, 1], _fixed_click_network(None))


def test_guide_with_fit_on_clicks(predictor, blobs) -> None:
    image, fg = blobs
    predictor.set_volume(image)
    yx, lab, _ = _clicks(predictor, fg, 5)
    pts = np.c_[np.zeros(len(yx)), yx]
    plain = predictor.guide(pts, lab)
    fitted = predictor.guide(pts, lab, fit=True)
    assert plain.pixel_fit is None
    np.testing.assert_array_equal(fitted.sum_coarse, plain.sum_coarse)
    fit = predictor.fit_clicks(pts, lab)
    if fit is None:
        assert fitted.pixel_fit is None
    else:
        np.testing.assert_allclose(fitted.pixel_fit.coef, fit.coef, rtol=1e-4, atol=1e-5)
        assert predictor.guide(pts, lab, fit=fit).pixel_fit is fit
    with pytest.raises(ValueError, match="pixel fit is for class tasks"):
        predictor.guide(pts[lab == 1][:1], lab[lab == 1][:1], kind="object", fit=True)


def test_fit_clicks_reads_points_it_may_not_write_without_a_warning(predictor, blobs) -> None:
    # The CLI reads its points into read-only arrays; torch warned on each click's footprint.
    image, fg = blobs
    predictor.set_volume(image)
    yx, lab, _ = _clicks(predictor, fg, 3)
    pts = np.c_[np.zeros(len(yx)), yx]
    pts.setflags(write=False)
    lab.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor.fit_clicks(pts, lab)


def test_support_logits_batch_several_annotations_exactly(predictor, blobs) -> None:
    image, fg = blobs
    predictor.set_volume(image)
    _, lab, feet = _clicks(predictor, fg, 3)
    feats = [predictor.features(0)]
    folds = []
    for drop in range(len(lab) + 1):
        m = torch.zeros(2, *feet[0][1].shape)
        for j, ((_, fp), c) in enumerate(zip(feet, lab, strict=True)):
            if j != drop:
                m[1 - c] += fp
        folds.append([m])
    together = predictor._support_logits(feats, folds)
    assert len(together) == len(folds)
    for fold, maps in zip(folds, together, strict=True):
        alone = predictor._support_logits(feats, [fold])[0]
        torch.testing.assert_close(maps[0], alone[0], atol=1e-4, rtol=1e-4)
    # The batched guidance equals the guide the tasks use.
    g = predictor.guide_features(feats[0], folds[0][0])
    full = predictor.model.segment(feats[0].to(predictor.device, torch.float32), g)
    pooled = torch.nn.functional.avg_pool2d(full[:, None], predictor.model.fine_stride)[0, 0]
    torch.testing.assert_close(together[0][0], pooled, atol=1e-4, rtol=1e-4)


def test_a_task_followed_by_position_keeps_the_network(predictor, blobs) -> None:
    image, fg = blobs
    predictor.set_volume(image)
    task = predictor.guide_labels({0: np.where(fg[0], 1, 2).astype(np.uint8)})
    only_fit = replace(task, pixel_fit=replace(task.pixel_fit, gain=1.0, net_weight=0.0))
    net = replace(task, pixel_fit=None)
    local = [s.result for s in predictor.propagate(only_fit, indices=[1], local=True)]
    plain = [s.result for s in predictor.propagate(net, indices=[1], local=True)]
    np.testing.assert_array_equal(local[0], plain[0])
    # Without positions the fit replaces the network.
    fitted = [s.result for s in predictor.propagate(only_fit, indices=[1])]
    network = [s.result for s in predictor.propagate(net, indices=[1])]
    assert not np.array_equal(fitted[0], network[0])


def test_held_out_clicks_read_the_head_on_a_window_exactly(predictor, make_blobs) -> None:
    image = make_blobs((2, 512, 512), n_blobs=20)
    fg = image > 0.5
    predictor.set_volume(image)
    _, lab, feet = _clicks(predictor, fg, 3)
    feats = [predictor.features(0)]
    fold = torch.zeros(2, *feet[0][1].shape)
    for (_, fp), c in zip(feet, lab, strict=True):
        fold[1 - c] += fp
    whole = predictor._support_logits(feats, [[fold]])[0][0]
    h, w = whole.shape
    cells = [(0, (0, 0)), (0, (h // 2, w // 2)), (0, (h - 1, 3)), (0, (5, w - 2))]
    windowed = predictor._support_logits(feats, [[fold]] * len(cells), cells)
    for (_, (y, x)), maps in zip(cells, windowed, strict=True):
        near = maps[0][max(y - 3, 0) : y + 4, max(x - 3, 0) : x + 4]
        torch.testing.assert_close(
            near, whole[max(y - 3, 0) : y + 4, max(x - 3, 0) : x + 4], atol=1e-4, rtol=1e-4
        )
        assert (maps[0] == 0).any()  # only a window was computed


def test_fit_inputs_of_recent_support_slices_are_kept(predictor, blobs, monkeypatch) -> None:
    from napari_revolver.core import predictor as predictor_module

    image, _ = blobs
    calls: list[int] = []
    real = predictor_module.fit_features

    def counting(f, images):
        calls.append(images.shape[0])
        return real(f, images)

    monkeypatch.setattr(predictor_module, "fit_features", counting)
    predictor.set_volume(image)
    first = predictor._fit_features(0, predictor.features(0))
    assert predictor._fit_features(0, predictor.features(0)) is first
    predictor._fit_features(1, predictor.features(1))
    assert len(calls) == 2
    # Another volume reads its own slices.
    predictor.set_volume(image[::-1].copy())
    again = predictor._fit_features(0, predictor.features(0))
    assert len(calls) == 3 and not torch.equal(again, first)


def test_clicks_on_several_slices_fit_together(predictor, blobs, monkeypatch) -> None:
    image, fg = blobs
    predictor.set_volume(image)
    yx0, lab0, _ = _clicks(predictor, fg, 3, k=0)
    yx1, lab1, _ = _clicks(predictor, fg, 3, k=1)
    pts = np.r_[np.c_[np.zeros(len(yx0)), yx0], np.c_[np.ones(len(yx1)), yx1]]
    lab = np.r_[lab0, lab1]
    feats = [predictor._fit_features(k, predictor.features(k)) for k in (0, 1)]
    seen: list[int] = []
    real = pf.validated_click_fit

    def spy(features, footprints, labels, network_logits, **kwargs):
        seen.extend(i for i, _ in footprints)
        maps = network_logits([[torch.zeros(2, *f.shape[-2:]) for f in feats]], None)
        assert len(maps) == 1 and len(maps[0]) == 2  # logits on both support slices
        return real(features, footprints, labels, network_logits, **kwargs)

    import napari_revolver.core.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "validated_click_fit", spy)
    fit = predictor.fit_clicks(pts, lab)
    assert sorted(set(seen)) == [0, 1] and seen.count(0) == seen.count(1) == 6
    if fit is not None:
        assert fit.mean.shape == (feats[0].shape[0],)


def test_own_click_scores_read_in_windows_decide_as_the_whole_slice(
    predictor, make_blobs, monkeypatch
) -> None:
    """On large slices the network's score on its clicks is read one window per click."""
    import napari_revolver.core.predictor as P

    image = make_blobs((2, 512, 512), n_blobs=20)
    fg = image > 0.5
    predictor.set_volume(image)
    passes: list[bool] = []
    logits = predictor._support_logits

    def spy(feats, folds, focus=None):
        passes.append(focus is None)
        return logits(feats, folds, focus)

    monkeypatch.setattr(predictor, "_support_logits", spy)
    for n in (3, 6):
        yx, lab, _ = _clicks(predictor, fg, n)
        pts = np.c_[np.zeros(len(yx)), yx]
        fits = {}
        for share in (0.0, 1e9):  # never windows; always windows
            monkeypatch.setattr(P, "CLICK_WINDOWS_SHARE", share)
            passes.clear()
            fits[share] = (predictor.fit_clicks(pts, lab), list(passes))
        (whole, whole_passes), (windowed, windowed_passes) = fits[0.0], fits[1e9]
        assert whole_passes[0] and not windowed_passes[0]
        assert (whole is None) == (windowed is None)
        if whole is None:  # the network reproduces its clicks: no pass over the slice at all
            assert windowed_passes == [False]
            continue
        assert whole.scores == pytest.approx(windowed.scores, abs=1e-6)
        assert (whole.gain, whole.net_weight) == (windowed.gain, windowed.net_weight)
        np.testing.assert_allclose(whole.coef, windowed.coef, atol=1e-6)


@pytest.mark.parametrize(
    "box",
    [
        (slice(100, 140), slice(150, 230)),  # inside
        (slice(0, 30), slice(0, 20)),  # at the top left corner
        (slice(250, 300), slice(380, 420)),  # at the bottom right corner (padded features)
        (slice(0, 300), slice(0, 420)),  # all of it
    ],
)
def test_a_fit_read_in_a_box_is_that_of_the_whole_slice(predictor, make_blobs, box) -> None:
    image = make_blobs((2, 300, 420), n_blobs=12)  # not a multiple of the grids: padded
    predictor.set_volume(image)
    d = predictor._fit_features(1, predictor.features(1)).shape[0]
    rng = np.random.default_rng(0)
    fit = PixelFit(
        np.zeros(d, np.float32),
        np.ones(d, np.float32),
        rng.normal(0, 0.5, d + 1).astype(np.float32),
        1.0,
        0.0,
        smooth=2.0,
    )
    whole = predictor.fit_probability(1, fit)
    boxed = predictor.fit_probability(1, fit, box)
    assert boxed.shape == whole.shape
    np.testing.assert_allclose(boxed[box], whole[box], atol=1e-5)
    assert 0.01 < whole[box].mean() < 0.99  # not a saturated map that any crop reproduces
