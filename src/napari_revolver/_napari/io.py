"""npe2 readers (tasks, label TIFFs) and the label writer (no Qt).

The writer writes through the core's :func:`~napari_revolver.core.io.write_labels` (smallest
integer type, axes and pixel size in the file); the label reader opens what it writes as a
Labels layer with its scale. Label files are named ``<name>.labels.tif``, as ``revolver
segment --apply-to`` names them: for that name npe2 picks this writer (the longest matching
extension wins). napari's TIFF reader accepts that name too, so the dock widget records this
plugin as napari's reader preference for ``*.labels.tif`` (:func:`remember_labels_reader`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from napari.layers import Labels

PLUGIN_NAME = "napari-revolver"
TASK_SUFFIX = ".revolver-task.json"
LABELS_SUFFIXES = (".labels.tif", ".labels.tiff")
LABELS_PATTERNS = tuple(f"*{suffix}" for suffix in LABELS_SUFFIXES)

LayerData = tuple[Any, dict[str, Any], str]


def get_task_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """npe2 reader contribution: a saved task becomes a task's Points layer.

    Parameters
    ----------
    path : str or list of str
        What napari asks about.

    Returns
    -------
    callable or None
        :func:`read_task` for a ``.revolver-task.json`` file.
    """
    if isinstance(path, list) or not str(path).endswith(TASK_SUFFIX):
        return None
    return read_task


def read_task(path: str) -> list[LayerData]:
    """Read a task file as a Points layer that the dock widget takes up as a task.

    Parameters
    ----------
    path : str
        A ``.revolver-task.json`` file.

    Returns
    -------
    list of LayerData
        One Points layer: the task's clicks ``(N, D)`` with their ``label`` feature.
    """
    from ..core.task import load_task
    from .layers import NEGATIVE, POSITIVE
    from .session import TASK_METADATA

    task = load_task(path)
    labels = np.where(task.labels == 1, POSITIVE, NEGATIVE)
    return [
        (
            task.points,
            {
                "name": f"{task.name} points",
                "features": {"label": labels},
                "metadata": {
                    TASK_METADATA: {
                        "name": task.name,
                        "invert": task.invert,
                        "scale": task.scale,
                        "kind": task.kind,
                        "path": str(path),
                    }
                },
            },
            "points",
        )
    ]


def get_labels_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """npe2 reader contribution: a label TIFF written by the plugin (or the CLI).

    ``path`` is what napari asks about, as for :func:`get_task_reader`. Returns
    :func:`read_labels` for a ``.labels.tif`` file holding integer labels, else ``None``.
    """
    if isinstance(path, list) or not str(path).lower().endswith(LABELS_SUFFIXES):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            dtype = tif.series[0].dtype
    except (OSError, tifffile.TiffFileError, IndexError):
        return None
    return read_labels if np.issubdtype(dtype, np.integer) else None


def remember_labels_reader() -> list[str]:
    """Make this plugin napari's reader for its label files, where no preference is set.

    napari's TIFF reader and :func:`get_labels_reader` both accept ``x.labels.tif``; with two
    readers and no preference, *File > Open* asks which one to use and ``viewer.open(path,
    plugin=None)`` raises ``MultipleReaderError``. The choice is napari's reader preference,
    the filename pattern -> plugin table of *Preferences > Plugins*
    (``napari.settings.get_settings().plugins.extension2reader``). This records
    ``*.labels.tif`` and ``*.labels.tiff`` -> ``napari-revolver`` there, the entry napari
    saves when a user adds that pattern in the Preferences, for a pattern that has no
    preference yet: a preference the user set is kept. One the user set for a broader pattern
    (``*.tif``) keeps deciding too, since napari prefers the earlier of equally specific
    patterns. The dock widget calls this when it is created.

    Returns
    -------
    list of str
        The patterns recorded (empty when each already had a preference).
    """
    from napari.settings import get_settings

    plugins = get_settings().plugins
    current = dict(plugins.extension2reader)
    added = [pattern for pattern in LABELS_PATTERNS if pattern not in current]
    if added:
        # A new dict, as napari's dialogs assign it: the assignment saves the settings.
        plugins.extension2reader = {**current, **dict.fromkeys(added, PLUGIN_NAME)}
    return added


def read_labels(path: str) -> list[LayerData]:
    """Read a label TIFF as a Labels layer with the pixel size of the file.

    Parameters
    ----------
    path : str
        A TIFF of integer labels ``(..., Y, X)``.

    Returns
    -------
    list of LayerData
        One Labels layer.
    """
    from ..core.io import read_image

    image = read_image(path)
    name = Path(path).name
    for suffix in LABELS_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    meta = {"name": f"{name} labels", "scale": tuple(float(s) for s in image.scale)}
    return [(np.asarray(image.data), meta, "labels")]


def write_labels_tiff(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer contribution: a Labels layer to a compressed TIFF with axes and scale.

    Parameters
    ----------
    path : str
        Target file (``.labels.tif``, ``.tif`` or ``.tiff``).
    data : array-like
        ``(..., Y, X)`` labels.
    meta : dict
        The layer's attributes (``scale`` is used).

    Returns
    -------
    list of str
        The path written.
    """
    from ..core.io import write_labels

    arr = np.asarray(data)
    scale = meta.get("scale")
    out = write_labels(
        Path(path),
        arr,
        scale=tuple(float(s) for s in scale) if scale is not None else None,
        overwrite=True,
    )
    return [str(out)]


def write_labels_layer(path: str | Path, layer: Labels, *, overwrite: bool = True) -> Path:
    """Write a Labels layer with the writer above (the widget's *Save labels*).

    Parameters
    ----------
    path : str or Path
        Target file.
    layer : napari.layers.Labels
        The layer; its scale is written as the pixel size.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        The path written.
    """
    from ..core.io import write_labels

    return write_labels(
        Path(path),
        np.asarray(layer.data),
        scale=tuple(float(s) for s in layer.scale),
        overwrite=overwrite,
    )
