"""Startup and shutdown of a real server process (SPEC §6): UNAVAILABLE while loading, drain on SIGTERM."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np

from clients.client import ModelServerClient
from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc
from tests.serverproc import ServerProcess
from tests.test_api import keras_outputs, rpc_error
from tests.test_models import random_inputs

IN_FLIGHT = 6
ROWS = 1500  # a residual_cnn call of this size takes a noticeable time, so requests queue up in the server


def test_unavailable_while_loading_then_drain_on_sigterm(tmp_path, keras_models):
    # A fresh repository: the server exports the models first, so it is reachable but not ready for a while.
    # One model thread and no batching for the CNN: each big request is one long model call, run one at a time.
    args = [
        "--grace-period",
        "30",
        "--inference-threads",
        "1",
        "--model-batching",
        "residual_cnn:enabled=false,max_queued_rows=20000",
    ]
    server = ServerProcess(tmp_path, args)
    try:
        with ModelServerClient(server.target, retries=0, timeout=60) as client:
            small = random_inputs(keras_models["multi_input"], 1)
            error = rpc_error(client.predict, "multi_input", small)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "starting" in error.details()
            for call, args in ((client.metadata, ("multi_input",)), (client.list_models, ())):
                assert rpc_error(call, *args).code() == grpc.StatusCode.UNAVAILABLE
            assert server.health() == "NOT_SERVING"
            server.wait_serving()

            images = [random_inputs(keras_models["residual_cnn"], ROWS, seed=i)["image"] for i in range(IN_FLIGHT)]
            # Built up front, so the calls leave together instead of queueing behind each other's encoding.
            requests = [pb.PredictResidualCnnRequest(image=image.ravel().tolist()) for image in images]
            stub = pb_grpc.ModelServiceStub(server.channel)
            results: list[pb.PredictResidualCnnResponse | grpc.RpcError | None] = [None] * IN_FLIGHT

            def call(i: int) -> None:
                try:
                    results[i] = stub.PredictResidualCnn(requests[i], timeout=60)
                except grpc.RpcError as rpc_error_:
                    results[i] = rpc_error_

            threads = [threading.Thread(target=call, args=(i,)) for i in range(IN_FLIGHT)]
            for thread in threads:
                thread.start()
            # Usually all six are in flight at once; two (one running, one waiting) are enough for the test.
            deadline = time.monotonic() + 60
            while (accepted := server.metric("modelserver_inflight_requests", model="residual_cnn")) < 2:
                assert time.monotonic() < deadline, "requests never reached the server"
                time.sleep(0.005)

            server.process.send_signal(signal.SIGTERM)
            while server.health() != "NOT_SERVING":
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert server.metric("modelserver_inflight_requests", model="residual_cnn") > 0, "drain already over"
            assert server.metric("modelserver_model_ready", model="residual_cnn", version="1") == 0
            # Calls that reach the server right after the signal are still accepted (they may have been on their
            # way before it); once gRPC's backlog from before the signal is handed over, new calls are refused.
            while True:
                try:
                    client.predict("multi_input", small)
                except grpc.RpcError as refused:
                    # Our "shutting down" answer, or, if the drain already ended, the closed listener's GOAWAY.
                    assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
                    break
                assert time.monotonic() < deadline, "new calls were never refused"

            for thread in threads:
                thread.join(60)
        assert server.process.wait(60) == 0
        completed = 0
        for i, result in enumerate(results):
            if isinstance(result, grpc.RpcError):  # sent after SIGTERM: refused, never accepted
                assert result.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in result.details(), result
                continue
            assert isinstance(result, pb.PredictResidualCnnResponse), f"request {i}: {result}"
            expected = keras_outputs(keras_models["residual_cnn"], {"image": images[i]})["probabilities"]
            np.testing.assert_allclose(np.reshape(result.probabilities, (-1, 10)), expected, atol=1e-5)
            completed += 1
        assert completed >= accepted, "an accepted request was lost"
        assert "stopped" in server.log_text()
    finally:
        server.kill()


def test_sigint_on_an_idle_server_exits_zero(model_repository):
    server = ServerProcess(model_repository)
    try:
        server.wait_serving()
        assert server.stop(signal.SIGINT) == 0
    finally:
        server.kill()
