"""Training the follower: an object moved from one slice to the next, as in mask propagation.

Video object segmentation moves an object's mask from frame to frame with a network that sees
the new frame and the last mask (MaskTrack, Perazzi et al. 2017). The follower does that through
z and t with the click refiner's architecture (:mod:`.model.click_refiner`): in a window around
the object's mask on the neighbouring slice, it reads the new slice's image, its cached fine
features, the class probability of the memory guidance (:func:`.objects.memory_probability`)
and the previous mask as the selection, with the previous mask's innermost point as the one
positive click, and draws the object on the new slice. Where the object ends, its target is
empty: the follower learns to let go rather than to jump to the object beside or behind it.

Each sample is one step ``p -> p +/- 1`` of an object of a z-stack whose ids persist through z
(instance labels of a volume, and procedural stacks of :mod:`.synthetic`), or a step onto a
slice where the object is gone: its real end (and, with ``far_ends``, farther slices where its
last mask lands on whatever is there). The previous mask is the true one, perturbed as a
prediction is (eroded, dilated or shifted in proportion to the object's size), so that the
follower learns to repair a step's error instead of passing it on. An object ends where it is
absent on the next two slices (a gap of one slice in the labels is not an end) and was present
on the slice before (ids found on a single slice are no objects). Validation follows fixed
objects of held-out stacks from one click each and scores their 3D IoU, as
``benchmarks/objects.py`` does.

No napari or Qt here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from . import synthetic
from .click_training import ObjectSource, RefinerTrainConfig, augment, run_steps, start_run
from .episodes import load_labelled_stacks
from .evaluate import foreground_iou
from .model.click_refiner import ClickRefiner, RefinerConfig, sample_window
from .objects import follow_step, follower_inputs, innermost, memory_probability
from .weights import LoadedWeights

logger = logging.getLogger(__name__)

__all__ = ["FollowTrainConfig", "follow_sample", "stack_sources", "train_follower"]


def _follower_config() -> RefinerConfig:
    # Smaller and narrower than the click refiner: it runs once per object and slice.
    # ``previous_image=True`` (also reading the slice the object comes from) validated the same
    # (3D IoU 0.490 against 0.487), so the default stays one frame.
    return RefinerConfig(size=64, width=16, mid_width=32)


@dataclass
class FollowTrainConfig(RefinerTrainConfig):
    """A follower training run.

    ``datasets`` are z-stacks with instance ids (others are skipped, with a message);
    ``synthetic`` counts procedural stacks of ``depth`` planes of ``side`` x ``side``.
    """

    out: str = "runs/follow"
    steps: int = 1500
    batch: int = 32
    lr: float = 2e-3
    synthetic: int = 48
    val_objects: int = 6
    refiner: RefinerConfig = field(default_factory=_follower_config)
    depth: int = 12
    side: int = 192
    #: Share of samples drawn where the object is gone (its target is empty).
    end_share: float = 0.2
    #: Farther slices per object (where it is gone) among those samples, beside its real ends.
    far_ends: int = 0
    #: Most slices the follower carries an object itself before a sample's step (0: never;
    #: the previous mask is then always the perturbed true one).
    rollout: int = 0
    #: Share of samples whose previous mask the follower carried (with ``rollout`` > 0).
    rollout_share: float = 0.5


@dataclass
class _Step:
    """One object step of a stack: the object ``oid`` from slice ``p`` to ``p + d``."""

    src: ObjectSource
    p: int
    d: int
    oid: int
    end: bool


def stack_sources(
    weights: LoadedWeights,
    *,
    n: int = 0,
    seed: int = 0,
    depth: int = 12,
    side: int = 192,
    root: str | None = None,
    names: Sequence[str] = (),
    split: str = "train",
) -> list[ObjectSource]:
    """Z-stacks whose object ids persist through z: ``n`` procedural ones and labelled ones.

    Labelled data sets that are not volumes with instance ids are skipped (logged).
    """
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        style = synthetic.random_style(rng)
        scene = synthetic.make_scene(rng, style, (depth, side, side))
        planes = [synthetic.render_slice(scene, float(z), rng) for z in range(depth)]
        cells = rng.random() < 0.5 and all(s.cells.any() for s in planes)
        labels = np.stack([s.cells if cells else s.instance for s in planes]).astype(np.int64)
        if not labels.any():
            continue
        images = np.stack([s.image for s in planes])
        if rng.random() < 0.3:
            images = np.stack(synthetic.stain_rgb(rng, list(images), rng.random() < 0.9))
        out.append(ObjectSource.build("procedural stack", weights, images, labels))
    if root and names:
        for st in load_labelled_stacks(root, names, split=split):
            if st.semantic or not st.volumetric:
                logger.info("%s is not a volume with instance ids: not used", st.name)
                continue
            labels = np.stack(st.labels).astype(np.int64)
            out.append(ObjectSource.build(st.name, weights, np.stack(st.images), labels))
    return [s for s in out if s.objects]


def _steps_of(
    src: ObjectSource, rng: np.random.Generator, far_ends: int = 2
) -> tuple[list[_Step], list[_Step]]:
    """Object steps of a stack: those onto the object, and those where it is gone.

    Where it is gone: its real ends (absent on the next two slices, present on the one before)
    and, to see many more ways an object disappears, up to ``far_ends`` farther slices per object
    (absent there and on both neighbours), where its last mask lands on whatever is there.
    """
    lab = src.labels
    onto, ends = [], []
    present = {(z, i) for z, i in src.objects}

    def absent(q: int, oid: int) -> bool:
        return not (0 <= q < len(lab)) or not (lab[q] == oid).any()

    def gone(q: int, oid: int) -> bool:
        return absent(q - 1, oid) and absent(q, oid) and absent(q + 1, oid)

    for z, oid in src.objects:
        for d in (-1, 1):
            q = z + d
            if not 0 <= q < len(lab):
                continue
            if (q, oid) in present:
                onto.append(_Step(src, z, d, oid, False))
            elif (z - d, oid) in present and absent(q, oid) and absent(q + d, oid):
                ends.append(_Step(src, z, d, oid, True))
        if far_ends and ((z - 1, oid) in present or (z + 1, oid) in present):
            far = [int(q) for q in rng.permutation(len(lab)) if abs(q - z) > 1][: 3 * far_ends]
            ends += [_Step(src, z, q - z, oid, True) for q in far if gone(q, oid)][:far_ends]
    return onto, ends


def _perturb(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Perturb a true mask as a prediction of it could be: eroded, dilated, shifted.

    Errors scale with the object: up to 15% of its radius eroded or dilated, and a shift up to
    30% of it (a fast-moving object, or one cut obliquely by thick sections, moves that far).
    """
    r = float(np.sqrt(mask.sum() / np.pi))
    out = mask
    most = max(1, round(0.15 * r))
    k = int(rng.integers(-most, most + 1))
    if k > 0:
        out = ndimage.binary_dilation(out, iterations=k)
    elif k < 0:
        eroded = ndimage.binary_erosion(out, iterations=-k)
        out = eroded if eroded.sum() >= 0.3 * mask.sum() else out
    far = max(2.0, 0.3 * r) * np.sqrt(rng.random())
    angle = rng.uniform(0, 2 * np.pi)
    dy, dx = round(far * np.sin(angle)), round(far * np.cos(angle))
    return np.roll(out, (dy, dx), axis=(0, 1))


