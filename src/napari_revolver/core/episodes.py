"""Episodic training data: (support, annotation, query, target) drawn from labelled stacks.

A *task* is a binary concept on a labelled sample: one object class, one object (instance
task), the object boundaries, or the background. An *episode* takes one support slice and one
query slice of the same sample (another z plane or timepoint, or another image of the same
kind), sparsifies the support's mask into a few positive and negative points (or keeps it dense)
and asks for the query's dense mask (paper, sec. 3 and 5).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import synthetic
from .preprocess import normalize_slice

__all__ = [
    "Episode",
    "EpisodeConfig",
    "LabelledStack",
    "StackEpisodes",
    "SyntheticEpisodes",
    "load_labelled_stacks",
    "sample_points",
]

#: Point counts per polarity drawn for an episode ("0" = dense mask). One and two clicks are
#: the commonest: they are what people start with and where guidance is most ambiguous.
SHOT_SIZES = (1, 1, 1, 2, 2, 3, 5, 10, 20, 0)


@dataclass(frozen=True)
class EpisodeConfig:
    """Knobs of episode sampling."""

    crop: int = 160
    p_dense: float = 0.18
    p_no_negative: float = 0.08
    scale_range: tuple[float, float] = (0.5, 2.0)
    fine_stride: int = 4
    #: Episodes whose query is the support slice itself (same-slice corrections).
    p_same_slice: float = 0.12
    #: Aligned episodes given without the local prior.
    p_local_off: float = 0.25
    #: Aligned episodes whose task is one object (instance task: "this cell, followed").
    p_instance: float = 0.4
    #: Procedural episodes rendered as stained brightfield RGB (histology-like).
    p_rgb: float = 0.15
    #: Episodes whose support and query are both intensity-inverted: dark objects on a light
    #: background must be read from the clicks, not from a switch.
    p_invert: float = 0.4
    #: Episodes whose support and query share a random colour mixing (stain variation).
    p_colour: float = 0.25


@dataclass(frozen=True)
class Episode:
    """One training episode.

    Attributes
    ----------
    support, query : np.ndarray
        ``(3, S, S)`` float32 normalised slices.
    masks : np.ndarray
        ``(2, S/4, S/4)`` float32 positive/negative annotation weights on the fine grid.
    target : np.ndarray
        ``(S, S)`` float32 query mask.
    aligned : float
        1 when support and query share their geometry (the same slice, or a neighbouring slice
        of the same stack cropped at the same place), so the annotations' positions apply to
        the query (the local prior); 0 otherwise.
    """

    support: np.ndarray
    masks: np.ndarray
    query: np.ndarray
    target: np.ndarray
    aligned: float = 0.0


def sample_points(rng: np.random.Generator, mask: np.ndarray, n: int) -> np.ndarray:
    """Draw ``n`` pixel positions inside ``mask``, about half of them away from its edges.

    People click inside objects, not on their rims; random pixels of the label (the evaluation
    protocol) include rims. Mixing both keeps the model honest for either.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the draws.
    mask : np.ndarray
        ``(H, W)`` bool.
    n : int
        Number of points (drawn with replacement).

    Returns
    -------
    np.ndarray
        ``(n, 2)`` float64 ``(y, x)`` pixel positions; ``(0, 2)`` when ``mask`` is empty.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros((0, 2), np.float64)
    interior = ndimage.binary_erosion(mask, iterations=2)
    iy, ix = np.nonzero(interior)
    out = []
    for _ in range(n):
        if len(iy) and rng.random() < 0.5:
            k = rng.integers(len(iy))
            out.append((iy[k], ix[k]))
        else:
            k = rng.integers(len(ys))
            out.append((ys[k], xs[k]))
    return np.asarray(out, np.float64).reshape(-1, 2)


def _footprints(points: np.ndarray, labels: np.ndarray, grid: int, stride: int) -> np.ndarray:
    """Rasterise ``(N, 2)`` points with ``(N,)`` labels into ``(2, grid, grid)`` weights."""
    import torch

    from .model.guide import point_masks

    return point_masks(
        torch.from_numpy(points), torch.from_numpy(labels), (grid, grid), stride
    ).numpy()


