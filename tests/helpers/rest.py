"""The REST tests' repository and requests (tests/integration/test_rest_oip.py, test_rest_tfserving.py): the
built-in models plus three small models built here with tf.Module + tf.function, whose own functions give the
expected outputs; OIP JSON tensors; and one check for an `{"error": ...}` answer.

- `simple` (Triton's simple, the model of its quick start and of `perf_analyzer -m simple`): INT32 INPUT0, INPUT1
  of shape [-1, 16] -> OUTPUT0 their sum, OUTPUT1 their difference (random int32 values are valid inputs).
- `simple_string` (Triton's simple_string): BYTES INPUT0, INPUT1 of shape [-1, 16], decimal strings -> OUTPUT0
  their sums and OUTPUT1 their differences, as strings.
- `echo_bytes`: one BYTES input `data` of shape [-1] -> `echo_bytes` (the bytes as sent; TF Serving's REST API
  writes an output whose name ends in `_bytes` as {"b64": ...}) and `length` (INT32, the bytes' count).
- `doubled_and_total`: FP32 `values` of shape [-1, 4] -> `doubled` (each value twice, a row per row) and `total`
  (the sum of every value, shape [1]): outputs that do not follow the rows, so the server serves it unbatched.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
import tensorflow as tf

BUILTIN = ("multi_input", "shared_layer", "residual_cnn")
TIMEOUT = 60  # seconds for one REST call: generous, never a measurement


def _sum_and_difference(INPUT0, INPUT1):  # noqa: N803 (Triton's names)
    return {"OUTPUT0": INPUT0 + INPUT1, "OUTPUT1": INPUT0 - INPUT1}


def _string_sum_and_difference(INPUT0, INPUT1):  # noqa: N803
    a, b = tf.strings.to_number(INPUT0, tf.int32), tf.strings.to_number(INPUT1, tf.int32)
    return {"OUTPUT0": tf.strings.as_string(a + b), "OUTPUT1": tf.strings.as_string(a - b)}


def _echo(data):
    return {"echo_bytes": data, "length": tf.strings.length(data)}


def _doubled_and_total(values):
    return {"doubled": values * 2, "total": tf.reshape(tf.reduce_sum(values), [1])}


def _save(folder: Path, name: str, function: Callable, *specs: tf.TensorSpec) -> Callable:
    module = tf.Module()
    module.serve = tf.function(function, input_signature=list(specs))
    tf.saved_model.save(module, str(folder / name / "1"), signatures={"serving_default": module.serve})
    return module.serve


def rest_repository(folder: Path, model_repository: Path) -> dict[str, Callable]:
    """Fill `folder` with the session's exported built-in models and the models above; returns the latter's serving
    functions by name."""
    for name in BUILTIN:
        shutil.copytree(model_repository / name, folder / name)

    def pair(dtype: tf.DType) -> tuple[tf.TensorSpec, tf.TensorSpec]:
        return tf.TensorSpec([None, 16], dtype, "INPUT0"), tf.TensorSpec([None, 16], dtype, "INPUT1")

    return {
        "simple": _save(folder, "simple", _sum_and_difference, *pair(tf.int32)),
        "simple_string": _save(folder, "simple_string", _string_sum_and_difference, *pair(tf.string)),
        "echo_bytes": _save(folder, "echo_bytes", _echo, tf.TensorSpec([None], tf.string, "data")),
        "doubled_and_total": _save(
            folder, "doubled_and_total", _doubled_and_total, tf.TensorSpec([None, 4], tf.float32, "values")
        ),
    }


def run_function(function: Callable, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    """A small model's own outputs for these inputs."""
    return {name: t.numpy() for name, t in function(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def oip_json_inputs(arrays: dict[str, np.ndarray], datatype: str = "FP32") -> list[dict[str, Any]]:
    """OIP JSON input tensors (flat `data`) for these arrays."""
    return [
        {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.ravel().tolist()}
        for name, array in arrays.items()
    ]


def assert_error(response: requests.Response, status: int, *phrases: str) -> str:
    """The answer is `{"error": message}` with this HTTP status, as JSON, and the message holds every phrase."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json", response.headers
    document = response.json()
    assert list(document) == ["error"], document
    message = document["error"]
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return message
