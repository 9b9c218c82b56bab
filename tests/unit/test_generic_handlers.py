"""Services reach grpc.aio as generic handlers only (server/grpc/rpc.py, GenericOnly): each registered method adds
one more pending request that grpc.aio's accept loop waits on (asyncio.wait) for every call it accepts (issue 25's
profile). A real grpc.aio server and client in this process; asyncio.wait is watched to see what the loop waits on.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from server.grpc.rpc import GenericOnly


async def _serve(generic_only: bool) -> tuple[int, list[str]]:
    """Health and reflection added as generated (registering their methods) or through GenericOnly, then one health
    check and one reflection listing."""
    server = grpc.aio.server()
    target = GenericOnly(server).as_server() if generic_only else server
    health_pb2_grpc.add_HealthServicer_to_server(grpc_health.aio.HealthServicer(), target)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
        reflection.aio.ReflectionServicer((reflection.SERVICE_NAME,)), target
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            listed = [s.name async for answer in stream for s in answer.list_services_response.service]
    finally:
        await server.stop(0)
    return check.status, listed


@pytest.mark.parametrize("generic_only", [False, True], ids=["as-generated", "generic-only"])
def test_the_accept_loop_waits_on_one_request_only_when_nothing_is_registered(monkeypatch, generic_only):
    waits: list[int] = []
    wait = asyncio.wait

    def watched(fs, *args, **kwargs):  # grpc's Cython looks asyncio.wait up at each call
        fs = list(fs)
        waits.append(len(fs))
        return wait(fs, *args, **kwargs)

    monkeypatch.setattr(asyncio, "wait", watched)
    status, listed = asyncio.run(_serve(generic_only))
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert listed == [reflection.SERVICE_NAME]
    assert waits, "grpc.aio's accept loop no longer calls asyncio.wait: GenericOnly may be unneeded"
    if generic_only:
        assert set(waits) == {1}  # the generic request alone
    else:
        assert max(waits) >= 4  # health's and reflection's methods, and the generic request
