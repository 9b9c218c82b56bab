"""A SavedModel's own warm-up records (`assets.extra/tf_serving_warmup_requests`, TF Serving's) replayed before its
version is available (issue 24). A string model, which our made-up warm-up cannot warm (no made-up string suits
every model), is measurably slow on its first call: served twice from one server, without records ("cold") and
with them ("warm"), its first real request is compared with its later ones as a ratio (no absolute time). The
metrics count the replayed calls apart from user calls; a bad record fails that version's load, not the server.
"""

from __future__ import annotations

import shutil
import statistics
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from harness.server import serving
from tests.helpers.repositories import make_repository

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
REPLACEMENTS = 500  # regex ops in the graph: its first call builds them all (tens of ms), later calls do not


class _Slugger(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(self, text):
        x = text
        for i in range(REPLACEMENTS):
            x = tf.strings.regex_replace(x, f"w{i}[a-z]+", f"v{i}")
        return {"slug": x, "length": tf.strings.length(x)}


def _predict_request(model: str, texts: list[bytes], name: str = "text") -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs[name].CopyFrom(tf.make_tensor_proto(np.array(texts, dtype=object)))
    return request


def _write_records(version_dir, logs: list[prediction_log_pb2.PredictionLog]) -> None:
    (version_dir / "assets.extra").mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(version_dir / WARMUP_FILE)) as writer:
        for entry in logs:
            writer.write(entry.SerializeToString())


def _predict_log(model: str, texts: list[bytes], name: str = "text") -> prediction_log_pb2.PredictionLog:
    entry = prediction_log_pb2.PredictionLog()
    entry.predict_log.request.CopyFrom(_predict_request(model, texts, name))
    return entry


@pytest.fixture(scope="module")
def warm_server(server, model_repository, tmp_path_factory):
    repository = make_repository(tmp_path_factory.mktemp("warmup"), model_repository)
    module = _Slugger()
    tf.saved_model.save(module, str(repository / "cold" / "1"), signatures={"serving_default": module.serve})
    for name in ("warm", "bad_warmup"):
        shutil.copytree(repository / "cold" / "1", repository / name / "1")
    skipped = prediction_log_pb2.PredictionLog()
    skipped.session_run_log.SetInParent()  # not replayed: logged and skipped
    _write_records(
        repository / "warm" / "1",
        [_predict_log("warm", [b"w1abc x"]), skipped, _predict_log("warm", [b"w7q", b"w3zz w4y"])],
    )
    _write_records(repository / "bad_warmup" / "1", [_predict_log("bad_warmup", [b"x"], name="nope")])
    with serving(repository) as process:
        yield process


def _seconds(stub, model: str, text: bytes) -> float:
    started = time.perf_counter()
    stub.Predict(_predict_request(model, [text]), timeout=60)
    return time.perf_counter() - started


def test_the_first_request_is_as_fast_as_the_tenth_after_the_records_ran(warm_server):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(warm_server.channel)
    assert warm_server.metric("modelserver_warmup_requests_total", model="warm") == 2  # two Predict logs, one skipped
    assert warm_server.metric("modelserver_warmup_requests_total", model="cold") == 0
    assert warm_server.metric("modelserver_requests_total", model="warm", method="tfs.Predict", code="OK") == 0
    assert "warm v1: warm-up record 2 is a session_run_log, which is not replayed: skipped" in warm_server.log_text()
    ratios = {}
    for model in ("cold", "warm"):
        first = _seconds(stub, model, b"w1abc hello")
        later = statistics.median(_seconds(stub, model, f"w{i}abc hello".encode()) for i in range(2, 12))
        ratios[model] = first / later
    # Without records the first call is measurably slow (else this test could not tell anything); with them it is
    # no slower than the calls after it, give or take the noise of a shared machine.
    print("first-call ratios (first / median of calls 2-11):", ratios)
    assert ratios["cold"] > 3, ratios
    assert ratios["warm"] < 3 and ratios["warm"] < ratios["cold"] / 3, ratios
    # The user calls are counted as such, the replayed ones apart.
    assert warm_server.metric("modelserver_requests_total", model="warm", method="tfs.Predict", code="OK") == 11
    assert warm_server.metric("modelserver_signature_rows_total", model="warm", signature="serving_default") == 11
    assert warm_server.metric("modelserver_warmup_requests_total", model="warm") == 2


def test_the_records_answer_like_the_savedmodel(warm_server):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(warm_server.channel)
    texts = [b"w1abc w150zz", b"plain"]
    response = stub.Predict(_predict_request("warm", texts), timeout=30)
    expected = _Slugger().serve(tf.constant(texts))
    assert tf.make_ndarray(response.outputs["slug"]).tolist() == expected["slug"].numpy().tolist()
    assert tf.make_ndarray(response.outputs["length"]).tolist() == expected["length"].numpy().tolist()


def test_a_bad_record_fails_that_version_and_nothing_else(warm_server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "bad_warmup"
    (status,) = (
        model_service_pb2_grpc.ModelServiceStub(warm_server.channel).GetModelStatus(request).model_version_status
    )
    assert status.state == get_model_status_pb2.ModelVersionStatus.END
    assert (
        "warm-up record 1 of assets.extra/tf_serving_warmup_requests: signature 'serving_default' takes inputs "
        "['text'], the record has ['nope']" in status.status.error_message
    )
    assert warm_server.health() == "SERVING"
