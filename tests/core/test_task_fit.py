"""Tests for the per-task fit: fixed filter responses, support moments and the ridge solve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_revolver.core.episodes import EpisodeConfig, _modality_shift
from napari_revolver.core.model.filters import FILTER_SIGMAS, FilterBank
from napari_revolver.core.model.guide import Guide, GuideOutput
from napari_revolver.core.model.task_fit import TaskFit, fit_inputs, support_moments
from napari_revolver.core.predictor import RevolverPredictor
from napari_revolver.core.task import Task, load_task

# ------------------------------------------------------------------------------------ filters


def _disc(shape: tuple[int, int], radius: float, level: float = 1.0) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    cy, cx = shape[0] / 2, shape[1] / 2
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2, level, 0.0).astype(np.float32)


def test_filter_bank_gives_sixteen_responses_on_the_fine_grid() -> None:
    bank = FilterBank()
    out = bank(torch.zeros(2, 3, 64, 96))
    assert out.shape == (2, 4 * len(FILTER_SIGMAS), 16, 24) == (2, FilterBank.channels, 16, 24)
    # A constant slice has no structure: only the smoothed intensities (level 0 here) remain.
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-3)
    # No parameters, and nothing saved with the weights.
    assert not list(bank.parameters()) and not bank.state_dict()


def test_filter_bank_sees_a_bright_blob_and_its_polarity() -> None:
    img = torch.from_numpy(_disc((64, 64), 6.0))[None, None].expand(1, 3, 64, 64)
    out = FilterBank()(img)[0]
    centre = (8, 8)
    # Smoothed intensity at sigma 1 is highest at the blob; the Hessian's larger eigenvalue at
    # the matching scale (sigma 4) is strongly negative there (a bright blob is a maximum).
    assert out[0][centre] == out[0].max()
    assert out[2 * 4 + 2][centre] < -0.05
    # The inverted blob flips the sign of every derivative-free and second-order response.
    inv = FilterBank()(-img)[0]
    torch.testing.assert_close(inv[0], -out[0])
    torch.testing.assert_close(inv[2 * 4 + 3], -out[2 * 4 + 2], atol=1e-5, rtol=1e-4)
    # Gradient magnitude does not depend on polarity and peaks on the rim, not at the centre.
    torch.testing.assert_close(inv[1], out[1])
    assert out[1][centre] < out[1].max()


def test_filter_bank_works_on_the_smallest_slice() -> None:
    out = FilterBank()(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()


def test_filter_bank_smooths_as_a_separable_convolution_with_reflection() -> None:
    bank = FilterBank()
    x = torch.randn(2, 1, 40, 56)
    for i in range(len(FILTER_SIGMAS)):
        k = getattr(bank, f"kernel{i}")
        r = k.numel() // 2
        y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
        torch.testing.assert_close(bank._smooth(x, k), y, atol=1e-6, rtol=1e-5)
    small = torch.randn(1, 1, 8, 8)  # shorter than the widest kernel: replicated borders
    k = getattr(bank, f"kernel{len(FILTER_SIGMAS) - 1}")
    r = k.numel() // 2
    y = F.conv2d(F.pad(small, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    torch.testing.assert_close(bank._smooth(small, k), y, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ moments


def test_support_moments_hold_sums_mass_and_the_weighted_gram(rng: np.random.Generator) -> None:
    coarse = torch.from_numpy(rng.standard_normal((1, 3, 4, 5)).astype(np.float32))
    fine = torch.from_numpy(rng.standard_normal((1, 2, 8, 10)).astype(np.float32))
    masks = torch.from_numpy(rng.random((1, 2, 8, 10)).astype(np.float32))
    masks[:, :, :3] = 0  # unannotated rows
    g = support_moments(coarse, fine, masks)
    x = fit_inputs(coarse, fine)[0].reshape(5, -1).numpy().astype(np.float64)
    a = np.concatenate([x, np.ones((1, x.shape[1]))])
    for p in range(2):
        m = masks[0, p].reshape(-1).numpy()
        np.testing.assert_allclose(g[0, p].numpy(), (a * m) @ a.T, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g[0, p, 5, 5].item(), m.sum(), rtol=1e-5)
    # The inference path keeps only annotated cells; training keeps all: the same moments.
    with torch.enable_grad():
        full = support_moments(coarse.requires_grad_(), fine, masks)
    torch.testing.assert_close(full.detach(), g)


@pytest.mark.parametrize("cells", [[(5, 7)], [(0, 0), (3, 4)], [(15, 19)], [(8, 1), (9, 2)]])
def test_moments_of_a_few_clicks_equal_those_of_the_whole_slice(
    rng: np.random.Generator, cells: list[tuple[int, int]]
) -> None:
    """The inference path crops to the annotated cells; training uses every cell."""
    coarse = torch.from_numpy(rng.standard_normal((1, 3, 8, 10)).astype(np.float32))
    fine = torch.from_numpy(rng.standard_normal((1, 2, 16, 20)).astype(np.float32))
    masks = torch.zeros(1, 2, 16, 20)
    for i, (y, x) in enumerate(cells):
        masks[0, i % 2, y, x] = 0.7
    with torch.inference_mode():
        window = support_moments(coarse, fine, masks)
    with torch.enable_grad():
        full = support_moments(coarse.clone().requires_grad_(), fine, masks).detach()
    torch.testing.assert_close(window, full, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        none = support_moments(coarse, fine, torch.zeros_like(masks))
    assert none.shape == full.shape and torch.count_nonzero(none) == 0


def test_guide_moments_add_over_support_slices(rng: np.random.Generator) -> None:
    guide = Guide(moments=True)
    feats = [
        (
            torch.from_numpy(rng.standard_normal((1, 3, 4, 4)).astype(np.float32)),
            torch.from_numpy(rng.standard_normal((1, 2, 8, 8)).astype(np.float32)),
            torch.from_numpy(rng.random((1, 2, 8, 8)).astype(np.float32)),
        )
        for _ in range(2)
    ]
    both = guide(*feats[0]) + guide(*feats[1])
    joint = guide(
        torch.cat([feats[0][0], feats[1][0]], dim=3),
        torch.cat([feats[0][1], feats[1][1]], dim=3),
        torch.cat([feats[0][2], feats[1][2]], dim=3),
    )
    # Side by side, the upsampled coarse features differ only where the two halves meet.
    assert both.moments is not None and joint.moments is not None
    torch.testing.assert_close(both.mass, joint.mass)
    assert GuideOutput(both.sum_coarse, both.sum_fine, both.mass).moments is None
    assert both.repeat(3).moments.shape == (3, 2, 6, 6)  # type: ignore[union-attr]
    torch.testing.assert_close(both.repeat(2).total().moments, 2 * both.moments)


# ------------------------------------------------------------------------------------- solve


def _moments_of(x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """Moments of samples ``x (N, D)`` with labels ``y (N,)`` in {1, 0}, as the guide keeps them."""
    a = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    g = np.stack([a[y == 1].T @ a[y == 1], a[y == 0].T @ a[y == 0]])
    return torch.from_numpy(g[None].astype(np.float32))


def test_ridge_solve_matches_least_squares_when_weakly_regularised(
    rng: np.random.Generator,
) -> None:
    n, d = 400, 5
    x = rng.standard_normal((n, d))
    y = (x @ rng.standard_normal(d) + 0.3 * rng.standard_normal(n) > 0).astype(int)
    fit = TaskFit(strength=1e-6, floor=1e-9)
    w, b = fit.solve(_moments_of(x, y))
    # Class-balanced least squares with targets +1 / -1 and an intercept.
    weights = np.where(y == 1, 0.5 / (y == 1).sum(), 0.5 / (y == 0).sum())
    a = np.concatenate([x, np.ones((n, 1))], axis=1) * np.sqrt(weights)[:, None]
    beta = np.linalg.lstsq(a, np.where(y == 1, 1.0, -1.0) * np.sqrt(weights), rcond=None)[0]
    np.testing.assert_allclose(w[0].detach().numpy(), beta[:d], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(b.item(), beta[d], rtol=1e-3, atol=1e-4)


def test_ridge_is_strong_for_few_clicks_and_weak_for_many(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2000, 4))
    y = (x[:, 0] > 0).astype(int)
    fit = TaskFit()
    w_dense, _ = fit.solve(_moments_of(x, y))
    w_two, _ = fit.solve(_moments_of(x[:2], np.array([1, 0]) if y[0] != y[1] else y[:2]))
    assert torch.linalg.norm(w_dense) > 0.5
    # Two samples cannot pin four weights: the strength keeps them small.
    assert torch.linalg.norm(w_two) < torch.linalg.norm(w_dense)
    # The solve is differentiable with respect to its two scalars.
    w_dense.sum().backward()
    assert fit.log_strength.grad is not None and fit.log_floor.grad is not None


def test_ridge_with_one_polarity_or_none_gives_constant_responses(
    rng: np.random.Generator,
) -> None:
    x = rng.standard_normal((50, 3))
    g = _moments_of(x, np.ones(50, int))
    w, b = TaskFit().solve(g)
    assert torch.allclose(w, torch.zeros_like(w), atol=1e-5) and b.item() == pytest.approx(1.0)
    w, b = TaskFit().solve(torch.flip(g, dims=[1]))
    assert b.item() == pytest.approx(-1.0)
    w, b = TaskFit().solve(torch.zeros_like(g))
    assert torch.count_nonzero(w) == 0 and b.item() == 0.0


def test_fit_on_filters_tells_texture_apart_where_a_mean_cannot(
    rng: np.random.Generator,
) -> None:
    """A grainy region and a smooth one at the same mean level: the fit of filter responses on
    one image's dense mask separates them on another image; the pooled means do not."""

    def sample(seed: int) -> tuple[torch.Tensor, np.ndarray]:
        r = np.random.default_rng(seed)
        mask = _disc((128, 128), 36.0) > 0
        img = 0.02 * r.standard_normal((128, 128))
        grain = np.kron(r.standard_normal((64, 64)), np.ones((2, 2)))
        img = np.where(mask, 0.4 * grain, img).astype(np.float32)
        return torch.from_numpy(img)[None, None].expand(1, 3, 128, 128), mask

    bank = FilterBank()
    img_s, mask_s = sample(1)
    img_q, mask_q = sample(2)
    fine_s, fine_q = bank(img_s), bank(img_q)
    coarse_s = torch.nn.functional.avg_pool2d(fine_s, 2)
    coarse_q = torch.nn.functional.avg_pool2d(fine_q, 2)
    cell = torch.from_numpy(mask_s.astype(np.float32))[None, None]
    pos = torch.nn.functional.avg_pool2d(cell, 4)[0]
    masks = torch.cat([pos, 1 - pos])[None]
    fit = TaskFit()
    w, b = fit.solve(support_moments(coarse_s, fine_s, masks))
    r = TaskFit.response(coarse_q, fine_q, w, b)[0, 0]
    truth = torch.from_numpy(mask_q[2::4, 2::4])
    pred = r > 0
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou > 0.8
    # The mean intensity alone (the first filter channel) says nothing here.
    level = fine_q[0, 0]
    assert abs(level[truth].mean() - level[~truth].mean()) < 0.05


