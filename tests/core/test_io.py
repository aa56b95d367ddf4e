"""Tests for napari_revolver.core.io (TIFF images, label volumes, points CSV)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_revolver.core import io
from napari_revolver.core.io import (
    ImageData,
    PointTable,
    read_image,
    read_points,
    to_yx_last,
    write_labels,
    write_points,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


# --------------------------------------------------------------------------- #
# write_labels
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("shape", "expected_axes"),
    [((7, 9), "YX"), ((3, 7, 9), "ZYX"), ((2, 3, 7, 9), "TZYX")],
)
def test_write_labels_round_trip(
    tmp_path: Path, rng: np.random.Generator, shape: tuple[int, ...], expected_axes: str
) -> None:
    labels = rng.integers(0, 5, size=shape).astype(np.int64)
    target = tmp_path / "labels.tif"

    assert write_labels(target, labels) == target

    image = read_image(target)
    assert image.axes == expected_axes
    assert image.data.dtype == np.uint8
    np.testing.assert_array_equal(image.data, labels)
    assert image.scale == (1.0,) * len(shape)
    assert image.path == str(target)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("max_value", "dtype"),
    [(1, np.uint8), (255, np.uint8), (300, np.uint16), (70000, np.uint32), (2**33, np.uint64)],
)
def test_write_labels_minimises_dtype(tmp_path: Path, max_value: int, dtype: type) -> None:
    labels = np.zeros((4, 5), dtype=np.int64)
    labels[1, 2] = max_value
    target = tmp_path / "l.tif"

    write_labels(target, labels)

    with tifffile.TiffFile(target) as tif:
        data = tif.series[0].asarray()
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    assert data.dtype == dtype
    np.testing.assert_array_equal(data, labels)


def test_write_labels_bool_and_integer_float(tmp_path: Path) -> None:
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 2, 3] = True
    write_labels(tmp_path / "b.tif", mask)
    image = read_image(tmp_path / "b.tif")
    assert image.data.dtype == np.uint8
    assert image.axes == "ZYX"  # Z of size 3 must not be mistaken for RGB
    np.testing.assert_array_equal(image.data, mask)

    floats = np.array([[0.0, 2.0], [300.0, 1.0]])
    write_labels(tmp_path / "f.tif", floats)
    assert read_image(tmp_path / "f.tif").data.dtype == np.uint16


def test_write_labels_uint32_keeps_axes_and_scale(tmp_path: Path, rng: np.random.Generator) -> None:
    labels = rng.integers(0, 100_000, size=(2, 3, 4, 5)).astype(np.uint32)
    target = tmp_path / "big.tif"

    write_labels(target, labels, axes="TZYX", scale=(2.0, 0.75, 0.5, 0.25))

    image = read_image(target)
    assert image.axes == "TZYX"
    assert image.data.dtype == np.uint32
    np.testing.assert_array_equal(image.data, labels)
    assert image.scale == pytest.approx((2.0, 0.75, 0.5, 0.25))


def test_write_labels_imagej_scale(tmp_path: Path) -> None:
    labels = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    target = tmp_path / "ij.tif"

    write_labels(target, labels, scale=(2.5, 0.3, 0.4))

    with tifffile.TiffFile(target) as tif:
        assert tif.is_imagej
    image = read_image(target)
    assert image.axes == "ZYX"
    assert image.scale == pytest.approx((2.5, 0.3, 0.4))


def test_write_labels_refuses_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "l.tif"
    write_labels(target, np.ones((4, 4), dtype=np.uint8))

    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_labels(target, np.full((4, 4), 2, dtype=np.uint8))
    np.testing.assert_array_equal(read_image(target).data, 1)


def test_write_labels_overwrite_true_replaces(tmp_path: Path) -> None:
    target = tmp_path / "l.tif"
    write_labels(target, np.ones((4, 4), dtype=np.uint8))

    write_labels(target, np.full((4, 4), 300, dtype=np.int32), overwrite=True)

    image = read_image(target)
    assert image.data.dtype == np.uint16
    np.testing.assert_array_equal(image.data, 300)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, RuntimeError])
def test_write_labels_interrupted_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc_type: type[BaseException]
) -> None:
    def _fail(*args: object, **kwargs: object) -> None:
        raise exc_type("simulated failure")

    monkeypatch.setattr(tifffile, "imwrite", _fail)
    target = tmp_path / "l.tif"

    with pytest.raises(exc_type):
        write_labels(target, np.ones((4, 4), dtype=np.uint8))

    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_labels_interrupted_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "l.tif"
    write_labels(target, np.ones((4, 4), dtype=np.uint8))

    def _fail(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", _fail)
    with pytest.raises(KeyboardInterrupt):
        write_labels(target, np.zeros((4, 4), dtype=np.uint8), overwrite=True)
    monkeypatch.undo()

    np.testing.assert_array_equal(read_image(target).data, 1)
    assert _leftovers(tmp_path) == []


def test_write_labels_negative_values(tmp_path: Path) -> None:
    labels = np.zeros((4, 4), dtype=np.int16)
    labels[0, 0] = -3
    with pytest.raises(ValueError, match="non-negative.*-3"):
        write_labels(tmp_path / "l.tif", labels)
    assert list(tmp_path.iterdir()) == []


def test_write_labels_non_integer_float(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-integer"):
        write_labels(tmp_path / "l.tif", np.array([[0.0, 1.5], [2.0, 3.0]]))


def test_write_labels_axes_length_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'ZYX' has 3 characters but labels have 2 dimensions"):
        write_labels(tmp_path / "l.tif", np.zeros((4, 4), dtype=np.uint8), axes="ZYX")


def test_write_labels_scale_length_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scale has 2 entries but labels have 3"):
        write_labels(tmp_path / "l.tif", np.zeros((2, 4, 4), dtype=np.uint8), scale=(1.0, 1.0))


def test_write_labels_missing_parent(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "l.tif"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_labels(target, np.zeros((4, 4), dtype=np.uint8))
    assert not target.parent.exists()


# --------------------------------------------------------------------------- #
# read_image / to_yx_last
# --------------------------------------------------------------------------- #


def test_read_image_imagej_hyperstack(tmp_path: Path, rng: np.random.Generator) -> None:
    arr = rng.integers(0, 1000, size=(2, 3, 6, 7)).astype(np.uint16)
    p = tmp_path / "hyper.tif"
    tifffile.imwrite(
        p,
        arr,
        imagej=True,
        metadata={"axes": "TZYX", "spacing": 2.0},
        resolution=(1 / 0.5, 1 / 0.25),
    )

    image = read_image(p)

    assert isinstance(image, ImageData)
    assert image.axes == "TZYX"
    np.testing.assert_array_equal(image.data, arr)
    assert image.scale == pytest.approx((1.0, 2.0, 0.25, 0.5))


def test_read_image_ome(tmp_path: Path, rng: np.random.Generator) -> None:
    arr = rng.integers(0, 255, size=(3, 6, 7)).astype(np.uint8)
    p = tmp_path / "img.ome.tif"
    tifffile.imwrite(
        p,
        arr,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.4, "PhysicalSizeZ": 1.5},
    )

    image = read_image(p)

    assert image.axes == "ZYX"
    np.testing.assert_array_equal(image.data, arr)
    assert image.scale == pytest.approx((1.5, 0.4, 0.3))


def test_read_image_ome_without_physical_size(tmp_path: Path) -> None:
    arr = np.zeros((3, 6, 7), dtype=np.uint8)
    p = tmp_path / "img.ome.tif"
    tifffile.imwrite(p, arr, ome=True, metadata={"axes": "ZYX"})

    image = read_image(p)
    assert image.axes == "ZYX"
    assert image.scale == (1.0, 1.0, 1.0)


def test_read_image_unknown_leading_axis_becomes_z(tmp_path: Path) -> None:
    arr = np.zeros((5, 6, 7), dtype=np.uint16)
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, arr, photometric="minisblack")  # tifffile reports "QYX"

    assert read_image(p).axes == "ZYX"


def test_normalise_axes_only_single_leading_unknown() -> None:
    assert io._normalise_axes("IYX") == "ZYX"
    assert io._normalise_axes("QYXS") == "ZYXS"
    assert io._normalise_axes("QQYX") == "QQYX"
    assert io._normalise_axes("TQYX") == "TQYX"
    assert io._normalise_axes("QZYX") == "QZYX"


def test_read_image_rgb_to_yx_last(tmp_path: Path, rng: np.random.Generator) -> None:
    rgb = rng.integers(0, 255, size=(6, 7, 3)).astype(np.uint8)
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, rgb, photometric="rgb")

    image = read_image(p)
    data, axes = to_yx_last(image.data, image.axes)

    assert axes.endswith("S")
    assert axes == "YXS"
    np.testing.assert_array_equal(data, rgb)


def test_read_image_planar_rgb_to_yx_last(tmp_path: Path, rng: np.random.Generator) -> None:
    rgb = rng.integers(0, 255, size=(6, 7, 3)).astype(np.uint8)
    p = tmp_path / "planar.tif"
    tifffile.imwrite(p, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")

    image = read_image(p)
    assert image.axes == "SYX"
    data, axes = to_yx_last(image.data, image.axes)
    assert axes == "YXS"
    np.testing.assert_array_equal(data, rgb)


def test_to_yx_last_orders_and_views() -> None:
    arr = np.zeros((2, 3, 4, 5, 6))  # C Z T Y X
    out, axes = to_yx_last(arr, "CZTYX")
    assert axes == "ZTYXC"
    assert out.shape == (3, 4, 5, 6, 2)
    assert np.shares_memory(out, arr)

    arr2 = np.zeros((4, 5, 3, 2))  # Y X Z C
    out2, axes2 = to_yx_last(arr2, "YXZC")
    assert axes2 == "ZYXC"
    assert out2.shape == (3, 4, 5, 2)

    arr3 = np.zeros((2, 3, 4))
    out3, axes3 = to_yx_last(arr3, "ZYX")
    assert out3 is arr3
    assert axes3 == "ZYX"


def test_to_yx_last_errors() -> None:
    with pytest.raises(ValueError, match="must contain 'Y' and 'X'"):
        to_yx_last(np.zeros((2, 3)), "ZY")
    with pytest.raises(ValueError, match="has 3 characters but data has 2"):
        to_yx_last(np.zeros((2, 3)), "ZYX")


def test_read_image_not_tiff(tmp_path: Path) -> None:
    p = tmp_path / "notes.tif"
    p.write_text("definitely not a TIFF")
    with pytest.raises(ValueError, match="is not a readable TIFF"):
        read_image(p)


def test_read_image_missing(tmp_path: Path) -> None:
    p = tmp_path / "nope.tif"
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        read_image(p)


def test_read_image_lazy_memmap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def _no_zarr(name: str, *args: object, **kwargs: object) -> object:
        if name == "zarr":
            raise ImportError("zarr hidden for this test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", _no_zarr)
    arr = np.arange(2 * 4 * 5, dtype=np.uint16).reshape(2, 4, 5)
    uncompressed = tmp_path / "raw.tif"
    tifffile.imwrite(uncompressed, arr, imagej=True, metadata={"axes": "ZYX"})

    image = read_image(uncompressed, lazy=True)
    assert isinstance(image.data, np.memmap)
    assert image.axes == "ZYX"
    np.testing.assert_array_equal(np.asarray(image.data), arr)
    del image

    # Compressed data cannot be memory-mapped: falls back to an eager read.
    write_labels(tmp_path / "zip.tif", arr)
    eager = read_image(tmp_path / "zip.tif", lazy=True)
    assert not isinstance(eager.data, np.memmap)
    np.testing.assert_array_equal(eager.data, arr)


def test_read_image_lazy_zarr(tmp_path: Path) -> None:
    pytest.importorskip("zarr")
    arr = np.arange(2 * 4 * 5, dtype=np.uint32).reshape(2, 4, 5)
    write_labels(tmp_path / "l.tif", arr)

    image = read_image(tmp_path / "l.tif", lazy=True)
    try:
        assert image.axes == "ZYX"
        assert tuple(image.data.shape) == arr.shape
        np.testing.assert_array_equal(np.asarray(image.data[1]), arr[1])
    finally:
        store = getattr(image.data, "store", None)
        if hasattr(store, "close"):
            store.close()


# --------------------------------------------------------------------------- #
# PointTable
# --------------------------------------------------------------------------- #


def test_point_table_validation_and_helpers() -> None:
    table = PointTable(
        points=np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]]),
        labels=np.array([1, 0, 1]),
        tasks=("nuclei", "cells", "nuclei"),
    )
    assert table.ndim == 3
    assert len(table) == 3
    assert table.points.dtype == np.float64
    assert table.labels.dtype == np.int8
    assert table.task_names() == ["nuclei", "cells"]

    nuclei = table.select("nuclei")
    np.testing.assert_array_equal(nuclei.points, [[1, 2, 3], [7, 8, 9]])
    np.testing.assert_array_equal(nuclei.labels, [1, 1])
    assert nuclei.tasks == ("nuclei", "nuclei")
    assert len(table.select("absent")) == 0

    with pytest.raises(ValueError, match="read-only"):
        table.points[0, 0] = 42.0

    no_tasks = PointTable(points=np.zeros((2, 2)), labels=np.array([1, 1]))
    assert no_tasks.tasks == ("", "")

    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        PointTable(points=np.zeros((2, 2)), labels=np.array([1, 1, 0]))
    with pytest.raises(ValueError, match="0 \\(negative\\) or 1 \\(positive\\); got \\[2\\]"):
        PointTable(points=np.zeros((2, 2)), labels=np.array([1, 2]))
    with pytest.raises(ValueError, match="tasks must have 2 entries"):
        PointTable(points=np.zeros((2, 2)), labels=np.array([1, 0]), tasks=("a",))
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        PointTable(points=np.zeros(3), labels=np.array([1, 0, 1]))


# --------------------------------------------------------------------------- #
# Points CSV
# --------------------------------------------------------------------------- #


def test_points_round_trip_with_tasks(tmp_path: Path, rng: np.random.Generator) -> None:
    table = PointTable(
        points=rng.uniform(0, 100, size=(5, 3)),
        labels=np.array([1, 0, 1, 1, 0]),
        tasks=("nuclei", "nuclei", "cells", "", "cells"),
    )
    target = tmp_path / "points.csv"

    assert write_points(target, table) == target

    lines = target.read_text().splitlines()
    assert lines[0] == "index,axis-0,axis-1,axis-2,label,task"
    assert lines[1].split(",")[0] == "0"
    assert lines[1].split(",")[4] == "positive"
    assert lines[2].split(",")[4] == "negative"

    back = read_points(target)
    np.testing.assert_array_equal(back.points, table.points)  # exact float round trip
    np.testing.assert_array_equal(back.labels, table.labels)
    assert back.tasks == table.tasks
    assert _leftovers(tmp_path) == []


def test_points_round_trip_without_tasks(tmp_path: Path) -> None:
    table = PointTable(points=np.array([[1.5, 2.25], [3.0, 4.0]]), labels=np.array([0, 1]))
    target = tmp_path / "points.csv"

    write_points(target, table)

    assert target.read_text().splitlines()[0] == "index,axis-0,axis-1,label"
    back = read_points(target)
    np.testing.assert_array_equal(back.points, table.points)
    np.testing.assert_array_equal(back.labels, [0, 1])
    assert back.tasks == ("", "")
    assert back.task_names() == [""]


def test_write_points_refuses_overwrite(tmp_path: Path) -> None:
    table = PointTable(points=np.zeros((1, 2)), labels=np.array([1]))
    target = tmp_path / "p.csv"
    write_points(target, table)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_points(target, table)
    replacement = PointTable(points=np.ones((2, 2)), labels=np.array([0, 0]))
    write_points(target, replacement, overwrite=True)
    assert len(read_points(target)) == 2


def test_write_points_empty_table(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contains no points"):
        write_points(tmp_path / "p.csv", PointTable(points=np.zeros((0, 2)), labels=np.zeros(0)))
    assert list(tmp_path.iterdir()) == []


def test_read_points_napari_layout_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "napari.csv"
    p.write_text("index,axis-0,axis-1,axis-2\n0,1.0,2.0,3.0\n1,4.0,5.0,6.0\n")

    with caplog.at_level(logging.WARNING, logger=io.__name__):
        table = read_points(p)

    np.testing.assert_array_equal(table.points, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(table.labels, [1, 1])
    assert table.tasks == ("", "")
    assert any("no 'label' column" in r.getMessage() for r in caplog.records)


def test_read_points_accepts_label_spellings_and_extra_columns(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text(
        "\ufeffaxis-1,label,confidence,axis-0\n"
        "1,Positive,0.5,10\n"
        "2,NEG,0.1,20\n"
        "3,1,0.1,30\n"
        "4,false,0.1,40\n"
        "\n"
        "5,+,0.1,50\n"
        "6,-,0.1,60\n"
        "7,True,0.1,70\n"
        "8,0.0,0.1,80\n"
    )

    table = read_points(p)

    np.testing.assert_array_equal(table.labels, [1, 0, 1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(table.points[:, 0], [10, 20, 30, 40, 50, 60, 70, 80])
    np.testing.assert_array_equal(table.points[:, 1], [1, 2, 3, 4, 5, 6, 7, 8])


def test_read_points_bad_label_names_row(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("index,axis-0,axis-1,label\n0,1,2,positive\n1,3,4,maybe\n")
    with pytest.raises(ValueError, match=r"row 2 .*'maybe'"):
        read_points(p)


def test_read_points_bad_coordinate_names_row_and_column(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("index,axis-0,axis-1,label\n0,1,2,positive\n1,3,abc,negative\n")
    with pytest.raises(ValueError, match=r"row 2 .*column 'axis-1'.*'abc'"):
        read_points(p)


def test_read_points_empty(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("index,axis-0,axis-1,label\n")
    with pytest.raises(ValueError, match="contains no points"):
        read_points(p)


def test_read_points_header_errors(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("index,x,y\n0,1,2\n")
    with pytest.raises(ValueError, match="no coordinate columns"):
        read_points(p)

    p.write_text("index,axis-0,axis-2\n0,1,2\n")
    with pytest.raises(ValueError, match="consecutive from axis-0"):
        read_points(p)

    p.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_points(p)

    p.write_text("index,axis-0,axis-1\n0,1\n")
    with pytest.raises(ValueError, match="row 1 .*expected 3 fields.*got 2"):
        read_points(p)


def test_read_points_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_points(tmp_path / "missing.csv")


def test_public_api() -> None:
    assert set(io.__all__) >= {
        "ImageData",
        "PointTable",
        "read_image",
        "read_points",
        "to_yx_last",
        "write_labels",
        "write_points",
    }


def test_write_label_pages_streams_a_stack(tmp_path):
    from napari_revolver.core.io import write_label_pages

    planes = [np.full((6, 7), i, np.uint8) for i in range(4)]
    out = write_label_pages(
        tmp_path / "s.tif",
        iter(planes),
        (2, 2, 6, 7),
        np.uint8,
        axes="TZYX",
        scale=(1.0, 2.0, 0.5, 0.5),
    )
    img = read_image(out)
    assert img.axes == "TZYX"
    np.testing.assert_array_equal(img.data, np.stack(planes).reshape(2, 2, 6, 7))


def test_write_label_pages_rejects_wrong_pages_and_leaves_nothing(tmp_path):
    from napari_revolver.core.io import write_label_pages

    target = tmp_path / "s.tif"
    with pytest.raises(ValueError, match="expected 3 pages|got 2 pages"):
        write_label_pages(target, iter([np.zeros((4, 4), np.uint8)] * 2), (3, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="page 0 has shape"):
        write_label_pages(target, iter([np.zeros((5, 4), np.uint8)]), (1, 4, 4), np.uint8)
    assert not target.exists()
    assert not list(tmp_path.iterdir())


def test_lazy_transposed_view_reads_only_what_is_indexed():
    from napari_revolver.core.io import LazyTransposed

    reads = []

    class Recording:
        def __init__(self, a):
            self.a, self.shape, self.dtype = a, a.shape, a.dtype

        def __getitem__(self, key):
            reads.append(key)
            return self.a[key]

    a = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    view = LazyTransposed(Recording(a), (0, 2, 3, 1))  # e.g. T C Y X -> T Y X C
    expected = np.transpose(a, (0, 2, 3, 1))
    np.testing.assert_array_equal(view[1], expected[1])
    np.testing.assert_array_equal(view[1, 2], expected[1, 2])
    assert reads[0][0] == 1 and view.shape == expected.shape
