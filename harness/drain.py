"""SIGTERM under load, every call counted on the client side (used by the drain tests and bench/reliability.py)."""

from __future__ import annotations

import asyncio
import collections
import signal
import time

import grpc

from harness.backoff import Backoff
from harness.server import ServerProcess
from modelserver.v1 import modelserver_pb2 as pb

CALLERS = 64
PREDICT = "/modelserver.v1.ModelService/PredictMultiInput"
PROBE_INTERVAL = 0.02

Outcomes = collections.Counter[tuple[str, str]]


def _predicts(channels: list[grpc.aio.Channel]) -> list[grpc.aio.UnaryUnaryMultiCallable]:
    return [
        channel.unary_unary(
            PREDICT,
            request_serializer=pb.PredictMultiInputRequest.SerializeToString,
            response_deserializer=pb.PredictMultiInputResponse.FromString,
        )
        for channel in channels
    ]


async def drain_round(
    server: ServerProcess,
    request: pb.PredictMultiInputRequest,
    expected: float,
    channels: int = 1,
    callers: int = CALLERS,
) -> tuple[Outcomes, list[float]]:
    """`callers` closed-loop callers over `channels` connections, SIGTERM, and every call recorded as (sent
    before/after the signal, code), with every OK answer that differs from `expected`.

    With a server started with `holds=True` the test decides what "under load" means, not the machine's speed:
    the model is held until every caller's first call has reached the server (its in-flight gauge counts them),
    so those calls, and only those, were sent before the signal and are known to be accepted work. The model is
    released only once the draining server refuses a new call ("shutting down"), so the drain is seen waiting
    for accepted work while it already refuses new work. Without holds (a benchmark), the callers run for a
    second before the signal, and what counts as "before" depends on when each call reached the server.

    A refused caller retries with back-off until the server has exited (or for 30 s), as a client that retries
    UNAVAILABLE does: with --workers it reconnects to a sibling worker, which must answer it too."""
    outcomes: Outcomes = collections.Counter()
    wrong: list[float] = []
    signalled: float | None = None
    refused = asyncio.Event()
    # Separate subchannel pools: otherwise channels with equal options share one connection.
    opened = [
        grpc.aio.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels + 1)
    ]
    predicts = _predicts(opened)
    in_flight_before = server.metric("modelserver_inflight_requests", model="multi_input")

    def record(when: str, code: str, response: pb.PredictMultiInputResponse | None) -> None:
        outcomes[(when, code)] += 1
        if response is not None and abs(response.output[0] - expected) > 1e-5:
            wrong.append(response.output[0])

    async def caller(predict: grpc.aio.UnaryUnaryMultiCallable) -> None:
        backoff = Backoff()  # a refused caller retries as a real client does, not 64 of them in a tight loop
        while signalled is None or (server.process.poll() is None and time.monotonic() < signalled + 30):
            when = "before" if signalled is None else "after"
            try:
                record(when, "OK", await predict(request, timeout=60))
                backoff.reset()
            except grpc.aio.AioRpcError as error:
                record(when, error.code().name, None)
                if server.process.poll() is not None:
                    return
                await asyncio.sleep(backoff.delay())

    async def probe(predict: grpc.aio.UnaryUnaryMultiCallable) -> None:
        """One call; a "shutting down" refusal releases the held model."""
        try:
            record("after", "OK", await predict(request, timeout=60))
        except grpc.aio.AioRpcError as error:
            record("after", error.code().name, None)
            if error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in (error.details() or ""):
                refused.set()

    tasks: list[asyncio.Task[None]] = []
    probes: list[asyncio.Task[None]] = []
    try:
        if server.hold_dir is not None:
            server.hold()
        tasks += [asyncio.create_task(caller(predicts[i % channels])) for i in range(callers)]
        if server.hold_dir is not None:
            deadline = time.monotonic() + 120
            while server.metric("modelserver_inflight_requests", model="multi_input") < in_flight_before + callers:
                assert time.monotonic() < deadline, "the callers' first calls never all reached the server"
                await asyncio.sleep(0.01)
        else:
            await asyncio.sleep(1.0)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        if server.hold_dir is not None:
            while not refused.is_set():
                assert time.monotonic() < signalled + 60, "the draining server never refused a new call"
                probes.append(asyncio.create_task(probe(predicts[-1])))
                await asyncio.sleep(PROBE_INTERVAL)
            server.release()
        await asyncio.wait_for(asyncio.gather(*tasks, *probes), 120)
    finally:
        if server.hold_dir is not None:
            server.release()
        for task in (*tasks, *probes):  # after a failure: no caller outlives the round
            task.cancel()
        await asyncio.gather(*tasks, *probes, return_exceptions=True)
        await asyncio.gather(*(channel.close() for channel in opened))
    return outcomes, wrong


