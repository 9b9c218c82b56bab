"""--workers N (server/workers/supervisor.py): several server processes on one port, as one server to its clients, its
metrics scrape and its orchestrator. Every call is counted on the client side. The setting and the port
reservation alone: tests/unit/test_workers.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from harness.drain import CALLERS, drain_round
from harness.server import ServerProcess
from modelserver.v1 import modelserver_pb2 as pb
from tests.helpers.models import keras_outputs, random_inputs

CHANNELS = 16  # separate connections: the kernel spreads connections, not calls, over the workers
CALLS_PER_CHANNEL = 20
PREDICT = "/modelserver.v1.ModelService/PredictMultiInput"
# Its own subchannel pool: channels with equal options would otherwise share one connection (one worker).
SEPARATE = [("grpc.use_local_subchannel_pool", 1)]


def _wait_metric(server: ServerProcess, value: float, name: str, **labels: str) -> None:
    """Wait (bounded) until the supervisor's /metrics shows `value` for the sample."""
    deadline = time.monotonic() + 180
    while server.metric(name, **labels) != value:
        assert server.process.poll() is None, server.log_text()
        assert time.monotonic() < deadline, f"{name}{labels} never {value}:\n{server.log_text()}"
        time.sleep(0.05)


@contextlib.contextmanager
def _started(repository: Path, *args: str, holds: bool = False) -> Iterator[ServerProcess]:
    """A server with two workers, once both serve, for the body of a `with` block; the supervisor and its workers
    are killed after it, whatever happens (ServerProcess.kill)."""
    with ServerProcess(repository, ["--workers", "2", *args], holds=holds) as process:
        _wait_metric(process, 2, "modelserver_workers_serving")
        process.wait_serving()
        yield process


def _worker_pids(server: ServerProcess) -> list[int]:
    """The workers' pids, from the supervisor's port file."""
    assert len(server.server_pids) == 2 and server.process.pid not in server.server_pids, server.server_pids
    return server.server_pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"worker processes still running: {[p for p in pids if _alive(p)]}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def workers(server, model_repository) -> Iterator[ServerProcess]:
    """Two workers on the repository the session's server exported (so nothing is exported again)."""
    with _started(model_repository, "--grace-period", "20", holds=True) as process:
        yield process


def test_every_worker_serves_correct_predictions_and_one_scrape_counts_them_all(workers, keras_models):
    assert workers.metric("modelserver_workers") == 2
    model = keras_models["multi_input"]
    channels = [grpc.insecure_channel(workers.target, options=SEPARATE) for _ in range(CHANNELS)]
    try:
        for channel in channels:  # every connection, whichever worker it landed on, is ready
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        sent = 0
        for i, channel in enumerate(channels):
            predict = channel.unary_unary(
                PREDICT,
                request_serializer=pb.PredictMultiInputRequest.SerializeToString,
                response_deserializer=pb.PredictMultiInputResponse.FromString,
            )
            for j in range(CALLS_PER_CHANNEL):
                inputs = random_inputs(model, 1 + j % 3, seed=i * 100 + j)
                request = pb.PredictMultiInputRequest(
                    input_a=inputs["input_a"].ravel().tolist(), input_b=inputs["input_b"].ravel().tolist()
                )
                response = predict(request, timeout=30)
                sent += 1
                expected = keras_outputs(model, inputs)["output"]
                np.testing.assert_allclose(np.reshape(response.output, (-1, 1)), expected, atol=1e-5)
    finally:
        for channel in channels:
            channel.close()
    served = workers.metric(
        "modelserver_requests_total", model="multi_input", method="typed.PredictMultiInput", code="OK"
    )
    assert served == sent == CHANNELS * CALLS_PER_CHANNEL
    per_worker = [workers.metric("modelserver_worker_requests_total", worker=str(i)) for i in range(2)]
    assert sum(per_worker) == served, per_worker
    assert min(per_worker) > 0, f"{CHANNELS} connections all landed on one worker: {per_worker}"
    assert workers.metric("modelserver_model_ready", model="multi_input", version="1") == 1
    assert workers.metric("modelserver_inflight_requests", model="multi_input") == 0
    assert workers.metric("process_resident_memory_bytes") > 0 and workers.metric("process_cpu_seconds_total") > 0


