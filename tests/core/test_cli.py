"""Tests for the ``revolver`` command line, run in-process through ``cli.main``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_revolver import cli
from napari_revolver.core.io import PointTable, read_image, read_points, write_points
from napari_revolver.core.predictor import RevolverPredictor
from napari_revolver.core.task import load_task
from napari_revolver.core.weights import load_weights, sha256_file

SHAPE = (3, 40, 48)


@pytest.fixture
def small_inputs(tmp_path: Path, make_blobs) -> tuple[Path, Path]:
    """A small (Z, Y, X) uint16 TIFF and a points CSV with clicks on its middle slice."""
    img = np.clip(make_blobs(SHAPE) * 1000 + 200, 0, None).astype(np.uint16)
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, img, imagej=True, metadata={"axes": "ZYX"})
    points = tmp_path / "points.csv"
    _points_csv(points, [[1, 20, 24], [1, 30, 10], [1, 2, 2], [1, 38, 46]], [1, 1, 0, 0])
    return image, points


def _points_csv(
    path: Path, points: list[list[float]], labels: list[int], task: str = "blobs"
) -> Path:
    return write_points(
        path,
        PointTable(np.asarray(points, float), np.asarray(labels), (task,) * len(points)),
        overwrite=True,
    )


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "revolver: error:" in err
    return err


# ----------------------------------------------------------------------------- sample + segment


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``revolver sample`` then ``revolver segment --save-task`` on its files, once per module."""
    from napari_revolver.core.model.registry import build_model
    from napari_revolver.core.weights import save_weights

    root = tmp_path_factory.mktemp("sample")
    import torch

    torch.manual_seed(0)
    weights = save_weights(build_model("revolver-tiny"), root / "tiny.safetensors")
    data = root / "data"
    assert cli.main(["sample", str(data)]) == 0
    out = root / "seg.tif"
    tasks = root / "tasks"
    code = cli.main(
        [
            "segment",
            str(data / "image.tif"),
            "--points",
            str(data / "points.csv"),
            "-o",
            str(out),
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--save-task",
            str(tasks),
        ]
    )
    assert code == 0
    return {"data": data, "out": out, "tasks": tasks, "weights": weights}


def test_sample_writes_image_points_and_labels(sample_run: dict[str, Path]) -> None:
    data = sample_run["data"]
    assert sorted(p.name for p in data.iterdir()) == ["image.tif", "labels.tif", "points.csv"]
    image = read_image(data / "image.tif")
    assert image.data.shape == (24, 256, 256) and image.data.dtype == np.uint16
    assert image.axes == "ZYX"
    labels = read_image(data / "labels.tif")
    assert labels.data.shape == (24, 256, 256)
    assert set(np.unique(labels.data)) == {0, 1}
    table = read_points(data / "points.csv")
    assert table.ndim == 3 and (table.labels == 1).any() and (table.labels == 0).any()


def test_sample_refuses_to_overwrite(
    sample_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["sample", str(sample_run["data"])]) == 1
    assert "--overwrite" in _error(capsys)


def test_segment_writes_label_tiff_with_image_shape_and_axes(sample_run: dict[str, Path]) -> None:
    seg = read_image(sample_run["out"])
    assert seg.data.shape == (24, 256, 256)
    assert seg.axes == "ZYX"
    assert np.issubdtype(seg.data.dtype, np.unsignedinteger)
    assert set(np.unique(seg.data)) <= {0, 1}
    assert not list(sample_run["out"].parent.glob("*.part"))


def test_segment_save_task_writes_loadable_json(sample_run: dict[str, Path]) -> None:
    files = sorted(sample_run["tasks"].glob("*.json"))
    assert [f.name for f in files] == ["nuclei.json"]
    task = load_task(files[0])
    assert task.name == "nuclei"
    assert task.model_key == "revolver-tiny"
    assert task.weights_sha256 == sha256_file(sample_run["weights"])
    table = read_points(sample_run["data"] / "points.csv")
    np.testing.assert_array_equal(task.points, table.points)
    np.testing.assert_allclose(
        task.mass, [(table.labels == 1).sum(), (table.labels == 0).sum()], rtol=1e-5
    )


