"""Snapping followed masks to the image's edges (core/snap.py) and its use in following."""

from __future__ import annotations

import numpy as np
import pytest

from napari_revolver.core.evaluate import foreground_iou
from napari_revolver.core.predictor import RevolverPredictor
from napari_revolver.core.snap import boundary_kind, edge_landscape, smoothed, snap_masks


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


SHAPE = (96, 96)
DISC = _disc(SHAPE, 48, 48, 20)
RIM = DISC & ~_disc(SHAPE, 48, 48, 18)  # a two-pixel wall on the disc's edge


def _noisy(image: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (image + 0.05 * rng.standard_normal(image.shape)).astype(np.float32)


@pytest.mark.parametrize(
    ("image", "kind"),
    [
        (0.2 + 0.8 * RIM, "ridge"),  # a membrane-stained cell: the wall is bright
        (1.0 - 0.8 * RIM, "valley"),  # an organelle in a dark membrane
        (0.1 + 0.8 * DISC, "step"),  # a nucleus
        (0.9 - 0.8 * DISC, "step"),  # a dark nucleus on a light ground
    ],
)
def test_the_kind_of_edge_is_read_under_the_mask(image: np.ndarray, kind: str) -> None:
    lum = smoothed(_noisy(image))
    assert boundary_kind(lum, DISC) == kind


def test_boundary_kind_refuses_an_empty_or_misshapen_mask() -> None:
    lum = smoothed(np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError, match="non-empty mask of the slice's shape"):
        boundary_kind(lum, np.zeros(SHAPE, bool))
    with pytest.raises(ValueError, match=r"\(96, 96\)"):
        boundary_kind(lum, np.ones((10, 10), bool))


def test_edge_landscape_of_each_kind() -> None:
    lum = smoothed(_noisy(0.1 + 0.8 * DISC))
    np.testing.assert_array_equal(edge_landscape(lum, "ridge"), lum)
    np.testing.assert_array_equal(edge_landscape(lum, "valley"), -lum)
    step = edge_landscape(lum, "step")
    assert step[RIM].mean() > 5 * step[_disc(SHAPE, 48, 48, 10)].mean()
    with pytest.raises(ValueError, match="kind must be"):
        edge_landscape(lum, "edge")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("image", "kind"),
    [(0.1 + 0.8 * DISC, "step"), (0.2 + 0.8 * RIM, "ridge"), (1.0 - 0.8 * RIM, "valley")],
)
def test_a_shifted_mask_snaps_back_onto_the_object(image: np.ndarray, kind: str) -> None:
    # The object moved 4 px since the last slice: its carried mask is off; snapping puts the
    # rim back on the edge, and never farther than the band.
    lum = smoothed(_noisy(image, 1))
    carried = np.roll(DISC, (3, -3), axis=(0, 1))
    (snapped,) = snap_masks(lum, [carried], [kind], 0.25)
    # A wall's edge is its middle line (radius 19); a step's is where the disc ends.
    truth = DISC if kind == "step" else _disc(SHAPE, 48, 48, 19)
    assert foreground_iou(carried, truth) < 0.82
    assert foreground_iou(snapped, truth) > 0.95
    from scipy import ndimage

    band = ndimage.distance_transform_edt(~carried) <= round(0.25 * 20)
    assert not (snapped & ~band).any()


def test_touching_cells_share_the_wall_between_them() -> None:
    # Two membrane-stained cells side by side; each carried mask reaches over the wall into the
    # other. Snapped, they are disjoint, and each stops at the wall.
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    wall = (np.abs(xx - 48) <= 1) | (np.abs(yy - 20) <= 1) | (np.abs(yy - 76) <= 1)
    wall |= (np.abs(xx - 12) <= 1) | (np.abs(xx - 84) <= 1)
    left = (yy > 21) & (yy < 75) & (xx > 13) & (xx < 47)
    right = (yy > 21) & (yy < 75) & (xx > 49) & (xx < 83)
    lum = smoothed(_noisy(0.2 + 0.8 * wall, 2))
    a, b = np.roll(left, 5, axis=1), np.roll(right, -5, axis=1)
    assert (a & b).any() or (a & right).any()
    sa, sb = snap_masks(lum, [a, b], ["ridge", "ridge"], 0.3)
    assert not (sa & sb).any()
    assert foreground_iou(sa, left) > 0.85 and foreground_iou(sb, right) > 0.85


def test_snap_masks_wants_one_kind_per_mask() -> None:
    with pytest.raises(ValueError, match="one kind per mask"):
        snap_masks(np.zeros(SHAPE, np.float32), [DISC], [], 0.25)


def test_following_snaps_a_drifting_object_onto_its_edges(
    predictor: RevolverPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bright disc moving 2 px per slice (less than the band, a quarter of its radius 12),
    # followed from its true mask on slice 0 by a follower that only copies the last mask:
    # snapped (the default), each slice's mask sits on the disc; unsnapped, it falls behind.
    from dataclasses import replace

    from napari_revolver.core.model.click_refiner import ClickRefiner, RefinerConfig
    from napari_revolver.core.objects import FollowParams

    n, shape = 6, (64, 64)
    truth = np.stack([_disc(shape, 32, 18 + 2 * z, 12) for z in range(n)])
    image = np.stack([_noisy(0.1 + 0.8 * t, z) for z, t in enumerate(truth)])
    import napari_revolver.core.predictor as P

    monkeypatch.setattr(  # a perfect class head: the end rules see the disc
        P.RevolverPredictor,
        "probability_with",
        lambda self, index, guidance, prior=None: truth[self.info.flat(index)] * 0.95,
    )
    predictor.set_volume(image)
    channels = predictor.model.config.feature_fine_channels
    predictor.follower = ClickRefiner(RefinerConfig(feature_channels=channels, size=48)).eval()
    task = predictor.guide([[0, 32, 18]], [1], kind="object")
    task = replace(task, object_masks=(((0,), truth[0]),))

    def ious(params: FollowParams) -> list[float]:
        predictor.follow_params = params
        out = np.zeros(truth.shape, np.uint32)
        for step in predictor.propagate(task):
            out[step.index] = step.result
        return [foreground_iou(out[z] > 0, truth[z]) for z in range(n)]

    snapped = ious(FollowParams())
    assert min(snapped) > 0.9, snapped
    copied = ious(FollowParams(snap=None))
    assert copied[-1] < 0.7, copied
