"""Hold points for tests (--test-hold-dir): the server waits at a named point while a file of that name exists,
or one named `<point>.<pid>` for its process alone (with --workers, to hold one worker and not the others).

A test that needs "the model is busy" or "the server is still loading" closes a point by creating the file,
learns that a call is waiting there from the point's `.arrived` file (one line per arrival), and opens the point
by deleting the file. The test decides when the work ends, never the machine's speed. Off (and free) unless
--test-hold-dir is set.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

POINTS = ("predict", "load", "warmup", "export", "import")
POLL_SECONDS = 0.002


class HoldPoints:
    """The hold points under one folder; `wait(point)` blocks the calling thread while the point is closed."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._lock = threading.Lock()

    def wait(self, point: str, what: str = "") -> None:
        """Block while `<folder>/<point>` exists; a call that finds it closed is recorded first (blocking: call it
        off the event loop)."""
        if self.folder is None:
            return
        assert point in POINTS, point
        gate = self.folder / point
        own = self.folder / f"{point}.{os.getpid()}"  # this process alone (one of --workers)
        if not (gate.exists() or own.exists()):
            return
        with self._lock, (self.folder / f"{point}.arrived").open("a") as arrived:
            arrived.write(f"{os.getpid()} {what}\n")
        log.info("held at %s (%s) until %s is removed", point, what, gate if gate.exists() else own)
        while gate.exists() or own.exists():
            time.sleep(POLL_SECONDS)


NO_HOLDS = HoldPoints(None)
