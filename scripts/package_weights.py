"""Install a training run's best weights as the package default, with their sha256 and facts.

python scripts/package_weights.py RUN_DIR [--note "trained on ..."]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from napari_revolver.core.weights import default_weights_path, load_weights, sha256_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", type=Path)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    src = args.run / "best.safetensors"
    loaded = load_weights(src)  # refuses anything that is not a valid checkpoint
    dst = default_weights_path()
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    config = json.loads((args.run / "config.json").read_text())
    # Machine-specific paths say nothing about the weights; keep the names.
    config["out"] = Path(config["out"]).name
    for key in ("data", "init"):
        if config.get(key):
            config[key] = Path(config[key]).name
    info = {
        "sha256": sha256_file(dst),
        "model": loaded.model_key,
        "bytes": dst.stat().st_size,
        "step": loaded.metadata.get("step"),
        "val_iou": loaded.metadata.get("val_iou"),
        "train_config": config,
        "note": args.note,
    }
    dst.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"installed {dst} ({info['bytes'] / 1e6:.2f} MB, sha256 {info['sha256'][:16]}...)")


if __name__ == "__main__":
    main()
