"""The load-test tool without a server: its settings and requests, its command line's usage errors, and a socket
that never answers; the REST protocols' bodies, and their status counting against a scripted HTTP server in this
process. tests/integration/test_loadtest.py runs it against a real server.

Nothing here asserts on timing.
"""

from __future__ import annotations

import asyncio
import json
import socket
from http import HTTPStatus

import numpy as np
import pytest

from clients import oip, rest
from clients.cli import main as cli_main
from clients.loadtest import CLIENT_OVERLOAD, LoadTestConfig, LoadTestResult, build_request, run_loadtest
from tests.helpers.loadtest import assert_consistent


def test_a_silent_server_hits_the_deadline_and_the_open_loop_cap() -> None:
    """A socket that never answers: the calls in flight end at their deadline, the rest are not sent. All ten are
    due within 10 ms, long before the first two calls' 3 s deadline frees a slot."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        config = LoadTestConfig(
            target=target, model="multi_input", rate=1000, requests=10, max_outstanding=2, timeout=3
        )
        result = asyncio.run(run_loadtest(config))
    assert result.ok == 0 and result.requests == 10
    assert result.errors[CLIENT_OVERLOAD] == 8
    assert set(result.errors) <= {CLIENT_OVERLOAD, "DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert_consistent(result)
    # The two calls sent ended at their deadline, not before: timed from their send, per code.
    ended = result.latency_from_send_ms_by_code.get("DEADLINE_EXCEEDED")
    assert ended is None or ended["p50"] >= 2900, ended


def test_request_is_built_once_with_the_models_shapes() -> None:
    request = build_request("residual_cnn", rows=3, version=2, seed=7)
    assert len(request.image) == 3 * 28 * 28 and request.version == 2
    assert build_request("residual_cnn", 3, 2, 7) == request  # seeded: the same rows every run
    request = build_request("multi_input", rows=4)
    assert (len(request.input_a), len(request.input_b)) == (40, 80)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"concurrency": 2},
        {"requests": 2},
        {"concurrency": 2, "rate": 5.0, "requests": 2},
        {"concurrency": 2, "requests": 2, "duration": 1.0},
        {"concurrency": 0, "requests": 2},
        {"rate": -1.0, "requests": 2},
        {"concurrency": 2, "requests": 2, "rows_per_request": 0},
        {"concurrency": 2, "requests": 2, "warmup": -1.0},
    ],
)
def test_bad_settings_are_refused(settings: dict) -> None:
    with pytest.raises(ValueError):
        LoadTestConfig(target="127.0.0.1:1", model="multi_input", **settings)


def test_unknown_model_is_refused() -> None:
    with pytest.raises(ValueError, match="model must be one of"):
        LoadTestConfig(target="127.0.0.1:1", model="nope", concurrency=1, requests=1)


@pytest.mark.parametrize(
    "argv",
    [
        ["loadtest", "multi_input", "--concurrency", "2"],
        ["loadtest", "multi_input", "--requests", "2"],
        ["loadtest", "multi_input", "--concurrency", "2", "--rate", "5", "--requests", "2"],
        ["loadtest", "unknown_model", "--concurrency", "2", "--requests", "2"],
        ["loadtest", "multi_input", "--concurrency", "two", "--requests", "2"],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2


def test_cli_bad_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["loadtest", "multi_input", "--concurrency", "0", "--requests", "2"]) == 2
    assert "concurrency must be > 0" in capsys.readouterr().err


# -- the REST protocols (clients/rest.py), against a scripted HTTP server in this process -----------------------------

MULTI_INPUT_OIP_METADATA = {
    "name": "multi_input",
    "versions": ["1"],
    "platform": "tensorflow_savedmodel",
    "inputs": [
        {"name": "input_a", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "input_b", "datatype": "FP32", "shape": [-1, 20]},
    ],
    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 1]}],
}


def tf_input(name: str, dtype: str, dims: list[int]) -> dict:
    return {"name": name, "dtype": dtype, "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims]}}


# As TF Serving's REST API writes GET /v1/models/multi_input/metadata (protobuf's JSON: int64 sizes as strings).
MULTI_INPUT_TF_METADATA = {
    "model_spec": {"name": "multi_input", "version": "1", "signature_name": ""},
    "metadata": {
        "signature_def": {
            "signature_def": {
                "serving_default": {
                    "inputs": {
                        "input_b": tf_input("input_b", "DT_FLOAT", [-1, 20]),
                        "input_a": tf_input("input_a", "DT_FLOAT", [-1, 10]),
                    },
                    "outputs": {"output": tf_input("output", "DT_FLOAT", [-1, 1])},
                    "method_name": "tensorflow/serving/predict",
                }
            }
        }
    },
}


class ScriptedHttpServer:
    """A minimal HTTP/1.1 server on a loopback port: GETs answer the metadata documents; each POST takes the next
    action of `script` (cycling): a status to answer, "close" (drop the connection unanswered) or "hang" (never
    answer). It records every POST it read, so counts can be compared on both sides."""

    def __init__(self, script: list[int | str], has_config: bool = True) -> None:
        self.script = script
        self.has_config = has_config  # False: /config answers 404, as KServe's and MLServer's servers do
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if method == "GET":
                    document = MULTI_INPUT_TF_METADATA if path.startswith("/v1/") else MULTI_INPUT_OIP_METADATA
                    status = 200
                    if path.endswith("/config"):
                        document = {"name": "multi_input", "max_batch_size": 64}
                        status = 200 if self.has_config else 404
                    payload = json.dumps(document).encode()
                else:
                    action = self.script[len(self.posts) % len(self.script)]
                    self.posts.append((path, headers, body))
                    if action == "close":
                        return
                    if action == "hang":
                        await asyncio.sleep(3600)
                    assert isinstance(action, int)
                    status, payload = action, b"{}" if action == 200 else b'{"error": "scripted"}'
                reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Other"
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        finally:
            writer.close()


def run_scripted(
    script: list[int | str], has_config: bool = True, **settings: object
) -> tuple[LoadTestResult, ScriptedHttpServer]:
    async def main() -> tuple[LoadTestResult, ScriptedHttpServer]:
        scripted = ScriptedHttpServer(script, has_config)
        async with scripted as address:
            config = LoadTestConfig(
                target="127.0.0.1:1", http_target=f"http://{address}", model="multi_input", **settings
            )
            return await run_loadtest(config), scripted

    return asyncio.run(main())


@pytest.mark.parametrize("protocol", rest.PROTOCOLS)
def test_rest_statuses_are_counted_under_the_grpc_names(protocol: str) -> None:
    """Every call counted once, on both sides, under the gRPC status name of its HTTP status (SPEC §13)."""
    script: list[int | str] = [200, 400, 404, 429, 503, 504, 500, 200, 418]
    result, scripted = run_scripted(script, protocol=protocol, concurrency=3, requests=18)
    assert (result.requests, result.ok, result.protocol) == (18, 4, protocol)
    assert result.errors == {
        "INVALID_ARGUMENT": 2,
        "NOT_FOUND": 2,
        "RESOURCE_EXHAUSTED": 2,
        "UNAVAILABLE": 2,
        "DEADLINE_EXCEEDED": 2,
        "INTERNAL": 2,
        "HTTP_418": 2,
    }
    assert len(scripted.posts) == 18
    assert scripted.connections <= 3 + 1  # keep-alive: at most one connection per caller, and the metadata's
    assert_consistent(result)


def test_rest_connection_errors_are_unavailable_and_deadlines_deadline_exceeded() -> None:
    result, scripted = run_scripted([200, "close", "hang"], protocol="rest-oip-binary", concurrency=1, requests=6,
                                    timeout=0.5)  # fmt: skip
    assert (result.requests, result.ok) == (6, 2)
    assert result.errors == {"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 2}
    assert len(scripted.posts) == 6  # a dropped connection is not resent
    assert_consistent(result)


def test_rest_open_loop_counts_what_it_could_not_send() -> None:
    result, scripted = run_scripted(["hang"], protocol="rest-oip-json", rate=1000, requests=10, max_outstanding=2,
                                    timeout=0.5)  # fmt: skip
    assert (result.mode, result.requests, result.ok) == ("open", 10, 0)
    assert result.errors == {CLIENT_OVERLOAD: 8, "DEADLINE_EXCEEDED": 2}
    assert len(scripted.posts) == 2
    assert_consistent(result)


def test_rest_bodies_as_each_protocols_clients_send_them() -> None:
    result, scripted = run_scripted([200], protocol="rest-oip-json", concurrency=1, requests=2, rows_per_request=3,
                                    version=1, token_file=None)  # fmt: skip
    assert result.ok == 2
    path, headers, body = scripted.posts[0]
    assert path == "/v2/models/multi_input/versions/1/infer" and headers["content-type"] == "application/json"
    assert "accept-encoding" not in headers  # replies as the server writes them
    document = json.loads(body)
    assert [(t["name"], t["datatype"], t["shape"], len(t["data"])) for t in document["inputs"]] == [
        ("input_a", "FP32", [3, 10], 30),
        ("input_b", "FP32", [3, 20], 60),
    ]
    assert scripted.posts[1][2] == body  # built once, sent for every call


def test_rest_binary_body_is_tritons_binary_tensor_format() -> None:
    """The JSON header, then the tensors' raw bytes: the same values as the gRPC OIP request of the same seed."""
    arrays = oip.random_arrays(
        "multi_input", [("input_a", "FP32", [-1, 10]), ("input_b", "FP32", [-1, 20])], True, 2, 5
    )
    request = rest.oip_request("multi_input", 0, arrays, binary=True)
    assert request.path == "/v2/models/multi_input/infer"
    length = int(request.headers["Inference-Header-Content-Length"])
    header, data = json.loads(request.body[:length]), request.body[length:]
    assert header["parameters"] == {"binary_data_output": True}
    sizes = [t["parameters"]["binary_data_size"] for t in header["inputs"]]
    assert sizes == [2 * 10 * 4, 2 * 20 * 4] and len(data) == sum(sizes)
    assert data == b"".join(oip.build_request("multi_input", arrays).raw_input_contents)
    json_request = rest.oip_request("multi_input", 0, arrays, binary=False)
    values = json.loads(json_request.body)["inputs"][0]["data"]
    assert np.array_equal(np.asarray(values, np.float32), arrays["input_a"].ravel())


