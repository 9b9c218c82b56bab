"""Bearer-token authentication for every service except health, so that probes keep working (SPEC §12)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from server.base.metrics import REQUESTS
from server.grpc.labels import method_label
from server.grpc.rpc import HANDLER_KINDS
from server.protocols.common import UNKNOWN_MODEL

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

_MESSAGE = "missing or invalid bearer token: send the metadata 'authorization: Bearer TOKEN'"


async def _deny(request: object, context: grpc.aio.ServicerContext[object, object]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when its `authorization` metadata carries one of the tokens (compared in constant
    time), or when its service is open (health, the internal drain marker); answers UNAUTHENTICATED otherwise."""

    def __init__(self, tokens: Sequence[bytes], open_services: Sequence[str]) -> None:
        self._expected = [b"Bearer " + token for token in tokens]
        self._open = tuple(f"/{service}/" for service in open_services)

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value if isinstance(value, bytes) else value.encode()
                # Check every token, so the time taken does not tell which one came close.
                return sum(hmac.compare_digest(given, expected) for expected in self._expected) > 0
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Request, _Response] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Request, _Response] | None:
        if details.method.startswith(self._open) or self._authorized(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # an unknown method stays UNIMPLEMENTED, and adds no metric label
            return None
        REQUESTS.labels(UNKNOWN_MODEL, method_label(details.method), grpc.StatusCode.UNAUTHENTICATED.name, "grpc").inc()
        return HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)](_deny)
