"""Episodic training of the guided network (paper, sec. 3 and 5).

Episodes mix procedural samples (:mod:`.synthetic`, so training needs no data at all) with
labelled stacks. The loss is class-balanced binary cross-entropy plus soft Dice on the dense
query mask. Checkpoints are written every ``checkpoint_every`` steps and a run resumes from its
last checkpoint; the best model by validation IoU is exported as safetensors.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_write
from .device import resolve_device
from .episodes import (
    Episode,
    EpisodeConfig,
    StackEpisodes,
    SyntheticEpisodes,
    load_labelled_stacks,
)
from .evaluate import foreground_iou
from .model.registry import build_model
from .weights import save_weights

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainProgress", "episode_loss", "evaluate", "train"]


@dataclass
class TrainConfig:
    """Everything a training run depends on (written next to its checkpoints)."""

    out: str = "runs/revolver"
    model: str = "revolver-s"
    steps: int = 20000
    batch: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    crop: int = 160
    data: str | None = None
    datasets: list[str] = field(default_factory=list)
    p_real: float = 0.5
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 200
    val_every: int = 500
    val_episodes: int = 48
    workers: int = 1
    threads: int = 0
    #: Start from these weights (a ``.safetensors`` checkpoint); input channels the checkpoint
    #: lacks (the local prior, say) start at zero, so the warm start behaves as it did.
    init: str | None = None
    #: ``False`` trains the foreground-background baseline of the paper: the same network with
    #: its guidance withheld (no annotations, no positions), so it can only learn what usually
    #: is foreground.
    guidance: bool = True
    #: Share of aligned episodes that are instance tasks (see ``EpisodeConfig``).
    p_instance: float = 0.4
    #: Share of episodes read intensity-inverted, and of episodes with a random colour mixing
    #: (see ``EpisodeConfig``); training and validation episodes alike.
    p_invert: float = 0.4
    p_colour: float = 0.25
    #: Keep the encoder as ``init`` has it (weights and batch-norm statistics): the cached
    #: features, and the click refiner and follower that read them, stay valid.
    freeze_encoder: bool = False
    #: Train the per-task fit only: its scalars and the head's input columns that read its
    #: response and the filter responses. Everything else stays bit for bit as ``init`` has it
    #: (the encoder, and the head's weights for the pooled vectors and the local prior), so
    #: the fit is learnt on top of a head that keeps its behaviour with a few clicks.
    fit_only: bool = False
    #: A wall-clock budget for this invocation: the learning rate decays over whichever of
    #: ``steps`` and ``minutes`` runs out first, and training stops there (a GPU burst of fixed
    #: length). ``None``: steps only.
    minutes: float | None = None


@dataclass(frozen=True)
class TrainProgress:
    """One logged step."""

    step: int
    loss: float
    seconds: float
    val_iou: float | None = None


def episode_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Compute the training loss: class-balanced binary cross-entropy plus soft Dice.

    Each class of each episode weighs half in the cross-entropy, so a small object is not
    drowned by its background.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, H, W)`` query logits.
    target : torch.Tensor
        ``(B, H, W)`` query masks, 1 foreground, 0 background (float).

    Returns
    -------
    torch.Tensor
        Scalar loss, differentiable with respect to ``logits``.
    """
    pos = target.mean(dim=(1, 2), keepdim=True).clamp(0.01, 0.99)
    weight = torch.where(target > 0.5, 0.5 / pos, 0.5 / (1 - pos))
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1)
    return bce + dice.mean()


def _collate(eps: list[Episode]) -> tuple[torch.Tensor, ...]:
    """Stack episodes into ``(support, masks, query, target, aligned)`` batch tensors."""
    return (
        torch.from_numpy(np.stack([e.support for e in eps])),
        torch.from_numpy(np.stack([e.masks for e in eps])),
        torch.from_numpy(np.stack([e.query for e in eps])),
        torch.from_numpy(np.stack([e.target for e in eps])),
        torch.tensor([e.aligned for e in eps], dtype=torch.float32),
    )


