"""What every servicer shares: the per-RPC wrapper (status mapping, request metrics) and registration of a
service whose request messages are decoded safely.

Every servicer of every protocol is registered with `add_service` and wraps its unary handlers in `rpc`,
so undecodable bytes, errors, cancellations and deadlines are answered and counted the same way everywhere.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from server.base.deadlines import CANCEL_NEAR_DEADLINE
from server.base.errors import InvalidInputError
from server.base.metrics import REQUEST_DURATION, REQUESTS
from server.grpc.status import to_status
from server.protocols.common import NO_MODEL, UNKNOWN_MODEL, Handlers, MethodLabel

Request = TypeVar("Request")
Response = TypeVar("Response")
log = logging.getLogger(__name__)

# A servicer's context, whatever its messages.
Context = grpc.aio.ServicerContext[Any, Any]
# A servicer's unary method: (servicer, request, context) -> response.
Handler = Callable[[Any, Request, Context], Awaitable[Response]]


class MalformedRequest:
    """Stands in for a request message whose bytes did not decode; `rpc` answers it INVALID_ARGUMENT.

    Decoding in gRPC's own deserializer would fail the call with UNKNOWN and a traceback in the log,
    before our handler (and its metrics) could see it.
    """

    def __init__(self, message_type: str, size: int, reason: str) -> None:
        self.message_type = message_type
        self.size = size
        self.reason = reason

    def error(self) -> InvalidInputError:
        _MALFORMED_LOG.warn(f"undecodable {self.message_type} request ({self.size} bytes): {self.reason[:80]}")
        return InvalidInputError(
            f"the request is not a valid {self.message_type} message ({self.size} bytes: {self.reason[:80]}); "
            "send a message encoded from the service's .proto"
        )


class _RateLimitedLog:
    """One warning per `interval` seconds at most, with the count of those left out: hostile traffic must not
    fill the log (a traceback per call did: 7 MB for 10,000 calls)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more like it since the last warning)" if self._suppressed else ""
        log.warning("%s%s", message, more)
        self._next, self._suppressed = now + self.interval, 0


_MALFORMED_LOG = _RateLimitedLog(interval=10.0)


