"""Every signature of a SavedModel, through TF Serving's own stubs (issue 24): a model exported as TF Serving's
mnist_saved_model.py exports it (`predict_images` taking float `images`, `classify_images` taking serialized
tf.Example strings, and `serving_default` = `classify_images`), called by `signature_name` as mnist_client.py calls
it. Answers are compared with the SavedModel's own signatures, loaded in this process.

One server for the module, with the built-in models copied from the session's repository and the mnist model.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from harness.server import serving
from tests.helpers.models import rpc_error
from tests.helpers.repositories import make_repository

MODEL = "mnist"
PIXELS = 784


class _Mnist(tf.Module):
    """A tiny softmax regression with TF Serving's mnist signatures (its weights fixed by a seed)."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(3)
        self.w = tf.Variable(rng.standard_normal((PIXELS, 10)).astype(np.float32) * 0.05)
        self.b = tf.Variable(rng.standard_normal(10).astype(np.float32) * 0.1)

    @tf.function(input_signature=[tf.TensorSpec([None, PIXELS], tf.float32)])
    def predict_images(self, images):
        return {"scores": tf.nn.softmax(images @ self.w + self.b)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def classify_images(self, inputs):
        x = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([PIXELS], tf.float32)})["x"]
        classes = tf.tile(tf.constant([[str(i).encode() for i in range(10)]]), [tf.shape(inputs)[0], 1])
        return {"classes": classes, "scores": tf.nn.softmax(x @ self.w + self.b)}


def _examples(images: np.ndarray) -> np.ndarray:
    """Rows of images as serialized tf.Example protos (feature "x"), what classify_images takes."""
    return np.array(
        [
            tf.train.Example(
                features=tf.train.Features(feature={"x": tf.train.Feature(float_list=tf.train.FloatList(value=row))})
            ).SerializeToString()
            for row in images
        ],
        dtype=object,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory, server, model_repository):
    """The repository (built-in models copied, nothing exported by the server) with mnist version 1."""
    base = tmp_path_factory.mktemp("signatures")
    repository = make_repository(base, model_repository)
    module = _Mnist()
    signatures = {
        "predict_images": module.predict_images.get_concrete_function(),
        "classify_images": module.classify_images.get_concrete_function(),
        "serving_default": module.classify_images.get_concrete_function(),
    }
    tf.saved_model.save(module, str(repository / MODEL / "1"), signatures=signatures)
    return repository


@pytest.fixture(scope="module")
def loaded(exported):
    """The SavedModel itself, loaded here: the answers to compare with."""
    return tf.saved_model.load(str(exported / MODEL / "1"))


@pytest.fixture(scope="module")
def mnist_server(exported):
    batching = f"{MODEL}:policy=fixed,batch_timeout=0.02,max_batch_size=8"
    with serving(exported, ["--model-batching", batching]) as process:
        yield process


@pytest.fixture(scope="module")
def stub(mnist_server):
    return prediction_service_pb2_grpc.PredictionServiceStub(mnist_server.channel)


def _request(signature: str, name: str, array: np.ndarray) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    request.inputs[name].CopyFrom(tf.make_tensor_proto(array, shape=list(array.shape)))
    return request


def _images(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, PIXELS), dtype=np.float32)


def test_predict_images_by_signature_name_as_mnist_client_calls_it(stub, loaded):
    """mnist_client.py: signature_name "predict_images", inputs["images"] of shape [1, 784], reads
    outputs["scores"].float_val."""
    image = _images(1, 0)
    response = stub.Predict(_request("predict_images", "images", image), timeout=30)
    assert response.model_spec.signature_name == "predict_images" and response.model_spec.version.value == 1
    expected = loaded.signatures["predict_images"](images=tf.constant(image))["scores"].numpy()
    np.testing.assert_allclose(np.array(response.outputs["scores"].float_val).reshape(1, 10), expected, atol=1e-6)
    assert list(response.outputs) == ["scores"]


