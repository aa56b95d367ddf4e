"""``revolver``: the command line on the core library (no napari, no Qt).

Subcommands: ``sample``, ``segment``, ``precompute``, ``train``, ``compare``, ``eval``,
``info``. Errors print one line ``revolver: error: ...`` and exit with status 1 (2 for usage
errors, 130 when interrupted); nothing is half-written.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

logger = logging.getLogger("napari_revolver")


class Progress:
    """A tqdm progress bar on stderr, fed ``(done, total)`` by the core's generators.

    On a terminal it redraws continuously; in a log file it writes a line every few seconds.
    """

    def __init__(self, label: str, unit: str = "slice", stream: TextIO | None = None) -> None:
        self.label, self.unit = label, unit
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None

    def update(self, done: int, total: int) -> None:
        """Show that ``done`` of ``total`` items are finished (closes the bar at the end)."""
        from tqdm import tqdm

        if self._bar is None:
            tty = self.stream.isatty()
            self._bar = tqdm(
                total=total,
                desc=self.label,
                unit=self.unit,
                file=self.stream,
                mininterval=0.1 if tty else 5.0,
                dynamic_ncols=tty,
                leave=True,
            )
        self._bar.total = total
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def write(self, message: str) -> None:
        """Print a line above the bar."""
        from tqdm import tqdm

        tqdm.write(message, file=self.stream)

    def close(self) -> None:
        """Finish the bar's line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


#: The core speaks in parameters; the command line in flags.
_FLAG_WORDS = (
    (re.compile(r"pass overwrite=True"), "pass --overwrite"),
    (re.compile(r"choose one with channel=N"), "choose one with --channel N"),
    (re.compile(r"\bchannel=(\d+) was given"), r"--channel \1 was given"),
    (re.compile(r"open the volume with set_volume\(\.\.\., invert=True\)"), "pass --invert"),
    (re.compile(r"open the volume with set_volume\(\.\.\., invert=False\)"), "leave out --invert"),
    (re.compile(r"with set_volume\(\.\.\., scale=([0-9.e+-]+)\)"), r"with --scale \1"),
    (re.compile(r"scheduler 'local:N'"), "--scheduler local:N"),
    (re.compile(r"\bp_unreliable must"), "--p-unreliable must"),
    (re.compile(r"\bregrow must"), "--regrow must"),
    (re.compile(r"\bmax_corrections must"), "--max-corrections must"),
    (re.compile(r"\bval_clicks must"), "--val-clicks must"),
    (
        re.compile(r"give first_refiner \(train corrections\) or corrector"),
        "give --first-refiner (train corrections) or --corrector",
    ),
)


def _add_refiner_run_args(p: argparse.ArgumentParser, role: str) -> None:
    """``--init`` and ``--threads`` of the refiner training commands (``role``: what they train)."""
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help=f"start from this {role} (.safetensors, trained on --weights) instead of "
        "from scratch: to fine-tune it on your data, or train it longer",
    )
    p.add_argument(
        "--add-dilations",
        type=_dilations,
        default=(),
        metavar="D[,D...]",
        help=f"append residual blocks of these dilations (comma-separated, e.g. 8,16) to the "
        f"{role} trained, each starting as the identity: it sees farther across its window",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads torch may use (default 2)")


def _dilations(text: str) -> tuple[int, ...]:
    """Parse ``--add-dilations``: comma-separated whole numbers of at least 1."""
    try:
        out = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers of at least 1, such as 8,16; got {text!r}"
        )
    return out


def _check_exists(path: Path | None, flag: str) -> None:
    """Refuse a file given on the command line that is not there (``None``: not given)."""
    if path is not None and not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")


def _in_flags(message: str) -> str:
    """Translate the core's parameter names in an error message into this CLI's flags."""
    for pattern, flag in _FLAG_WORDS:
        message = pattern.sub(flag, message)
    return message


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="checkpoint (.safetensors) from `revolver train`; default: shipped weights",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to run the network (default: auto)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="slices per batch (default: 4)")


def _add_invert_arg(p: argparse.ArgumentParser) -> None:
    """``--invert`` and ``--scale``: how slices are read before the network."""
    p.add_argument(
        "--invert",
        action="store_true",
        help="dark objects on a light background (brightfield, H&E): reverse intensities",
    )
    p.add_argument(
        "--scale",
        type=_scale_arg,
        default=1.0,
        help="resize each slice by this factor before the network (default 1): 0.5 for large "
        "objects with textured insides, such as mitochondria in EM at a few nm per pixel "
        "(better, and 2-3x faster); keep 1 for cells outlined by thin membranes; points and "
        "outputs stay in the image's pixels",
    )