def test_sigterm_under_load_drains_every_worker_and_exits_zero(workers):
    """Callers that keep calling through the drain, with back-off, as clients that retry UNAVAILABLE do: a caller
    refused or sent away by one worker reconnects to the other, which must then answer (OK or UNAVAILABLE), never
    cancel its call while closing its listener (server/grpc/drain.py, Siblings)."""
    pids = _worker_pids(workers)
    request = pb.PredictMultiInputRequest(input_a=[0.25] * 10, input_b=[0.5] * 20)
    outcomes, _ = asyncio.run(drain_round(workers, request, expected=float("nan"), channels=CHANNELS))
    # 0 only when every worker drained and exited by itself (server/workers/supervisor.py, _on_exit).
    assert workers.process.wait(60) == 0, workers.log_text()
    before = {(code, n) for (when, code), n in outcomes.items() if when == "before"}
    assert before == {("OK", CALLERS)}, outcomes
    assert {code for when, code in outcomes if when == "after"} <= {"OK", "UNAVAILABLE"}, outcomes
    _wait_gone(pids)


def test_a_killed_worker_drains_the_others_and_the_server_exits_one(model_repository, server):
    with _started(model_repository, "--grace-period", "20") as process:
        victim, survivor = _worker_pids(process)
        os.kill(victim, signal.SIGKILL)
        assert process.process.wait(60) == 1, process.log_text()
        log = process.log_text()
        assert f"worker 0 (pid {victim}) was killed by SIGKILL" in log
        assert f"[worker 1 pid {survivor}] server.app: stopped" in log
        _wait_gone([victim, survivor])


def test_workers_do_not_outlive_a_killed_supervisor(model_repository, server):
    """A supervisor killed outright (SIGKILL: no chance to forward anything) leaves no worker holding the port."""
    with _started(model_repository) as process:
        pids = _worker_pids(process)
        process.process.kill()
        _wait_gone(pids)


def _readiness(target: str) -> tuple[bool, str, bool, grpc.StatusCode, str]:
    """On a connection of its own (so on whichever worker the kernel hands it to): OIP ServerReady, health, OIP
    ModelReady of multi_input, and the code and message of one predict call."""
    with grpc.insecure_channel(target, options=SEPARATE) as channel:
        oip = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        server_ready = oip.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        model_ready = oip.ModelReady(service_pb2.ModelReadyRequest(name="multi_input"), timeout=10).ready
        predict = channel.unary_unary(
            PREDICT,
            request_serializer=pb.PredictMultiInputRequest.SerializeToString,
            response_deserializer=pb.PredictMultiInputResponse.FromString,
        )
        try:
            predict(pb.PredictMultiInputRequest(input_a=[0.25] * 10, input_b=[0.5] * 20), timeout=30)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        else:
            code, details = grpc.StatusCode.OK, ""
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
    return server_ready, status, model_ready, code, details


def test_the_server_is_ready_only_once_every_worker_serves(model_repository, server):
    """Readiness means that the whole server serves: while one worker still loads its models, every connection,
    whichever worker it reaches, says not ready and refuses calls as starting (UNAVAILABLE, which clients retry);
    once one connection says ready, every new connection is served."""
    with ServerProcess(model_repository, ["--workers", "2"], held=["load"]) as process:
        _, second = _worker_pids(process)  # the port file is written once both listen, before they load
        process.wait_arrived(2, "load")  # each worker waits before its first model
        process.hold(f"load.{second}")  # the second worker alone stays held (server/base/hold.py) ...
        process.release("load")  # ... while the first one loads its models and serves
        _wait_metric(process, 1, "modelserver_workers_serving")
        seen = [_readiness(process.target) for _ in range(CHANNELS)]
        starting = (False, "NOT_SERVING", False, grpc.StatusCode.UNAVAILABLE)
        assert all(answer[:4] == starting and "starting" in answer[4] for answer in seen), seen
        # Both workers were asked: the one that serves its models said "not ready" too.
        assert all(process.metric("modelserver_worker_requests_total", worker=str(i)) > 0 for i in range(2))
        assert process.metric("modelserver_model_ready", model="multi_input", version="1") == 0

        process.release(f"load.{second}")
        deadline = time.monotonic() + 180
        while not _readiness(process.target)[0]:
            assert process.process.poll() is None and time.monotonic() < deadline, process.log_text()
            time.sleep(0.02)
        seen = [_readiness(process.target) for _ in range(2 * CHANNELS)]
        assert all(answer == (True, "SERVING", True, grpc.StatusCode.OK, "") for answer in seen), seen
        assert process.metric("modelserver_workers_serving") == 2
        _wait_metric(process, 1, "modelserver_model_ready", model="multi_input", version="1")
