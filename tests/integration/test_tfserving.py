"""TensorFlow Serving's API on our port, through the stubs the tensorflow-serving-api package ships."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

RNG = np.random.default_rng(11)
_REQUESTS = {
    "Classify": classification_pb2.ClassificationRequest,
    "Regress": regression_pb2.RegressionRequest,
    "MultiInference": inference_pb2.MultiInferenceRequest,
}


@pytest.fixture(scope="module")
def prediction(server):
    return prediction_service_pb2_grpc.PredictionServiceStub(server.channel)


def _predict_request(model: str, inputs: dict[str, np.ndarray], **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    for name, array in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    return request


def test_predict_with_an_output_filter_equals_keras(prediction, keras_models):
    a = RNG.standard_normal((4, 10)).astype(np.float32)
    b = RNG.standard_normal((4, 20)).astype(np.float32)
    request = _predict_request("shared_layer", {"input_a": a, "input_b": b}, signature_name="serving_default")
    request.output_filter.append("output_a")
    response = prediction.Predict(request, timeout=30)
    assert list(response.outputs) == ["output_a"]
    assert response.model_spec.name == "shared_layer" and response.model_spec.version.value == 1
    expected = keras_models["shared_layer"].predict([a, b], verbose=0)[0]
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["output_a"]), expected, atol=1e-5)


def test_predict_all_outputs_of_a_version(prediction, keras_models):
    image = RNG.random((3, 28, 28, 1), dtype=np.float32)
    response = prediction.Predict(_predict_request("residual_cnn", {"image": image}, version=1), timeout=30)
    expected = keras_models["residual_cnn"].predict(image, verbose=0)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]), expected, atol=1e-5)


def test_predict_replies_in_typed_fields_as_tf_serving_does(prediction, keras_models):
    """TF Serving's resnet_client_grpc.py and mnist_client.py read `outputs[name].float_val`: real TF Serving fills
    the typed fields by default (tensor_content only behind a flag), so we do too."""
    image = RNG.random((2, 28, 28, 1), dtype=np.float32)
    response = prediction.Predict(_predict_request("residual_cnn", {"image": image}), timeout=30)
    output = response.outputs["probabilities"]
    assert not output.tensor_content and [d.size for d in output.tensor_shape.dim] == [2, 10]
    expected = keras_models["residual_cnn"].predict(image, verbose=0)
    np.testing.assert_allclose(np.array(output.float_val).reshape(2, 10), expected, atol=1e-5)
    assert np.argmax(output.float_val[:10]) == np.argmax(expected[0])  # what resnet_client_grpc.py prints


def test_get_model_metadata_gives_the_signature_def(prediction):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "multi_input"
    response = prediction.GetModelMetadata(request, timeout=10)
    assert response.model_spec.name == "multi_input" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == ""  # as TF Serving's metadata echoes the spec
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert [d.size for d in signature.inputs["input_a"].tensor_shape.dim] == [-1, 10]
    assert signature.inputs["input_b"].dtype == tf.float32.as_datatype_enum
    assert list(signature.outputs) == ["output"]


def test_get_model_status_reports_the_served_version(server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "residual_cnn"
    response = model_service_pb2_grpc.ModelServiceStub(server.channel).GetModelStatus(request, timeout=10)
    (status,) = response.model_version_status
    assert status.version == 1 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0


@pytest.mark.parametrize(
    ("model", "spec", "inputs", "code", "words"),
    [
        ("nope", {}, {}, grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope): no model named"),
        (
            "multi_input",
            {"version": 7},
            {},
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Specific(multi_input, 7): model 'multi_input' has no loaded version 7",
        ),
        ("multi_input", {"version_label": "stable"}, {}, grpc.StatusCode.NOT_FOUND, "no version label 'stable'"),
        (
            "multi_input",
            {"signature_name": "other"},
            {},
            grpc.StatusCode.FAILED_PRECONDITION,  # as TF Serving's predict_util.cc
            "Serving signature key \"other\" not found: model 'multi_input' has no signature 'other'; its "
            "signatures: 'serving_default'",
        ),
        (
            "multi_input",
            {},
            {"input_a": np.zeros((1, 10), np.int32), "input_b": np.zeros((1, 20), np.float32)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "must be float32, got int32",
        ),
    ],
)
def test_predict_errors_name_what_was_expected(prediction, model, spec, inputs, code, words):
    with pytest.raises(grpc.RpcError) as caught:
        prediction.Predict(_predict_request(model, inputs, **spec), timeout=10)
    assert caught.value.code() == code and words in caught.value.details()


def test_get_model_status_of_an_unknown_model_in_tf_servings_words(server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as caught:
        model_service_pb2_grpc.ModelServiceStub(server.channel).GetModelStatus(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details().startswith("Could not find any versions of model nope: no model named 'nope'")


@pytest.mark.parametrize("method", ["Classify", "Regress", "MultiInference"])
def test_methods_not_offered_are_unimplemented_with_a_reason(server, method):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(server.channel)
    before = server.metric("modelserver_requests_total", method=f"tfs.{method}", code="UNIMPLEMENTED")
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, method)(_REQUESTS[method](), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert f"{method} is not offered by this server" in caught.value.details() and "Predict" in caught.value.details()
    # Counted as the Open Inference Protocol counts the extensions it does not offer (tests/integration/test_oip.py).
    assert server.metric("modelserver_requests_total", method=f"tfs.{method}", code="UNIMPLEMENTED") == before + 1