def _scale_arg(text: str) -> float:
    from .core.scale import check_scale

    try:
        return check_scale(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "image",
        type=Path,
        help="TIFF stack (ImageJ hyperstack or OME-TIFF axes honoured), or a zarr array or "
        "OME-Zarr image (level 0); read one slice at a time",
    )
    p.add_argument(
        "--channel",
        type=int,
        default=None,
        help="channel to segment in a multichannel image (axis C)",
    )
    p.add_argument(
        "--store",
        type=Path,
        default=None,
        help="on-disk feature store (zarr folder) to reuse across runs",
    )
    _add_invert_arg(p)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``revolver`` argument parser."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="revolver",
        description="Few-shot segmentation propagation for microscopy: a few clicks on one "
        "slice, masks on every slice.",
    )
    parser.add_argument("--version", action="version", version=f"napari-revolver {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="write a synthetic demo stack, its clicks and ground truth")
    p.add_argument("out", type=Path, help="folder for image.tif, points.csv and labels.tif")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing files")

    p = sub.add_parser("segment", help="segment a stack from points clicked on some of its slices")
    _add_image_args(p)
    p.add_argument(
        "--points",
        type=Path,
        required=True,
        help="CSV as napari's Points layer writes it, with a label column "
        "(positive/negative) and an optional task column",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="labels to write: a TIFF, or a zarr array if the name ends in .zarr",
    )
    p.add_argument(
        "--threshold", type=float, default=0.5, help="probability threshold (default 0.5)"
    )
    p.add_argument(
        "--instances",
        action="store_true",
        help="write instance ids (touching objects split) instead of task values, linked "
        "through z and t by overlap",
    )
    p.add_argument(
        "--objects",
        action="store_true",
        help="each task of --points is one object, followed through z and t; its id is its "
        "1-based order of first appearance in the CSV",
    )
    p.add_argument(
        "--painted",
        type=Path,
        default=None,
        help="labels image of IMAGE's shape whose non-zero slices were painted by hand: on "
        "each, a class task's value is its foreground and the rest its background; class "
        "tasks then also learn from those slices (a validated pixel fit), and the painted "
        "slices are written to the output as painted (not with --instances)",
    )
    p.add_argument(
        "--save-task",
        type=Path,
        default=None,
        help="also save the guided task(s) as JSON into this folder",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--local",
        action="store_true",
        help="clicks also act by position on the other slices: follows one object through "
        "z or time (not for a collection of unrelated images)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help="run on Dask: 'local:N' (a local cluster of N worker processes) or a scheduler "
        "address; the output must be a .zarr store, and a killed run resumes",
    )
    p.add_argument("--chunk", type=int, default=8, help="slices per Dask task (default 8)")
    p.add_argument(
        "--apply-to",
        type=Path,
        nargs="+",
        default=[],
        metavar="IMAGE",
        help="more images of the same kind to segment with the tasks guided on IMAGE; "
        "-o is then a folder receiving <name>.labels.tif (or .zarr) for every image",
    )
    _add_model_args(p)

    p = sub.add_parser(
        "precompute", help="encode every slice into an on-disk feature store (resumable)"
    )
    _add_image_args(p)
    _add_model_args(p)

    p = sub.add_parser("train", help="episodic training of the guided network (resumable)")
    p.add_argument(
        "--out", type=Path, required=True, help="run folder (checkpoints, log, best weights)"
    )
    p.add_argument("--model", default="revolver-s", help="architecture key (default revolver-s)")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--crop", type=int, default=160, help="episode crop size, a multiple of 32")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder of labelled data sets (<name>/image.tif + labels.tif); "
        "without it, training uses procedural data only",
    )
    p.add_argument("--datasets", default="", help="comma-separated subset of --data")
    p.add_argument("--p-real", type=float, default=0.5, help="fraction of episodes from --data")
    p.add_argument(
        "--p-instance",
        type=float,
        default=0.4,
        help="share of aligned episodes that follow one object (default 0.4)",
    )
    p.add_argument(
        "--p-invert",
        type=float,
        default=0.4,
        help="share of episodes read intensity-inverted (default 0.4)",
    )
    p.add_argument(
        "--p-colour",
        type=float,
        default=0.25,
        help="share of episodes with a random colour mixing, as stain variation (default 0.25)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--workers", type=int, default=1, help="episode-generating processes")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--val-episodes", type=int, default=48, help="validation episodes per source")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from these weights (.safetensors); inputs they lack start at zero",
    )
    p.add_argument(
        "--no-guidance",
        action="store_true",
        help="withhold the annotations: trains the paper's foreground-background baseline",
    )
    p.add_argument(
        "--freeze-encoder",
        action="store_true",
        help="keep the encoder of --init as it is, so cached features and the object "
        "refiners trained on it stay valid",
    )
    p.add_argument(
        "--fit-only",
        action="store_true",
        help="train only the per-task fit (its scalars and the head's inputs that read it) "
        "on top of --init, whose encoder and head stay as they are",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="stop after this many minutes; the learning rate decays over whichever of "
        "--steps and --minutes runs out first",
    )

    p = sub.add_parser(
        "train-clicks",
        help="train the click refiner of object tasks on frozen weights (resumable)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="run folder (checkpoints, log, best refiner)"
    )
    p.add_argument(
        "--weights", type=Path, default=None, help="the guided network (default: shipped)"
    )
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder of labelled data sets (instance ids, or classes split into components); "
        "without it, procedural objects only",
    )
    p.add_argument("--datasets", default="", help="comma-separated subset of --data")
    p.add_argument(
        "--val-datasets",
        default=None,
        help="data sets whose validation split chooses the best step (default --datasets)",
    )
    p.add_argument("--synthetic", type=int, default=96, help="procedural training slices")
    p.add_argument(
        "--max-corrections",
        type=int,
        default=8,
        help="most corrective clicks simulated (0: first clicks only)",
    )
    p.add_argument(
        "--p-unreliable",
        type=float,
        default=0.0,
        help="share of episodes whose class probability is spoiled (broken up or leaking), "
        "so the refiner learns to find the object in the image (default 0)",
    )
    p.add_argument(
        "--regrow",
        type=int,
        default=None,
        help="times a mask that reaches its window's edge is redrawn in the window around it, "
        "in training and by the refiner trained (default: the --init refiner's, else 0)",
    )
    p.add_argument(
        "--previous-mask",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="at corrections the refiner reads the mask after the previous click instead of "
        "the selection, and learns to correct its own mask (default: the --init refiner's, "
        "else no)",
    )
    p.add_argument(
        "--first-refiner",
        type=Path,
        default=None,
        help="a click refiner file that draws each episode's first click: the refiner "
        "trained learns corrections only (ship it as <weights stem>-corrections.safetensors)",
    )
    p.add_argument(
        "--corrector",
        type=Path,
        default=None,
        help="a click refiner file that draws the validation's corrections: the refiner "
        "trained learns first clicks only (episodes of one click)",
    )
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--val-objects", type=int, default=32)
    p.add_argument(
        "--val-clicks",
        type=int,
        default=5,
        help="clicks per validation object (default 5: IoU after 1, 3, 5 clicks choose the "
        "best step; more adds IoU after 10 and after all, for a refiner of corrections)",
    )
    p.add_argument("--seed", type=int, default=0)
    _add_refiner_run_args(p, "click refiner")

    p = sub.add_parser(
        "train-follow",
        help="train the follower of object tasks through z and t on frozen weights (resumable)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="run folder (checkpoints, log, best follower)"
    )
    p.add_argument(
        "--weights", type=Path, default=None, help="the guided network (default: shipped)"
    )
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32, help="object steps per training step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder of labelled data sets; z-stacks with instance ids are used (training "
        "split; the validation split chooses the best step); without it, procedural stacks only",
    )
    p.add_argument("--datasets", default="", help="comma-separated subset of --data")
    p.add_argument("--synthetic", type=int, default=48, help="procedural training stacks")
    p.add_argument(
        "--far-ends",
        type=int,
        default=0,
        help="per object, farther slices where it is gone as samples, beside its real ends",
    )
    p.add_argument(
        "--rollout",
        type=int,
        default=0,
        help="in half the samples, the follower itself carries the object up to this many "
        "slices before the step (it learns to repair its own errors); 0: never",
    )
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    _add_refiner_run_args(p, "follower")

    p = sub.add_parser("compare", help="score a segmentation against ground-truth labels")
    p.add_argument("prediction", type=Path, help="label TIFF to score")
    p.add_argument("truth", type=Path, help="ground-truth label TIFF of the same shape")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser(
        "eval",
        help="few-shot evaluation on a labelled stack: IoU vs. clicks per class (and baselines)",
    )
    p.add_argument("image", type=Path, help="TIFF stack (N, Y, X) or RGB (N, Y, X, 3)")
    p.add_argument("labels", type=Path, help="ground-truth label TIFF (N, Y, X)")
    p.add_argument(
        "--support", type=int, default=0, help="support slice; every other is a query (default 0)"
    )
    p.add_argument(
        "--support-slices",
        default=None,
        metavar="K1,K2,...",
        help="several support slices (multi-shot); overrides --support",
    )
    p.add_argument(
        "--points",
        default="1,5,20,dense",
        help="points per class per support slice, comma-separated; 'dense' guides with the "
        "whole support mask (default: 1,5,20,dense)",
    )
    p.add_argument("--seeds", type=int, default=3, help="random draws of the points (default 3)")
    p.add_argument(
        "--label-value",
        type=int,
        default=None,
        help="foreground is labels == V (default: labels > 0)",
    )
    p.add_argument(
        "--baseline",
        action="append",
        choices=["rf", "dense"],
        default=None,
        help="add a baseline (repeatable): rf = random-forest pixel classifier on the same "
        "points (needs napari-revolver[bench]); dense = the network guided by the whole mask",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="the clicks also act by position on the query slices (for z-stacks and "
        "time-lapses; see `revolver segment --local`)",
    )
    p.add_argument(
        "--objects",
        action="store_true",
        help="object clicks with the simulated annotator (first click at the object's centre, "
        "then at the largest error); LABELS are instance ids",
    )
    p.add_argument(
        "--no-pixel-fit",
        action="store_true",
        help="score the network alone: class tasks do not decide on a pixel fit of their clicks "
        "or support masks (which the segment command and the plugin do)",
    )
    p.add_argument("--objects-per-slice", type=int, default=10, help="with --objects (default 10)")
    p.add_argument(
        "--max-clicks", type=int, default=20, help="with --objects: click budget (default 20)"
    )
    p.add_argument(
        "--follow",
        type=int,
        default=0,
        metavar="K",
        help="with --objects: also click K objects once on the --support slice, follow them "
        "through the stack and score each in 3D",
    )
    p.add_argument(
        "--components",
        action="store_true",
        help="with --objects: objects are the connected components of the foreground "
        "(2D for clicks, 3D for --follow) instead of the label ids",
    )
    _add_invert_arg(p)
    p.add_argument("--json", action="store_true", help='print one JSON object {"results": [...]}')
    _add_model_args(p)

    p = sub.add_parser("info", help="show the model, weights and available devices")
    p.add_argument("--weights", type=Path, default=None)
    return parser


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from .core.io import PointTable, write_labels, write_points
    from .core.synthetic import sample_stack

    out: Path = args.out
    targets = [out / "image.tif", out / "points.csv", out / "labels.tif"]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass --overwrite to replace")
    out.mkdir(parents=True, exist_ok=True)
    image, labels, points, point_labels = sample_stack(seed=args.seed)
    import tifffile

    from .core.atomic import atomic_write

    atomic_write(
        targets[0],
        lambda fh: tifffile.imwrite(
            fh, image, imagej=True, metadata={"axes": "ZYX"}, compression="zlib"
        ),
        overwrite=True,
    )
    write_points(
        targets[1], PointTable(points, point_labels, ("nuclei",) * len(points)), overwrite=True
    )
    write_labels(targets[2], labels, axes="ZYX", overwrite=True)
    print(
        f"wrote {targets[0]} {image.shape} {image.dtype}, {targets[1]} "
        f"({int(np.sum(point_labels == 1))} positive, {int(np.sum(point_labels == 0))} negative "
        f"points on slice {int(points[0, 0])}) and {targets[2]} (ground truth)"
    )
    return 0


