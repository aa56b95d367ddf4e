"""The only module that creates napari workers.

Long work (encoding slices, propagation) runs in napari thread workers with napari's progress
bar. The per-click update runs inline when its features are cached: it takes about 15 ms for a
512 x 512 slice, a worker adds 1-6 ms to that (idle vs busy 2-core CPU, measured with
``benchmarks/napari_update.py``), and inline updates are applied strictly in click order.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from napari.qt.threading import GeneratorWorker

    from ..core.predictor import RevolverPredictor


def _encode(
    predictor: RevolverPredictor, indices: list[tuple[int, ...]]
) -> Generator[int, None, None]:
    for idx in indices:
        predictor.features(idx)
        yield 1


def features_worker(
    predictor: RevolverPredictor,
    indices: Iterable[tuple[int, ...]],
    *,
    on_done: Callable[[], None],
    on_error: Callable[[Exception], None],
) -> GeneratorWorker:
    """Encode ``indices`` in a thread with a progress bar; ``on_done`` runs on the main thread."""
    from napari.qt.threading import create_worker

    todo = list(indices)
    worker = create_worker(
        _encode,
        predictor,
        todo,
        _progress={"total": len(todo), "desc": "Revolver: encoding slices"},
    )
    worker.finished.connect(on_done)
    worker.errored.connect(on_error)
    worker.start()
    return worker


def propagation_worker(
    steps: Generator[Any, None, None],
    total: int,
    *,
    on_step: Callable[[Any], None],
    on_done: Callable[[], None],
    on_error: Callable[[Exception], None],
    desc: str = "Revolver: propagating",
) -> GeneratorWorker:
    """Run a core propagation generator in a thread; ``on_step`` gets each step on the main thread.

    ``worker.quit()`` cancels at the next slice.
    """
    from napari.qt.threading import create_worker

    def run() -> Generator[Any, None, None]:
        yield from steps

    worker = create_worker(run, _progress={"total": total, "desc": desc})
    worker.yielded.connect(on_step)
    worker.finished.connect(on_done)
    worker.errored.connect(on_error)
    worker.start()
    return worker
