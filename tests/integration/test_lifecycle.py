"""Startup and shutdown of a real server process (SPEC §6): UNAVAILABLE while loading, drain on SIGTERM."""

from __future__ import annotations

import signal
import time

import grpc
import numpy as np

from clients.client import ModelServerClient
from harness.server import ServerProcess
from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc
from tests.helpers.models import keras_outputs, random_inputs, rpc_error

IN_FLIGHT = 6
ROWS = 50


def test_unavailable_while_loading_then_drain_on_sigterm(model_repository, keras_models):
    """The test holds loading, then the model: what the server answers while loading and while draining is seen
    at moments the test chooses, not at moments a slow model happens to leave."""
    # One model thread and no batching for the CNN: each request is one model call, run one at a time.
    args = ["--grace-period", "30", "--inference-threads", "1", "--model-batching", "residual_cnn:enabled=false"]
    server = ServerProcess(model_repository, args, held=["load"])
    try:
        with ModelServerClient(server.target, retries=0, timeout=60) as client:
            server.wait_arrived(1, "load")  # reachable, and held before loading its first model
            small = random_inputs(keras_models["multi_input"], 1)
            error = rpc_error(client.predict, "multi_input", small)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "starting" in error.details()
            for call, call_args in ((client.metadata, ("multi_input",)), (client.list_models, ())):
                assert rpc_error(call, *call_args).code() == grpc.StatusCode.UNAVAILABLE
            assert server.health() == "NOT_SERVING"
            server.release("load")
            server.wait_serving()

            images = [random_inputs(keras_models["residual_cnn"], ROWS, seed=i)["image"] for i in range(IN_FLIGHT)]
            requests = [pb.PredictResidualCnnRequest(image=image.ravel().tolist()) for image in images]
            stub = pb_grpc.ModelServiceStub(server.channel)
            server.hold()
            accepted = [stub.PredictResidualCnn.future(request, timeout=120) for request in requests]
            deadline = time.monotonic() + 60
            while server.metric("modelserver_inflight_requests", model="residual_cnn") < IN_FLIGHT:
                assert time.monotonic() < deadline, "requests never reached the server"
                time.sleep(0.005)

            server.process.send_signal(signal.SIGTERM)
            while server.health() != "NOT_SERVING":
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert server.metric("modelserver_model_ready", model="residual_cnn", version="1") == 0
            # Calls that reach the server right after the signal are still accepted (they may have been on their
            # way before it); once gRPC's backlog from before the signal is handed over, new calls are refused,
            # while the accepted calls are still held in the model.
            probes: list[grpc.Future] = []
            while not any(p.done() and p.exception() is not None for p in probes):
                assert time.monotonic() < deadline, "new calls were never refused"
                probes.append(stub.PredictMultiInput.future(multi_input_request(small), timeout=120))
                time.sleep(0.02)
            assert not any(call.done() for call in accepted), "an accepted call ended while the model was held"
            server.release()
            for probe in probes:
                refused = probe.exception(timeout=120)
                if refused is not None:  # our "shutting down" answer
                    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.details()
            for image, call in zip(images, accepted, strict=True):
                expected = keras_outputs(keras_models["residual_cnn"], {"image": image})["probabilities"]
                np.testing.assert_allclose(np.reshape(call.result(timeout=120).probabilities, (-1, 10)), expected,
                                           atol=1e-5)  # fmt: skip
        assert server.process.wait(60) == 0
    finally:
        server.kill()


def multi_input_request(inputs: dict[str, np.ndarray]) -> pb.PredictMultiInputRequest:
    return pb.PredictMultiInputRequest(input_a=inputs["input_a"].ravel().tolist(),
                                       input_b=inputs["input_b"].ravel().tolist())  # fmt: skip


def test_sigint_on_an_idle_server_exits_zero(model_repository):
    server = ServerProcess(model_repository)
    try:
        server.wait_serving()
        assert server.stop(signal.SIGINT) == 0
    finally:
        server.kill()