def _open_image(args: argparse.Namespace, predictor):
    from .core.io import open_volume

    src = open_volume(args.image, args.channel, invert=args.invert, scale=args.scale)
    predictor.set_volume(src.data, src.spec, store=args.store)
    return src.axes, src.scale


def _predictor(args: argparse.Namespace):
    from .core.predictor import RevolverPredictor

    predictor = RevolverPredictor(args.weights, args.device, batch_size=args.batch_size)
    if getattr(args, "local", False) and not predictor.model.config.local_prior:
        logger.warning(
            "--local has no effect: weights %s predate the local prior (they do not see where "
            "the clicks are); retrain or use the shipped weights",
            predictor.weights.path,
        )
    return predictor


def _cmd_segment(args: argparse.Namespace) -> int:
    from .core.io import read_points

    many = bool(args.apply_to)
    _check_segment_paths(args, many)
    table = read_points(args.points)
    predictor = _predictor(args)
    axes, scale = _open_image(args, predictor)
    tasks = _guide_tasks(predictor, table, "object" if args.objects else "class")
    painted = _read_painted(predictor, args.painted) if args.painted else None
    if painted is not None:
        tasks = _with_painted(predictor, tasks, painted)
    logger.info("guided %d task(s): %s", len(tasks), ", ".join(t.name for t in tasks))
    if args.save_task:
        args.save_task.mkdir(parents=True, exist_ok=True)
        for t in tasks:
            t.save(args.save_task / f"{t.name}.json", overwrite=args.overwrite)

    suffix = ".zarr" if args.scheduler else ".tif"
    images = [args.image, *args.apply_to]
    outputs = (
        [args.output / f"{_stem(i)}.labels{suffix}" for i in images] if many else [args.output]
    )
    client = cluster = None
    if args.scheduler and many:
        from .core.batch import open_client

        client, cluster = open_client(args.scheduler)
    try:
        for k, (image, output) in enumerate(zip(images, outputs, strict=True)):
            if k:
                args.image = image
                axes, scale = _open_image(args, predictor)
            if many and output.exists() and not args.overwrite and not args.scheduler:
                raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
            # Painted slices are the user's truth, written as painted in their own image's
            # output (not with --instances: ids are linked between predicted slices).
            kept = painted if k == 0 and not args.instances else None
            _segment_one(args, predictor, tasks, output, axes, scale, client, kept)
    finally:
        if client is not None:
            client.close()
            if cluster is not None:
                cluster.close()
    return 0


