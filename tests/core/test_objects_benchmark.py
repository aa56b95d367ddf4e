"""benchmarks/objects.py: the summary of followed objects a user would click."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def test_followed_objects_a_user_would_click_are_summarised_apart(
    benchmark_module, tmp_path: Path
) -> None:
    with benchmark_module("objects") as ob:
        disc = np.hypot(*np.mgrid[-10:11, -10:11]) <= 8
        sliver = np.zeros((21, 21), bool)
        sliver[5:15, 10:13] = True  # three pixels wide
        assert ob.inscribed_radius(disc) == pytest.approx(8.0, abs=0.1)
        assert ob.inscribed_radius(sliver) == pytest.approx(2.0)
        edge = np.zeros((21, 21), bool)
        edge[:, :4] = True  # cut by the slice's border: as narrow there
        assert ob.inscribed_radius(edge) == pytest.approx(2.0)

        row = {
            "data": "cells",
            "start": 3,
            "follower": True,
            "n_objects": 3,
            "iou_mean": 0.4,
            "frac_iou_ge_0.5": 1 / 3,
            "ious": [0.9, 0.1, 0.2],
            "inscribed": [9.0, 2.0, 6.0],
            "given_start": {"iou_mean": 0.5, "frac_iou_ge_0.5": 0.5},
            "copied_start": {"iou_mean": 0.3, "frac_iou_ge_0.5": 0.0},
        }
        k = ob.clickable(row)
        assert k["n_objects"] == 2 and k["iou_mean"] == pytest.approx(0.55)
        assert k["frac_iou_ge_0.5"] == pytest.approx(0.5)
        old = {key: v for key, v in row.items() if key != "inscribed"}
        assert ob.clickable(old) is None  # rows written before the radius was kept
        ob.write([], [row, old], tmp_path, 20)
        table = (tmp_path / "objects.md").read_text()
        assert "| 2, 0.550, 50% |" in table and "| - |" in table
        assert json.loads((tmp_path / "objects.json").read_text())["follow"][0]["inscribed"]
