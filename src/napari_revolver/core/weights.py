"""Checkpoints as safetensors: tensors only, never unpickled code; verified by sha256."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch

from .atomic import atomic_write
from .model.click_refiner import ClickRefiner, RefinerConfig
from .model.guided_net import GuidedNet, ModelConfig
from .model.layers import fuse_batchnorm
from .model.registry import DEFAULT_MODEL, build_from_config

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedWeights",
    "default_refiner_path",
    "default_weights_path",
    "encoder_sources",
    "encoder_state_equal",
    "load_refiner",
    "load_weights",
    "save_refiner",
    "save_weights",
    "sha256_file",
    "trained_as",
]

FORMAT_VERSION = "1"
#: Weights metadata: comma-separated sha256s of earlier weights files whose encoder these keep
#: bit for bit (a head trained on a frozen encoder; written by ``scripts/package_weights.py``
#: after comparing the tensors). Refiners trained on those read the same features.
ENCODER_OF = "encoder_of"


@dataclass(frozen=True)
class LoadedWeights:
    """A model with its provenance."""

    model: GuidedNet
    path: str
    sha256: str
    metadata: dict[str, str]
    #: The click refiner trained on this network (object clicks), when one sits beside the
    #: weights file as ``<stem>-clicks.safetensors``; ``None`` otherwise.
    refiner: ClickRefiner | None = None
    #: The follower trained on this network (object tasks through z and t), when one sits
    #: beside the weights file as ``<stem>-follow.safetensors``; ``None`` otherwise.
    follower: ClickRefiner | None = None
    #: The click refiner of corrections (every click on a slice after an object's first), when
    #: one sits beside the weights file as ``<stem>-corrections.safetensors``; ``None``: the
    #: click refiner draws corrections too.
    corrector: ClickRefiner | None = None

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
    if getattr(model, "_fused", False):
        raise RuntimeError("cannot save a model whose batch norms were folded for inference")
    meta = {"format_version": FORMAT_VERSION, "config": json.dumps(model.config.to_dict())}
    return _write(model, path, {**meta, **(extra or {})})


def _write(module: torch.nn.Module, path: str | Path, meta: dict[str, str]) -> Path:
    """Write ``module``'s tensors and ``meta`` as one safetensors file, atomically."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    payload = save(state, metadata=meta)
    return atomic_write(path, lambda fh: fh.write(payload), binary=True, overwrite=True)


def default_weights_path() -> Path:
    """Return the path of the weights that ship with the package."""
    return Path(
        str(resources.files("napari_revolver") / "weights" / f"{DEFAULT_MODEL}.safetensors")
    )


def _read_checked(path: Path, what: str) -> tuple[str, dict[str, str], dict[str, torch.Tensor]]:
    """Read a safetensors file checked against the sha256 recorded beside it.

    Returns
    -------
    (sha256, metadata, tensors)

    Raises
    ------
    ValueError
        A sha256 that differs from the recorded one, or a file safetensors cannot read.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    digest = sha256_file(path)
    expected = _expected_sha256(path)
    if expected is not None and expected != digest:
        raise ValueError(f"{what} {path}: corrupt file, sha256 is {digest}, expected {expected}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a bad header
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({exc})") from exc
    return digest, meta, state


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
    path = Path(path) if path is not None else default_weights_path()
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    digest, meta, state = _read_checked(path, "weights")
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
    found: dict[str, ClickRefiner | None] = {}
    for role, without in (
        ("clicks", "object clicks without the click refiner"),
        ("follow", "objects followed without the follower (their last masks carried over)"),
        ("corrections", "corrections drawn by the click refiner"),
    ):
        found[role] = None
        refiner_path = default_refiner_path(path, role)
        if refiner_path.exists():
            try:
                found[role] = load_refiner(
                    refiner_path,
                    digest,
                    device,
                    same_encoder=encoder_sources(meta),
                    role=trained_as(role),
                )
            except ValueError as exc:
                logger.warning("%s: %s", without, exc)
    return LoadedWeights(
        model,
        str(path),
        digest,
        meta,
        found["clicks"],
        found["follow"],
        found["corrections"],
    )


def encoder_sources(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """Return the sha256s of earlier weights with the same encoder, from weights metadata."""
    return tuple(s for s in metadata.get(ENCODER_OF, "").split(",") if s)


def encoder_state_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same encoder, parameters and batch-norm statistics.

    Parameters
    ----------
    a, b : mapping of str to torch.Tensor
        State dicts of guided networks (as read from their safetensors files).

    Returns
    -------
    bool
        ``True`` if both have the same ``encoder.*`` entries with equal shapes and values.
    """
    keys_a = {k for k in a if k.startswith("encoder.")}
    keys_b = {k for k in b if k.startswith("encoder.")}
    return (
        bool(keys_a)
        and keys_a == keys_b
        and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in keys_a)
    )


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