class _Mixed(torch.utils.data.IterableDataset):
    """Synthetic and real episodes mixed, batched in the worker."""

    def __init__(self, cfg: TrainConfig, seed: int, split: str = "train") -> None:
        self.cfg, self.seed, self.split = cfg, seed, split

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = torch.utils.data.get_worker_info()
        seed = self.seed + (info.id if info else 0) * 7919
        ecfg = _episode_config(self.cfg, p_instance=self.cfg.p_instance)
        synth = SyntheticEpisodes(ecfg, seed)
        real = None
        if self.cfg.data:
            stacks = load_labelled_stacks(self.cfg.data, self.cfg.datasets or None, self.split)
            real = StackEpisodes(stacks, ecfg, seed + 1)
        rng = np.random.default_rng(seed + 2)
        while True:
            eps = [
                next(real) if real is not None and rng.random() < self.cfg.p_real else next(synth)
                for _ in range(self.cfg.batch)
            ]
            yield _collate(eps)


def _episode_config(cfg: TrainConfig, **overrides: float) -> EpisodeConfig:
    """Return the episodes a run draws: its crop, its shares of inverted and colour-mixed ones."""
    return EpisodeConfig(crop=cfg.crop, p_invert=cfg.p_invert, p_colour=cfg.p_colour, **overrides)


