"""The base of the dock widget's group boxes: each one listens to the session and reports."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtWidgets import QGroupBox

from .session import Session


class SessionBox(QGroupBox):
    """A titled group of controls over one :class:`~.session.Session`.

    Parameters
    ----------
    title : str
        Shown on the box.
    session : Session
        The model the box shows and edits; the box connects to its events.
    report : callable
        ``report(kind, message)``: show a status line, a warning or an error, once.
    """

    def __init__(self, title: str, session: Session, report: Callable[[str, str], None]) -> None:
        super().__init__(title)
        self.session = session
        self.report = report
