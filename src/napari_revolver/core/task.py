"""A task: one annotated concept, as the guide's pooled vectors plus the points that made them."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from .. import __version__
from .atomic import atomic_write
from .pixel_fit import PixelFit
from .scale import check_scale

__all__ = ["TASK_FORMAT_VERSION", "Task", "load_task"]

TASK_FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class Task:
    """Guidance for one concept (paper: the task representation z).

    The guide's output is kept as annotation-mass-weighted *sums* so that tasks guided on
    different slices or volumes merge exactly (:meth:`merge`).

    Attributes
    ----------
    name : str
        Shown in the widget and written to point tables.
    sum_coarse : np.ndarray
        ``(2, C_coarse)`` float32, positive and negative feature sums.
    sum_fine : np.ndarray
        ``(2, C_fine)`` float32.
    mass : np.ndarray
        ``(2,)`` float32, annotation mass per polarity.
    points : np.ndarray
        ``(N, D)`` float64 support points in data pixels of the volume they were clicked on.
    labels : np.ndarray
        ``(N,)`` int8, 1 positive, 0 negative.
    model_key, weights_sha256 : str
        The model the vectors belong to; applying a task with another model is refused.
    label_value : int
        Value this task takes in a label image.
    source : str
        Fingerprint of the volume the annotations were made on (empty if unknown). The local
        prior (where the clicks are) applies only to that volume.
    support_masks : tuple of (tuple of int, np.ndarray)
        Dense support masks as ``(slice index, (2, h, w) float32 fine-grid weights)``, for the
        local prior of tasks guided by a mask; on the fine grid of the working pixels (see
        ``scale``); not written to task files.
    invert : bool
        The vectors were pooled from features of reversed intensities (dark objects on a light
        background, ``set_volume(invert=True)``); they apply only to volumes read the same way.
    scale : float
        The vectors were pooled from slices resized by this factor (``set_volume(scale=...)``,
        :mod:`.scale`); they apply only to volumes read at the same scale. Points and object
        masks stay in data pixels whatever the scale.
    kind : {"class", "object"}
        ``class``: everything like the annotated pixels. ``object``: the one object under the
        positive clicks, followed through z and t (:mod:`.objects`); its vectors pool the
        positives only, and negative clicks act by position.
    moments : np.ndarray or None
        ``(2, D + 1, D + 1)`` float32 second moments of the support features per polarity,
        for the per-task fit of weights that have one (:mod:`.model.task_fit`); ``None`` for
        older weights. They add when tasks merge, as the sums do.
    pixel_fit : PixelFit or None
        A class task guided by painted labels or a mask: its per-task pixel model and the
        weight cross-validation on the support gave it (:mod:`.pixel_fit`); ``None``: the
        network alone. Dropped when tasks merge (guide all slices together to keep one).
    object_masks : tuple of (tuple of int, np.ndarray)
        Object tasks only: slices where the object's mask is known (painted by hand), as
        ``(slice index, (H, W) bool)``. Each is an anchor of :func:`.objects.follow_objects`
        like a clicked slice, with this mask as the object there. Not written to task files.
    """

    name: str
    sum_coarse: np.ndarray
    sum_fine: np.ndarray
    mass: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    model_key: str
    weights_sha256: str
    label_value: int = 1
    package_version: str = field(default=__version__)
    source: str = ""
    support_masks: tuple[tuple[tuple[int, ...], np.ndarray], ...] = ()
    invert: bool = False
    scale: float = 1.0
    kind: Literal["class", "object"] = "class"
    moments: np.ndarray | None = None
    object_masks: tuple[tuple[tuple[int, ...], np.ndarray], ...] = ()
    pixel_fit: PixelFit | None = None

    def __post_init__(self) -> None:
        """Check the shapes and freeze private copies of the arrays."""
        for name in ("sum_coarse", "sum_fine"):
            a = getattr(self, name)
            if a.ndim != 2 or a.shape[0] != 2:
                raise ValueError(f"Task.{name} must have shape (2, C); got {a.shape}")
        if self.mass.shape != (2,):
            raise ValueError(f"Task.mass must have shape (2,); got {self.mass.shape}")
        if self.points.ndim != 2 or len(self.points) != len(self.labels):
            raise ValueError(
                f"Task.points must be (N, D) with N == len(labels); got "
                f"{self.points.shape} and {self.labels.shape}"
            )
        self._check_kind()
        object.__setattr__(self, "scale", check_scale(self.scale))
        names = ["sum_coarse", "sum_fine", "mass", "points", "labels"]
        if self.moments is not None:
            m = self.moments
            if m.ndim != 3 or m.shape[0] != 2 or m.shape[1] != m.shape[2]:
                raise ValueError(f"Task.moments must have shape (2, D, D); got {m.shape}")
            names.append("moments")
        for name in names:
            # Own a copy: freezing the caller's array (a napari layer's points, say) would
            # make it read-only for them too.
            a = np.array(getattr(self, name), copy=True)
            a.setflags(write=False)
            object.__setattr__(self, name, a)

    def _check_kind(self) -> None:
        if self.label_value < 1:
            raise ValueError(f"label_value must be >= 1; got {self.label_value}")
        if self.kind not in ("class", "object"):
            raise ValueError(f"kind must be 'class' or 'object'; got {self.kind!r}")
        if self.object_masks and self.kind != "object":
            raise ValueError("object_masks are for object tasks; this is a class task")
        if self.pixel_fit is not None and self.kind != "class":
            raise ValueError("a pixel fit is for class tasks; this is an object task")

    @property
    def n_positive(self) -> int:
        """Number of positive support points."""
        return int((self.labels == 1).sum())

    @property
    def n_negative(self) -> int:
        """Number of negative support points."""
        return int((self.labels == 0).sum())

    def renamed(self, name: str, label_value: int | None = None) -> Task:
        """Return a copy with another name (and label value)."""
        return replace(
            self, name=name, label_value=self.label_value if label_value is None else label_value
        )

    def merge(self, other: Task) -> Task:
        """Pool two tasks' annotations (multi-shot across slices or volumes).

        The result is the annotation-mass-weighted average of both; points are concatenated
        only when they have the same dimensionality.

        Raises
        ------
        ValueError
            If the tasks belong to different models, or one was guided on inverted intensities
            and the other not, or at another scale.
        """
        if (self.model_key, self.weights_sha256) != (other.model_key, other.weights_sha256):
            raise ValueError(
                f"cannot merge tasks of different models: {self.model_key}/"
                f"{self.weights_sha256[:12]} vs {other.model_key}/{other.weights_sha256[:12]}"
            )
        if self.invert != other.invert:
            raise ValueError(
                f"cannot merge task {self.name!r} (invert={self.invert}) with task "
                f"{other.name!r} (invert={other.invert}): their features were read with "
                "different intensity conventions"
            )
        if self.scale != other.scale:
            raise ValueError(
                f"cannot merge task {self.name!r} (scale={self.scale:g}) with task "
                f"{other.name!r} (scale={other.scale:g}): their features were read at "
                "different scales"
            )
        same_dims = self.points.shape[1] == other.points.shape[1]
        same_source = self.source == other.source
        return replace(
            self,
            sum_coarse=self.sum_coarse + other.sum_coarse,
            sum_fine=self.sum_fine + other.sum_fine,
            mass=self.mass + other.mass,
            moments=(
                None
                if self.moments is None or other.moments is None
                else self.moments + other.moments
            ),
            points=np.concatenate([self.points, other.points]) if same_dims else self.points,
            labels=np.concatenate([self.labels, other.labels]) if same_dims else self.labels,
            source=self.source if same_source else "",
            support_masks=self.support_masks + other.support_masks if same_source else (),
            object_masks=self.object_masks + other.object_masks if same_source else (),
            pixel_fit=None,
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form (floats written with full float32 precision)."""
        return {
            "format": "napari-revolver task",
            "format_version": TASK_FORMAT_VERSION,
            "package_version": self.package_version,
            "name": self.name,
            "label_value": self.label_value,
            "model_key": self.model_key,
            "weights_sha256": self.weights_sha256,
            "sum_coarse": self.sum_coarse.astype(float).tolist(),
            "sum_fine": self.sum_fine.astype(float).tolist(),
            "mass": self.mass.astype(float).tolist(),
            "points": self.points.tolist(),
            "points_ndim": int(self.points.shape[1]),
            "labels": self.labels.astype(int).tolist(),
            "source": self.source,
            "invert": self.invert,
            "scale": self.scale,
            "kind": self.kind,
            "moments": None if self.moments is None else _encode_array(self.moments),
            "pixel_fit": None if self.pixel_fit is None else self.pixel_fit.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Task:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on other formats or versions."""
        if d.get("format") != "napari-revolver task":
            raise ValueError("not a napari-revolver task file (missing 'format')")
        if d.get("format_version") != TASK_FORMAT_VERSION:
            raise ValueError(
                f"task format version {d.get('format_version')!r} is not supported; "
                f"expected {TASK_FORMAT_VERSION}"
            )
        pts = np.asarray(d["points"], np.float64)
        return cls(
            name=str(d["name"]),
            sum_coarse=np.asarray(d["sum_coarse"], np.float32),
            sum_fine=np.asarray(d["sum_fine"], np.float32),
            mass=np.asarray(d["mass"], np.float32),
            points=pts.reshape(
                len(pts), int(d.get("points_ndim", pts.shape[-1] if pts.ndim == 2 else 0))
            ),  # type: ignore[arg-type]
            labels=np.asarray(d["labels"], np.int8),
            model_key=str(d["model_key"]),
            weights_sha256=str(d["weights_sha256"]),
            label_value=int(d.get("label_value", 1)),  # type: ignore[arg-type]
            package_version=str(d.get("package_version", "")),
            source=str(d.get("source", "")),
            invert=bool(d.get("invert", False)),
            # Files written before slices could be resized were guided at scale 1.
            scale=float(d.get("scale", 1.0)),  # type: ignore[arg-type]
            # Files written before object tasks existed hold class tasks.
            kind=str(d.get("kind", "class")),  # type: ignore[arg-type]
            # Files written for weights without the per-task fit have no moments.
            moments=_decode_array(d["moments"]) if d.get("moments") else None,  # type: ignore[arg-type]
            # Files written before painted supports have none.
            pixel_fit=PixelFit.from_dict(d["pixel_fit"]) if d.get("pixel_fit") else None,  # type: ignore[arg-type]
        )

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the task as JSON, atomically.

        Parameters
        ----------
        path : str or os.PathLike
            Target file (``.revolver-task.json`` by convention).
        overwrite : bool
            Whether an existing file may be replaced.

        Returns
        -------
        pathlib.Path
            The file written.

        Raises
        ------
        FileExistsError, FileNotFoundError
            As for :func:`.atomic.atomic_write`.
        """
        text = json.dumps(self.to_dict())
        return atomic_write(path, lambda fh: fh.write(text), binary=False, overwrite=overwrite)


def _encode_array(a: np.ndarray) -> dict[str, object]:
    """Write a float32 array as shape + base64 of its little-endian bytes (compact, exact)."""
    data = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(data.shape), "float32_base64": base64.b64encode(data).decode("ascii")}


def _decode_array(d: dict[str, object]) -> np.ndarray:
    """Inverse of :func:`_encode_array`; raises ``ValueError`` when the sizes disagree."""
    shape = tuple(int(s) for s in d["shape"])  # type: ignore[union-attr]
    raw = base64.b64decode(str(d["float32_base64"]))
    if len(raw) != 4 * int(np.prod(shape)):
        raise ValueError(
            f"task moments hold {len(raw)} bytes; shape {shape} needs {4 * int(np.prod(shape))}"
        )
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)


def load_task(path: str | os.PathLike[str]) -> Task:
    """Read a task written by :meth:`Task.save`."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a task file: {exc}") from exc
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a task file")
    return Task.from_dict(d)
