"""TensorFlow Serving's REST API (/v1, tensorflow_serving/g3doc/api_rest.md) as its users call it, with `requests`:
`:predict` in the row format ("instances" -> "predictions") and the columnar format ("inputs" -> "outputs"), named and
unnamed inputs, {"b64": ...} strings, "signature_name", model status and metadata with and without a version, and
bodies as TF Serving's clients send them (no Content-Type; curl -d's form type). Answers equal the models' own
outputs; refusals have TF Serving's HTTP code, `{"error": ...}` and a message that says what to fix.

One server for the module: the built-in models (copied from the session's repository) and the small models of
tests/helpers/rest.py (`echo_bytes`: one BYTES input, an output whose name ends in `_bytes`), with a small
--max-receive-message-bytes (LIMIT).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import requests

from harness.server import ServerProcess, serving
from tests.helpers.models import keras_outputs, random_inputs
from tests.helpers.rest import TIMEOUT, assert_error, rest_repository, run_function
from tests.helpers.scrape import Metrics

LIMIT = 256 * 1024
ATOL = 1e-5
# Bytes that are not UTF-8: only {"b64": ...} carries them in JSON.
BINARY = [b"\xff\x00\xfe binary", b"", b"plain text", bytes(range(256))]


@pytest.fixture(scope="module")
def functions(server, model_repository, tmp_path_factory):
    """`server`: the session's server has exported the built-in models into `model_repository`."""
    repository = tmp_path_factory.mktemp("rest_tfserving_repository")
    return repository, rest_repository(repository, model_repository)


@pytest.fixture(scope="module")
def tfs_server(functions):
    with serving(functions[0], ["--max-receive-message-bytes", str(LIMIT)]) as process:
        yield process


@pytest.fixture(scope="module")
def v1(tfs_server: ServerProcess) -> str:
    return f"{tfs_server.http_url}/v1/models"


def _predict(v1: str, model: str, body, version: int | None = None, **options) -> requests.Response:
    path = f"{v1}/{model}" + (f"/versions/{version}" if version is not None else "") + ":predict"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(path, data=data, timeout=TIMEOUT, **options)


def _ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def _rows(arrays: dict[str, np.ndarray]) -> list[dict]:
    count = len(next(iter(arrays.values())))
    return [{name: array[i].tolist() for name, array in arrays.items()} for i in range(count)]


# -- :predict -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [None, 1])
def test_row_format_with_named_inputs(v1, keras_models, version):
    """{"instances": [{name: value, ...} per row]} -> {"predictions": [...]}: one output's values per row, or
    {name: value} per row with several outputs (shared_layer)."""
    for model in ("multi_input", "shared_layer"):
        arrays = random_inputs(keras_models[model], 3, seed=1)
        expected = keras_outputs(keras_models[model], arrays)
        # No Content-Type at all, as TF Serving's own clients send it (requests sets none for bytes).
        response = _predict(v1, model, {"instances": _rows(arrays)}, version)
        assert "content-type" not in {k.lower() for k in response.request.headers}
        predictions = _ok(response)["predictions"]
        assert len(predictions) == 3
        if model == "multi_input":
            np.testing.assert_allclose(np.array(predictions), expected["output"], atol=ATOL)
        else:
            assert all(sorted(p) == ["output_a", "output_b"] for p in predictions)
            for name in ("output_a", "output_b"):
                np.testing.assert_allclose(np.array([p[name] for p in predictions]), expected[name], atol=ATOL)