def test_classify_images_and_the_default_signature_take_examples(stub, loaded):
    images = _images(3, 1)
    examples = _examples(images)
    expected = loaded.signatures["classify_images"](inputs=tf.constant(examples))
    for signature in ("classify_images", ""):  # "" is serving_default, which is classify_images here
        response = stub.Predict(_request(signature, "inputs", examples), timeout=30)
        assert response.model_spec.signature_name == (signature or "serving_default")
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]), expected["scores"].numpy(), atol=1e-6)
        assert tf.make_ndarray(response.outputs["classes"]).tolist() == expected["classes"].numpy().tolist()


def test_each_signature_is_validated_against_its_own_inputs(stub):
    error = rpc_error(stub.Predict, _request("predict_images", "inputs", _examples(_images(1, 2))), timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "images" in error.details()
    error = rpc_error(stub.Predict, _request("classify_images", "images", _images(1, 2)), timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs" in error.details()


def test_an_unknown_signature_is_refused_naming_those_that_exist(stub):
    error = rpc_error(stub.Predict, _request("predict_digits", "images", _images(1, 3)), timeout=30)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION  # as TF Serving's predict_util.cc
    assert error.details().startswith('Serving signature key "predict_digits" not found')
    assert "its signatures: 'classify_images', 'predict_images', 'serving_default'" in error.details()


def test_metadata_is_the_savedmodels_whole_signature_def_map(stub, exported):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL
    response = stub.GetModelMetadata(request, timeout=10)
    served = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(served)
    saved = saved_model_pb2.SavedModel.FromString((exported / MODEL / "1" / "saved_model.pb").read_bytes())
    (graph,) = saved.meta_graphs
    assert dict(served.signature_def) == dict(graph.signature_def)  # as TF Serving's get_model_metadata_impl.cc
    assert {"predict_images", "classify_images", "serving_default"} <= set(served.signature_def)
    assert [d.size for d in served.signature_def["predict_images"].inputs["images"].tensor_shape.dim] == [-1, PIXELS]


def test_concurrent_calls_of_two_signatures_are_batched_apart_and_counted_apart(mnist_server, stub, loaded):
    """A batch never mixes signatures: 16 concurrent calls of each, every answer the SavedModel's own, and each
    signature's rows counted under its own label."""
    before = {
        s: mnist_server.metric("modelserver_signature_rows_total", model=MODEL, signature=s)
        for s in ("predict_images", "serving_default")
    }
    batches_before = mnist_server.metric("modelserver_batch_size_rows_count", model=MODEL)

    def call(i: int) -> None:
        images = _images(2, 100 + i)
        if i % 2:
            response = stub.Predict(_request("predict_images", "images", images), timeout=60)
            expected = loaded.signatures["predict_images"](images=tf.constant(images))["scores"].numpy()
        else:
            response = stub.Predict(_request("", "inputs", _examples(images)), timeout=60)
            expected = loaded.signatures["serving_default"](inputs=tf.constant(_examples(images)))["scores"].numpy()
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]), expected, atol=1e-6)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(call, range(32)))
    for signature in before:
        rows = mnist_server.metric("modelserver_signature_rows_total", model=MODEL, signature=signature)
        assert rows - before[signature] == 32  # 16 calls of 2 rows each
    assert mnist_server.metric("modelserver_batch_size_rows_count", model=MODEL) > batches_before


def test_rest_predict_honours_signature_name_and_metadata_lists_every_signature(mnist_server, loaded):
    """TF Serving's REST API: "signature_name" in the :predict body, and GET .../metadata with the whole map."""
    image = _images(2, 4)
    url = f"{mnist_server.http_url}/v1/models/{MODEL}"
    reply = requests.post(f"{url}:predict", json={"signature_name": "predict_images", "instances": image.tolist()},
                          timeout=30)  # fmt: skip
    assert reply.status_code == 200, reply.text
    expected = loaded.signatures["predict_images"](images=tf.constant(image))["scores"].numpy()
    np.testing.assert_allclose(np.asarray(reply.json()["predictions"]), expected, atol=1e-6)
    unknown = requests.post(f"{url}:predict", json={"signature_name": "nope", "instances": image.tolist()}, timeout=30)
    assert unknown.status_code == 400
    assert 'Serving signature key "nope" not found' in unknown.json()["error"]
    signatures = requests.get(f"{url}/metadata", timeout=10).json()["metadata"]["signature_def"]["signature_def"]
    assert set(signatures) >= {"predict_images", "classify_images", "serving_default"}