def _segment_one(args, predictor, tasks, output, axes, scale, client, painted=None) -> None:
    """Segment the current image into ``output``: on Dask, as objects, or slice by slice.

    ``painted``: labels whose non-zero slices are written as they are.
    """
    if args.scheduler:
        _segment_distributed(args, predictor, tasks, output, client, painted)
        return
    if args.objects:
        pages, dtype, summary = _followed_pages(args, predictor, tasks)
    else:
        pages, dtype, summary = _propagated_pages(args, predictor, tasks, painted)
    info = predictor.info
    shape = (*info.leading_shape, *info.slice_shape)
    _write_pages(args, output, pages, shape, dtype, axes, scale)
    print(f"wrote {output} {shape} ({summary()})")


def _check_segment_paths(args: argparse.Namespace, many: bool) -> None:
    """Refuse outputs that exist (without --overwrite) and inputs that do not, before any work."""
    if args.objects and (args.instances or args.scheduler or many):
        raise ValueError(
            "--objects follows objects in one image; leave out --instances, "
            "--scheduler and --apply-to"
        )
    if many:
        args.output.mkdir(parents=True, exist_ok=True)
    elif args.output.exists() and not args.overwrite and not args.scheduler:
        # A distributed run resumes its own store; run_batch checks whose store it is.
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    if not args.output.parent.exists():
        raise FileNotFoundError(f"output folder {args.output.parent} does not exist")
    for extra in args.apply_to:
        if not extra.exists():
            raise FileNotFoundError(f"image file not found: {extra}")


def _read_painted(predictor, path: Path):
    """Read and check ``--painted``: labels of the image's shape, non-negative, not all zero."""
    import numpy as np
    import tifffile

    info = predictor.info
    painted = np.asarray(tifffile.imread(path))
    expected = (*info.leading_shape, *info.slice_shape)
    if painted.shape != expected:
        raise ValueError(
            f"--painted {path} has shape {painted.shape}; expected the image's labels shape "
            f"{expected}"
        )
    if painted.min() < 0:
        raise ValueError(f"--painted {path} has negative labels; expected labels >= 0")
    if not painted.any():
        raise ValueError(f"--painted {path} is all zero: paint at least one slice")
    return painted


