"""A user's own SavedModel, dropped into the repository, served by every protocol; a broken one is reported
not ready while the others serve; requests of every protocol for one model join the same batches.

One server for the module: the built-in models (copied from the session's repository), a user's Functional
model with three inputs of different dtypes and two outputs, and a model that cannot load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from clients.client import ModelServerClient
from harness.server import REPO_ROOT, serving
from modelserver.v1 import modelserver_pb2, modelserver_pb2_grpc

BATCH = 3  # multi_input's max_batch_size here: one request per protocol fills a batch


def _build_user_model():
    import keras

    features = keras.Input((4,), dtype="float32", name="features")
    counts = keras.Input((3,), dtype="int32", name="counts")
    offsets = keras.Input((2,), dtype="float64", name="offsets")
    joined = keras.layers.Concatenate()(
        [features, keras.ops.cast(counts, "float32"), keras.ops.cast(offsets, "float32")]
    )
    score = keras.layers.Dense(2, name="score")(joined)
    total = keras.layers.Dense(1, activation="sigmoid", name="total")(joined)
    return keras.Model([features, counts, offsets], {"score": score, "total": total})


@pytest.fixture(scope="module")
def user_model():
    return _build_user_model()


@pytest.fixture(scope="module")
def repo_server(server, model_repository, tmp_path_factory, user_model):
    repository = tmp_path_factory.mktemp("user_repository")
    for name in ("multi_input", "shared_layer", "residual_cnn"):
        shutil.copytree(model_repository / name, repository / name)
    user_model.export(str(repository / "scorer" / "1"), format="tf_saved_model", verbose=False)  # as a user would
    broken = repository / "broken_model" / "1"
    broken.mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    batching = f"multi_input:policy=fixed,batch_timeout=20,max_batch_size={BATCH}"
    with serving(repository, ["--model-batching", batching]) as process:
        yield process


def _user_inputs(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    return {
        "features": rng.standard_normal((rows, 4)).astype(np.float32),
        "counts": rng.integers(-5, 5, (rows, 3)).astype(np.int32),
        "offsets": rng.standard_normal((rows, 2)),
    }


def _expected(user_model, inputs):
    return {k: np.asarray(v) for k, v in user_model([inputs["features"], inputs["counts"], inputs["offsets"]]).items()}


def test_a_users_model_is_served_through_oip_and_tf_serving(repo_server, user_model):
    inputs = _user_inputs(3)
    expected = _expected(user_model, inputs)
    with triton.InferenceServerClient(repo_server.target) as client:
        metadata = client.get_model_metadata("scorer")
        assert {(t.name, t.datatype) for t in metadata.inputs} == {
            ("features", "FP32"),
            ("counts", "INT32"),
            ("offsets", "FP64"),
        }
        tensors = []
        for name, datatype in (("features", "FP32"), ("counts", "INT32"), ("offsets", "FP64")):
            tensors.append(triton.InferInput(name, list(inputs[name].shape), datatype))
            tensors[-1].set_data_from_numpy(inputs[name])
        result = client.infer("scorer", tensors)
    for name in ("score", "total"):
        np.testing.assert_allclose(result.as_numpy(name), expected[name], atol=1e-5)

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "scorer"
    for name, array in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    response = prediction_service_pb2_grpc.PredictionServiceStub(repo_server.channel).Predict(request, timeout=30)
    for name in ("score", "total"):
        np.testing.assert_allclose(tf.make_ndarray(response.outputs[name]), expected[name], atol=1e-5)


def test_a_users_model_through_the_cli(repo_server, user_model):
    inputs = _user_inputs(2)
    run = subprocess.run(
        [sys.executable, "-m", "clients", "--target", repo_server.target, "predict", "scorer", "--json",
         json.dumps({k: v.tolist() for k, v in inputs.items()})],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    outputs = json.loads(run.stdout)
    expected = _expected(user_model, inputs)
    for name in ("score", "total"):
        np.testing.assert_allclose(np.array(outputs[name]), expected[name], atol=1e-5)

    missing = {k: v.tolist() for k, v in inputs.items() if k != "counts"}
    missing["extra"] = [[1.0]]
    run = subprocess.run(
        [sys.executable, "-m", "clients", "--target", repo_server.target, "predict", "scorer", "--json",
         json.dumps(missing)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "counts" in run.stderr and "extra" in run.stderr


def test_a_model_that_fails_to_load_is_not_ready_while_the_others_serve(repo_server):
    assert repo_server.health() == "SERVING"
    assert repo_server.health("broken_model") == "NOT_SERVING"
    assert repo_server.health("scorer") == "SERVING"
    assert "cannot load model 'broken_model'" in repo_server.log_text()
    assert repo_server.metric("modelserver_model_ready", model="broken_model", version="1") == 0
    assert repo_server.metric("modelserver_model_ready", model="scorer", version="1") == 1
    with triton.InferenceServerClient(repo_server.target) as client:
        assert not client.is_model_ready("broken_model") and client.is_model_ready("scorer")
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "broken_model"
    status = model_service_pb2_grpc.ModelServiceStub(repo_server.channel).GetModelStatus(status_request, timeout=10)
    (version,) = status.model_version_status
    assert version.state == get_model_status_pb2.ModelVersionStatus.END
    assert "broken_model" in version.status.error_message
    listed = modelserver_pb2_grpc.ModelServiceStub(repo_server.channel).ListModels(
        modelserver_pb2.ListModelsRequest(), timeout=10
    )
    assert {m.name: m.ready for m in listed.models}["broken_model"] is False
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "broken_model"
    with pytest.raises(grpc.RpcError) as caught:
        prediction_service_pb2_grpc.PredictionServiceStub(repo_server.channel).Predict(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "failed to load" in caught.value.details()
    health = repo_server.channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    assert health(health_pb2.HealthCheckRequest(service="broken_model"), timeout=5).status == 2  # NOT_SERVING


def test_requests_of_every_protocol_join_one_batch(repo_server):
    """With max_batch_size 3 and a 20 s timeout, a batch runs only once three rows are queued: one request
    from each protocol, sent at once, can only be answered by a single shared batch."""
    a = np.random.default_rng(1).standard_normal((1, 10)).astype(np.float32)
    b = np.random.default_rng(2).standard_normal((1, 20)).astype(np.float32)

    def typed():
        with ModelServerClient(repo_server.target, timeout=30, retries=0) as client:
            return client.predict_multi_input(input_a=a, input_b=b)["output"]

    def oip():
        with triton.InferenceServerClient(repo_server.target) as client:
            tensors = [triton.InferInput("input_a", [1, 10], "FP32"), triton.InferInput("input_b", [1, 20], "FP32")]
            tensors[0].set_data_from_numpy(a)
            tensors[1].set_data_from_numpy(b)
            return client.infer("multi_input", tensors, client_timeout=30).as_numpy("output")

    def tf_serving():
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "multi_input"
        request.inputs["input_a"].CopyFrom(tf.make_tensor_proto(a))
        request.inputs["input_b"].CopyFrom(tf.make_tensor_proto(b))
        stub = prediction_service_pb2_grpc.PredictionServiceStub(repo_server.channel)
        return tf.make_ndarray(stub.Predict(request, timeout=30).outputs["output"])

    batches = repo_server.metric("modelserver_batch_size_rows_count", model="multi_input")
    rows = repo_server.metric("modelserver_batch_size_rows_sum", model="multi_input")
    with ThreadPoolExecutor(3) as pool:
        results = [f.result() for f in [pool.submit(call) for call in (typed, oip, tf_serving)]]
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)
    np.testing.assert_allclose(results[0], results[2], atol=1e-6)
    assert repo_server.metric("modelserver_batch_size_rows_count", model="multi_input") == batches + 1
    assert repo_server.metric("modelserver_batch_size_rows_sum", model="multi_input") == rows + BATCH
    for method in ("typed.PredictMultiInput", "oip.ModelInfer", "tfs.Predict"):
        assert repo_server.metric("modelserver_requests_total", model="multi_input", method=method, code="OK") == 1
