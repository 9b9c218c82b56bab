"""The HTTP front door's rules that need no server (server/http/api.py, server/http/openapi.py): every route is
described in /openapi.json and every described path is routed, bodies as real clients send them (compressed,
without a Content-Type, or with curl's), and compression only when asked."""

from __future__ import annotations

import gzip
import re
import zlib

import pytest

from server.base.errors import InvalidInputError
from server.http import api, documents, oip, tfserving
from server.http.openapi import document


def all_routes() -> list[api.Route]:
    # The endpoints are never called here: the routes only need a core to be built.
    return [*oip.routes(None, False), *tfserving.routes(None), *documents.routes()]  # type: ignore[arg-type]


def sample_path(template: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: "1" if m.group(1) == "version" else f"some_{m.group(1)}", template)


def test_every_route_is_described_and_every_described_path_is_routed() -> None:
    routes = all_routes()
    described = document()["paths"]
    for template, operations in described.items():
        path = sample_path(template)
        for method in operations:
            assert any(r.http_method == method.upper() and r.pattern.fullmatch(path) for r in routes), (
                f"{method.upper()} {template} is described in /openapi.json but not routed"
            )
    for route in routes:
        if route.method is not None and route.method.startswith("oip.") and route.method not in (
            "oip.ServerLive", "oip.ServerReady", "oip.ServerMetadata", "oip.ModelMetadata", "oip.ModelReady",
            "oip.ModelConfig", "oip.ModelStatistics", "oip.ModelInfer", "oip.RepositoryIndex",
            "oip.RepositoryModelLoad", "oip.RepositoryModelUnload",
        ):  # fmt: skip
            continue  # the extensions we refuse are not described as served
        if route.method in ("tfs.Classify", "tfs.Regress"):
            continue
        assert any(
            route.http_method.lower() in operations and route.pattern.fullmatch(sample_path(template))
            for template, operations in described.items()
        ), f"{route.http_method} {route.path} is routed but not described in /openapi.json"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_are_read_within_the_limit(encoding: str) -> None:
    body = b'{"instances": [[1.0, 2.0]]}' * 10
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    assert api._decompressed(packed, {"content-encoding": encoding}, 10_000) == body
    with pytest.raises(api.BodyTooLarge, match="more than the server takes"):
        api._decompressed(packed, {"content-encoding": encoding}, 100)  # a bomb is stopped at the limit
    with pytest.raises(InvalidInputError, match=f"not valid {encoding}"):
        api._decompressed(b"not compressed", {"content-encoding": encoding}, 10_000)


def test_a_bare_deflate_stream_is_taken_too_and_unknown_encodings_are_refused() -> None:
    body = b'{"inputs": [1]}'
    bare = zlib.compressobj(wbits=-15)
    assert api._decompressed(bare.compress(body) + bare.flush(), {"content-encoding": "deflate"}, 1000) == body
    with pytest.raises(InvalidInputError, match="'br' is not supported"):
        api._decompressed(body, {"content-encoding": "br"}, 1000)


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/json; charset=utf-8", "text/plain",
     "application/x-www-form-urlencoded", "application/vnd.api+json"],
)  # fmt: skip
def test_json_bodies_come_with_the_types_real_clients_send(content_type: str | None) -> None:
    api._check_content_type({} if content_type is None else {"content-type": content_type})


@pytest.mark.parametrize("content_type", ["text/html", "multipart/form-data; boundary=x", "image/png"])
def test_other_content_types_are_refused_saying_what_to_send(content_type: str) -> None:
    with pytest.raises(InvalidInputError, match="send JSON"):
        api._check_content_type({"content-type": content_type})


def test_octet_stream_is_taken_with_or_without_the_binary_header() -> None:
    """Triton's binary format, and tritonclient.http.aio's JSON bodies (aiohttp labels every body so)."""
    api._check_content_type({"content-type": "application/octet-stream", "inference-header-content-length": "10"})
    api._check_content_type({"content-type": "application/octet-stream"})


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [(None, None), (b"gzip", "gzip"), (b"deflate", "deflate"), (b"gzip;q=0, deflate", "deflate"),
     (b"br", None), (b"*", "gzip"), (b"identity", None), (b"gzip;q=0", None)],
)  # fmt: skip
def test_replies_are_compressed_only_as_the_client_asks(accept: bytes | None, chosen: str | None) -> None:
    headers = [] if accept is None else [(b"accept-encoding", accept)]
    assert api._accepted_encoding({"headers": headers}) == chosen
