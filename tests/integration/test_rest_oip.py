"""The Open Inference Protocol over HTTP (/v2) as its own clients use it: tritonclient.http (sync, async_infer and
aio), perf_analyzer -i http and plain `requests`, unmodified. Every answer is compared with the model's own outputs;
every refusal with its HTTP code and a message that says what to fix, and the server serves a good request after it.

One server for the module: the built-in models (copied from the session's repository) and the small models of
tests/helpers/rest.py (Triton's simple and simple_string among them), with --repository-control on and a small
--max-receive-message-bytes (LIMIT) so that a body over it costs little to send.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import time
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import requests
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from bench import perf_analyzer
from harness.server import ServerProcess, serving
from tests.helpers.models import keras_outputs, random_inputs
from tests.helpers.rest import TIMEOUT, assert_error, oip_json_inputs, rest_repository, run_function
from tests.helpers.scrape import Metrics

LIMIT = 256 * 1024  # --max-receive-message-bytes: every good request here is smaller
MODELS = ("multi_input", "shared_layer", "residual_cnn")
ATOL = 1e-5


@pytest.fixture(scope="module")
def small_models(server, model_repository, tmp_path_factory):
    """The repository and the small models' serving functions. `server`: the session's server has exported the
    built-in models into `model_repository`."""
    repository = tmp_path_factory.mktemp("rest_oip_repository")
    return repository, rest_repository(repository, model_repository)


@pytest.fixture(scope="module")
def rest_server(small_models):
    args = ["--repository-control", "true", "--max-receive-message-bytes", str(LIMIT)]
    with serving(small_models[0], args) as process:
        yield process


@pytest.fixture(scope="module")
def url(rest_server: ServerProcess) -> str:
    return rest_server.http_url.removeprefix("http://")  # tritonclient.http takes host:port


@pytest.fixture(scope="module")
def client(url):
    client = triton.InferenceServerClient(url, connection_timeout=TIMEOUT, network_timeout=TIMEOUT)
    yield client
    client.close()


def _inputs(arrays: dict[str, np.ndarray], binary: bool = True, datatype: str = "FP32") -> list[triton.InferInput]:
    tensors = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    return tensors


def _outputs(model, binary: bool) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name, binary_data=binary) for name in model.output_names]


def _check(result: triton.InferResult, expected: dict[str, np.ndarray], binary_outputs: bool) -> None:
    """Each output equals the model's, and came as binary data or as JSON `data` as it was asked for."""
    answered = {output["name"]: output for output in result.get_response()["outputs"]}
    assert sorted(answered) == sorted(expected)
    for name, want in expected.items():
        if binary_outputs:
            assert answered[name]["parameters"]["binary_data_size"] == want.size * 4 and "data" not in answered[name]
        else:
            assert len(answered[name]["data"]) == want.size and "parameters" not in answered[name]
        assert answered[name]["shape"] == list(want.shape)
        np.testing.assert_allclose(result.as_numpy(name), want, atol=ATOL)


