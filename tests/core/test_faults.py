"""Fault injection: killed runs, corrupt and truncated files, a full disk, two writers.

Every case checks three things: the user is told clearly what happened, nothing half-written
is left under a final name, and running the same command again completes with the result of
an undisturbed run. Runs are killed with SIGKILL from outside, at points chosen by watching
the files they write (a ``.part`` temporary, a store's ``done`` flags), never through hooks in
the library. The fast cases always run; ``--runslow`` adds kills at more points and the Dask
batch.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_revolver import cli
from napari_revolver.core.io import PointTable, write_label_pages, write_points
from napari_revolver.core.synthetic import sample_stack

SHAPE = (16, 96, 96)
N = SHAPE[0]


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A nuclei stack with clicks, and the outputs of undisturbed runs on it.

    The shipped weights are used (an untrained model segments everything or nothing, and
    every run would then agree trivially).
    """
    d = tmp_path_factory.mktemp("faults")
    image, _, points, point_labels = sample_stack(seed=5, shape=SHAPE)
    tifffile.imwrite(d / "img.tif", image, imagej=True, metadata={"axes": "ZYX"})
    write_points(
        d / "pts.csv",
        PointTable(np.asarray(points, float), point_labels, ("nuclei",) * len(points)),
    )
    assert cli.main(_segment_args(d, d / "ref.tif")) == 0
    assert cli.main(_precompute_args(d, d / "ref.zarr")) == 0
    labels = tifffile.imread(d / "ref.tif")
    assert 0 < (labels > 0).mean() < 0.5  # a real segmentation, not all or nothing
    return {"dir": d, "labels": labels, "store": d / "ref.zarr"}


