"""Replaying a SavedModel's warm-up records (server/runtimes/warmup.py) on a real, tiny SavedModel with TF Serving's
kinds of signatures: Predict logs on a float signature, Classify/Regress/MultiInference logs on a signature of
serialized tf.Examples; bad records fail with the record named. No server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from prometheus_client import REGISTRY
from tensorflow_serving.apis import prediction_log_pb2

from server.runtimes.savedmodel import SavedModelRuntime
from server.runtimes.warmup import WARMUP_FILE, WarmupError, replay


class _Scorer(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = tf.Variable([[0.5], [-1.0]])
        self.calls = tf.Variable(0, dtype=tf.int64)  # what the replayed calls did, read back from the model itself

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
    def predict(self, x):
        self.calls.assign_add(1)
        return {"score": x @ self.w}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(self, inputs):
        self.calls.assign_add(1)
        x = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([2], tf.float32)})["x"]
        return {"scores": x @ self.w}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("warmup") / "1"
    module = _Scorer()
    signatures = {
        "serving_default": module.predict.get_concrete_function(),
        "classify_x": module.classify.get_concrete_function(),
    }
    tf.saved_model.save(module, str(path), signatures=signatures)
    return path


def _runtime(saved: Path, logs: list[prediction_log_pb2.PredictionLog] | bytes) -> SavedModelRuntime:
    (saved / "assets.extra").mkdir(exist_ok=True)
    if isinstance(logs, bytes):
        (saved / WARMUP_FILE).write_bytes(logs)
    else:
        with tf.io.TFRecordWriter(str(saved / WARMUP_FILE)) as writer:
            for entry in logs:
                writer.write(entry.SerializeToString())
    return SavedModelRuntime("scorer", 1, saved, "/device:CPU:0")


def _examples_input(message, rows: list[list[float]]) -> None:
    for row in rows:
        example = message.example_list.examples.add()
        example.features.feature["x"].float_list.value.extend(row)


def _calls(runtime: SavedModelRuntime) -> int:
    return int(runtime._loaded.calls.numpy())


def test_every_kind_of_log_we_can_run_is_replayed_and_counted(saved):
    predict = prediction_log_pb2.PredictionLog()
    predict.predict_log.request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((3, 2), np.float32)))
    classify = prediction_log_pb2.PredictionLog()
    classify.classify_log.request.model_spec.signature_name = "classify_x"
    _examples_input(classify.classify_log.request.input, [[1.0, 2.0]])
    regress = prediction_log_pb2.PredictionLog()
    regress.regress_log.request.model_spec.signature_name = "classify_x"
    _examples_input(regress.regress_log.request.input, [[1.0, 2.0], [3.0, 4.0]])
    multi = prediction_log_pb2.PredictionLog()
    for _ in range(2):
        multi.multi_inference_log.request.tasks.add().model_spec.signature_name = "classify_x"
    _examples_input(multi.multi_inference_log.request.input, [[0.0, 1.0]])
    streamed = prediction_log_pb2.PredictionLog()
    streamed.predict_streamed_log.SetInParent()
    runtime = _runtime(saved, [predict, classify, regress, multi, streamed])
    before = REGISTRY.get_sample_value("modelserver_warmup_requests_total", {"model": "scorer"}) or 0
    calls = _calls(runtime)
    assert replay(runtime) == 5  # one each, two tasks of the MultiInference; the streamed log skipped
    assert _calls(runtime) - calls == 5
    assert REGISTRY.get_sample_value("modelserver_warmup_requests_total", {"model": "scorer"}) == before + 5


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("unknown signature", 'record 1 of .*Serving signature key "nope" not found'),
        ("examples on a float signature", "record 1 of .*signature 'serving_default' does not take serialized"),
        ("wrong dtype", "record 1 of .*input 'x' must be float32, the record has int32"),
        ("not a TFRecord", "is not a TFRecord file of PredictionLogs"),
    ],
)
def test_a_bad_record_fails_with_the_record_named(saved, kind, words):
    entry = prediction_log_pb2.PredictionLog()
    if kind == "unknown signature":
        entry.predict_log.request.model_spec.signature_name = "nope"
    elif kind == "examples on a float signature":
        _examples_input(entry.classify_log.request.input, [[1.0, 2.0]])
    else:
        entry.predict_log.request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((1, 2), np.int32)))
    runtime = _runtime(saved, b"this is not a TFRecord file" if kind == "not a TFRecord" else [entry])
    with pytest.raises(WarmupError, match=words):
        replay(runtime)
