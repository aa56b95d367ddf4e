"""The follower of object tasks through z and t: wiring, ends, files, and that it learns."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_revolver.core.click_training import ObjectSource, refiner_loss
from napari_revolver.core.evaluate import foreground_iou
from napari_revolver.core.follow_training import (
    FollowTrainConfig,
    _Step,
    follow_sample,
    train_follower,
)
from napari_revolver.core.model.click_refiner import ClickRefiner, RefinerConfig
from napari_revolver.core.objects import (
    _follower_masks,
    _tracks,
    innermost,
    look_fit,
    memory_probability,
)
from napari_revolver.core.predictor import RevolverPredictor
from napari_revolver.core.weights import (
    default_refiner_path,
    in_memory_weights,
    load_refiner,
    load_weights,
    save_refiner,
    save_weights,
)


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _drifting(n: int, step: float, seed: int, shape: tuple[int, int] = (64, 64)) -> tuple:
    """A bright disc moving ``step`` pixels to the right per slice, a fixed one beside it."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(7, 9)
    cy, cx = rng.uniform(24, 40), rng.uniform(14, 20)
    labels = np.zeros((n, *shape), np.int64)
    for z in range(n):
        labels[z][_disc(shape, 48 if cy < 32 else 14, 50, 6)] = 2
        labels[z][_disc(shape, cy, cx + step * z, r)] = 1
    images = (labels > 0).astype(np.float32) + 0.1 * rng.standard_normal(labels.shape)
    return images.astype(np.float32), labels


def _follower(predictor: RevolverPredictor, **kw: object) -> ClickRefiner:
    channels = predictor.model.config.feature_fine_channels
    return ClickRefiner(RefinerConfig(feature_channels=channels, **kw))  # type: ignore[arg-type]


def _follow(predictor: RevolverPredictor, images: np.ndarray, z: int, yx: tuple) -> np.ndarray:
    predictor.set_volume(images)
    task = predictor.guide([[z, *yx]], [1], kind="object")
    out = np.zeros(images.shape, np.uint32)
    for step in predictor.propagate(task):
        out[step.index] = step.result
    return out


# ---------------------------------------------------------------------------- wiring
def test_an_untrained_follower_carries_the_mask_over(predictor: RevolverPredictor) -> None:
    images, labels = _drifting(5, 0.0, 0)
    predictor.follower = _follower(predictor, size=48, previous_image=True).eval()  # a copy
    yx = innermost(labels[2] == 1)
    out = _follow(predictor, images, 2, yx)
    clicked = out[2] == 1
    assert clicked.any()
    for z in (0, 1, 3, 4):
        assert foreground_iou(out[z] == 1, clicked) > 0.9


def test_a_follower_moves_objects_through_z_and_across_t(predictor: RevolverPredictor) -> None:
    images, labels = _drifting(3, 0.0, 3)
    tz = np.stack([images, images])  # (T, Z, Y, X): two timepoints of the same stack
    predictor.follower = _follower(predictor, size=48).eval()
    predictor.set_volume(tz)
    yx = innermost(labels[1] == 1)
    task = predictor.guide([[0, 1, *yx]], [1], kind="object")
    out = {step.index: step.result for step in predictor.propagate(task)}
    assert sorted(out) == [(t, z) for t in range(2) for z in range(3)]
    clicked = out[(0, 1)] == 1
    assert clicked.any()
    for key, res in out.items():
        assert foreground_iou(res == 1, clicked) > 0.9, key


def test_a_follower_that_sees_nothing_ends_the_object_there(
    predictor: RevolverPredictor,
) -> None:
    images, labels = _drifting(5, 0.0, 1)
    follower = _follower(predictor, size=48).eval()
    with torch.no_grad():
        follower.out.bias.fill_(-20.0)
    predictor.follower = follower
    predictor.set_volume(images)
    task = predictor.guide([[2, *innermost(labels[2] == 1)]], [1], kind="object")
    events = [e for step in predictor.propagate(task) for e in step.events]
    assert sorted(e.index for e in events) == [(1,), (3,)]
    assert all("nothing probable" in e.reason for e in events)