def _segment_args(d: Path, out: Path, *extra: str) -> list[str]:
    return [
        "segment",
        str(d / "img.tif"),
        "--points",
        str(d / "pts.csv"),
        "-o",
        str(out),
        "--batch-size",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


def _precompute_args(d: Path, store: Path, image: Path | None = None) -> list[str]:
    image = image or d / "img.tif"
    return ["precompute", str(image), "--store", str(store), "--batch-size", "1", "--device", "cpu"]


# -------------------------------------------------------------------------------- helpers


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    """``revolver *args`` in its own process group, stderr to ``log``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "napari_revolver.cli", *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            start_new_session=True,
        )


def _kill_when(
    proc: subprocess.Popen, condition: Callable[[], bool], log: Path, timeout: float = 120
) -> None:
    """SIGKILL ``proc`` and its process group as soon as ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if condition():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended (rc {proc.returncode}) before the kill point:\n"
                    + log.read_text(errors="replace")[-2000:]
                )
            time.sleep(0.005)
        pytest.fail("the kill point was not reached in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _after(seconds: float) -> Callable[[], bool]:
    start = time.monotonic()
    return lambda: time.monotonic() - start >= seconds


def _temporaries(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*.part"))


def _part_holds(target: Path, min_bytes: int) -> Callable[[], bool]:
    """A temporary of ``target`` exists and holds ``min_bytes`` (files inside, for a folder)."""

    def check() -> bool:
        for tmp in _temporaries(target):
            try:
                if tmp.is_dir():
                    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
                else:
                    size = tmp.stat().st_size
            except OSError:
                continue
            if size >= min_bytes:
                return True
        return False

    return check


def _done_at_least(store: Path, count: int, array: str = "done") -> Callable[[], bool]:
    def check() -> bool:
        try:
            done = zarr.open_array(str(store / array), mode="r")[:]
        except Exception:  # not created yet
            return False
        return count <= int(done.sum()) < len(done)

    return check


def _assert_store_matches(store: Path, reference: Path) -> None:
    assert zarr.open_array(str(store / "done"), mode="r")[:].all()
    for name in ("coarse", "fine"):
        got = zarr.open_array(str(store / name), mode="r")[:].astype(np.float32)
        want = zarr.open_array(str(reference / name), mode="r")[:].astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2, err_msg=name)
    assert not list(store.rglob("*.partial"))


def _flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    raw[-5] ^= 0x55
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------- killed runs


def _killed_segment(
    data: dict, tmp_path: Path, name: str, condition: Callable[[Path], Callable[[], bool]]
) -> Path:
    out = tmp_path / name
    log = tmp_path / "stderr.txt"
    _kill_when(_spawn(_segment_args(data["dir"], out), log), condition(out), log)
    assert not out.exists()  # nothing under the final name
    return out


def _rerun_segment(data: dict, out: Path, caplog: pytest.LogCaptureFixture) -> None:
    left = _temporaries(out)
    with caplog.at_level("WARNING"):
        assert cli.main(_segment_args(data["dir"], out)) == 0
    assert _temporaries(out) == []  # the killed run's temporaries are gone ...
    for tmp in left:
        assert str(tmp) in caplog.text  # ... and the user was told
    got = zarr.open_array(str(out), mode="r")[:] if out.suffix == ".zarr" else tifffile.imread(out)
    np.testing.assert_array_equal(got, data["labels"])


def test_segment_killed_while_writing_the_tiff(
    data: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = _killed_segment(data, tmp_path, "out.tif", lambda out: _part_holds(out, 2000))
    assert _temporaries(out)  # the kill hit the write
    _rerun_segment(data, out, caplog)


def test_precompute_killed_half_way_resumes(data: dict, tmp_path: Path) -> None:
    store = tmp_path / "f.zarr"
    log = tmp_path / "stderr.txt"
    proc = _spawn(_precompute_args(data["dir"], store), log)
    _kill_when(proc, _done_at_least(store, N // 2), log)
    done = zarr.open_array(str(store / "done"), mode="r")[:]
    assert N // 2 <= done.sum() < N
    assert cli.main(_precompute_args(data["dir"], store)) == 0
    _assert_store_matches(store, data["store"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "written"),
    [
        ("starting", None),
        ("temporary created", 0.0),
        ("first pages written", 0.2),
        ("most pages written", 0.8),
    ],
)
def test_segment_killed_at_several_points(
    data: dict,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    point: str,
    written: float | None,
) -> None:
    # ``written``: the share of the undisturbed output's size the temporary holds.
    size = (data["dir"] / "ref.tif").stat().st_size

    def condition(out: Path) -> Callable[[], bool]:
        return _after(0.5) if written is None else _part_holds(out, int(written * size))

    out = _killed_segment(data, tmp_path, "out.tif", condition)
    if written is not None:
        assert _temporaries(out)
    _rerun_segment(data, out, caplog)


@pytest.mark.slow
@pytest.mark.parametrize("min_bytes", [0, 3000])
def test_segment_to_zarr_killed_while_writing(
    data: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, min_bytes: int
) -> None:
    out = _killed_segment(data, tmp_path, "out.zarr", lambda out: _part_holds(out, min_bytes))
    assert _temporaries(out)
    _rerun_segment(data, out, caplog)


@pytest.mark.slow
@pytest.mark.parametrize("count", [1, N - 2])
def test_precompute_killed_at_several_points(data: dict, tmp_path: Path, count: int) -> None:
    store = tmp_path / "f.zarr"
    log = tmp_path / "stderr.txt"
    _kill_when(_spawn(_precompute_args(data["dir"], store), log), _done_at_least(store, count), log)
    assert cli.main(_precompute_args(data["dir"], store)) == 0
    _assert_store_matches(store, data["store"])


@pytest.mark.slow
def test_dask_batch_killed_resumes_to_the_same_labels(data: dict, tmp_path: Path) -> None:
    pytest.importorskip("distributed", reason="needs dask.distributed (pip install .[dask])")
    out = tmp_path / "out.zarr"
    args = _segment_args(data["dir"], out, "--scheduler", "local:1", "--chunk", "2")
    log = tmp_path / "stderr.txt"
    _kill_when(_spawn(args, log), _done_at_least(out, 4), log, timeout=240)
    group = zarr.open_group(str(out), mode="r")
    done = group["done"][:]
    assert 4 <= done.sum() < N
    # Whatever is marked done is final; the rest is left for the rerun.
    np.testing.assert_array_equal(group["labels"][np.flatnonzero(done)], data["labels"][done])
    assert cli.main(args) == 0
    group = zarr.open_group(str(out), mode="r")
    assert group["done"][:].all()
    np.testing.assert_array_equal(group["labels"][:], data["labels"])


# -------------------------------------------------------------------- corrupt and truncated


def test_corrupt_store_chunks_are_recomputed_with_a_warning(
    data: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "f.zarr"
    shutil.copytree(data["store"], store)
    _flip_bytes(store / "fine" / "c" / "3" / "0" / "0" / "0")
    (store / "coarse" / "c" / "5" / "0" / "0" / "0").unlink()
    out = tmp_path / "out.tif"
    with caplog.at_level("WARNING", logger="napari_revolver.core.features"):
        assert cli.main(_segment_args(data["dir"], out, "--store", str(store))) == 0
    assert "slice 3 is unreadable" in caplog.text and "checksum" in caplog.text
    assert "slice 5 is unreadable (its chunk is missing)" in caplog.text
    np.testing.assert_array_equal(tifffile.imread(out), data["labels"])
    _assert_store_matches(store, data["store"])  # healed: the slices were written again


def test_input_tiff_cut_in_its_header_is_refused_clearly(
    data: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "img.tif"
    image.write_bytes((data["dir"] / "img.tif").read_bytes()[:100])
    shutil.copy(data["dir"] / "pts.csv", tmp_path / "pts.csv")
    out = tmp_path / "out.tif"
    assert cli.main(_segment_args(tmp_path, out)) == 1
    assert f"{image} is not a readable TIFF" in capsys.readouterr().err
    assert not out.exists() and _temporaries(out) == []


def test_input_tiff_cut_in_its_data_is_refused_clearly(
    data: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = (data["dir"] / "img.tif").read_bytes()
    image = tmp_path / "img.tif"
    image.write_bytes(raw[: len(raw) // 2])
    shutil.copy(data["dir"] / "pts.csv", tmp_path / "pts.csv")
    out = tmp_path / "out.tif"
    assert cli.main(_segment_args(tmp_path, out)) == 1
    err = capsys.readouterr().err
    assert not out.exists() and _temporaries(out) == []
    assert "truncated" in err or "corrupt" in err, err


def test_precompute_of_a_truncated_tiff_stores_nothing_wrong(
    data: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = (data["dir"] / "img.tif").read_bytes()
    image = tmp_path / "img.tif"
    image.write_bytes(raw[: len(raw) // 2])
    store = tmp_path / "f.zarr"
    cli.main(_precompute_args(tmp_path, store, image))
    capsys.readouterr()
    # Whatever the truncated file was read as, its store is not taken for the whole image's.
    image.write_bytes(raw)
    assert cli.main(_precompute_args(tmp_path, store, image)) == 0
    _assert_store_matches(store, data["store"])


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs and a function that fills it to ``free`` bytes."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which only root can mount")
    mount = tmp_path / "disk"
    mount.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    filler = mount / "filler"

    def fill(free: int) -> None:
        with open(filler, "wb", buffering=0) as fh:
            with pytest.raises(OSError) as info:
                while True:
                    fh.write(b"\0" * 4096)
            assert info.value.errno == errno.ENOSPC
        os.truncate(filler, max(0, filler.stat().st_size - free))

    try:
        yield mount, fill, filler
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_while_writing_labels_leaves_nothing_and_a_rerun_completes(
    data: dict, small_disk
) -> None:
    mount, fill, filler = small_disk
    labels = data["labels"]
    out = mount / "out.tif"
    fill(4096)
    with pytest.raises(OSError) as info:
        write_label_pages(out, iter(labels), labels.shape, labels.dtype)
    assert info.value.errno == errno.ENOSPC and "No space left" in str(info.value)
    assert sorted(p.name for p in mount.iterdir()) == ["filler"]  # no output, no temporary
    filler.unlink()
    write_label_pages(out, iter(labels), labels.shape, labels.dtype)
    np.testing.assert_array_equal(tifffile.imread(out), labels)


def test_full_disk_is_reported_by_the_cli_in_one_line(
    data: dict, small_disk, capsys: pytest.CaptureFixture[str]
) -> None:
    mount, fill, _ = small_disk
    fill(4096)
    out = mount / "out.tif"
    try:
        rc = cli.main(_segment_args(data["dir"], out))
    finally:
        assert sorted(p.name for p in mount.iterdir()) == ["filler"]
    assert rc == 1
    assert "No space left on device" in capsys.readouterr().err


def test_full_disk_while_filling_a_store_then_a_rerun_completes(data: dict, small_disk) -> None:
    from napari_revolver.core.predictor import RevolverPredictor

    mount, fill, filler = small_disk
    store = mount / "f.zarr"
    image = tifffile.imread(data["dir"] / "img.tif")
    predictor = RevolverPredictor(device="cpu", batch_size=1)
    predictor.set_volume(image, store=store)
    fill(200_000)  # room for a few slices (about 52 kB each), not all 16
    with pytest.raises(OSError) as info:
        for _ in predictor.precompute():
            pass
    assert info.value.errno == errno.ENOSPC
    done = zarr.open_array(str(store / "done"), mode="r")[:]
    assert 0 < done.sum() < N
    filler.unlink()
    again = RevolverPredictor(device="cpu", batch_size=1)
    again.set_volume(image, store=store)
    assert list(again.precompute())[-1] == (N, N)
    _assert_store_matches(store, data["store"])


# ----------------------------------------------------------------------------- two writers


def test_two_processes_fill_one_store_at_once(data: dict, tmp_path: Path) -> None:
    store = tmp_path / "f.zarr"
    logs = [tmp_path / f"stderr{k}.txt" for k in range(2)]
    procs = [_spawn(_precompute_args(data["dir"], store), log) for log in logs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=180) == 0, log.read_text(errors="replace")[-2000:]
        assert "Traceback" not in log.read_text(errors="replace")
    _assert_store_matches(store, data["store"])
