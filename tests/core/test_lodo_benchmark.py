"""The leave-one-data-set-out benchmark on run folders and a data folder made here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tifffile

from napari_revolver.core.synthetic import sample_stack


@pytest.fixture(scope="module")
def lodo(benchmark_module):
    with benchmark_module("lodo") as module:
        yield module


def _run(folder: Path, weights: Path, datasets: list[str]) -> Path:
    folder.mkdir()
    shutil.copy(weights, folder / "best.safetensors")
    config = {"data": "data", "datasets": datasets, "steps": 10}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_runs_are_scored_on_every_data_set_and_left_out_ones_marked(
    lodo, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    for name, seed in (("dsb2018_u2os", 1), ("usiigaci_phase", 2)):
        image, labels, _, _ = sample_stack(seed=seed, shape=(12, 64, 64))
        (data / name).mkdir(parents=True)
        tifffile.imwrite(data / name / "image.tif", image)
        tifffile.imwrite(data / name / "labels.tif", labels)
    both = _run(tmp_path / "both", tiny_weights, ["dsb2018_u2os", "usiigaci_phase"])
    one = _run(tmp_path / "no_phase", tiny_weights, ["dsb2018_u2os"])
    assert lodo.trained_on(one) == ["dsb2018_u2os"]
    out = tmp_path / "out"
    monkeypatch.setattr(
        "sys.argv",
        [
            "lodo.py",
            str(data),
            str(both),
            str(one),
            "--datasets",
            "dsb2018_u2os,usiigaci_phase",
            "--points",
            "2",
            "--seeds",
            "1",
            "--out-dir",
            str(out),
        ],
    )
    lodo.main()
    rows = json.loads((out / "lodo.json").read_text())
    assert {(r["run"], r["dataset"], r["seen"]) for r in rows} == {
        ("both", "dsb2018_u2os", True),
        ("both", "usiigaci_phase", True),
        ("no_phase", "dsb2018_u2os", True),
        ("no_phase", "usiigaci_phase", False),
    }
    assert all(0.0 <= r["iou_mean"] <= 1.0 for r in rows)
    text = (out / "lodo.md").read_text()
    # Same weights in both runs: the left-out score equals the trained one, difference zero.
    line = next(t for t in text.splitlines() if t.startswith("| usiigaci_phase | 2 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3].endswith("*") and cells[2] + "*" == cells[3]
    assert cells[-1] == "+0.000"
    line = next(t for t in text.splitlines() if t.startswith("| dsb2018_u2os | 2 |"))
    assert line.rstrip().endswith("| n/a | n/a |")  # nobody left it out
    # Rows scored earlier join new ones in one table.
    again = tmp_path / "again"
    monkeypatch.setattr(
        "sys.argv",
        ["lodo.py", str(data), "--rows", str(out / "lodo.json"), "--out-dir", str(again)],
    )
    lodo.main()
    assert json.loads((again / "lodo.json").read_text()) == rows


def test_a_folder_that_is_not_a_run_is_refused_before_any_work(lodo, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        lodo.trained_on(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"data": None}))
    assert lodo.trained_on(tmp_path) == []  # procedural data only
    with pytest.raises(FileNotFoundError, match="no best.safetensors"):
        lodo.weights_of(tmp_path)
