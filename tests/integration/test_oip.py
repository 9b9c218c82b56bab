"""The Open Inference Protocol on our port, driven by the real tritonclient (and its stubs for typed contents)."""

from __future__ import annotations

import asyncio
import queue
import signal

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from harness.server import ServerProcess

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def triton_client(server):
    with triton.InferenceServerClient(server.target) as client:
        yield client


def _inputs(arrays: dict[str, np.ndarray], datatype: str = "FP32") -> list[triton.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _multi_input_rows(rows: int) -> dict[str, np.ndarray]:
    return {
        "input_a": RNG.standard_normal((rows, 10)).astype(np.float32),
        "input_b": RNG.standard_normal((rows, 20)).astype(np.float32),
    }


def test_liveness_readiness_and_server_metadata(triton_client):
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("multi_input")
    assert triton_client.is_model_ready("multi_input", "1")
    assert not triton_client.is_model_ready("no_such_model")
    metadata = triton_client.get_server_metadata()
    assert metadata.name == "modelserver" and "model_configuration" in metadata.extensions


def test_model_metadata_and_config_describe_the_signature(triton_client):
    metadata = triton_client.get_model_metadata("residual_cnn")
    assert metadata.versions == ["1"] and metadata.platform == "tensorflow_savedmodel"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("image", "FP32", [-1, 28, 28, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("probabilities", "FP32", [-1, 10])]
    triton_client.infer("multi_input", _inputs(_multi_input_rows(2)))  # so that the version's cost is measured
    config = triton_client.get_model_config("multi_input").config
    assert config.max_batch_size == 64 and config.dynamic_batching.preferred_batch_size[-1] == 64
    assert [(i.name, list(i.dims)) for i in config.input] == [("input_a", [10]), ("input_b", [20])]
    # What the batcher decides from: its policy and the measured call cost (a + b x rows, a > 0) and queue wait.
    parameters = {key: p.string_value for key, p in config.parameters.items()}
    assert parameters["batch_policy"] == "cost"
    assert parameters["signature_name"] == "serving_default"  # the signature OIP serves
    assert float(parameters["batch_cost_fixed_ms"]) > 0 and float(parameters["batch_cost_per_row_ms"]) >= 0
    assert float(parameters["queue_wait_ms"]) >= 0


def test_infer_with_raw_tensors_equals_keras_and_echoes_the_id(triton_client, keras_models):
    arrays = _multi_input_rows(5)
    result = triton_client.infer("multi_input", _inputs(arrays), request_id="req-42")
    expected = keras_models["multi_input"].predict([arrays["input_a"], arrays["input_b"]], verbose=0)
    np.testing.assert_allclose(result.as_numpy("output"), expected, atol=1e-5)
    response = result.get_response()
    assert response.id == "req-42" and response.model_version == "1" and len(response.raw_output_contents) == 1


def test_requested_outputs_only_are_returned(triton_client, keras_models):
    arrays = _multi_input_rows(3)
    result = triton_client.infer(
        "shared_layer", _inputs(arrays), outputs=[triton.InferRequestedOutput("output_b")], model_version="1"
    )
    assert [o.name for o in result.get_response().outputs] == ["output_b"]
    expected = keras_models["shared_layer"].predict([arrays["input_a"], arrays["input_b"]], verbose=0)
    np.testing.assert_allclose(result.as_numpy("output_b"), expected[1], atol=1e-5)


def test_typed_contents_are_answered_raw_as_triton_answers(server, keras_models):
    """Typed contents (fp32_contents) instead of raw bytes: the reply is raw all the same, as Triton's, so that
    tritonclient's InferResult.as_numpy (which reads only raw_output_contents) reads it."""
    image = RNG.random((2, 28, 28, 1), dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name="residual_cnn", id="typed")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=image.shape)
    tensor.contents.fp32_contents.extend(image.ravel().tolist())
    response = service_pb2_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(request, timeout=30)
    assert len(response.raw_output_contents) == 1 and response.id == "typed"
    assert not response.outputs[0].HasField("contents")
    got = triton.InferResult(response).as_numpy("probabilities")
    np.testing.assert_allclose(got, keras_models["residual_cnn"].predict(image, verbose=0), atol=1e-5)


def test_classification_gives_the_top_classes_per_row_as_triton_writes_them(triton_client, keras_models):
    """tritonclient's InferRequestedOutput(class_count=k) (Triton's classification extension): per row, the k highest
    scores, highest first, as BYTES 'score:index' with the score in C's %f."""
    image = RNG.random((2, 28, 28, 1), dtype=np.float32)
    output = triton.InferRequestedOutput("probabilities", class_count=3)
    result = triton_client.infer("residual_cnn", _inputs({"image": image}), outputs=[output])
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3) and result.get_response().outputs[0].datatype == "BYTES"
    expected = keras_models["residual_cnn"].predict(image, verbose=0)
    for row, want in zip(classes, expected, strict=True):
        scores, indices = zip(*(item.decode().split(":") for item in row), strict=True)
        assert [int(i) for i in indices] == list(np.argsort(-want)[:3])
        assert all(len(score.split(".")[1]) == 6 for score in scores)  # %f
        np.testing.assert_allclose([float(score) for score in scores], np.sort(want)[::-1][:3], atol=1e-5)