def _vanishing(n: int, until: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc on slices ``0 .. until - 1`` of ``n``, gone after; noise everywhere."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 96, 96), np.int64)
    labels[:until][:, _disc((96, 96), 48, 44, 18)] = 1
    images = labels.astype(np.float32) + 0.1 * rng.standard_normal(labels.shape)
    return images.astype(np.float32), labels


def test_an_object_ends_where_its_look_is_gone_though_the_follower_carries_it(
    predictor: RevolverPredictor,
) -> None:
    images, labels = _vanishing(6, 3, 2)
    predictor.follower = _follower(predictor, size=48).eval()  # a copy: never lets go
    predictor.set_volume(images)
    task = predictor.guide([[1, *innermost(labels[1] == 1)]], [1], kind="object")
    task = replace(task, object_masks=(((1,), labels[1] == 1),))  # painted: the tiny net is blind
    steps = list(predictor.propagate(task))
    out = {s.index: s.result for s in steps}
    events = [e for s in steps for e in s.events]
    assert [e.index for e in events] == [(3,)]
    assert "no longer looks like the object" in events[0].reason
    for z in (0, 2):
        assert foreground_iou(out[(z,)] == 1, labels[z] == 1) > 0.9
    assert not (out[(3,)] == 1).any() and not (out[(5,)] == 1).any()
    # Without the look, the watershed's region decides, as it did before the look.
    predictor.follow_params = replace(predictor.follow_params, look=None)
    events = [e for s in predictor.propagate(task) for e in s.events]
    assert events and not any("look" in e.reason for e in events)


def test_the_look_fit_tells_the_objects_from_their_surroundings(
    predictor: RevolverPredictor,
) -> None:
    images, labels = _vanishing(3, 3, 4)
    predictor.set_volume(images)
    task = predictor.guide([[1, *innermost(labels[1] == 1)]], [1], kind="object")
    [track] = _tracks([task], predictor.info)
    track.masks[(1,)] = labels[1] == 1
    fit = look_fit(predictor, [track], band=4)
    assert fit is not None and fit.active
    seen = predictor.fit_probability(0, fit)
    assert seen[labels[0] == 1].mean() > 0.7 and seen[labels[0] == 0].mean() < 0.3
    # Nothing to fit on (no anchor mask yet): no look.
    track.masks.clear()
    assert look_fit(predictor, [track], band=4) is None


def test_the_predictor_refuses_a_follower_of_other_features(
    predictor: RevolverPredictor,
) -> None:
    assert predictor.follower is None  # in-memory test weights have none
    with pytest.raises(ValueError, match="follower reads 999 feature channels"):
        predictor.follower = ClickRefiner(RefinerConfig(feature_channels=999))


def test_overlapping_claims_go_to_the_more_probable_object(
    predictor: RevolverPredictor,
) -> None:
    # Two touching objects, each carried over by a follower that also claims its whole window
    # (a low logit around the previous mask, a high one on it): where the windows overlap, a
    # pixel goes to the higher logit, never to both.
    from napari_revolver.core.objects import FollowParams

    shape = (64, 64)
    a, b = _disc(shape, 32, 22, 8), _disc(shape, 32, 39, 8)
    images = np.stack([(a | b).astype(np.float32)] * 2)
    predictor.set_volume(images)
    follower = _follower(predictor, size=48).eval()
    with torch.no_grad():
        follower.out.bias.fill_(4.5)  # logit 8.5 on the previous mask, 0.5 around it
    predictor.follower = follower
    tracks = [_track(predictor, m, 0) for m in (a, b)]
    prob = np.zeros(shape, np.float32)
    new_a, new_b = _follower_masks(predictor, prob, (1,), tracks, FollowParams())
    assert new_a is not None and new_b is not None
    assert not (new_a & new_b).any()
    assert new_a[a].mean() > 0.95 and new_b[b].mean() > 0.95
    assert new_a.sum() > a.sum() and new_b.sum() > b.sum()  # each also took free pixels


def test_follow_step_is_following_of_one_object(predictor: RevolverPredictor) -> None:
    # The single-object step that training rolls out draws what following draws for an object
    # with no competitor: the follower's mask that touches the previous mask's core.
    from napari_revolver.core.objects import FollowParams, follow_step

    images, labels = _drifting(3, 3.0, 4)
    predictor.set_volume(images)
    follower = _follower(predictor, size=48).eval()
    with torch.no_grad():
        follower.out.bias.fill_(4.5)  # claims the window around the previous mask too
    predictor.follower = follower
    prev = labels[0] == 1
    track = _track(predictor, prev, 0)
    prob = memory_probability(predictor, (1,), predictor.guidance_of([track.task]), [((0,), prev)])
    (expected,) = _follower_masks(predictor, prob, (1,), [track], FollowParams())
    got = follow_step(follower, *predictor.refiner_slice(1), prob, prev)
    assert expected is not None and got is not None
    np.testing.assert_array_equal(got, expected)
    assert got.sum() > prev.sum()
    with torch.no_grad():
        follower.out.bias.fill_(-20.0)
    assert follow_step(follower, *predictor.refiner_slice(1), prob, prev) is None


def test_a_rolled_out_sample_starts_from_the_followers_own_mask(
    tiny_model: torch.nn.Module,
) -> None:
    # An untrained follower copies its selection: carried from k slices back, the previous mask
    # of a sample is the object's mask k slices back, not the one on the step's slice.
    from napari_revolver.core.follow_training import _carried

    weights = in_memory_weights(tiny_model.eval())
    images, labels = _drifting(6, 3.0, 5)
    labels[5][labels[5] == 1] = 0  # the object is gone from the last slice
    src = ObjectSource.build("drift", weights, images, labels)
    channels = tiny_model.config.feature_fine_channels
    follower = ClickRefiner(RefinerConfig(size=40, feature_channels=channels)).eval()
    disc = [labels[z] == 1 for z in range(6)]

    def carried(p: int, d: int, most: int) -> np.ndarray | None:
        return _carried(follower, _Step(src, p, d, 1, False), None, most)

    np.testing.assert_array_equal(carried(4, 1, 2), disc[2])  # copied over slices 3 and 4
    np.testing.assert_array_equal(carried(1, 1, 3), disc[0])  # no farther back than slice 0
    np.testing.assert_array_equal(carried(2, -1, 3), disc[4])  # slice 5 has no object
    assert carried(0, 1, 2) is None  # nothing before the first slice
    assert carried(4, -1, 2) is None  # nor after the object's last one
    # A sample with a rollout reads the carried mask: its window is where the object was.
    x_true, _ = follow_sample(follower, _Step(src, 3, 1, 1, False), None, 0)
    x_carried, _ = follow_sample(follower, _Step(src, 3, 1, 1, False), None, 3)
    assert not torch.equal(x_true, x_carried)


# ---------------------------------------------------------------------------- files
def test_a_follower_beside_the_weights_is_loaded_and_used(
    tiny_model: torch.nn.Module, tmp_path: Path
) -> None:
    weights = save_weights(tiny_model, tmp_path / "tiny.safetensors")
    sha = load_weights(weights).sha256
    channels = tiny_model.config.feature_fine_channels
    follower = ClickRefiner(RefinerConfig(size=32, feature_channels=channels))
    path = default_refiner_path(weights, "follow")
    assert path.name == "tiny-follow.safetensors"
    save_refiner(follower, path, {"base_sha256": sha, "role": "follow"})
    loaded = load_weights(weights)
    assert loaded.follower is not None and loaded.refiner is None
    assert RevolverPredictor(loaded, device="cpu").follower is not None
    (tmp_path / "tiny-follow.json").write_text(json.dumps({"sha256": "1" * 64}))
    assert load_weights(weights).follower is None  # a corrupt one is left out, with a warning
    with pytest.raises(ValueError, match="role"):
        default_refiner_path(weights, "other")  # type: ignore[arg-type]


def test_shipped_weights_and_follower_belong_together() -> None:
    w = load_weights()
    if w.follower is None:
        pytest.skip("no follower shipped beside the weights")
    c = w.model.config
    assert w.follower.config.feature_channels in (c.fine_channels, c.feature_fine_channels)


# ---------------------------------------------------------------------------- learning
def test_follower_learns_to_keep_up_with_a_drifting_object(tiny_model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    weights = in_memory_weights(tiny_model.eval())
    train = [ObjectSource.build("drift", weights, *_drifting(4, 5.0, s)) for s in range(4)]
    held_out = [ObjectSource.build("drift", weights, *_drifting(4, 5.0, 50 + s)) for s in range(3)]
    channels = tiny_model.config.feature_fine_channels
    cfg = RefinerConfig(size=40, feature_channels=channels, width=12, mid_width=16)
    follower = ClickRefiner(cfg)

    def score() -> float:
        follower.eval()
        ious = []
        for src in held_out:
            for p in range(3):
                predictor = src.predictor
                predictor.follower = follower
                prev = src.labels[p] == 1
                track = _track(predictor, prev, p)
                guidance = predictor.guidance_of([track.task])
                prob = memory_probability(predictor, (p + 1,), guidance, [((p,), prev)])
                (new,) = _follower_masks(predictor, prob, (p + 1,), [track], _params())
                new = np.zeros_like(prev) if new is None else new
                ious.append(foreground_iou(new, src.labels[p + 1] == 1))
                predictor.follower = None
        return float(np.mean(ious))

    before = score()
    opt = torch.optim.Adam(follower.parameters(), lr=3e-3)
    for _ in range(60):
        follower.train()
        steps = [
            _Step(src, int(rng.integers(3)), 1, 1, False)
            for src in (train[int(rng.integers(4))] for _ in range(8))
        ]
        batch = [follow_sample(follower, s, rng) for s in steps]
        loss = refiner_loss(
            follower(torch.stack([b[0] for b in batch])), torch.stack([b[1] for b in batch])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = score()
    assert before < 0.7  # a copy of the last mask lags behind
    assert after > before + 0.15


def _params():  # type: ignore[no-untyped-def]
    from napari_revolver.core.objects import FollowParams

    return FollowParams()


def _track(predictor: RevolverPredictor, prev: np.ndarray, p: int):  # type: ignore[no-untyped-def]
    from napari_revolver.core.objects import _Track

    task = predictor.guide([[p, *innermost(prev)]], [1], kind="object")
    return _Track(task, {(p + 1,): (1, (p,)), (p,): (0, (p,))}, {(p,): prev}, {})


def test_training_steps_end_objects_only_where_they_are_gone() -> None:
    from napari_revolver.core.follow_training import _steps_of

    labels = np.zeros((9, 32, 32), np.int64)
    labels[2:5, 8:20, 8:20] = 1  # an object through slices 2-4
    labels[7, 4:12, 20:28] = 2  # an id on one slice only
    objects = [(z, 1) for z in (2, 3, 4)] + [(7, 2)]
    src = ObjectSource("stack", None, labels, objects)  # type: ignore[arg-type]
    onto, ends = _steps_of(src, np.random.default_rng(0))
    assert sorted((s.p, s.d) for s in onto) == [(2, 1), (3, -1), (3, 1), (4, -1)]
    real = sorted((s.p, s.d) for s in ends if abs(s.d) == 1)
    assert real == [(2, -1), (4, 1)]  # not from the single-slice id 2
    for s in ends:
        q = s.p + s.d
        assert s.end and not (labels[max(0, q - 1) : q + 2] == s.oid).any() or abs(s.d) == 1
        assert s.oid == 1


def test_follower_training_runs_checkpoints_and_resumes(tmp_path: Path) -> None:
    cfg = FollowTrainConfig(
        out=str(tmp_path / "run"),
        steps=2,
        batch=4,
        synthetic=2,
        depth=4,
        side=96,
        val_every=2,
        val_objects=1,
        refiner=RefinerConfig(size=32, width=8, mid_width=8, dilations=(1,)),
    )
    best = train_follower(cfg)
    assert best.exists() and (tmp_path / "run" / "checkpoint.pt").exists()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and "watershed" in log[0]
    assert log[-1]["step"] == 2 and "iou3d" in log[-1]["val"]
    cfg.steps = 3
    train_follower(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val" in r] == [2, 3]  # resumed, not restarted
    assert load_refiner(best).config.size == 32


def test_train_follow_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from napari_revolver.cli import main

    run = tmp_path / "run"
    args = ["train-follow", "--out", str(run), "--steps", "1", "--batch", "2"]
    args += ["--synthetic", "2", "--val-every", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"best follower: {run / 'best.safetensors'}" in out
    assert load_refiner(run / "best.safetensors", load_weights().sha256) is not None
