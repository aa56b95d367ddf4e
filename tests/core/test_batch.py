"""Distributed segmentation on a real dask.distributed LocalCluster (2 worker processes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("distributed", reason="needs dask.distributed (pip install .[dask])")
zarr = pytest.importorskip("zarr")

from napari_revolver import RevolverPredictor, cli  # noqa: E402
from napari_revolver.core.batch import BatchJob, run_batch  # noqa: E402
from napari_revolver.core.synthetic import sample_stack  # noqa: E402


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("batch")
    image, truth, points, labels = sample_stack(seed=5, shape=(12, 96, 96))
    tifffile.imwrite(d / "img.tif", image, imagej=True, metadata={"axes": "ZYX"})
    predictor = RevolverPredictor(device="cpu")
    predictor.set_volume(image)
    task = predictor.guide(points, labels, name="nuclei")
    reference = predictor.segment(task)
    assert 0 < reference.mean() < 0.5  # a real segmentation, not all or nothing
    return {"dir": d, "image": d / "img.tif", "task": task, "reference": reference}


def test_local_cluster_output_is_identical_to_a_single_process(stack: dict) -> None:
    out = stack["dir"] / "out.zarr"
    seen = []
    run_batch(
        BatchJob(str(stack["image"]), str(out), (stack["task"],), chunk=4),
        "local:2",
        progress=lambda done, total: seen.append((done, total)),
    )
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(group["labels"][:], stack["reference"])
    assert group["done"][:].all()
    assert seen[0] == (0, 12) and seen[-1] == (12, 12)


def test_a_task_at_half_scale_reads_the_image_at_that_scale_on_the_workers(stack: dict) -> None:
    image = tifffile.imread(stack["image"])
    predictor = RevolverPredictor(device="cpu")
    predictor.set_volume(image, scale=0.5)
    task = predictor.guide(stack["task"].points, stack["task"].labels, name="nuclei")
    out = stack["dir"] / "half.zarr"
    run_batch(BatchJob(str(stack["image"]), str(out), (task,), chunk=6, scale=0.5), "local:1")
    labels = zarr.open_group(str(out), mode="r")["labels"][:]
    assert labels.shape == image.shape
    np.testing.assert_array_equal(labels, predictor.segment(task))
    # The same task on workers reading at scale 1 is refused, naming the scale.
    with pytest.raises(ValueError, match="scale"):
        run_batch(BatchJob(str(stack["image"]), str(stack["dir"] / "one.zarr"), (task,)), "local:1")


def test_a_killed_run_resumes_without_recomputing(stack: dict) -> None:
    out = stack["dir"] / "resume.zarr"

    class Killed(Exception):
        pass

    def kill_after_first_chunk(done: int, total: int) -> None:
        if done >= 4:
            raise Killed

    with pytest.raises(Killed):
        run_batch(
            BatchJob(str(stack["image"]), str(out), (stack["task"],), chunk=4),
            "local:1",
            progress=kill_after_first_chunk,
        )
    group = zarr.open_group(str(out), mode="r")
    first = int(group["done"][:].sum())
    assert 4 <= first < 12
    calls = []
    run_batch(
        BatchJob(str(stack["image"]), str(out), (stack["task"],), chunk=4),
        "local:1",
        progress=lambda done, total: calls.append(done),
    )
    assert calls[0] == first  # what was done is not done again
    np.testing.assert_array_equal(zarr.open_group(str(out))["labels"][:], stack["reference"])


def test_a_store_of_another_run_is_refused(stack: dict) -> None:
    out = stack["dir"] / "other.zarr"
    run_batch(BatchJob(str(stack["image"]), str(out), (stack["task"],), chunk=6), "local:1")
    other = stack["task"].renamed("other", 2)
    with pytest.raises(ValueError, match="another run"):
        run_batch(BatchJob(str(stack["image"]), str(out), (other,)), "local:1")


def test_cli_scheduler_needs_a_zarr_output(
    stack: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from napari_revolver.core.io import PointTable, write_points

    write_points(tmp_path / "p.csv", PointTable(stack["task"].points, stack["task"].labels))
    code = cli.main(
        [
            "segment",
            str(stack["image"]),
            "--points",
            str(tmp_path / "p.csv"),
            "-o",
            str(tmp_path / "out.tif"),
            "--scheduler",
            "local:1",
        ]
    )
    assert code == 1 and ".zarr" in capsys.readouterr().err
    code = cli.main(
        [
            "segment",
            str(stack["image"]),
            "--points",
            str(tmp_path / "p.csv"),
            "-o",
            str(tmp_path / "out.zarr"),
            "--scheduler",
            "local:2",
            "--chunk",
            "5",
        ]
    )
    assert code == 0
    np.testing.assert_array_equal(
        zarr.open_group(str(tmp_path / "out.zarr"))["labels"][:] > 0, stack["reference"] > 0
    )


def test_cli_scheduler_keeps_painted_slices(
    stack: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from napari_revolver.core.io import PointTable, write_points

    write_points(tmp_path / "p.csv", PointTable(stack["task"].points, stack["task"].labels))
    painted = np.zeros(stack["reference"].shape, np.uint8)
    painted[3, 10:40, 10:40] = 1  # a square painted on slice 3: not what the network draws
    tifffile.imwrite(tmp_path / "painted.tif", painted)
    args = [
        "segment",
        str(stack["image"]),
        "--points",
        str(tmp_path / "p.csv"),
        "--painted",
        str(tmp_path / "painted.tif"),
        "-o",
        str(tmp_path / "out.zarr"),
        "--scheduler",
        "local:1",
    ]
    assert cli.main(args) == 0
    out = zarr.open_group(str(tmp_path / "out.zarr"))["labels"][:]
    np.testing.assert_array_equal(out[3], painted[3])
    assert out[[0, 11]].any()  # the others are predicted
    wide = painted.astype(np.uint16)
    wide[3, 0, 0] = 300  # more than the store of one task (uint8) can hold
    tifffile.imwrite(tmp_path / "painted.tif", wide)
    assert cli.main([*args, "--overwrite"]) == 1
    assert "holds labels up to 255" in capsys.readouterr().err


def test_cli_scheduler_over_several_files_on_one_cluster(stack: dict, tmp_path: Path) -> None:
    from napari_revolver.core.io import PointTable, write_points

    write_points(tmp_path / "p.csv", PointTable(stack["task"].points, stack["task"].labels))
    other = tmp_path / "other.tif"
    tifffile.imwrite(
        other, tifffile.imread(stack["image"])[::-1], imagej=True, metadata={"axes": "ZYX"}
    )
    code = cli.main(
        [
            "segment",
            str(stack["image"]),
            "--points",
            str(tmp_path / "p.csv"),
            "-o",
            str(tmp_path / "out"),
            "--apply-to",
            str(other),
            "--scheduler",
            "local:2",
        ]
    )
    assert code == 0
    first = zarr.open_group(str(tmp_path / "out" / "img.labels.zarr"))["labels"][:]
    second = zarr.open_group(str(tmp_path / "out" / "other.labels.zarr"))["labels"][:]
    np.testing.assert_array_equal(first, stack["reference"])
    # The clicks act by position only on the volume they were made on, so the slice that
    # carries them differs; every other slice is the same.
    annotated = {len(first) - 1 - int(z) for z in np.rint(stack["task"].points[:, 0])}
    keep = [k for k in range(len(first)) if k not in annotated]
    assert len(keep) == len(first) - 1
    np.testing.assert_array_equal(second[keep], stack["reference"][::-1][keep])


def test_failed_chunks_are_retried_and_leave_no_gaps(
    stack: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client, LocalCluster

    from napari_revolver.core import batch

    real = batch._segment_chunk
    marks = tmp_path / "failed"
    marks.mkdir()

    def flaky(job, slices, *args):
        # Each chunk dies once half-way, after writing some of its slices. The marks live on
        # disk because Dask hands the function to workers as a serialised copy.
        mark = marks / str(slices[0])
        if not mark.exists():
            mark.touch()
            real(job, slices[:1], *args)
            raise RuntimeError("worker lost")
        return real(job, slices, *args)

    monkeypatch.setattr(batch, "_segment_chunk", flaky)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        out = batch.run_batch(
            batch.BatchJob(
                str(stack["image"]), str(tmp_path / "r.zarr"), (stack["task"],), chunk=4
            ),
            client=client,
        )
    assert sorted(int(p.name) for p in marks.iterdir()) == [0, 4, 8]
    group = zarr.open_group(str(out), mode="r")
    assert group["done"][:].all()
    np.testing.assert_array_equal(group["labels"][:], stack["reference"])
