"""Procedural microscopy-like volumes with dense labels, for training and demos.

A *scene* is a set of 3D objects (irregular ellipsoids of one to three object classes, each
class with its own size, shape, brightness, texture, rim or halo and inner spots) and,
optionally, a membrane network (a 3D Voronoi tessellation, as in EM or cell-wall stained
tissue). Any z plane of a scene can be rendered on its own, so a training episode renders only
the two slices it needs, and a volume is the stack of its planes. A *style* fixes the look of a
kind of sample (modality, classes, noise, blur, illumination); two scenes of one style play the
part of two images of the same kind ("propagate to other files").

Everything is seeded through a :class:`numpy.random.Generator`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = [
    "ClassStyle",
    "MembraneStyle",
    "Scene",
    "SceneStyle",
    "SliceRender",
    "make_scene",
    "random_style",
    "stain_rgb",
    "render_slice",
    "render_volume",
    "sample_stack",
]


@dataclass(frozen=True)
class ClassStyle:
    """Look of one object class (all lengths in pixels, intensities relative to background 0)."""

    radius: tuple[float, float]  # in-plane mean radius range
    aspect: tuple[float, float]  # long / short axis
    z_factor: float  # z radius = in-plane radius * z_factor (in slices)
    intensity: float  # interior level; negative = darker than background
    texture: float  # relative amplitude of the interior texture
    texture_scale: float  # correlation length of the texture
    rim: float  # extra level along the inner boundary (stained envelope)
    halo: float  # extra level just outside (phase-contrast halo); may be negative
    softness: float  # edge blur width
    irregularity: float  # amplitude of the radial harmonics
    spots: int  # inner spots (nucleoli, granules) per object
    spot_intensity: float
    density: float  # objects per 10,000 px^2 of a slice
    #: Above 0: thin curved filaments (the short axis is their half-width, the long one their
    #: half-length), each bent by up to this share of its half-length.
    bend: float = 0.0


@dataclass(frozen=True)
class MembraneStyle:
    """A 3D Voronoi membrane network."""

    cell_radius: float  # typical cell radius in pixels
    width: float  # membrane half-width in pixels
    intensity: float  # membrane level; negative = dark membranes (EM)
    interior_texture: float


@dataclass(frozen=True)
class SceneStyle:
    """Look of a kind of sample."""

    classes: tuple[ClassStyle, ...]
    membrane: MembraneStyle | None
    background_texture: float
    background_texture_scale: float
    blur: float
    noise: float  # Gaussian read noise relative to the contrast
    photons: float  # Poisson scale; larger = less shot noise
    illumination: float  # amplitude of smooth multiplicative shading
    gamma: float
    z_spacing: float = 1.0  # physical z step in units of pixels (anisotropy)


@dataclass
class Scene:
    """Geometry of one sample: objects and membrane seeds in (z, y, x) pixel units."""

    style: SceneStyle
    shape: tuple[int, int, int]
    centers: np.ndarray  # (N, 3)
    radii: np.ndarray  # (N, 3) z, short, long
    angles: np.ndarray  # (N,)
    classes: np.ndarray  # (N,) 1-based class ids
    harmonics: np.ndarray  # (N, 3, 2) amplitude, phase for k = 2, 3, 4
    gains: np.ndarray  # (N,) per-object brightness jitter
    spot_offsets: list[np.ndarray] = field(default_factory=list)  # per object (S, 3) in radii units
    seeds: np.ndarray | None = None  # (M, 3) membrane Voronoi seeds
    seed: int = 0  # for per-slice noise


@dataclass(frozen=True)
class SliceRender:
    """One rendered plane.

    Attributes
    ----------
    image : np.ndarray
        ``(H, W)`` float32, roughly in [0, 1].
    semantic : np.ndarray
        ``(H, W)`` int16: 0 background, ``1..K`` object classes, ``K + 1`` membrane.
    instance : np.ndarray
        ``(H, W)`` int32 object ids (``1..N``, 0 elsewhere).
    cells : np.ndarray
        ``(H, W)`` int32 membrane-cell ids (``1..M``, 0 on membranes or without a network).
    """

    image: np.ndarray
    semantic: np.ndarray
    instance: np.ndarray
    cells: np.ndarray


def stain_rgb(
    rng: np.random.Generator, images: list[np.ndarray], dark_objects: bool = True
) -> list[np.ndarray]:
    """Render grayscale slices as brightfield stained tissue (RGB), one random stain for all.

    Bright structures of ``images`` become absorbance of a haematoxylin-like stain and a smooth
    eosin-like counterstain fills the rest (Beer-Lambert: transmitted light
    ``exp(-sum_k c_k * od_k)``), so the network also sees histology-like colour images, which
    no training data set with suitable terms provides.

    Parameters
    ----------
    rng : numpy.random.Generator
    images : list of np.ndarray
        ``(H, W)`` grayscale slices of one sample (rendered with the same stain).
    dark_objects : bool
        Objects absorb (dark on a bright background), as in brightfield.

    Returns
    -------
    list of np.ndarray
        ``(H, W, 3)`` float32 in ``[0, 1]``.
    """
    od_h = rng.uniform((0.45, 0.7, 0.2), (0.75, 1.0, 0.5)).astype(np.float32)
    od_e = rng.uniform((0.02, 0.45, 0.1), (0.2, 0.9, 0.35)).astype(np.float32)
    strength = float(rng.uniform(1.0, 2.5))
    counter = float(rng.uniform(0.2, 0.8))
    out = []
    for img in images:
        lo, hi = np.percentile(img, (1, 99.8))
        g = np.clip((img - lo) / max(float(hi - lo), 1e-6), 0, 1).astype(np.float32)
        if not dark_objects:
            g = 1 - g
        eos = counter * (1 + 0.3 * smooth_noise(rng, img.shape, max(img.shape) / 4))
        od = strength * g[..., None] * od_h + np.clip(eos, 0, None)[..., None] * od_e
        out.append(np.exp(-od).astype(np.float32))
    return out


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Draw a smooth zero-mean, unit-variance random field.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the coarse noise.
    shape : tuple of int
        ``(H, W)`` of the field.
    scale : float
        Correlation length in pixels (at least 1).

    Returns
    -------
    np.ndarray
        ``(H, W)`` float32: coarse Gaussian noise upsampled with cubic splines, standardised.
    """
    scale = max(float(scale), 1.0)
    small = (max(2, int(np.ceil(shape[0] / scale)) + 2), max(2, int(np.ceil(shape[1] / scale)) + 2))
    coarse = rng.standard_normal(small).astype(np.float32)
    # ndimage.zoom(coarse, shape / (small - 2), order=3)[:H, :W], as two small matrix products
    # (the same values to float32 rounding, four times faster: episodes draw many fields).
    coeffs = ndimage.spline_filter(coarse.astype(np.float64), order=3, mode="mirror")
    wy = _cubic_spline_rows(small[0], round(small[0] * shape[0] / (small[0] - 2)), shape[0])
    wx = _cubic_spline_rows(small[1], round(small[1] * shape[1] / (small[1] - 2)), shape[1])
    field_ = (wy @ coeffs @ wx.T).astype(np.float32)
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


