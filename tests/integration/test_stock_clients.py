"""Stock clients, unmodified (issue 13): what Triton's and TF Serving's own example clients send and read, against
our server with SavedModels shaped like the models those examples expect. A test that names an example sends what
it sends and reads the reply the way it reads it; every value is compared with the model's own outputs.

One server for the module: the built-in models (copied from the session's repository) and small models built here
with tf.Module + tf.function:
- `simple` (Triton's simple: INT32 INPUT0, INPUT1 of shape [-1, 16] -> OUTPUT0 their sum, OUTPUT1 their
  difference) and `simple_int8` (the same in INT8);
- `simple_string` (Triton's simple_string: BYTES [-1, 16] decimal strings -> sums and differences as strings),
  a fixed-width string model, which no made-up warm-up value suits;
- `densenet_like`: no batch dimension (input [3, 8, 8] -> output [10, 1, 1]: Triton's densenet_onnx, small);
- `flatten`: an input that looks batched ([-1, 4]) and an output that does not follow its rows ([-1]), found by
  the load-time probe and served unbatched too;
- `broken_model`: not a SavedModel.
"""

from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as triton
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from harness.server import serving
from server.runtimes.base import load_failure

SIMPLE_INT_TYPES = [("simple", "INT32", np.int32), ("simple_int8", "INT8", np.int8)]


def _save(folder, name, function, *specs):
    module = tf.Module()
    module.serve = tf.function(function, input_signature=list(specs))
    tf.saved_model.save(module, str(folder / name / "1"), signatures={"serving_default": module.serve})
    return module.serve


def _sum_and_difference(INPUT0, INPUT1):
    return {"OUTPUT0": INPUT0 + INPUT1, "OUTPUT1": INPUT0 - INPUT1}


def _string_sum_and_difference(INPUT0, INPUT1):
    a, b = tf.strings.to_number(INPUT0, tf.int32), tf.strings.to_number(INPUT1, tf.int32)
    return {"OUTPUT0": tf.strings.as_string(a + b), "OUTPUT1": tf.strings.as_string(a - b)}


WEIGHTS = np.random.default_rng(13).standard_normal((10, 3)).astype(np.float32)


def _classify(data_0):
    return {"fc6_1": tf.reshape(tf.linalg.matvec(WEIGHTS, tf.reduce_mean(data_0, axis=[1, 2])), [10, 1, 1])}


def _flatten(values):
    return {"flat": tf.reshape(values, [-1])}


def _pair(dtype):
    """INPUT0 and INPUT1 of shape [-1, 16] (a signature's input names are its TensorSpecs' names)."""
    return tf.TensorSpec([None, 16], dtype, "INPUT0"), tf.TensorSpec([None, 16], dtype, "INPUT1")


@pytest.fixture(scope="session")
def stock_models(tmp_path_factory):
    """The models' folder and their serving functions (which give the expected outputs)."""
    folder = tmp_path_factory.mktemp("stock_models")
    functions = {
        name: _save(folder, name, _sum_and_difference, *_pair(dtype))
        for name, dtype in (("simple", tf.int32), ("simple_int8", tf.int8))
    }
    functions["simple_string"] = _save(folder, "simple_string", _string_sum_and_difference, *_pair(tf.string))
    image = tf.TensorSpec([3, 8, 8], tf.float32, "data_0")
    functions["densenet_like"] = _save(folder, "densenet_like", _classify, image)
    functions["flatten"] = _save(folder, "flatten", _flatten, tf.TensorSpec([None, 4], tf.float32, "values"))
    return folder, functions


