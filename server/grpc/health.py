"""The standard gRPC health service (`grpc.health.v1.Health`), answered from the model manager at the moment of
each call, so that it agrees with every other readiness reader at every instant.

grpcio-health-checking's servicer keeps a second copy of the state that must be pushed into it (asynchronously,
so it lags the truth by a loop turn); this one has no state of its own. Service names: "" and the typed API's
service are SERVING while the server is ready; a model's name is SERVING while that model has a version that
serves; any other name is NOT_FOUND, as grpc's own servicer answers.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.registry.manager import ModelManager

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

_Context = grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, manager: ModelManager, server_services: Iterable[str]) -> None:
        self._manager = manager
        self._server_services = {"", *server_services}

    def status(self, service: str) -> int | None:
        """The service's status now; None for a name that is neither the server nor a model."""
        if service in self._server_services:
            return SERVING if self._manager.server_ready() else NOT_SERVING
        if self._manager.is_known(service):
            return SERVING if self._manager.is_ready(service) else NOT_SERVING
        return None

    async def Check(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, context: _Context
    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:64]!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: _Context) -> None:  # noqa: N802
        last = None
        changed = self._manager.changed
        async with changed:  # held while reading and writing, so no change is notified in between unseen
            while True:
                status = self.status(request.service)
                status = SERVICE_UNKNOWN if status is None else status
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                await changed.wait()