def _validation_set(cfg: TrainConfig) -> list[tuple[torch.Tensor, ...]]:
    """Draw fixed, seeded validation batches: synthetic, and the held-out split of real data."""
    synth = SyntheticEpisodes(_episode_config(cfg), seed=10_000 + cfg.seed)
    n = max(1, cfg.val_episodes // 8)
    batches = [_collate([next(synth) for _ in range(8)]) for _ in range(n)]
    if cfg.data:
        stacks = load_labelled_stacks(cfg.data, cfg.datasets or None, "val")
        real = StackEpisodes(stacks, _episode_config(cfg), seed=20_000 + cfg.seed)
        batches += [_collate([next(real) for _ in range(8)]) for _ in range(n)]
    return batches


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, ...]],
    device: torch.device,
    guidance: bool = True,
) -> float:
    """Score a model on validation batches: the mean foreground IoU of their episodes.

    Parameters
    ----------
    model : torch.nn.Module
        A :class:`~napari_revolver.core.model.guided_net.GuidedNet`; each of its modules is
        left in the mode it had.
    batches : list of tuple of torch.Tensor
        ``(support (B, C, H, W), masks (B, 2, H/4, W/4), query (B, C, H, W), target (B, H, W),
        aligned (B,))`` batches, as from the validation set of :func:`train`.
    device : torch.device
        Where the model runs.
    guidance : bool
        ``False`` withholds the annotations (masks and alignment zeroed), as for the
        foreground-background baseline.

    Returns
    -------
    float
        The mean over episodes of :func:`~napari_revolver.core.evaluate.foreground_iou`
        between the predicted mask (logit > 0, probability > 0.5) and ``target > 0.5``.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    ious = []
    for s, m, q, t, a in batches:
        if not guidance:
            m, a = torch.zeros_like(m), torch.zeros_like(a)
        pred = (model(s.to(device), m.to(device), q.to(device), a.to(device)) > 0).cpu().numpy()
        truth = (t > 0.5).numpy()
        ious.extend(foreground_iou(p, g) for p, g in zip(pred, truth, strict=True))
    for module, mode in modes.items():
        module.train(mode)
    return float(np.mean(ious))


def warm_start(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Copy a checkpoint's parameters into ``model``, widening input channels with zeros.

    Parameters
    ----------
    model : torch.nn.Module
        An untrained model of the same family.
    path : path
        A ``.safetensors`` checkpoint.

    Returns
    -------
    list of str
        Names of the parameters that were widened, then those the checkpoint lacks and that
        keep their initial values (the wide-context blocks, which start as identities).

    Raises
    ------
    ValueError
        If the checkpoint has a parameter the model lacks, lacks one outside the blocks that
        start as identities, or one differs in more than its input channels.
    """
    from safetensors.torch import load_file

    old = load_file(str(path))
    new = model.state_dict()
    unexpected = sorted(set(old) - set(new))
    added = sorted(set(new) - set(old))
    # Blocks that start as identities and the per-task fit's two scalars may be new.
    not_identity = [k for k in added if ".context." not in k and ".fit." not in k]
    if unexpected or not_identity:
        raise ValueError(
            f"{path} does not match the model: missing {not_identity[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    widened = []
    for name, value in old.items():
        target = new[name]
        if value.shape == target.shape:
            new[name] = value
            continue
        same_but_inputs = (
            value.ndim == target.ndim >= 2
            and value.shape[0] == target.shape[0]
            and value.shape[2:] == target.shape[2:]
            and value.shape[1] < target.shape[1]
        )
        if not same_but_inputs:
            raise ValueError(
                f"{path}: parameter {name} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(target.shape)}; only extra input channels can be added"
            )
        grown = torch.zeros_like(target)
        grown[:, : value.shape[1]] = value
        new[name] = grown
        widened.append(name)
    model.load_state_dict(new)
    return widened + added


#: Learning-rate factor of the task fit's scalars (strength, floor, gain): single numbers that
#: steer a whole pathway move too slowly at the rate of the convolutions.
FIT_LR_SCALE = 10.0


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; the task fit's scalars get ``FIT_LR_SCALE`` times the rate and no decay."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fit = [p for n, p in trained if ".fit." in n]
    rest = [p for n, p in trained if ".fit." not in n]
    # With fit_only the rest is the fusions' weights, trained in part: decay would move the
    # frozen columns too.
    groups: list[dict] = [
        {"params": rest, "lr_scale": 1.0, "weight_decay": 0.0 if cfg.fit_only else cfg.weight_decay}
    ]
    if fit:
        groups.append({"params": fit, "lr_scale": FIT_LR_SCALE, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


#: Steps of linear learning-rate warm-up before the cosine decay.
_WARMUP = 300


def _lr_at(cfg: TrainConfig, step: int, elapsed_s: float = 0.0) -> float:
    """Return the learning rate of ``step``: linear warm-up, then cosine decay to 0.

    With a time budget (``cfg.minutes``) the decay follows whichever of the steps and the
    budget is further spent (``elapsed_s`` seconds of this invocation).
    """
    if step < _WARMUP:
        return cfg.lr * (step + 1) / _WARMUP
    progress = min(1.0, (step - _WARMUP) / max(1, cfg.steps - _WARMUP))
    if cfg.minutes is not None:
        progress = max(progress, min(1.0, elapsed_s / max(60.0 * cfg.minutes, 1e-9)))
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _prepare_run(cfg: TrainConfig) -> tuple[Path, torch.device]:
    """Create the run folder, write ``config.json``, set threads; return folder and device."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return out, resolve_device(cfg.device)


def _initial_model(cfg: TrainConfig, ckpt: Path, device: torch.device) -> torch.nn.Module:
    """Build the model, warm-started from ``cfg.init`` unless a checkpoint will be resumed."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if cfg.init and not ckpt.exists():
        widened = warm_start(model, cfg.init)
        logger.info("started from %s (widened: %s)", cfg.init, ", ".join(widened) or "none")
    if cfg.freeze_encoder or cfg.fit_only:
        if not cfg.init:
            what = (
                "fit_only keeps the network" if cfg.fit_only else "freeze_encoder keeps the encoder"
            )
            raise ValueError(f"{what} of init; give init weights")
        model.encoder.requires_grad_(False)
    if cfg.fit_only:
        _train_fit_only(model)
    return model.to(device)


def _train_fit_only(model: torch.nn.Module) -> None:
    """Leave only the per-task fit trainable (see ``TrainConfig.fit_only``).

    The fit's scalars train whole; each fusion trains only its last input columns, those that
    read the fit (``Segmentor.fit_columns``): a gradient hook zeroes the others, and the
    optimiser gives them no weight decay (``_optimizer``), which would move the frozen columns.
    """
    seg = model.segmentor
    columns = seg.fit_columns()
    if not columns:
        raise ValueError(
            f"fit_only needs a model with the per-task fit; {type(seg).__name__} has none"
        )
    model.requires_grad_(False)
    seg.fit.requires_grad_(True)
    for name, n in columns.items():
        weight = getattr(seg, name).weight
        mask = torch.zeros_like(weight)
        mask[:, -n:] = 1.0
        weight.requires_grad_(True)
        weight.register_hook(lambda g, mask=mask: g * mask)


def _train_mode(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Put ``model`` in training mode; a frozen encoder stays in eval mode (its statistics)."""
    model.train()
    if cfg.freeze_encoder or cfg.fit_only:
        model.encoder.eval()


def _resume(
    ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device
) -> tuple[int, float]:
    """Load ``ckpt`` into ``model`` and ``opt`` if it exists; return (step, best val IoU)."""
    if not ckpt.exists():
        return 0, -1.0
    # Our own checkpoint, still never unpickled as code.
    state = torch.load(ckpt, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    step, best = int(state["step"]), float(state["best"])
    logger.info("resumed %s at step %d (best val IoU %.3f)", ckpt, step, best)
    return step, best


def _save_checkpoint(
    ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, best: float
) -> None:
    """Write the resumable state atomically: a run killed mid-write keeps its last checkpoint."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "best": best}
    atomic_write(ckpt, lambda fh: torch.save(state, fh), overwrite=True)


def _train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, ...],
    cfg: TrainConfig,
    step: int,
    device: torch.device,
    elapsed_s: float = 0.0,
) -> float:
    """Take one optimiser step on ``batch`` at the learning rate of ``step``; return the loss."""
    s, m, q, t, a = (x.to(device, non_blocking=True) for x in batch)
    if not cfg.guidance:
        m, a = torch.zeros_like(m), torch.zeros_like(a)
    for g in opt.param_groups:
        g["lr"] = _lr_at(cfg, step, elapsed_s) * g.get("lr_scale", 1.0)
    loss = episode_loss(model(s, m, q, a), t)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    return float(loss.detach())


def _training_batches(cfg: TrainConfig, step: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Return an endless iterator of training batches, seeded by the step a run starts at."""
    loader = torch.utils.data.DataLoader(
        _Mixed(cfg, cfg.seed * 1000 + step),
        batch_size=None,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers else None,
    )
    return iter(loader)


def train(cfg: TrainConfig, *, on_progress: Callable[[TrainProgress], None] | None = None) -> Path:
    """Run (or resume) episodic training.

    Parameters
    ----------
    cfg : TrainConfig
        Run configuration; ``cfg.out`` holds ``config.json``, ``checkpoint.pt``, ``log.jsonl``
        and ``best.safetensors``.
    on_progress : callable, optional
        Called with a :class:`TrainProgress` at every logged step.

    Returns
    -------
    Path
        The exported best weights.
    """
    out, device = _prepare_run(cfg)
    ckpt = out / "checkpoint.pt"
    best_path = out / "best.safetensors"
    model = _initial_model(cfg, ckpt, device)
    opt = _optimizer(model, cfg)
    step, best = _resume(ckpt, model, opt, device)
    val = _validation_set(cfg)
    it = _training_batches(cfg, step)
    _train_mode(model, cfg)
    t0 = time.perf_counter()
    budget_s = 60.0 * cfg.minutes if cfg.minutes is not None else math.inf
    running: float | None = None
    with (out / "log.jsonl").open("a") as log:
        if step == 0 and cfg.init:
            # The warm start's own score: the bar a run must clear to write best weights.
            best = evaluate(model, val, device, cfg.guidance)
            _log_progress(log, TrainProgress(0, math.nan, 0.0, best), on_progress)
        while step < cfg.steps:
            elapsed = time.perf_counter() - t0
            last = elapsed >= budget_s
            lv = _train_step(model, opt, next(it), cfg, step, device, elapsed)
            step += 1
            last = last or step == cfg.steps
            running = lv if running is None else 0.98 * running + 0.02 * lv
            val_iou = None
            if step % cfg.val_every == 0 or last:
                val_iou = evaluate(model, val, device, cfg.guidance)
                if val_iou > best:
                    best = val_iou
                    extra = {"step": str(step), "val_iou": f"{val_iou:.4f}"}
                    save_weights(model, best_path, extra=extra)
            if step % 20 == 0 or val_iou is not None:
                rec = TrainProgress(step, running, time.perf_counter() - t0, val_iou)
                _log_progress(log, rec, on_progress)
            if step % cfg.checkpoint_every == 0 or last:
                _save_checkpoint(ckpt, model, opt, step, best)
            if last:
                break
    if not best_path.exists():
        save_weights(model, best_path, extra={"step": str(step)})
    return best_path


def _log_progress(
    log: IO[str], rec: TrainProgress, on_progress: Callable[[TrainProgress], None] | None
) -> None:
    """Append ``rec`` to the run's ``log.jsonl``, log it and pass it to ``on_progress``."""
    log.write(json.dumps(asdict(rec)) + "\n")
    log.flush()
    logger.info(
        "step %d loss %.4f%s",
        rec.step,
        rec.loss,
        f" val IoU {rec.val_iou:.3f}" if rec.val_iou is not None else "",
    )
    if on_progress:
        on_progress(rec)
