"""Class instances linked through z and t by overlap."""

from __future__ import annotations

import numpy as np

from napari_revolver.core.predictor import RevolverPredictor
from napari_revolver.core.tracking import InstanceLinker, match_instances
from napari_revolver.core.volume import VolumeInfo


def _info(lead: tuple[int, ...]) -> VolumeInfo:
    return VolumeInfo((*lead, 32, 32), lead, (32, 32), False, "x")


def _slice(*boxes: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros((32, 32), np.int32)
    for i, (y, x, s) in enumerate(boxes, start=1):
        out[y : y + s, x : x + s] = i
    return out


def test_match_is_one_to_one_by_iou() -> None:
    prev = _slice((2, 2, 8), (2, 20, 8))
    cur = _slice((2, 21, 8), (3, 3, 8))  # the same two, listed the other way round
    assert match_instances(cur, prev) == {1: 2, 2: 1}
    assert match_instances(_slice((20, 20, 4)), prev) == {}


def test_ids_persist_through_z_and_new_objects_get_new_ids() -> None:
    linker = InstanceLinker(_info((3,)))
    a = linker.link((0,), _slice((2, 2, 8), (2, 20, 8)))
    b = linker.link((1,), _slice((2, 21, 8), (3, 3, 8), (20, 10, 6)))
    c = linker.link((2,), _slice((20, 10, 6)))
    assert a[4, 4] == b[4, 4] and a[4, 22] == b[4, 23]
    assert b[22, 12] == 3 and c[22, 12] == 3


def test_ids_link_across_t_in_a_time_lapse_of_stacks() -> None:
    linker = InstanceLinker(_info((2, 2)))
    first = linker.link((0, 0), _slice((2, 2, 8)))
    linker.link((0, 1), _slice((20, 20, 8)))  # another object at z = 1
    later = linker.link((1, 0), _slice((3, 3, 8)))
    assert later[5, 5] == first[5, 5]


def test_propagate_instances_link_ids_through_the_stack(predictor: RevolverPredictor) -> None:
    image = np.zeros((4, 48, 48), np.float32)
    image[:, 8:20, 8:20] = 1
    image[:, 28:40, 26:40] = 1
    predictor.set_volume(image + 0.01 * np.random.default_rng(0).standard_normal(image.shape))
    task = predictor.guide([[0, 14, 14], [0, 2, 2]], [1, 0])
    out = predictor.segment(task, instances=True, threshold=0.0 + 0.5)
    ids = [set(np.unique(out[z])) - {0} for z in range(4)]
    # The same ids on every slice (the objects do not move), not new ones per slice.
    assert all(s == ids[0] for s in ids)