def _with_painted(predictor, tasks: list, painted) -> list:
    """Guide class tasks again with the slices painted by hand (and their clicks)."""
    import numpy as np

    info = predictor.info
    flat = painted.reshape(-1, *info.slice_shape)
    slices = [info.unflat(k) for k in range(len(flat)) if flat[k].any()]
    if any(t.kind != "class" for t in tasks):
        raise ValueError("--painted teaches class tasks; leave out --objects")
    out = []
    for t in tasks:
        labels = {k: np.where(painted[k] == t.label_value, 1, 2).astype(np.uint8) for k in slices}
        task = predictor.guide_labels(
            labels,
            points=t.points if len(t.points) else None,
            point_labels=t.labels,
            name=t.name,
            label_value=t.label_value,
        )
        _log_fit(task, f"{len(slices)} painted slice(s)")
        out.append(task)
    return out


def _log_fit(task, source: str) -> None:
    """Say whether a class task's pixel fit (:mod:`.core.pixel_fit`) replaces the network."""
    fit = task.pixel_fit
    logger.info(
        "task %r learns from %s; pixel fit %s",
        task.name,
        source,
        "used" if fit is not None and fit.active else "not used",
    )


def _guide_tasks(predictor, table, kind: str = "class") -> list:
    """One task per distinct value of the points table's task column, valued 1, 2, ...

    Class tasks let their clicks decide whether a per-task pixel fit replaces the network
    (``RevolverPredictor.guide(fit=True)``).
    """
    names = table.task_names()
    tasks = []
    for value, name in enumerate(names, start=1):
        sub = table.select(name) if len(names) > 1 else table
        try:
            task = predictor.guide(
                sub.points,
                sub.labels,
                name=name or "task",
                label_value=value,
                kind=kind,
                fit=kind == "class",
            )
        except ValueError as exc:
            raise ValueError(f"task {name!r}: {exc}" if name else str(exc)) from exc
        if kind == "class":
            _log_fit(task, f"{len(sub.labels)} click(s)")
        tasks.append(task)
    return tasks


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _propagated_pages(args: argparse.Namespace, predictor, tasks, painted=None) -> tuple:
    """Pages streamed from the network (memory stays at one slice), their dtype, a summary.

    The non-zero slices of ``painted`` (labels of the image's shape) are written as they are.
    """
    import numpy as np

    from .core.labels import label_dtype

    info = predictor.info
    bar = Progress(f"segment {_stem(args.image)}")
    counts = {"fg": 0, "objects": 0}
    top = max(t.label_value for t in tasks)
    if painted is not None:
        top = max(top, int(painted.max()))
    dtype = np.uint32 if args.instances else label_dtype(top)

    def pages() -> Iterator[np.ndarray]:
        # Instance ids come linked through z and t from propagate.
        for step in predictor.propagate(
            tasks, threshold=args.threshold, cache=False, local=args.local, instances=args.instances
        ):
            page = step.result
            if painted is not None and painted[step.index].any():
                page = painted[step.index]  # painted by hand: the user's truth is kept
            if args.instances:
                counts["objects"] = max(counts["objects"], int(page.max(initial=0)))
            counts["fg"] += int((page > 0).sum())
            bar.update(step.done, step.total)
            yield page

    def summary() -> str:
        fg = counts["fg"] / float(info.n_slices * np.prod(info.slice_shape))
        extra = f", {counts['objects']} objects" if args.instances else ""
        if predictor.spec.scale != 1:
            h, w = predictor.work_info.slice_shape
            extra += f"; slices read at scale {predictor.spec.scale:g} ({h} x {w})"
        return f"{fg:.1%} foreground, {len(tasks)} task(s){extra}"

    return pages(), dtype, summary


def _write_pages(
    args: argparse.Namespace,
    output: Path,
    pages: Iterator,
    shape: tuple[int, ...],
    dtype,
    axes: str | None,
    scale: tuple[float, ...] | None,
) -> None:
    """Stream label pages into a TIFF (with the image's axes and scale) or a zarr array."""
    from .core.io import write_label_pages, write_label_zarr

    if output.suffix == ".zarr":
        write_label_zarr(output, pages, shape, dtype, overwrite=args.overwrite)
        return
    if axes is not None and len(axes) != len(shape):
        axes = None
    write_label_pages(
        output,
        pages,
        shape,
        dtype,
        axes=axes,
        scale=scale if axes else None,
        overwrite=args.overwrite,
    )


def _followed_pages(args: argparse.Namespace, predictor, tasks) -> tuple:
    """Follow each object task through the stack; its label_value is its id in the pages."""
    import numpy as np

    from .core.labels import label_dtype

    info = predictor.info
    for t in tasks:
        print(f"object {t.label_value}: task {t.name!r}")
    # Objects are followed outward from their clicks, so slices finish out of order.
    out = np.zeros(
        (*info.leading_shape, *info.slice_shape), label_dtype(max(t.label_value for t in tasks))
    )
    bar = Progress(f"follow {_stem(args.image)}")
    for step in predictor.propagate(tasks, threshold=args.threshold):
        out[step.index] = step.result
        bar.update(step.done, step.total)
        for e in step.events:
            bar.write(f"object {e.label_value} ({e.task!r}) ends at slice {e.index}: {e.reason}")
    present = sorted(int(v) for v in np.unique(out) if v)
    pages = (out[info.unflat(k)] for k in range(info.n_slices))
    return pages, out.dtype, lambda: f"{len(present)} of {len(tasks)} object(s) found"