# ---------------------------------------------------------------------------- tasks and files


def test_task_moments_merge_save_and_load(
    predictor: RevolverPredictor, make_blobs, tmp_path: Path
) -> None:
    predictor.set_volume(make_blobs((3, 48, 48)))
    a = predictor.guide([[0, 24, 24], [0, 5, 5]], [1, 0])
    b = predictor.guide([[2, 20, 20], [2, 40, 5]], [1, 0])
    assert a.moments is not None and b.moments is not None
    both = predictor.guide([[0, 24, 24], [0, 5, 5], [2, 20, 20], [2, 40, 5]], [1, 0, 1, 0])
    np.testing.assert_allclose(a.merge(b).moments, both.moments, rtol=1e-5, atol=1e-5)
    path = a.save(tmp_path / "a.revolver-task.json")
    back = load_task(path)
    np.testing.assert_array_equal(back.moments, a.moments)
    # Files written for weights without the fit have no moments and still read.
    d = json.loads(path.read_text())
    del d["moments"]
    assert Task.from_dict(d).moments is None
    d["moments"] = {"shape": [2, 3, 3], "float32_base64": "AAAA"}
    with pytest.raises(ValueError, match="bytes"):
        Task.from_dict(d)


def test_a_task_without_moments_is_refused_with_a_reason(
    predictor: RevolverPredictor, make_blobs
) -> None:
    from dataclasses import replace

    predictor.set_volume(make_blobs((2, 48, 48)))
    t = replace(predictor.guide([[0, 24, 24]], [1]), moments=None)
    with pytest.raises(ValueError, match="no support moments"):
        predictor.predict_slice(1, t)