class WithFloats:
    """A decoded request whose top-level `repeated float` fields are also read as numpy arrays straight from the
    request's bytes (`floats[name]`): packed floats are contiguous little-endian float32 on the wire, so this costs
    about a microsecond where reading them through the message costs 0.8 ms per 25,088 floats. Every other
    attribute is the message's."""

    def __init__(self, message: Message, floats: dict[str, np.ndarray]) -> None:
        self.message = message
        self.floats = floats

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def packed_floats(data: bytes, fields: Mapping[int, str]) -> dict[str, np.ndarray] | None:
    """The packed float fields `fields` ({number: name}) of a message's bytes, as read-only float32 arrays without a
    copy; None when one was sent unpacked (also valid protobuf: the caller then reads it from the message). Call it
    only on bytes that decoded as the message, so that their framing is known to be sound."""
    found: dict[str, list[np.ndarray]] = {}
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 2:
            length, pos = _varint(data, pos)
            if number in fields:
                found.setdefault(fields[number], []).append(np.frombuffer(data, "<f4", length // 4, pos))
            pos += length
        elif number in fields:
            return None
        elif wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 5:
            pos += 4
        elif wire_type == 1:
            pos += 8
        else:
            return None
    empty = np.empty(0, np.float32)
    return {
        name: empty if name not in found else found[name][0] if len(found[name]) == 1 else np.concatenate(found[name])
        for name in fields.values()
    }


def _safe_decoder(message_class: type[Message]) -> Callable[[bytes], Message | WithFloats | MalformedRequest]:
    full_name = message_class.DESCRIPTOR.full_name
    float_fields = {
        f.number: f.name
        for f in message_class.DESCRIPTOR.fields
        if f.type == FieldDescriptor.TYPE_FLOAT and f.is_repeated
    }

    def decode(data: bytes) -> Message | WithFloats | MalformedRequest:
        try:
            message = message_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as error:
            return MalformedRequest(full_name, len(data), str(error) or type(error).__name__)
        if not float_fields:
            return message
        floats = packed_floats(data, float_fields)
        if floats is None:  # sent unpacked: read through the message
            floats = {name: np.fromiter(getattr(message, name), np.float32) for name in float_fields.values()}
        return WithFloats(message, floats)

    return decode


# gRPC's method-handler constructor for (request streaming, response streaming).
HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Register every method of `service` that `servicer` implements, decoding requests with `_safe_decoder`."""
    handlers = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name, None)
        if behaviour is None:
            continue
        request_class = GetMessageClass(method.input_type)
        response_class = GetMessageClass(method.output_type)
        kind = HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            behaviour,
            request_deserializer=_safe_decoder(request_class),
            response_serializer=response_class.SerializeToString,
        )
    # A generic handler only, never registered methods: GenericOnly says why.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


class GenericOnly:
    """A grpc.aio server as seen by the `add_*_to_server` functions that protoc and grpcio's own packages generate
    (health, reflection): they register each service both as a generic handler and as registered methods, and only
    the generic handler reaches the server.

    Why: for every call it accepts, grpc.aio's accept loop (`AioServer._server_main_loop`) waits with
    `asyncio.wait` on one pending request per registered method, adding and removing a callback on each: with our
    ~40 methods every call paid for all of them (cProfile: 219,598 generator steps and 213,678
    add/remove_done_callback for 5,930 calls). A generic handler costs a dictionary lookup per service instead (the
    typed API's first). Without them: 1.15x requests/s at c=64 (README, "Where the CPU goes").
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Left out on purpose (see the class)."""

    def as_server(self) -> grpc.aio.Server:
        """Typed as the server the generated functions ask for: the two methods above are all they call."""
        return cast(grpc.aio.Server, self)


def final_code_of_cancelled(context: Context) -> grpc.StatusCode:
    """The code a cancelled handler's RPC ended with: DEADLINE_EXCEEDED when its deadline passed."""
    remaining = context.time_remaining()
    # The client's clock started before ours: its own cancellation at its deadline reaches us a little early.
    if remaining is not None and remaining <= CANCEL_NEAR_DEADLINE:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def deadline_of(context: Context) -> float | None:
    """The call's deadline on the time.monotonic() clock, or None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def rpc(method: str, model: Callable[[Any, Any], str]) -> Callable[[Handler[Any, Any]], Handler[Any, Any]]:
    """Wrap a unary handler: malformed requests, status mapping for errors, and the request metrics
    (modelserver_requests_total with the final code, modelserver_request_duration_seconds).

    `method` is the metric's method label, the protocol's (`oip.ModelInfer`: its handlers' `Method`);
    `model(self, request)` gives the metric's model label; it must map unknown names to one label.
    """

    def decorate(handler: Handler[Any, Any]) -> Handler[Any, Any]:
        # The metric children of each (model label, code) this method has answered: labels() costs microseconds per
        # call, a dict lookup a fraction of one (issue 25). Bounded: model labels and codes are finite sets.
        children: dict[tuple[str, grpc.StatusCode], tuple[Any, Any]] = {}

        def metric_children(model_label: str, code: grpc.StatusCode) -> tuple[Any, Any]:
            pair = children.get((model_label, code))
            if pair is None:
                pair = children[(model_label, code)] = (
                    REQUESTS.labels(model_label, method, code.name, "grpc"),
                    REQUEST_DURATION.labels(model_label, method, "grpc"),
                )
            return pair

        @functools.wraps(handler)
        async def wrapper(self: Any, request: Any, context: Context) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            model_label = UNKNOWN_MODEL
            counted = False

            def count() -> None:
                nonlocal counted
                counted = True
                requests, duration = metric_children(model_label, code)
                requests.inc()
                duration.observe(time.perf_counter() - started)

            try:
                if isinstance(request, MalformedRequest):
                    raise request.error()
                model_label = model(self, request)
                return await handler(self, request, context)
            except asyncio.CancelledError:
                code = final_code_of_cancelled(context)
                raise
            except Exception as error:
                code, message = to_status(error)
                count()  # before abort sends the status: a caller that then scrapes sees its call counted
                await context.abort(code, message)
            finally:
                if not counted:
                    count()

        return wrapper

    return decorate


class Servicer:
    """A protocol's servicer: it decodes, calls its protocol's transport-free `handlers`, and encodes."""

    def __init__(self, handlers: Handlers) -> None:
        self.handlers = handlers

    def label(self, name: str) -> str:
        """The metric label of a caller-supplied model name (its handlers': unknown names share one)."""
        return self.handlers.model_label(name)


def not_offered(method: MethodLabel) -> Handler[Any, Any]:
    """The handler of an RPC that the protocol does not offer: the servicer's `handlers.not_offered(method)` raises
    NotOfferedError (UNIMPLEMENTED, saying what to use instead), answered and counted like every other call."""

    async def refuse(self: Any, request: Any, context: Context) -> Any:
        self.handlers.not_offered(method)

    refuse.__name__ = refuse.__qualname__ = method.name
    return rpc(method, lambda self, request: NO_MODEL)(refuse)