def _segment_distributed(
    args: argparse.Namespace,
    predictor,
    tasks,
    output: Path,
    client=None,
    painted=None,
) -> None:
    """Segment on Dask into the zarr store ``output``; then write the ``painted`` slices."""
    import numpy as np

    from .core.batch import BatchJob, run_batch
    from .core.labels import label_dtype

    if output.suffix != ".zarr":
        raise ValueError(
            f"--scheduler writes a resumable zarr store; name the output *.zarr, not {output.name}"
        )
    if args.instances:
        raise ValueError("--instances is not available with --scheduler yet; run without it")
    top = max(t.label_value for t in tasks)
    if painted is not None and int(painted.max()) > np.iinfo(label_dtype(top)).max:
        raise ValueError(
            f"--painted holds label {int(painted.max())}; the store of these tasks holds labels "
            f"up to {np.iinfo(label_dtype(top)).max} (their largest value is {top})"
        )
    job = BatchJob(
        str(args.image),
        str(output),
        tuple(tasks),
        str(args.weights) if args.weights else None,
        args.channel,
        args.threshold,
        args.chunk,
        args.batch_size,
        args.local,
        args.invert,
        args.scale,
    )
    bar = Progress(f"segment {_stem(args.image)}")
    device = "cpu" if predictor.device.type == "cpu" else str(predictor.device)
    out = run_batch(
        job,
        args.scheduler,
        device=device,
        overwrite=args.overwrite,
        progress=bar.update,
        client=client,
        predictor=predictor,
    )
    shape = predictor.info.leading_shape + predictor.info.slice_shape
    if painted is not None:
        _write_painted(out, painted)
    print(f"wrote {out}/labels {shape} ({len(tasks)} task(s), {args.scheduler})")


def _write_painted(store: Path, painted) -> None:
    """Write the non-zero slices of ``painted`` into a finished store's labels, as painted."""
    import numpy as np
    import zarr

    labels = zarr.open_group(str(store), mode="r+")["labels"]
    lead = painted.shape[:-2]
    flat = painted.reshape(-1, *painted.shape[-2:])
    for k in np.flatnonzero(flat.reshape(len(flat), -1).any(axis=1)):
        labels[np.unravel_index(int(k), lead)] = flat[k].astype(labels.dtype)


def _cmd_precompute(args: argparse.Namespace) -> int:
    if args.store is None:
        raise ValueError("precompute needs --store DIR (the zarr feature store to fill)")
    predictor = _predictor(args)
    _open_image(args, predictor)
    bar = Progress("precompute")
    for done, total in predictor.precompute():
        bar.update(done, total)
    print(f"feature store {args.store} holds all {predictor.info.n_slices} slices")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .core.device import resolve_device
    from .core.train import TrainConfig, train

    if args.crop % 32:
        raise ValueError(f"--crop must be a multiple of 32; got {args.crop}")
    for name in ("p_real", "p_instance", "p_invert", "p_colour"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} is a share, between 0 and 1; got {getattr(args, name)}")
    device = str(resolve_device(args.device))
    cfg = TrainConfig(
        out=str(args.out),
        model=args.model,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        crop=args.crop,
        data=str(args.data) if args.data else None,
        datasets=[d for d in args.datasets.split(",") if d],
        p_real=args.p_real,
        seed=args.seed,
        device=device,
        workers=args.workers,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        val_episodes=args.val_episodes,
        init=str(args.init) if args.init else None,
        guidance=not args.no_guidance,
        p_instance=args.p_instance,
        p_invert=args.p_invert,
        p_colour=args.p_colour,
        freeze_encoder=args.freeze_encoder,
        fit_only=args.fit_only,
        minutes=args.minutes,
    )
    _check_exists(args.init, "--init")
    bar = Progress("train", unit="step")

    def show(p) -> None:
        bar.update(p.step, cfg.steps)
        if p.val_iou is not None:
            bar.write(f"step {p.step}: loss {p.loss:.4f}, validation IoU {p.val_iou:.3f}")

    best = train(cfg, on_progress=show)
    print(f"best weights: {best}")
    return 0


def _cmd_train_clicks(args: argparse.Namespace) -> int:
    from .core.click_training import ClickTrainConfig, train_refiner

    _check_exists(args.weights, "--weights")
    _check_exists(args.init, "--init")
    _check_exists(args.first_refiner, "--first-refiner")
    _check_exists(args.corrector, "--corrector")
    cfg = ClickTrainConfig(
        out=str(args.out),
        weights=str(args.weights) if args.weights else None,
        data=str(args.data) if args.data else None,
        datasets=[d for d in args.datasets.split(",") if d],
        val_datasets=None
        if args.val_datasets is None
        else [d for d in args.val_datasets.split(",") if d],
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        synthetic=args.synthetic,
        max_corrections=args.max_corrections,
        p_unreliable=args.p_unreliable,
        regrow=args.regrow,
        previous_mask=args.previous_mask,
        first_refiner=str(args.first_refiner) if args.first_refiner else None,
        corrector=str(args.corrector) if args.corrector else None,
        seed=args.seed,
        val_every=args.val_every,
        val_objects=args.val_objects,
        val_clicks=args.val_clicks,
        init=str(args.init) if args.init else None,
        add_dilations=args.add_dilations,
        threads=args.threads,
    )
    bar = Progress("train clicks", unit="step")

    def show(rec: dict) -> None:
        bar.update(rec["step"], cfg.steps)
        if "val" in rec:
            v = rec["val"]
            ks = sorted(int(k.split("@")[1]) for k in v)
            bar.write(
                f"step {rec['step']}: loss {rec['loss']:.4f}, validation IoU after "
                f"{'/'.join(map(str, ks))} clicks " + " / ".join(f"{v[f'iou@{k}']:.3f}" for k in ks)
            )

    best = train_refiner(cfg, on_progress=show)
    print(f"best refiner: {best}")
    role = "corrections" if cfg.first_refiner else "clicks"
    print(
        f"to use it, copy it beside its weights as <weights stem>-{role}.safetensors "
        f"(for the shipped weights: revolver-s-{role}.safetensors)"
    )
    return 0