def _multi_input_body(rows: int = 1, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {"input_a": rng.random((rows, 10), dtype=np.float32), "input_b": rng.random((rows, 20), dtype=np.float32)}
    return {"inputs": oip_json_inputs(arrays)}


def _serves_a_good_request(rest_server: ServerProcess, keras_models) -> None:
    """After a refusal: a good JSON request on a new connection is answered with the model's outputs."""
    rng = np.random.default_rng(99)
    arrays = {"input_a": rng.random((2, 10), dtype=np.float32), "input_b": rng.random((2, 20), dtype=np.float32)}
    response = requests.post(
        f"{rest_server.http_url}/v2/models/multi_input/infer", json={"inputs": oip_json_inputs(arrays)}, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    want = keras_outputs(keras_models["multi_input"], arrays)["output"]
    np.testing.assert_allclose(np.array(output["data"]).reshape(output["shape"]), want, atol=ATOL)


# -- inference with tritonclient.http ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_tritonclient_infers_with_binary_and_json_inputs_and_outputs(client, keras_models, model):
    """Every combination of binary/JSON inputs and binary (tritonclient's default)/JSON outputs."""
    keras_model = keras_models[model]
    arrays = random_inputs(keras_model, 3, seed=len(model))
    expected = keras_outputs(keras_model, arrays)
    for binary_inputs in (True, False):
        for binary_outputs in (True, False):
            result = client.infer(
                model,
                _inputs(arrays, binary_inputs),
                outputs=_outputs(keras_model, binary_outputs),
                request_id=f"{model}-{binary_inputs}-{binary_outputs}",
            )
            _check(result, expected, binary_outputs)
            response = result.get_response()
            assert response["id"] == f"{model}-{binary_inputs}-{binary_outputs}"
            assert (response["model_name"], response["model_version"]) == (model, "1")
    # No outputs named: every output, in binary (tritonclient asks for binary_data_output).
    _check(client.infer(model, _inputs(arrays), model_version="1"), expected, binary_outputs=True)


def test_one_reply_with_a_binary_and_a_json_output(client, keras_models):
    """shared_layer's output_a asked for in binary, output_b in JSON: both in one reply, each as asked."""
    keras_model = keras_models["shared_layer"]
    arrays = random_inputs(keras_model, 2, seed=31)
    outputs = [triton.InferRequestedOutput("output_a"), triton.InferRequestedOutput("output_b", binary_data=False)]
    result = client.infer("shared_layer", _inputs(arrays), outputs=outputs)
    answered = {output["name"]: output for output in result.get_response()["outputs"]}
    assert answered["output_a"]["parameters"] == {"binary_data_size": 8} and "data" not in answered["output_a"]
    assert len(answered["output_b"]["data"]) == 2 and "parameters" not in answered["output_b"]
    for name, want in keras_outputs(keras_model, arrays).items():
        np.testing.assert_allclose(result.as_numpy(name), want, atol=ATOL)


@pytest.mark.parametrize("binary", [True, False])
def test_classification_as_tritonclient_asks_for_it(client, keras_models, binary):
    """InferRequestedOutput(class_count=3): per row the 3 highest scores, highest first, as BYTES 'score:index'."""
    keras_model = keras_models["residual_cnn"]
    arrays = random_inputs(keras_model, 2, seed=32)
    output = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    classes = client.infer("residual_cnn", _inputs(arrays), outputs=[output]).as_numpy("probabilities")
    assert classes.shape == (2, 3)
    for row, want in zip(classes.tolist(), keras_outputs(keras_model, arrays)["probabilities"], strict=True):
        scores, indices = zip(*((v if isinstance(v, str) else v.decode()).split(":") for v in row), strict=True)
        assert [int(i) for i in indices] == np.argsort(-want)[:3].tolist()
        np.testing.assert_allclose([float(s) for s in scores], np.sort(want)[::-1][:3], atol=ATOL)


def test_the_wire_format_as_the_binary_extension_defines_it(rest_server, keras_models):
    """Read without tritonclient: nested JSON `data`, the `id` echoed, one requested output; with
    `binary_data_output` the reply is the JSON header (its length in Inference-Header-Content-Length) followed by
    the output's little-endian float32 values; a flag that is not a boolean is refused, not read as false."""
    keras_model = keras_models["shared_layer"]
    arrays = random_inputs(keras_model, 3, seed=33)
    want = keras_outputs(keras_model, arrays)["output_b"]
    inputs = [
        {"name": name, "datatype": "FP32", "shape": list(a.shape), "data": a.tolist()} for name, a in arrays.items()
    ]
    body = {"id": "wire-1", "inputs": inputs, "outputs": [{"name": "output_b"}]}
    infer = f"{rest_server.http_url}/v2/models/shared_layer/infer"

    response = requests.post(infer, json=body, timeout=TIMEOUT)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    document = response.json()
    assert (document["id"], document["model_name"], document["model_version"]) == ("wire-1", "shared_layer", "1")
    (output,) = document["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("output_b", "FP32", [3, 1])
    np.testing.assert_allclose(np.array(output["data"]).reshape(3, 1), want, atol=ATOL)

    response = requests.post(infer, json={**body, "parameters": {"binary_data_output": True}}, timeout=TIMEOUT)
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    header, data = json.loads(response.content[:length]), response.content[length:]
    (output,) = header["outputs"]
    assert output["parameters"] == {"binary_data_size": 12} and len(data) == 12 and "data" not in output
    np.testing.assert_allclose(np.frombuffer(data, "<f4").reshape(3, 1), want, atol=ATOL)

    for parameters in ({"binary_data_output": "true"}, {"binary_data_output": 1}):
        response = requests.post(infer, json={**body, "parameters": parameters}, timeout=TIMEOUT)
        assert_error(response, 400, "parameter 'binary_data_output' must be true or false")
    body["outputs"] = [{"name": "output_b", "parameters": {"binary_data": "yes"}}]
    assert_error(
        requests.post(infer, json=body, timeout=TIMEOUT), 400, "output 'output_b': parameter 'binary_data' must be"
    )


def test_async_infer_and_the_aio_client(client, url, keras_models):
    """The sync client's async_infer (several in flight at once) and tritonclient.http.aio's infer under gather."""
    keras_model = keras_models["shared_layer"]
    batches = [random_inputs(keras_model, 1 + i % 3, seed=100 + i) for i in range(6)]
    pending = [
        client.async_infer("shared_layer", _inputs(arrays), request_id=str(i)) for i, arrays in enumerate(batches)
    ]
    for i, (request, arrays) in enumerate(zip(pending, batches, strict=True)):
        result = request.get_result(timeout=TIMEOUT)
        assert result.get_response()["id"] == str(i)
        _check(result, keras_outputs(keras_model, arrays), binary_outputs=True)

    async def aio() -> list[triton.InferResult]:
        async with triton_aio.InferenceServerClient(url, conn_timeout=TIMEOUT) as aio_client:
            assert await aio_client.is_server_ready() and await aio_client.is_model_ready("shared_layer")
            return await asyncio.gather(
                *(
                    aio_client.infer(
                        "shared_layer",
                        _inputs(arrays),
                        outputs=_outputs(keras_model, binary=i % 2 == 0),
                        request_id=f"aio{i}",
                    )
                    for i, arrays in enumerate(batches)
                )
            )

    for i, (result, arrays) in enumerate(zip(asyncio.run(aio()), batches, strict=True)):
        assert result.get_response()["id"] == f"aio{i}"
        _check(result, keras_outputs(keras_model, arrays), binary_outputs=i % 2 == 0)


def test_the_aio_client_with_json_inputs(url, keras_models):
    keras_model = keras_models["multi_input"]
    arrays = random_inputs(keras_model, 2, seed=12)

    async def aio() -> triton.InferResult:
        async with triton_aio.InferenceServerClient(url, conn_timeout=TIMEOUT) as aio_client:
            return await aio_client.infer("multi_input", _inputs(arrays, binary=False))

    _check(asyncio.run(aio()), keras_outputs(keras_model, arrays), binary_outputs=True)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_replies(client, rest_server, keras_models, algorithm):
    """tritonclient's request_compression_algorithm / response_compression_algorithm; and, read with `requests`,
    a reply large enough to pay for it comes compressed only when Accept-Encoding asks."""
    keras_model = keras_models["residual_cnn"]
    arrays = random_inputs(keras_model, 32, seed=5)  # 1,280 bytes of binary output: enough to be compressed
    expected = keras_outputs(keras_model, arrays)
    for binary_outputs in (True, False):
        result = client.infer(
            "residual_cnn",
            _inputs(arrays),
            outputs=_outputs(keras_model, binary_outputs),
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        _check(result, expected, binary_outputs)

    arrays = {"image": arrays["image"][:16]}  # as JSON, 32 rows would be more than LIMIT once decompressed
    expected = keras_outputs(keras_model, arrays)
    body = json.dumps({"inputs": oip_json_inputs(arrays)}).encode()
    compressed = gzip.compress(body) if algorithm == "gzip" else zlib.compress(body)
    infer = f"{rest_server.http_url}/v2/models/residual_cnn/infer"
    headers = {"Content-Encoding": algorithm, "Content-Type": "application/json"}
    # urllib3 would undo the reply's compression: read the raw bytes to see what came over the wire.
    for accept, encoding in ((algorithm, algorithm), ("identity", None)):
        response = requests.post(
            infer, data=compressed, headers={**headers, "Accept-Encoding": accept}, timeout=TIMEOUT, stream=True
        )
        assert response.status_code == 200
        assert response.headers.get("content-encoding") == encoding
        raw = response.raw.read(decode_content=False)
        document = json.loads(raw if encoding is None else (gzip if algorithm == "gzip" else zlib).decompress(raw))
        (output,) = document["outputs"]
        np.testing.assert_allclose(
            np.array(output["data"]).reshape(output["shape"]), expected["probabilities"], atol=ATOL
        )


def test_a_string_model_with_binary_and_json_bytes(client, small_models):
    """Triton's simple_http_string_infer_client.py: BYTES tensors in binary (4-byte length prefixes) and JSON
    (strings), answered in binary and in JSON."""
    function = small_models[1]["simple_string"]
    rows = np.array([[str(i + 10 * r).encode() for i in range(16)] for r in range(3)], dtype=object)
    minus_seven = np.full((3, 16), b"-7", dtype=object)
    expected = run_function(function, INPUT0=rows, INPUT1=minus_seven)
    assert [int(v) for v in expected["OUTPUT0"][1]] == [i + 10 - 7 for i in range(16)]  # the model is Triton's
    assert client.is_model_ready("simple_string")
    for binary_inputs in (True, False):
        for binary_outputs in (True, False):
            tensors = _inputs({"INPUT0": rows, "INPUT1": minus_seven}, binary_inputs, "BYTES")
            outputs = [triton.InferRequestedOutput(name, binary_data=binary_outputs) for name in ("OUTPUT0", "OUTPUT1")]
            result = client.infer("simple_string", tensors, outputs=outputs)
            for name in ("OUTPUT0", "OUTPUT1"):
                got = result.as_numpy(name)
                assert got.shape == (3, 16)
                # JSON BYTES come back as str, binary ones as bytes (tritonclient's own reading of each)
                assert [[v if isinstance(v, bytes) else v.encode() for v in row] for row in got.tolist()] == expected[
                    name
                ].tolist()
                output = next(o for o in result.get_response()["outputs"] if o["name"] == name)
                assert output["datatype"] == "BYTES" and ("binary_data_size" in output.get("parameters", {})) == (
                    binary_outputs
                )


def test_an_int32_model_with_binary_and_json_tensors(client, small_models):
    """Triton's simple: integers travel as JSON integers or little-endian int32, exactly."""
    rng = np.random.default_rng(21)
    a, b = (rng.integers(-1000, 1000, (2, 16), dtype=np.int32) for _ in range(2))
    expected = run_function(small_models[1]["simple"], INPUT0=a, INPUT1=b)
    for binary in (True, False):
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("OUTPUT0", "OUTPUT1")]
        result = client.infer("simple", _inputs({"INPUT0": a, "INPUT1": b}, binary, "INT32"), outputs=outputs)
        for name in ("OUTPUT0", "OUTPUT1"):
            assert result.as_numpy(name).dtype == np.int32
            np.testing.assert_array_equal(result.as_numpy(name), expected[name])


# -- health, metadata, config, statistics, repository ---------------------------------------------------------------


def test_health_metadata_config_and_statistics(client, rest_server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("residual_cnn") and client.is_model_ready("residual_cnn", "1")
    assert not client.is_model_ready("no_such_model") and not client.is_model_ready("residual_cnn", "7")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "modelserver"
    assert {"model_repository", "model_configuration", "statistics"} <= set(metadata["extensions"])

    metadata = client.get_model_metadata("shared_layer", "1")
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == (
        "shared_layer",
        ["1"],
        "tensorflow_savedmodel",
    )
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("input_a", "FP32", [-1, 10]),
        ("input_b", "FP32", [-1, 20]),
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("output_a", "FP32", [-1, 1]),
        ("output_b", "FP32", [-1, 1]),
    ]
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("no_such_model")
    assert caught.value.status() == "404" and caught.value.message().startswith("Request for unknown model")

    config = client.get_model_config("residual_cnn")
    assert (config["name"], config["max_batch_size"]) == ("residual_cnn", 64)
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("image", "TYPE_FP32", [28, 28, 1])]
    assert [(o["name"], o["dims"]) for o in config["output"]] == [("probabilities", [10])]
    batching = config["dynamic_batching"]  # Triton writes its 64-bit integers as numbers, not protobuf's strings
    assert all(isinstance(batching[key], int) for key in ("max_queue_delay_microseconds", "priority_levels"))
    assert batching["preferred_batch_size"][-1] == 64

    def counts() -> tuple[int, int, int]:
        (stats,) = client.get_inference_statistics("residual_cnn", "1")["model_stats"]
        assert (stats["name"], stats["version"]) == ("residual_cnn", "1")
        return stats["inference_count"], stats["execution_count"], stats["inference_stats"]["success"]["count"]

    before = counts()
    image = np.zeros((3, 28, 28, 1), np.float32)
    client.infer("residual_cnn", _inputs({"image": image}))
    after = counts()
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (3, 1, 1)  # 3 rows, 1 request
    every = client.get_inference_statistics()["model_stats"]
    assert {"multi_input", "shared_layer", "residual_cnn", "simple_string"} <= {s["name"] for s in every}


def test_repository_index_unload_and_load(client, keras_models):
    """With --repository-control: the index lists every model; an unloaded model is not ready and refuses
    inference (404, Triton's words); loaded again, it answers as before."""
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert set(MODELS) | {"simple_string", "echo_bytes"} <= set(index)
    assert index["shared_layer"]["state"] == "READY" and index["shared_layer"]["version"] == "1"
    keras_model = keras_models["shared_layer"]
    arrays = random_inputs(keras_model, 2, seed=8)
    try:
        client.unload_model("shared_layer")
        _wait_until(lambda: not client.is_model_ready("shared_layer"), "shared_layer unloaded")
        index = {entry["name"]: entry for entry in client.get_model_repository_index()}
        assert index["shared_layer"]["state"] == "UNAVAILABLE" and "unloaded" in index["shared_layer"]["reason"]
        assert index["multi_input"]["state"] == "READY" and client.is_model_ready("multi_input")
        with pytest.raises(InferenceServerException) as caught:
            client.infer("shared_layer", _inputs(arrays))
        # Known but without a version: UNAVAILABLE (retryable), as on gRPC, saying what to do
        assert caught.value.status() == "503"
        assert "'shared_layer' has no version available" in caught.value.message()
        assert "load one and retry" in caught.value.message()
    finally:
        client.load_model("shared_layer")
    assert client.is_model_ready("shared_layer")
    _check(client.infer("shared_layer", _inputs(arrays)), keras_outputs(keras_model, arrays), binary_outputs=True)
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("no_such_model")
    assert caught.value.status() == "404" and "no_such_model" in caught.value.message()


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- perf_analyzer -i http ------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not perf_analyzer.binary().is_file(), reason="perf_analyzer not installed: run `make perf-analyzer`"
)
@pytest.mark.parametrize("data", ["random", "zero", "json_file"])
def test_perf_analyzer_over_http(rest_server, url, tmp_path, keras_models, data):
    """Without --input-data (random values, binary tensors) on Triton's `simple` (INT32: random values are valid
    numbers, which random FP32 bytes, NaN among them, are not); --input-data zero on residual_cnn in batches of 2;
    and --input-data from a JSON file of multi_input rows, sent and answered as JSON tensors."""
    model, extra = {"random": ("simple", []), "zero": ("residual_cnn", ["-b", "2", "--input-data", "zero"])}.get(
        data, ("multi_input", [])
    )
    if data == "json_file":
        rows = random_inputs(keras_models[model], 4, seed=9)
        (tmp_path / "data.json").write_text(
            json.dumps({"data": [{name: rows[name][i].tolist() for name in rows} for i in range(4)]})
        )
        extra = ["--input-data", str(tmp_path / "data.json"), "--input-tensor-format", "json",
                 "--output-tensor-format", "json"]  # fmt: skip
    codes = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL", "UNAVAILABLE", "RESOURCE_EXHAUSTED")

    def counted() -> dict[str, float]:
        scrape = Metrics(rest_server)
        return {
            code: scrape(
                "modelserver_requests_total", model=model, method="oip.ModelInfer", code=code, transport="http"
            )
            for code in codes
        }

    before = counted()
    run = subprocess.run(
        [str(perf_analyzer.binary()), "-m", model, "-i", "http", "-u", url, *extra,
         "--concurrency-range", "2", "--measurement-interval", "500", "--stability-percentage", "1000",
         "--max-trials", "3"],
        env=perf_analyzer.environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "error" not in (run.stdout + run.stderr).lower(), run.stdout + run.stderr
    assert "Inferences/Second vs. Client Average Batch Latency" in run.stdout
    after = counted()
    assert after["OK"] > before["OK"]
    assert {code: after[code] - before[code] for code in codes[1:]} == dict.fromkeys(codes[1:], 0)


# -- bad requests ---------------------------------------------------------------------------------------------------


def _binary_body(sizes: tuple[int, int], data: bytes, header_length: int | None = None) -> tuple[bytes, dict]:
    header = json.dumps(
        {
            "inputs": [
                {"name": "input_a", "datatype": "FP32", "shape": [1, 10], "parameters": {"binary_data_size": sizes[0]}},
                {"name": "input_b", "datatype": "FP32", "shape": [1, 20], "parameters": {"binary_data_size": sizes[1]}},
            ]
        }
    ).encode()
    length = len(header) if header_length is None else header_length
    return header + data, {"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"}


def _huge_binary_body() -> tuple[bytes, dict]:
    """40 bytes of data under a declared shape of 2**40 values (4 TiB of FP32)."""
    header = json.dumps(
        {
            "inputs": [
                {"name": "input_a", "datatype": "FP32", "shape": [1, 2**40], "parameters": {"binary_data_size": 40}}
            ]
        }
    ).encode()
    return header + bytes(40), {"Inference-Header-Content-Length": str(len(header))}


def _with(change: Callable[[dict], None]) -> bytes:
    body = _multi_input_body()
    change(body)
    return json.dumps(body).encode()


def _set(path: tuple, value) -> Callable[[dict], None]:
    def change(body: dict) -> None:
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


FLOATS = np.zeros(30, np.float32).tobytes()
JSON = {"Content-Type": "application/json"}
# (id, method, path, body, headers, HTTP status, phrases of the message)
BAD_REQUESTS = [
    ("malformed_json", "POST", "/v2/models/multi_input/infer", b'{"inputs": [', JSON, 400,
     ("not valid JSON", "unexpected end of data")),
    ("text_html", "POST", "/v2/models/multi_input/infer", _with(lambda b: None), {"Content-Type": "text/html"}, 400,
     ("Content-Type 'text/html' is not taken", "application/json")),
    ("multipart", "POST", "/v2/models/multi_input/infer", b"--x\r\n\r\n{}\r\n--x--",
     {"Content-Type": "multipart/form-data; boundary=x"}, 400, ("Content-Type 'multipart/form-data' is not taken",)),
    ("header_longer_than_body", "POST", "/v2/models/multi_input/infer", *_binary_body((40, 80), FLOATS, 10_000), 400,
     ("Inference-Header-Content-Length is 10000, more than the whole body",)),
    ("binary_size_beyond_body", "POST", "/v2/models/multi_input/infer", *_binary_body((40, 80), FLOATS[:-4]), 400,
     ("'input_b' says binary_data_size 80, but the body has only 76 bytes",)),
    ("binary_bytes_left_over", "POST", "/v2/models/multi_input/infer", *_binary_body((40, 80), FLOATS + b"\0" * 8),
     400, ("128 bytes of binary data after the JSON header", "add up to 120")),
    ("binary_size_not_the_shape", "POST", "/v2/models/multi_input/infer", *_binary_body((40, 76), FLOATS[:-4]), 400,
     ("'input_b' of shape [1, 20] and datatype FP32 needs 80 bytes", "got 76")),
    ("shape_disagrees_with_data", "POST", "/v2/models/multi_input/infer", _with(_set(("inputs", 0, "shape"), [2, 10])),
     JSON, 400, ("input 'input_a' has shape [2, 10] (20 elements), got 10 values",)),
    ("wrong_datatype", "POST", "/v2/models/multi_input/infer", _with(_set(("inputs", 0, "datatype"), "INT32")), JSON,
     400, ("'input_a' has datatype FP32, got 'INT32'",)),
    ("strings_for_numbers", "POST", "/v2/models/multi_input/infer", _with(_set(("inputs", 1, "data"), ["x"] * 20)),
     JSON, 400, ("'input_b' takes float32 numbers", "send a (nested) list of numbers")),
    ("gigabytes_declared_json", "POST", "/v2/models/multi_input/infer",
     _with(_set(("inputs", 0, "shape"), [2**40, 10])), JSON, 400,
     ("takes at most 4096 rows per request, got 1099511627776", "split the request")),
    ("gigabytes_declared_binary", "POST", "/v2/models/multi_input/infer", *_huge_binary_body(), 400,
     ("shape [1, 1099511627776] declares 1099511627776 elements", "the model takes at most 40960 elements")),
    ("unknown_model", "POST", "/v2/models/no_such_model/infer", _with(lambda b: None), JSON, 404,
     ("Request for unknown model", "no model named 'no_such_model'")),
    ("unknown_version", "GET", "/v2/models/multi_input/versions/7", b"", {}, 404,
     ("Request for unknown model", "no loaded version 7")),
    ("unknown_route", "GET", "/v2/models/multi_input/explain", b"", {}, 404,
     ("no endpoint GET '/v2/models/multi_input/explain'", "/openapi.json")),
    ("wrong_method", "GET", "/v2/models/multi_input/infer", b"", {}, 405, ("GET is not allowed", "use POST")),
    ("system_shared_memory", "GET", "/v2/systemsharedmemory/status", b"", {}, 501,
     ("'system_shared_memory' extension", "does not offer")),
    ("cuda_shared_memory", "POST", "/v2/cudasharedmemory/region/r0/register", b"{}", JSON, 501,
     ("'cuda_shared_memory' extension",)),
    ("trace", "GET", "/v2/trace/setting", b"", {}, 501, ("'trace' extension",)),
    ("logging", "POST", "/v2/logging", b"{}", JSON, 501, ("'logging' extension",)),
    ("lone_surrogate", "POST", "/v2/models/multi_input/infer", _with(_set(("id",), "\ud800")),
     JSON, 400, ("not valid JSON", "surrogates not allowed")),
    ("nested_too_deep", "POST", "/v2/models/multi_input/infer", b"[" * 5000 + b"]" * 5000, JSON, 400,
     ("not valid JSON",)),
    ("header_length_not_a_number", "POST", "/v2/models/multi_input/infer", b"{}",
     {"Inference-Header-Content-Length": "\u00b2"}, 400,
     ("Inference-Header-Content-Length must be a number of bytes",)),
    ("version_not_a_number", "GET", "/v2/models/multi_input/versions/%C2%B2", b"", {}, 400,
     ("failed to get model version from specified version string '\u00b2'",)),
    ("bad_gzip", "POST", "/v2/models/multi_input/infer", b"not gzip at all", {"Content-Encoding": "gzip"}, 400,
     ("not valid gzip data", "compress it with gzip")),
]  # fmt: skip


KNOWN_BUGS: dict[str, pytest.MarkDecorator] = {}  # refusals that fail today: strict xfails, unmarked once fixed


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "phrases"),
    [pytest.param(*case[1:], id=case[0], marks=KNOWN_BUGS.get(case[0], ())) for case in BAD_REQUESTS],
)
def test_a_bad_request_is_refused_clearly_and_the_next_is_served(
    rest_server, keras_models, method, path, body, headers, status, phrases
):
    response = requests.request(method, rest_server.http_url + path, data=body, headers=headers, timeout=TIMEOUT)
    assert_error(response, status, *phrases)
    if status == 405:
        assert response.headers["allow"] == "POST"
    _serves_a_good_request(rest_server, keras_models)


