"""Drain markers: how the server learns that gRPC has handed over every call it had received.

grpc.aio asks gRPC core for one call at a time, so under load calls wait inside core, received but not yet
handed to a handler. Core kills such calls with CANCELLED when the server stops, and our handlers never
see them. A marker is an RPC the server sends to itself over a private Unix socket: core queues calls in
arrival order, so when the marker reaches its handler, every call received before it has reached ours.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
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