def follow_sample(
    follower: ClickRefiner, step: _Step, rng: np.random.Generator | None, rollout: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the follower's input and target for one object step.

    The previous mask is the true one (perturbed with ``rng``) or, with ``rollout`` > 0, the
    follower's own: it carries the perturbed true mask from ``rollout`` slices back (as far as
    the object is there) up to the step's slice, so that it learns to repair the errors it
    makes itself, not only those of :func:`_perturb`.

    Returns
    -------
    x : torch.Tensor
        ``(in_channels, size, size)``.
    target : torch.Tensor
        ``(size, size)``: the object's share of each window pixel on the new slice.
    """
    src, p, q = step.src, step.p, step.p + step.d
    prev = _carried(follower, step, rng, rollout) if rollout else None
    if prev is None:
        prev = src.labels[p] == step.oid
        if rng is not None:
            prev = _perturb(prev, rng)
    inputs, window = follower_inputs(
        follower, *src.slice_inputs(q), _step_probability(src, p, q, prev), prev, src.images[p]
    )
    truth = torch.from_numpy((src.labels[q] == step.oid).astype(np.float32))[None]
    return inputs, sample_window(truth, window, follower.config.size)[0]  # type: ignore[arg-type]


def _step_probability(src: ObjectSource, p: int, q: int, prev: np.ndarray) -> np.ndarray:
    """Return the memory probability on slice ``q`` of an object masked ``prev`` on slice ``p``."""
    pr = src.predictor
    y, x = innermost(prev)
    task = pr.guide([[p, y, x]], [1], kind="object")
    return memory_probability(pr, (q,), pr.guidance_of([task]), [((p,), prev)])


def _carried(
    follower: ClickRefiner, step: _Step, rng: np.random.Generator | None, most: int
) -> np.ndarray | None:
    """Return the step's previous mask as the follower carries it from up to ``most`` back.

    Starts from the perturbed true mask on the farthest slice back (up to ``most``, drawn with
    ``rng``) from which the object is on every slice up to the step's; ``None`` where there is
    none, or where the follower loses the object on the way.
    """
    src, p, d, oid = step.src, step.p, step.d, step.oid
    k = int(rng.integers(1, most + 1)) if rng is not None else most
    start = p
    for _ in range(k):
        back = start - d
        if not 0 <= back < len(src.labels) or not (src.labels[back] == oid).any():
            break
        start = back
    if start == p:
        return None
    mask = src.labels[start] == oid
    if rng is not None:
        mask = _perturb(mask, rng)
    for s in range(start + d, p + d, d):
        if not mask.any():
            return None
        prob = _step_probability(src, s - d, s, mask)
        image, fine, stride = src.slice_inputs(s)
        previous_image = src.images[s - d] if follower.config.previous_image else None
        moved = follow_step(
            follower, image, fine, stride, prob, mask, previous_image=previous_image
        )
        if moved is None:
            return None
        mask = moved
    return mask


def validate_following(
    follower: ClickRefiner | None, items: Sequence[tuple[ObjectSource, int, list[int]]]
) -> dict[str, float]:
    """Follow fixed objects from one click each; mean 3D IoU and share at IoU >= 0.5.

    ``follower=None`` scores following without one (the last mask carried over, snapped).
    """
    ious = []
    for src, z, ids in items:
        pr = src.predictor
        pr.follower = follower
        tasks = []
        for value, oid in enumerate(ids, start=1):
            y, x = innermost(src.labels[z] == oid)
            tasks.append(pr.guide([[z, y, x]], [1], kind="object", label_value=value))
        out = np.zeros(src.labels.shape, np.uint32)
        for st in pr.propagate(tasks):
            out[st.index] = st.result
        ious += [foreground_iou(out == v, src.labels == oid) for v, oid in enumerate(ids, 1)]
        pr.follower = None
    a = np.asarray(ious)
    return {"iou3d": float(a.mean()), "share@0.5": float((a >= 0.5).mean())}


def _val_items(
    sources: Sequence[ObjectSource], per_stack: int
) -> list[tuple[ObjectSource, int, list[int]]]:
    """Per stack: its middle slice and up to ``per_stack`` of its objects there, largest first."""
    items = []
    for src in sources:
        z = len(src.labels) // 2
        here = [(int((src.labels[z] == i).sum()), i) for zz, i in src.objects if zz == z]
        ids = [i for _, i in sorted(here, reverse=True)[:per_stack]]
        if ids:
            items.append((src, z, ids))
    return items


def _batch(
    follower: ClickRefiner,
    onto: Sequence[_Step],
    ends: Sequence[_Step],
    cfg: FollowTrainConfig,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg.batch`` samples, ``end_share`` of them past an end, flipped and rotated."""
    xs, ys = [], []
    for _ in range(cfg.batch):
        pool = ends if ends and rng.random() < cfg.end_share else onto
        rollout = cfg.rollout if rng.random() < cfg.rollout_share else 0
        step = pool[int(rng.integers(len(pool)))]
        x, y = augment(*follow_sample(follower, step, rng, rollout), rng)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def _prepare(
    cfg: FollowTrainConfig, weights: LoadedWeights
) -> tuple[list[_Step], list[_Step], list[tuple[ObjectSource, int, list[int]]]]:
    """Return a run's training steps (onto objects, past their ends) and validation objects."""
    t0 = time.perf_counter()
    train_src = stack_sources(
        weights,
        n=cfg.synthetic,
        seed=cfg.seed,
        depth=cfg.depth,
        side=cfg.side,
        root=cfg.data,
        names=cfg.datasets,
    )
    val_src = stack_sources(
        weights,
        n=max(4, cfg.synthetic // 8),
        seed=cfg.seed + 10_000,
        depth=cfg.depth,
        side=cfg.side,
        root=cfg.data,
        names=cfg.datasets,
        split="val",
    )
    onto: list[_Step] = []
    ends: list[_Step] = []
    rng = np.random.default_rng(cfg.seed)
    for src in train_src:
        a, b = _steps_of(src, rng, cfg.far_ends)
        onto += a
        ends += b
    if not onto:
        raise ValueError("no object continues onto a neighbouring slice in the training stacks")
    val_items = _val_items(val_src, cfg.val_objects)
    logger.info(
        "stacks ready in %.0f s: %d steps onto objects, %d past their ends",
        time.perf_counter() - t0,
        len(onto),
        len(ends),
    )
    return onto, ends, val_items


def train_follower(
    cfg: FollowTrainConfig, *, on_progress: Callable[[dict], None] | None = None
) -> Path:
    """Train a follower on the frozen guided network; return the best follower's path.

    Resumes from ``<out>/checkpoint.pt`` when it exists. The best follower (by validation 3D
    IoU) is ``<out>/best.safetensors``.
    """
    weights, follower = start_run(cfg, "follow")
    onto, ends, val_items = _prepare(cfg, weights)
    return run_steps(
        follower,
        cfg,
        weights,
        batch=lambda rng: _batch(follower, onto, ends, cfg, rng),
        validate=lambda: validate_following(follower, val_items),
        score=lambda v: v["iou3d"],
        baseline=("watershed", lambda: validate_following(None, val_items)),
        role="follow",
        on_progress=on_progress,
    )