def test_more_support_changes_the_prediction_through_the_fit(
    predictor: RevolverPredictor, make_blobs
) -> None:
    """With the head's weights on the response set, a dense mask predicts what it was given."""
    seg = predictor.model.segmentor
    with torch.no_grad():
        for p in seg.parameters():
            p.zero_()
        # The response is the last input but the filters of the fine fusion: pass it through.
        n_in = seg.fine_fuse.weight.shape[1]
        seg.fine_fuse.weight[0, n_in - 1 - 16] = 1.0
        seg.refine[0].weight[0, 0, 1, 1] = 1.0
        seg.refine[2].weight[0, 0] = 1.0
        seg.refine[2].bias.fill_(-0.5)
    vol = make_blobs((2, 64, 64), n_blobs=3)
    predictor.set_volume(vol)
    truth = vol[1] > 0.5
    task = predictor.guide_mask(0, vol[0] > 0.5)
    mask = predictor.predict_slice(1, task)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.6


def test_modality_shift_inverts_support_and_query_together(rng: np.random.Generator) -> None:
    s = rng.standard_normal((3, 8, 8)).astype(np.float32)
    q = rng.standard_normal((3, 8, 8)).astype(np.float32)
    cfg = EpisodeConfig(p_invert=1.0, p_colour=0.0)
    s2, q2 = _modality_shift(rng, cfg, s, q)
    np.testing.assert_array_equal(s2, -s)
    np.testing.assert_array_equal(q2, -q)
    cfg = EpisodeConfig(p_invert=0.0, p_colour=1.0)
    s3, q3 = _modality_shift(np.random.default_rng(0), cfg, s, s)
    np.testing.assert_array_equal(s3, q3)  # one mixing for both
    assert not np.allclose(s3, s)


