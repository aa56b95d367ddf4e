"""benchmarks/scale.py on a data folder made here: every scale scored, timed against scale 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from napari_revolver.core.synthetic import sample_stack


def test_each_scale_is_scored_in_data_pixels_and_timed_against_scale_1(
    benchmark_module, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, labels, _, _ = sample_stack(seed=4, shape=(12, 64, 64))
    vnc = tmp_path / "data" / "vnc_sstem_organelles"
    vnc.mkdir(parents=True)
    tifffile.imwrite(vnc / "image.tif", image)
    # Mitochondria are labels == 3 in this set: the nuclei, as 3D connected components.
    tifffile.imwrite(vnc / "labels.tif", np.where(labels > 0, 3, 0).astype(np.uint8))
    out = tmp_path / "scale.json"
    argv = ["scale.py", "--data", str(tmp_path / "data"), "--sets", "vnc_mito"]
    argv += ["--follow-sets", "vnc_mito", "--images", "2", "--objects", "2", "--max-clicks", "2"]
    argv += ["--follow", "2", "--scales", "0.5", "--weights", str(tiny_weights), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with benchmark_module("scale") as module:
        module.main()
    rows = json.loads(out.read_text())
    assert [(r["kind"], r["scale"]) for r in rows] == [
        ("clicks", 1.0),
        ("clicks", 0.5),
        ("follow", 1.0),
        ("follow", 0.5),
    ]
    assert rows[0]["time_ratio"] == 1.0 and rows[2]["time_ratio"] == 1.0
    assert all(0 <= r.get("iou@1", r.get("iou_mean")) <= 1 for r in rows)
    n_components = ndimage.label(labels[0] > 0)[0].max()
    assert rows[2]["n_objects"] == min(2, n_components)
