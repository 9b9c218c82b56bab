"""The typed gRPC API against a real server: predictions equal the Keras models', errors carry the right codes."""

from __future__ import annotations

import asyncio
import re

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients.client import AsyncModelServerClient, ModelServerClient
from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc
from tests.helpers.models import keras_outputs, random_inputs, rpc_error

WARMED_UP = re.compile(r"warmed up (\S+) at batch sizes ([\d, ]+)$")


@pytest.mark.parametrize("rows", [1, 33])
@pytest.mark.parametrize("name", ["multi_input", "shared_layer", "residual_cnn"])
def test_typed_predict_equals_keras(client, keras_models, name, rows):
    inputs = random_inputs(keras_models[name], rows, seed=rows)
    served = client.predict(name, inputs)
    expected = keras_outputs(keras_models[name], inputs)
    for output_name, value in expected.items():
        assert served[output_name].shape == value.shape
        np.testing.assert_allclose(served[output_name], value, atol=1e-5)
    if name == "residual_cnn":
        np.testing.assert_array_equal(served["predicted_class"], expected["probabilities"].argmax(axis=1))


def test_rows_come_back_in_request_order(client, keras_models):
    inputs = random_inputs(keras_models["multi_input"], 50, seed=3)
    whole = client.predict_multi_input(inputs["input_a"], inputs["input_b"])["output"]
    reversed_rows = client.predict_multi_input(inputs["input_a"][::-1], inputs["input_b"][::-1])["output"]
    np.testing.assert_allclose(whole, reversed_rows[::-1], atol=1e-6)
    assert len(np.unique(whole)) == 50  # distinct rows, so order is really tested


def test_explicit_version_and_unknown_version(client, keras_models):
    inputs = random_inputs(keras_models["multi_input"], 2)
    stub = pb_grpc.ModelServiceStub(client._channel)
    response = stub.PredictMultiInput(
        pb.PredictMultiInputRequest(
            input_a=inputs["input_a"].ravel().tolist(), input_b=inputs["input_b"].ravel().tolist(), version=1
        )
    )
    assert response.version == 1 and len(response.output) == 2
    error = rpc_error(client.predict, "multi_input", inputs, version=7)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no loaded version 7" in error.details() and "loaded versions: 1" in error.details()


@pytest.mark.parametrize(
    ("inputs", "fragments"),
    [
        (
            {"input_a": np.zeros((1, 9)), "input_b": np.zeros((1, 20))},
            ["input 'input_a' has 9 values", "multiple of 10"],
        ),
        (
            {"input_a": np.zeros((2, 10)), "input_b": np.zeros((3, 20))},
            ["same number of rows", "input_a: 2, input_b: 3"],
        ),
        ({"input_a": np.zeros((0, 10)), "input_b": np.zeros((0, 20))}, ["input 'input_a' is empty"]),
        (
            {"input_a": np.zeros((3, 10)), "input_b": np.array([[0.0] * 20, [0.0] * 19 + [np.nan], [0.0] * 20])},
            ["input 'input_b' holds NaN or infinity", "row 1"],
        ),
        (
            {"input_a": np.full((1, 10), np.inf), "input_b": np.zeros((1, 20))},
            ["input 'input_a' holds NaN or infinity"],
        ),
    ],
    ids=["wrong-width", "row-mismatch", "empty", "nan", "inf"],
)
def test_invalid_input_is_rejected_with_a_helpful_message(client, inputs, fragments):
    error = rpc_error(client.predict, "multi_input", inputs)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    for fragment in fragments:
        assert fragment in error.details()


def test_cnn_image_of_wrong_size(client):
    error = rpc_error(client.predict, "residual_cnn", {"image": np.zeros((2, 27, 28, 1))})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has 1512 values" in error.details() and "multiple of 784" in error.details()
    assert "(rows, 28, 28, 1)" in error.details()


def test_oversized_message_is_resource_exhausted_and_server_keeps_serving(server, keras_models):
    with ModelServerClient(server.target, retries=0, max_message_bytes=64 << 20) as big_client:
        huge = {"image": np.zeros((6000, 28, 28, 1), dtype=np.float32)}  # about 19 MB > the 16 MiB default limit
        error = rpc_error(big_client.predict, "residual_cnn", huge)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in error.details()
        inputs = random_inputs(keras_models["multi_input"], 1)
        assert big_client.predict("multi_input", inputs)["output"].shape == (1, 1)


def test_metadata_describes_signature_versions_and_device(client):
    meta = client.metadata("shared_layer")
    assert (meta.name, meta.version, list(meta.versions), meta.platform) == (
        "shared_layer",
        1,
        [1],
        "tensorflow_savedmodel",
    )
    assert [(t.name, t.dtype, list(t.shape)) for t in meta.inputs] == [
        ("input_a", "float32", [-1, 10]),
        ("input_b", "float32", [-1, 20]),
    ]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("output_a", [-1, 1]), ("output_b", [-1, 1])]
    assert meta.device == "/device:CPU:0" and meta.ready
    cnn = client.metadata("residual_cnn")
    assert [(t.name, list(t.shape)) for t in cnn.inputs] == [("image", [-1, 28, 28, 1])]


