"""Layer <-> core adaptors on a ViewerModel, without Qt."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari", reason="the napari tier needs napari (pip install .[dev])")

from napari.components import ViewerModel

from napari_revolver._napari import layers as L


def test_points_on_a_scaled_image_map_to_data_pixels() -> None:
    viewer = ViewerModel()
    img = viewer.add_image(
        np.zeros((4, 32, 32), np.float32), scale=(2.0, 0.5, 0.5), translate=(0, 5, 5)
    )
    pts = viewer.add_points(np.array([[2.0 * 2, 5 + 0.5 * 10, 5 + 0.5 * 20]]))
    np.testing.assert_allclose(
        L.to_image_data(pts, pts.data, img, L.world_point(viewer)), [[2, 10, 20]]
    )


def test_two_dimensional_points_over_a_stack_use_the_slice_on_screen() -> None:
    viewer = ViewerModel()
    img = viewer.add_image(np.zeros((6, 32, 32), np.float32))
    viewer.dims.current_step = (4, 0, 0)
    pts = viewer.add_points(np.array([[10.0, 20.0]]))
    np.testing.assert_allclose(
        L.to_image_data(pts, pts.data, img, L.world_point(viewer)), [[4, 10, 20]]
    )


def test_unwrap_reaches_the_layer_behind_every_proxy() -> None:
    from napari.utils._proxies import PublicOnlyProxy

    viewer = ViewerModel()
    layer = viewer.add_image(np.zeros((8, 8)))
    proxy = PublicOnlyProxy(viewer)
    a, b = proxy.layers[0], proxy.layers[0]
    assert a is not layer and a is not b  # a new proxy each time
    assert L.unwrap(a) is layer and L.unwrap(b) is layer and L.unwrap(layer) is layer
    assert L.is_alive(proxy, a) and L.is_alive(viewer, a)


def test_inside_image_uses_the_core_rounding() -> None:
    pts = np.array([[0, -0.4, 0], [0, -0.6, 0], [0, 9.4, 9.4], [0, 9.5, 0]])
    assert L.inside_image(pts, (1, 10, 10)).tolist() == [True, False, True, False]


def test_slices_read_as_prose() -> None:
    assert L.slice_text((12,)) == "slice 12"
    assert L.slice_text(()) == "the image"
    assert L.slice_text((1, 12)) == "slice 1, 12"
    assert L.slices_text([(1,), (2,), (3,), (7,)]) == "1-3, 7"
    assert L.slices_text([]) == "none"


def test_a_plain_points_layer_becomes_a_task_layer() -> None:
    viewer = ViewerModel()
    pts = viewer.add_points(np.array([[1.0, 2.0], [3.0, 4.0]]))
    L.style_task_points(pts, "#ffd11a")
    assert L.point_labels(pts).tolist() == [1, 1]
    L.set_polarity(pts, L.NEGATIVE)
    pts.add(np.array([[5.0, 6.0]]))
    assert L.point_labels(pts).tolist() == [1, 1, 0]