def test_stream_answers_many_requests_with_their_ids(triton_client, keras_models):
    answers: queue.Queue = queue.Queue()
    triton_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = {}
    try:
        for i in range(20):
            arrays = _multi_input_rows(1 + i % 3)
            sent[f"s{i}"] = arrays
            triton_client.async_stream_infer("multi_input", _inputs(arrays), request_id=f"s{i}")
        # One bad request in the middle fails alone; the stream goes on.
        triton_client.async_stream_infer("multi_input", _inputs({"input_a": sent["s0"]["input_a"]}), request_id="bad")
        got = [answers.get(timeout=30) for _ in range(21)]
    finally:
        triton_client.stop_stream()
    errors = [str(error) for result, error in got if error is not None]
    assert len(errors) == 1 and "missing input 'input_b'" in errors[0] and "INVALID_ARGUMENT" in errors[0]
    results = {result.get_response().id: result for result, error in got if error is None}
    assert sorted(results) == sorted(sent)
    for request_id, arrays in sent.items():
        expected = keras_models["multi_input"].predict([arrays["input_a"], arrays["input_b"]], verbose=0)
        np.testing.assert_allclose(results[request_id].as_numpy("output"), expected, atol=1e-5)


def _error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_unknown_model_is_not_found(triton_client):
    error = _error(lambda: triton_client.infer("nope", _inputs(_multi_input_rows(1))))
    assert error.status() == "StatusCode.NOT_FOUND" and "no model named 'nope'" in error.message()
    assert error.message().startswith("Request for unknown model: ")  # Triton's words, which its clients look for
    error = _error(lambda: triton_client.get_model_config("multi_input", "7"))
    assert error.status() == "StatusCode.NOT_FOUND" and "Request for unknown model" in error.message()
    assert "no loaded version 7" in error.message()


def test_a_huge_model_name_is_cut_in_the_message(triton_client):
    error = _error(lambda: triton_client.get_model_metadata("m" * 100_000))
    assert error.status() == "StatusCode.NOT_FOUND" and len(error.message()) < 400


def test_wrong_shape_names_expected_and_received(triton_client):
    arrays = {"input_a": np.zeros((1, 9), np.float32), "input_b": np.zeros((1, 20), np.float32)}
    error = _error(lambda: triton_client.infer("multi_input", _inputs(arrays)))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input_a" in error.message() and "(rows, 10)" in error.message() and "(1, 9)" in error.message()


def test_wrong_datatype_names_expected_and_received(triton_client):
    arrays = {"input_a": np.zeros((1, 10), np.float64), "input_b": np.zeros((1, 20), np.float64)}
    error = _error(lambda: triton_client.infer("multi_input", _inputs(arrays, "FP64")))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "has datatype FP32, got 'FP64'" in error.message()


def test_unknown_output_and_unsupported_parameter_are_refused(triton_client):
    arrays = _multi_input_rows(1)
    error = _error(
        lambda: triton_client.infer("multi_input", _inputs(arrays), outputs=[triton.InferRequestedOutput("x" * 500)])
    )
    assert "no output named" in error.message() and len(error.message()) < 400
    error = _error(lambda: triton_client.infer("multi_input", _inputs(arrays), sequence_id=3))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "sequence_id" in error.message()


def test_statistics_count_requests_and_metrics_count_the_method(server, triton_client):
    before = server.metric("modelserver_requests_total", model="multi_input", method="oip.ModelInfer", code="OK")
    triton_client.infer("multi_input", _inputs(_multi_input_rows(2)))
    after = server.metric("modelserver_requests_total", model="multi_input", method="oip.ModelInfer", code="OK")
    assert after == before + 1
    (stats,) = triton_client.get_inference_statistics("multi_input").model_stats
    assert stats.inference_count >= 2 and stats.execution_count >= 1 and stats.inference_stats.success.count >= 1