def test_segment_output_matches_the_python_api(
    sample_run: dict[str, Path], small_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    image, points = small_inputs
    out = tmp_path / "out.tif"
    weights = sample_run["weights"]
    assert (
        cli.main(
            [
                "segment",
                str(image),
                "--points",
                str(points),
                "-o",
                str(out),
                "--weights",
                str(weights),
                "--device",
                "cpu",
                "--threshold",
                "0.3",
            ]
        )
        == 0
    )
    p = RevolverPredictor(weights, "cpu")
    p.set_volume(tifffile.imread(image))
    table = read_points(points)
    expected = p.segment(p.guide(table.points, table.labels), threshold=0.3)
    np.testing.assert_array_equal(read_image(out).data, expected)


# ----------------------------------------------------------------------------------- segment


def _segment(image: Path, points: Path, out: Path, weights: Path, *extra: str) -> int:
    return cli.main(
        [
            "segment",
            str(image),
            "--points",
            str(points),
            "-o",
            str(out),
            "--weights",
            str(weights),
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_segment_at_half_scale_matches_the_python_api_in_image_pixels(
    small_inputs: tuple[Path, Path], tiny_weights: Path, tmp_path: Path, capsys
) -> None:
    image, points = small_inputs
    out, tasks = tmp_path / "half.tif", tmp_path / "tasks"
    extra = ("--scale", "0.5", "--save-task", str(tasks))
    assert _segment(image, points, out, tiny_weights, *extra) == 0
    data_shape = tifffile.imread(image).shape
    said = capsys.readouterr().out
    assert f"slices read at scale 0.5 ({data_shape[1] // 2} x {data_shape[2] // 2})" in said
    data = tifffile.imread(image)
    got = read_image(out).data
    assert got.shape == data.shape
    p = RevolverPredictor(tiny_weights, "cpu")
    p.set_volume(data, scale=0.5)
    table = read_points(points)
    np.testing.assert_array_equal(got, p.segment(p.guide(table.points, table.labels)))
    [saved] = tasks.glob("*.json")
    assert load_task(saved).scale == 0.5


def test_segment_refuses_a_scale_out_of_range(
    small_inputs: tuple[Path, Path], tiny_weights: Path, tmp_path: Path, capsys
) -> None:
    image, points = small_inputs
    with pytest.raises(SystemExit) as exit_:
        _segment(image, points, tmp_path / "x.tif", tiny_weights, "--scale", "9")
    assert exit_.value.code == 2
    assert "scale must be between 0.1 and 4; got 9.0" in capsys.readouterr().err
    assert not (tmp_path / "x.tif").exists()


def test_segment_refuses_to_overwrite_without_flag(
    small_inputs: tuple[Path, Path],
    tiny_weights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image, points = small_inputs
    out = tmp_path / "out.tif"
    out.write_bytes(b"precious")
    assert _segment(image, points, out, tiny_weights) == 1
    assert "--overwrite" in _error(capsys)
    assert out.read_bytes() == b"precious"
    assert _segment(image, points, out, tiny_weights, "--overwrite") == 0
    assert read_image(out).data.shape == SHAPE


def test_segment_instances_writes_instance_ids(
    small_inputs: tuple[Path, Path], tiny_weights: Path, tmp_path: Path
) -> None:
    image, points = small_inputs
    plain, inst = tmp_path / "plain.tif", tmp_path / "inst.tif"
    assert _segment(image, points, plain, tiny_weights, "--threshold", "0.3") == 0
    assert _segment(image, points, inst, tiny_weights, "--threshold", "0.3", "--instances") == 0
    a, b = read_image(plain).data, read_image(inst).data
    assert b.shape == SHAPE
    np.testing.assert_array_equal(b > 0, a > 0)
    # Ids are linked through z: an object overlapping one on the slice before keeps its id,
    # and one id is one object per slice.
    from napari_revolver.core.tracking import match_instances

    for z in range(1, SHAPE[0]):
        for cur, prev in match_instances(b[z], b[z - 1]).items():
            assert cur == prev


def test_segment_writes_several_tasks_with_their_values(
    small_inputs: tuple[Path, Path], tiny_weights: Path, tmp_path: Path
) -> None:
    image, _ = small_inputs
    points = tmp_path / "two.csv"
    coords = np.array([[1, 20, 24], [1, 2, 2], [1, 2, 2], [1, 20, 24]], float)
    write_points(points, PointTable(coords, np.array([1, 0, 1, 0]), ("fg", "fg", "bg", "bg")))
    out = tmp_path / "two.tif"
    tasks = tmp_path / "tasks"
    assert (
        _segment(image, points, out, tiny_weights, "--threshold", "0.0", "--save-task", str(tasks))
        == 0
    )
    seg = read_image(out).data
    assert set(np.unique(seg)) <= {1, 2}  # threshold 0: every pixel gets a task
    assert {load_task(f).label_value for f in tasks.glob("*.json")} == {1, 2}
    assert {f.stem for f in tasks.glob("*.json")} == {"fg", "bg"}


def test_segment_interrupted_exits_130_and_writes_nothing(
    small_inputs: tuple[Path, Path],
    tiny_weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RevolverPredictor, "propagate", interrupted)
    image, points = small_inputs
    out = tmp_path / "out.tif"
    assert _segment(image, points, out, tiny_weights) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.glob("*.part"))


# ------------------------------------------------------------------------------------- errors


def test_segment_missing_image(
    small_inputs: tuple[Path, Path],
    tiny_weights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, points = small_inputs
    assert _segment(tmp_path / "nope.tif", points, tmp_path / "o.tif", tiny_weights) == 1
    assert "nope.tif" in _error(capsys)


def test_segment_missing_output_folder(
    small_inputs: tuple[Path, Path],
    tiny_weights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image, points = small_inputs
    assert _segment(image, points, tmp_path / "no" / "o.tif", tiny_weights) == 1
    assert "does not exist" in _error(capsys)


@pytest.mark.parametrize(
    ("points", "labels", "match"),
    [
        ([[1, 20, 24], [1, 2, 2]], [0, 0], "no positive point"),
        ([[1, 20, 24], [1, 2, 60]], [1, 0], "outside the image"),
        ([[5, 20, 24]], [1], "outside the image"),
        ([[20, 24], [2, 2]], [1, 0], r"points must have shape \(N, 3\)"),
    ],
)
def test_segment_bad_points_exit_1(
    small_inputs: tuple[Path, Path],
    tiny_weights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    points: list[list[float]],
    labels: list[int],
    match: str,
) -> None:
    image, _ = small_inputs
    csv = _points_csv(tmp_path / "bad.csv", points, labels)
    out = tmp_path / "o.tif"
    assert _segment(image, csv, out, tiny_weights) == 1
    err = _error(capsys)
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err)
    assert "'blobs'" in err  # the task is named
    assert not out.exists()


def test_segment_corrupt_weights_file(
    small_inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, points = small_inputs
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert _segment(image, points, tmp_path / "o.tif", bad) == 1
    assert "not a readable safetensors checkpoint" in _error(capsys)


def test_segment_weights_with_wrong_recorded_sha256(
    small_inputs: tuple[Path, Path],
    tiny_weights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image, points = small_inputs
    tiny_weights.with_suffix(".json").write_text(json.dumps({"sha256": "0" * 64}))
    assert _segment(image, points, tmp_path / "o.tif", tiny_weights) == 1
    err = _error(capsys)
    assert "corrupt" in err and "0" * 64 in err
    # With the right digest recorded, the same file loads.
    tiny_weights.with_suffix(".json").write_text(json.dumps({"sha256": sha256_file(tiny_weights)}))
    assert _segment(image, points, tmp_path / "o.tif", tiny_weights) == 0


def test_segment_missing_weights_file(
    small_inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, points = small_inputs
    assert _segment(image, points, tmp_path / "o.tif", tmp_path / "none.safetensors") == 1
    assert "does not exist" in _error(capsys)


def test_segment_text_file_as_image(
    small_inputs: tuple[Path, Path],
    tiny_weights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, points = small_inputs
    text = tmp_path / "notes.tif"
    text.write_text("this is not an image\n" * 20)
    assert _segment(text, points, tmp_path / "o.tif", tiny_weights) == 1
    assert "not a readable TIFF" in _error(capsys)


def test_segment_channel_on_single_channel_image(
    small_inputs: tuple[Path, Path],
    tiny_weights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image, points = small_inputs
    assert _segment(image, points, tmp_path / "o.tif", tiny_weights, "--channel", "1") == 1
    assert "no channel axis" in _error(capsys)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["segment"])
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


# ------------------------------------------------------------------------------- precompute


def test_precompute_then_segment_uses_the_store(
    small_inputs: tuple[Path, Path],
    tiny_weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image, points = small_inputs
    store = tmp_path / "features.zarr"
    assert (
        cli.main(
            [
                "precompute",
                str(image),
                "--store",
                str(store),
                "--weights",
                str(tiny_weights),
                "--device",
                "cpu",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert store.is_dir()
    done = np.asarray(zarr.open_group(str(store), mode="r")["done"][:])
    assert done.shape == (SHAPE[0],) and done.all()

    encoded: list[int] = []
    original = RevolverPredictor._encode

    def counting(self, images):
        encoded.append(len(images))
        return original(self, images)

    monkeypatch.setattr(RevolverPredictor, "_encode", counting)
    out = tmp_path / "o.tif"
    assert _segment(image, points, out, tiny_weights, "--store", str(store)) == 0
    assert encoded == []
    assert read_image(out).data.shape == SHAPE


def test_precompute_without_store_exits_1(
    small_inputs: tuple[Path, Path], tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, _ = small_inputs
    assert cli.main(["precompute", str(image), "--weights", str(tiny_weights)]) == 1
    assert "--store" in _error(capsys)


# ------------------------------------------------------------------------------------- info


def test_info_prints_weights_sha256(tiny_weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--weights", str(tiny_weights)]) == 0
    assert "fits each task to its support (filter bank + ridge fit): yes" in (
        capsys.readouterr().out
    )
    assert cli.main(["info", "--weights", str(tiny_weights)]) == 0
    out = capsys.readouterr().out
    assert sha256_file(tiny_weights) in out
    assert "revolver-tiny" in out


def test_module_entry_point_runs_in_a_subprocess(tiny_weights: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "napari_revolver.cli", "info", "--weights", str(tiny_weights)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(tiny_weights) in proc.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_revolver.cli",
            "info",
            "--weights",
            str(tiny_weights.with_name("missing.safetensors")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("revolver: error:")


def test_train_writes_checkpoint_log_and_weights_then_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    common = [
        "train",
        "--out",
        str(run),
        "--model",
        "revolver-tiny",
        "--crop",
        "64",
        "--batch",
        "2",
        "--val-every",
        "2",
        "--checkpoint-every",
        "2",
        "--val-episodes",
        "8",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    assert cli.main([*common, "--steps", "2"]) == 0
    assert (run / "checkpoint.pt").exists()
    assert (run / "best.safetensors").exists()
    load_weights(run / "best.safetensors")
    assert cli.main([*common, "--steps", "4"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    # The second run continued from step 2 instead of starting again.
    assert steps == [2, 4]


def test_train_with_a_frozen_encoder_and_a_time_budget(tiny_weights: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from napari_revolver.core.train import TrainConfig, _lr_at, train
    from napari_revolver.core.weights import encoder_state_equal

    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--model", "revolver-tiny", "--crop", "64"]
    args += ["--batch", "2", "--val-every", "50", "--val-episodes", "8", "--workers", "0"]
    args += ["--device", "cpu", "--init", str(tiny_weights), "--lr", "0.05"]
    assert cli.main([*args, "--freeze-encoder", "--minutes", "0"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # The warm start is scored first; a spent budget stops after one step, scored and saved.
    assert [r["step"] for r in log] == [0, 1] and log[1]["val_iou"] is not None
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    init = load_file(str(tiny_weights))
    assert encoder_state_equal(init, state)  # weights and batch-norm statistics alike
    assert not all(torch.equal(init[k], state[k]) for k in init if k in state)  # the head moved
    # The learning rate decays over whichever of steps and minutes is further spent.
    cfg = TrainConfig(lr=1.0, steps=100_000, minutes=10.0)
    assert _lr_at(cfg, 400, elapsed_s=0.0) == pytest.approx(1.0, abs=1e-3)
    assert _lr_at(cfg, 400, elapsed_s=300.0) == pytest.approx(0.5, abs=1e-3)
    assert _lr_at(cfg, 400, elapsed_s=900.0) == 0.0
    with pytest.raises(ValueError, match="init"):
        train(TrainConfig(out=str(tmp_path / "r2"), model="revolver-tiny", freeze_encoder=True))


def test_train_fit_only_moves_the_fit_and_nothing_else(tiny_weights: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from napari_revolver.core.train import TrainConfig, train

    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--model", "revolver-tiny", "--crop", "64"]
    args += ["--batch", "2", "--val-every", "50", "--val-episodes", "4", "--workers", "0"]
    args += ["--device", "cpu", "--init", str(tiny_weights), "--lr", "0.05", "--steps", "3"]
    assert cli.main([*args, "--fit-only"]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    init = load_file(str(tiny_weights))
    moved = {k for k in init if not torch.equal(init[k], state[k])}
    # The fit's scalars and the fusions' weights moved; in those, only the columns of the fit.
    assert {"segmentor.fit.gain", "segmentor.fuse.weight", "segmentor.fine_fuse.weight"} <= moved
    assert moved <= {k for k in init if ".fit." in k} | {
        "segmentor.fuse.weight",
        "segmentor.fine_fuse.weight",
    }
    for name, n in (("segmentor.fuse.weight", 1), ("segmentor.fine_fuse.weight", 1 + 16)):
        assert torch.equal(init[name][:, :-n], state[name][:, :-n])
        assert not torch.equal(init[name][:, -n:], state[name][:, -n:])
    with pytest.raises(ValueError, match="fit_only keeps the network of init"):
        train(TrainConfig(out=str(tmp_path / "r2"), model="revolver-tiny", fit_only=True))


def test_train_takes_the_share_of_inverted_and_colour_mixed_episodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from napari_revolver.core.train import TrainConfig, _episode_config

    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--model", "revolver-tiny", "--crop", "64", "--steps", "1"]
    args += ["--batch", "2", "--val-episodes", "8", "--workers", "0", "--device", "cpu"]
    assert cli.main([*args, "--p-invert", "0", "--p-colour", "0.1"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["p_invert"], config["p_colour"]) == (0.0, 0.1)
    ecfg = _episode_config(TrainConfig(**config), p_instance=0.7)
    assert (ecfg.p_invert, ecfg.p_colour, ecfg.p_instance, ecfg.crop) == (0.0, 0.1, 0.7, 64)
    assert cli.main([*args, "--p-colour", "1.5"]) == 1
    assert "--p-colour is a share, between 0 and 1; got 1.5" in capsys.readouterr().err


def test_train_rejects_a_crop_that_is_not_a_multiple_of_32(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["train", "--out", str(tmp_path / "r"), "--crop", "100", "--steps", "1"]) == 1
    assert "multiple of 32" in capsys.readouterr().err


def test_segment_reads_ome_zarr_and_writes_zarr(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, (2, 1, 3, 40, 48), dtype=np.uint16)  # t, c, z, y, x
    group = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w")
    group.create_array("0", shape=data.shape, chunks=(1, 1, 1, 40, 48), dtype="uint16")[:] = data
    group.attrs["multiscales"] = [
        {
            "axes": [{"name": n} for n in "tczyx"],
            "datasets": [
                {
                    "path": "0",
                    "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 2, 0.5, 0.5]}],
                }
            ],
        }
    ]
    write_points(
        tmp_path / "p.csv", PointTable(np.array([[0, 1, 20, 20], [0, 1, 5, 5]]), np.array([1, 0]))
    )
    out = tmp_path / "labels.zarr"
    code = cli.main(
        [
            "segment",
            str(tmp_path / "img.ome.zarr"),
            "--points",
            str(tmp_path / "p.csv"),
            "-o",
            str(out),
            "--weights",
            str(tiny_weights),
        ]
    )
    assert code == 0, capsys.readouterr().err
    labels = zarr.open_array(str(out), mode="r")
    assert labels.shape == (2, 3, 40, 48) and labels.chunks == (1, 1, 40, 48)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_segment_applies_the_tasks_to_more_images(
    tmp_path: Path, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(1)
    for name, n in (("a", 3), ("b", 2), ("c", 4)):
        tifffile.imwrite(
            tmp_path / f"{name}.tif",
            rng.integers(0, 999, (n, 40, 48), np.uint16),
            imagej=True,
            metadata={"axes": "ZYX"},
        )
    write_points(
        tmp_path / "p.csv", PointTable(np.array([[1, 20, 20], [1, 5, 5]]), np.array([1, 0]))
    )
    out = tmp_path / "out"
    code = cli.main(
        [
            "segment",
            str(tmp_path / "a.tif"),
            "--points",
            str(tmp_path / "p.csv"),
            "-o",
            str(out),
            "--apply-to",
            str(tmp_path / "b.tif"),
            str(tmp_path / "c.tif"),
            "--weights",
            str(tiny_weights),
        ]
    )
    assert code == 0, capsys.readouterr().err
    shapes = {p.name: tifffile.imread(p).shape for p in sorted(out.iterdir())}
    assert shapes == {
        "a.labels.tif": (3, 40, 48),
        "b.labels.tif": (2, 40, 48),
        "c.labels.tif": (4, 40, 48),
    }
    # A second run refuses to overwrite, naming the file.
    code = cli.main(
        [
            "segment",
            str(tmp_path / "a.tif"),
            "--points",
            str(tmp_path / "p.csv"),
            "-o",
            str(out),
            "--apply-to",
            str(tmp_path / "b.tif"),
            "--weights",
            str(tiny_weights),
        ]
    )
    assert code == 1 and "a.labels.tif exists" in capsys.readouterr().err


def _sample_segment(sample_run: dict[str, Path], tmp_path: Path) -> list[str]:
    """``revolver segment`` of the sample with its clicks and weights, into ``seg.tif``."""
    data = sample_run["data"]
    return [
        "segment",
        str(data / "image.tif"),
        "--points",
        str(data / "points.csv"),
        "--weights",
        str(sample_run["weights"]),
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "seg.tif"),
    ]


def test_segment_learns_from_painted_slices(
    sample_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = sample_run["data"]
    truth = read_image(data / "labels.tif").data
    painted = np.zeros_like(truth, dtype=np.uint8)
    painted[12] = truth[12]  # slice 12 painted by hand: its nuclei are 1, the rest background
    path = tmp_path / "painted.tif"
    tifffile.imwrite(path, painted)
    tasks = tmp_path / "tasks"
    args = [*_sample_segment(sample_run, tmp_path), "--painted", str(path)]
    assert cli.main([*args, "--save-task", str(tasks)]) == 0
    task = load_task(tasks / "nuclei.json")
    assert [k for k, _ in task.support_masks] == []  # support masks stay out of task files
    assert task.pixel_fit is not None  # a whole painted slice is enough to validate a fit
    assert task.mass[0] > (read_points(data / "points.csv").labels == 1).sum()
    # The painted slice is written as painted; the others are predicted.
    out = read_image(tmp_path / "seg.tif").data
    np.testing.assert_array_equal(out[12], painted[12])
    assert out[[0, 23]].any()
    # Wrong shape, all zero, or objects: refused with a reason.
    tifffile.imwrite(path, painted[:3])
    assert cli.main([*args[:-1], str(path), "--overwrite"]) == 1
    assert "expected the image's labels shape" in _error(capsys)
    tifffile.imwrite(path, np.zeros_like(painted))
    assert cli.main([*args, "--overwrite"]) == 1
    assert "all zero" in _error(capsys)


def test_segment_class_tasks_let_their_clicks_decide_on_a_pixel_fit(
    sample_run: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = sample_run["data"]
    tasks = tmp_path / "tasks"
    args = [*_sample_segment(sample_run, tmp_path), "--save-task", str(tasks)]
    with caplog.at_level("INFO", logger="napari_revolver"):
        assert cli.main(args) == 0
    table = read_points(data / "points.csv")
    assert f"learns from {len(table.labels)} click(s); pixel fit" in caplog.text
    # The task carries what the predictor's click fit gives for the same clicks.
    predictor = RevolverPredictor(sample_run["weights"], "cpu")
    predictor.set_volume(read_image(data / "image.tif").data)
    expected = predictor.fit_clicks(table.points, table.labels)
    saved = load_task(tasks / "nuclei.json").pixel_fit
    assert (saved is None) == (expected is None)
    if expected is not None:
        np.testing.assert_allclose(saved.coef, expected.coef, rtol=1e-4, atol=1e-5)
        assert (saved.gain, saved.net_weight) == (expected.gain, expected.net_weight)
