"""Drain markers: how the server learns that gRPC has handed over every call it had received; and the steps of a
drain that the processes of one server (--workers) take together.

grpc.aio asks gRPC core for one call at a time, so under load calls wait inside core, received but not yet
handed to a handler. Core kills such calls with CANCELLED when the server stops, and our handlers never
see them. A marker is an RPC the server sends to itself over a private Unix socket: core queues calls in
arrival order, so when the marker reaches its handler, every call received before it has reached ours.

With --workers, several processes listen on one port and the kernel hands each new connection to one of them.
A caller whose worker refused, released or closed its connection reconnects, to a sibling: if that sibling is
closing its listener at that instant, gRPC cancels the call (CANCELLED, which clients do not retry). So no worker
holds calls before every worker has answered its accepted ones, no listener closes before every worker holds its
callers, and no held call is answered before every listener is closed (`Siblings`, server/workers/supervisor.py).
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

MARK_METHOD = "/modelserver.internal.Drain/Mark"


def _identity(data: bytes) -> bytes:
    return data


class DrainMarker:
    """Registers the marker method on a server, listens on a private socket, and sends markers to itself."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="modelserver-drain-")  # mode 0700: ours alone
        self._socket = Path(self._folder.name) / "drain.sock"
        self._waiting: dict[bytes, asyncio.Future[None]] = {}

    def attach(self, server: grpc.aio.Server) -> None:
        """Call before server.start()."""
        handler = grpc.unary_unary_rpc_method_handler(
            self._mark, request_deserializer=_identity, response_serializer=_identity
        )
        service, method = MARK_METHOD.strip("/").split("/")
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
        server.add_insecure_port(f"unix:{self._socket}")

    async def _mark(self, nonce: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        waiter = self._waiting.pop(nonce, None)  # unknown nonces (anyone else's calls) change nothing
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return b""

    async def pass_through(self, timeout: float) -> bool:
        """Send a marker through gRPC's queue and wait until it reaches its handler; False after `timeout`."""
        nonce = secrets.token_bytes(16)
        arrived = asyncio.get_running_loop().create_future()
        self._waiting[nonce] = arrived
        async with grpc.aio.insecure_channel(f"unix:{self._socket}") as channel:
            mark = channel.unary_unary(MARK_METHOD, request_serializer=_identity, response_deserializer=_identity)
            call = mark(nonce, timeout=max(timeout, 0.001))
            try:
                await asyncio.wait_for(arrived, timeout)
            except TimeoutError:
                return False
            finally:
                self._waiting.pop(nonce, None)
                call.cancel()
        return True

    def close(self) -> None:
        self._folder.cleanup()


async def wait_quiet(marker: DrainMarker, last_activity: Callable[[], float], quiet: float, until: float) -> None:
    """Return once no call has arrived for `quiet` seconds, and a marker sent after that found none either.
    `last_activity()` is the time.monotonic() of the latest call that reached a handler, or of the latest answer
    (its caller calls again at once, and that call is on its way); a call received by gRPC but not yet handed to a
    handler is invisible there, and the listener's close would cancel it: the marker finds it. Returns at `until`
    in any case (callers that never pause, such as an open loop, must not hold the drain)."""
    while (now := time.monotonic()) < until:
        wait = quiet - (now - last_activity())
        if wait > 0:
            await asyncio.sleep(min(wait, until - now))
            continue
        await marker.pass_through(until - now)
        if last_activity() < now:
            return


# The steps of a drain that every worker of a server reaches before any goes past it (README, Workers).
IDLE = "idle"  # every accepted call answered (new ones are refused at once until all workers are here)
QUIET = "quiet"  # new calls are held, and none has arrived for a moment: the callers wait, none is sending
CLOSED = "closed"  # the listener is closed (its GOAWAY sent): a held caller released now finds no sibling open
STEPS = (IDLE, QUIET, CLOSED)


class Siblings:
    """The other processes that serve this server's port (--workers), for what they must do as one: be ready (the
    server serves once every worker does) and stop (`STEPS`). A lone server has none, which is this class: it is
    ready as soon as it is, and every step is agreed at once. server/workers/supervisor.py has a worker's."""

    def attach(self, on_all_serving: Callable[[], None]) -> None:
        """Called on the server's event loop before it serves; `on_all_serving` runs there once every sibling serves
        too (never, here: `all_serving()` is always true)."""

    def all_serving(self) -> bool:
        """Whether every process of the server has loaded its models and serves (cheap: asked at every request)."""
        return True

    async def agree(self, step: str, timeout: float) -> bool:
        """Tell the siblings that this process reached `step` and wait until every one has; False when `timeout`
        seconds passed first (the drain then goes on alone rather than use up the grace period)."""
        return True