def expected(function, **inputs):
    return {name: tensor.numpy() for name, tensor in function(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


@pytest.fixture(scope="module")
def stock_repository(server, model_repository, tmp_path_factory, stock_models):
    """The built-in models (exported by the session's server), the models above, and `broken_model`."""
    repository = tmp_path_factory.mktemp("stock_repository")
    for name in ("multi_input", "shared_layer", "residual_cnn"):
        shutil.copytree(model_repository / name, repository / name)
    folder, functions = stock_models
    for name in functions:
        shutil.copytree(folder / name, repository / name)
    (repository / "broken_model" / "1").mkdir(parents=True)
    (repository / "broken_model" / "1" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    return repository


@pytest.fixture(scope="module")
def stock_server(stock_repository):
    # densenet_like would batch 2 rows, waiting up to 20 s for them, if it were batched at all.
    batching = "densenet_like:policy=fixed,batch_timeout=20,max_batch_size=2"
    with serving(stock_repository, ["--model-batching", batching]) as process:
        yield process


@pytest.fixture(scope="module")
def oip(stock_server):
    return service_pb2_grpc.GRPCInferenceServiceStub(stock_server.channel)


@pytest.fixture(scope="module")
def tf_serving(stock_server):
    return prediction_service_pb2_grpc.PredictionServiceStub(stock_server.channel)


def _typed_request(model: str, datatype: str, inputs: dict[str, list]) -> service_pb2.ModelInferRequest:
    """Built as grpc_explicit_*_content_client.py build theirs: typed contents, both outputs asked for by name."""
    request = service_pb2.ModelInferRequest(model_name=model, model_version="")
    for name, values in inputs.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[1, len(values)])
        if datatype == "BYTES":
            tensor.contents.bytes_contents.extend(values)
        else:
            tensor.contents.int_contents[:] = values
    request.outputs.add(name="OUTPUT0")
    request.outputs.add(name="OUTPUT1")
    return request


@pytest.mark.parametrize(("model", "datatype", "dtype"), SIMPLE_INT_TYPES)
def test_typed_int_contents_are_answered_in_raw_output_contents(oip, stock_models, model, datatype, dtype):
    """grpc_explicit_int_content_client.py and grpc_explicit_int8_content_client.py: typed int_contents in,
    `np.frombuffer(response.raw_output_contents[i])` out; tritonclient's InferResult.as_numpy reads the same."""
    input0, input1 = list(range(16)), [1] * 16
    response = oip.ModelInfer(_typed_request(model, datatype, {"INPUT0": input0, "INPUT1": input1}), timeout=30)
    want = expected(stock_models[1][model], INPUT0=np.array([input0], dtype), INPUT1=np.array([input1], dtype))
    assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"] and len(response.raw_output_contents) == 2
    for index, output in enumerate(response.outputs):
        got = np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(tuple(output.shape))
        np.testing.assert_array_equal(got, want[output.name])
        np.testing.assert_array_equal(triton.InferResult(response).as_numpy(output.name), want[output.name])


def test_mixing_raw_and_typed_inputs_is_refused_in_tritons_words(oip):
    """grpc_explicit_int_content_client.py's last check: one raw entry added to a typed request."""
    request = _typed_request("simple", "INT32", {"INPUT0": list(range(16)), "INPUT1": [1] * 16})
    request.raw_input_contents.extend([np.arange(8).tobytes()])
    request.inputs[0].contents.int_contents[:] = list(range(8, 16))
    with pytest.raises(grpc.RpcError) as caught:
        oip.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = caught.value.details()
    assert "contents field must not be specified when using raw_input_contents for 'INPUT0' for model 'simple'" in (
        message
    )
    assert "send every input raw" in message


def test_a_wrong_version_string_is_refused_in_tritons_words(oip):
    """grpc_explicit_int8_content_client.py's last check."""
    request = _typed_request("simple_int8", "INT8", {"INPUT0": list(range(16)), "INPUT1": [1] * 16})
    request.model_version = "wrong_specification"
    with pytest.raises(grpc.RpcError) as caught:
        oip.ModelInfer(request, timeout=10)
    message = caught.value.details()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "failed to get model version from specified version string 'wrong_specification'" in message
    assert "positive integers" in message


def test_health_and_metadata_as_the_health_metadata_example_checks(stock_server):
    """simple_grpc_health_metadata.py (all but its check that the server is named 'triton')."""
    with triton.InferenceServerClient(stock_server.target) as client:
        assert client.is_server_live(headers={"test": "1", "dummy": "2"}) and client.is_server_ready()
        assert client.is_model_ready("simple")
        assert client.get_model_metadata("simple", headers={"test": "1", "dummy": "2"}).name == "simple"
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata("wrong_model_name")
        assert "Request for unknown model" in caught.value.message()
        assert "no model named 'wrong_model_name'" in caught.value.message()
        assert client.get_model_config("simple").config.name == "simple"


def test_a_fixed_width_string_model_loads_and_answers_typed_and_raw(oip, stock_server, stock_models):
    """A BYTES [-1, 16] model loads (string inputs are not warmed up) and answers grpc_explicit_byte_content_client.py
    (typed bytes_contents in, `deserialize_bytes_tensor(raw_output_contents[i])` out) and
    simple_grpc_string_infer_client.py (tritonclient, raw BYTES in, as_numpy out)."""
    function = stock_models[1]["simple_string"]
    input0, input1 = [str(i).encode() for i in range(16)], [b"1"] * 16
    want = expected(function, INPUT0=np.array([input0], object), INPUT1=np.array([input1], object))
    response = oip.ModelInfer(_typed_request("simple_string", "BYTES", {"INPUT0": input0, "INPUT1": input1}))
    for index, output in enumerate(response.outputs):
        got = deserialize_bytes_tensor(response.raw_output_contents[index]).reshape(tuple(output.shape))
        assert got.tolist() == want[output.name].tolist()
    assert [int(v) for v in want["OUTPUT0"][0]] == [i + 1 for i in range(16)]  # the model is what Triton's is

    rows = np.array([[str(i + 10 * r).encode() for i in range(16)] for r in range(3)], dtype=object)
    with triton.InferenceServerClient(stock_server.target) as client:
        assert client.is_model_ready("simple_string")
        tensors = [triton.InferInput("INPUT0", [3, 16], "BYTES"), triton.InferInput("INPUT1", [3, 16], "BYTES")]
        tensors[0].set_data_from_numpy(rows)
        tensors[1].set_data_from_numpy(np.full((3, 16), b"2", dtype=object))
        result = client.infer("simple_string", tensors)
    want = expected(function, INPUT0=rows, INPUT1=np.full((3, 16), b"2", dtype=object))
    for name in ("OUTPUT0", "OUTPUT1"):
        assert result.as_numpy(name).tolist() == want[name].tolist()


def test_a_fixed_width_string_model_through_tf_serving(tf_serving, stock_models):
    rows = np.array([[str(i).encode() for i in range(16)]], dtype=object)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "simple_string"
    request.inputs["INPUT0"].CopyFrom(tf.make_tensor_proto(rows))
    request.inputs["INPUT1"].CopyFrom(tf.make_tensor_proto(rows))
    response = tf_serving.Predict(request, timeout=30)
    want = expected(stock_models[1]["simple_string"], INPUT0=rows, INPUT1=rows)
    assert list(response.outputs["OUTPUT0"].string_val) == want["OUTPUT0"].ravel().tolist()
    assert tf.make_ndarray(response.outputs["OUTPUT1"]).tolist() == want["OUTPUT1"].tolist()


def test_a_model_without_a_batch_dimension_is_served_unbatched(stock_server, tf_serving, stock_models):
    """Triton's densenet_onnx, small: metadata and config give the true shapes with max_batch_size 0, and a
    request of exactly the input's shape is answered with the output's shape, through both protocols."""
    image = np.random.default_rng(4).random((3, 8, 8), dtype=np.float32)
    want = expected(stock_models[1]["densenet_like"], data_0=image)["fc6_1"]
    with triton.InferenceServerClient(stock_server.target) as client:
        metadata = client.get_model_metadata("densenet_like")
        assert [(t.name, list(t.shape)) for t in metadata.inputs] == [("data_0", [3, 8, 8])]
        assert [(t.name, list(t.shape)) for t in metadata.outputs] == [("fc6_1", [10, 1, 1])]
        config = client.get_model_config("densenet_like").config
        assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
        assert [list(i.dims) for i in config.input] == [[3, 8, 8]] and [list(o.dims) for o in config.output] == [
            [10, 1, 1]
        ]
        tensor = triton.InferInput("data_0", [3, 8, 8], "FP32")
        tensor.set_data_from_numpy(image)
        result = client.infer("densenet_like", [tensor])
    np.testing.assert_allclose(result.as_numpy("fc6_1"), want, rtol=1e-6)

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "densenet_like"
    request.inputs["data_0"].CopyFrom(tf.make_tensor_proto(image))
    response = tf_serving.Predict(request, timeout=30)
    np.testing.assert_allclose(np.array(response.outputs["fc6_1"].float_val), want.ravel(), rtol=1e-6)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["fc6_1"]), want, rtol=1e-6)

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "densenet_like"
    signatures = get_model_metadata_pb2.SignatureDefMap()
    tf_serving.GetModelMetadata(request, timeout=10).metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert [d.size for d in signature.inputs["data_0"].tensor_shape.dim] == [3, 8, 8]
    assert [d.size for d in signature.outputs["fc6_1"].tensor_shape.dim] == [10, 1, 1]