def test_unknown_model_is_not_found(client):
    error = rpc_error(client.metadata, "no_such_model")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no model named 'no_such_model'" in error.details()
    assert "multi_input, residual_cnn, shared_layer" in error.details()


def test_list_models(client):
    listed = client.list_models()
    assert [(m.name, list(m.versions), m.ready) for m in listed.models] == [
        ("multi_input", [1], True),
        ("residual_cnn", [1], True),
        ("shared_layer", [1], True),
    ]


def test_health_went_from_not_serving_to_serving(server):
    assert server.health_seen == ["NOT_SERVING", "SERVING"]
    for service in ("", "modelserver.v1.ModelService", "multi_input", "shared_layer", "residual_cnn"):
        assert server.health(service) == "SERVING"
    with pytest.raises(grpc.RpcError) as caught:
        server.health("no_such_service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_every_model_was_warmed_at_every_allowed_batch_size_before_serving(server, client):
    """A shape first seen by a request costs that request the graph's tracing: warm-up must cover every size the
    batcher pads to (GetModelMetadata's allowed_batch_sizes), and finish before the server says SERVING."""
    lines = server.log_text().splitlines()
    serving = [i for i, line in enumerate(lines) if re.search(r": SERVING \S", line)]
    assert len(serving) == 1, "no single SERVING log line"
    warmed: dict[str, list[int]] = {}
    for line in lines[: serving[0]]:
        match = WARMED_UP.search(line)
        if match:
            warmed[match.group(1)] = [int(size) for size in match.group(2).split(", ")]
    names = [m.name for m in client.list_models().models]
    assert names == ["multi_input", "residual_cnn", "shared_layer"]
    assert warmed == {name: list(client.metadata(name).batching.allowed_batch_sizes) for name in names}


def test_reflection_lists_services(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(iter(responses)).list_services_response.service}
    assert {"modelserver.v1.ModelService", "grpc.health.v1.Health"} <= names


def test_request_metrics_count_every_call_with_its_code(server, client, keras_models):
    def requests(code: str) -> float:
        return server.metric(
            "modelserver_requests_total", model="multi_input", method="typed.PredictMultiInput", code=code
        )

    def duration_count() -> float:
        return server.metric(
            "modelserver_request_duration_seconds_count", model="multi_input", method="typed.PredictMultiInput"
        )

    def rejected_invalid() -> float:
        return server.metric("modelserver_rejected_requests_total", model="multi_input", reason="invalid")

    ok, invalid, observed, rejected = requests("OK"), requests("INVALID_ARGUMENT"), duration_count(), rejected_invalid()
    inputs = random_inputs(keras_models["multi_input"], 2)
    for _ in range(3):
        client.predict("multi_input", inputs)
    for _ in range(2):
        rpc_error(client.predict, "multi_input", {"input_a": np.zeros((1, 3)), "input_b": np.zeros((1, 20))})
    assert requests("OK") - ok == 3
    assert requests("INVALID_ARGUMENT") - invalid == 2
    assert duration_count() - observed == 5
    assert rejected_invalid() - rejected == 2

    not_found = server.metric(
        "modelserver_requests_total", model="unknown", method="typed.GetModelMetadata", code="NOT_FOUND"
    )
    rpc_error(client.metadata, "no_such_model")
    after = server.metric(
        "modelserver_requests_total", model="unknown", method="typed.GetModelMetadata", code="NOT_FOUND"
    )
    assert after - not_found == 1


def test_model_and_process_metrics(server):
    for name in ("multi_input", "shared_layer", "residual_cnn"):
        assert server.metric("modelserver_model_ready", model=name, version="1") == 1
        assert server.metric("modelserver_model_load_duration_seconds", model=name) > 0
    assert server.metric("modelserver_device_info", device="/device:CPU:0") == 1
    assert server.metric("process_resident_memory_bytes") > 100e6


def test_async_client_serves_concurrent_callers_their_own_rows(server, keras_models):
    model = keras_models["shared_layer"]
    batches = [random_inputs(model, 3, seed=i) for i in range(8)]

    async def call_all() -> tuple[list[dict[str, np.ndarray]], str]:
        async with AsyncModelServerClient(server.target, retries=0) as async_client:
            results = await asyncio.gather(*(async_client.predict_shared_layer(**x) for x in batches))
            return list(results), await async_client.health("shared_layer")

    results, health = asyncio.run(call_all())
    assert health == "SERVING"
    for inputs, served in zip(batches, results, strict=True):
        for name, value in keras_outputs(model, inputs).items():
            np.testing.assert_allclose(served[name], value, atol=1e-5)


def test_metadata_reports_batching_settings(client):
    batching = client.metadata("multi_input").batching
    assert batching.enabled and batching.policy == "cost"
    assert (batching.max_batch_size, batching.max_queued_rows, batching.max_batches_in_flight) == (64, 4096, 2)
    assert list(batching.allowed_batch_sizes) == [1, 2, 4, 8, 16, 32, 64]
    assert batching.batch_timeout_seconds == pytest.approx(0.01)


# Deadlines, cancellation and merging of queued requests need a model held busy: tests/integration/test_busy_server.py.