def _cmd_train_follow(args: argparse.Namespace) -> int:
    from .core.follow_training import FollowTrainConfig, train_follower

    _check_exists(args.weights, "--weights")
    _check_exists(args.init, "--init")
    cfg = FollowTrainConfig(
        out=str(args.out),
        weights=str(args.weights) if args.weights else None,
        data=str(args.data) if args.data else None,
        datasets=[d for d in args.datasets.split(",") if d],
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        synthetic=args.synthetic,
        far_ends=args.far_ends,
        rollout=args.rollout,
        seed=args.seed,
        val_every=args.val_every,
        init=str(args.init) if args.init else None,
        add_dilations=args.add_dilations,
        threads=args.threads,
    )
    bar = Progress("train follower", unit="step")

    def show(rec: dict) -> None:
        bar.update(rec["step"], cfg.steps)
        if "val" in rec:
            v = rec["val"]
            bar.write(
                f"step {rec['step']}: loss {rec['loss']:.4f}, validation 3D IoU "
                f"{v['iou3d']:.3f}, {v['share@0.5']:.0%} of objects at IoU >= 0.5"
            )

    best = train_follower(cfg, on_progress=show)
    print(f"best follower: {best}")
    print(
        "to use it, copy it beside its weights as <weights stem>-follow.safetensors "
        "(for the shipped weights: revolver-s-follow.safetensors)"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import tifffile

    from .core.evaluate import foreground_iou

    for f in (args.prediction, args.truth):
        if not f.exists():
            raise FileNotFoundError(f"{f} does not exist")
    pred = tifffile.imread(args.prediction)
    truth = tifffile.imread(args.truth)
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: prediction {pred.shape}, truth {truth.shape}")
    p, t = pred > 0, truth > 0
    iou = foreground_iou(p, t)
    res = {
        "iou": iou,
        "dice": 2 * iou / (1 + iou),
        "foreground_prediction": float(p.mean()),
        "foreground_truth": float(t.mean()),
    }
    if p.ndim >= 3:
        per = [foreground_iou(p[k], t[k]) for k in range(p.shape[0])]
        res["iou_per_slice_min"] = float(np.min(per))
        res["iou_per_slice_mean"] = float(np.mean(per))
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"foreground IoU {res['iou']:.3f}, Dice {res['dice']:.3f} "
            f"({res['foreground_prediction']:.1%} predicted, {res['foreground_truth']:.1%} true)"
            + (
                f"; per slice IoU mean {res['iou_per_slice_mean']:.3f}, "
                f"min {res['iou_per_slice_min']:.3f}"
                if "iou_per_slice_min" in res
                else ""
            )
        )
    return 0


def _int_list(text: str, option: str) -> list[int]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [int(t) for t in items]
    except ValueError:
        raise ValueError(f"{option} expects comma-separated integers; got {text!r}") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    import tifffile

    from .core.evaluate import evaluate_few_shot, format_table

    for f in (args.image, args.labels):
        if not f.exists():
            raise FileNotFoundError(f"{f} does not exist")
    if args.support_slices is not None:
        support = _int_list(args.support_slices, "--support-slices")
        if not support:
            raise ValueError("--support-slices needs at least one slice index")
    else:
        support = [args.support]
    points = [t.strip() for t in args.points.split(",") if t.strip()]
    if not points:
        raise ValueError(
            f"--points needs at least one budget (e.g. 1,5,20,dense); got {args.points!r}"
        )
    image = tifffile.imread(args.image)
    labels = tifffile.imread(args.labels)
    predictor = _predictor(args)
    if args.objects:
        return _eval_objects(args, predictor, image, labels)
    bar = Progress("eval")
    results = evaluate_few_shot(
        predictor,
        image,
        labels,
        support=support,
        points=points,
        seeds=args.seeds,
        label_value=args.label_value,
        baselines=args.baseline or (),
        progress=bar.update,
        local=args.local,
        invert=args.invert,
        scale=args.scale,
        pixel_fit=not args.no_pixel_fit,
    )
    if args.json:
        print(json.dumps({"results": [r.to_dict() for r in results]}))
        return 0
    print(format_table(results))
    n_queries = results[0].n_queries if results else 0
    sup = ", ".join(str(s) for s in results[0].support) if results else ""
    fg = f"labels == {args.label_value}" if args.label_value is not None else "labels > 0"
    print(
        f"\nprotocol: support slice(s) {sup}, {n_queries} query slice(s); P positive and P "
        f"negative points drawn at random from each support slice's foreground ({fg}) and "
        f"background, {args.seeds} seed(s); foreground IoU averaged over queries, mean and std "
        "over seeds; dense = whole support mask(s), one seed; time per query slice (revolver: "
        "features precomputed; rf: features + prediction); pixel fit = tasks whose per-task "
        "pixel fit replaced the network (--no-pixel-fit: none)"
    )
    return 0