def test_classification_of_an_unbatched_model_as_the_image_client_asks(oip, stock_models):
    """grpc_image_client.py's request: raw input of the model's whole shape, its output asked for with the
    'classification' parameter; its reply is read as it reads it (one BYTES entry, reshaped to the output's shape)."""
    image = np.random.default_rng(5).random((3, 8, 8), dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name="densenet_like")
    request.inputs.add(name="data_0", datatype="FP32", shape=[3, 8, 8])
    request.raw_input_contents.append(image.tobytes())
    output = request.outputs.add(name="fc6_1")
    output.parameters["classification"].int64_param = 4
    response = oip.ModelInfer(request, timeout=30)
    assert len(response.raw_output_contents) == 1 and list(response.outputs[0].shape) == [4]
    classes = deserialize_bytes_tensor(response.raw_output_contents[0]).reshape(tuple(response.outputs[0].shape))
    scores = expected(stock_models[1]["densenet_like"], data_0=image)["fc6_1"].ravel()
    assert [int(c.split(b":")[1]) for c in classes] == list(np.argsort(-scores)[:4])
    np.testing.assert_allclose([float(c.split(b":")[0]) for c in classes], np.sort(scores)[::-1][:4], atol=1e-5)

    output.parameters["classification"].int64_param = 0
    with pytest.raises(grpc.RpcError) as caught:
        oip.ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid value for 'classification' parameter" in caught.value.details()


