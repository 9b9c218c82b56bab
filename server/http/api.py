"""The HTTP front door (SPEC §13): one ASGI application that routes a request to its protocol's endpoint, and does
for every endpoint what every endpoint needs: bearer-token auth (health and /metrics open), the body as real clients
send it (no Content-Type, curl's form type, gzip or deflate, within the size limit), admission before the body is
read (overload refused with 429 and Retry-After before any JSON is parsed), `{"error": ...}` answers with the
HTTP status of the core's error, compressed replies when the client asks, `Connection: close` once the server
is shutting down, and the request metrics (the same series as gRPC's, `transport="http"`).

The endpoints themselves (server/http/oip.py, server/http/tfserving.py) decode JSON or binary bodies, call their
protocol's transport-free handlers (server/protocols/) and encode the reply: no rule of a protocol is here.
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import math
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.base.errors import InvalidInputError, OverloadedError, ServingError, UnavailableError, quoted
from server.base.metrics import REQUEST_DURATION, REQUESTS
from server.dataplane.admission import AdmissionControl
from server.dataplane.inference import InferenceService
from server.http.status import CODE_OF_STATUS, to_status
from server.protocols.common import NO_MODEL, UNKNOWN_MODEL
from server.registry.manager import Phase

TRANSPORT = "http"
# Content types a body may come with: JSON's, none (TF Serving's clients often send none), curl -d's form type
# and text/plain (both still JSON here, as TF Serving reads them); binary bodies (Triton's extension) also as
# application/octet-stream.
JSON_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded")
BINARY_TYPE = "application/octet-stream"
# Replies shorter than this are sent as they are even when the client accepts compression: gzip's own header and
# the CPU it costs outweigh what it saves.
COMPRESS_AT_LEAST = 1024
SHUTTING_DOWN = (Phase.STOPPING, Phase.DRAINING, Phase.CLOSING)
REFUSING = (Phase.DRAINING, Phase.CLOSING)

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body (sent or decompressed) is larger than --max-receive-message-bytes: 413."""


class BodyStalled(Exception):
    """No byte of the request body arrived for the body timeout: 408."""


class ClientGone(Exception):
    """The client closed the connection before its body arrived: nothing to answer."""


@dataclass
class HttpRequest:
    method: str
    path: str
    params: dict[str, str]  # the route's named groups (model, version, ...)
    query: bytes
    headers: dict[str, str]  # lower-case names; a repeated header's values joined with ", "
    body: bytes = b""


@dataclass
class HttpResponse:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    code: str = ""  # the metrics' code label; empty: from the status
    body_read: bool = False  # whether the request's body was read (a refusal before it closes the connection)


def json_response(value: Any, status: int = 200) -> HttpResponse:
    """A JSON reply; numpy arrays in `value` are written directly (orjson), without Python lists in between."""
    return HttpResponse(status, orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY))


def error_response(status: int, message: str, code: str = "") -> HttpResponse:
    return HttpResponse(status, orjson.dumps({"error": message}), code=code or CODE_OF_STATUS.get(status, "UNKNOWN"))


def empty_response(status: int = 200) -> HttpResponse:
    """Health answers: the status is the answer (Triton's and KServe's HTTP health endpoints have no body)."""
    return HttpResponse(status, b"", "text/plain")


Endpoint = Callable[[HttpRequest], Awaitable[HttpResponse]]


@dataclass(frozen=True)
class Route:
    """One endpoint: `path` is a regular expression with named groups (matched whole), `method` the protocol's
    method label (None: not counted, such as /metrics), `open`: served without a token, `admitted`: inference, so
    admission control may refuse it before its body is read, `model`: the group that names the model."""

    http_method: str
    path: str
    endpoint: Endpoint
    method: str | None = None
    open: bool = False
    admitted: bool = False
    model: str | None = "model"
    reads_body: bool = False
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", re.compile(self.path))