def _eval_objects(args: argparse.Namespace, predictor, image, labels) -> int:
    """``eval --objects``: simulated clicks per object, and optionally 3D following."""
    import json

    import numpy as np
    from scipy import ndimage

    from .core.evaluate_objects import (
        evaluate_clicks,
        evaluate_following,
        pick_objects,
        summarise_clicks,
        summarise_following,
    )

    fg = labels == args.label_value if args.label_value is not None else labels > 0
    if args.components:
        flat = np.stack([ndimage.label(s)[0] for s in fg.reshape(-1, *fg.shape[-2:])])
        inst2d = flat.reshape(fg.shape)
    else:
        inst2d = np.where(fg, labels, 0)
    bar = Progress("eval objects", unit="object")
    reading = {"invert": args.invert, "scale": args.scale}
    clicks = evaluate_clicks(
        predictor,
        image,
        inst2d,
        objects_per_slice=args.objects_per_slice,
        max_clicks=args.max_clicks,
        progress=bar.update,
        **reading,
    )
    res: dict[str, object] = {"clicks": summarise_clicks(clicks).to_dict()}
    if args.follow:
        inst3d = ndimage.label(fg)[0] if args.components else np.where(fg, labels, 0)
        ids = pick_objects(inst3d[args.support], args.follow)
        follow = evaluate_following(predictor, image, inst3d, ids, start=args.support, **reading)
        res["follow"] = summarise_following(follow)
        res["follow_per_object"] = [
            {"id": r.object_id, "iou": r.iou, "slices": [r.slices_true, r.slices_predicted]}
            for r in follow
        ]
    if args.json:
        print(json.dumps(res))
        return 0
    c = res["clicks"]
    print(
        f"clicks ({c['n_objects']} objects): IoU@1 {c['iou@1']:.3f}, IoU@3 {c['iou@3']:.3f}, "
        f"IoU@5 {c['iou@5']:.3f}, NoC@85 {c['noc@85']:.2f}, NoC@90 {c['noc@90']:.2f}"
        + (f"; a click takes {c['click_ms']:.0f} ms (median)" if "click_ms" in c else "")
    )
    if args.follow:
        f = res["follow"]
        print(
            f"follow from slice {args.support} ({int(f['n_objects'])} objects): 3D IoU mean "
            f"{f['iou_mean']:.3f}, {f['frac_iou_ge_0.5']:.0%} at IoU >= 0.5"
        )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .core.model.registry import available_models
    from .core.weights import load_weights

    w = load_weights(args.weights)
    n = sum(p.numel() for p in w.model.parameters())
    print(f"napari-revolver {__version__}, torch {torch.__version__}")
    print(
        f"weights: {w.path}\n  sha256 {w.sha256}\n  model {w.model_key}, {n / 1e6:.2f} M parameters"
    )
    local = "yes" if w.model.config.local_prior else "no (older weights: --local has no effect)"
    print(f"  sees click positions (local prior): {local}")
    fit = "yes" if w.model.config.task_fit else "no (older weights: tasks are pooled vectors only)"
    print(f"  fits each task to its support (filter bank + ridge fit): {fit}")
    for k in ("step", "val_iou", "trained_on"):
        if k in w.metadata:
            print(f"  {k}: {w.metadata[k]}")
    refiner = "none (object clicks select only)" if w.refiner is None else "yes"
    print(f"  click refiner for object tasks: {refiner}")
    if w.refiner is not None:
        corrector = "the click refiner" if w.corrector is None else "yes, their own"
        print(f"  refiner of corrections (clicks after an object's first): {corrector}")
    follower = "none (each object's last mask is carried over)" if w.follower is None else "yes"
    print(f"  follower of object tasks through z and t: {follower}")
    print(f"models: {', '.join(available_models())}")
    print(
        f"cuda: {torch.cuda.is_available()}, mps: "
        f"{bool(getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available())}"
    )
    return 0


_COMMANDS = {
    "sample": _cmd_sample,
    "segment": _cmd_segment,
    "precompute": _cmd_precompute,
    "train": _cmd_train,
    "train-clicks": _cmd_train_clicks,
    "train-follow": _cmd_train_follow,
    "compare": _cmd_compare,
    "eval": _cmd_eval,
    "info": _cmd_info,
}


_INTERRUPTED = {
    "precompute": "the slices encoded so far are stored; run the same command to resume",
    "train": "run the same command to resume from the last checkpoint",
    "train-clicks": "run the same command to resume from the last checkpoint",
    "train-follow": "run the same command to resume from the last checkpoint",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``revolver`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(
            f"\nrevolver: interrupted; {_INTERRUPTED.get(args.command, 'no output was written')}",
            file=sys.stderr,
        )
        return 130
    except (ValueError, IndexError, ImportError, RuntimeError, OSError) as exc:
        # OSError covers missing and existing files, and a full disk (nothing is left half
        # written: outputs are renamed into place only when complete).
        print(f"revolver: error: {_in_flags(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
