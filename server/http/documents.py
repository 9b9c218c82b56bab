"""The HTTP port's own documents: Prometheus `/metrics` (open, like health) and the OpenAPI description of every
endpoint at `/openapi.json` (server/http/openapi.py)."""

from __future__ import annotations

import asyncio

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from server.http.api import HttpRequest, HttpResponse, Route
from server.http.openapi import document


def routes(registry: CollectorRegistry | None = REGISTRY, server_version: str = "") -> list[Route]:
    """`registry` None: /metrics is served elsewhere (a port of its own), not here."""
    openapi = orjson.dumps(document(server_version))

    async def metrics(request: HttpRequest) -> HttpResponse:
        assert registry is not None
        # Off the event loop: a scrape of every series takes a few milliseconds that callers must not wait for.
        text = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
        return HttpResponse(200, text, CONTENT_TYPE_LATEST)

    async def openapi_json(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, openapi)

    found = [Route("GET", r"/openapi\.json", openapi_json, open=True, model=None)]
    if registry is not None:
        found.append(Route("GET", r"/metrics", metrics, open=True, model=None))
    return found