@functools.lru_cache(maxsize=256)
def _cubic_spline_rows(n_in: int, n_out: int, n_keep: int) -> np.ndarray:
    """Weights that resample cubic B-spline coefficients as ``ndimage.zoom`` does.

    Output sample ``i`` of a zoom from ``n_in`` to ``n_out`` samples sits at input coordinate
    ``i * (n_in - 1) / (n_out - 1)``; the coefficients are mirrored at the edges.

    Returns
    -------
    np.ndarray
        ``(n_keep, n_in)`` float64, read-only: row ``i`` weighs the coefficients for sample ``i``.
    """
    x = np.arange(n_keep) * ((n_in - 1) / max(n_out - 1, 1))
    base = np.floor(x).astype(np.int64)
    w = np.zeros((n_keep, n_in))
    for k in range(-1, 3):
        t = np.abs(x - (base + k))
        b = np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
        j = np.abs(base + k)
        j = np.where(j > n_in - 1, 2 * (n_in - 1) - j, j)
        np.add.at(w, (np.arange(n_keep), j), b)
    w.flags.writeable = False
    return w


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Draw one uniform float in ``[lo, hi)``."""
    return float(rng.uniform(lo, hi))


def random_class_style(rng: np.random.Generator, kind: str | None = None) -> ClassStyle:
    """Draw the look of an object class.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the draws.
    kind : {"nuclei", "cells", "spots", "organelles", "blobs", "granular", "filaments"}, optional
        The kind of object (``cells``: phase contrast; ``granular``: cells told from their
        surroundings by a fine grainy texture more than by their mean level; ``filaments``:
        thin curved lines, cytoskeleton-like, bright or dark); default random.

    Returns
    -------
    ClassStyle
    """
    kind = kind or str(rng.choice(["nuclei", "cells", "spots", "organelles", "blobs"]))
    if kind == "nuclei":
        r = _u(rng, 5, 22)
        return ClassStyle(
            (r * 0.75, r * 1.25),
            (1.0, _u(rng, 1.1, 1.8)),
            _u(rng, 0.5, 1.5),
            _u(rng, 0.4, 1.0),
            _u(rng, 0.05, 0.35),
            _u(rng, 1.5, 5),
            _u(rng, -0.1, 0.3),
            0.0,
            _u(rng, 0.5, 2.0),
            _u(rng, 0.0, 0.12),
            int(rng.integers(0, 4)),
            _u(rng, -0.3, 0.4),
            _u(rng, 2, 14) / (r / 10) ** 2,
        )
    if kind == "cells":  # phase-contrast-like: dim body, bright halo, irregular
        r = _u(rng, 10, 35)
        sign = rng.choice([-1.0, 1.0])
        return ClassStyle(
            (r * 0.6, r * 1.4),
            (1.0, _u(rng, 1.2, 3.0)),
            _u(rng, 0.3, 1.0),
            sign * _u(rng, 0.1, 0.5),
            _u(rng, 0.2, 0.6),
            _u(rng, 2, 8),
            _u(rng, -0.3, 0.3),
            -sign * _u(rng, 0.2, 0.8),
            _u(rng, 0.5, 2.5),
            _u(rng, 0.05, 0.25),
            int(rng.integers(0, 3)),
            _u(rng, -0.4, 0.4),
            _u(rng, 2, 8) / (r / 10) ** 2,
        )
    if kind == "spots":
        r = _u(rng, 1.5, 5)
        return ClassStyle(
            (r * 0.7, r * 1.3),
            (1.0, 1.3),
            _u(rng, 0.5, 1.5),
            rng.choice([-1.0, 1.0]) * _u(rng, 0.4, 1.0),
            0.05,
            2.0,
            0.0,
            0.0,
            _u(rng, 0.3, 1.2),
            0.0,
            0,
            0.0,
            _u(rng, 3, 25),
        )
    if kind == "granular":  # grainy cytoplasm: texture, not level, sets it apart
        r = _u(rng, 10, 30)
        return ClassStyle(
            (r * 0.6, r * 1.4),
            (1.0, _u(rng, 1.0, 2.0)),
            _u(rng, 0.3, 1.0),
            rng.choice([-1.0, 1.0]) * _u(rng, 0.0, 0.25),
            _u(rng, 1.0, 2.5),
            _u(rng, 0.7, 2.0),
            _u(rng, -0.2, 0.2),
            0.0,
            _u(rng, 0.5, 2.0),
            _u(rng, 0.05, 0.25),
            0,
            0.0,
            _u(rng, 2, 8) / (r / 10) ** 2,
        )
    if kind == "filaments":  # thin curved lines (actin, microtubules, neurites)
        r = _u(rng, 4, 10)
        return ClassStyle(
            (r * 0.8, r * 1.2),
            (_u(rng, 20, 40), _u(rng, 40, 90)),
            _u(rng, 0.1, 0.4),
            rng.choice([-1.0, 1.0], p=[0.25, 0.75]) * _u(rng, 0.4, 1.0),
            _u(rng, 0.0, 0.2),
            _u(rng, 2, 6),
            0.0,
            0.0,
            _u(rng, 0.4, 1.0),
            0.0,
            0,
            0.0,
            _u(rng, 3, 10),
            bend=_u(rng, 0.1, 0.5),
        )
    if kind == "organelles":  # EM-like dark, elongated, textured with a rim
        r = _u(rng, 4, 14)
        return ClassStyle(
            (r * 0.7, r * 1.3),
            (1.3, _u(rng, 1.5, 4.0)),
            _u(rng, 0.3, 1.0),
            -_u(rng, 0.2, 0.7),
            _u(rng, 0.1, 0.5),
            _u(rng, 1, 3),
            -_u(rng, 0, 0.4),
            0.0,
            _u(rng, 0.3, 1.5),
            _u(rng, 0.0, 0.2),
            0,
            0.0,
            _u(rng, 1, 8) / (r / 10) ** 2,
        )
    r = _u(rng, 4, 30)
    return ClassStyle(
        (r * 0.6, r * 1.4),
        (1.0, _u(rng, 1.0, 2.5)),
        _u(rng, 0.3, 1.5),
        rng.choice([-1.0, 1.0]) * _u(rng, 0.15, 1.0),
        _u(rng, 0.0, 0.6),
        _u(rng, 1, 10),
        _u(rng, -0.4, 0.4),
        _u(rng, -0.3, 0.3),
        _u(rng, 0.3, 3.0),
        _u(rng, 0.0, 0.3),
        int(rng.integers(0, 3)),
        _u(rng, -0.5, 0.5),
        _u(rng, 1, 12) / (r / 10) ** 2,
    )


def random_style(rng: np.random.Generator) -> SceneStyle:
    """Draw a sample kind: fluorescence, phase contrast, EM- or tissue-like, 1-3 classes.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the draws.

    Returns
    -------
    SceneStyle
    """
    modality = str(
        rng.choice(
            ["fluorescence", "phase", "em", "tissue", "mixed"], p=[0.3, 0.15, 0.2, 0.15, 0.2]
        )
    )
    membrane = None
    if modality == "fluorescence":
        kinds = ["nuclei"] + list(
            rng.choice(["spots", "nuclei", "blobs", "filaments"], size=int(rng.integers(0, 3)))
        )
    elif modality == "phase":
        kinds = ["cells"] + list(
            rng.choice(["spots", "cells", "blobs"], size=int(rng.integers(0, 2)))
        )
    elif modality == "em":
        # Dark organelles among dark membranes: the case a mean of the clicks cannot tell apart.
        kinds = list(rng.choice(["organelles", "blobs", "spots"], size=int(rng.integers(0, 3))))
        if "organelles" not in kinds and rng.random() < 0.6:
            kinds.append("organelles")
        membrane = MembraneStyle(
            _u(rng, 12, 40), _u(rng, 0.8, 3.0), -_u(rng, 0.3, 1.0), _u(rng, 0.05, 0.4)
        )
    elif modality == "tissue":
        kinds = list(rng.choice(["nuclei", "spots"], size=int(rng.integers(0, 2))))
        membrane = MembraneStyle(
            _u(rng, 10, 30), _u(rng, 0.8, 2.5), _u(rng, 0.4, 1.0), _u(rng, 0.0, 0.3)
        )
    else:
        kinds = list(
            rng.choice(
                ["nuclei", "cells", "spots", "organelles", "blobs", "granular", "filaments"],
                size=int(rng.integers(1, 4)),
            )
        )
    classes = tuple(random_class_style(rng, k) for k in kinds)
    return SceneStyle(
        classes=classes,
        membrane=membrane,
        background_texture=_u(rng, 0.0, 0.15),
        background_texture_scale=_u(rng, 2, 30),
        blur=_u(rng, 0.0, 1.8),
        noise=float(rng.choice([_u(rng, 0.0, 0.05), _u(rng, 0.05, 0.2)])),
        photons=float(10 ** _u(rng, 1.5, 3.5)),
        illumination=_u(rng, 0.0, 0.5),
        gamma=float(np.exp(_u(rng, -0.5, 0.5))),
        z_spacing=float(rng.choice([1.0, 2.0, 4.0])),
    )


def make_scene(rng: np.random.Generator, style: SceneStyle, shape: tuple[int, int, int]) -> Scene:
    """Lay out the objects and membrane seeds of a sample.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the layout (and of the scene's per-slice noise seed).
    style : SceneStyle
        The look of the sample.
    shape : tuple of int
        ``(Z, Y, X)`` of the volume in pixels.

    Returns
    -------
    Scene
        Geometry only; planes are drawn with :func:`render_slice`.
    """
    nz, ny, nx = shape
    area = ny * nx / 1e4
    centers, radii, angles, classes, harms, gains, spots = [], [], [], [], [], [], []
    for ci, cs in enumerate(style.classes, start=1):
        n = int(rng.poisson(max(cs.density * area, 0.5)))
        n = max(n, 1)
        n = min(n, 600)
        r = rng.uniform(cs.radius[0], cs.radius[1], n)
        asp = rng.uniform(cs.aspect[0], cs.aspect[1], n)
        short = r / np.sqrt(asp)
        long_ = r * np.sqrt(asp)
        rz = np.maximum(r * cs.z_factor / style.z_spacing, 0.6)
        margin = r.max()
        cy = rng.uniform(-margin * 0.5, ny + margin * 0.5, n)
        cx = rng.uniform(-margin * 0.5, nx + margin * 0.5, n)
        cz = rng.uniform(-1, nz, n)
        centers.append(np.stack([cz, cy, cx], 1))
        radii.append(np.stack([rz, short, long_], 1))
        angles.append(rng.uniform(0, np.pi, n))
        classes.append(np.full(n, ci))
        amp = rng.uniform(0, cs.irregularity, (n, 3))
        phase = rng.uniform(0, 2 * np.pi, (n, 3))
        harms.append(np.stack([amp, phase], 2))
        gains.append(rng.uniform(0.7, 1.3, n))
        for _ in range(n):
            k = int(rng.integers(0, cs.spots + 1)) if cs.spots else 0
            spots.append(rng.uniform(-0.6, 0.6, (k, 3)))
    if centers:
        all_c = np.concatenate(centers)
        order = rng.permutation(len(all_c))
        sel = lambda a: np.concatenate(a)[order]  # noqa: E731
        scene = Scene(
            style,
            shape,
            all_c[order],
            sel(radii),
            sel(angles),
            sel(classes),
            sel(harms),
            sel(gains),
            [spots[i] for i in order],
        )
    else:
        scene = Scene(
            style,
            shape,
            np.zeros((0, 3)),
            np.zeros((0, 3)),
            np.zeros(0),
            np.zeros(0, int),
            np.zeros((0, 3, 2)),
            np.zeros(0),
            [],
        )
    if style.membrane is not None:
        cell_area = np.pi * style.membrane.cell_radius**2
        m = max(
            4,
            int(
                ny
                * nx
                / cell_area
                * max(1.0, nz * style.z_spacing / (2 * style.membrane.cell_radius))
            ),
        )
        m = min(m, 4000)
        scene.seeds = np.stack(
            [
                rng.uniform(-2, nz + 2, m) * style.z_spacing,
                rng.uniform(-5, ny + 5, m),
                rng.uniform(-5, nx + 5, m),
            ],
            1,
        )
    scene.seed = int(rng.integers(0, 2**31))
    return scene


def render_slice(scene: Scene, z: float, rng: np.random.Generator | None = None) -> SliceRender:
    """Render one plane of a scene.

    Parameters
    ----------
    scene : Scene
        From :func:`make_scene`.
    z : float
        Plane position in pixels, fractional values between planes allowed.
    rng : numpy.random.Generator, optional
        Source of the noise; default one seeded by the scene and ``z``, so a plane renders
        the same every time.

    Returns
    -------
    SliceRender
        ``(Y, X)`` image and labels of the plane.
    """
    style = scene.style
    _, ny, nx = scene.shape
    if rng is None:
        rng = np.random.default_rng((scene.seed, int(round(z * 1000))))
    img = style.background_texture * smooth_noise(rng, (ny, nx), style.background_texture_scale)
    semantic = np.zeros((ny, nx), np.int16)
    instance = np.zeros((ny, nx), np.int32)
    cells = np.zeros((ny, nx), np.int32)
    n_classes = len(style.classes)

    if scene.seeds is not None and style.membrane is not None:
        ms = style.membrane
        yy, xx = np.mgrid[0:ny, 0:nx]
        pts = np.stack([np.full(yy.size, z * style.z_spacing), yy.ravel(), xx.ravel()], 1)
        d, idx = cKDTree(scene.seeds).query(pts, k=2)
        gap = (
            (d[:, 1] ** 2 - d[:, 0] ** 2)
            / (2 * np.linalg.norm(scene.seeds[idx[:, 0]] - scene.seeds[idx[:, 1]], axis=1) + 1e-6)
        ).reshape(ny, nx)
        memb = np.exp(-((gap / ms.width) ** 2))
        img = img + ms.interior_texture * smooth_noise(rng, (ny, nx), 3.0) + ms.intensity * memb
        on_membrane = gap < ms.width
        semantic[on_membrane] = n_classes + 1
        cells = np.where(on_membrane, 0, idx[:, 0].reshape(ny, nx) + 1).astype(np.int32)

    for i in range(len(scene.centers)):
        cz, cy, cx = scene.centers[i]
        rz, a, b = scene.radii[i]
        t = (z - cz) / rz
        if abs(t) >= 1.0:
            continue
        s = np.sqrt(1.0 - t * t)
        cs = style.classes[scene.classes[i] - 1]
        la, lb = b * s, a * s  # long, short semi-axes in this plane
        # A filament's bend comes from its own generator: the scene's draws stay as they were.
        kappa = cs.bend * float(np.random.default_rng((scene.seed, i)).uniform(-1, 1))
        pad = la * (1 + cs.irregularity + abs(kappa)) + 3 * cs.softness + 4
        y0, y1 = int(max(0, np.floor(cy - pad))), int(min(ny, np.ceil(cy + pad) + 1))
        x0, x1 = int(max(0, np.floor(cx - pad))), int(min(nx, np.ceil(cx + pad) + 1))
        if y1 <= y0 or x1 <= x0:
            continue
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy -= cy
        dx -= cx
        depth, r_mean = _object_depth(scene, i, dy, dx, la, lb, kappa)
        alpha = np.clip(depth / max(cs.softness, 0.3) + 0.5, 0.0, 1.0)
        level = cs.intensity * scene.gains[i]
        body = level * (1 + cs.texture * smooth_noise(rng, depth.shape, cs.texture_scale))
        body = body + cs.rim * np.exp(-((depth / max(1.5, 0.15 * r_mean)) ** 2)) * (depth > 0)
        for off in scene.spot_offsets[i]:
            sy = off[1] * lb * 0 + off[1] * r_mean
            sx = off[2] * r_mean
            sr = max(1.0, 0.15 * r_mean)
            body = body + cs.spot_intensity * np.exp(
                -((dy - sy) ** 2 + (dx - sx) ** 2) / (2 * sr * sr)
            )
        region = img[y0:y1, x0:x1]
        if cs.halo:
            outside = np.clip(-depth, 0, None)
            region += cs.halo * np.exp(-outside / max(2.0, 0.2 * r_mean)) * (depth < 0)
        region[:] = region * (1 - alpha) + body * alpha
        inside = depth > 0
        semantic[y0:y1, x0:x1][inside] = scene.classes[i]
        instance[y0:y1, x0:x1][inside] = i + 1

    # Acquisition: blur, shading, gamma, shot and read noise.
    if style.blur > 0.3:
        img = ndimage.gaussian_filter(img, style.blur)
    lo, hi = np.percentile(img, [0.5, 99.5])
    img = (img - lo) / max(hi - lo, 1e-3)
    img = np.clip(img, -0.2, 1.5) * 0.8 + 0.1
    if style.illumination > 0:
        img = img * (1 + style.illumination * 0.5 * smooth_noise(rng, (ny, nx), max(ny, nx) / 2))
    img = np.clip(img, 0, None) ** style.gamma
    img = rng.poisson(img * style.photons) / style.photons
    img = img + style.noise * rng.standard_normal(img.shape)
    return SliceRender(img.astype(np.float32), semantic, instance, cells)


def _object_depth(
    scene: Scene, i: int, dy: np.ndarray, dx: np.ndarray, la: float, lb: float, kappa: float
) -> tuple[np.ndarray, float]:
    """Signed distance (pixels, > 0 inside) to object ``i``'s boundary, and its mean radius.

    ``dy, dx`` are offsets from its centre; ``la, lb`` its long and short semi-axes in the
    plane; ``kappa`` a filament's bend.
    """
    ca, sa = np.cos(scene.angles[i]), np.sin(scene.angles[i])
    along, across = ca * dx + sa * dy, -sa * dx + ca * dy
    if scene.style.classes[scene.classes[i] - 1].bend > 0:
        return _filament_depth(along, across, la, lb, kappa), max(lb, 0.7)
    u, v = along / la, across / lb
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    reff = 1.0 + sum(
        scene.harmonics[i, k, 0] * np.cos((k + 2) * phi + scene.harmonics[i, k, 1])
        for k in range(3)
    )
    r_mean = 0.5 * (la + lb)
    return (reff - rho) * r_mean, r_mean


def _filament_depth(
    along: np.ndarray, across: np.ndarray, half_length: float, half_width: float, kappa: float
) -> np.ndarray:
    """Signed distance (pixels, > 0 inside) to a filament bent along a parabola.

    The centreline is ``across = kappa * along**2 / half_length`` for ``|along| <=
    half_length``; the filament is at least 0.7 px wide on either side, so it survives
    sampling.
    """
    offset = across - kappa * along * along / max(half_length, 1e-3)
    # Distance to a parabola measured across it, corrected for its slope.
    slope = 2.0 * kappa * along / max(half_length, 1e-3)
    dist = np.abs(offset) / np.sqrt(1.0 + slope * slope)
    return np.minimum(max(half_width, 0.7) - dist, half_length - np.abs(along))


def render_volume(scene: Scene) -> SliceRender:
    """Render every plane of a scene, each with its own seeded noise.

    Parameters
    ----------
    scene : Scene
        From :func:`make_scene`.

    Returns
    -------
    SliceRender
        Fields of shape ``(Z, Y, X)``.
    """
    planes = [render_slice(scene, float(z)) for z in range(scene.shape[0])]
    return SliceRender(
        *(
            np.stack([getattr(p, f) for p in planes])
            for f in ("image", "semantic", "instance", "cells")
        )
    )


def sample_stack(
    seed: int = 0, shape: tuple[int, int, int] = (24, 256, 256)
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Make the demo stack: fluorescent nuclei among bright debris, a few clicks on one slice.

    Parameters
    ----------
    seed : int
        Seed of the whole stack (layout, noise and clicks).
    shape : tuple of int
        ``(Z, Y, X)`` of the stack.

    Returns
    -------
    image : np.ndarray
        ``(Z, Y, X)`` uint16.
    labels : np.ndarray
        ``(Z, Y, X)`` uint8, 1 on nuclei (the ground truth of the demo task).
    points : np.ndarray
        ``(P, 3)`` float, ``(z, y, x)`` of the clicks, all on the middle slice.
    point_labels : np.ndarray
        ``(P,)`` int8, 1 positive (on a nucleus), 0 negative (background or debris).
    """
    rng = np.random.default_rng(seed)
    nuclei = ClassStyle(
        (9.0, 14.0), (1.0, 1.5), 0.8, 0.8, 0.2, 3.0, 0.15, 0.0, 1.0, 0.08, 2, 0.25, 9.0 / 1.3
    )
    debris = ClassStyle(
        (2.0, 3.5), (1.0, 1.3), 1.0, 1.0, 0.05, 2.0, 0.0, 0.0, 0.6, 0.0, 0, 0.0, 6.0
    )
    style = SceneStyle((nuclei, debris), None, 0.08, 12.0, 1.0, 0.03, 300.0, 0.3, 1.0, 2.0)
    scene = make_scene(rng, style, shape)
    vol = render_volume(scene)
    image = np.clip(vol.image * 3000 + 200, 0, 65535).astype(np.uint16)
    labels = (vol.semantic == 1).astype(np.uint8)
    zc = shape[0] // 2
    sem = vol.semantic[zc]
    inst = vol.instance[zc]
    pts: list[tuple[float, float, float]] = []
    lab: list[int] = []
    # One click near the centre of each of the four largest nuclei of the middle slice.
    ids, counts = np.unique(inst[sem == 1], return_counts=True)
    for obj in ids[np.argsort(counts)[::-1][:4]]:
        yy, xx = np.nonzero(ndimage.binary_erosion(inst == obj, iterations=3))
        if len(yy) == 0:
            yy, xx = np.nonzero(inst == obj)
        k = int(np.argmin((yy - yy.mean()) ** 2 + (xx - xx.mean()) ** 2))
        pts.append((zc, float(yy[k]), float(xx[k])))
        lab.append(1)
    # Negatives: background far from nuclei, and two pieces of debris.
    far = ndimage.distance_transform_edt(sem == 0) > 8
    yy, xx = np.nonzero(far)
    for k in rng.choice(len(yy), size=3, replace=False):
        pts.append((zc, float(yy[k]), float(xx[k])))
        lab.append(0)
    # The two debris specks with the largest cross-section on this slice (clearly visible).
    dids, dcounts = np.unique(inst[sem == 2], return_counts=True)
    for obj in dids[np.argsort(dcounts)[::-1][:2]]:
        yy, xx = np.nonzero(inst == obj)
        k = len(yy) // 2
        pts.append((zc, float(yy[k]), float(xx[k])))
        lab.append(0)
    return image, labels, np.asarray(pts, np.float64), np.asarray(lab, np.int8)
