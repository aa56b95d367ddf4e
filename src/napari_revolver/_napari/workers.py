"""The only module that creates thread workers: a :class:`~.session.Run` in a thread.

The run's generator (the core's encoding or propagation) runs in a worker thread; each step
comes back to the main thread, where the session writes it. Errors have one handler, the
session's :meth:`~.session.Session.fail_run`, which emits one ``run_failed`` event: the worker
is given that handler, so nothing re-raises the error in the main thread (which would show it
a second time, and makes PyQt6 abort outside napari's event loop), and superqt's worker is used
rather than napari's, whose workers also relay every error as a notification of their own.

The per-click update runs inline when its features are cached: it takes about 15 ms for a
512 x 512 slice, a worker adds 1-6 ms to that (idle vs busy 2-core CPU, measured with
``benchmarks/napari_update.py``), and inline updates are applied strictly in click order.
"""

from __future__ import annotations

from collections.abc import Generator
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from superqt.utils import GeneratorWorker

    from .session import Run, Session


def _iterate(run: Run, threads: int) -> Generator[Any, None, None]:
    import torch

    torch.set_num_threads(threads)
    for item in run.steps:
        yield item
        if run.cancelled:
            return


def start(session: Session, run: Run) -> GeneratorWorker:
    """Run ``run`` in a thread; steps, the end and any error go back to ``session``.

    Parameters
    ----------
    session : Session
        Owner of the run.
    run : Run
        From :meth:`Session.propagation` or :meth:`Session.encoding`.

    Returns
    -------
    GeneratorWorker
        Started; ``session.cancel_run()`` stops it at the next slice.
    """
    import torch
    from superqt.utils import create_worker

    # A propagation leaves a core to the main thread, whose live clicks run the network
    # too (intra-op threads are set per thread: this slows only the run).
    threads = torch.get_num_threads()
    if run.kind == "propagate":
        threads = max(1, threads - 1)
    worker = create_worker(
        _iterate,
        run,
        threads,
        _start_thread=False,
        _connect={
            "yielded": partial(session.run_step, run),
            "errored": partial(session.fail_run, run),
            "finished": partial(session.finish_run, run),
        },
    )
    worker.start()
    return worker