def annotate(rng: np.random.Generator, mask: np.ndarray, cfg: EpisodeConfig) -> np.ndarray:
    """Sparsify a support mask into the fine-grid annotation weights of an episode.

    A shot size is drawn from ``SHOT_SIZES``; a dense shot (or probability ``cfg.p_dense``)
    keeps the whole mask, otherwise that many positive points and about as many negative ones
    (none with probability ``cfg.p_no_negative``) are drawn with :func:`sample_points`.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the draws.
    mask : np.ndarray
        ``(S, S)`` bool support mask, ``S`` a multiple of ``cfg.fine_stride``.
    cfg : EpisodeConfig
        Sampling probabilities and the fine stride.

    Returns
    -------
    np.ndarray
        ``(2, S/stride, S/stride)`` float32 weights, ``[0]`` positive, ``[1]`` negative.
    """
    from .model.guide import dense_masks

    s = cfg.fine_stride
    shot = int(rng.choice(SHOT_SIZES))
    if shot == 0 or rng.random() < cfg.p_dense:
        import torch

        return dense_masks(torch.from_numpy(mask), s).numpy()
    n_pos = shot
    n_neg = (
        0 if rng.random() < cfg.p_no_negative else max(1, int(round(shot * rng.uniform(0.5, 2))))
    )
    pos = sample_points(rng, mask, n_pos)
    neg = sample_points(rng, ~mask, n_neg)
    pts = np.concatenate([pos, neg])
    lab = np.concatenate([np.ones(len(pos), np.int8), np.zeros(len(neg), np.int8)])
    return _footprints(pts, lab, mask.shape[0] // s, s)


def _augment_pair(
    rng: np.random.Generator,
    img: np.ndarray,
    mask: np.ndarray,
    geometry: tuple[int, bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[int, bool]]:
    """Flips, 90-degree rotations, intensity, gamma, noise and blur.

    ``img`` is ``(3, S, S)``, ``mask`` ``(S, S)``; geometry applies to both. ``geometry``
    ``(quarter turns, flip)`` reuses another slice's geometry (aligned episodes); the one used
    is returned.
    """
    if geometry is None:
        geometry = (int(rng.integers(4)), bool(rng.random() < 0.5))
    k, flip = geometry
    img = np.rot90(img, k, axes=(1, 2))
    mask = np.rot90(mask, k)
    if flip:
        img, mask = img[:, :, ::-1], mask[:, ::-1]
    img = np.ascontiguousarray(img)
    mask = np.ascontiguousarray(mask)
    if rng.random() < 0.5:
        g = float(np.exp(rng.uniform(-0.4, 0.4)))
        img = np.sign(img + 0.5) * np.abs(img + 0.5) ** g - 0.5
    if rng.random() < 0.5:
        img = img * rng.uniform(0.7, 1.3) + rng.uniform(-0.15, 0.15)
    if rng.random() < 0.2:
        img = ndimage.gaussian_filter(img, (0, rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)))
    if rng.random() < 0.3:
        img = img + rng.normal(0, rng.uniform(0.01, 0.08), img.shape)
    return img.astype(np.float32), mask, geometry


def _modality_shift(
    rng: np.random.Generator, cfg: EpisodeConfig, s_img: np.ndarray, q_img: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Change the look of a support/query pair together: inversion and colour mixing.

    Both images are ``(3, S, S)``, normalised about 0, so ``-img`` is the inverted reading.
    """
    if rng.random() < cfg.p_colour:
        mix = np.eye(3, dtype=np.float32) + rng.normal(0, 0.25, (3, 3)).astype(np.float32)
        mix /= np.abs(mix).sum(axis=1, keepdims=True)
        shift = rng.uniform(-0.1, 0.1, (3, 1, 1)).astype(np.float32)
        s_img = np.einsum("ij,jyx->iyx", mix, s_img) + shift
        q_img = np.einsum("ij,jyx->iyx", mix, q_img) + shift
    if rng.random() < cfg.p_invert:
        s_img, q_img = -s_img, -q_img
    return s_img.astype(np.float32), q_img.astype(np.float32)


def _make_episode(
    rng: np.random.Generator,
    cfg: EpisodeConfig,
    s_img: np.ndarray,
    s_mask: np.ndarray,
    q_img: np.ndarray,
    q_mask: np.ndarray,
    aligned: bool = False,
) -> Episode:
    """Augment a support/query pair (shared geometry when aligned) and annotate the support."""
    s_img, s_mask, geometry = _augment_pair(rng, s_img, s_mask)
    q_img, q_mask, _ = _augment_pair(rng, q_img, q_mask, geometry if aligned else None)
    s_img, q_img = _modality_shift(rng, cfg, s_img, q_img)
    masks = annotate(rng, s_mask, cfg)
    # Aligned episodes sometimes withhold the positions: the model must work both ways.
    on = aligned and rng.random() >= cfg.p_local_off
    return Episode(s_img, masks.astype(np.float32), q_img, q_mask.astype(np.float32), float(on))


def _task_masks(
    rng: np.random.Generator,
    sem_s: np.ndarray,
    sem_q: np.ndarray,
    ins_s: np.ndarray,
    ins_q: np.ndarray,
    same_scene: bool,
    p_instance: float = 0.4,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Pick a task on a synthetic pair and return its support and query masks."""
    if same_scene and rng.random() < p_instance:
        common = np.intersect1d(np.unique(ins_s[ins_s > 0]), np.unique(ins_q[ins_q > 0]))
        if len(common):
            obj = rng.choice(common)
            return ins_s == obj, ins_q == obj
    classes = np.unique(sem_s)
    if rng.random() < 0.35 or len(classes) == 1:
        k = 0
    else:
        k = int(rng.choice(classes[classes > 0]))
    return sem_s == k, sem_q == k


class SyntheticEpisodes:
    """Endless episodes from procedurally generated samples (no data needed)."""

    def __init__(self, cfg: EpisodeConfig = EpisodeConfig(), seed: int = 0) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[Episode]:
        """Return the iterator itself (it never ends)."""
        return self

    def __next__(self) -> Episode:
        """Draw the next episode from a freshly generated sample.

        Raises
        ------
        RuntimeError
            If 50 samples in a row give no task with both classes on the support.
        """
        rng, c = self.rng, self.cfg.crop
        for _ in range(50):
            style = synthetic.random_style(rng)
            depth = 24
            scene = synthetic.make_scene(rng, style, (depth, c, c))
            zs = float(rng.uniform(2, depth - 2))
            same = rng.random() < 0.6
            if same and rng.random() < self.cfg.p_same_slice / 0.6:
                zq, q_scene = zs, scene
            elif same:
                zq = float(np.clip(zs + rng.choice([-1, 1]) * rng.uniform(1, 6), 0, depth - 1))
                q_scene = scene
            else:
                q_scene = synthetic.make_scene(rng, style, (depth, c, c))
                zq = float(rng.uniform(2, depth - 2))
            s = synthetic.render_slice(scene, zs, rng)
            q = synthetic.render_slice(q_scene, zq, rng)
            task = _task_masks(
                rng, s.semantic, q.semantic, s.instance, q.instance, same, self.cfg.p_instance
            )
            if task is None or task[0].sum() < 4 or (~task[0]).sum() < 4:
                continue
            s_raw, q_raw = s.image, q.image
            if rng.random() < self.cfg.p_rgb:
                s_raw, q_raw = synthetic.stain_rgb(rng, [s_raw, q_raw], rng.random() < 0.9)
            s_img = normalize_slice(s_raw)
            q_img = s_img if zq == zs else normalize_slice(q_raw)
            return _make_episode(rng, self.cfg, s_img, task[0], q_img, task[1], aligned=same)
        raise RuntimeError("could not draw a synthetic episode in 50 tries")


@dataclass
class LabelledStack:
    """A labelled sample for training: images ``(N, H, W[, 3])`` and labels ``(N, H, W)``."""

    name: str
    images: list[np.ndarray]
    labels: list[np.ndarray]
    semantic: bool  # few label values: one task per value; else instance ids
    volumetric: bool  # consecutive planes are neighbours (z or time)


def _classify_labels(labels: Sequence[np.ndarray]) -> bool:
    """Tell semantic labels (at most 8 values in all) from instance ids."""
    values = np.unique(np.concatenate([np.unique(lab) for lab in labels]))
    return len(values) <= 8


def _is_volumetric(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray], semantic: bool
) -> bool:
    """Whether consecutive planes are neighbours in z or time rather than separate images.

    Instance ids of a volume persist across neighbouring planes; ids of separate images only
    coincide by chance. Semantic labels carry no ids, so compare image correlation of
    neighbouring planes with that of distant ones.
    """
    if len(images) < 2 or images[0].shape != images[1].shape:
        return False
    if not semantic:
        a, b = labels[0], labels[1]
        fg = (a > 0) | (b > 0)
        return bool(fg.any() and ((a == b) & fg).sum() / fg.sum() > 0.3)
    if len(images) < 4:
        return False

    def corr(i: int, j: int) -> float:
        """Pearson correlation of planes ``i`` and ``j``."""
        x, y = images[i].astype(np.float32).ravel(), images[j].astype(np.float32).ravel()
        return float(np.corrcoef(x, y)[0, 1])

    far = len(images) - 1
    return corr(0, 1) > corr(0, far) + 0.03


def load_labelled_stacks(
    root: str | Path,
    names: Sequence[str] | None = None,
    split: str = "train",
    val_fraction: float = 0.25,
) -> list[LabelledStack]:
    """Load ``<root>/<name>/image.tif`` + ``labels.tif`` (or ``images/`` + ``masks/``).

    Parameters
    ----------
    root : path
        Folder of data sets.
    names : sequence of str, optional
        Data sets to use; default all sub-folders.
    split : {"train", "val", "all"}
        The last ``val_fraction`` of the planes or images of each data set is the validation
        split; it never appears in training.
    val_fraction : float
        Share of each data set held out for validation (at least one plane or image).

    Returns
    -------
    list of LabelledStack
        One per data set, images ``(N, H, W[, 3])`` and labels ``(N, H, W)`` of the split.

    Raises
    ------
    FileNotFoundError
        If ``root`` or a data set's files are missing.
    ValueError
        If a data set's labels do not match its image's shape.
    """
    import tifffile

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    names = list(names) if names else sorted(p.name for p in root.iterdir() if p.is_dir())
    out = []
    for name in names:
        d = root / name
        if (d / "image.tif").exists():
            img = tifffile.imread(d / "image.tif")
            lab = tifffile.imread(d / "labels.tif")
            if lab.shape != img.shape[: lab.ndim]:
                raise ValueError(f"{d}: labels shape {lab.shape} does not match image {img.shape}")
            images, labels = list(img), list(lab)
        elif (d / "images").is_dir():
            files = sorted((d / "images").glob("*.tif"))
            images = [tifffile.imread(f) for f in files]
            labels = [tifffile.imread(d / "masks" / f.name) for f in files]
        else:
            raise FileNotFoundError(f"{d} has neither image.tif nor images/")
        n = len(images)
        n_val = max(1, int(round(n * val_fraction)))
        sel = (
            slice(0, n - n_val)
            if split == "train"
            else slice(n - n_val, n)
            if split == "val"
            else slice(0, n)
        )
        images, labels = images[sel], labels[sel]
        semantic = _classify_labels(labels)
        out.append(
            LabelledStack(name, images, labels, semantic, _is_volumetric(images, labels, semantic))
        )
    return out


def _boundaries(lab: np.ndarray) -> np.ndarray:
    """Mark pixels of ``(H, W)`` labels that touch a different label (both sides of an edge)."""
    g = np.zeros(lab.shape, bool)
    g[:-1] |= lab[:-1] != lab[1:]
    g[1:] |= lab[:-1] != lab[1:]
    g[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    g[:, 1:] |= lab[:, :-1] != lab[:, 1:]
    return g


class StackEpisodes:
    """Endless episodes from labelled stacks (class, instance and boundary tasks)."""

    def __init__(
        self, stacks: Sequence[LabelledStack], cfg: EpisodeConfig = EpisodeConfig(), seed: int = 0
    ) -> None:
        if not stacks:
            raise ValueError("no labelled stacks given")
        self.stacks = list(stacks)
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[Episode]:
        """Return the iterator itself (it never ends)."""
        return self

    def _crop(
        self, img: np.ndarray, lab: np.ndarray, scale: float, at: tuple[float, float] | None
    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        """Crop ``img`` and ``lab`` at relative position ``at`` (random if None), resized.

        Returns the ``(3, S, S)`` normalised crop, its ``(S, S)`` labels (nearest neighbour)
        and the position used, so a neighbouring slice can be cropped at the same place.
        """
        import torch
        import torch.nn.functional as F

        c = self.cfg.crop
        size = min(int(round(c / scale)), img.shape[0], img.shape[1])
        rng = self.rng
        if at is None:
            at = (rng.random(), rng.random())
        y0 = int(at[0] * (img.shape[0] - size))
        x0 = int(at[1] * (img.shape[1] - size))
        im = normalize_slice(img[y0 : y0 + size, x0 : x0 + size])
        lb = lab[y0 : y0 + size, x0 : x0 + size]
        if size != c:
            im = F.interpolate(
                torch.from_numpy(im)[None], size=(c, c), mode="bilinear", align_corners=False
            )[0].numpy()
            idx = (np.arange(c) * size / c).astype(int)
            lb = lb[idx][:, idx]
        return im, lb, at

    def __next__(self) -> Episode:
        """Draw the next episode (retrying draws whose support mask lacks a class).

        Raises
        ------
        RuntimeError
            If 100 draws in a row give no usable task.
        """
        for _ in range(100):
            episode = self._draw()
            if episode is not None:
                return episode
        raise RuntimeError("could not draw an episode from the labelled stacks in 100 tries")

    def _pick_slices(self, n: int, volumetric: bool) -> tuple[int, int, bool]:
        """Pick support and query planes ``(i, j)`` of a stack of ``n``; also whether i == j."""
        rng = self.rng
        i = int(rng.integers(n))
        same_slice = rng.random() < self.cfg.p_same_slice
        if same_slice:
            j = i
        elif volumetric and rng.random() < 0.7:
            j = int(np.clip(i + rng.choice([-1, 1]) * rng.integers(1, 9), 0, n - 1))
        else:
            j = int(rng.integers(n))
        if j == i and n > 1 and not same_slice:
            j = (i + 1) % n
        return i, j, same_slice

    def _pick_task(
        self, semantic: bool, s_lab: np.ndarray, q_lab: np.ndarray, aligned: bool
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Pick a task on a pair of label crops; return its support and query masks, or None.

        Semantic labels give a class task; instance labels an object task (aligned pairs
        only: there positions identify the object), a boundary task or a foreground task.
        """
        rng = self.rng
        if semantic:
            v = rng.choice(np.unique(s_lab))
            return s_lab == v, q_lab == v
        if aligned and rng.random() < self.cfg.p_instance:
            ids = np.intersect1d(np.unique(s_lab), np.unique(q_lab))
            if len(ids) == 0:
                return None
            obj = rng.choice(ids)
            return s_lab == obj, q_lab == obj
        if rng.random() < 0.35:
            return _boundaries(s_lab), _boundaries(q_lab)
        if (s_lab == 0).mean() < 0.05:  # hardly any background: no foreground task
            return None
        return s_lab > 0, q_lab > 0

    def _draw(self) -> Episode | None:
        """Draw one episode, or None when the drawn task is unusable."""
        rng = self.rng
        st = self.stacks[int(rng.integers(len(self.stacks)))]
        i, j, same_slice = self._pick_slices(len(st.images), st.volumetric)
        scale = float(np.exp(rng.uniform(*np.log(self.cfg.scale_range))))
        s_img, s_lab, at = self._crop(st.images[i], st.labels[i], scale, None)
        aligned = same_slice or (st.volumetric and rng.random() < 0.5)
        if same_slice:
            q_img, q_lab = s_img, s_lab
        else:
            q_img, q_lab, _ = self._crop(st.images[j], st.labels[j], scale, at if aligned else None)
        task = self._pick_task(st.semantic, s_lab, q_lab, aligned)
        if task is None or task[0].sum() < 4 or (~task[0]).sum() < 4:
            return None
        return _make_episode(rng, self.cfg, s_img, task[0], q_img, task[1], aligned=aligned)
