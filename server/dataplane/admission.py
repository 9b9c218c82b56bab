"""Server-wide admission control: refuse work early and cheaply once more calls are outstanding than allowed.

grpc.aio takes calls from gRPC core one at a time, so under overload most calls wait inside core, received but
not yet handed to a handler, where nothing of ours can see them: queue bounds never act, and the wait grows
until gRPC cancels calls itself. Core counts the calls it has received and finished (channelz), so this
monitor samples those counts and knows how many calls are outstanding in all: gRPC's backlog plus ours.
Above the limit, handlers refuse new inference calls at once with RESOURCE_EXHAUSTED, which is cheaper than
serving them, so moderate overload drains. A refusal still costs about 60 % of a served request in Python, so far
above capacity the backlog grows anyway and calls are refused or expire only after waiting in it (README,
Overload).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from grpc_channelz.v1 import channelz_pb2
from grpc_channelz.v1.channelz import ChannelzServicer

from server.base.errors import OverloadedError

log = logging.getLogger(__name__)

# Seconds between two readings of gRPC's call counts: often near the limit, seldom far below it (a reading costs
# about 0.1-0.3 ms of CPU, which an idle server should not spend 50 times a second).
SAMPLE_INTERVAL_NEAR_LIMIT = 0.02
SAMPLE_INTERVAL_FAR_BELOW = 0.1
# The back-off hint of a refusal: the time to serve the calls beyond the limit, within these bounds; the fallback
# before any model call has been timed.
BACKOFF_BOUNDS = (0.01, 10.0)
BACKOFF_UNMEASURED = 0.1


def _outstanding_in_grpc() -> int:
    """Calls every gRPC server of this process has received and not yet finished."""
    # Not inside a call, so no context: GetServers uses one only to report a parse failure. Its stubs ask for a
    # grpc.ServicerContext, a type this package may not import (tests/unit/test_layers.py).
    response = ChannelzServicer.GetServers(channelz_pb2.GetServersRequest(start_server_id=0), None)  # type: ignore[arg-type]
    return sum(s.data.calls_started - s.data.calls_succeeded - s.data.calls_failed for s in response.server)


class AdmissionControl:
    """Counts outstanding calls (sampled from gRPC core) and refuses inference calls beyond `limit` (0 = off),
    except while fewer than `keep_busy` are admitted: the models always have work, so shedding never costs
    throughput."""

    def __init__(
        self, limit: int, keep_busy: int = 16, seconds_per_call: Callable[[], float | None] = lambda: None
    ) -> None:
        """`seconds_per_call()`: what serving one more call costs now (the batcher's cost models), None while
        unmeasured; it sets the back-off hint."""
        self.limit = limit
        self.keep_busy = keep_busy
        self._seconds_per_call = seconds_per_call
        self.outstanding = 0  # in gRPC core, as last sampled
        # Calls outstanding elsewhere, read at each check: the HTTP transport's requests in progress.
        self.elsewhere: Callable[[], int] = lambda: 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.limit and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sample())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample(self) -> None:
        while True:
            try:
                self.outstanding = _outstanding_in_grpc()
            except Exception:  # never let monitoring take the server down; admit everything instead
                log.exception("cannot read gRPC's call counts; admission control is off until they read again")
                self.outstanding = 0
            near = self.outstanding * 2 > self.limit
            await asyncio.sleep(SAMPLE_INTERVAL_NEAR_LIMIT if near else SAMPLE_INTERVAL_FAR_BELOW)

    def check(self, admitted: int) -> None:
        """Raise OverloadedError when more calls are outstanding than the limit allows and `admitted` requests
        (being answered now) keep the models busy."""
        if not self.limit:
            return
        outstanding = self.outstanding + self.elsewhere()
        if outstanding > self.limit and admitted >= self.keep_busy:
            raise OverloadedError(
                f"the server is overloaded: {outstanding} requests are outstanding (limit {self.limit}); "
                f"back off and retry in about {round(self.backoff_seconds() * 1000)} ms"
            )

    def backoff_seconds(self) -> float:
        """How long until the calls beyond the limit have been served, at what one call costs now."""
        per_call = self._seconds_per_call()
        if per_call is None:
            return BACKOFF_UNMEASURED
        low, high = BACKOFF_BOUNDS
        return min(high, max(low, (self.outstanding + self.elsewhere() - self.limit) * per_call))
