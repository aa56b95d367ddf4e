"""Tests for the few-shot evaluation (``core.evaluate``) and ``revolver eval``.

Small seeded stacks and the untrained tiny model: the network's numbers are meaningless here,
only their shape, range and determinism are checked; the random forest is a real classifier and
is checked for quality on an easy stack.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_revolver import cli
from napari_revolver.core.evaluate import (
    EvalResult,
    RandomForestBaseline,
    evaluate_few_shot,
    format_table,
    sample_support_points,
)
from napari_revolver.core.model.registry import build_model
from napari_revolver.core.predictor import RevolverPredictor

REQUIRED_KEYS = {"method", "points", "iou_mean", "iou_std", "seconds_per_slice"}


def blob_stack(
    n: int = 4, size: int = 48, radius: float = 6.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Three bright discs, jittered from slice to slice, on a noisy dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    labels = np.zeros((n, size, size), np.uint8)
    centres = rng.uniform(0.25, 0.75, (3, 2)) * size
    for k in range(n):
        for cy, cx in centres + rng.normal(0, 1.5, (3, 2)):
            labels[k][(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = 1
    noise = 0.1 * rng.standard_normal(labels.shape).astype(np.float32)
    return labels.astype(np.float32) + noise, labels


@pytest.fixture
def tiny_predictor() -> RevolverPredictor:
    torch.manual_seed(0)
    return RevolverPredictor(model=build_model("revolver-tiny"), device="cpu")


@pytest.fixture
def stack() -> tuple[np.ndarray, np.ndarray]:
    return blob_stack()


def _check_row(r: EvalResult) -> None:
    assert r.method in ("revolver", "rf", "dense")
    assert 0.0 <= r.iou_mean <= 1.0
    assert 0.0 <= r.iou_std <= 0.5
    assert r.seconds_per_slice > 0
    d = r.to_dict()
    assert REQUIRED_KEYS <= set(d)
    json.dumps(d)


# ----------------------------------------------------------------------------------- sampling


def test_sample_support_points_lie_in_the_mask_without_replacement() -> None:
    mask = np.zeros((20, 30), bool)
    mask[5:10, 3:8] = True
    pts = sample_support_points(np.random.default_rng(0), mask, 10)
    assert pts.shape == (10, 2)
    yx = pts.astype(int)
    assert mask[yx[:, 0], yx[:, 1]].all()
    assert len({tuple(p) for p in yx.tolist()}) == 10
    again = sample_support_points(np.random.default_rng(0), mask, 10)
    np.testing.assert_array_equal(pts, again)


def test_sample_support_points_repeats_only_when_the_mask_is_too_small() -> None:
    mask = np.zeros((8, 8), bool)
    mask[2, 3] = mask[6, 1] = True
    pts = sample_support_points(np.random.default_rng(0), mask, 5).astype(int)
    assert pts.shape == (5, 2)
    assert {tuple(p) for p in pts.tolist()} <= {(2, 3), (6, 1)}
    with pytest.raises(ValueError, match="no pixel"):
        sample_support_points(np.random.default_rng(0), np.zeros((8, 8), bool), 1)


# --------------------------------------------------------------------------------- evaluation


def test_results_have_the_documented_fields(tiny_predictor, stack) -> None:
    image, labels = stack
    calls: list[tuple[int, int]] = []
    res = evaluate_few_shot(
        tiny_predictor,
        image,
        labels,
        points=(1, 5, "dense"),
        seeds=2,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert [(r.method, r.points) for r in res] == [
        ("revolver", "1"),
        ("revolver", "5"),
        ("dense", "dense"),
    ]
    for r in res:
        _check_row(r)
        assert r.support == (0,)
        assert r.n_queries == 3
    assert [r.seeds for r in res] == [2, 2, 1]
    assert res[-1].iou_std == 0.0
    assert calls and calls[-1][0] == calls[-1][1]
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:], strict=False))
    table = format_table(res)
    assert table.count("\n") == len(res) + 1
    assert "| revolver | 5 |" in table


def test_rows_count_the_tasks_that_chose_a_pixel_fit(tiny_predictor, stack) -> None:
    image, labels = stack
    res = evaluate_few_shot(tiny_predictor, image, labels, support=0, points=(2, "dense"), seeds=2)
    # The dense row's one task is the one guide_labels makes of the same painted slice.
    painted = {0: np.where(labels[0] > 0, 1, 2).astype(np.uint8)}
    fit = tiny_predictor.guide_labels(painted, fit=True).pixel_fit
    expected = int(fit is not None and fit.active)
    assert res[1].fits_used == expected
    # The points row counts its seeds' tasks: the same points (seeded), guided as it guides.
    chosen = 0
    for seed in range(2):
        rng = np.random.default_rng(seed)
        pos = sample_support_points(rng, labels[0] > 0, 2)
        neg = sample_support_points(rng, labels[0] == 0, 2)
        pts = np.column_stack([np.zeros(4), np.concatenate([pos, neg])])
        task = tiny_predictor.guide(pts, np.array([1, 1, 0, 0]), fit=True)
        chosen += task.pixel_fit is not None and task.pixel_fit.active
    assert res[0].fits_used == chosen
    assert res[0].to_dict()["fits_used"] == res[0].fits_used
    off = evaluate_few_shot(
        tiny_predictor, image, labels, support=0, points=(2, "dense"), seeds=2, pixel_fit=False
    )
    assert [r.fits_used for r in off] == [0, 0]
    # Followed by position, a task keeps the network: its fit is not counted either.
    local = evaluate_few_shot(
        tiny_predictor, image, labels, support=0, points=(2,), seeds=2, local=True
    )
    assert local[0].fits_used == 0
    assert "| 0 of 2 |" in format_table(off) and "| 0 of 1 |" in format_table(off)


def test_fixed_queries_are_the_only_slices_scored(tiny_predictor, stack) -> None:
    image, labels = stack
    one = evaluate_few_shot(tiny_predictor, image, labels, support=0, queries=[3], points=(2,))
    two = evaluate_few_shot(tiny_predictor, image, labels, support=(0, 1), queries=[3], points=(2,))
    assert one[0].n_queries == two[0].n_queries == 1
    alone = evaluate_few_shot(tiny_predictor, image[[0, 3]], labels[[0, 3]], support=0, points=(2,))
    assert one[0].iou_mean == pytest.approx(alone[0].iou_mean, abs=1e-6)


def test_same_seeds_give_the_same_numbers(tiny_predictor, stack) -> None:
    image, labels = stack
    a = evaluate_few_shot(tiny_predictor, image, labels, points=(2,), seeds=2, baselines=("rf",))
    b = evaluate_few_shot(tiny_predictor, image, labels, points=(2,), seeds=2, baselines=("rf",))
    assert [(r.method, r.iou_mean, r.iou_std) for r in a] == [
        (r.method, r.iou_mean, r.iou_std) for r in b
    ]


def test_points_are_drawn_per_support_slice_from_foreground_and_background(
    tiny_predictor, stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, labels = stack
    guided: list[tuple[np.ndarray, np.ndarray]] = []
    real_guide = tiny_predictor.guide

    def spy(points, labels_, **kwargs):
        guided.append((np.asarray(points), np.asarray(labels_)))
        return real_guide(points, labels_, **kwargs)

    monkeypatch.setattr(tiny_predictor, "guide", spy)
    res = evaluate_few_shot(tiny_predictor, image, labels, support=(0, 2), points=(3,), seeds=2)
    assert res[0].support == (0, 2)
    assert res[0].n_queries == 2
    assert len(guided) == 2  # one task per seed, guided on both support slices at once
    for pts, lab in guided:
        assert pts.shape == (12, 3)
        for s in (0, 2):
            on = pts[:, 0] == s
            assert on.sum() == 6 and (lab[on] == 1).sum() == 3
            yx = pts[on, 1:].astype(int)
            assert (labels[s][yx[:, 0], yx[:, 1]] > 0).tolist() == (lab[on] == 1).tolist()
    assert not np.array_equal(guided[0][0], guided[1][0])  # seeds differ


def test_dense_baseline_guides_with_every_support_mask(
    tiny_predictor, stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, labels = stack
    painted: list[list[int]] = []
    real = tiny_predictor.guide_labels

    def spy(slices, **kwargs):
        painted.append(sorted(int(k) for k in slices))
        for k, lab in slices.items():
            # Every pixel annotated: 1 where the labels are foreground, 2 elsewhere.
            np.testing.assert_array_equal(lab, np.where(labels[k] > 0, 1, 2))
        return real(slices, **kwargs)

    monkeypatch.setattr(tiny_predictor, "guide_labels", spy)
    res = evaluate_few_shot(
        tiny_predictor, image, labels, support=[1, 3], points=(1,), seeds=1, baselines=["dense"]
    )
    assert [(r.method, r.points) for r in res] == [("revolver", "1"), ("dense", "dense")]
    assert painted == [[1, 3]]  # one task from both slices, so one pixel fit of both
    _check_row(res[1])
    # "dense" both as a budget and as a baseline gives one dense row, where points put it.
    painted.clear()
    res = evaluate_few_shot(
        tiny_predictor, image, labels, points=("dense", 1), seeds=1, baselines=("dense",)
    )
    assert [(r.method, r.points) for r in res] == [("dense", "dense"), ("revolver", "1")]
    assert painted == [[0]]


def test_tasks_decide_on_a_pixel_fit_unless_told_not_to(
    tiny_predictor, stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, labels = stack
    asked: list[tuple[str, object]] = []
    guide, guide_labels = tiny_predictor.guide, tiny_predictor.guide_labels

    def spy_guide(*args, **kwargs):
        asked.append(("clicks", kwargs.get("fit")))
        return guide(*args, **kwargs)

    def spy_labels(*args, **kwargs):
        asked.append(("dense", kwargs.get("fit", True)))
        return guide_labels(*args, **kwargs)

    monkeypatch.setattr(tiny_predictor, "guide", spy_guide)
    monkeypatch.setattr(tiny_predictor, "guide_labels", spy_labels)
    evaluate_few_shot(tiny_predictor, image, labels, points=(2, "dense"), seeds=1)
    assert asked == [("clicks", True), ("dense", True)]  # as the CLI and the plugin do
    asked.clear()
    evaluate_few_shot(tiny_predictor, image, labels, points=(2, "dense"), seeds=1, pixel_fit=False)
    assert asked == [("clicks", False), ("dense", False)]


def test_label_value_selects_the_foreground(tiny_predictor, stack) -> None:
    image, labels = stack
    labels = labels * 2
    labels[:, :4, :4] = 5
    res = evaluate_few_shot(tiny_predictor, image, labels, points=("dense",), label_value=2)
    _check_row(res[0])
    with pytest.raises(ValueError, match="no foreground"):
        evaluate_few_shot(tiny_predictor, image, labels, points=(1,), label_value=3)


def test_random_forest_baseline_segments_an_easy_stack(tiny_predictor) -> None:
    image, labels = blob_stack(size=64, radius=10.0)
    res = evaluate_few_shot(tiny_predictor, image, labels, points=(5,), seeds=3, baselines=("rf",))
    assert [r.method for r in res] == ["revolver", "rf"]
    rf = res[1]
    _check_row(rf)
    assert rf.seeds == 3 and rf.n_queries == 3
    assert rf.iou_mean > 0.5, rf


def test_random_forest_names_the_extra_when_its_dependencies_are_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.ensemble", None)
    with pytest.raises(ImportError, match=r"napari-revolver\[bench\]"):
        RandomForestBaseline()


@pytest.mark.parametrize(
    ("kwargs", "edit", "match"),
    [
        ({}, "labels_shape", r"shapes differ.*\(4, 48, 48\).*\(4, 48, 40\)"),
        ({}, "one_slice", r"at least 2 slices.*got 1"),
        ({"support": 4}, None, r"support slice 4 is out of range.*\[0, 3\]"),
        ({"support": (0, -1)}, None, r"support slice -1 is out of range"),
        ({"support": (0, 1, 2, 3)}, None, r"query slice"),
        ({"support": 1}, "empty_support", r"support slice 1 has no foreground"),
        ({"support": 2}, "full_support", r"support slice 2 has no background"),
        ({"points": (0,)}, None, r"points per class must be >= 1.*got 0"),
        ({"points": ("many",)}, None, r"positive integers or 'dense'"),
        ({"baselines": ("unet",)}, None, r"unknown baseline.*unet.*'rf', 'dense'"),
        ({"seeds": 0}, None, r"seeds must be an integer >= 1"),
        ({"queries": (0, 2)}, None, r"not support slices \[0\]; got \[0, 2\]"),
        ({"queries": (9,)}, None, r"slice indices in \[0, 3\]"),
        ({"queries": ()}, None, r"queries must be"),
    ],
)
def test_invalid_inputs_raise_clear_errors(tiny_predictor, stack, kwargs, edit, match) -> None:
    image, labels = stack
    labels = labels.copy()
    if edit == "labels_shape":
        labels = labels[..., :40]
    elif edit == "one_slice":
        image, labels = image[:1], labels[:1]
    elif edit == "empty_support":
        labels[1] = 0
    elif edit == "full_support":
        labels[2] = 1
    with pytest.raises(ValueError, match=match):
        evaluate_few_shot(tiny_predictor, image, labels, **kwargs)


# ---------------------------------------------------------------------------------------- CLI


@pytest.fixture
def eval_files(tmp_path: Path, stack) -> tuple[Path, Path]:
    image, labels = stack
    img = tmp_path / "image.tif"
    lab = tmp_path / "labels.tif"
    tifffile.imwrite(
        img, np.clip(image * 1000 + 200, 0, None).astype(np.uint16), photometric="minisblack"
    )
    tifffile.imwrite(lab, labels, photometric="minisblack")
    return img, lab


def test_cli_eval_json(eval_files, tiny_weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img, lab = eval_files
    code = cli.main(
        [
            "eval",
            str(img),
            str(lab),
            "--points",
            "1,dense",
            "--seeds",
            "2",
            "--support-slices",
            "0,2",
            "--baseline",
            "rf",
            "--baseline",
            "dense",
            "--weights",
            str(tiny_weights),
            "--device",
            "cpu",
            "--json",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    assert list(doc) == ["results"]
    rows = doc["results"]
    assert [(r["method"], r["points"]) for r in rows] == [
        ("revolver", "1"),
        ("rf", "1"),
        ("dense", "dense"),
        ("rf", "dense"),  # the forest also learns from the whole support masks
    ]
    for r in rows:
        assert REQUIRED_KEYS <= set(r)
        assert 0.0 <= r["iou_mean"] <= 1.0
        assert r["support"] == [0, 2]


def test_cli_eval_table_and_errors(
    eval_files, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img, lab = eval_files
    base = ["eval", str(img), str(lab), "--weights", str(tiny_weights), "--device", "cpu"]
    assert cli.main([*base, "--points", "2", "--seeds", "1", "--support", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| method |")
    assert "| revolver | 2 |" in out and "protocol:" in out
    assert cli.main([*base, "--points", "2", "--seeds", "1", "--no-pixel-fit"]) == 0
    assert "| revolver | 2 |" in capsys.readouterr().out
    assert cli.main([*base, "--support", "9"]) == 1
    assert "revolver: error: support slice 9 is out of range" in capsys.readouterr().err
    assert cli.main([*base, "--support-slices", "0,x"]) == 1
    assert "--support-slices expects comma-separated integers" in capsys.readouterr().err


def test_cli_eval_local_and_invert_change_the_network_scores(
    eval_files, capsys: pytest.CaptureFixture[str]
) -> None:
    img, lab = eval_files
    base = ["eval", str(img), str(lab), "--points", "dense"]  # the shipped weights
    scores = {}
    for extra in ([], ["--local"], ["--invert"]):
        assert cli.main([*base, *extra, "--device", "cpu", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)["results"]
        scores[" ".join(extra)] = rows[0]["iou_mean"]
    assert scores["--local"] != scores[""]
    # Bright blobs read as dark ones: the network no longer finds them as well.
    assert scores["--invert"] < scores[""]