def test_a_body_over_the_limit_is_refused_with_413(rest_server, keras_models):
    """Sent (Content-Length over --max-receive-message-bytes) or decompressed (a small gzip body that inflates
    beyond it): 413, and the connection is closed, never read to its end."""
    big = json.dumps({"inputs": [{"name": "input_a", "datatype": "FP32", "shape": [1], "data": [0.0] * (LIMIT // 5)}]})
    assert LIMIT < len(big) < LIMIT + 1024
    infer = f"{rest_server.http_url}/v2/models/multi_input/infer"
    response = requests.post(infer, data=big.encode(), headers=JSON, timeout=TIMEOUT)
    assert_error(
        response, 413, f"the request body is {len(big)} bytes", f"({LIMIT} bytes, --max-receive-message-bytes)"
    )
    assert response.headers["connection"] == "close"
    _serves_a_good_request(rest_server, keras_models)

    bomb = gzip.compress(b" " * (4 * LIMIT))
    assert len(bomb) < LIMIT // 16
    response = requests.post(infer, data=bomb, headers={**JSON, "Content-Encoding": "gzip"}, timeout=TIMEOUT)
    assert_error(response, 413, "decompresses to more than", f"({LIMIT} bytes, --max-receive-message-bytes)")
    _serves_a_good_request(rest_server, keras_models)


def test_tritonclient_sees_the_servers_message(client):
    """What a tritonclient.http user reads for a refused request: the HTTP status and the server's message."""
    tensors = _inputs({"input_a": np.zeros((2, 10), np.float32), "input_b": np.zeros((3, 20), np.float32)})
    with pytest.raises(InferenceServerException) as caught:
        client.infer("multi_input", tensors)
    assert caught.value.status() == "400"
    assert "input_a" in caught.value.message() and "input_b" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.infer("no_such_model", tensors)
    assert caught.value.status() == "404" and caught.value.message().startswith("Request for unknown model")


# -- metrics --------------------------------------------------------------------------------------------------------


def test_rest_inference_is_counted_with_its_transport_and_code(rest_server, keras_models):
    """modelserver_requests_total{transport="http", method="oip.ModelInfer", code=...}: one OK and one
    INVALID_ARGUMENT call counted on HTTP, none on gRPC."""
    labels = {"model": "multi_input", "method": "oip.ModelInfer"}

    def count(code: str, transport: str) -> float:
        return Metrics(rest_server)("modelserver_requests_total", **labels, code=code, transport=transport)

    def timed() -> float:
        return Metrics(rest_server)("modelserver_request_duration_seconds_count", **labels, transport="http")

    before = {(code, t): count(code, t) for code in ("OK", "INVALID_ARGUMENT") for t in ("http", "grpc")}
    timed_before = timed()
    _serves_a_good_request(rest_server, keras_models)
    bad = requests.post(
        f"{rest_server.http_url}/v2/models/multi_input/infer",
        data=_with(_set(("inputs", 0, "datatype"), "INT32")),
        timeout=TIMEOUT,
    )
    assert bad.status_code == 400
    after = {key: count(*key) for key in before}
    assert {key: after[key] - before[key] for key in before} == {
        ("OK", "http"): 1,
        ("INVALID_ARGUMENT", "http"): 1,
        ("OK", "grpc"): 0,
        ("INVALID_ARGUMENT", "grpc"): 0,
    }
    assert timed() - timed_before == 2  # the same two calls, timed
