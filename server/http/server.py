"""The HTTP listener: uvicorn's httptools protocol on the gRPC server's own event loop (no thread hop per request),
serving the ASGI application of server/http/api.py.

Chosen by measurement (bench/http_stacks.py, README): on the same JSON request at c=64, uvicorn with httptools and
a bare ASGI application served 1.15x the requests of aiohttp's server at 0.62x its CPU per request. Only uvicorn's
protocol is used, not its `Server`: that one installs its own SIGTERM/SIGINT handlers and runs its own shutdown,
and ours (server/app.py) decides when the listener closes. What uvicorn does not do, done here: a connection
that has not sent a whole request head within --http-header-timeout is closed (uvicorn's keep-alive timer is
cancelled by any byte that arrives, so a client sending a byte a second would hold its connection forever).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from server.http.api import HttpApi

log = logging.getLogger(__name__)

# The request line and headers of one request, at most (nginx's large_client_header_buffers allow 4 x 8 KiB).
MAX_HEAD_BYTES = 64 * 1024
# Connections waiting to be accepted: a burst of new clients (a load test's 64, a restart's reconnects) must not
# find the queue full.
BACKLOG = 2048


class HeadTooLarge(Exception):
    """A request line and headers larger than MAX_HEAD_BYTES: uvicorn answers 400 and closes the connection."""


class _Protocol(HttpToolsProtocol):
    """uvicorn's protocol, with a deadline for each request head (from the connection, or from the first byte of the
    next request on a keep-alive connection, whose idle time uvicorn's keep-alive timer bounds) and a size limit."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        if self._head_timer is None:
            self._arm_head_timer()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        # uvicorn keeps the URL and headers without a bound: a client could send megabytes of head. Raised from a
        # parser callback, this stops the parser; uvicorn answers 400 and closes the connection.
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge(f"request head over {MAX_HEAD_BYTES} bytes")

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A TCP socket bound and listening; port 0 picks one. `reuse_port`: --workers share the port (SO_REUSEPORT),
    alone a port in use is an error. proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are
    TCP, and without it a reply written in two parts waits 40 ms for a delayed ACK."""
    info = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(info[4])
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """One HTTP listener serving `app` on the running event loop."""

    def __init__(
        self,
        app: HttpApi,
        idle_timeout: float,
        header_timeout: float,
        tls: tuple[Path, Path, Path | None] | None = None,
    ) -> None:
        """`tls`: (certificate, key, client CA or None) as for gRPC."""
        options: dict[str, Any] = {}
        if tls is not None:
            cert, key, client_ca = tls
            options = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
            if client_ca is not None:
                options |= {"ssl_ca_certs": str(client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.config = uvicorn.Config(
            app,
            http=_Protocol,
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=max(1, round(idle_timeout)),
            backlog=BACKLOG,
            proxy_headers=False,  # no proxy's headers are trusted (and no middleware per request)
            **options,
        )
        self.config.load()
        self.app = app
        self.header_timeout = header_timeout
        self.state = ServerState()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, sock: socket.socket) -> int:
        """Serve on `sock` (listening already); returns its port."""
        loop = asyncio.get_running_loop()
        header_timeout = self.header_timeout

        def protocol() -> asyncio.Protocol:
            instance = _Protocol(config=self.config, server_state=self.state, app_state={})
            instance.header_timeout = header_timeout
            return instance

        handshake = self.header_timeout if self.config.ssl is not None else None  # a TLS handshake is part of the head
        self._server = await loop.create_server(
            protocol, sock=sock, ssl=self.config.ssl, backlog=BACKLOG, ssl_handshake_timeout=handshake
        )
        self.port = int(sock.getsockname()[1])
        return self.port

    @property
    def connections(self) -> int:
        return len(self.state.connections)

    async def close(self, timeout: float) -> None:
        """Stop listening; close idle keep-alive connections now and the others once their request is answered
        (their reply says `Connection: close`); after `timeout` seconds, close what is left."""
        if self._server is None:
            return
        self._server.close()
        deadline = time.monotonic() + timeout
        while self.state.connections and time.monotonic() < deadline:
            for connection in list(self.state.connections):
                connection.shutdown()
            await asyncio.sleep(0.05)
        for connection in list(self.state.connections):
            connection.transport.close()
        if self.state.connections or self.state.tasks:
            log.warning("HTTP: closed %d connection(s) with requests unanswered", len(self.state.connections))
        self._server = None
