"""Checkpoints as safetensors: tensors only, never unpickled code; verified by sha256."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .atomic import atomic_write
from .model.guided_net import GuidedNet, ModelConfig
from .model.registry import DEFAULT_MODEL, build_from_config

logger = logging.getLogger(__name__)

__all__ = ["LoadedWeights", "default_weights_path", "load_weights", "save_weights", "sha256_file"]

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class LoadedWeights:
    """A model with its provenance."""

    model: GuidedNet
    path: str
    sha256: str
    metadata: dict[str, str]

    @property
    def model_key(self) -> str:
        """Architecture key of the model (e.g. ``"revolver-tiny"``)."""
        return self.model.config.key


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(model: GuidedNet, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write ``model``'s parameters and buffers to a safetensors file with its config, atomically.

    Parameters
    ----------
    model : GuidedNet
        An unfused model (before :meth:`GuidedNet.for_inference`).
    path : str or Path
        Target file, replaced if it exists; its parent directory must exist.
    extra : dict of str to str, optional
        More metadata to store beside the format version and the config.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    RuntimeError
        If the model's batch norms were folded for inference.
    """
    from safetensors.torch import save

    if getattr(model, "_fused", False):
        raise RuntimeError("cannot save a model whose batch norms were folded for inference")
    meta = {"format_version": FORMAT_VERSION, "config": json.dumps(model.config.to_dict())}
    meta.update(extra or {})
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    payload = save(state, metadata=meta)
    return atomic_write(path, lambda fh: fh.write(payload), binary=True, overwrite=True)


def default_weights_path() -> Path:
    """Return the path of the weights that ship with the package."""
    return Path(
        str(resources.files("napari_revolver") / "weights" / f"{DEFAULT_MODEL}.safetensors")
    )


def _expected_sha256(path: Path) -> str | None:
    info = path.with_suffix(".json")
    if info.exists():
        return json.loads(info.read_text()).get("sha256")
    return None


def load_weights(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> LoadedWeights:
    """Load a checkpoint and build its model in eval mode.

    Parameters
    ----------
    path : path, optional
        A ``.safetensors`` file written by :func:`save_weights` (``revolver train``); default
        the packaged weights, which are checked against the sha256 recorded beside them.
    device : str or torch.device
        Where to put the model.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it is not a readable safetensors checkpoint of a known architecture, its
        parameters do not match the architecture, or its sha256 differs from the recorded one.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else default_weights_path()
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    digest = sha256_file(path)
    expected = _expected_sha256(path)
    if expected is not None and expected != digest:
        raise ValueError(f"weights {path} are corrupt: sha256 is {digest}, expected {expected}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a bad header
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({exc})") from exc
    if "config" not in meta:
        raise ValueError(
            f"{path} has no model config in its metadata; expected a file written by "
            "`revolver train`"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format {meta.get('format_version')!r}, "
            f"expected {FORMAT_VERSION!r}"
        )
    config = ModelConfig.from_dict(json.loads(meta["config"]))
    model = build_from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match architecture {config.key!r}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model = model.to(device).for_inference()
    return LoadedWeights(model, str(path), digest, meta)


def in_memory_weights(model: GuidedNet) -> LoadedWeights:
    """Wrap a model built in memory (tests, experiments) as weights with a content hash.

    Parameters
    ----------
    model : GuidedNet
        Moved to nothing and left in its mode; the caller prepares it.

    Returns
    -------
    LoadedWeights
        ``path`` is ``"<in-memory model>"`` and ``sha256`` hashes the parameters, so tasks
        guided with this model apply only to it.
    """
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return LoadedWeights(model, "<in-memory model>", h.hexdigest(), {})