class HttpApi:
    """The ASGI application: routing, auth, bodies, admission, errors, compression, drain and metrics around the
    protocols' endpoints."""

    def __init__(
        self,
        core: InferenceService,
        routes: Sequence[Route],
        tokens: Sequence[bytes] = (),
        max_body_bytes: int = 64 * 1024 * 1024,
        admission: AdmissionControl | None = None,
        body_timeout: float = 10.0,
    ) -> None:
        self.core = core
        self.routes = list(routes)
        self._expected = [b"Bearer " + token for token in tokens]
        self.max_body_bytes = max_body_bytes
        self._admission = admission
        self.body_timeout = body_timeout  # seconds a body may go without a byte arriving (then 408)
        self.in_progress = 0  # requests received and not yet answered (admission counts them with gRPC's)
        self.reading = 0  # admitted requests whose body is still arriving (drain waits for them)
        self.admitting = True  # False once draining begins (server/app.py): new work gets 503 before its body
        self._bodies_read = asyncio.Event()
        self._bodies_read.set()

    def add(self, routes: Sequence[Route]) -> None:
        self.routes.extend(routes)

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":  # lifespan is off and websockets are not served: nothing else arrives
            return
        started = time.perf_counter()
        self.in_progress += 1
        try:
            route, response, model_label = await self._answer(scope, receive)
        except ClientGone:
            return
        finally:
            self.in_progress -= 1
        # After a refusal sent before the body was read, the rest of that body would be read as the next request.
        unread = route is not None and not response.body_read
        closing = self.core.phase in SHUTTING_DOWN or response.status in (408, 413) or unread
        await self._send(scope, send, response, closing)
        if route is not None and route.method is not None:
            code = response.code or CODE_OF_STATUS.get(response.status, "UNKNOWN")
            REQUESTS.labels(model_label, route.method, code, TRANSPORT).inc()
            REQUEST_DURATION.labels(model_label, route.method, TRANSPORT).observe(time.perf_counter() - started)

    async def _answer(self, scope: dict[str, Any], receive: ASGIReceive) -> tuple[Route | None, HttpResponse, str]:
        method, path = scope["method"], scope["path"]
        route, params, allowed = self._match(method, path)
        if route is None:
            if allowed:
                response = error_response(
                    405,
                    f"{method} is not allowed on {quoted(path)}; use {' or '.join(sorted(allowed))}",
                    "UNIMPLEMENTED",
                )
                response.headers.append((b"allow", ", ".join(sorted(allowed)).encode()))
                return None, response, NO_MODEL
            return (
                None,
                error_response(404, f"no endpoint {method} {quoted(path)}: the endpoints are listed at /openapi.json"),
                NO_MODEL,
            )
        model_label = NO_MODEL
        if route.model is not None:
            model_label = self._model_label(params.get(route.model, ""))
        headers = _headers(scope)
        if not route.open and self._expected and not self._authorized(headers.get("authorization", "")):
            response = error_response(
                401, "missing or invalid bearer token: send the header 'Authorization: Bearer TOKEN'", "UNAUTHENTICATED"
            )
            response.headers.append((b"www-authenticate", b"Bearer"))
            response.body_read = not route.reads_body
            return route, response, model_label
        read = [not route.reads_body]  # set once the body has been read

        def answered(response: HttpResponse) -> tuple[Route, HttpResponse, str]:
            response.body_read = read[0]
            return route, response, model_label

        try:
            if route.admitted:
                self._admit()
            body = b""
            if route.reads_body:
                raw = await self._read_admitted(receive, headers)
                read[0] = True
                body = _decompressed(raw, headers, self.max_body_bytes)
                _check_content_type(headers)
            request = HttpRequest(method, path, params, scope.get("query_string", b""), headers, body)
            return answered(await route.endpoint(request))
        except BodyTooLarge as error:
            return answered(error_response(413, str(error), "RESOURCE_EXHAUSTED"))
        except BodyStalled:
            message = f"the request body stopped arriving (no byte for {self.body_timeout:g} s): send it whole"
            return answered(error_response(408, message, "DEADLINE_EXCEEDED"))
        except ServingError as error:
            status, code, message = to_status(error)
            response = error_response(status, message, code)
            if isinstance(error, OverloadedError) and self._admission is not None:
                retry = max(1, math.ceil(self._admission.backoff_seconds()))
                response.headers.append((b"retry-after", str(retry).encode()))
            return answered(response)
        except ClientGone:
            raise
        except Exception as error:  # a genuine fault: 500, logged with its traceback (to_status)
            status, code, message = to_status(error)
            return answered(error_response(status, message, code))

    def _match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], set[str]]:
        allowed = set()
        for route in self.routes:
            found = route.pattern.fullmatch(path)
            if found is None:
                continue
            if route.http_method != method:
                allowed.add(route.http_method)
                continue
            return route, {k: v for k, v in found.groupdict().items() if v is not None}, allowed
        return None, {}, allowed

    def _model_label(self, name: str) -> str:
        return name if name and self.core.is_known(name) else UNKNOWN_MODEL

    def _authorized(self, given: str) -> bool:
        # Check every token, so the time taken does not tell which one came close.
        data = given.encode("latin-1", "replace")
        return sum(hmac.compare_digest(data, expected) for expected in self._expected) > 0

    def _admit(self) -> None:
        """Refuse new work before its body is read: shutting down (503) or overloaded (429)."""
        if self.core.phase in REFUSING or not self.admitting:
            raise UnavailableError("the server is shutting down and accepts no new requests; retry elsewhere")
        if self._admission is not None:
            self._admission.check(self.core.in_flight)

    async def _read_admitted(self, receive: ASGIReceive, headers: Mapping[str, str]) -> bytes:
        """The body of a request admitted already: counted while it arrives, so that a drain waits for it."""
        self.reading += 1
        self._bodies_read.clear()
        try:
            return await self._read(receive, headers)
        finally:
            self.reading -= 1
            if self.reading == 0:
                self._bodies_read.set()

    async def stop_admitting(self, timeout: float) -> bool:
        """Refuse new requests (503 before their body), and wait up to `timeout` seconds for the bodies of those
        admitted already to arrive, so that they reach the core before it refuses new work (server/app.py's drain);
        False when the time ran out first."""
        self.admitting = False
        try:
            await asyncio.wait_for(self._bodies_read.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _read(self, receive: ASGIReceive, headers: Mapping[str, str]) -> bytes:
        declared = headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLarge(_too_large(int(declared), self.max_body_bytes))
        chunks, size = [], 0
        while True:
            try:
                async with asyncio.timeout(self.body_timeout):
                    message = await receive()
            except TimeoutError:
                raise BodyStalled from None
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge(_too_large(size, self.max_body_bytes))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _send(self, scope: dict[str, Any], send: ASGISend, response: HttpResponse, closing: bool) -> None:
        body = response.body
        headers = [(b"content-type", response.content_type.encode()), *response.headers]
        if len(body) >= COMPRESS_AT_LEAST:
            encoding = _accepted_encoding(scope)
            if encoding is not None:
                body = gzip.compress(body, 1) if encoding == "gzip" else zlib.compress(body, 1)
                headers += [(b"content-encoding", encoding.encode()), (b"vary", b"accept-encoding")]
        headers.append((b"content-length", str(len(body)).encode()))
        if closing:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _headers(scope: Mapping[str, Any]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _too_large(size: int, limit: int) -> str:
    return (
        f"the request body is {size} bytes, more than the server takes ({limit} bytes, --max-receive-message-bytes): "
        "send fewer rows per request, or binary tensors (Inference-Header-Content-Length) instead of JSON"
    )


def _decompressed(body: bytes, headers: Mapping[str, str], limit: int) -> bytes:
    """The body as sent before compression (Content-Encoding gzip or deflate), never more than `limit` bytes."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInputError(
            f"Content-Encoding {quoted(encoding)} is not supported: send the body as it is, or gzip or deflate"
        )
    # gzip: a gzip header; deflate: zlib's header as HTTP defines it, or a bare deflate stream as some clients send.
    for wbits in (31,) if encoding == "gzip" else (15, -15):
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(body, limit + 1)
        except zlib.error as error:
            last = error
            continue
        if len(data) > limit or inflater.unconsumed_tail:
            raise BodyTooLarge(
                f"the request body decompresses to more than the server takes ({limit} bytes, "
                "--max-receive-message-bytes): send fewer rows per request"
            )
        if not inflater.eof:
            raise InvalidInputError(f"the {encoding} body ends before its compressed stream does")
        return data
    raise InvalidInputError(
        f"the body is not valid {encoding} data ({last}): compress it with {encoding}, or send it as it is"
    )


def _check_content_type(headers: Mapping[str, str]) -> None:
    given = headers.get("content-type")
    if given is None:
        return
    kind = given.split(";", 1)[0].strip().lower()
    if kind in JSON_TYPES or kind.endswith("+json") or kind == "":
        return
    if kind == BINARY_TYPE:  # Triton's binary format; aiohttp (tritonclient.http.aio) also labels JSON bodies so
        return
    raise InvalidInputError(
        f"Content-Type {quoted(kind)} is not taken here: send JSON (application/json), or Triton's binary tensor "
        "format (application/octet-stream, with the header Inference-Header-Content-Length)"
    )


def _accepted_encoding(scope: Mapping[str, Any]) -> str | None:
    """gzip or deflate when the client's Accept-Encoding asks for one (a q of 0 refuses it), else None."""
    accepted = ""
    for name, value in scope["headers"]:
        if name.lower() == b"accept-encoding":
            accepted += value.decode("latin-1").lower() + ","
    if not accepted:
        return None
    offered = {}
    for item in accepted.split(","):
        token, _, parameters = item.strip().partition(";")
        q = 1.0
        if parameters.strip().startswith("q="):
            try:
                q = float(parameters.strip()[2:])
            except ValueError:
                q = 0.0
        offered[token.strip()] = q
    for encoding in ("gzip", "deflate"):
        if offered.get(encoding, offered.get("*", 0.0)) > 0:
            return encoding
    return None
