"""Training the click refiner (:mod:`.model.click_refiner`) with a simulated annotator.

The guided network stays frozen: its features of every training slice are computed once, and
each sample runs the same path as an object click in the predictor (guide on the first positive
click, class probability with the local prior, :func:`.objects.select_object`). Corrections are
simulated as in RITM's iterative training: the refiner being trained draws the mask, the
annotator of :mod:`.evaluate_objects` clicks the largest error, and so on for a random number of
clicks; the loss (binary cross-entropy plus soft Dice) is on the window after the last click.
So the refiner learns to correct its own mistakes, as a user meets them.

Objects come from instance labels (semantic labels: connected components of each value) of the
training splits of the labelled data sets and from procedural slices (:mod:`.synthetic`), grey
and stained RGB. Validation uses fixed objects of procedural slices and of the data sets'
validation splits, scored by the simulated annotator (mean IoU after 1, 3 and 5 clicks).

No napari or Qt here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import synthetic
from .atomic import atomic_write
from .episodes import load_labelled_stacks
from .evaluate import foreground_iou
from .evaluate_objects import next_click
from .model.click_refiner import (
    ClickRefiner,
    RefinerConfig,
    deepened,
    sample_window,
)
from .objects import (
    obey_clicks,
    reaches_edge,
    refine_once,
    refined_mask,
    refiner_inputs,
    select_object,
)
from .weights import LoadedWeights, encoder_sources, load_refiner, load_weights, save_refiner

if TYPE_CHECKING:
    from .predictor import RevolverPredictor

logger = logging.getLogger(__name__)

__all__ = ["ClickTrainConfig", "ObjectSource", "RefinerTrainConfig", "train_refiner"]


@dataclass
class RefinerTrainConfig:
    """What every refiner training run (click refiner, follower) depends on.

    Written next to its checkpoints as ``config.json``.
    """

    out: str = "runs/refiner"
    weights: str | None = None
    data: str | None = None
    datasets: list[str] = field(default_factory=list)
    steps: int = 3000
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    #: Procedural training samples (slices or stacks).
    synthetic: int = 96
    seed: int = 0
    val_every: int = 250
    val_objects: int = 32
    threads: int = 2
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    #: A refiner file of the same role to start from (fine-tuning, on new data or for longer);
    #: its architecture replaces ``refiner``. Trained on ``weights`` (or on weights with the same
    #: encoder). A run that already has a checkpoint resumes from that instead.
    init: str | None = None
    #: Dilations of residual blocks appended to the refiner (new or ``init``), each starting
    #: as the identity (:func:`.model.click_refiner.deepened`): a wider view of the window.
    add_dilations: tuple[int, ...] = ()


@dataclass
class ClickTrainConfig(RefinerTrainConfig):
    """A click refiner training run."""

    out: str = "runs/clicks"
    #: Data sets whose validation split joins the procedural validation objects (default
    #: ``datasets``); leave out those a benchmark scores, so that it did not choose the weights.
    val_datasets: list[str] | None = None
    max_corrections: int = 8
    #: Share of episodes whose class probability is made unreliable
    #: (:func:`unreliable_probability`): the refiner learns to find the object in the image
    #: where the network is lost (a modality it never saw).
    p_unreliable: float = 0.0
    #: Redraws of a mask that reaches its window's edge (``RefinerConfig.regrow``), written
    #: into the refiner trained (new or ``init``); ``None``: the refiner's own.
    regrow: int | None = None
    #: Train the refiner (new or ``init``) to read the mask after the previous click at
    #: corrections (``RefinerConfig.previous_mask``); ``None``: the refiner's own setting.
    previous_mask: bool | None = None
    #: A click refiner file that draws each episode's first click (its windows are no
    #: samples; validation's first click is its too): the refiner trained learns corrections
    #: only, to be shipped beside the weights as ``<stem>-corrections.safetensors``.
    first_refiner: str | None = None
    #: A click refiner file that draws validation's corrections: the refiner trained learns
    #: first clicks only (episodes of one click) and is scored with the corrector it will
    #: be used with (``<stem>-corrections.safetensors``).
    corrector: str | None = None
    #: Clicks per validation object.
    #: 5 scores IoU after 1, 3 and 5 clicks; more adds IoU after 10 and after all of them, so
    #: that a refiner of corrections is chosen for late corrections too.
    val_clicks: int = 5

    def __post_init__(self) -> None:
        """Refuse a share outside [0, 1] and negative numbers of corrections or redraws."""
        if not 0.0 <= self.p_unreliable <= 1.0:
            raise ValueError(f"p_unreliable must be in [0, 1]; got {self.p_unreliable}")
        if self.first_refiner is not None and self.corrector is not None:
            raise ValueError(
                "give first_refiner (train corrections) or corrector (train first clicks), not both"
            )
        if self.max_corrections < 0:
            raise ValueError(f"max_corrections must be 0 or more; got {self.max_corrections}")
        if self.regrow is not None and self.regrow < 0:
            raise ValueError(f"regrow must be 0 or more; got {self.regrow}")
        if self.val_clicks < 5:
            raise ValueError(f"val_clicks must be 5 or more; got {self.val_clicks}")


@dataclass
class ObjectSource:
    """Slices with instance labels, their features computed once.

    Attributes
    ----------
    name : str
    predictor : RevolverPredictor
        Its volume is the slices (features cached).
    labels : np.ndarray
        ``(N, H, W)`` instance ids, 0 background.
    objects : list of (int, int)
        ``(slice, id)`` of every object worth clicking.
    images : list of torch.Tensor
        The normalised slices ``(C, H, W)``, as the refiner reads them.
    """

    name: str
    predictor: RevolverPredictor
    labels: np.ndarray
    objects: list[tuple[int, int]]
    images: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        name: str,
        weights: LoadedWeights,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        min_area: int = 64,
        max_share: float = 0.2,
    ) -> ObjectSource:
        """Encode ``images`` ``(N, H, W[, 3])`` once and list the objects of ``labels``."""
        from .predictor import RevolverPredictor

        predictor = RevolverPredictor(weights, cache_bytes=1 << 34)
        predictor.set_volume(images, rgb=images.ndim == 4)
        for _ in predictor.precompute():
            pass
        objects = []
        limit = max_share * labels.shape[1] * labels.shape[2]
        for z in range(len(labels)):
            ids, counts = np.unique(labels[z][labels[z] > 0], return_counts=True)
            objects += [
                (z, int(i)) for i, c in zip(ids, counts, strict=True) if min_area <= c <= limit
            ]
        norm = [predictor._prepare(k) for k in range(len(labels))]
        return cls(name, predictor, labels, objects, norm)

    def probability(self, z: int, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Class probability ``(H, W)`` of an object task with these clicks on slice ``z``."""
        p = self.predictor
        zyx = np.column_stack([np.full(len(points), z, np.float64), points])
        task = p.guide(zyx, labels, kind="object")
        return p.predict_proba(z, task)[0]

    def slice_inputs(self, z: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Slice ``z`` as the refiner reads it: normalised image, fine features, their stride."""
        fine = self.predictor.features(z).fine[0]
        return self.images[z], fine, self.predictor.model.fine_stride


def instances_of(labels: np.ndarray, semantic: bool) -> np.ndarray:
    """Instance ids of a label plane: the ids, or components of each value of semantic labels."""
    if not semantic:
        return labels.astype(np.int64)
    out = np.zeros(labels.shape, np.int64)
    n = 0
    for v in np.unique(labels):
        comp, k = ndimage.label(labels == v)
        out[comp > 0] = comp[comp > 0] + n
        n += k
    return out


def _tiles(
    images: list[np.ndarray], labels: list[np.ndarray], side: int = 640
) -> tuple[list, list]:
    """Cut planes larger than ``side`` into about equal tiles (features of huge slices cost)."""
    oi, ol = [], []
    for im, lab in zip(images, labels, strict=True):
        h, w = lab.shape
        ny, nx = math.ceil(h / side), math.ceil(w / side)
        for i in range(ny):
            for j in range(nx):
                ys = slice(i * h // ny, (i + 1) * h // ny)
                xs = slice(j * w // nx, (j + 1) * w // nx)
                oi.append(im[ys, xs])
                ol.append(lab[ys, xs])
    return oi, ol


def real_sources(
    weights: LoadedWeights, root: str, names: Sequence[str], split: str
) -> list[ObjectSource]:
    """Object sources of the labelled data sets ``names`` (their ``split``)."""
    out = []
    for st in load_labelled_stacks(root, names, split=split):
        images, labels = _tiles(list(st.images), [instances_of(x, st.semantic) for x in st.labels])
        shapes = {x.shape for x in labels}
        for shape in sorted(shapes):
            sel = [i for i, x in enumerate(labels) if x.shape == shape]
            out.append(
                ObjectSource.build(
                    st.name,
                    weights,
                    np.stack([images[i] for i in sel]),
                    np.stack([labels[i] for i in sel]),
                )
            )
    return out


def synthetic_sources(
    weights: LoadedWeights, n: int, seed: int, side: int = 256
) -> list[ObjectSource]:
    """Procedural slices with object ids, half of them with membrane cells as the objects."""
    rng = np.random.default_rng(seed)
    grey, grey_lab, rgb, rgb_lab = [], [], [], []
    while len(grey) + len(rgb) < n:
        style = synthetic.random_style(rng)
        scene = synthetic.make_scene(rng, style, (8, side, side))
        s = synthetic.render_slice(scene, 4.0, rng)
        lab = s.cells if s.cells.any() and rng.random() < 0.5 else s.instance
        if not lab.any():
            continue
        if rng.random() < 0.3:
            rgb.append(synthetic.stain_rgb(rng, [s.image], rng.random() < 0.9)[0])
            rgb_lab.append(lab)
        else:
            grey.append(s.image)
            grey_lab.append(lab)
    out = []
    for name, ims, labs in (("procedural", grey, grey_lab), ("procedural rgb", rgb, rgb_lab)):
        if ims:
            out.append(ObjectSource.build(name, weights, np.stack(ims), np.stack(labs)))
    return out


def first_click(truth: np.ndarray, rng: np.random.Generator | None) -> tuple[int, int]:
    """Place the annotator's first click: the interior point farthest from the boundary.

    With ``rng``, half the time a random point at least 0.6 of that distance inside instead
    (people do not click the exact centre).
    """
    d = ndimage.distance_transform_edt(np.pad(truth, 1))[1:-1, 1:-1]
    if rng is not None and rng.random() < 0.5:
        ys, xs = np.nonzero(d >= 0.6 * d.max())
        k = int(rng.integers(len(ys)))
        return int(ys[k]), int(xs[k])
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(y), int(x)


def unreliable_probability(prob: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Spoil a class probability ``(H, W)`` the way a modality the network never saw does.

    Half the time the object breaks up (the probability times a smooth random mask whose
    blobs are 0.3-1 times the object's ``radius``: the selection is a fragment of the object),
    half the time the surroundings look like it too (a smooth random field of false
    foreground added: the selection leaks). The same field serves a whole episode.
    """
    n = synthetic.smooth_noise(rng, prob.shape, max(2.0, radius * rng.uniform(0.3, 1.0)))
    m = 1 / (1 + np.exp(-3 * (n + rng.uniform(-1.0, 0.5))))
    if rng.random() < 0.5:
        return (prob * m).astype(np.float32)
    return np.maximum(prob, m * rng.uniform(0.6, 1.0)).astype(np.float32)


def click_episode(
    refiner: ClickRefiner,
    src: ObjectSource,
    z: int,
    oid: int,
    corrections: int,
    rng: np.random.Generator | None,
    *,
    p_unreliable: float = 0.0,
    first: ClickRefiner | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Click one object, then ``corrections`` times where the refiner's mask is most wrong.

    Each click's selection is refined as :func:`.objects.refined_mask` does it, the
    refiner's redraws of a mask that reaches its window's edge (``config.regrow``) included;
    every window the refiner reads is a sample. With probability ``p_unreliable`` the
    episode's class probability is spoiled (:func:`unreliable_probability`). ``first``: a
    refiner that draws the first click instead, as the predictor's ``refiner`` does when
    ``refiner`` is its ``corrector``; its windows are no samples.

    Returns
    -------
    list of (x, target)
        Per refiner pass: its input ``(in_channels, size, size)`` and the object's share of
        each window pixel ``(size, size)``.
    """
    truth = src.labels[z] == oid
    truth_map = torch.from_numpy(truth.astype(np.float32))[None]
    here = src.slice_inputs(z)
    pts = [first_click(truth, rng)]
    labs = [1]
    spoil = None  # (the object's radius, the seed of the episode's field)
    if rng is not None and rng.random() < p_unreliable:
        radius = float(ndimage.distance_transform_edt(np.pad(truth, 1)).max())
        spoil = (radius, int(rng.integers(1 << 31)))

    def probability() -> np.ndarray:
        q = src.probability(z, np.asarray(pts, float), np.asarray(labs, np.int8))
        if spoil is None:
            return q
        return unreliable_probability(q, spoil[0], np.random.default_rng(spoil[1]))

    prob = probability()
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    shown: np.ndarray | None = None  # the mask the annotator saw after the last click
    for i in range(corrections + 1):
        p, lab = np.asarray(pts, float), np.asarray(labs, np.int8)
        sel = select_object(prob, p, lab)
        sel = correction_input(refiner, sel, shown)
        if i == 0 and first is not None:
            mask = _refiner_passes(first, here, prob, sel, p, lab, truth_map, [], i == corrections)
        else:
            mask = _refiner_passes(
                refiner, here, prob, sel, p, lab, truth_map, out, i == corrections
            )
        if mask is None:
            break
        if refiner.config.previous_mask:  # what inference shows (every click obeyed) is read
            shown = obey_clicks(mask, p, lab)
        click = next_click(mask, truth)
        if click is None:
            break
        pts.append(click[0])
        labs.append(click[1])
        if click[1] == 1:
            prob = probability()
    return out


def correction_input(
    refiner: ClickRefiner, selection: np.ndarray, shown: np.ndarray | None
) -> np.ndarray:
    """Return what a refiner reads as the selection at a click.

    ``shown`` (the mask after the previous click) for a refiner that reads it
    (``RefinerConfig.previous_mask``) when it is not empty, else ``selection``.
    """
    if refiner.config.previous_mask and shown is not None and shown.any():
        return shown
    return selection


def _refiner_passes(
    refiner: ClickRefiner,
    here: tuple[torch.Tensor, torch.Tensor, int],
    prob: np.ndarray,
    sel: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    truth_map: torch.Tensor,
    out: list[tuple[torch.Tensor, torch.Tensor]],
    last: bool,
) -> np.ndarray | None:
    """Refine one click's selection as inference does; append every pass's sample to ``out``.

    Returns the mask after the redraws, ``None`` after the ``last`` click when no redraw
    needs it (nothing is clicked after it).
    """
    most = refiner.config.regrow
    x, window = refiner_inputs(refiner, *here, prob, sel, points, labels)
    for r in range(most + 1):
        out.append((x, sample_window(truth_map, window, refiner.config.size)[0]))  # type: ignore[arg-type]
        if last and r == most:
            return None
        mask = refine_once(refiner, (x, window), sel, points, labels)
        if r == most or not reaches_edge(mask, window):
            break
        x, window = refiner_inputs(refiner, *here, prob, mask, points, labels)
    return None if last else mask


def refiner_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice of window logits ``(B, S, S)`` against shares."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1)
    return bce + dice.mean()


def validate(
    refiner: ClickRefiner | None,
    items: Sequence[tuple[ObjectSource, int, int]],
    clicks: int = 5,
    first: ClickRefiner | None = None,
) -> dict[str, float]:
    """Mean IoU after 1, 3 and 5 simulated clicks (``refiner=None``: selection only).

    ``first``: the refiner of the first click, ``refiner`` that of the corrections. With more
    than 5 ``clicks``, also the IoU after 10 (where there are that many) and after ``clicks``.
    """
    ious = np.zeros((len(items), clicks))
    if refiner is not None:
        refiner.eval()
    for n, (src, z, oid) in enumerate(items):
        truth = src.labels[z] == oid
        pts: list[tuple[int, int]] = []
        labs: list[int] = []
        mask = np.zeros_like(truth)
        shown: np.ndarray | None = None
        for i in range(clicks):
            click = next_click(mask, truth) if i else (first_click(truth, None), 1)
            if click is None:
                ious[n, i:] = 1.0
                break
            pts.append(click[0])
            labs.append(click[1])
            p, lab = np.asarray(pts, float), np.asarray(labs, np.int8)
            prob = src.probability(z, p, lab)
            mask = select_object(prob, p, lab)
            if refiner is not None:
                sel = correction_input(refiner, mask, shown)
                drawer = first if i == 0 and first is not None else refiner
                mask = refined_mask(drawer, *src.slice_inputs(z), prob, sel, p, lab)
                if refiner.config.previous_mask:
                    # Inference shows (and reads back) the mask with every click obeyed.
                    mask = shown = obey_clicks(mask, p, lab)
            ious[n, i] = foreground_iou(mask, truth)
    at = sorted({1, 3, 5, *((10, clicks) if clicks > 10 else (clicks,))})
    return {f"iou@{k}": float(ious[:, k - 1].mean()) for k in at}


def _lr_at(cfg: RefinerTrainConfig, step: int, warmup: int = 100) -> float:
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _draw(
    rng: np.random.Generator, sources: Sequence[ObjectSource]
) -> tuple[ObjectSource, int, int]:
    src = sources[int(rng.integers(len(sources)))]
    z, oid = src.objects[int(rng.integers(len(src.objects)))]
    return src, z, oid


def _corrections(rng: np.random.Generator, most: int) -> int:
    """How many corrections to simulate: none a third of the time, else up to ``most``.

    ``most`` 0: never (a refiner of first clicks only).
    """
    if most <= 0 or rng.random() < 1 / 3:
        return 0
    return int(rng.integers(1, most + 1))


def _sources(
    cfg: ClickTrainConfig, weights: LoadedWeights
) -> tuple[list[ObjectSource], list[tuple[ObjectSource, int, int]]]:
    """Training sources and the fixed validation objects of a run."""
    t0 = time.perf_counter()
    train_src = synthetic_sources(weights, cfg.synthetic, cfg.seed)
    val_src = synthetic_sources(weights, max(8, cfg.synthetic // 8), cfg.seed + 10_000)
    if cfg.data and cfg.datasets:
        train_src += real_sources(weights, cfg.data, cfg.datasets, "train")
        val_names = cfg.datasets if cfg.val_datasets is None else cfg.val_datasets
        if val_names:
            val_src += real_sources(weights, cfg.data, val_names, "val")
    train_src = [s for s in train_src if s.objects]
    val_src = [s for s in val_src if s.objects]
    vrng = np.random.default_rng(12345)
    val_items = [_draw(vrng, val_src) for _ in range(cfg.val_objects)]
    logger.info(
        "sources ready in %.0f s: %s",
        time.perf_counter() - t0,
        [(s.name, len(s.objects)) for s in train_src],
    )
    return train_src, val_items


def _batch(
    refiner: ClickRefiner,
    sources: Sequence[ObjectSource],
    cfg: ClickTrainConfig,
    rng: np.random.Generator,
    first: ClickRefiner | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg.batch`` windows after each click of simulated episodes, flipped and rotated.

    ``first``: the refiner of each episode's first click (then no sample of it).
    """
    xs, ys = [], []
    while len(xs) < cfg.batch:
        src, z, oid = _draw(rng, sources)
        n = _corrections(rng, cfg.max_corrections)
        n = n if first is None else max(1, n)  # an episode of one click has no sample
        episode = click_episode(
            refiner, src, z, oid, n, rng, p_unreliable=cfg.p_unreliable, first=first
        )
        for x, y in episode[: cfg.batch - len(xs)]:
            x, y = augment(x, y, rng)
            xs.append(x)
            ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def augment(
    x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip a window sample ``(C, S, S)`` and its target ``(S, S)`` at random, rotate by k*90."""
    if rng.random() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    k = int(rng.integers(4))
    return torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))


def _save_state(
    ckpt: Path, refiner: ClickRefiner, opt: torch.optim.Optimizer, step: int, best: float
) -> None:
    """Write the resumable state atomically."""
    state = {"model": refiner.state_dict(), "optimizer": opt.state_dict(), "step": step}
    state["best"] = best
    atomic_write(ckpt, lambda fh: torch.save(state, fh), overwrite=True)


def train_refiner(
    cfg: ClickTrainConfig, *, on_progress: Callable[[dict], None] | None = None
) -> Path:
    """Train a click refiner on the frozen guided network; return the best refiner's path.

    Resumes from ``<out>/checkpoint.pt`` when it exists. The best refiner (by the sum of the
    validation IoUs after 1, 3 and 5 clicks, and after 10 and ``cfg.val_clicks`` where more
    than 5) is ``<out>/best.safetensors``. With
    ``cfg.first_refiner`` it is a refiner of corrections, with ``cfg.corrector`` one of first
    clicks.
    """
    weights, refiner = start_run(cfg, "clicks")
    changes: dict[str, object] = {}
    if cfg.regrow is not None and refiner.config.regrow != cfg.regrow:
        # Redraws change no weight: set on the new or the init refiner alike.
        changes["regrow"] = cfg.regrow
    if cfg.previous_mask is not None and refiner.config.previous_mask != cfg.previous_mask:
        # The same channel, read differently at corrections: no weight changes either.
        changes["previous_mask"] = cfg.previous_mask
    if changes:
        refiner.config = cfg.refiner = replace(refiner.config, **changes)
        _write_run_config(cfg)

    def partner(path: str | None) -> ClickRefiner | None:
        # The other refiner of the pair, trained on the same weights (or encoder).
        if path is None:
            return None
        same = encoder_sources(weights.metadata)
        return load_refiner(path, weights.sha256, same_encoder=same, role="clicks")

    first, corrector = partner(cfg.first_refiner), partner(cfg.corrector)
    episodes = cfg if corrector is None else replace(cfg, max_corrections=0)
    train_src, val_items = _sources(cfg, weights)

    def scored() -> dict[str, float]:
        if corrector is not None:  # the refiner trained draws the first click only
            return validate(corrector, val_items, cfg.val_clicks, first=refiner)
        return validate(refiner, val_items, cfg.val_clicks, first=first)

    return run_steps(
        refiner,
        cfg,
        weights,
        batch=lambda rng: _batch(refiner, train_src, episodes, rng, first),
        validate=scored,
        score=lambda v: sum(v.values()),
        baseline=("selection", lambda: validate(None, val_items, cfg.val_clicks)),
        role="clicks",
        on_progress=on_progress,
    )


def start_run(cfg: RefinerTrainConfig, role: str) -> tuple[LoadedWeights, ClickRefiner]:
    """Start a run: load the weights and the module to train, write the configuration.

    Creates the run folder and sets threads and seeds. The module is new (``cfg.refiner``) or
    read from ``cfg.init``, whose architecture is then written as the run's ``refiner``.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    weights = load_weights(cfg.weights)
    if cfg.init is None:
        module = ClickRefiner(cfg.refiner)
    else:
        module = load_refiner(
            cfg.init,
            weights.sha256,
            same_encoder=encoder_sources(weights.metadata),
            role=role,
            fused=False,
        )
        cfg.refiner = module.config
    if cfg.add_dilations:
        module = deepened(module, tuple(cfg.add_dilations))
        cfg.refiner = module.config
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    _write_run_config(cfg)
    return weights, module


def _write_run_config(cfg: RefinerTrainConfig) -> None:
    """Write a run's configuration as ``<out>/config.json``."""
    (Path(cfg.out) / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))


def run_steps(
    module: ClickRefiner,
    cfg: RefinerTrainConfig,
    weights: LoadedWeights,
    *,
    batch: Callable[[np.random.Generator], tuple[torch.Tensor, torch.Tensor]],
    validate: Callable[[], dict[str, float]],
    score: Callable[[dict[str, float]], float],
    baseline: tuple[str, Callable[[], dict[str, float]]],
    role: str,
    on_progress: Callable[[dict], None] | None = None,
) -> Path:
    """Run the training loop of a refiner (click refiner or follower): resumable, best by score.

    Parameters
    ----------
    module : ClickRefiner
        Trained in place.
    cfg : RefinerTrainConfig
        Its ``out``, ``steps``, ``lr``, ``weight_decay``, ``seed`` and ``val_every``.
    weights : LoadedWeights
        The frozen network it is trained on (recorded in the saved files).
    batch : callable
        ``batch(rng) -> (x, target)`` of one step, drawn with the module in eval mode.
    validate, score : callable
        The validation metrics, and the number (larger is better) that picks the best step.
    baseline : (str, callable)
        Written to the log at step 0 under this name: the score without the module.
    role : str
        What the module is (``clicks``, ``follow``), recorded in the saved files.
    on_progress : callable, optional
        Gets each step's record.

    Returns
    -------
    Path
        ``<out>/best.safetensors``.
    """
    out = Path(cfg.out)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = out / "checkpoint.pt"
    step, best = 0, -1.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, best = int(state["step"]), float(state["best"])
        rng = np.random.default_rng([cfg.seed, step])  # not the same batches again
    meta = {"base_sha256": weights.sha256, "base_model": weights.model_key, "role": role}
    with (out / "log.jsonl").open("a") as log:
        if step == 0:
            rec0 = {"step": 0, baseline[0]: baseline[1]()}
            if cfg.init is not None:  # the file started from is the score to beat
                module.eval()
                rec0["val"] = validate()
                best = score(rec0["val"])
                save_refiner(module, out / "best.safetensors", {**meta, "step": "0"})
            log.write(json.dumps(rec0) + "\n")
        while step < cfg.steps:
            t = time.perf_counter()
            module.eval()
            x, y = batch(rng)
            t_data = time.perf_counter() - t
            module.train()
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step)
            loss = refiner_loss(module(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            rec: dict = {"step": step, "loss": float(loss.detach()), "data_s": t_data}
            rec["s"] = time.perf_counter() - t
            if step % cfg.val_every == 0 or step == cfg.steps:
                module.eval()
                rec["val"] = validate()
                if score(rec["val"]) > best:
                    best = score(rec["val"])
                    save_refiner(module, out / "best.safetensors", {**meta, "step": str(step)})
                _save_state(ckpt, module, opt, step, best)
            if step % 10 == 0 or "val" in rec:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if on_progress is not None:
                on_progress(rec)
    return out / "best.safetensors"