async def http_drain_round(
    server: ServerProcess, body: dict, expected: float, callers: int = CALLERS
) -> tuple[Outcomes, list[float]]:
    """drain_round's HTTP twin: `callers` closed-loop callers of TF Serving's REST `:predict` (multi_input), each on
    its own keep-alive connection (aiohttp), SIGTERM once every caller's first call is held in the model, and
    every call recorded as (sent before/after the signal, code: OK, or the gRPC name of the HTTP status, or
    UNAVAILABLE when the connection is refused or dropped). The model is released once the draining server
    refuses a new call with 503."""
    import aiohttp

    outcomes: Outcomes = collections.Counter()
    wrong: list[float] = []
    signalled: float | None = None
    refused = asyncio.Event()
    url = f"{server.http_url}/v1/models/multi_input:predict"
    codes = {200: "OK", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
    in_flight_before = server.metric("modelserver_inflight_requests", model="multi_input")

    async def call(session: aiohttp.ClientSession, when: str) -> str:
        try:
            async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=60)) as reply:
                document = await reply.json(content_type=None)
                code = codes.get(reply.status, f"HTTP_{reply.status}")
                if reply.status == 200 and abs(document["predictions"][0][0] - expected) > 1e-5:
                    wrong.append(document["predictions"][0][0])
                if reply.status == 503 and "shutting down" in document.get("error", ""):
                    refused.set()
        except (TimeoutError, aiohttp.ClientConnectionError):
            code = "UNAVAILABLE"
        outcomes[(when, code)] += 1
        return code

    async def caller(session: aiohttp.ClientSession) -> None:
        backoff = Backoff()
        while signalled is None or (server.process.poll() is None and time.monotonic() < signalled + 30):
            code = await call(session, "before" if signalled is None else "after")
            if code == "OK":
                backoff.reset()
            else:
                if server.process.poll() is not None:
                    return
                await asyncio.sleep(backoff.delay())

    # One connection per caller; the probes' session opens as many as it needs (a probe sent before the drain
    # began is held in the model with the rest, and must not hold up the next probe).
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(callers)]
    sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
    tasks: list[asyncio.Task[None]] = []
    probes: list[asyncio.Task[str]] = []
    try:
        server.hold()
        tasks += [asyncio.create_task(caller(session)) for session in sessions[:callers]]
        deadline = time.monotonic() + 120
        while server.metric("modelserver_inflight_requests", model="multi_input") < in_flight_before + callers:
            assert time.monotonic() < deadline, "the callers' first calls never all reached the server"
            await asyncio.sleep(0.01)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        while not refused.is_set():
            assert time.monotonic() < signalled + 60, "the draining server never refused a new call"
            probes.append(asyncio.create_task(call(sessions[-1], "after")))
            await asyncio.sleep(PROBE_INTERVAL)
        server.release()
        await asyncio.wait_for(asyncio.gather(*tasks, *probes), 120)
    finally:
        server.release()
        for task in (*tasks, *probes):
            task.cancel()
        await asyncio.gather(*tasks, *probes, return_exceptions=True)
        await asyncio.gather(*(session.close() for session in sessions))
    return outcomes, wrong