def test_a_batch_dimension_sent_to_an_unbatched_model_is_refused(stock_server):
    with triton.InferenceServerClient(stock_server.target) as client:
        tensor = triton.InferInput("data_0", [1, 3, 8, 8], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("densenet_like", [tensor])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "shape [3, 8, 8], got shape [1, 3, 8, 8]" in caught.value.message()
    assert "no batch dimension" in caught.value.message()


def test_requests_for_an_unbatched_model_are_never_joined(stock_server, stock_models):
    """densenet_like is set to batch 2 rows with a 20 s timeout (policy fixed): were its requests joined, two sent at
    once would make one model call of 2 rows, which the model cannot take. Each is its own call instead."""
    images = np.random.default_rng(6).random((2, 3, 8, 8), dtype=np.float32)
    calls = stock_server.metric("modelserver_batch_size_rows_count", model="densenet_like")

    def infer(image):
        with triton.InferenceServerClient(stock_server.target) as client:
            tensor = triton.InferInput("data_0", [3, 8, 8], "FP32")
            tensor.set_data_from_numpy(image)
            return client.infer("densenet_like", [tensor], client_timeout=30).as_numpy("fc6_1")

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(infer, images))
    for image, result in zip(images, results, strict=True):
        np.testing.assert_allclose(result, expected(stock_models[1]["densenet_like"], data_0=image)["fc6_1"], rtol=1e-6)
    assert stock_server.metric("modelserver_batch_size_rows_count", model="densenet_like") == calls + 2


def test_outputs_that_do_not_follow_the_rows_make_a_model_unbatched(stock_server, stock_models):
    """Static shapes allow rows ([-1, 4] in, [-1] out), but the load-time probe sees 8 values for 2 rows: the model is
    served unbatched, with its whole (variable) shapes, one call per request, never joined with another's rows."""
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    with triton.InferenceServerClient(stock_server.target) as client:
        metadata = client.get_model_metadata("flatten")
        assert [list(t.shape) for t in metadata.inputs] == [[-1, 4]] and [list(t.shape) for t in metadata.outputs] == [
            [-1]
        ]
        assert client.get_model_config("flatten").config.max_batch_size == 0
        tensor = triton.InferInput("values", [3, 4], "FP32")
        tensor.set_data_from_numpy(values)
        result = client.infer("flatten", [tensor])
    np.testing.assert_array_equal(result.as_numpy("flat"), expected(stock_models[1]["flatten"], values=values)["flat"])


def test_the_load_test_tool_drives_an_unbatched_model(stock_server):
    from clients.loadtest import LoadTestConfig, run_loadtest

    config = LoadTestConfig(
        target=stock_server.target, model="densenet_like", concurrency=2, requests=6, rows_per_request=1, protocol="oip"
    )
    result = asyncio.run(run_loadtest(config))
    assert (result.ok, result.errors) == (6, {})


def test_a_load_error_names_where_in_the_repository_not_the_servers_path(tmp_path):
    error = OSError(f"Cannot parse file b'{tmp_path}/m/3/saved_model.pb': Error parsing message")
    message = load_failure("m", 3, tmp_path / "m" / "3", error)
    assert message == "cannot load model 'm' version 3: Cannot parse file b'<repository>/m/3/saved_model.pb': " + (
        "Error parsing message"
    )


def test_clients_see_no_server_path_in_a_load_error(stock_server, stock_repository):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "broken_model"
    status = model_service_pb2_grpc.ModelServiceStub(stock_server.channel).GetModelStatus(request, timeout=10)
    message = status.model_version_status[0].status.error_message
    assert "<repository>/broken_model/1" in message
    assert str(stock_repository) not in message and str(stock_repository.resolve()) not in message