def test_warm_start_adds_the_fit_without_changing_the_output(tmp_path: Path) -> None:
    from dataclasses import replace

    from napari_revolver.core.model.guided_net import GuidedNet
    from napari_revolver.core.model.registry import build_model
    from napari_revolver.core.train import TrainConfig, _optimizer, warm_start
    from napari_revolver.core.weights import save_weights

    torch.manual_seed(0)
    cfg = build_model("revolver-tiny").config
    assert cfg.task_fit
    old = GuidedNet(replace(cfg, task_fit=False)).eval()
    path = save_weights(old, tmp_path / "old.safetensors")
    new = GuidedNet(cfg)
    added = warm_start(new, path)
    assert sorted(added) == [
        "segmentor.fine_fuse.weight",
        "segmentor.fit.gain",
        "segmentor.fit.gain_mass",
        "segmentor.fit.log_floor",
        "segmentor.fit.log_strength",
        "segmentor.fuse.weight",
    ]
    new.eval()
    x = torch.randn(2, 3, 64, 64)
    masks = torch.rand(1, 2, 16, 16) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(old(x[:1], masks, x[1:]), new(x[:1], masks, x[1:]))
    # The fit's four scalars learn ten times faster than the convolutions, without decay.
    groups = _optimizer(new, TrainConfig()).param_groups
    assert [len(g["params"]) for g in groups][1] == 4
    assert groups[1]["lr_scale"] == 10.0 and groups[1]["weight_decay"] == 0.0