@pytest.mark.parametrize("version", [None, 1])
def test_columnar_format_with_named_inputs(v1, keras_models, version):
    """{"inputs": {name: batch}} -> {"outputs": batch} with one output, {"outputs": {name: batch}} with several; sent
    as curl -d sends it (application/x-www-form-urlencoded)."""
    curl = {"Content-Type": "application/x-www-form-urlencoded"}
    for model in ("multi_input", "shared_layer"):
        arrays = random_inputs(keras_models[model], 2, seed=2)
        expected = keras_outputs(keras_models[model], arrays)
        body = {"inputs": {name: array.tolist() for name, array in arrays.items()}}
        outputs = _ok(_predict(v1, model, body, version, headers=curl))["outputs"]
        if model == "multi_input":
            np.testing.assert_allclose(np.array(outputs), expected["output"], atol=ATOL)
        else:
            assert sorted(outputs) == ["output_a", "output_b"]
            for name in ("output_a", "output_b"):
                np.testing.assert_allclose(np.array(outputs[name]), expected[name], atol=ATOL)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_curl_as_a_user_types_it(v1, keras_models):
    """`curl -d '{"instances": ...}' .../v1/models/multi_input:predict`: curl sends its form Content-Type."""
    arrays = random_inputs(keras_models["multi_input"], 2, seed=6)
    run = subprocess.run(
        ["curl", "-sS", "-v", "-d", json.dumps({"instances": _rows(arrays)}), f"{v1}/multi_input:predict"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Content-Type: application/x-www-form-urlencoded" in run.stderr  # what curl -d sent
    predictions = json.loads(run.stdout)["predictions"]
    np.testing.assert_allclose(
        np.array(predictions), keras_outputs(keras_models["multi_input"], arrays)["output"], atol=ATOL
    )


def test_a_single_input_model_takes_unnamed_values(v1, keras_models):
    """residual_cnn has one input: rows as bare values ({"instances": [image, ...]}), or the whole batch as the
    bare value of "inputs"; the named forms answer the same."""
    model = keras_models["residual_cnn"]
    images = random_inputs(model, 2, seed=3)["image"]
    expected = keras_outputs(model, {"image": images})["probabilities"]
    for body, key in (
        ({"instances": images.tolist()}, "predictions"),
        ({"inputs": images.tolist()}, "outputs"),
        ({"instances": [{"image": image.tolist()} for image in images]}, "predictions"),
        ({"inputs": {"image": images.tolist()}}, "outputs"),
    ):
        answer = _ok(_predict(v1, "residual_cnn", body))
        assert list(answer) == [key]
        np.testing.assert_allclose(np.array(answer[key]), expected, atol=ATOL)
        assert np.argmax(answer[key], axis=1).tolist() == np.argmax(expected, axis=1).tolist()


def test_b64_strings_in_and_out(v1, functions):
    """{"b64": ...} carries binary strings in; an output whose name ends in `_bytes` comes back as {"b64": ...}, the
    other (INT32 `length`) as numbers; plain JSON strings are strings too."""
    function = functions[1]["echo_bytes"]
    expected = run_function(function, data=np.array(BINARY, dtype=object))
    assert expected["length"].tolist() == [len(b) for b in BINARY]
    encoded = [{"b64": base64.b64encode(b).decode()} for b in BINARY]

    predictions = _ok(_predict(v1, "echo_bytes", {"instances": encoded}))["predictions"]
    assert [base64.b64decode(p["echo_bytes"]["b64"]) for p in predictions] == expected["echo_bytes"].tolist()
    assert [p["length"] for p in predictions] == expected["length"].tolist()

    outputs = _ok(_predict(v1, "echo_bytes", {"inputs": {"data": encoded}}))["outputs"]
    assert [base64.b64decode(o["b64"]) for o in outputs["echo_bytes"]] == expected["echo_bytes"].tolist()
    assert outputs["length"] == expected["length"].tolist()

    # Plain strings (UTF-8) and b64 on a Triton-style string model with two named inputs.
    simple = functions[1]["simple_string"]
    row0, row1 = [str(i) for i in range(16)], [str(-i) for i in range(16)]
    instances = [{"INPUT0": row0, "INPUT1": [{"b64": base64.b64encode(b"5").decode()}] * 16},
                 {"INPUT0": row1, "INPUT1": ["5"] * 16}]  # fmt: skip
    want = run_function(
        simple,
        INPUT0=np.array([[s.encode() for s in row0], [s.encode() for s in row1]], dtype=object),
        INPUT1=np.full((2, 16), b"5", dtype=object),
    )
    predictions = _ok(_predict(v1, "simple_string", {"instances": instances}))["predictions"]
    for name in ("OUTPUT0", "OUTPUT1"):
        assert [[v.encode() for v in p[name]] for p in predictions] == want[name].tolist()
    assert predictions[0]["OUTPUT0"][:3] == ["5", "6", "7"]


def test_outputs_that_do_not_follow_the_rows(v1, functions):
    """doubled_and_total (served unbatched): the columnar format answers every output whole; the row format pairs
    outputs row by row, which works while they have the same number of rows and is refused (400, saying to use the
    columnar format) when they do not."""
    function = functions[1]["doubled_and_total"]
    values = np.arange(8, dtype=np.float32).reshape(2, 4)
    expected = run_function(function, values=values)
    outputs = _ok(_predict(v1, "doubled_and_total", {"inputs": values.tolist()}))["outputs"]
    assert outputs == {"doubled": expected["doubled"].tolist(), "total": expected["total"].tolist()}
    one = run_function(function, values=values[:1])
    predictions = _ok(_predict(v1, "doubled_and_total", {"instances": values[:1].tolist()}))["predictions"]
    assert predictions == [{"doubled": one["doubled"][0].tolist(), "total": one["total"][0].tolist()}]
    response = _predict(v1, "doubled_and_total", {"instances": values.tolist()})
    assert_error(response, 400, "'doubled' 2 rows, 'total' 1 rows", 'send the columnar format ({"inputs": ...})')


def test_signature_name(v1, keras_models):
    arrays = random_inputs(keras_models["multi_input"], 1, seed=4)
    expected = keras_outputs(keras_models["multi_input"], arrays)["output"]
    body = {"signature_name": "serving_default", "instances": _rows(arrays)}
    np.testing.assert_allclose(np.array(_ok(_predict(v1, "multi_input", body))["predictions"]), expected, atol=ATOL)
    response = _predict(v1, "multi_input", {**body, "signature_name": "classify"})
    assert_error(response, 400, 'Serving signature key "classify" not found', "serving_default")


# -- status and metadata --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["", "/versions/1"])
def test_model_status_and_metadata(v1, path):
    """As TF Serving writes them: protobuf's JSON of GetModelStatusResponse and GetModelMetadataResponse (64-bit
    integers as strings, every field present), the signature_def map under metadata.signature_def."""
    status = _ok(requests.get(f"{v1}/shared_layer{path}", timeout=TIMEOUT))
    assert status == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    metadata = _ok(requests.get(f"{v1}/shared_layer{path}/metadata", timeout=TIMEOUT))
    assert metadata["model_spec"] == {"name": "shared_layer", "version": "1", "signature_name": ""}
    assert list(metadata["metadata"]) == ["signature_def"]
    assert list(metadata["metadata"]["signature_def"]) == ["signature_def"]  # no "@type": TF Serving writes none
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"

    def described(tensors: dict) -> dict:
        # The names are the SavedModel graph's own tensors ("serving_default_input_a:0"), as TF Serving shows them.
        assert all(re.fullmatch(r"[\w/]+:\d+", t["name"]) for t in tensors.values()), tensors
        return {name: (t["dtype"], [d["size"] for d in t["tensor_shape"]["dim"]]) for name, t in tensors.items()}

    assert described(signature["inputs"]) == {
        "input_a": ("DT_FLOAT", ["-1", "10"]),
        "input_b": ("DT_FLOAT", ["-1", "20"]),
    }
    assert described(signature["outputs"]) == {
        "output_a": ("DT_FLOAT", ["-1", "1"]),
        "output_b": ("DT_FLOAT", ["-1", "1"]),
    }


# -- bad requests ---------------------------------------------------------------------------------------------------

_A, _B = [0.5] * 10, [0.25] * 20
# (id, HTTP method, path after /v1/models, body, headers, HTTP status, phrases of the message)
BAD_REQUESTS = [
    ("malformed_json", "POST", "/multi_input:predict", b'{"instances": [', {}, 400, ("not valid JSON",)),
    ("not_an_object", "POST", "/multi_input:predict", b"[1, 2]", {}, 400,
     ('must be a JSON object: {"instances": [...]}',)),
    ("both_formats", "POST", "/multi_input:predict", {"instances": [], "inputs": {}}, {}, 400,
     ('exactly one of "instances" (row format) or "inputs" (columnar format)',)),
    ("unknown_field", "POST", "/multi_input:predict", {"instances": [{"input_a": _A, "input_b": _B}], "x": 1}, {},
     400, ("unknown field 'x'",)),
    ("text_html", "POST", "/multi_input:predict", {"instances": [{"input_a": _A, "input_b": _B}]},
     {"Content-Type": "text/html"}, 400, ("Content-Type 'text/html' is not taken", "application/json")),
    ("multipart", "POST", "/multi_input:predict", b"--x\r\n\r\n{}\r\n--x--",
     {"Content-Type": "multipart/form-data; boundary=x"}, 400, ("Content-Type 'multipart/form-data' is not taken",)),
    ("unnamed_on_two_inputs", "POST", "/multi_input:predict", {"instances": [_A]}, {}, 400,
     ("has 2 inputs (input_a, input_b): name them",)),
    ("mixed_named_and_bare", "POST", "/multi_input:predict", {"instances": [{"input_a": _A, "input_b": _B}, _A]}, {},
     400, ("mixes named inputs",)),
    ("unknown_input", "POST", "/multi_input:predict", {"inputs": {"input_a": [_A], "input_c": [_B]}}, {}, 400,
     ("no input named 'input_c'", "expected inputs: input_a, input_b")),
    ("shape_disagrees", "POST", "/multi_input:predict", {"inputs": {"input_a": [_A[:9]], "input_b": [_B]}}, {}, 400,
     ("'input_a' must be float32 of shape (rows, 10), got shape (1, 9)",)),
    ("ragged_rows", "POST", "/multi_input:predict", {"inputs": {"input_a": [_A, _A[:9]], "input_b": [_B, _B]}}, {},
     400, ("'input_a': the values are not a rectangular list of numbers",)),
    ("strings_for_numbers", "POST", "/multi_input:predict", {"inputs": {"input_a": [["x"] * 10], "input_b": [_B]}},
     {}, 400, ("'input_a' takes float32 numbers",)),
    # TF Serving's JSON takes NaN and Infinity: read as numbers, then refused by the model's rule (finite inputs)
    ("nan_input", "POST", "/multi_input:predict",
     b'{"inputs": {"input_a": [[NaN, 0, 0, 0, 0, 0, 0, 0, 0, -Infinity]], "input_b": [%s]}}' % json.dumps(_B).encode(),
     {}, 400, ("'input_a' holds NaN or infinity (first in row 0); the model needs finite values",)),
    ("bad_b64", "POST", "/echo_bytes:predict", {"instances": [{"b64": "not base64!"}]}, {}, 400,
     ("'b64' value is not base64",)),
    ("non_ascii_b64", "POST", "/echo_bytes:predict", {"instances": [{"b64": "\u00e9t\u00e9"}]}, {}, 400,
     ("'b64' value is not base64", "ASCII")),
    ("numbers_for_strings", "POST", "/echo_bytes:predict", {"instances": [1, 2]}, {}, 400,
     ('takes strings: JSON strings, or {"b64": "..."}',)),
    ("bad_version", "POST", "/multi_input/versions/one:predict", {"instances": [{"input_a": _A, "input_b": _B}]}, {},
     400, ("version must be a positive integer, got 'one'",)),
    ("unknown_model", "POST", "/no_such_model:predict", {"instances": [1]}, {}, 404,
     ("Servable not found for request: Latest(no_such_model)", "no model named 'no_such_model'")),
    ("superscript_version", "GET", "/multi_input/versions/%C2%B2", b"", {}, 400,
     ("version must be a positive integer, got '\u00b2'",)),
    ("unknown_version", "POST", "/multi_input/versions/7:predict", {"instances": [{"input_a": _A, "input_b": _B}]},
     {}, 404, ("Servable not found for request: Specific(multi_input, 7)",)),
    ("unknown_model_status", "GET", "/no_such_model", b"", {}, 404,
     ("Could not find any versions of model no_such_model",)),
    ("unknown_version_metadata", "GET", "/multi_input/versions/7/metadata", b"", {}, 404, ("version 7",)),
    ("unknown_route", "POST", "/multi_input:explain", {}, {}, 404,
     ("no endpoint POST '/v1/models/multi_input:explain'",)),
    ("wrong_method", "GET", "/multi_input:predict", b"", {}, 405, ("GET is not allowed", "use POST")),
    ("classify", "POST", "/multi_input:classify", {"examples": []}, {}, 501, ("Classify is not offered", "Predict")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "phrases"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_a_bad_request_is_refused_clearly_and_the_next_is_served(
    v1, keras_models, method, path, body, headers, status, phrases
):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.request(method, v1 + path, data=data, headers=headers, timeout=TIMEOUT)
    assert_error(response, status, *phrases)
    _serves_a_good_request(v1, keras_models)


def _serves_a_good_request(v1: str, keras_models) -> None:
    arrays = random_inputs(keras_models["multi_input"], 2, seed=77)
    predictions = _ok(_predict(v1, "multi_input", {"instances": _rows(arrays)}))["predictions"]
    np.testing.assert_allclose(
        np.array(predictions), keras_outputs(keras_models["multi_input"], arrays)["output"], atol=ATOL
    )


def test_a_body_over_the_limit_is_refused_with_413(v1, keras_models):
    rows = [{"input_a": _A, "input_b": _B}] * (LIMIT // 150)
    body = json.dumps({"instances": rows}).encode()
    assert LIMIT < len(body) < 2 * LIMIT
    assert_error(_predict(v1, "multi_input", body), 413, f"the request body is {len(body)} bytes", f"({LIMIT} bytes")
    _serves_a_good_request(v1, keras_models)


# -- metrics --------------------------------------------------------------------------------------------------------


def test_rest_predict_is_counted_with_its_transport_and_code(tfs_server, v1, keras_models):
    """modelserver_requests_total{transport="http", method="tfs.Predict", code=...}: an OK, an INVALID_ARGUMENT and
    a NOT_FOUND call (the last under the label of unknown models, not the name sent)."""
    keys = [("multi_input", "OK"), ("multi_input", "INVALID_ARGUMENT"), ("multi_input", "NOT_FOUND")]

    def counts() -> dict[tuple[str, str], float]:
        scrape = Metrics(tfs_server)
        found = {
            (model, code): scrape(
                "modelserver_requests_total", model=model, method="tfs.Predict", code=code, transport="http"
            )
            for model, code in keys
        }
        found["grpc"] = scrape("modelserver_requests_total", method="tfs.Predict", transport="grpc")
        found["unnamed"] = scrape("modelserver_requests_total", model="no_such_model")
        return found

    before = counts()
    _serves_a_good_request(v1, keras_models)
    assert _predict(v1, "multi_input", {"instances": [_A]}).status_code == 400
    assert _predict(v1, "multi_input", {"instances": [_A]}, version=7).status_code == 404
    assert _predict(v1, "no_such_model", {"instances": [_A]}).status_code == 404
    after = counts()
    assert {key: after[key] - before[key] for key in before} == {
        ("multi_input", "OK"): 1,
        ("multi_input", "INVALID_ARGUMENT"): 1,
        ("multi_input", "NOT_FOUND"): 1,
        "grpc": 0,
        "unnamed": 0,  # a caller's made-up name is no label value
    }