# ------------------------------------------------------------------------- click refiner
def save_refiner(
    refiner: ClickRefiner, path: str | Path, extra: dict[str, str] | None = None
) -> Path:
    """Write a click refiner's parameters with its config, atomically (as :func:`save_weights`).

    ``extra`` should name the guided network it was trained on (``base_sha256``): its inputs
    are that network's features and probabilities.
    """
    meta = {
        "format_version": FORMAT_VERSION,
        "refiner_config": json.dumps(refiner.config.to_dict()),
    }
    return _write(refiner, path, {**meta, **(extra or {})})


def trained_as(role: str) -> str:
    """Return the episodes a refiner of ``role`` is trained on, as its file records them.

    A refiner of ``corrections`` is a click refiner (``clicks``); a ``follow`` one a follower.
    """
    return "follow" if role == "follow" else "clicks"


def default_refiner_path(
    weights_path: str | Path, role: Literal["clicks", "follow", "corrections"] = "clicks"
) -> Path:
    """Return where a refiner of a weights file sits: ``<stem>-<role>.safetensors``.

    ``clicks`` is the click refiner of object clicks, ``follow`` the follower of objects
    through z and t (the same architecture, trained on its own episodes), ``corrections`` a
    click refiner for the clicks after an object's first on a slice (trained on click
    episodes too, as ``clicks``).
    """
    if role not in ("clicks", "follow", "corrections"):
        raise ValueError(f"role must be 'clicks', 'follow' or 'corrections'; got {role!r}")
    p = Path(weights_path)
    return p.with_name(f"{p.stem}-{role}.safetensors")


def load_refiner(
    path: str | Path,
    base_sha256: str | None = None,
    device: str | torch.device = "cpu",
    *,
    same_encoder: Collection[str] = (),
    role: str | None = None,
    fused: bool = True,
) -> ClickRefiner:
    """Load a click refiner in eval mode, checked against the network it refines.

    Parameters
    ----------
    path : path
        A file written by :func:`save_refiner`.
    base_sha256 : str, optional
        sha256 of the guided network's weights in use; a refiner trained on other weights is
        refused (its inputs would mean something else).
    device : str or torch.device
    same_encoder : collection of str
        sha256s of earlier weights whose encoder the weights in use keep unchanged (see
        :func:`encoder_sources`): a refiner trained on those reads the same features, and is
        accepted too.
    role : {"clicks", "follow"}, optional
        What the file must have been trained as (files that record no role pass).
    fused : bool
        Fold the batch norms into the convolutions (for inference; the default). ``False``
        keeps the trainable layout, to start a training run from the file.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it is not a refiner checkpoint, its sha256 differs from the recorded one, it was
        trained on other weights than ``base_sha256``, or in another ``role``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"click refiner {path} does not exist")
    _, meta, state = _read_checked(path, "click refiner")
    if "refiner_config" not in meta:
        raise ValueError(f"{path} has no refiner config; expected a file written by save_refiner")
    accepted = {None, base_sha256, *same_encoder}
    if base_sha256 is not None and meta.get("base_sha256") not in accepted:
        raise ValueError(
            f"click refiner {path} was trained on weights {meta.get('base_sha256', '')[:12]}, "
            f"not on the weights in use ({base_sha256[:12]})"
        )
    if role is not None and meta.get("role", role) != role:
        raise ValueError(
            f"{path} is a {meta['role']!r} refiner; expected a {role!r} one "
            "(the click refiner and the follower are trained on different episodes)"
        )
    refiner = ClickRefiner(RefinerConfig.from_dict(json.loads(meta["refiner_config"])))
    refiner.load_state_dict(state)
    refiner = refiner.to(device).eval()
    return fuse_batchnorm(refiner) if fused else refiner  # type: ignore[return-value]
