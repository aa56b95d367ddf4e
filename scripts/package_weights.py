"""Install a training run's best weights as the package default, with their sha256 and facts.

python scripts/package_weights.py RUN_DIR [--note "trained on ..."]
python scripts/package_weights.py RUN_DIR --clicks [--note ...]   # a `revolver train-clicks` run
python scripts/package_weights.py RUN_DIR --follow [--note ...]   # a `revolver train-follow` run
python scripts/package_weights.py RUN_DIR --corrections [--note ...]   # train-clicks, corrections

With ``--clicks`` the run's best click refiner goes beside the default weights as
``<stem>-clicks.safetensors``, with ``--follow`` its best follower as ``<stem>-follow.safetensors``,
with ``--corrections`` its best click refiner as the refiner of corrections,
``<stem>-corrections.safetensors``; each must have been trained on exactly those weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from napari_revolver.core.weights import (
    ENCODER_OF,
    default_refiner_path,
    default_weights_path,
    encoder_sources,
    encoder_state_equal,
    load_refiner,
    load_weights,
    sha256_file,
    trained_as,
)


def _clean(config: dict) -> dict:
    """Machine-specific paths say nothing about the weights; keep the names."""
    config["out"] = Path(config["out"]).name
    for key in ("data", "init", "weights", "first_refiner"):
        if config.get(key):
            config[key] = Path(config[key]).name
    return config


def install_refiner(run: Path, note: str, role: str) -> None:
    """Install a run's best refiner (``role``: clicks, follow or corrections) beside the weights."""
    src = run / "best.safetensors"
    base = load_weights()
    # Refuses a refiner of other weights, or of another role (corrections are click episodes).
    load_refiner(src, base.sha256, role=trained_as(role))
    dst = default_refiner_path(default_weights_path(), role)  # type: ignore[arg-type]
    shutil.copyfile(src, dst)
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
    info = {
        "sha256": sha256_file(dst),
        "base_sha256": base.sha256,
        "bytes": dst.stat().st_size,
        "step": meta.get("step"),
        "train_config": _clean(json.loads((run / "config.json").read_text())),
        "note": note,
    }
    dst.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"installed {dst} ({info['bytes'] / 1e6:.2f} MB, sha256 {info['sha256'][:16]}...)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", type=Path)
    ap.add_argument("--note", default="")
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--clicks", action="store_true", help="the run trained a click refiner")
    kind.add_argument("--follow", action="store_true", help="the run trained a follower")
    kind.add_argument(
        "--corrections",
        action="store_true",
        help="the run trained a click refiner to draw corrections (clicks after an object's first)",
    )
    args = ap.parse_args()
    if args.clicks or args.follow or args.corrections:
        role = "clicks" if args.clicks else "follow" if args.follow else "corrections"
        install_refiner(args.run, args.note, role)
        return
    src = args.run / "best.safetensors"
    loaded = load_weights(src)  # refuses anything that is not a valid checkpoint
    dst = default_weights_path()
    dst.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(loaded.metadata)
    new_state = load_file(str(src))
    if dst.exists() and encoder_state_equal(new_state, load_file(str(dst))):
        # A head trained on the installed encoder (`revolver train --freeze-encoder`): the
        # refiners trained on the installed weights read the same features.
        old = load_weights()
        meta[ENCODER_OF] = ",".join(dict.fromkeys([old.sha256, *encoder_sources(old.metadata)]))
        print(f"same encoder as the installed weights {old.sha256[:16]}...: refiners kept")
    save_file(new_state, str(dst), metadata=meta)
    config = _clean(json.loads((args.run / "config.json").read_text()))
    info = {
        "sha256": sha256_file(dst),
        "model": loaded.model_key,
        "bytes": dst.stat().st_size,
        "step": loaded.metadata.get("step"),
        "val_iou": loaded.metadata.get("val_iou"),
        ENCODER_OF: meta.get(ENCODER_OF),
        "train_config": config,
        "note": args.note,
    }
    dst.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"installed {dst} ({info['bytes'] / 1e6:.2f} MB, sha256 {info['sha256'][:16]}...)")


if __name__ == "__main__":
    main()