def test_rest_bytes_inputs_in_json_and_binary() -> None:
    arrays = oip.random_arrays("strings", [("text", "BYTES", [-1, 2])], True, 1, 0)
    json_body = json.loads(rest.oip_request("strings", 0, arrays, binary=False).body)
    assert json_body["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["x", "x"]}
    binary = rest.oip_request("strings", 0, arrays, binary=True)
    assert binary.body.endswith(b"\x01\x00\x00\x00x" * 2)  # 4-byte little-endian length, then the bytes


def test_tfserving_row_format_from_the_models_metadata() -> None:
    signature, arrays = rest.tfserving_arrays("multi_input", MULTI_INPUT_TF_METADATA, rows=2, seed=0)
    request = rest.tfserving_request("multi_input", 3, signature, arrays)
    assert request.path == "/v1/models/multi_input/versions/3:predict"
    instances = json.loads(request.body)["instances"]
    assert len(instances) == 2 and all(set(row) == {"input_a", "input_b"} for row in instances)
    assert (len(instances[0]["input_a"]), len(instances[0]["input_b"])) == (10, 20)
    assert "signature_name" not in json.loads(request.body)  # serving_default is the default
    with pytest.raises(rest.SetupError, match="serving_default"):
        two = {"metadata": {"signature_def": {"signature_def": {"a": {"inputs": {}}, "b": {"inputs": {}}}}}}
        rest.tfserving_arrays("m", two, rows=1, seed=0)


def test_http_statuses_map_to_the_servers_code_names() -> None:
    assert {status: rest.code_of_status(status) for status in (200, 400, 404, 429, 503, 504)} == {
        200: "OK",
        400: "INVALID_ARGUMENT",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }
    assert rest.code_of_status(418) == "HTTP_418"


def test_rest_run_without_a_server_fails_before_any_call() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: connections are refused
        config = LoadTestConfig(target="", http_target=address, model="any", protocol="rest-tfserving",
                                concurrency=1, requests=1)  # fmt: skip
        with pytest.raises(rest.SetupError, match="metadata"):
            asyncio.run(run_loadtest(config))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"http_target": ""}, "needs http_target"),
        ({"http_target": "ftp://host:1"}, "http:// or https://"),
        ({"http_target": "http://host:1", "tls": True}, "https://"),
    ],
)
def test_rest_settings_are_checked(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoadTestConfig(target="", model="any", protocol="rest-oip-json", concurrency=1, requests=1, **settings)


def test_rest_https_target_from_host_and_port() -> None:
    assert rest.base_url("example.org:8443", tls=True) == "https://example.org:8443"
    assert rest.base_url("http://127.0.0.1:8000/", tls=False) == "http://127.0.0.1:8000"


def test_cli_rest_protocols_take_any_model_and_report_setup_errors(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--http-target", "127.0.0.1:1", "loadtest", "not_a_typed_model", "--protocol", "rest-oip-binary"]
    assert cli_main([*argv, "--concurrency", "1", "--requests", "1", "--no-progress"]) == 1
    assert "error: GET http://127.0.0.1:1/v2/models/not_a_typed_model" in capsys.readouterr().err


def test_rest_oip_without_a_config_endpoint_reads_the_batch_dimension_from_the_metadata() -> None:
    """KServe's and MLServer's v2 servers have no /config: a first dimension of -1 on every input is the batch."""
    result, scripted = run_scripted([200], has_config=False, protocol="rest-oip-binary", concurrency=1, requests=1,
                                    rows_per_request=2)  # fmt: skip
    assert result.ok == 1
    header = json.loads(scripted.posts[0][2][: int(scripted.posts[0][1]["inference-header-content-length"])])
    assert [t["shape"] for t in header["inputs"]] == [[2, 10], [2, 20]]
    arrays = rest.oip_arrays("multi_input", MULTI_INPUT_OIP_METADATA, None, rows=3, seed=0)
    assert {name: a.shape for name, a in arrays.items()} == {"input_a": (3, 10), "input_b": (3, 20)}
    fixed = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 2]}]}
    assert rest.oip_arrays("fixed", fixed, None, rows=1, seed=0)["x"].shape == (2, 2)
    with pytest.raises(oip.InputError, match="no batch dimension"):
        rest.oip_arrays("fixed", fixed, None, rows=2, seed=0)
