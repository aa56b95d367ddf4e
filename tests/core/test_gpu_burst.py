"""scripts/gpu_burst.sh, dry-run on the CPU along the path a GPU run takes (its defaults)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file

from napari_revolver.core.weights import default_weights_path, encoder_state_equal

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_burst.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_burst_trains_on_its_default_worker_count_and_keeps_the_encoder(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "data" / "blobs"
    data.mkdir(parents=True)
    labels = np.zeros((4, 96, 96), np.uint16)
    for z in range(4):
        for i, (y, x) in enumerate(rng.integers(16, 80, (5, 2)), start=1):
            labels[z, y - 6 : y + 6, x - 6 : x + 6] = i
    image = (labels > 0) * 150.0 + rng.normal(40, 10, labels.shape)
    tifffile.imwrite(data / "image.tif", image.clip(0, 255).astype(np.uint8))
    tifffile.imwrite(data / "labels.tif", labels)
    out = tmp_path / "out"
    out.mkdir()
    # Only what makes it small; the worker count, the threads and the encoder freeze are the
    # script's own (a worker count it got wrong once only showed on the GPU machine).
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "DATA": str(data.parent),
        "CROP": "64",
        "BATCH": "2",
        "TEST_S": "1",
        "SPEED_S": "1",
        "PYTHON": sys.executable,
    }
    env.pop("WORKERS", None)
    done = subprocess.run(
        ["bash", str(SCRIPT), "run", str(out), "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log_text = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    assert done.returncode == 0, done.stderr + log_text
    assert "episode workers" in done.stdout
    assert "error" not in log_text.lower(), log_text
    steps = [
        json.loads(line)["step"] for line in (out / "run" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 1]
    # The recipe: no inverted or colour-mixed episodes, 60% one-object episodes.
    config = json.loads((out / "run" / "config.json").read_text())
    assert (config["p_invert"], config["p_colour"], config["p_instance"]) == (0.0, 0.0, 0.6)
    shipped = load_file(str(default_weights_path()))
    state = torch.load(out / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert encoder_state_equal(shipped, state)