def test_a_stream_error_echoes_the_requests_id_model_and_version(server):
    """As Triton's stream handler fills a failed response: the request's id, model name and version."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(server.channel)
    request = service_pb2.ModelInferRequest(model_name="nope", model_version="3", id="e1")
    (response,) = list(stub.ModelStreamInfer(iter([request]), timeout=10))
    assert response.error_message.startswith("NOT_FOUND: Request for unknown model: no model named 'nope'")
    echo = response.infer_response
    assert (echo.id, echo.model_name, echo.model_version) == ("e1", "nope", "3")


def test_malformed_stream_message_is_answered_on_the_stream(server):
    method = server.channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=lambda b: b,
        response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
    )
    (response,) = list(method(iter([b"\xff\xff\xff"]), timeout=10))
    assert response.error_message.startswith("INVALID_ARGUMENT")
    assert "inference.ModelInferRequest" in response.error_message


@pytest.mark.parametrize(
    ("call", "extension", "method"),
    [
        (lambda c: c.get_system_shared_memory_status(), "system_shared_memory", "SystemSharedMemoryStatus"),
        (lambda c: c.register_system_shared_memory("r", "/k", 8), "system_shared_memory", "SystemSharedMemoryRegister"),
        (lambda c: c.unregister_cuda_shared_memory(), "cuda_shared_memory", "CudaSharedMemoryUnregister"),
        (lambda c: c.get_trace_settings(), "trace", "TraceSetting"),
        (lambda c: c.get_log_settings(), "logging", "LogSettings"),
    ],
)
def test_extensions_not_offered_are_unimplemented_with_a_reason(server, triton_client, call, extension, method):
    """Not gRPC's bare "Method not found!": the extension, what to do instead, and what is offered; counted."""
    before = server.metric("modelserver_requests_total", method=f"oip.{method}", code="UNIMPLEMENTED")
    error = _error(lambda: call(triton_client))
    assert error.status() == "StatusCode.UNIMPLEMENTED"
    assert f"{method} belongs to the '{extension}' extension" in error.message()
    assert "Extensions offered: classification, model_configuration, model_repository, statistics" in error.message()
    assert server.metric("modelserver_requests_total", method=f"oip.{method}", code="UNIMPLEMENTED") == before + 1


@pytest.mark.parametrize(
    "call",
    [lambda c: c.load_model("multi_input"), lambda c: c.unload_model("multi_input")],
    ids=["RepositoryModelLoad", "RepositoryModelUnload"],
)
def test_repository_control_is_off_by_default_and_says_how_to_turn_it_on(server, triton_client, call):
    error = _error(lambda: call(triton_client))
    assert error.status() == "StatusCode.FAILED_PRECONDITION"
    assert "--repository-control true" in error.message()
    assert triton_client.is_model_ready("multi_input")


@pytest.mark.parametrize("protocol", ["oip", "oip-stream"])
def test_loadtest_speaks_the_oip_unary_and_streaming(server, protocol):
    from clients.loadtest import LoadTestConfig, run_loadtest

    config = LoadTestConfig(
        target=server.target, model="residual_cnn", concurrency=4, requests=24, rows_per_request=2, protocol=protocol
    )
    result = asyncio.run(run_loadtest(config))
    assert (result.ok, result.errors, result.protocol) == (24, {}, protocol)


def test_a_stream_ends_unavailable_when_the_server_drains(server, model_repository):
    """An open stream is answered for what was read, then ended with UNAVAILABLE (retry elsewhere), not
    cancelled by the closing listener; the server still exits 0."""
    process = ServerProcess(model_repository, ["--grace-period", "10"])
    requests: queue.Queue = queue.Queue()
    try:
        process.wait_serving()
        request = service_pb2.ModelInferRequest(model_name="multi_input", id="first")
        for name, array in _multi_input_rows(1).items():
            request.inputs.add(name=name, datatype="FP32", shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
        stub = service_pb2_grpc.GRPCInferenceServiceStub(process.channel)
        responses = stub.ModelStreamInfer(iter(requests.get, None), timeout=60)
        requests.put(request)
        first = next(responses)
        assert first.infer_response.id == "first" and not first.error_message
        process.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as caught:
            next(responses)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in caught.value.details()
        assert process.process.wait(60) == 0
    finally:
        requests.put(None)
        process.kill()
