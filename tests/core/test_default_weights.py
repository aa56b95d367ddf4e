"""The weights that ship with the package: present, verified, and good on the demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_revolver import cli
from napari_revolver.core.weights import default_weights_path, load_weights, sha256_file


def test_shipped_weights_are_small_verified_safetensors() -> None:
    path = default_weights_path()
    assert path.exists(), "the package must ship its default weights"
    assert path.stat().st_size <= 20 * 2**20
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["sha256"] == sha256_file(path)
    loaded = load_weights()
    assert loaded.model_key == "revolver-s" and not loaded.model.training


def test_tampered_default_weights_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from napari_revolver.core import weights as weights_module

    copy = tmp_path / "revolver-s.safetensors"
    data = bytearray(default_weights_path().read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    copy.with_suffix(".json").write_text(default_weights_path().with_suffix(".json").read_text())
    monkeypatch.setattr(weights_module, "default_weights_path", lambda: copy)
    with pytest.raises(ValueError, match="corrupt"):
        load_weights()


def test_demo_reaches_the_promised_accuracy(tmp_path: Path) -> None:
    """`revolver sample` + `revolver segment` with the default weights: IoU >= 0.8."""
    assert cli.main(["sample", str(tmp_path)]) == 0
    out = tmp_path / "segmented.tif"
    assert (
        cli.main(
            [
                "segment",
                str(tmp_path / "image.tif"),
                "--points",
                str(tmp_path / "points.csv"),
                "-o",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    pred = tifffile.imread(out) > 0
    truth = tifffile.imread(tmp_path / "labels.tif") > 0
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou >= 0.8, f"demo IoU {iou:.3f} with the shipped weights"
    assert np.any(pred)
