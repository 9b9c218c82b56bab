"""Back-off between a test caller's retries, as a real client's (gRPC's own retry policy backs off the same way).

A closed-loop caller that resends at once after a failure spins on a server that is down or refusing: 64 such
callers keep two cores busy with nothing but failed calls, which slows the very server the test waits for and
floods the counts a failure message prints (issue 21).
"""

from __future__ import annotations

import random

FIRST_SECONDS = 0.01
MOST_SECONDS = 0.5


class Backoff:
    """Exponential delays from `first` doubling to `most` seconds, each jittered by +-20% so that callers that
    failed together do not come back together; a success starts again from `first`."""

    def __init__(self, first: float = FIRST_SECONDS, most: float = MOST_SECONDS) -> None:
        self._first, self._most = first, most
        self._next = first

    def delay(self) -> float:
        """The wait before the next retry (longer each time, up to `most`)."""
        delay = self._next * random.uniform(0.8, 1.2)
        self._next = min(self._next * 2, self._most)
        return delay

    def reset(self) -> None:
        """A call succeeded: the next failure waits `first` again."""
        self._next = self._first
